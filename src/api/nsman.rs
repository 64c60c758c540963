//! `NamespaceManager` (seed 003): policies of the form "TTL elapsed or pods succeeded →
//! delete the namespace, scale it down, or call a webhook". Field names and enum values are
//! seed 003's own, so its manifests apply with only the apiVersion changed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Manages one namespace with a list of policies; the first policy whose condition holds
/// fires its action, and the manager then deactivates itself.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "NamespaceManager",
    plural = "namespacemanagers",
    namespaced,
    status = "NamespaceManagerStatus",
    shortname = "nsman",
    category = "shoal",
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.namespace"}"#,
    printcolumn = r#"{"name":"Deactivated","type":"boolean","jsonPath":".spec.deactivated"}"#,
    printcolumn = r#"{"name":"Fired","type":"string","jsonPath":".status.firedPolicy"}"#,
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".status.action.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceManagerSpec {
    /// The managed namespace; empty or absent means the manager's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"))]
    pub namespace: Option<String>,
    /// A deactivated manager is not evaluated. shoal sets it after an action succeeds; set it
    /// back to false to arm the manager again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated: Option<bool>,
    /// Evaluate the policies and record what would happen (status and an Event) without doing
    /// it: nothing is deleted, scaled or called, and the manager is not deactivated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// Policies, evaluated in order; the first whose condition holds wins.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub policies: Vec<Policy>,
}

/// A condition and the action it triggers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Unique name of the policy.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    pub condition: PolicyCondition,
    pub action: PolicyAction,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyConditionType {
    /// True once `ttlSeconds` have passed since the namespace was created.
    Ttl,
    /// True once the pods matching `podLabels` have all succeeded, or none are left.
    PodsSucceed,
}

/// When a policy fires.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'TTL' || (has(self.params) && has(self.params.ttlSeconds))", "message": "a TTL condition needs params.ttlSeconds"},
    {"rule": "self.type != 'PODS_SUCCEED' || (has(self.params) && has(self.params.podLabels) && size(self.params.podLabels) > 0)", "message": "a PODS_SUCCEED condition needs params.podLabels"}
]))]
pub struct PolicyCondition {
    #[serde(rename = "type")]
    pub type_: PolicyConditionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<ConditionParams>,
}

/// Parameters of a condition; which ones apply depends on its type.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConditionParams {
    /// TTL: seconds after the namespace's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds: Option<i64>,
    /// PODS_SUCCEED: labels of the pods to watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// PODS_SUCCEED: seconds after the managed namespace's creation before the first check
    /// (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub initial_delay_seconds: Option<i64>,
    /// PODS_SUCCEED: seconds between checks (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub period_seconds: Option<i64>,
    /// PODS_SUCCEED: how many consecutive positive checks make the condition true (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_checks: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyActionType {
    /// Delete the managed namespace.
    Delete,
    /// Scale the selected Deployments and StatefulSets to zero.
    ScaleDown,
    /// POST a JSON description of the event to `params.url`.
    Webhook,
}

/// What a policy does when it fires.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'WEBHOOK' || (has(self.params) && has(self.params.url))", "message": "a WEBHOOK action needs params.url"}
]))]
pub struct PolicyAction {
    #[serde(rename = "type")]
    pub type_: PolicyActionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<ActionParams>,
}

/// Parameters of an action; which ones apply depends on its type.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionParams {
    /// SCALE_DOWN: which workloads to scale to zero. Absent or empty: every Deployment and
    /// StatefulSet in the namespace. A selector without labels selects every workload of its
    /// kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub selectors: Option<Vec<WorkloadSelector>>,
    /// WEBHOOK: an absolute http or https URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''", "message": "url must be an absolute http or https URL"}]))]
    pub url: Option<String>,
    /// WEBHOOK: the Secret (in the manager's namespace) whose key holds the signing secret,
    /// `whsec_` followed by base64. Without it, deliveries carry no `webhook-signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::api::delivery::SecretKeyRef>,
    /// WEBHOOK: seconds to wait for the receiver's answer to one attempt (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: Option<i32>,
    /// WEBHOOK: attempts before the delivery is given up as failed (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 30))]
    pub max_attempts: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

/// Selects Deployments or StatefulSets by label.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub kind: WorkloadKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Observed state of a NamespaceManager.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceManagerStatus {
    /// The policy that fired, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_policy: Option<String>,
    /// When it fired (microsecond precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<MicroTime>,
    /// The action of the policy that fired: what it did, or would do in a dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionStatus>,
    /// Per-policy evaluation state.
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
    /// Webhook deliveries of this manager (the effects outbox), newest last.
    #[serde(default)]
    pub deliveries: Vec<crate::api::delivery::Delivery>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Progress of one policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub name: String,
    /// PODS_SUCCEED: checks made since the manager was (re)armed.
    #[serde(default)]
    pub checks: i32,
    /// PODS_SUCCEED: consecutive positive checks (a negative check resets it to 0).
    #[serde(default)]
    pub successful_checks: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Time>,
    /// What the last check found, e.g. "2 of 3 matching pods succeeded".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
    /// When the condition will next be looked at (TTL: its due time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_check: Option<Time>,
}

/// Where an action stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ActionState {
    /// Decided and recorded; being carried out.
    Pending,
    Succeeded,
    /// Gave up: the target was refused, the webhook failed every attempt or answered 410.
    Failed,
    /// Dry run: recorded, not done.
    DryRun,
}

/// The action of the policy that fired.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionStatus {
    pub policy: String,
    #[serde(rename = "type")]
    pub type_: PolicyActionType,
    pub state: ActionState,
    /// The manager's generation when the policy fired; a finished action of an older
    /// generation is cleared when the manager is armed again.
    pub generation: i64,
    /// The namespace acted on.
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// SCALE_DOWN: the workloads scaled down (or, in a dry run, that would be), as
    /// `Kind/name=replicas` with the replica count before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    /// WEBHOOK: the delivery id (`webhook-id`) of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
