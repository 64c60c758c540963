//! A step's pod, seen through its Job.
//!
//! Owns three things:
//! - the pod-related part of a step's Job spec: the step's timeout on the pod
//!   (`activeDeadlineSeconds`, counted by the kubelet from the pod's start on its node) and the
//!   `podFailurePolicy` that replaces a disrupted pod (evicted, preempted, lost with its node:
//!   the `DisruptionTarget` condition) at most [`MAX_DISRUPTIONS`] times without failing the
//!   Job, while any other pod failure fails the Job at once;
//! - reading the Job's own pods: listed by the Job's `batch.kubernetes.io/controller-uid`
//!   label and kept only when their controller ownerReference is that Job's UID;
//! - what those pods say, as a [`JobState`] for the planner: a finished step's output, why a
//!   step failed (exit code, termination message, `DeadlineExceeded`, disruptions), and why an
//!   active step's pod cannot start (unschedulable, image pull, missing Secret or ConfigMap).
//!
//! It never writes: no pod or Job is created, patched or deleted here. Everything except
//! [`observe`] and [`job_pods`] is pure and tested on pod JSON.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::{Value, json};

use super::step_job::StepJob;
use crate::api::workflow::StepStatus;
use crate::core::plan::{JobState, MAX_OUTPUT_BYTES, OUTPUT_TOO_LARGE, truncate};
use crate::ha::ReadApi;

/// Disrupted pods a step's Job replaces before it fails (its `backoffLimit`; only
/// disruptions are counted against it, see [`pod_failure_policy`]).
pub const MAX_DISRUPTIONS: i32 = 3;
/// A Job without a ready pod this long after its creation has its pods looked at.
pub const START_GRACE: Duration = Duration::from_secs(10);
/// ... and again this often while it still has none.
pub const RECHECK: Duration = Duration::from_secs(30);
/// Sum of the outputs one workflow records in its status.
pub const OUTPUT_BUDGET_BYTES: usize = 256 * 1024;
/// The budget shrinks so that the spec (as JSON) and the outputs stay under this together.
pub const SPEC_AND_OUTPUTS_BYTES: usize = 1024 * 1024;
/// Longest failure or diagnosis message kept in a step's status.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// How a step's message starts while its pod cannot start.
pub const CANNOT_START: &str = "pod cannot start";
/// Warning Event emitted once when a step's pod is found unable to start.
pub const CANNOT_START_EVENT: &str = "StepCannotStart";
/// Container waiting reasons (kubelet) that mean the container will not start by itself.
const CANNOT_START_REASONS: [&str; 8] =
    ["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreStartHookError"];

/// The Job's `podFailurePolicy`. Rules are matched in order, first match wins:
/// a pod with `DisruptionTarget=True` is counted against `backoffLimit` ([`MAX_DISRUPTIONS`]),
/// so it is replaced until the bound; every other pod that reached a node (`PodScheduled=True`)
/// fails the Job at once (a step's own failure is shoal's to retry, with a new Job). A pod that
/// failed without ever being scheduled and without a disruption falls through to the default,
/// which also counts against `backoffLimit`.
pub fn pod_failure_policy() -> Value {
    json!({"rules": [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onPodConditions": [{"type": "PodScheduled", "status": "True"}]},
    ]})
}

/// The pod's `activeDeadlineSeconds` for a step timeout (`-1`: none).
pub fn pod_deadline(timeout_seconds: i64) -> Option<i64> {
    (timeout_seconds > 0).then_some(timeout_seconds)
}

/// Disrupted pods the Job has replaced so far: its failed pods while it has not failed.
/// Other failures end the Job at once, so while it is running these are disruptions.
pub fn disruptions(job: &StepJob) -> i32 {
    let Some(st) = &job.status else { return 0 };
    let ending = st.conditions.iter().flatten().any(|c| c.status == "True" && matches!(c.type_.as_str(), "Failed" | "FailureTarget" | "Complete" | "SuccessCriteriaMet"));
    if ending { 0 } else { st.failed.unwrap_or(0) }
}

