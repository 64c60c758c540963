//! A step attempt run as one bare pod (`spec.executor: Pod`): what the Job gave, shoal gives.
//!
//! - Identity: the pod has the attempt's deterministic name (`core::plan::job_name`), the
//!   workflow as its controller ownerReference, and is never adopted otherwise (the same rules
//!   as a step's Job, through [`super::jobs::create_owned`]).
//! - The deadline: the step's timeout as the pod's `activeDeadlineSeconds` (the same pod spec
//!   as a Job's template, [`super::jobs::pod_spec`]).
//! - Retries: a failed pod is a failed attempt; the planner starts the next attempt as a new
//!   pod, as it starts a new Job. There is no Job to replace a disrupted pod, so a pod that
//!   is evicted, preempted, lost with its node or deleted by someone is a failed attempt with
//!   that reason (and uses a retry).
//! - Outputs and diagnosis: read from the pod in the watch cache (no pod LIST, unlike a Job's
//!   pods): the termination message, why it failed, why it cannot start.
//!
//! Everything here but the slim cached type is pure and tested on pod JSON.

use std::borrow::Cow;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::json;

use super::Error;
use super::jobs::{self, Container, Shape};
use super::step_pod::{self, CANNOT_START, CANNOT_START_EVENT, MAX_MESSAGE_BYTES, START_GRACE};
use crate::api::workflow::StepStatus;
use crate::core::plan::{JobState, truncate};

/// Label on every bare step pod: what the workflow controller's pod watch selects (a Job's
/// pods never carry it, so Job-mode steps cost the pod watch nothing).
pub const EXECUTOR_LABEL: &str = "shoal.dev/executor";
pub const EXECUTOR_POD: &str = "pod";
/// The selector of bare step pods.
pub const SELECTOR: &str = "shoal.dev/executor=pod";

/// Failure reason of an attempt whose pod was deleted (by someone, or with its node) before
/// it finished.
pub const POD_DELETED: &str = "PodDeleted";
/// Failure reason of an attempt whose pod was disrupted: evicted, preempted, lost with its node.
pub const POD_DISRUPTED: &str = "PodDisrupted";

/// A step's pod as the workflow controller caches it: identity, labels, owners, and the
/// status. The spec (most of a pod's bytes) and managedFields are skipped when decoding.
#[derive(Clone, Debug, Deserialize)]
pub struct StepPod {
    #[serde(deserialize_with = "super::step_job::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

impl StepPod {
    /// As a k8s-openapi `Pod` (metadata and status only), for the pure pod readers of
    /// [`step_pod`].
    pub fn as_pod(&self) -> Pod {
        Pod { metadata: self.metadata.clone(), spec: None, status: self.status.clone() }
    }

    fn phase(&self) -> &str {
        self.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
    }

    fn ready(&self) -> bool {
        self.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }

    fn disruption(&self) -> Option<String> {
        step_pod::status_disruption(self.status.as_ref()?)
    }

    /// Why it cannot start, if it says so (read from the status, without copying it).
    fn cannot_start(&self) -> Option<String> {
        step_pod::status_cannot_start(self.status.as_ref()?)
    }
}

impl kube::Resource for StepPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The bare pod of a step attempt: the Job's labels and annotations and its pod template's
/// together on the pod, plus [`EXECUTOR_LABEL`], and the same pod spec a Job would run.
pub fn build(shape: Shape<'_>, c: Container<'_>) -> Result<Pod, Error> {
    let spec = jobs::pod_spec(shape.pod, shape.timeout_seconds, &c);
    let mut labels = shape.pod_labels;
    labels.extend(shape.labels);
    labels.insert(EXECUTOR_LABEL.into(), EXECUTOR_POD.into());
    let mut annotations = shape.pod_annotations;
    annotations.extend(shape.annotations);
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": shape.name, "labels": labels, "annotations": annotations, "ownerReferences": [shape.owner]},
        "spec": spec,
    });
    Ok(serde_json::from_value(pod)?)
}

