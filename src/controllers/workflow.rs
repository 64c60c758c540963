//! The Workflow reconciler: observe (the workflow, its Jobs from the sharded cache) → plan
//! (`core::plan`, pure) → act (create Jobs with deterministic names, delete the Jobs of an
//! old spec, cascade labels) → record (one status patch with a resourceVersion
//! precondition). Driven by watch events on the owned Jobs, not by polling.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::batch::v1::{Job, JobCondition};
use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::step_job::StepJob;
use super::step_pod;
use super::{Ctx, Error};
use crate::api::SHARD_LABEL;
use crate::api::conditions::{self, reasons, types};
use crate::api::workflow::{StepPhase, Workflow, WorkflowPhase, WorkflowStatus};
use crate::core::{dag, plan};
use crate::ha::{Action, Fence};

pub const WORKFLOW_LABEL: &str = "shoal.dev/workflow";
pub const STEP_LABEL: &str = "shoal.dev/step";
pub const GENERATION_LABEL: &str = "shoal.dev/generation";
pub const ATTEMPT_LABEL: &str = "shoal.dev/attempt";
/// Keys of the workflow labels copied onto its Jobs, so a removed label can be removed too.
pub const CASCADED_ANNOTATION: &str = "shoal.dev/cascaded-labels";

/// Environment variable that carries an upstream step's output.
pub fn output_env_name(step: &str) -> String {
    let s: String = step.to_uppercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("SHOAL_OUTPUT_{s}")
}

