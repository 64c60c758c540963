//! Running a container as a Job, shared by every controller that does (a Workflow's steps, an
//! ActivityWorker's job): the Job's shape (step pod settings, the pod failure policy, the
//! pod-level deadline), its identity (a Job is an owner's only if its controller
//! ownerReference names that owner's UID; one found under the name but owned by anything
//! else is never adopted), creating it idempotently, and reading its state.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobCondition};
use k8s_openapi::api::core::v1::{EnvVar, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use serde_json::json;

use super::Error;
use super::step_job::StepJob;
use super::step_pod;
use crate::api::workflow::StepPodSettings;
use crate::core::plan;
use crate::ha::{FencedApi, ReadApi};

/// The controller ownerReference of an object, if it is a shoal object of `kind`.
pub fn controller_owner<'a>(meta: &'a ObjectMeta, kind: &str) -> Option<&'a OwnerReference> {
    meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true) && o.kind == kind && o.api_version == "shoal.dev/v1alpha1")
}

/// Is `job` owned (as its controller) by the `kind` object with `uid`?
pub fn owned_by(job: &StepJob, kind: &str, uid: &str) -> bool {
    controller_owner(&job.metadata, kind).is_some_and(|o| o.uid == uid)
}

/// The queue key of the `kind` object that owns `job`.
pub fn owner_key(job: &StepJob, kind: &str) -> Option<(String, String)> {
    Some((job.namespace()?, controller_owner(&job.metadata, kind)?.name.clone()))
}

/// The message of a Job name taken by an object the owner does not own.
pub fn foreign(job: &str, owner: &str) -> String {
    foreign_named("Job", job, owner)
}

/// The message of a `what` (Job, Pod) name taken by an object the owner does not own.
pub fn foreign_named(what: &str, name: &str, owner: &str) -> String {
    format!("the {what} name {name} is taken by an object this {owner} does not own; it was not adopted (delete it, or rename the {owner})")
}

/// Only a Job's arrival, its finishing (or failing), a disrupted pod of it being replaced and
/// its removal matter to its owner; the Job controller's other status updates do not wake it.
pub fn change_matters(old: Option<&StepJob>, new: &StepJob) -> bool {
    match old {
        None => true,
        Some(old) => state(old) != state(new) || step_pod::disruptions(old) != step_pod::disruptions(new),
    }
}

/// What a Job's conditions say.
pub fn state(job: &StepJob) -> plan::JobState {
    let Some(status) = &job.status else {
        return plan::JobState::Active;
    };
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return plan::JobState::Succeeded { output: None },
            "Failed" => {
                let (mut reason, mut message) = (c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default());
                if reason != "DeadlineExceeded" && failed_past_deadline(job, c) {
                    // The Job controller checks the backoff limit before the deadline, so a
                    // pod it killed at the deadline can be reported as BackoffLimitExceeded
                    // when the two race. The container still ran out of time.
                    reason = "DeadlineExceeded".into();
                    message = format!("Job was active longer than its deadline ({message})");
                }
                return plan::JobState::Failed { reason, message };
            }
            _ => {}
        }
    }
    plan::JobState::Active
}

/// Whether a Job failed at or after its `activeDeadlineSeconds` (counted from its start).
fn failed_past_deadline(job: &StepJob, failed: &JobCondition) -> bool {
    let deadline = job.spec.as_ref().and_then(|s| s.active_deadline_seconds);
    let start = job.status.as_ref().and_then(|s| s.start_time.as_ref());
    match (deadline, start, failed.last_transition_time.as_ref()) {
        (Some(d), Some(start), Some(at)) => at.0.as_second() - start.0.as_second() >= d,
        _ => false,
    }
}

/// The container a Job runs.
pub struct Container<'a> {
    pub image: &'a str,
    pub command: Option<&'a [String]>,
    pub args: Option<&'a [String]>,
    pub env: &'a [EnvVar],
    pub image_pull_policy: Option<&'a str>,
}

