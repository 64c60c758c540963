//! `Workflow` (seed 001): a DAG of container steps, each run as a Job in dependency order.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most steps one workflow may have. With the per-field bounds below this keeps the
/// worst-case object well under etcd's 1.5 MB limit (see docs/architecture.md).
pub const MAX_STEPS: usize = 200;
/// Most upstream steps one step may name.
pub const MAX_DEPENDS_ON: usize = 50;

fn default_max_step_timeout() -> i64 {
    60
}

/// A DAG of container steps. Each step runs as one Job; a step starts once every step it
/// `dependsOn` has succeeded, and independent steps run at the same time.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "Workflow",
    plural = "workflows",
    namespaced,
    status = "WorkflowStatus",
    shortname = "wf",
    category = "shoal",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.workflowStatus"}"#,
    printcolumn = r#"{"name":"Steps","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":0}"#
)]
#[serde(rename_all = "camelCase")]
// Admission bounds. List membership in CEL is linear, so checking every dependsOn entry
// costs steps x edges; with at most 4000 edges in all it fits the API server's per-call
// budget (measured: 200 steps x 4675 edges passes, x 5535 is cancelled). A per-workflow
// budget on the total text of command/args/env cannot be expressed: join-based rules exceed
// the estimated cost budget more than 100-fold. See docs/architecture.md for the bounds.
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.containers.all(c, !has(c.dependsOn) || !(c.stepName in c.dependsOn))",
        "message": "a step must not depend on itself",
        "reason": "FieldValueInvalid",
        "fieldPath": ".containers"
    },
    {
        "rule": "size(self.containers.filter(c, has(c.dependsOn)).map(c, c.dependsOn).flatten()) <= 4000",
        "message": "a workflow may have at most 4000 dependsOn entries in all",
        "reason": "FieldValueForbidden",
        "fieldPath": ".containers"
    },
    {
        "rule": "size(self.containers.filter(c, has(c.dependsOn)).map(c, c.dependsOn).flatten()) > 4000 || sets.contains(self.containers.map(c, c.stepName), self.containers.filter(c, has(c.dependsOn)).map(c, c.dependsOn).flatten())",
        "message": "every dependsOn entry must name a step of this workflow",
        "reason": "FieldValueInvalid",
        "fieldPath": ".containers"
    },
    {
        "rule": "self.containers.all(a, self.containers.exists_one(b, b.stepName.lowerAscii().replace('_', '-') == a.stepName.lowerAscii().replace('_', '-')))",
        "message": "step names must differ in more than case and in '-' versus '_': labels and SHOAL_OUTPUT_<STEP> variables are derived from them",
        "reason": "FieldValueInvalid",
        "fieldPath": ".containers"
    },
    {
        "rule": "size(self.containers.filter(c, has(c.env)).map(c, c.env).flatten()) <= 512",
        "message": "a workflow may set at most 512 environment variables in all",
        "reason": "FieldValueForbidden",
        "fieldPath": ".containers"
    }
]))]
pub struct WorkflowSpec {
    /// Seconds a step may run before it, and with it the workflow, fails. `-1` means no limit.
    #[serde(default = "default_max_step_timeout")]
    #[schemars(range(min = -1, max = 604800))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == -1 || self > 0", "message": "maxStepTimeout must be -1 (unlimited) or a positive number of seconds"}]))]
    pub max_step_timeout: i64,

    /// Stop starting new steps after the first failure (default). When false, branches that
    /// do not depend on the failed step still run to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_fast: Option<bool>,

    /// How each step attempt runs: `Job` (a Job per attempt, which runs one pod) or `Pod` (one
    /// bare pod per attempt, which asks far less of the API server; see docs/workflow.md). When
    /// unset, the operator's `--default-executor`. Changing it is a spec change: the workflow
    /// starts again in the new mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,

    /// The steps. Step names are unique (the list is a map keyed by `stepName`).
    #[schemars(length(min = 1, max = 200))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["stepName"]))]
    pub containers: Vec<WorkflowStep>,

