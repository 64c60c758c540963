//! `Activity` and `ActivityWorker` (seed 000): an activity with inputs creates workers, and
//! each worker runs one job.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label that links an ActivityWorker to its Activity (seed 000 used
/// `kube-activity-engine.algatux.dev/activity`).
pub const ACTIVITY_LABEL: &str = "shoal.dev/activity";

/// A unit of work with inputs. Once initialised it creates `workers` ActivityWorkers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "Activity",
    plural = "activities",
    namespaced,
    status = "ActivityStatus",
    shortname = "act",
    category = "shoal",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Workers","type":"string","jsonPath":".status.workersSummary","description":"completed/total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ActivitySpec {
    /// Human name of the activity.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Input parameters, passed to every worker's job as environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub inputs: Option<BTreeMap<String, String>>,
    /// Template of the job each worker runs. Seed 000's default (bash:5.0 printing
    /// `done!`) is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<ActivityJob>,
    /// How many workers to create. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub workers: Option<i32>,
    /// Seconds a worker's container may run once started (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<i64>,
    /// Pod settings of the workers' pods (service account, resources, security context,
    /// node selector, tolerations, image pull secrets), as a Workflow step's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::api::workflow::StepPodSettings>,
}

/// Where an Activity stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ActivityState {
    /// Initialization: its workers are being created.
    Initializing,
    /// Workers exist and not all have finished.
    Running,
    /// Every worker completed.
    Completed,
    /// A worker failed.
    Failed,
}

/// State of one worker as the Activity sees it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatusEntry {
    pub name: String,
    pub state: WorkerState,
}

/// Observed state of an Activity.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ActivityState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// State of each worker.
    #[serde(default)]
    pub workers_status: Vec<WorkerStatusEntry>,
    /// `completed/total`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Image pull policy of a worker's container.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The job one worker runs (seed 000's ActivityJob).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityJob {
    /// Name of the job.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub env: Option<Vec<EnvVar>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
}

/// A worker of an Activity: runs `job` once.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "ActivityWorker",
    plural = "activityworkers",
    namespaced,
    status = "ActivityWorkerStatus",
    shortname = "aw",
    category = "shoal",
    printcolumn = r#"{"name":"Activity","type":"string","jsonPath":".metadata.labels.shoal\\.dev/activity"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".status.jobName"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.job.image","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ActivityWorkerSpec {
    pub job: ActivityJob,
    /// Seconds the container may run once started (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<i64>,
    /// Pod settings of the job's pod, as a Workflow step's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::api::workflow::StepPodSettings>,
}

/// Worker lifecycle, as in seed 000.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    Ready,
    Running,
    Completed,
    Failed,
}

/// Observed state of an ActivityWorker.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityWorkerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<WorkerState>,
    /// Name of the Job that runs this worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// UID of that Job, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