/// Everything about a Job besides its container.
pub struct Shape<'a> {
    pub name: &'a str,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: OwnerReference,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub pod: &'a StepPodSettings,
    /// Seconds the container may run once its pod has started.
    pub timeout_seconds: i64,
}

/// The Job: one pod attempt (disrupted pods are replaced a bounded number of times; any other
/// failure fails the Job at once, and retries are the owner's, so every attempt is visible),
/// the deadline on the pod, and no API token unless asked for.
pub fn build(shape: Shape<'_>, c: Container<'_>) -> Result<Job, Error> {
    let spec = pod_spec(shape.pod, shape.timeout_seconds, &c);
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": shape.name,
            "labels": shape.labels,
            "annotations": shape.annotations,
            "ownerReferences": [shape.owner],
        },
        "spec": {
            "backoffLimit": step_pod::MAX_DISRUPTIONS,
            "podFailurePolicy": step_pod::pod_failure_policy(),
            "template": {
                "metadata": {"labels": shape.pod_labels, "annotations": shape.pod_annotations},
                "spec": spec,
            },
        },
    });
    Ok(serde_json::from_value(job)?)
}

/// The pod spec of a step attempt, whether a Job runs it or shoal creates it bare: one
/// container `main` that is never restarted, the step's timeout as the pod's
/// `activeDeadlineSeconds` (counted from the pod's start on a node), no API token unless
/// asked for, and the termination message falling back to the log tail on error.
pub fn pod_spec(pod: &StepPodSettings, timeout_seconds: i64, c: &Container<'_>) -> serde_json::Value {
    json!({
        "restartPolicy": "Never",
        "activeDeadlineSeconds": step_pod::pod_deadline(timeout_seconds),
        "serviceAccountName": pod.service_account_name,
        "automountServiceAccountToken": pod.automount_service_account_token.unwrap_or(false),
        "securityContext": pod.pod_security_context,
        "nodeSelector": pod.node_selector,
        "tolerations": pod.tolerations,
        "imagePullSecrets": pod.image_pull_secrets,
        "containers": [{
            "name": "main",
            "image": c.image,
            "command": c.command,
            "args": c.args,
            "env": c.env,
            "imagePullPolicy": c.image_pull_policy,
            "resources": pod.resources,
            "securityContext": pod.security_context,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }],
    })
}

/// A Job wrapping a user's whole pod template (a Task's run): the template as written, with
/// `restartPolicy: Never` (the run is one attempt; disrupted pods are replaced, any other
/// failure fails the Job at once, as for every Job shoal runs), `env` set on every container
/// (replacing variables of the same names), and the Job's labels also on the pod.
pub fn build_from_template(
    name: &str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owner: OwnerReference,
    template: &PodTemplateSpec,
    env: &[EnvVar],
) -> Result<Job, Error> {
    let mut template = template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let pod_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in &labels {
        pod_labels.insert(k.clone(), v.clone());
    }
    let spec = template.spec.get_or_insert_with(Default::default);
    spec.restart_policy = Some("Never".into());
    for c in spec.containers.iter_mut() {
        let vars = c.env.get_or_insert_with(Vec::new);
        vars.retain(|v| !env.iter().any(|e| e.name == v.name));
        vars.extend(env.iter().cloned());
    }
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels, "annotations": annotations, "ownerReferences": [owner]},
        "spec": {
            "backoffLimit": step_pod::MAX_DISRUPTIONS,
            "podFailurePolicy": step_pod::pod_failure_policy(),
            "template": template,
        },
    });
    Ok(serde_json::from_value(job)?)
}

/// How a create went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Created now: the Job's UID.
    New(Option<String>),
    /// Found already created by this owner (a create repeated after a crash or a takeover).
    Ours(Option<String>),
    /// The name is taken by an object this owner does not own: never adopted.
    Foreign(String),
    /// The API server refused the Job itself (422): a spec error retrying cannot fix.
    Rejected(String),
    /// It existed but was deleted since: try again on the next reconcile.
    Gone,
}