fn user_labels(wf: &Workflow) -> BTreeMap<String, String> {
    wf.labels().iter().filter(|(k, _)| !k.starts_with("shoal.dev/")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The queue key of the workflow that owns a Job.
pub fn owner_key(job: &StepJob) -> Option<(String, String)> {
    Some((job.namespace()?, job.labels().get(WORKFLOW_LABEL)?.clone()))
}

/// Only a Job's arrival, its finishing (or failing), a disrupted pod of it being replaced and
/// its removal matter to its workflow; the Job controller's other status updates do not wake it.
pub fn job_change_matters(old: Option<&StepJob>, new: &StepJob) -> bool {
    match old {
        None => true,
        Some(old) => job_state(old) != job_state(new) || step_pod::disruptions(old) != step_pod::disruptions(new),
    }
}

fn job_state(job: &StepJob) -> plan::JobState {
    let Some(status) = &job.status else { return plan::JobState::Active };
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
                    // when the two race. The step still ran out of time.
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

/// Reconcile one workflow under `fence`.
pub async fn reconcile(wf: Arc<Workflow>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    if !ctx.own.record(fence, wf.as_ref(), "reconcile") {
        return Ok(Action::AwaitChange);
    }
    let ns = wf.namespace().unwrap_or_default();
    let name = wf.name_any();
    if ctx.is_superseded(&(ns.clone(), name.clone()), wf.metadata.resource_version.as_deref()) {
        // Our own status write is newer than this cached copy; its watch event brings it.
        return Ok(Action::AwaitChange);
    }
    let generation = wf.metadata.generation.unwrap_or(0);
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = wf.status.clone().unwrap_or_default();
    let spec_changed = status.observed_generation.is_some_and(|g| g != generation);
    let my_jobs = ctx.jobs.children_of(&(ns.clone(), name.clone()));

    // Relabelling cascades to the Jobs (seed 001), whatever the phase.
    cascade_labels(&wf, &my_jobs, fence, &ctx, &jobs_api).await?;

    if spec_changed {
        // A new spec: delete the old spec's Jobs and start again from scratch.
        for j in my_jobs.iter().filter(|j| j.labels().get(GENERATION_LABEL).map(String::as_str) != Some(&generation.to_string())) {
            if !ctx.own.record(fence, wf.as_ref(), &format!("delete-job:{}", j.name_any())) {
                return Ok(Action::AwaitChange);
            }
            match jobs_api.delete(&j.name_any(), &DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() }).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        status = WorkflowStatus { conditions: status.conditions, ..Default::default() };
    } else if matches!(status.workflow_status, Some(WorkflowPhase::Failed) | Some(WorkflowPhase::Completed)) {
        // Finished: nothing more to do (a Failed workflow is ignored, as in seed 001).
        return Ok(Action::Requeue(ctx.resync));
    }

    let now = Timestamp::now();
    let edges: Vec<dag::Edges<'_>> = wf.spec.containers.iter().map(|c| (c.step_name.as_str(), c.depends_on.as_deref().unwrap_or(&[]))).collect();
    if let Err(e) = dag::validate(&edges) {
        let mut conds = status.conditions.clone();
        let t = Time(now);
        conditions::set_condition(&mut conds, conditions::condition(types::FAILED, true, e.reason(), e.to_string(), Some(generation), t.clone()));
        conditions::set_condition(&mut conds, conditions::condition(types::READY, false, reasons::INVALID_SPEC, e.to_string(), Some(generation), t.clone()));
        conditions::set_condition(&mut conds, conditions::condition(types::PROGRESSING, false, reasons::INVALID_SPEC, "not started", Some(generation), t.clone()));
        let new = WorkflowStatus {
            workflow_status: Some(WorkflowPhase::Failed),
            status_changed: Some(t),
            message: Some(e.to_string()),
            progress: Some(format!("0/{}", wf.spec.containers.len())),
            observed_generation: Some(generation),
            conditions: conds,
            ..Default::default()
        };
        publish(&ctx, &wf, EventType::Warning, reasons::INVALID_SPEC, e.to_string()).await;
        return write_status(&wf, &new, fence, &ctx).await;
    }

    // Observe the Jobs of the steps that are running (and, through step_pod, their pods).
    let mut observed: HashMap<String, plan::JobState> = HashMap::new();
    let spec_bytes = serde_json::to_vec(&wf.spec).map(|v| v.len()).unwrap_or(0);
    let mut budget = step_pod::OutputBudget::new(spec_bytes, step_pod::recorded_outputs(&status.steps));
    let mut look_again: Option<std::time::Duration> = None;
    for st in status.steps.iter().filter(|s| s.phase == StepPhase::Running) {
        let Some(jn) = &st.job_name else { continue };
        let job = match ctx.jobs.get(&(ns.clone(), jn.clone())) {
            Some(j) => Some(j),
            // Not in the cache: just created, or deleted. Ask the API server.
            None => Api::<StepJob>::namespaced(ctx.client.clone(), &ns).get_opt(jn).await?.map(Arc::new),
        };
        let state = match job {
            None => plan::JobState::Gone,
            Some(j) => {
                let (state, again) = step_pod::observe(&ctx.client, &j, job_state(&j), st, &mut budget, now).await?;
                look_again = [look_again, again].into_iter().flatten().min();
                state
            }
        };
        observed.insert(jn.clone(), state);
    }

    let steps: Vec<plan::StepSpec> = wf.spec.containers.iter().map(|c| plan::StepSpec { name: c.step_name.clone(), deps: c.depends_on.clone().unwrap_or_default(), retries: c.retries.unwrap_or(0) }).collect();
    let fail_fast = wf.spec.fail_fast.unwrap_or(true);
    let mut p = plan::plan(&name, generation, &steps, &status.steps, &observed, fail_fast, now);
    if p.phase == WorkflowPhase::Started {
        p.requeue_after = [p.requeue_after, look_again].into_iter().flatten().min();
    }

    // Act: create the Jobs the plan asks for, concurrently (they are independent).
    let outputs: HashMap<String, String> = p.steps.iter().filter_map(|s| Some((s.step_name.clone(), s.output.clone()?))).collect();
    let mut pending = Vec::new();
    for c in &p.creates {
        let Some(step) = wf.spec.containers.iter().find(|s| s.step_name == c.step) else { continue };
        let job = build_job(&wf, step, c, generation, &outputs)?;
        if !ctx.own.record(fence, wf.as_ref(), &format!("create-job:{}", c.job_name)) {
            return Ok(Action::AwaitChange);
        }
        // Dispatch latency: from seeing the last dependency's Job finish to this create.
        let deps_seen: Option<Instant> = step.depends_on.iter().flatten().filter_map(|d| {
            let dep = p.steps.iter().find(|s| &s.step_name == d)?;
            ctx.jobs.seen_at(&(ns.clone(), dep.job_name.clone()?))
        }).max();
        let jobs_api = jobs_api.clone();
        let ctx = ctx.clone();
        pending.push(async move {
            let uid = match jobs_api.create(&PostParams::default(), &job).await {
                Ok(j) => {
                    ctx.metrics.jobs_created.inc();
                    j.uid()
                }
                Err(kube::Error::Api(e)) if e.code == 409 => jobs_api.get_opt(&c.job_name).await?.and_then(|j| j.uid()),
                // The API server refuses the Job (say, an invalid env var name): a spec error
                // that retrying cannot fix. The step fails with the server's message.
                Err(kube::Error::Api(e)) if e.code == 422 => return Ok((c.step.clone(), Err(e.message.clone()))),
                Err(e) => return Err(Error::from(e)),
            };
            if let Some(seen) = deps_seen {
                ctx.metrics.dispatch_latency.observe(seen.elapsed().as_secs_f64());
            }
            Ok((c.step.clone(), Ok(uid)))
        });
    }
    for r in futures::future::join_all(pending).await {
        let (step, created) = r?;
        let Some(st) = p.steps.iter_mut().find(|s| s.step_name == step) else { continue };
        match created {
            Ok(uid) => st.job_uid = uid,
            Err(msg) => {
                st.phase = StepPhase::Failed;
                st.finished_at = Some(Time(now));
                st.message = Some(format!("Job rejected by the API server: {msg}"));
                p.events.push(("StepFailed", format!("step {step}: Job rejected by the API server: {msg}")));
                if fail_fast {
                    p.phase = WorkflowPhase::Failed;
                    p.message = format!("step {step} failed");
                }
            }
        }
    }

    // Record.
    let t = Time(now);
    let total = p.steps.len();
    let done = p.steps.iter().filter(|s| s.phase == StepPhase::Succeeded).count();
    let mut conds = status.conditions.clone();
    // (Ready, Progressing, Failed) and the reason they share, for each phase.
    let (ready, progressing, failed, reason) = match p.phase {
        WorkflowPhase::Completed => (true, false, false, "Completed"),
        WorkflowPhase::Failed => (false, false, true, "StepFailed"),
        _ => (false, true, false, "Running"),
    };
    let g = Some(generation);
    conditions::set_condition(&mut conds, conditions::condition(types::READY, ready, reason, &p.message, g, t.clone()));
    conditions::set_condition(&mut conds, conditions::condition(types::PROGRESSING, progressing, reason, &p.message, g, t.clone()));
    conditions::set_condition(&mut conds, conditions::condition(types::FAILED, failed, reason, if failed { p.message.as_str() } else { "" }, g, t.clone()));
    let phase_changed = status.workflow_status != Some(p.phase);
    let new = WorkflowStatus {
        workflow_status: Some(p.phase),
        status_changed: if phase_changed { Some(t.clone()) } else { status.status_changed.clone() },
        message: Some(p.message.clone()),
        started_steps: p.steps.iter().filter(|s| s.job_name.is_some()).map(|s| s.step_name.clone()).collect(),
        executed_steps: p.steps.iter().filter(|s| s.phase == StepPhase::Succeeded).map(|s| s.step_name.clone()).collect(),
        progress: Some(format!("{done}/{total}")),
        steps: std::mem::take(&mut p.steps),
        observed_generation: Some(generation),
        conditions: conds,
    };
    let next = write_status(&wf, &new, fence, &ctx).await?;
    for (reason, msg) in p.events {
        let warn = matches!(reason, "StepFailed" | "StepTimedOut" | "StepRetried" | step_pod::CANNOT_START_EVENT);
        publish(&ctx, &wf, if warn { EventType::Warning } else { EventType::Normal }, reason, msg).await;
    }
    Ok(match p.requeue_after {
        Some(d) => Action::Requeue(d),
        None => next,
    })
}

/// Patch status if it changed, guarded by the resourceVersion we read.
async fn write_status(wf: &Workflow, new: &WorkflowStatus, fence: Fence, ctx: &Ctx) -> Result<Action, Error> {
    if wf.status.as_ref() == Some(new) {
        return Ok(Action::Requeue(ctx.resync));
    }
    if !ctx.own.record(fence, wf, &format!("status:{:?}", new.workflow_status)) {
        return Ok(Action::AwaitChange);
    }
    let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &wf.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"resourceVersion": wf.resource_version()}, "status": new});
    ctx.metrics.status_writes.inc();
    match api.patch_status(&wf.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            ctx.mark_superseded((wf.namespace().unwrap_or_default(), wf.name_any()), wf.metadata.resource_version.clone());
            Ok(Action::Requeue(ctx.resync))
        }
        // Changed since we read it; the watch brings the new version and we plan again.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::AwaitChange),
        Err(e) => Err(e.into()),
    }
}