/// The pods of `job` (a consistent list by its controller-uid label), only those it controls.
pub async fn job_pods(api: &ReadApi<Pod>, job: &StepJob) -> Result<Vec<Pod>, kube::Error> {
    let Some(uid) = job.uid() else {
        return Ok(vec![]);
    };
    let list = api.list(&ListParams::default().labels(&format!("batch.kubernetes.io/controller-uid={uid}"))).await?;
    Ok(owned_by(list.items, &uid))
}

/// Keep the pods whose controller ownerReference is the Job with `uid`.
pub fn owned_by(pods: Vec<Pod>, uid: &str) -> Vec<Pod> {
    pods.into_iter().filter(|p| p.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == uid)).collect()
}

/// Observe one Running step whose Job is `job` and which the Job's conditions put in `base`.
/// Reads the Job's pods when the Job has finished, and when it has been active for a while
/// without a ready pod (at most once per [`RECHECK`] per Job on this replica). Returns the
/// state to plan from and, for a Job without a ready pod, when to look again.
pub async fn observe(
    pods_api: &ReadApi<Pod>,
    looks: &PodLooks,
    job: &StepJob,
    base: JobState,
    step: &StepStatus,
    budget: &mut OutputBudget,
    now: Timestamp,
) -> Result<(JobState, Option<Duration>), kube::Error> {
    let uid = job.uid().unwrap_or_default();
    match base {
        JobState::Succeeded { .. } | JobState::Failed { .. } => {
            looks.forget(&uid);
            let pods = job_pods(pods_api, job).await?;
            Ok((budget.admit(finished(job, base, &pods, step.message.as_deref())), None))
        }
        JobState::Active => {
            let age = job_age(job, now);
            if is_ready(job) {
                looks.forget(&uid);
                return Ok((active(job, None, &step.step_name, step.message.as_deref()), None));
            }
            let pods = if age >= START_GRACE && looks.due(&uid) { Some(job_pods(pods_api, job).await?) } else { None };
            let state = active(job, pods.as_deref(), &step.step_name, step.message.as_deref());
            Ok((state, Some(next_look(age))))
        }
        other => Ok((other, None)),
    }
}

fn is_ready(job: &StepJob) -> bool {
    job.status.as_ref().and_then(|s| s.ready).unwrap_or(0) > 0
}

fn job_age(job: &StepJob, now: Timestamp) -> Duration {
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    Duration::try_from(now.duration_since(created)).unwrap_or_default()
}

/// When to look again at a Job of age `age` that has no ready pod.
pub fn next_look(age: Duration) -> Duration {
    if age < START_GRACE { START_GRACE - age } else { RECHECK }
}

/// When this replica last read each active Job's pods (by Job UID). Per replica and best
/// effort: it only spaces out the reads; losing it costs one read more.
#[derive(Default)]
pub struct PodLooks(Mutex<HashMap<String, Instant>>);

impl PodLooks {
    /// True (and noted) if `uid`'s pods were not read within the last [`RECHECK`].
    fn due(&self, uid: &str) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return true;
        };
        let now = Instant::now();
        if m.get(uid).is_some_and(|t| now.duration_since(*t) < RECHECK) {
            return false;
        }
        m.retain(|_, t| now.duration_since(*t) < RECHECK * 20);
        m.insert(uid.to_string(), now);
        true
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(uid);
        }
    }
}