/// Create `job` for the `kind` owner with `uid`, idempotently: a 409 is resolved by the
/// existing Job's controller ownerReference.
pub async fn create(api: &FencedApi<'_, Job>, read: &ReadApi<StepJob>, job: &Job, kind: &str, uid: &str) -> Result<Created, Error> {
    create_owned(api, read, job, kind, uid).await
}

/// Create `obj` (a Job, or a step's bare pod) for the `kind` owner with `uid`, idempotently,
/// reading the answer as the slim view `R`: a 409 is resolved by the existing object's
/// controller ownerReference (ours: created before; anything else: never adopted).
pub async fn create_owned<K, R>(api: &FencedApi<'_, K>, read: &ReadApi<R>, obj: &K, kind: &str, uid: &str) -> Result<Created, Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    R: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.name_any();
    let what = K::kind(&());
    match api.create_as::<R>(obj).await {
        Ok(o) => Ok(Created::New(o.uid())),
        Err(e) if e.code() == Some(409) => Ok(match read.get_opt(&name).await? {
            Some(o) if controller_owner(o.meta(), kind).is_some_and(|r| r.uid == uid) => Created::Ours(o.uid()),
            Some(_) => Created::Foreign(foreign_named(&what, &name, &kind.to_lowercase())),
            None => Created::Gone,
        }),
        Err(e) if e.code() == Some(422) => Ok(Created::Rejected(format!("{what} rejected by the API server: {}", e.api_message().unwrap_or_default()))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_job(deadline: Option<i64>, start: &str, failed_at: &str, reason: &str) -> StepJob {
        serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"activeDeadlineSeconds": deadline, "template": {}},
            "status": {"startTime": start, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "lastTransitionTime": failed_at},
                {"type": "Failed", "status": "True", "reason": reason, "message": "Job has reached the specified backoff limit", "lastTransitionTime": failed_at},
            ]},
        }))
        .unwrap()
    }

    fn reason(j: &StepJob) -> String {
        match state(j) {
            plan::JobState::Failed { reason, .. } => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_at_the_deadline_is_a_timeout_whatever_the_job_controller_says() {
        assert_eq!(reason(&failed_job(Some(2), "2026-01-01T00:00:00Z", "2026-01-01T00:00:03Z", "BackoffLimitExceeded")), "DeadlineExceeded");
        assert_eq!(reason(&failed_job(Some(2), "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "BackoffLimitExceeded")), "BackoffLimitExceeded");
        assert_eq!(reason(&failed_job(None, "2026-01-01T00:00:00Z", "2026-01-01T00:09:00Z", "BackoffLimitExceeded")), "BackoffLimitExceeded");
        assert_eq!(reason(&failed_job(Some(2), "2026-01-01T00:00:00Z", "2026-01-01T00:00:02Z", "DeadlineExceeded")), "DeadlineExceeded");
    }

    #[test]
    fn ownership_is_the_controller_reference_of_the_right_kind_and_uid() {
        let j = |owners: serde_json::Value| -> StepJob { serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "ns", "ownerReferences": owners}})).unwrap() };
        let mine = j(json!([{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "u", "controller": true}]));
        assert!(owned_by(&mine, "Workflow", "u"));
        assert!(!owned_by(&mine, "Workflow", "other"));
        assert!(!owned_by(&mine, "ActivityWorker", "u"), "same UID, other kind");
        assert_eq!(owner_key(&mine, "Workflow"), Some(("ns".into(), "w".into())));
        assert_eq!(owner_key(&mine, "ActivityWorker"), None);
        let not_controller = j(json!([{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "u"}]));
        assert!(!owned_by(&not_controller, "Workflow", "u"));
        let other_group = j(json!([{"apiVersion": "example.com/v1", "kind": "Workflow", "name": "w", "uid": "u", "controller": true}]));
        assert!(!owned_by(&other_group, "Workflow", "u"));
    }
}
