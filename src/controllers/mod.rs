//! Reconcilers. Each reads as observe → plan → act → record: it takes the object from the
//! sharded cache, asks the pure core what to do, acts with deterministic names, and records
//! the result in status with a resourceVersion precondition. Every side effect is checked
//! against the shard fence and written to the action log first.

pub mod activity;
pub mod activity_worker;
pub mod bare_pod;
mod context;
pub mod ignitor;
pub mod jobs;
pub mod nsman;
pub mod runtime;
pub mod step_job;
pub mod step_pod;
pub mod task;
pub mod workflow;
pub mod workflow_gc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{ExemplarHistogram, exemplar_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The kinds garbage collection deletes: step Jobs, bare step pods, workflows.
pub const GC_KINDS: [&str; 3] = ["Job", "Pod", "Workflow"];

/// Buckets of a step's run time: a second to six hours.
const STEP_DURATION_BUCKETS: [f64; 14] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0];

fn step_duration_histogram() -> ExemplarHistogram {
    exemplar_histogram(&STEP_DURATION_BUCKETS)
}

/// Workflow controller metrics. The histograms carry the trace id of the reconcile that
/// observed them as an exemplar.
#[derive(Clone)]
pub struct Metrics {
    pub dispatch_latency: ExemplarHistogram,
    /// From a step's (last attempt's) start to its finish, by how it ended.
    pub step_duration: Family<PhaseLabel, ExemplarHistogram>,
    /// Workflows this replica recorded as finished, by phase (Completed, Failed).
    pub workflows_finished: Family<PhaseLabel, Counter>,
    pub jobs_created: Counter,
    pub status_writes: Counter,
    /// Objects garbage collection deleted, by kind (`GC_KINDS`).
    pub gc_deletions: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            dispatch_latency: exemplar_histogram(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            step_duration: Family::new_with_constructor(step_duration_histogram),
            workflows_finished: Family::default(),
            jobs_created: Counter::default(),
            status_writes: Counter::default(),
            gc_deletions: Family::default(),
        };
        for phase in ["Succeeded", "Failed"] {
            let _ = m.step_duration.get_or_create(&PhaseLabel { phase });
        }
        for phase in ["Completed", "Failed"] {
            let _ = m.workflows_finished.get_or_create(&PhaseLabel { phase });
        }
        for kind in GC_KINDS {
            let _ = m.gc_deletions.get_or_create(&KindLabel { kind });
        }
        registry.register("shoal_step_dispatch_latency_seconds", "From seeing a step's Job finish to creating its dependents' Jobs", m.dispatch_latency.clone());
        registry.register("shoal_step_duration_seconds", "From a step's (last attempt's) start to its finish, by phase (Succeeded, Failed)", m.step_duration.clone());
        registry.register("shoal_workflows_finished", "Workflows recorded as finished, by phase (Completed, Failed)", m.workflows_finished.clone());
        registry.register("shoal_jobs_created", "Step Jobs created", m.jobs_created.clone());
        registry.register("shoal_status_writes", "Workflow status patches sent", m.status_writes.clone());
        registry.register("shoal_gc_deletions", "Objects deleted by garbage collection, by kind (Job, Pod, Workflow)", m.gc_deletions.clone());
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
