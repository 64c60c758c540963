//! Reconcilers. Each reads as observe → plan → act → record: it takes the object from the
//! sharded cache, asks the pure core what to do, acts with deterministic names, and records
//! the result in status with a resourceVersion precondition. Every side effect is checked
//! against the shard fence and written to the action log first.

pub mod step_job;
pub mod step_pod;
pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::Recorder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ha::{Informer, Ownership};

/// Controller metrics.
#[derive(Clone)]
pub struct Metrics {
    pub dispatch_latency: Histogram,
    pub jobs_created: Counter,
    pub status_writes: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            dispatch_latency: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            jobs_created: Counter::default(),
            status_writes: Counter::default(),
        };
        registry.register("shoal_step_dispatch_latency_seconds", "From seeing a step's Job finish to creating its dependents' Jobs", m.dispatch_latency.clone());
        registry.register("shoal_jobs_created", "Step Jobs created", m.jobs_created.clone());
        registry.register("shoal_status_writes", "Workflow status patches sent", m.status_writes.clone());
        m
    }
}

/// What every reconciler gets.
pub struct Context {
    pub client: Client,
    pub own: Ownership,
    /// How often an object is looked at again without any change.
    pub resync: Duration,
    /// Jobs of the shards this replica holds.
    pub jobs: Arc<Informer<step_job::StepJob>>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// For each object whose status this replica patched: the resourceVersion the patch
    /// replaced. A cached copy still at that version predates our own write (the watch has
    /// not caught up); planning from it could repeat work, so it is skipped.
    pub superseded: std::sync::Mutex<std::collections::HashMap<crate::ha::Key, String>>,
}

impl Context {
    /// True if `rv` is a version this replica has already replaced with its own write.
    /// Once the cache has a newer copy the entry is dropped, so the map stays small.
    pub fn is_superseded(&self, key: &crate::ha::Key, rv: Option<&str>) -> bool {
        let Ok(mut m) = self.superseded.lock() else { return false };
        let stale = matches!((m.get(key), rv), (Some(old), Some(rv)) if old == rv);
        if !stale {
            m.remove(key);
        }
        stale
    }

    pub fn mark_superseded(&self, key: crate::ha::Key, rv: Option<String>) {
        if let (Ok(mut m), Some(rv)) = (self.superseded.lock(), rv) {
            m.insert(key, rv);
        }
    }
}

pub type Ctx = Arc<Context>;

/// Errors of a reconcile; `reason()` names them for Events and metric labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeError",
            Error::Json(_) => "SerializationError",
        }
    }
}
