//! Integration tests against the real local control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok). One cluster is shared by every test; each
//! test works in a namespace of its own.

mod activity;
mod admission;
mod bare_pods;
mod cluster;
#[macro_use]
mod common;
mod crds;
mod exactly_once;
mod examples;
mod gc;
mod ha;
mod health;
mod helm;
mod helm_chart;
mod ignitor;
mod image;
mod lease_writes;
mod loadtest;
mod nsman;
mod operator;
mod outage;
mod prometheus;
mod rbac;
mod receiver;
mod runtime;
mod sharding;
mod step_pods;
mod tasks;
mod traces;
mod workflow;