    /// Pod settings for every step (resources, securityContext, serviceAccountName,
    /// nodeSelector, tolerations, imagePullSecrets …); a step's own value replaces each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_defaults: Option<StepPodSettings>,

    /// When the objects of finished step attempts (Jobs, or pods with the `Pod` executor) are
    /// deleted. Outputs are kept in status. Each field unset here takes the operator's default
    /// (`--pod-gc-*`); with neither, everything is kept. See docs/workflow.md.
    #[serde(default, rename = "podGC", skip_serializing_if = "Option::is_none")]
    pub pod_gc: Option<PodGc>,

    /// Delete the workflow itself (and with it whatever of its step objects is left) this long
    /// after it finished. Each field unset here takes the operator's default
    /// (`--workflow-ttl-*`); with neither, the workflow stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_strategy: Option<TtlStrategy>,
}

/// Garbage collection of a workflow's step objects (Argo's `podGC`). A step object is the Job
/// of a step attempt, or its pod with the `Pod` executor.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodGc {
    /// `OnPodCompletion`: each step attempt's object once its result is recorded;
    /// `OnPodSuccess`: the same, succeeded attempts only (failed ones stay for inspection);
    /// `OnWorkflowCompletion`: every step object once the workflow has finished;
    /// `OnWorkflowSuccess`: every step object once the workflow has completed (a failed
    /// workflow keeps them all); `Never`: keep them (overrides an operator default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Never", "OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"]))]
    pub strategy: Option<String>,
    /// How long after an object becomes due (its attempt's end with the `OnPod*` strategies,
    /// the workflow's end with the `OnWorkflow*` ones) it is deleted: a Go duration such as
    /// `30s`, `10m` or `1h30m`, at most `8760h`. Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+)$"))]
    // The rule is guarded by the pattern, so a value that is no duration gets the pattern's
    // message only, not a CEL conversion error too.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^(0|([0-9]+(\\\\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+)$') || duration(self) <= duration('8760h')",
        "message": "deleteDelayDuration must be at most 8760h (a year)"
    }]))]
    pub delete_delay_duration: Option<String>,
    /// Of the objects the strategy would delete, keep the N whose attempts finished last (per
    /// workflow). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub keep_last: Option<i32>,
}

/// When a finished workflow deletes itself (Argo's `ttlStrategy`), in seconds after it
/// finished (`status.statusChanged`). `secondsAfterSuccess` and `secondsAfterFailure`, when
/// set, take precedence over `secondsAfterCompletion`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TtlStrategy {
    /// Seconds after the workflow finished, either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315360000))]
    pub seconds_after_completion: Option<i64>,
    /// Seconds after the workflow completed (every step succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315360000))]
    pub seconds_after_success: Option<i64>,
    /// Seconds after the workflow failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315360000))]
    pub seconds_after_failure: Option<i64>,
}

/// What runs a step attempt.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, clap::ValueEnum)]
#[clap(rename_all = "PascalCase")]
pub enum Executor {
    /// A Job per attempt (seed 001): the Job controller runs the pod.
    #[default]
    Job,
    /// A bare pod per attempt, created and watched by shoal itself.
    Pod,
}

impl std::fmt::Display for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Executor::Job => "Job",
            Executor::Pod => "Pod",
        })
    }
}

/// One step: a container run to completion as a Job or a pod (`spec.executor`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStep {
    /// Unique name of the step within the workflow: letters, digits, `-` and `_`. Two steps
    /// must differ in more than case and in `-` versus `_`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?$"))]
    pub step_name: String,
    /// Container image.
    #[schemars(length(min = 1, max = 256))]
    pub image: String,
    /// Entrypoint; the image's own when null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Option<Vec<String>>,
    /// Environment of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub env: Option<Vec<EnvVar>>,
    /// Names of the steps that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 63)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub depends_on: Option<Vec<String>>,
    /// Extra attempts after a failure, with exponential backoff. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 20))]
    pub retries: Option<i32>,
    /// Labels and annotations for the step's pod (as Argo's template `metadata`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<StepMetadata>,
    /// Per-step timeout in seconds; overrides `maxStepTimeout`. `-1` means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 604800))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == -1 || self > 0", "message": "timeoutSeconds must be -1 (unlimited) or a positive number of seconds"}]))]
    pub timeout_seconds: Option<i64>,
    /// What the step's pod runs with (resources, security, placement, identity); each field
    /// set here replaces the workflow's `stepDefaults` field of the same name.
    #[serde(flatten)]
    pub pod: StepPodSettings,
}