/// What an active Job's pods say, given the step's current message. `pods` is `None` when
/// they were not read this time. The step stays Running; its message says why its pod cannot
/// start (with a [`CANNOT_START_EVENT`] the first time), or how many disrupted pods were
/// replaced; a "cannot start" message is cleared once the pod is ready or no longer stuck.
pub fn active(job: &StepJob, pods: Option<&[Pod]>, step: &str, previous: Option<&str>) -> JobState {
    let stuck_before = previous.is_some_and(|m| m.starts_with(CANNOT_START));
    let noted = |message: String, event: Option<crate::core::plan::PlannedEvent>| {
        if previous == Some(message.as_str()) { JobState::Active } else { JobState::ActiveNoted { message, event } }
    };
    if !is_ready(job) {
        if let Some(why) = pods.and_then(|ps| newest_first(ps).into_iter().filter(|p| !terminal(p)).find_map(cannot_start)) {
            let message = truncate(&format!("{CANNOT_START}: {why}"), MAX_MESSAGE_BYTES);
            let event = (!stuck_before).then(|| (CANNOT_START_EVENT, step.to_string(), format!("step {step}: {message}")));
            return noted(message, event);
        }
        if stuck_before && pods.is_none() {
            return JobState::Active;
        }
    }
    let n = disruptions(job);
    if n > 0 {
        return noted(format!("{n} disrupted pod(s) replaced (a step's pod is replaced at most {MAX_DISRUPTIONS} times)"), None);
    }
    if stuck_before { noted(String::new(), None) } else { JobState::Active }
}

/// Why a pod that has not started cannot start, if it says so: the scheduler's reason, or a
/// container waiting for something that will not come by itself.
pub fn cannot_start(pod: &Pod) -> Option<String> {
    status_cannot_start(pod.status.as_ref()?)
}

/// [`cannot_start`] from a pod's status alone (a cached bare step pod has no more).
pub fn status_cannot_start(st: &PodStatus) -> Option<String> {
    if st.phase.as_deref().is_some_and(|p| p != "Pending") {
        return None;
    }
    let unscheduled = st.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
        return Some(with_message(&reason, c.message.as_deref()));
    }
    stuck_in(st)
}

/// A container of `p` waiting for something that will not come by itself, and why.
fn stuck_container(p: &Pod) -> Option<String> {
    stuck_in(p.status.as_ref()?)
}

fn stuck_in(st: &PodStatus) -> Option<String> {
    st.init_container_statuses.iter().flatten().chain(st.container_statuses.iter().flatten()).find_map(waiting_for_nothing)
}

fn waiting_for_nothing(c: &ContainerStatus) -> Option<String> {
    let w = c.state.as_ref()?.waiting.as_ref()?;
    let reason = w.reason.as_deref()?;
    CANNOT_START_REASONS.contains(&reason).then(|| format!("container {}: {}", c.name, with_message(reason, w.message.as_deref())))
}

fn with_message(reason: &str, message: Option<&str>) -> String {
    match message.filter(|m| !m.is_empty()) {
        Some(m) => format!("{reason}: {m}"),
        None => reason.to_string(),
    }
}