/// Only what can change a step's state wakes its workflow: the pod's arrival, its phase, its
/// deletion, a disruption, readiness (which clears a "cannot start" note) and whether it is
/// stuck. The kubelet's other status updates (a container starting, IPs) do not.
pub fn change_matters(old: Option<&StepPod>, new: &StepPod) -> bool {
    let Some(old) = old else { return true };
    let stuck = |p: &StepPod| p.cannot_start().is_some();
    old.phase() != new.phase()
        || old.metadata.deletion_timestamp.is_some() != new.metadata.deletion_timestamp.is_some()
        || old.disruption() != new.disruption()
        || old.ready() != new.ready()
        || stuck(old) != stuck(new)
}

/// What a step's pod says, for the planner, given the step's current state, and when to look
/// again (a pod not started yet is diagnosed only after [`START_GRACE`], as a Job's is).
pub fn state(pod: &StepPod, step: &StepStatus, now: Timestamp) -> (JobState, Option<Duration>) {
    let previous = step.message.as_deref();
    match pod.phase() {
        "Succeeded" => {
            let p = pod.as_pod();
            let output = step_pod::output(&p);
            return (JobState::Succeeded { output }, None);
        }
        "Failed" => {
            if let Some(why) = pod.disruption() {
                let message = format!("its pod was disrupted (evicted, preempted or lost with its node): {why}");
                return (JobState::Failed { reason: POD_DISRUPTED.into(), message: truncate(&message, MAX_MESSAGE_BYTES) }, None);
            }
            return (step_pod::explain(&pod.as_pod(), previous), None);
        }
        _ => {}
    }
    if pod.metadata.deletion_timestamp.is_some() {
        // Deleted before it finished: evicted through the API, lost with its node (both mark
        // the pod `DisruptionTarget`), or deleted by someone. Its container is being
        // stopped; the attempt has failed.
        let (reason, message) = match pod.disruption() {
            Some(why) => (POD_DISRUPTED, format!("its pod was disrupted (evicted, preempted or lost with its node) and deleted: {why}")),
            None => (POD_DELETED, "its pod was deleted before it finished".to_string()),
        };
        return (JobState::Failed { reason: reason.into(), message: truncate(&message, MAX_MESSAGE_BYTES) }, None);
    }
    let stuck_before = previous.is_some_and(|m| m.starts_with(CANNOT_START));
    let age = pod.metadata.creation_timestamp.as_ref().map(|t| Duration::try_from(now.duration_since(t.0)).unwrap_or_default()).unwrap_or_default();
    if pod.ready() || pod.phase() == "Running" {
        // Started: a "cannot start" note is cleared.
        let state = if stuck_before { JobState::ActiveNoted { message: String::new(), event: None } } else { JobState::Active };
        return (state, None);
    }
    if age < START_GRACE {
        return (JobState::Active, Some(START_GRACE - age));
    }
    match pod.cannot_start() {
        Some(why) => {
            let message = truncate(&format!("{CANNOT_START}: {why}"), MAX_MESSAGE_BYTES);
            if previous == Some(message.as_str()) {
                return (JobState::Active, None);
            }
            let name = &step.step_name;
            let event = (!stuck_before).then(|| (CANNOT_START_EVENT, name.clone(), format!("step {name}: {message}")));
            (JobState::ActiveNoted { message, event }, None)
        }
        None if stuck_before => (JobState::ActiveNoted { message: String::new(), event: None }, None),
        None => (JobState::Active, None),
    }
}

/// The queue key of the workflow that owns a step pod.
pub fn owner_key(pod: &StepPod, kind: &str) -> Option<(String, String)> {
    Some((pod.namespace()?, jobs::controller_owner(&pod.metadata, kind)?.name.clone()))
}

