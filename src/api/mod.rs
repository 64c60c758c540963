//! The shoal API: every custom resource kind of group `shoal.dev`, version `v1alpha1`.
//!
//! This module owns the wire format (field names follow the original seeds) and the admission
//! rules that the API server enforces from the generated OpenAPI schema and CEL rules. It must
//! never talk to the API server; the generated CRDs are produced by [`crds`].

pub mod activity;
pub mod conditions;
pub mod crds;
pub mod delivery;
pub mod nsman;
pub mod task;
pub mod workflow;

pub use activity::{Activity, ActivityJob, ActivitySpec, ActivityState, ActivityStatus, ActivityWorker, ActivityWorkerSpec, ActivityWorkerStatus, WorkerState};
pub use nsman::{NamespaceManager, NamespaceManagerSpec, NamespaceManagerStatus};
pub use task::{ActionPlugin, ActionPluginSpec, Ignitor, IgnitorSpec, IgnitorStatus, Task, TaskSpec, TaskStatus};
pub use workflow::{Workflow, WorkflowSpec, WorkflowStatus, WorkflowStep};

/// API group of every shoal kind.
pub const GROUP: &str = "shoal.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get <category>` name that lists every shoal kind.
pub const CATEGORY: &str = "shoal";
/// Label carried by every shoal object and every child shoal creates: the virtual shard.
pub const SHARD_LABEL: &str = "shoal.dev/shard";
