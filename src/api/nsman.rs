//! `NamespaceManager` (seed 003): policies of the form "TTL elapsed or pods succeeded →
//! delete the namespace, scale it down, or call a webhook". Field names and enum values are
//! seed 003's own, so its manifests apply with only the apiVersion changed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceManagerSpec {
    /// The managed namespace; empty or absent means the manager's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"))]
    pub namespace: Option<String>,
    /// A deactivated manager is not evaluated. shoal sets it after an action succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated: Option<bool>,
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
    #[schemars(inner(length(max = 63)))]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// PODS_SUCCEED: wait this long after the manager's creation before the first check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub initial_delay_seconds: Option<i64>,
    /// PODS_SUCCEED: seconds between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub period_seconds: Option<i64>,
    /// PODS_SUCCEED: how many consecutive successful checks are needed before it fires.
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
    {"rule": "self.type != 'WEBHOOK' || (has(self.params) && has(self.params.url))", "message": "a WEBHOOK action needs params.url"},
    {"rule": "self.type != 'SCALE_DOWN' || (has(self.params) && has(self.params.selectors) && size(self.params.selectors) > 0)", "message": "a SCALE_DOWN action needs params.selectors"}
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
    /// SCALE_DOWN: which workloads to scale to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub selectors: Option<Vec<WorkloadSelector>>,
    /// WEBHOOK: an absolute http or https URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''", "message": "url must be an absolute http or https URL"}]))]
    pub url: Option<String>,
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
    #[schemars(inner(length(max = 63)))]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Observed state of a NamespaceManager.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceManagerStatus {
    /// The policy that fired, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<Time>,
    /// Per-policy check counters for PODS_SUCCEED.
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
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
    /// Consecutive checks that found the condition true.
    #[serde(default)]
    pub successful_checks: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Time>,
}