/// Is `pod` controlled by the `kind` object with `uid`?
pub fn owned_by(pod: &StepPod, kind: &str, uid: &str) -> bool {
    jobs::controller_owner(&pod.metadata, kind).is_some_and(|o| o.uid == uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workflow::{StepPhase, StepPodSettings};
    use serde_json::Value;

    fn pod(v: Value) -> StepPod {
        serde_json::from_value(v).unwrap()
    }

    fn step(message: Option<&str>) -> StepStatus {
        StepStatus {
            step_name: "a".into(),
            phase: StepPhase::Running,
            attempt: 0,
            job_name: Some("w-a-g1-0-x".into()),
            job_uid: Some("pu".into()),
            started_at: None,
            finished_at: None,
            output: None,
            message: message.map(String::from),
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const CREATED: &str = "2026-01-01T00:00:00Z";

    fn with_status(status: Value) -> StepPod {
        pod(json!({"metadata": {"name": "w-a-g1-0-x", "namespace": "ns", "uid": "pu", "creationTimestamp": CREATED}, "status": status}))
    }

    #[test]
    fn the_pod_carries_the_attempts_identity_and_the_steps_pod_spec() {
        let owner = serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "wu", "controller": true, "blockOwnerDeletion": true})).unwrap();
        let settings = StepPodSettings::default();
        let shape = Shape {
            name: "w-a-g1-0-x",
            labels: [("shoal.dev/workflow-uid".to_string(), "wu".to_string()), ("team".to_string(), "x".to_string())].into(),
            annotations: [("shoal.dev/cascaded-labels".to_string(), "team".to_string())].into(),
            owner,
            pod_labels: [("app".to_string(), "etl".to_string())].into(),
            pod_annotations: [("kwok.shoal.dev/delay".to_string(), "1s".to_string())].into(),
            pod: &settings,
            timeout_seconds: 30,
        };
        let env = [];
        let p = build(shape, Container { image: "busybox", command: None, args: None, env: &env, image_pull_policy: None }).unwrap();
        assert_eq!(p.name_any(), "w-a-g1-0-x");
        let labels = p.labels();
        assert_eq!(labels["shoal.dev/workflow-uid"], "wu");
        assert_eq!(labels["app"], "etl");
        assert_eq!(labels[EXECUTOR_LABEL], EXECUTOR_POD);
        assert_eq!(p.annotations()["kwok.shoal.dev/delay"], "1s");
        let o = &p.owner_references()[0];
        assert_eq!((o.uid.as_str(), o.controller), ("wu", Some(true)));
        let spec = p.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(30));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.containers[0].name, "main");
        assert_eq!(spec.containers[0].termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
    }

    #[test]
    fn a_succeeded_pod_gives_its_termination_message() {
        let p = with_status(json!({"phase": "Succeeded", "containerStatuses": [{"name": "main", "image": "b", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": "42", "startedAt": CREATED}}}]}));
        assert_eq!(state(&p, &step(None), at(CREATED)).0, JobState::Succeeded { output: Some("42".into()) });
    }

    #[test]
    fn a_failed_pod_is_explained_by_its_container_or_its_deadline() {
        let p = with_status(json!({"phase": "Failed", "containerStatuses": [{"name": "main", "image": "b", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": "boom", "startedAt": CREATED}}}]}));
        let JobState::Failed { reason, message } = state(&p, &step(None), at(CREATED)).0 else { panic!() };
        assert_eq!(reason, "Error");
        assert!(message.contains("exited with code 3") && message.contains("boom"), "{message}");
        let p = with_status(json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline",
            "containerStatuses": [{"name": "main", "image": "b", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": CREATED}}}]}));
        let JobState::Failed { reason, .. } = state(&p, &step(None), at(CREATED)).0 else { panic!() };
        assert_eq!(reason, "DeadlineExceeded");
    }

    #[test]
    fn an_evicted_or_lost_pod_is_a_failed_attempt_that_says_so() {
        let evicted = with_status(
            json!({"phase": "Failed", "reason": "Evicted", "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]}),
        );
        let JobState::Failed { reason, message } = state(&evicted, &step(None), at(CREATED)).0 else { panic!() };
        assert_eq!(reason, POD_DISRUPTED);
        assert!(message.contains("EvictionByEvictionAPI"), "{message}");
        let lost = pod(json!({"metadata": {"name": "p", "creationTimestamp": CREATED, "deletionTimestamp": "2026-01-01T00:00:05Z"}, "status": {"phase": "Running",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]}}));
        let JobState::Failed { reason, message } = state(&lost, &step(None), at(CREATED)).0 else { panic!() };
        assert_eq!(reason, POD_DISRUPTED);
        assert!(message.contains("DeletionByTaintManager"), "{message}");
        let deleted = pod(json!({"metadata": {"name": "p", "creationTimestamp": CREATED, "deletionTimestamp": "2026-01-01T00:00:05Z"}, "status": {"phase": "Running"}}));
        let JobState::Failed { reason, message } = state(&deleted, &step(None), at(CREATED)).0 else { panic!() };
        assert_eq!(reason, POD_DELETED);
        assert!(message.contains("deleted before it finished"), "{message}");
    }

    #[test]
    fn a_pod_that_cannot_start_is_noted_once_after_the_grace_and_cleared_when_it_runs() {
        let stuck = with_status(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]}));
        // Within the grace: nothing yet, look again when it ends.
        assert_eq!(state(&stuck, &step(None), at("2026-01-01T00:00:04Z")), (JobState::Active, Some(Duration::from_secs(6))));
        let (s, _) = state(&stuck, &step(None), at("2026-01-01T00:00:11Z"));
        let JobState::ActiveNoted { message, event } = s else { panic!("{s:?}") };
        assert!(message.starts_with(CANNOT_START) && message.contains("Unschedulable"), "{message}");
        assert_eq!(event.unwrap().0, CANNOT_START_EVENT);
        // Noted already: nothing new.
        assert_eq!(state(&stuck, &step(Some(&message)), at("2026-01-01T00:00:20Z")).0, JobState::Active);
        // It runs: the note is cleared, no Event.
        let running = with_status(json!({"phase": "Running"}));
        assert_eq!(state(&running, &step(Some(&message)), at("2026-01-01T00:00:30Z")).0, JobState::ActiveNoted { message: String::new(), event: None });
        assert_eq!(state(&running, &step(None), at("2026-01-01T00:00:30Z")).0, JobState::Active);
    }

    #[test]
    fn only_changes_that_can_move_the_step_wake_the_workflow() {
        let pending = with_status(json!({"phase": "Pending"}));
        let scheduled = with_status(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}));
        let running = with_status(json!({"phase": "Running"}));
        let ready = with_status(json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}));
        let done = with_status(json!({"phase": "Succeeded"}));
        assert!(change_matters(None, &pending));
        assert!(!change_matters(Some(&pending), &scheduled));
        assert!(change_matters(Some(&scheduled), &running));
        assert!(change_matters(Some(&running), &ready));
        assert!(!change_matters(Some(&ready), &ready.clone()));
        assert!(change_matters(Some(&ready), &done));
    }

    #[test]
    fn ownership_is_the_workflows_controller_reference() {
        let p = pod(json!({"metadata": {"name": "p", "namespace": "ns", "ownerReferences": [{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "wu", "controller": true}]}}));
        assert!(owned_by(&p, "Workflow", "wu"));
        assert!(!owned_by(&p, "Workflow", "other"));
        assert_eq!(owner_key(&p, "Workflow"), Some(("ns".into(), "w".into())));
        let not_controller = pod(json!({"metadata": {"name": "p", "ownerReferences": [{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "wu"}]}}));
        assert!(!owned_by(&not_controller, "Workflow", "wu"));
    }
}
