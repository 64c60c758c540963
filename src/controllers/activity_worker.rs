//! The ActivityWorker reconciler (seed 000): runs the worker's job as one Job with a
//! deterministic name, owned by the worker, and tracks READY → RUNNING → COMPLETED or FAILED.
//! The Job is created and read through the shared Job runner (`controllers::jobs`): it is the
//! worker's only if its controller ownerReference is the worker's UID. A worker that has
//! reached COMPLETED or FAILED is never looked at again, and every status write carries a
//! resourceVersion precondition, so a stale reconcile cannot overwrite a terminal state.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::step_job::StepJob;
use super::{Context, Error, jobs};
use crate::api::SHARD_LABEL;
use crate::api::activity::{ACTIVITY_LABEL, ActivityWorker, ActivityWorkerStatus, ImagePullPolicy, WorkerState};
use crate::api::conditions;
use crate::core::{activity, plan};
use crate::ha::{Action, Fence, WriteError, Writer};

/// The worker's name on its Job and pod (cut with a hash when longer than 63 characters).
pub const WORKER_LABEL: &str = "shoal.dev/activity-worker";
/// The worker's UID on its Job: selects exactly one worker's Jobs.
pub const WORKER_UID_LABEL: &str = "shoal.dev/activity-worker-uid";
const KIND: &str = "ActivityWorker";

/// What the ActivityWorker controller keeps besides the workers: their Jobs.
pub struct State {
    pub jobs: Arc<crate::ha::Informer<StepJob>>,
}

pub type Ctx = Arc<Context<State>>;

/// The queue key of the worker that owns a Job.
pub fn owner_key(job: &StepJob) -> Option<(String, String)> {
    jobs::owner_key(job, KIND)
}

fn terminal(s: Option<WorkerState>) -> bool {
    matches!(s, Some(WorkerState::Completed) | Some(WorkerState::Failed))
}

