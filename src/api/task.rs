//! `Task` and `Ignitor` (seed 004): a task runs a pod when an ignitor fires or when another
//! task succeeds or fails; data passes along through the termination message.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Names of ignitors or tasks: short lists of object names.
const NAME_RULE: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// A pod template that runs when one of its triggers fires.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "Task",
    plural = "tasks",
    namespaced,
    status = "TaskStatus",
    shortname = "tsk",
    category = "shoal",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"LastSuccess","type":"string","jsonPath":".status.lastSuccess"}"#,
    printcolumn = r#"{"name":"LastFailure","type":"string","jsonPath":".status.lastFailure"}"#,
    printcolumn = r#"{"name":"FailuresCount","type":"integer","jsonPath":".status.failuresCount"}"#,
    printcolumn = r#"{"name":"Ignitors","type":"string","jsonPath":".spec.startOnIgnition"}"#,
    printcolumn = r#"{"name":"OnSuccessTask","type":"string","jsonPath":".spec.startOnSuccess"}"#,
    printcolumn = r#"{"name":"OnFailureTask","type":"string","jsonPath":".spec.startOnFailure"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Ignitors that start this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = NAME_RULE)))]
    pub start_on_ignition: Option<Vec<String>>,
    /// Tasks whose success starts this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = NAME_RULE)))]
    pub start_on_success: Option<Vec<String>>,
    /// Tasks whose failure starts this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = NAME_RULE)))]
    pub start_on_failure: Option<Vec<String>>,
    /// Actions (plugins) run when the task succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub success_actions: Option<Vec<String>>,
    /// Actions (plugins) run when the task fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub failure_actions: Option<Vec<String>>,
    /// The pod to run.
    pub template: PodTemplateSpec,
    /// How many finished successful runs are kept (their Jobs and their entries in the run
    /// history); older ones are deleted. Default 3, as a CronJob's
    /// `successfulJobsHistoryLimit`. The limits are on the Task, not on the Ignitor: runs
    /// belong to the Task (one Ignitor can start many Tasks, and a Task also runs on another
    /// Task's success or failure), and the Task's status holds the run history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_runs_history_limit: Option<i32>,
    /// How many finished failed runs are kept. Default 1, as a CronJob's
    /// `failedJobsHistoryLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_runs_history_limit: Option<i32>,
}

impl TaskSpec {
    /// Default of `successfulRunsHistoryLimit`.
    pub const DEFAULT_SUCCESSFUL_RUNS_HISTORY_LIMIT: i32 = 3;
    /// Default of `failedRunsHistoryLimit`.
    pub const DEFAULT_FAILED_RUNS_HISTORY_LIMIT: i32 = 1;
}

/// Where a task is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// Observed state of a Task.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<Time>,
    #[serde(default)]
    pub failures_count: i64,
    /// Pod of the current (or last) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// When an ignitor fires: `NOW`, an RFC 3339 time, or a cron expression.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "Ignitor",
    plural = "ignitors",
    namespaced,
    status = "IgnitorStatus",
    shortname = "ign",
    category = "shoal",
    printcolumn = r#"{"name":"Scheduled","type":"string","jsonPath":".spec.scheduled"}"#,
    printcolumn = r#"{"name":"LastIgnition","type":"date","jsonPath":".status.lastIgnition"}"#,
    printcolumn = r#"{"name":"NextIgnition","type":"string","jsonPath":".status.nextIgnition"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IgnitorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// `NOW`, an RFC 3339 time such as `2020-02-03T19:34:05Z`, or a 5- or 6-field cron
    /// expression such as `5 * * * *`. A cron expression that does not parse is reported as
    /// the condition `Ready=False, reason InvalidSchedule`.
    #[schemars(length(min = 1, max = 128))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == 'NOW' || self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$') || self.matches('^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$') || self.matches('^\\\\S+( +\\\\S+){4,5}$')",
        "message": "scheduled must be NOW, an RFC 3339 time, or a cron expression of 5 or 6 fields"
    }]))]
    pub scheduled: String,
    /// Passed to the started tasks as `ORCA_DATA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub data: Option<String>,
    /// IANA time zone in which a cron expression is evaluated, such as `Europe/Berlin`.
    /// Default `UTC`. Admission checks only the shape; an unknown zone is reported as the
    /// condition `Ready=False, reason InvalidSchedule`. It has no effect on `NOW` or on an RFC
    /// 3339 time (which carries its own offset). On a daylight-saving change a wall-clock time
    /// that does not exist (02:30 on the spring-forward day in `Europe/Berlin`) does not fire,
    /// and one that happens twice (02:30 on the fall-back day) fires once, at its first
    /// occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$')",
        "message": "timeZone must be an IANA time zone name such as Europe/Berlin or UTC"
    }]))]
    pub time_zone: Option<String>,
    /// What a firing does when runs started by an earlier firing of this Ignitor are still
    /// running, as a CronJob's `concurrencyPolicy`: `Allow` (default) starts the run anyway,
    /// `Forbid` skips this firing (recorded as missed, not retried), `Replace` stops the
    /// running ones and then starts the new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,
    /// A scheduled time that is more than this many seconds old when it could be fired is
    /// not fired; it is recorded as missed. Unset means no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub starting_deadline_seconds: Option<i64>,
    /// While true, nothing fires. When it turns false again, the times that passed meanwhile
    /// are treated like times missed during downtime (`maxCatchUp`, `startingDeadlineSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// How many scheduled times are fired at once after the controller was down (or the
    /// Ignitor suspended): the latest `maxCatchUp` times still within
    /// `startingDeadlineSeconds`; the older ones are recorded as missed. Default 1 (only the
    /// latest). 0 is not allowed (it would never fire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_catch_up: Option<u32>,
}

impl IgnitorSpec {
    /// Default of `maxCatchUp`.
    pub const DEFAULT_MAX_CATCH_UP: u32 = 1;
}

/// What a firing does when runs started by an earlier firing of the Ignitor are still
/// running, as a CronJob's `concurrencyPolicy`: `Allow` (default) starts the run anyway,
/// `Forbid` skips this firing (recorded as missed, not retried), `Replace` stops the running
/// ones and then starts the new run.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Start the run even if earlier runs are still running.
    #[default]
    Allow,
    /// Skip the firing while earlier runs are still running.
    Forbid,
    /// Stop the running ones, then start the new run.
    Replace,
}

/// Observed state of an Ignitor.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IgnitorStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ignition: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ignition: Option<Time>,
    #[serde(default)]
    pub ignitions_count: i64,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