fn terminal(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn disrupted(p: &Pod) -> Option<String> {
    status_disruption(p.status.as_ref()?)
}

/// The pod's `DisruptionTarget=True` condition (evicted, preempted, lost with its node) as
/// "reason: message", if it has one.
pub fn status_disruption(st: &PodStatus) -> Option<String> {
    let c = st.conditions.as_ref()?.iter().find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    Some(with_message(c.reason.as_deref().unwrap_or("DisruptionTarget"), c.message.as_deref()))
}

fn newest_first(pods: &[Pod]) -> Vec<&Pod> {
    let mut v: Vec<&Pod> = pods.iter().collect();
    v.sort_by(|a, b| b.metadata.creation_timestamp.as_ref().map(|t| t.0).cmp(&a.metadata.creation_timestamp.as_ref().map(|t| t.0)).then_with(|| b.name_any().cmp(&a.name_any())));
    v
}

/// What a finished Job's pods say. `base` is what its conditions say. A succeeded step's
/// output is its pod's termination message. A failed step is explained by its newest failed
/// pod that was not disrupted (the one the podFailurePolicy failed the Job for): its pod
/// reason (`DeadlineExceeded` is a timeout), or its container's exit code and termination
/// message; a Job that ran out of replacements for disrupted pods says so.
pub fn finished(job: &StepJob, base: JobState, pods: &[Pod], previous: Option<&str>) -> JobState {
    let pods = newest_first(pods);
    match base {
        JobState::Succeeded { .. } => {
            let output = pods.iter().filter(|p| phase(p) == "Succeeded").find_map(|p| output(p));
            JobState::Succeeded { output }
        }
        JobState::Failed { reason, message } => {
            // A Job-level deadline (Jobs made before the timeout moved to the pod).
            if reason == "DeadlineExceeded" {
                return JobState::Failed { reason, message };
            }
            if let Some(p) = pods.iter().find(|p| phase(p) == "Failed" && disrupted(p).is_none()) {
                return explain(p, previous);
            }
            let failed = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
            if reason == "BackoffLimitExceeded" && failed > 1 {
                let last = pods.iter().find_map(|p| disrupted(p)).map(|d| format!("; last: {d}")).unwrap_or_default();
                let message = format!("its pod was disrupted (evicted, preempted or lost with its node) {failed} times; a step's pod is replaced at most {MAX_DISRUPTIONS} times{last}");
                return JobState::Failed { reason: "PodDisrupted".into(), message: truncate(&message, MAX_MESSAGE_BYTES) };
            }
            if reason == "PodFailurePolicy" {
                // The pod that failed the Job is gone: deleted by hand, say (no disruption).
                let message = format!("its pod failed and was deleted before its status could be read ({message})");
                return JobState::Failed { reason, message: truncate(&message, MAX_MESSAGE_BYTES) };
            }
            JobState::Failed { reason, message }
        }
        other => other,
    }
}

/// A finished pod's output: its main container's termination message, if not empty.
pub fn output(p: &Pod) -> Option<String> {
    termination(p).and_then(|(_, t)| t.message.clone()).filter(|m| !m.is_empty())
}

/// The main container's terminated state (or the first terminated one).
fn termination(p: &Pod) -> Option<(&ContainerStatus, &ContainerStateTerminated)> {
    let cs = p.status.as_ref()?.container_statuses.as_ref()?;
    cs.iter().find(|c| c.name == "main").and_then(terminated_state).or_else(|| cs.iter().find_map(terminated_state))
}

fn terminated_state(c: &ContainerStatus) -> Option<(&ContainerStatus, &ContainerStateTerminated)> {
    Some((c, c.state.as_ref()?.terminated.as_ref()?))
}

/// Whether the pod's container never ran: no terminated state with a start time. (The kubelet
/// marks a container it never started as terminated, `ContainerStatusUnknown`, without one.)
fn never_started(p: &Pod) -> bool {
    termination(p).is_none_or(|(_, t)| t.started_at.is_none())
}

/// Why a failed pod failed. `previous` is the step's message before (a "cannot start" note
/// says more than the kubelet leaves on a pod it stopped before its container started).
pub fn explain(p: &Pod, previous: Option<&str>) -> JobState {
    let st = p.status.as_ref();
    let pod_reason = st.and_then(|s| s.reason.clone()).unwrap_or_default();
    let pod_message = st.and_then(|s| s.message.clone()).unwrap_or_default();
    let failed = |reason: &str, message: String| JobState::Failed { reason: reason.to_string(), message: truncate(&message, MAX_MESSAGE_BYTES) };
    let stuck = stuck_container(p);
    if pod_reason == "DeadlineExceeded" {
        // The kubelet counts the deadline from when it took the pod, so a container that never
        // started (its image could not be pulled, say) is stopped by it too: that is a pod that
        // could not start, not a step that ran too long.
        let why = match (stuck, previous.filter(|m| m.starts_with(CANNOT_START))) {
            (Some(why), _) => Some(format!("{CANNOT_START}: {why}")),
            (None, Some(note)) if never_started(p) => Some(note.to_string()),
            (None, None) if never_started(p) => Some(format!("{CANNOT_START}: its container never started")),
            _ => None,
        };
        if let Some(why) = why {
            return failed("CannotStart", format!("{why} (stopped at the step's deadline)"));
        }
        return failed("DeadlineExceeded", with_message("DeadlineExceeded", Some(&pod_message)));
    }
    if let Some((c, t)) = termination(p).filter(|(_, t)| t.exit_code != 0) {
        let reason = t.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "Error".into());
        let mut message = format!("container {} exited with code {} ({reason})", c.name, t.exit_code);
        if let Some(m) = t.message.as_deref().map(str::trim_end).filter(|m| !m.is_empty()) {
            message.push_str(": ");
            message.push_str(m);
        }
        return failed(&reason, message);
    }
    if !pod_reason.is_empty() {
        return failed(&pod_reason, format!("pod failed: {}", with_message(&pod_reason, Some(&pod_message))));
    }
    if let Some(why) = stuck {
        return failed("CannotStart", format!("{CANNOT_START}: {why}"));
    }
    failed("PodFailed", "pod failed".into())
}