/// How a step's pod runs: what real workloads need. Set per step, or for every step in the
/// workflow's `stepDefaults`; a field set on a step replaces the default as a whole.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepPodSettings {
    /// CPU and memory requests and limits of the step's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// The step container's security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<k8s_openapi::api::core::v1::SecurityContext>,
    /// The step pod's security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<k8s_openapi::api::core::v1::PodSecurityContext>,
    /// The service account the step's pod runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Mount the service account's API token into the pod. Default false: a step talks to
    /// the API server only when asked to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
    /// Run only on nodes with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the step's pod tolerates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Secrets for pulling the step's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
}

impl StepPodSettings {
    /// The settings a step runs with: each field from the step if it sets it, else from the
    /// workflow's defaults.
    pub fn merged(defaults: Option<&StepPodSettings>, step: &StepPodSettings) -> StepPodSettings {
        let d = defaults.cloned().unwrap_or_default();
        StepPodSettings {
            resources: step.resources.clone().or(d.resources),
            security_context: step.security_context.clone().or(d.security_context),
            pod_security_context: step.pod_security_context.clone().or(d.pod_security_context),
            service_account_name: step.service_account_name.clone().or(d.service_account_name),
            automount_service_account_token: step.automount_service_account_token.or(d.automount_service_account_token),
            node_selector: step.node_selector.clone().or(d.node_selector),
            tolerations: step.tolerations.clone().or(d.tolerations),
            image_pull_secrets: step.image_pull_secrets.clone().or(d.image_pull_secrets),
        }
    }
}

/// Pod metadata of a step.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// Lifecycle of a workflow, as in seed 001.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkflowPhase {
    Created,
    Started,
    Completed,
    Failed,
}

/// State of one step.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StepPhase {
    Pending,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Skipped,
    /// The workflow failed fast while this step ran (or waited to retry); its Job was deleted.
    Cancelled,
}

/// Observed state of one step.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub step_name: String,
    pub phase: StepPhase,
    /// Attempt number of the current (or last) Job or pod, starting at 0.
    #[serde(default)]
    pub attempt: i32,
    /// Name of the current (or last) attempt's Job, or its pod with the `Pod` executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// UID of the current (or last) attempt's Job or pod; recorded once, so an attempt is
    /// never created twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The step's termination message (at most 4 KB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Observed state of a workflow.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// Created, Started, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_status: Option<WorkflowPhase>,
    /// When `workflowStatus` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_changed: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Steps whose Job has been created.
    #[serde(default)]
    pub started_steps: Vec<String>,
    /// Steps whose Job has succeeded.
    #[serde(default)]
    pub executed_steps: Vec<String>,
    /// `done/total`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Per-step state.
    #[serde(default)]
    pub steps: Vec<StepStatus>,
    /// The executor this generation runs with: `spec.executor`, or the operator's default
    /// when the run began (a later change of that default does not move a running workflow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::StepPodSettings;

    #[test]
    fn a_step_setting_replaces_the_default_field_by_field() {
        let defaults: StepPodSettings = serde_json::from_value(serde_json::json!({"serviceAccountName": "etl", "nodeSelector": {"pool": "batch"}, "automountServiceAccountToken": true})).unwrap();
        let step: StepPodSettings = serde_json::from_value(serde_json::json!({"nodeSelector": {"pool": "gpu"}})).unwrap();
        let m = StepPodSettings::merged(Some(&defaults), &step);
        assert_eq!(m.service_account_name.as_deref(), Some("etl"));
        assert_eq!(m.node_selector.unwrap()["pool"], "gpu");
        assert_eq!(m.automount_service_account_token, Some(true));
        assert_eq!(StepPodSettings::merged(None, &StepPodSettings::default()), StepPodSettings::default());
    }
}
