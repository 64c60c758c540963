//! `Task` and `Ignitor` (seed 004): a task runs a pod when an ignitor fires or when another
//! task succeeds or fails; data passes along through the termination message.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
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
    /// Guards against trigger loops (the seed's own `task1 startOnFailure: [task1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_guard: Option<LoopGuard>,
}

impl TaskSpec {
    /// Default of `successfulRunsHistoryLimit`.
    pub const DEFAULT_SUCCESSFUL_RUNS_HISTORY_LIMIT: i32 = 3;
    /// Default of `failedRunsHistoryLimit`.
    pub const DEFAULT_FAILED_RUNS_HISTORY_LIMIT: i32 = 1;
}

/// Bounds on runs started by other runs. A run started by a failure waits
/// `backoffSeconds * 2^(n-1)` (at most `maxBackoffSeconds`), where `n` counts the failures in
/// a row along the chain of runs that led to it; once `n` exceeds `maxConsecutiveFailures`
/// the run is not started (recorded as `Skipped`, reason `LoopLimit`). A run started by an
/// Ignitor starts a new chain; a success resets `n`. Any chain of runs started by runs
/// (successes included) is cut after `maxChainLength` runs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoopGuard {
    /// First delay before a run started by a failure. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub backoff_seconds: Option<i64>,
    /// The longest delay. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_backoff_seconds: Option<i64>,
    /// Failures in a row after which a failure starts nothing more. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_consecutive_failures: Option<i32>,
    /// Runs in one chain (each started by the previous one's outcome) after which the chain
    /// stops. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_chain_length: Option<i32>,
}

impl LoopGuard {
    pub const DEFAULT_BACKOFF_SECONDS: i64 = 10;
    pub const DEFAULT_MAX_BACKOFF_SECONDS: i64 = 300;
    pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: i32 = 5;
    pub const DEFAULT_MAX_CHAIN_LENGTH: i32 = 100;
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
    /// `Running` while a run runs (or waits to start); otherwise the outcome of the last
    /// finished run; `Pending` before the first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<Time>,
    /// Failed runs since the Task was created.
    #[serde(default)]
    pub failures_count: i64,
    /// Failed runs since the last successful one.
    #[serde(default)]
    pub consecutive_failures: i64,
    /// Finished runs so far; each finished run's `seq` is this count when it finished.
    /// Dependents use it to know which runs they have acted on.
    #[serde(default)]
    pub finished_runs: i64,
    /// The runs: every active one, and the latest finished ones within the history limits,
    /// oldest first.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub runs: Vec<TaskRun>,
    /// For each trigger (Ignitor or Task) this Task has seen: what it has acted on so far.
    #[serde(default)]
    #[schemars(length(max = 200))]
    pub triggers: Vec<TriggerCursor>,
    /// Action deliveries (webhooks of `successActions`/`failureActions`) through the effects
    /// outbox: pending ones and the latest finished ones.
    #[serde(default)]
    #[schemars(length(max = 200))]
    pub deliveries: Vec<crate::api::delivery::Delivery>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where one run of a Task stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunPhase {
    /// Recorded; its Job is not created yet (waiting for its backoff, or about to be).
    Pending,
    /// Its Job exists and has not finished.
    Running,
    Succeeded,
    Failed,
    /// Never started: refused by `concurrencyPolicy: Forbid`, the loop guard, or a trigger
    /// that could not be used. Dependents are not started by it.
    Skipped,
    /// Stopped before it finished (`concurrencyPolicy: Replace`, or its Job deleted by
    /// someone else). Dependents are not started by it.
    Stopped,
}

/// What started a run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Initiator {
    /// `Ignitor` or `Task`.
    pub kind: String,
    pub name: String,
    /// For a Task: the run whose outcome started this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// For an Ignitor: the scheduled time that fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<MicroTime>,
}

/// One run of a Task: a Job made from the Task's template.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskRun {
    /// The run's name, which is also its Job's: derived from the Task and what started it.
    pub name: String,
    pub phase: RunPhase,
    pub initiator: Initiator,
    /// `ORCA_DATA` for the run, kept only until its Job is created (the Job holds it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Runs in a row, along the chain of runs that led to this one (1 for a run started by
    /// an Ignitor).
    #[serde(default)]
    pub chain: i32,
    /// Failures in a row along that chain, up to and including this run's initiator.
    #[serde(default)]
    pub failures_in_a_row: i32,
    /// Not started before this time (the loop guard's backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_after: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// Order among finished runs (see `finishedRuns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// The run's termination message (the first container with one), passed on as
    /// `ORCA_DATA` to the tasks this run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a Task has acted on, for one of its triggers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerCursor {
    /// `Ignitor` or `Task`.
    pub kind: String,
    pub name: String,
    /// The trigger's UID: one deleted and created again under the same name starts afresh.
    pub uid: String,
    /// Only firings and finished runs recorded at or after this time start runs.
    pub since: MicroTime,
    /// For an Ignitor: the last scheduled time acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<MicroTime>,
    /// For a Task: the `seq` of the last finished run acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
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
    /// `Forbid` skips this firing (each Task records a `Skipped` run, reason `ConcurrencyForbid`; it is not retried), `Replace` stops the
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
/// running, as a CronJob's `concurrencyPolicy`, applied per Task: `Allow` (default) starts the run anyway,
/// `Forbid` skips this firing (each Task records a `Skipped` run, reason `ConcurrencyForbid`; it is not retried), `Replace` stops the running
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
    /// When it last fired (the actual time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ignition: Option<Time>,
    /// The next scheduled time, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ignition: Option<Time>,
    /// Firings so far.
    #[serde(default)]
    pub ignitions_count: i64,
    /// The last scheduled time recorded, fired or missed: no time at or before it fires again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_time: Option<MicroTime>,
    /// The latest firings (at most 100), oldest first: each scheduled time and when it fired.
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub ignitions: Vec<Ignition>,
    /// Scheduled times not fired (past the starting deadline, or beyond the catch-up bound).
    #[serde(default)]
    pub missed_count: i64,
    /// The latest missed scheduled times (at most 10), oldest first.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub missed: Vec<MicroTime>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One firing of an Ignitor.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ignition {
    /// The scheduled time (for `NOW`, the Ignitor's creation time).
    pub scheduled_time: MicroTime,
    /// When the firing was recorded.
    pub fired_at: MicroTime,
}

/// A named webhook target for Task `successActions` and `failureActions`, configured by the
/// cluster admin (cluster-scoped: only cluster admins can create one by default). A Task
/// names it; the delivery goes through the effects outbox, signed with the Secret's key.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "ActionPlugin",
    plural = "actionplugins",
    shortname = "ap",
    category = "shoal",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ActionPluginSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The receiver's URL (http or https, no credentials).
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self) && (url(self).getScheme() == 'http' || url(self).getScheme() == 'https')",
        "message": "url must be an http or https URL"
    }]))]
    pub url: String,
    /// The signing key (Standard Webhooks), in a Secret in the operator's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::api::delivery::SecretKeyRef>,
    /// Seconds one attempt may take. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: Option<i64>,
    /// Attempts before the delivery is given up. Default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<i32>,
}