/// What is left of a workflow's output budget: [`OUTPUT_BUDGET_BYTES`] in all, less when the
/// spec is large (spec and outputs together stay under [`SPEC_AND_OUTPUTS_BYTES`]). An output
/// that does not fit fails its step (not retried: the same step makes the same output) instead
/// of making every status patch fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputBudget {
    limit: usize,
    used: usize,
}

impl OutputBudget {
    /// For a spec of `spec_bytes` (JSON) whose steps have recorded `outputs`.
    pub fn new<'a>(spec_bytes: usize, outputs: impl IntoIterator<Item = &'a str>) -> Self {
        let limit = OUTPUT_BUDGET_BYTES.min(SPEC_AND_OUTPUTS_BYTES.saturating_sub(spec_bytes));
        Self { limit, used: outputs.into_iter().map(str::len).sum() }
    }

    /// Let a succeeded step's output in, or fail the step if it does not fit.
    pub fn admit(&mut self, state: JobState) -> JobState {
        let JobState::Succeeded { output: Some(o) } = &state else {
            return state;
        };
        let n = o.len().min(MAX_OUTPUT_BYTES);
        if self.used + n > self.limit {
            let message = format!(
                "its output of {n} bytes does not fit the workflow's output budget ({} of {} bytes used); write large data elsewhere (an object store) and output its address",
                self.used, self.limit
            );
            return JobState::Failed { reason: OUTPUT_TOO_LARGE.into(), message };
        }
        self.used += n;
        state
    }
}