fn build_job(wf: &Workflow, step: &crate::api::workflow::WorkflowStep, c: &plan::CreateJob, generation: i64, outputs: &HashMap<String, String>) -> Result<Job, Error> {
    let mut labels = user_labels(wf);
    let cascaded: Vec<String> = labels.keys().cloned().collect();
    let shard = wf.labels().get(SHARD_LABEL).cloned().unwrap_or_default();
    let step_label: String = step.step_name.to_lowercase().chars().map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' || ch == '_' { ch } else { '-' }).collect();
    labels.insert(SHARD_LABEL.into(), shard);
    labels.insert(WORKFLOW_LABEL.into(), wf.name_any());
    labels.insert(STEP_LABEL.into(), step_label.clone());
    labels.insert(GENERATION_LABEL.into(), generation.to_string());
    labels.insert(ATTEMPT_LABEL.into(), c.attempt.to_string());

    let mut env: Vec<EnvVar> = step.env.clone().unwrap_or_default();
    let deps = step.depends_on.clone().unwrap_or_default();
    for d in &deps {
        if let Some(o) = outputs.get(d) {
            env.push(EnvVar { name: output_env_name(d), value: Some(o.clone()), ..Default::default() });
        }
    }
    if let [only] = deps.as_slice() {
        env.push(EnvVar { name: "ORCA_INITIATOR".into(), value: Some(only.clone()), ..Default::default() });
        env.push(EnvVar { name: "ORCA_DATA".into(), value: Some(outputs.get(only).cloned().unwrap_or_default()), ..Default::default() });
    }
    let timeout = step.timeout_seconds.unwrap_or(wf.spec.max_step_timeout);
    let mut pod_labels: BTreeMap<String, String> = step.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    pod_labels.insert(WORKFLOW_LABEL.into(), wf.name_any());
    pod_labels.insert(STEP_LABEL.into(), step_label);
    pod_labels.insert(ATTEMPT_LABEL.into(), c.attempt.to_string());
    let pod_annotations = step.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    let owner = wf.controller_owner_ref(&()).ok_or_else(|| Error::Json(serde::de::Error::custom("workflow has no uid")))?;
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": c.job_name,
            "labels": labels,
            "annotations": {CASCADED_ANNOTATION: cascaded.join(",")},
            "ownerReferences": [owner],
        },
        "spec": {
            // Disrupted pods are replaced (a bounded number of times); any other pod failure
            // fails the Job at once, and retries are shoal's (so every attempt is visible).
            "backoffLimit": step_pod::MAX_DISRUPTIONS,
            "podFailurePolicy": step_pod::pod_failure_policy(),
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "restartPolicy": "Never",
                    // The step's timeout counts from its pod's start on a node, not the Job's.
                    "activeDeadlineSeconds": step_pod::pod_deadline(timeout),
                    "containers": [{
                        "name": "main",
                        "image": step.image,
                        "command": step.command,
                        "args": step.args,
                        "env": env,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                    }],
                },
            },
        },
    });
    Ok(serde_json::from_value(job)?)
}