/// Reconcile one worker under `fence`.
pub async fn reconcile(w: Arc<ActivityWorker>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    let Some(writer) = ctx.begin(fence, w.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    let status = w.status.clone().unwrap_or_default();
    if terminal(status.state) {
        return Ok(Action::AwaitChange);
    }
    let Some(uid) = w.uid() else { return Ok(Action::AwaitChange) };
    match reconcile_owned(&w, &uid, status, &writer, &ctx).await {
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

async fn reconcile_owned(w: &ActivityWorker, uid: &str, status: ActivityWorkerStatus, writer: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let ns = w.namespace().unwrap_or_default();
    let name = w.name_any();
    let now = Timestamp::now();
    let generation = w.metadata.generation;
    let mut new = status.clone();
    new.observed_generation = generation;
    let mut event: Option<(EventType, &'static str, String)> = None;

    // READY first, as seed 000's state machine has it; the Job comes with the next look.
    let Some(state) = status.state else {
        new.state = Some(WorkerState::Ready);
        set(&mut new, false, true, false, "Ready", "the worker's Job is about to be created", generation, now);
        return write(w, &new, writer, ctx, None, Action::AwaitChange).await;
    };

    let job_name = activity::job_name(&name, uid, 0);
    let cached = ctx.jobs.get(&(ns.clone(), job_name.clone()));
    let job = match cached {
        Some(j) => Some(j),
        None => ctx.read::<StepJob>(&ns).get_opt(&job_name).await?.map(Arc::new),
    };
    match job {
        None if status.job_uid.is_some() => {
            // Created by us, and gone before it finished: deleted by someone.
            finish(&mut new, WorkerState::Failed, "JobDeleted", format!("the worker's Job {job_name} was deleted before it finished"), generation, now);
            event = Some((EventType::Warning, "WorkerFailed", format!("Job {job_name} was deleted before it finished")));
        }
        None => match jobs::create(&writer.api::<Job>(&ns), &ctx.read::<StepJob>(&ns), &build(w, uid, &job_name, ctx)?, KIND, uid).await? {
            jobs::Created::New(job_uid) | jobs::Created::Ours(job_uid) => {
                new.state = Some(WorkerState::Running);
                new.job_name = Some(job_name.clone());
                new.job_uid = job_uid;
                new.started_at = Some(Time(now));
                new.message = Some(format!("running Job {job_name}"));
                set(&mut new, false, true, false, "Running", &format!("running Job {job_name}"), generation, now);
                event = Some((EventType::Normal, "JobCreated", format!("created Job {job_name}")));
            }
            jobs::Created::Gone => return Ok(Action::Requeue(std::time::Duration::from_secs(1))),
            jobs::Created::Foreign(msg) | jobs::Created::Rejected(msg) => {
                finish(&mut new, WorkerState::Failed, "JobNotCreated", msg.clone(), generation, now);
                event = Some((EventType::Warning, "WorkerFailed", msg));
            }
        },
        Some(j) if !jobs::owned_by(&j, KIND, uid) => {
            let msg = jobs::foreign(&job_name, "worker");
            finish(&mut new, WorkerState::Failed, "JobNotOwned", msg.clone(), generation, now);
            event = Some((EventType::Warning, "WorkerFailed", msg));
        }
        Some(j) => {
            new.job_name = Some(job_name.clone());
            new.job_uid = j.uid();
            match jobs::state(&j) {
                plan::JobState::Succeeded { .. } => {
                    finish(&mut new, WorkerState::Completed, "Completed", format!("Job {job_name} completed"), generation, now);
                    event = Some((EventType::Normal, "WorkerCompleted", format!("Job {job_name} completed")));
                }
                plan::JobState::Failed { reason, message } => {
                    let msg = format!("Job {job_name} failed: {reason}: {message}");
                    finish(&mut new, WorkerState::Failed, &reason_or(&reason), msg.clone(), generation, now);
                    event = Some((EventType::Warning, "WorkerFailed", msg));
                }
                _ => {
                    if state != WorkerState::Running {
                        new.state = Some(WorkerState::Running);
                        new.started_at.get_or_insert(Time(now));
                        new.message = Some(format!("running Job {job_name}"));
                        set(&mut new, false, true, false, "Running", &format!("running Job {job_name}"), generation, now);
                    }
                }
            }
        }
    }
    let job_ref = ObjectReference { api_version: Some("batch/v1".into()), kind: Some("Job".into()), namespace: Some(ns), name: Some(job_name), ..Default::default() };
    write(w, &new, writer, ctx, event.map(|(t, r, m)| (t, r, m, job_ref)), Action::Requeue(ctx.resync)).await
}

/// A condition reason from a Job's failure reason (PascalCase, as Kubernetes requires).
fn reason_or(reason: &str) -> String {
    if !reason.is_empty() && reason.chars().all(|c| c.is_ascii_alphanumeric()) && reason.starts_with(|c: char| c.is_ascii_uppercase()) { reason.to_string() } else { "JobFailed".to_string() }
}

#[allow(clippy::too_many_arguments)]
fn set(s: &mut ActivityWorkerStatus, ready: bool, progressing: bool, failed: bool, reason: &str, message: &str, generation: Option<i64>, now: Timestamp) {
    conditions::set_state(&mut s.conditions, (ready, progressing, failed), reason, message, generation, Time(now));
}

fn finish(s: &mut ActivityWorkerStatus, state: WorkerState, reason: &str, message: String, generation: Option<i64>, now: Timestamp) {
    let ok = state == WorkerState::Completed;
    s.state = Some(state);
    s.finished_at = Some(Time(now));
    set(s, ok, false, !ok, reason, &message, generation, now);
    s.message = Some(message);
}

/// The worker's Job: its ActivityJob as the container, with the step pod settings of
/// Workflow steps.
fn build(w: &ActivityWorker, uid: &str, job_name: &str, ctx: &Ctx) -> Result<Job, Error> {
    let spec = &w.spec;
    let worker_label = plan::label_value(&w.name_any());
    let mut labels = BTreeMap::new();
    // The shard of the worker's family (its Activity's), not its label: a label can be edited.
    labels.insert(SHARD_LABEL.to_string(), ctx.own.shard_for(w).map(|s| s.to_string()).unwrap_or_default());
    labels.insert(WORKER_LABEL.to_string(), worker_label.clone());
    labels.insert(WORKER_UID_LABEL.to_string(), uid.to_string());
    let mut pod_labels = BTreeMap::from([(WORKER_LABEL.to_string(), worker_label)]);
    if let Some(a) = w.labels().get(ACTIVITY_LABEL) {
        labels.insert(ACTIVITY_LABEL.to_string(), a.clone());
        pod_labels.insert(ACTIVITY_LABEL.to_string(), a.clone());
    }
    let owner = w.controller_owner_ref(&()).ok_or_else(|| Error::Json(serde::de::Error::custom("worker has no uid")))?;
    let mut job = jobs::build(
        jobs::Shape {
            name: job_name,
            labels,
            annotations: BTreeMap::new(),
            owner,
            pod_labels,
            pod_annotations: BTreeMap::new(),
            pod: &spec.pod.clone().unwrap_or_default(),
            timeout_seconds: spec.timeout_seconds.unwrap_or(activity::DEFAULT_TIMEOUT_SECONDS),
        },
        jobs::Container {
            image: &spec.job.image,
            command: spec.job.command.as_deref(),
            args: spec.job.args.as_deref(),
            env: spec.job.env.as_deref().unwrap_or(&[]),
            image_pull_policy: spec.job.image_pull_policy.map(|p| match p {
                ImagePullPolicy::Always => "Always",
                ImagePullPolicy::IfNotPresent => "IfNotPresent",
                ImagePullPolicy::Never => "Never",
            }),
        },
    )?;
    // The worker's Activity, as a second (not controller) owner: the Job then sits in the
    // Activity's shard with the rest of its family (`ha::family_root`).
    if let Some(activity) = w.owner_references().iter().find(|r| r.kind == "Activity" && r.api_version.starts_with("shoal.dev/")) {
        let mut r = activity.clone();
        r.controller = Some(false);
        r.block_owner_deletion = None;
        job.metadata.owner_references.get_or_insert_with(Vec::new).push(r);
    }
    Ok(job)
}

/// Write the worker's status (if it changed) with a resourceVersion precondition, then the
/// Event it decided.
async fn write(w: &ActivityWorker, new: &ActivityWorkerStatus, writer: &Writer, ctx: &Ctx, event: Option<(EventType, &'static str, String, ObjectReference)>, next: Action) -> Result<Action, Error> {
    if w.status.as_ref() == Some(new) {
        return Ok(next);
    }
    match ctx.patch_status(writer, w, w.status.as_ref(), new).await {
        Ok(Some(_)) => {
            if let Some((t, reason, note, related)) = event {
                writer.event(t, reason, note, Some(related)).await;
            }
            Ok(if terminal(new.state) { Action::AwaitChange } else { next })
        }
        Ok(None) => Ok(Action::AwaitChange),
        Err(e) if e.code() == Some(404) => Ok(Action::AwaitChange),
        Err(e) => Err(e.into()),
    }
}
