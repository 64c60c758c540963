//! Reconcilers. Each reads as observe → plan → act → record: it takes the object from the
//! sharded cache, asks the pure core what to do, acts with deterministic names, and records
//! the result in status with a resourceVersion precondition. Every side effect is checked
//! against the shard fence and written to the action log first.

pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;

use crate::ha::Ownership;

/// What every reconciler gets.
pub struct Context {
    pub client: Client,
    pub own: Ownership,
    /// How often an object is looked at again without any change.
    pub resync: Duration,
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
