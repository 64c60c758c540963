//! The pure core: plain functions over plain data, with no kube client. Everything here is
//! tested exhaustively with unit and property tests.

pub mod activity;
pub mod dag;
pub mod gc;
pub mod graph;
pub mod plan;
pub mod policy;
pub mod schedule;
pub mod shard;
pub mod trigger;
