//! Reconcilers. Each reads as observe → plan → act → record: it takes the object from the
//! sharded cache, asks the pure core what to do, acts with deterministic names, and records
//! the result in status with a resourceVersion precondition. Every side effect is checked
//! against the shard fence and written to the action log first.

pub mod activity;
pub mod activity_worker;
mod context;
pub mod ignitor;
pub mod jobs;
pub mod nsman;
pub mod runtime;
pub mod step_job;
pub mod step_pod;
pub mod task;
pub mod workflow;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Controller metrics.
#[derive(Clone)]
pub struct Metrics {
    pub dispatch_latency: Histogram,
    pub jobs_created: Counter,
    pub status_writes: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m =
            Self { dispatch_latency: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]), jobs_created: Counter::default(), status_writes: Counter::default() };
        registry.register("shoal_step_dispatch_latency_seconds", "From seeing a step's Job finish to creating its dependents' Jobs", m.dispatch_latency.clone());
        registry.register("shoal_jobs_created", "Step Jobs created", m.jobs_created.clone());
        registry.register("shoal_status_writes", "Workflow status patches sent", m.status_writes.clone());
        m
    }
}

pub use context::Context;

/// Errors of a reconcile; `reason()` names them for Events and metric labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Write(#[from] crate::ha::WriteError),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeError",
            Error::Json(_) => "SerializationError",
            Error::Write(crate::ha::WriteError::Fenced) => "Fenced",
            Error::Write(crate::ha::WriteError::Deadline) => "FenceDeadline",
            Error::Write(crate::ha::WriteError::Kube(_)) => "KubeError",
        }
    }
}