/// The recorded outputs of `steps`.
pub fn recorded_outputs(steps: &[StepStatus]) -> impl Iterator<Item = &str> {
    steps.iter().filter_map(|s| s.output.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn job(status: Value) -> StepJob {
        serde_json::from_value(json!({"metadata": {"name": "j", "uid": "job-uid", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": status})).unwrap()
    }

    fn owner(uid: &str, controller: bool) -> Value {
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": uid, "controller": controller}])
    }

    fn terminated(phase: &str, exit: i32, reason: &str, message: &str) -> Pod {
        pod(json!({
            "metadata": {"name": format!("j-{phase}"), "creationTimestamp": "2026-01-01T00:00:01Z", "ownerReferences": owner("job-uid", true)},
            "status": {"phase": phase, "containerStatuses": [{"name": "main", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit, "reason": reason, "message": message, "startedAt": "2026-01-01T00:00:02Z"}}}]},
        }))
    }

    #[test]
    fn only_pods_the_job_controls_are_kept() {
        let mine = pod(json!({"metadata": {"name": "a", "ownerReferences": owner("job-uid", true)}}));
        let not_controller = pod(json!({"metadata": {"name": "b", "ownerReferences": owner("job-uid", false)}}));
        let other_job = pod(json!({"metadata": {"name": "c", "ownerReferences": owner("other", true)}}));
        let orphan = pod(json!({"metadata": {"name": "d"}}));
        let kept = owned_by(vec![mine, not_controller, other_job, orphan], "job-uid");
        assert_eq!(kept.iter().map(|p| p.name_any()).collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn the_job_spec_replaces_disrupted_pods_and_fails_on_anything_else() {
        let p = pod_failure_policy();
        assert_eq!(p["rules"][0]["action"], "Count");
        assert_eq!(p["rules"][0]["onPodConditions"][0]["type"], "DisruptionTarget");
        assert_eq!(p["rules"][1]["action"], "FailJob");
        assert_eq!(pod_deadline(60), Some(60));
        assert_eq!(pod_deadline(-1), None);
        let policy: k8s_openapi::api::batch::v1::PodFailurePolicy = serde_json::from_value(p).unwrap();
        assert_eq!(policy.rules.len(), 2);
    }

    #[test]
    fn a_succeeded_pod_gives_its_termination_message() {
        let ok = terminated("Succeeded", 0, "Completed", "{\"rows\": 42}");
        let s = finished(&job(json!({"succeeded": 1})), JobState::Succeeded { output: None }, &[ok], None);
        assert_eq!(s, JobState::Succeeded { output: Some("{\"rows\": 42}".into()) });
        let empty = terminated("Succeeded", 0, "Completed", "");
        assert_eq!(finished(&job(json!({})), JobState::Succeeded { output: None }, &[empty], None), JobState::Succeeded { output: None });
        assert_eq!(finished(&job(json!({})), JobState::Succeeded { output: None }, &[], None), JobState::Succeeded { output: None });
    }

    #[test]
    fn a_failed_container_is_reported_with_its_exit_code_and_message() {
        let bad = terminated("Failed", 3, "Error", "boom\n");
        let base = JobState::Failed { reason: "PodFailurePolicy".into(), message: "Pod ns/j has condition PodScheduled matching FailJob rule at index 1".into() };
        assert_eq!(finished(&job(json!({"failed": 1})), base, &[bad], None), JobState::Failed { reason: "Error".into(), message: "container main exited with code 3 (Error): boom".into() });
        let oom = terminated("Failed", 137, "OOMKilled", "");
        assert_eq!(explain(&oom, None), JobState::Failed { reason: "OOMKilled".into(), message: "container main exited with code 137 (OOMKilled)".into() });
    }

    #[test]
    fn the_kubelets_deadline_is_a_timeout_unless_the_container_never_started() {
        let mut late = terminated("Failed", 137, "Error", "");
        let st = late.status.as_mut().unwrap();
        st.reason = Some("DeadlineExceeded".into());
        st.message = Some("Pod was active on the node longer than the specified deadline".into());
        match explain(&late, None) {
            JobState::Failed { reason, .. } => assert_eq!(reason, "DeadlineExceeded"),
            other => panic!("{other:?}"),
        }
        let never = pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "DeadlineExceeded", "containerStatuses": [
            {"name": "main", "image": "nope", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope\""}}}]}}));
        match explain(&never, None) {
            JobState::Failed { reason, message } => {
                assert_eq!(reason, "CannotStart");
                assert!(message.starts_with("pod cannot start: container main: ImagePullBackOff: Back-off pulling image"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_container_the_kubelet_never_started_is_not_a_timeout() {
        // What the kubelet leaves when it stops a pod whose container never started.
        let unknown = pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "DeadlineExceeded", "containerStatuses": [
            {"name": "main", "image": "nope", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": "The container could not be located when the pod was terminated"}}}]}}));
        let note = "pod cannot start: container main: ImagePullBackOff: Back-off pulling image \"nope\"";
        assert_eq!(explain(&unknown, Some(note)), JobState::Failed { reason: "CannotStart".into(), message: format!("{note} (stopped at the step's deadline)") });
        assert_eq!(
            explain(&unknown, Some("attempt 0 failed; retrying")),
            JobState::Failed { reason: "CannotStart".into(), message: "pod cannot start: its container never started (stopped at the step's deadline)".into() }
        );
    }

    #[test]
    fn a_pod_level_failure_names_its_reason() {
        let evicted = pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}}));
        assert_eq!(explain(&evicted, None), JobState::Failed { reason: "Evicted".into(), message: "pod failed: Evicted: The node was low on resource: memory.".into() });
    }

    fn disrupted_pod(name: &str, created: &str) -> Pod {
        pod(json!({"metadata": {"name": name, "creationTimestamp": created}, "status": {"phase": "Failed", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]}}))
    }

    #[test]
    fn running_out_of_replacements_says_the_pod_was_disrupted() {
        let base = JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "Job has reached the specified backoff limit".into() };
        let pods = [disrupted_pod("a", "2026-01-01T00:00:01Z"), disrupted_pod("b", "2026-01-01T00:00:09Z")];
        match finished(&job(json!({"failed": 4})), base.clone(), &pods, None) {
            JobState::Failed { reason, message } => {
                assert_eq!(reason, "PodDisrupted");
                assert!(message.contains("disrupted") && message.contains("4 times") && message.contains("EvictionByEvictionAPI"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The pods may be gone by now; the Job's count still tells.
        assert!(matches!(finished(&job(json!({"failed": 4})), base.clone(), &[], None), JobState::Failed { reason, .. } if reason == "PodDisrupted"));
        // A pod deleted by hand fails the Job and is gone when shoal looks.
        let gone = JobState::Failed { reason: "PodFailurePolicy".into(), message: "Pod ns/j-x has condition PodScheduled matching FailJob rule at index 1".into() };
        assert!(matches!(finished(&job(json!({"failed": 1})), gone, &[], None),
            JobState::Failed { message, .. } if message.starts_with("its pod failed and was deleted before its status could be read")));
        // A Job from before the policy (backoffLimit 0) fails at its first failed pod.
        assert_eq!(finished(&job(json!({"failed": 1})), base.clone(), &[], None), base);
        // A Job-level deadline stays a timeout.
        let dl = JobState::Failed { reason: "DeadlineExceeded".into(), message: "Job was active longer than specified deadline".into() };
        assert_eq!(finished(&job(json!({"failed": 1})), dl.clone(), &[], None), dl);
    }

    #[test]
    fn the_pod_that_failed_the_job_explains_it_not_a_disrupted_one_before_it() {
        let mut bad = terminated("Failed", 2, "Error", "");
        bad.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:05Z".parse().unwrap()));
        let pods = [disrupted_pod("old", "2026-01-01T00:00:01Z"), bad, disrupted_pod("newer", "2026-01-01T00:00:09Z")];
        let base = JobState::Failed { reason: "PodFailurePolicy".into(), message: String::new() };
        assert!(matches!(finished(&job(json!({"failed": 2})), base, &pods, None), JobState::Failed { reason, message } if reason == "Error" && message.contains("code 2")));
    }

    fn pending(status: Value) -> Pod {
        pod(json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:01Z"}, "status": status}))
    }

    #[test]
    fn a_pod_that_cannot_start_says_why() {
        let unschedulable = pending(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."}]}));
        assert_eq!(
            cannot_start(&unschedulable).unwrap(),
            "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."
        );
        for (reason, message) in [
            ("ErrImagePull", "pull access denied"),
            ("ImagePullBackOff", "Back-off pulling image"),
            ("InvalidImageName", "couldn't parse image name"),
            ("CreateContainerConfigError", "secret \"db\" not found"),
            ("CreateContainerConfigError", "configmap \"cfg\" not found"),
        ] {
            let p = pending(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}], "containerStatuses": [
                {"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}));
            assert_eq!(cannot_start(&p).unwrap(), format!("container main: {reason}: {message}"));
        }
        // Being created is not being stuck, and a running pod is not stuck.
        let creating = pending(
            json!({"phase": "Pending", "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(cannot_start(&creating), None);
        assert_eq!(cannot_start(&pending(json!({"phase": "Running"}))), None);
    }

    #[test]
    fn an_active_job_notes_a_stuck_pod_once_and_clears_the_note_when_it_starts() {
        let stuck = [pending(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]}))];
        let waiting = job(json!({"active": 1, "ready": 0}));
        let first = active(&waiting, Some(&stuck), "a", None);
        let JobState::ActiveNoted { message, event } = first.clone() else { panic!("{first:?}") };
        assert_eq!(message, "pod cannot start: Unschedulable: 0/3 nodes are available");
        assert_eq!(event.unwrap().0, CANNOT_START_EVENT);
        // Replaying the same observation changes nothing and emits nothing.
        assert_eq!(active(&waiting, Some(&stuck), "a", Some(&message)), JobState::Active);
        // A different reason updates the message without a second Event.
        let other = [pending(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes are available"}]}))];
        assert!(matches!(active(&waiting, Some(&other), "a", Some(&message)), JobState::ActiveNoted { event: None, .. }));
        // Not looked at this time: the note stays.
        assert_eq!(active(&waiting, None, "a", Some(&message)), JobState::Active);
        // Ready: the note goes.
        assert_eq!(active(&job(json!({"active": 1, "ready": 1})), None, "a", Some(&message)), JobState::ActiveNoted { message: String::new(), event: None });
        // Other messages (an earlier attempt's failure) are left alone.
        assert_eq!(active(&job(json!({"active": 1, "ready": 1})), None, "a", Some("attempt 0 failed; retrying")), JobState::Active);
    }

    #[test]
    fn replaced_disruptions_are_noted_while_the_job_runs() {
        let j = job(json!({"active": 1, "ready": 1, "failed": 1}));
        assert_eq!(disruptions(&j), 1);
        assert!(matches!(active(&j, None, "a", None), JobState::ActiveNoted { message, event: None } if message.starts_with("1 disrupted pod(s) replaced")));
        // A failed pod that fails the Job is not a disruption.
        let ending = job(json!({"active": 0, "failed": 1, "conditions": [{"type": "FailureTarget", "status": "True"}]}));
        assert_eq!(disruptions(&ending), 0);
    }

    #[test]
    fn look_again_after_the_grace_then_every_recheck() {
        assert_eq!(next_look(Duration::from_secs(3)), Duration::from_secs(7));
        assert_eq!(next_look(Duration::from_secs(12)), RECHECK);
        assert_eq!(job_age(&job(json!({})), "2026-01-01T00:00:30Z".parse().unwrap()), Duration::from_secs(30));
    }

    #[test]
    fn outputs_beyond_the_budget_fail_the_step() {
        let ok = |n: usize| JobState::Succeeded { output: Some("x".repeat(n)) };
        let mut b = OutputBudget::new(1000, ["a".repeat(OUTPUT_BUDGET_BYTES - 5000).as_str()]);
        assert_eq!(b.admit(ok(4000)), ok(4000));
        assert_eq!(b.admit(JobState::Succeeded { output: None }), JobState::Succeeded { output: None });
        match b.admit(ok(4000)) {
            JobState::Failed { reason, message } => {
                assert_eq!(reason, OUTPUT_TOO_LARGE);
                assert!(message.contains("4000 bytes") && message.contains(&OUTPUT_BUDGET_BYTES.to_string()), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Outputs are counted as recorded: cut to MAX_OUTPUT_BYTES.
        let mut b = OutputBudget::new(0, [""; 0]);
        for _ in 0..(OUTPUT_BUDGET_BYTES / MAX_OUTPUT_BYTES) {
            assert!(matches!(b.admit(ok(10_000)), JobState::Succeeded { .. }));
        }
        assert!(matches!(b.admit(ok(1)), JobState::Failed { .. }));
        // A large spec leaves less room.
        let mut b = OutputBudget::new(SPEC_AND_OUTPUTS_BYTES - 100, [""; 0]);
        assert!(matches!(b.admit(ok(101)), JobState::Failed { .. }));
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        let long = terminated("Failed", 1, "Error", &"é".repeat(2000));
        let JobState::Failed { message, .. } = explain(&long, None) else { panic!() };
        assert!(message.len() <= MAX_MESSAGE_BYTES);
    }
}