async fn cascade_labels(wf: &Workflow, jobs: &[Arc<StepJob>], fence: Fence, ctx: &Ctx, api: &Api<Job>) -> Result<(), Error> {
    let want = user_labels(wf);
    for j in jobs {
        let previously: Vec<&str> = j.annotations().get(CASCADED_ANNOTATION).map(|s| s.split(',').filter(|x| !x.is_empty()).collect()).unwrap_or_default();
        let mut patch = serde_json::Map::new();
        for (k, v) in &want {
            if j.labels().get(k) != Some(v) {
                patch.insert(k.clone(), json!(v));
            }
        }
        for k in previously.iter().filter(|k| !want.contains_key(**k)) {
            if j.labels().contains_key(*k) {
                patch.insert(k.to_string(), serde_json::Value::Null);
            }
        }
        if patch.is_empty() {
            continue;
        }
        if !ctx.own.record(fence, wf, &format!("relabel-job:{}", j.name_any())) {
            return Ok(());
        }
        let keys: Vec<String> = want.keys().cloned().collect();
        let body = json!({"metadata": {"labels": patch, "annotations": {CASCADED_ANNOTATION: keys.join(",")}}});
        match api.patch(&j.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn publish(ctx: &Ctx, wf: &Workflow, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.to_string(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &wf.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        match job_state(j) {
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
}
