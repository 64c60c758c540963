//! The Workflow reconciler: observe (the workflow, its Jobs from the sharded cache) → plan
//! (`core::plan`, pure) → act (create Jobs with deterministic names, delete the Jobs of an
//! old spec or of cancelled steps, cascade labels) → record (one status patch with a
//! resourceVersion precondition, then the Events it decided) → collect garbage
//! (`workflow_gc`: what the workflow's `podGC` and `ttlStrategy` say is due). Driven by watch
//! events on the owned Jobs, not by polling. Every write goes through the fenced writer.
//!
//! A Job is a step's Job only if its controller ownerReference is this workflow's UID: a Job
//! found under a step's name but owned by something else (another workflow, an earlier
//! workflow of the same name, nobody) is never adopted; the step fails and says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EnvVar, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PropagationPolicy};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::bare_pod::{self, StepPod};
use super::step_job::StepJob;
use super::step_pod;
use super::workflow_gc::{self, Outcome};
use super::{Context, Error, Metrics, PhaseLabel, jobs};
use crate::api::SHARD_LABEL;
use crate::api::conditions::{self, reasons, types};
use crate::api::workflow::{Executor, StepPhase, Workflow, WorkflowPhase, WorkflowStatus};
use crate::core::{dag, gc, plan};
use crate::ha::{Action, Fence, FencedApi, WriteError, Writer};

/// The workflow's name (cut with a hash suffix when longer than 63 characters).
pub const WORKFLOW_LABEL: &str = "shoal.dev/workflow";
/// The workflow's UID: selects exactly one workflow's Jobs, whatever its name.
pub const WORKFLOW_UID_LABEL: &str = "shoal.dev/workflow-uid";
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

/// Settings of the Workflow controller (`shoal run`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkflowConfig {
    /// How steps of workflows that do not set `spec.executor` run: `Job` (a Job per attempt)
    /// or `Pod` (a bare pod per attempt; far fewer API writes, see docs/workflow.md).
    #[arg(long, env = "SHOAL_DEFAULT_EXECUTOR", value_enum, ignore_case = true, default_value_t = Executor::Job)]
    pub default_executor: Executor,
    /// Also publish a `StepSucceeded` Event for every step that succeeds (off: one
    /// `WorkflowCompleted` Event per workflow, and Warnings for steps that fail, retry, time
    /// out, are cancelled or cannot start). Each Event is one more write to the API server.
    #[arg(long, env = "SHOAL_STEP_SUCCESS_EVENTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub step_success_events: bool,
    /// Garbage collection of step objects (Jobs, or pods with the Pod executor) for workflows
    /// that do not set `spec.podGC.strategy`: Never, OnPodCompletion, OnPodSuccess,
    /// OnWorkflowCompletion or OnWorkflowSuccess. Unset: keep them (see docs/workflow.md).
    #[arg(long, env = "SHOAL_POD_GC_STRATEGY", value_parser = gc::parse_strategy_flag)]
    pub pod_gc_strategy: Option<gc::Strategy>,
    /// `spec.podGC.deleteDelayDuration` for workflows that do not set it: a Go duration (30s,
    /// 10m, 1h30m) or seconds. Unset: 0.
    #[arg(long, env = "SHOAL_POD_GC_DELAY", value_parser = gc::parse_duration_flag)]
    pub pod_gc_delay: Option<std::time::Duration>,
    /// `spec.podGC.keepLast` for workflows that do not set it. Unset: 0.
    #[arg(long, env = "SHOAL_POD_GC_KEEP_LAST")]
    pub pod_gc_keep_last: Option<usize>,
    /// Delete a finished workflow this long after it finished, for workflows that do not set
    /// `ttlStrategy.secondsAfterCompletion`: a Go duration or seconds. Unset: keep it. Applies
    /// to workflows that finished before it was set, too.
    #[arg(long, env = "SHOAL_WORKFLOW_TTL_AFTER_COMPLETION", value_parser = gc::parse_duration_flag)]
    pub workflow_ttl_after_completion: Option<std::time::Duration>,
    /// The same for completed workflows (`secondsAfterSuccess`); wins over the one above.
    #[arg(long, env = "SHOAL_WORKFLOW_TTL_AFTER_SUCCESS", value_parser = gc::parse_duration_flag)]
    pub workflow_ttl_after_success: Option<std::time::Duration>,
    /// The same for failed workflows (`secondsAfterFailure`); wins over the one above.
    #[arg(long, env = "SHOAL_WORKFLOW_TTL_AFTER_FAILURE", value_parser = gc::parse_duration_flag)]
    pub workflow_ttl_after_failure: Option<std::time::Duration>,
}

impl WorkflowConfig {
    /// The garbage collection defaults these settings give.
    pub fn gc_defaults(&self) -> gc::Defaults {
        gc::Defaults {
            strategy: self.pod_gc_strategy,
            delay: self.pod_gc_delay,
            keep_last: self.pod_gc_keep_last,
            ttl: gc::Ttl { after_completion: self.workflow_ttl_after_completion, after_success: self.workflow_ttl_after_success, after_failure: self.workflow_ttl_after_failure },
        }
    }
}

/// What the Workflow controller keeps besides the workflows: its Job and pod caches and its
/// metrics.
pub struct State {
    /// Step Jobs of the shards this replica holds, indexed by their workflow.
    pub jobs: Arc<crate::ha::Informer<StepJob>>,
    /// Bare step pods (`executor: Pod`) of the shards this replica holds, by their workflow.
    pub pods: Arc<crate::ha::Informer<StepPod>>,
    /// The executor of workflows that do not set one.
    pub default_executor: Executor,
    /// Publish a `StepSucceeded` Event per succeeded step.
    pub step_success_events: bool,
    /// Garbage collection for the fields a workflow's `podGC` and `ttlStrategy` leave unset.
    pub gc: gc::Defaults,
    pub metrics: Metrics,
    /// When this replica last read each active Job's pods.
    pub pod_looks: step_pod::PodLooks,
}

pub type Ctx = Arc<Context<State>>;

/// The kind that owns a step's Job.
const KIND: &str = "Workflow";

/// The queue key of the workflow that owns a Job (by its controller ownerReference).
pub fn owner_key(job: &StepJob) -> Option<(String, String)> {
    jobs::owner_key(job, KIND)
}

fn owned_by(job: &StepJob, uid: &str) -> bool {
    jobs::owned_by(job, KIND, uid)
}

fn foreign(job: &str) -> String {
    jobs::foreign(job, "workflow")
}

pub use jobs::change_matters as job_change_matters;

/// The queue key of the workflow that owns a bare step pod.
pub fn pod_owner_key(pod: &StepPod) -> Option<(String, String)> {
    bare_pod::owner_key(pod, KIND)
}

/// The executor a workflow's current generation runs with: the one recorded for it, else (a
/// workflow recorded before executors existed, already started) `Job`, else its spec's, else
/// the operator's default. Fixed once recorded, so a changed default never moves a workflow
/// that is running.
pub fn executor_of(wf: &Workflow, default: Executor) -> Executor {
    let generation = wf.metadata.generation.unwrap_or(0);
    match wf.status.as_ref().filter(|s| s.observed_generation == Some(generation)) {
        Some(st) if st.executor.is_some() => st.executor.unwrap_or_default(),
        Some(st) if st.steps.iter().any(|s| s.job_name.is_some()) => Executor::Job,
        _ => wf.spec.executor.unwrap_or(default),
    }
}

fn job_state(job: &StepJob) -> plan::JobState {
    jobs::state(job)
}

/// Reconcile one workflow under `fence`.
pub async fn reconcile(wf: Arc<Workflow>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    let Some(w) = ctx.begin(fence, wf.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    let ns = wf.namespace().unwrap_or_default();
    let Some(uid) = wf.uid() else {
        return Ok(Action::AwaitChange);
    };
    crate::telemetry::spans::link_reconcile(&wf);
    match reconcile_owned(&wf, &uid, &ns, &w, &ctx).await {
        // The shard moved on; its next owner takes over from what is recorded.
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

async fn reconcile_owned(wf: &Workflow, uid: &str, ns: &str, w: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let name = wf.name_any();
    let generation = wf.metadata.generation.unwrap_or(0);
    let id = plan::WorkflowId { name: &name, uid, generation };
    let jobs_api: FencedApi<'_, Job> = w.api(ns);
    let pods_api: FencedApi<'_, Pod> = w.api(ns);
    let mut status = wf.status.clone().unwrap_or_default();
    let spec_changed = status.observed_generation.is_some_and(|g| g != generation);
    let exec = executor_of(wf, ctx.default_executor);
    let key = (ns.to_string(), name.clone());
    let my_jobs: Vec<Arc<StepJob>> = ctx.jobs.children_of(&key).into_iter().filter(|j| owned_by(j, uid)).collect();
    let my_pods: Vec<Arc<StepPod>> = ctx.pods.children_of(&key).into_iter().filter(|p| bare_pod::owned_by(p, KIND, uid)).collect();

    // Relabelling cascades to the Jobs and pods (seed 001), whatever the phase.
    cascade_labels(wf, &my_jobs, &jobs_api).await?;
    cascade_labels(wf, &my_pods, &pods_api).await?;

    let this_generation = generation.to_string();
    let now = Timestamp::now();
    let gc_policy = gc::policy(wf.spec.pod_gc.as_ref(), wf.spec.ttl_strategy.as_ref(), &ctx.gc);
    if spec_changed {
        // A new spec: delete every Job (or pod) of the old one, server-side by label, so those
        // not yet in this replica's cache (just created, or created before a takeover) go
        // too; then start again from scratch.
        let selector = format!("{WORKFLOW_UID_LABEL}={uid},{GENERATION_LABEL}!={this_generation}");
        let lp = ListParams::default().labels(&selector);
        match status.executor {
            Some(Executor::Pod) => pods_api.delete_collection(&background(), &lp).await?,
            _ => jobs_api.delete_collection(&background(), &lp).await?,
        }
        status = WorkflowStatus { conditions: status.conditions, ..Default::default() };
    } else if matches!(status.workflow_status, Some(WorkflowPhase::Failed) | Some(WorkflowPhase::Completed)) {
        // Finished: nothing more to run (a Failed workflow is ignored, as in seed 001).
        return reconcile_finished(wf, uid, ns, &gc_policy, &my_jobs, &my_pods, w, ctx, now).await;
    }
    // Level-based: an old generation's Job that shows up later (a create that was in flight
    // when the spec changed) is deleted as soon as it is seen.
    for j in my_jobs.iter().filter(|j| j.labels().get(GENERATION_LABEL) != Some(&this_generation)) {
        jobs_api.delete(&j.name_any(), &background()).await?;
    }
    for p in my_pods.iter().filter(|p| p.labels().get(GENERATION_LABEL) != Some(&this_generation)) {
        pods_api.delete(&p.name_any(), &background()).await?;
    }

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
            executor: Some(exec),
            ..Default::default()
        };
        let (recorded, next) = write_status(wf, &new, w, ctx).await?;
        if recorded {
            w.event(EventType::Warning, reasons::INVALID_SPEC, e.to_string(), None).await;
        }
        return Ok(next);
    }

    // Observe the Jobs (and, through step_pod, their pods) or the bare pods of the steps
    // that are running.
    let mut observed: HashMap<String, plan::JobState> = HashMap::new();
    let spec_bytes = serde_json::to_vec(&wf.spec).map(|v| v.len()).unwrap_or(0);
    let mut budget = step_pod::OutputBudget::new(spec_bytes, step_pod::recorded_outputs(&status.steps));
    let mut look_again: Option<std::time::Duration> = None;
    for st in status.steps.iter().filter(|s| s.phase == StepPhase::Running) {
        let Some(jn) = &st.job_name else { continue };
        if exec == Executor::Pod {
            let pod = match ctx.pods.get(&(ns.to_string(), jn.clone())) {
                Some(p) => Some(p),
                // Not in the cache: just created, or deleted. Ask the API server.
                None => ctx.read::<StepPod>(ns).get_opt(jn).await?.map(Arc::new),
            };
            let state = match pod {
                // A pod that vanished after its creation was confirmed failed the attempt.
                None if st.job_uid.is_some() => plan::JobState::Failed { reason: bare_pod::POD_DELETED.into(), message: "its pod was deleted".into() },
                None => plan::JobState::Gone,
                Some(p) if !bare_pod::owned_by(&p, KIND, uid) => plan::JobState::Foreign { message: jobs::foreign_named("Pod", jn, "workflow") },
                Some(p) => {
                    let (state, again) = bare_pod::state(&p, st, now);
                    look_again = [look_again, again].into_iter().flatten().min();
                    budget.admit(state)
                }
            };
            observed.insert(jn.clone(), state);
            continue;
        }
        let job = match ctx.jobs.get(&(ns.to_string(), jn.clone())) {
            Some(j) => Some(j),
            // Not in the cache: just created, or deleted. Ask the API server.
            None => ctx.read::<StepJob>(ns).get_opt(jn).await?.map(Arc::new),
        };
        let state = match job {
            None => plan::JobState::Gone,
            Some(j) if !owned_by(&j, uid) => plan::JobState::Foreign { message: foreign(jn) },
            Some(j) => {
                let (state, again) = step_pod::observe(&ctx.read::<Pod>(ns), &ctx.pod_looks, &j, job_state(&j), st, &mut budget, now).await?;
                look_again = [look_again, again].into_iter().flatten().min();
                state
            }
        };
        observed.insert(jn.clone(), state);
    }

    let steps: Vec<plan::StepSpec> =
        wf.spec.containers.iter().map(|c| plan::StepSpec { name: c.step_name.clone(), deps: c.depends_on.clone().unwrap_or_default(), retries: c.retries.unwrap_or(0) }).collect();
    let fail_fast = wf.spec.fail_fast.unwrap_or(true);
    let mut p = plan::plan(id, &steps, &status.steps, &observed, fail_fast, now);
    if p.phase == WorkflowPhase::Started {
        p.requeue_after = [p.requeue_after, look_again].into_iter().flatten().min();
    }

    // Act: create the Jobs the plan asks for, concurrently (they are independent).
    let outputs: HashMap<String, String> = p.steps.iter().filter_map(|s| Some((s.step_name.clone(), s.output.clone()?))).collect();
    let mut pending = Vec::new();
    for c in &p.creates {
        let Some(step) = wf.spec.containers.iter().find(|s| s.step_name == c.step) else {
            continue;
        };
        let shape = attempt_shape(wf, uid, step, c, generation, &outputs, ctx.own.shard_for(wf))?;
        // Dispatch latency: from seeing the last dependency's Job (or pod) finish to this create.
        let deps_seen: Option<Instant> = step
            .depends_on
            .iter()
            .flatten()
            .filter_map(|d| {
                let dep = p.steps.iter().find(|s| &s.step_name == d)?;
                let key = (ns.to_string(), dep.job_name.clone()?);
                match exec {
                    Executor::Job => ctx.jobs.seen_at(&key),
                    Executor::Pod => ctx.pods.seen_at(&key),
                }
            })
            .max();
        let (jobs_api, pods_api) = (&jobs_api, &pods_api);
        pending.push(async move {
            let created = match exec {
                Executor::Job => jobs::create(jobs_api, &ctx.read::<StepJob>(ns), &shape.job()?, KIND, uid).await?,
                Executor::Pod => jobs::create_owned(pods_api, &ctx.read::<StepPod>(ns), &shape.pod()?, KIND, uid).await?,
            };
            let created = match created {
                jobs::Created::New(job_uid) => {
                    ctx.metrics.jobs_created.inc();
                    Ok(job_uid)
                }
                jobs::Created::Ours(job_uid) => Ok(job_uid),
                jobs::Created::Gone => Ok(None),
                jobs::Created::Foreign(msg) | jobs::Created::Rejected(msg) => Err(msg),
            };
            if let Some(seen) = deps_seen {
                ctx.metrics.dispatch_latency.observe(seen.elapsed().as_secs_f64(), crate::metrics::current_exemplar(), None);
            }
            Ok::<_, Error>((c.step.clone(), created))
        });
    }
    for r in futures::future::join_all(pending).await {
        let (step, created) = r?;
        match created {
            Ok(job_uid) => {
                if let Some(st) = p.steps.iter_mut().find(|s| s.step_name == step) {
                    st.job_uid = job_uid;
                }
            }
            Err(msg) => p.fail_step(&step, msg, fail_fast, now),
        }
    }
    // Fail-fast: the Jobs (or pods) of cancelled steps are deleted before the cancellation is
    // recorded.
    for j in &p.cancels {
        match exec {
            Executor::Job => jobs_api.delete(j, &background()).await?,
            Executor::Pod => pods_api.delete(j, &background()).await?,
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
    conditions::set_state(&mut conds, (ready, progressing, failed), reason, &p.message, Some(generation), t.clone());
    let gc_raised = workflow_gc::set_condition(&mut conds, &gc_policy, generation, t.clone());
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
        executor: Some(exec),
    };
    let (recorded, next) = write_status(wf, &new, w, ctx).await?;
    // Events only for transitions this write recorded: a write refused with 409 (or a fence
    // lost) is planned again from the newer version, and its Events with it.
    if recorded {
        for (reason, step, msg) in p.events {
            if reason == "StepSucceeded" && !ctx.step_success_events {
                continue;
            }
            let warn = matches!(reason, "StepFailed" | "StepTimedOut" | "StepRetried" | "StepCancelled" | step_pod::CANNOT_START_EVENT);
            // Related to the step's Job (or pod), so that Events of different steps (or
            // attempts) with one reason are not folded into one series by the recorder.
            let job = new.steps.iter().find(|s| s.step_name == step).and_then(|s| Some(attempt_ref(exec, ns, s.job_name.clone()?, s.job_uid.clone())));
            w.event(if warn { EventType::Warning } else { EventType::Normal }, reason, msg, job).await;
        }
        // One Event when the workflow ends, whichever step ended it.
        if phase_changed {
            match p.phase {
                WorkflowPhase::Completed => w.event(EventType::Normal, "WorkflowCompleted", p.message.clone(), None).await,
                WorkflowPhase::Failed => w.event(EventType::Warning, "WorkflowFailed", p.message.clone(), None).await,
                _ => {}
            }
        }
        if let Some(msg) = gc_raised {
            w.event(EventType::Warning, workflow_gc::INVALID_GC_POLICY, msg, None).await;
        }
    }
    // Garbage collection last, so that a delete that fails never holds up the run. It judges
    // from the status as read (this write's news is judged in the reconcile the write wakes).
    if !spec_changed {
        match collect_garbage(wf, uid, ns, &gc_policy, &my_jobs, &my_pods, w, ctx, now).await? {
            Outcome::WorkflowDeleted => return Ok(Action::AwaitChange),
            Outcome::Next(wait) => p.requeue_after = [p.requeue_after, wait].into_iter().flatten().min(),
        }
    }
    Ok(match p.requeue_after {
        Some(d) => Action::Requeue(d),
        None => next,
    })
}

/// A finished workflow: only garbage collection is left, and the condition that says when its
/// policy cannot be used.
#[allow(clippy::too_many_arguments)]
async fn reconcile_finished(
    wf: &Workflow,
    uid: &str,
    ns: &str,
    gc_policy: &Result<gc::Policy, gc::PolicyError>,
    jobs: &[Arc<StepJob>],
    pods: &[Arc<StepPod>],
    w: &Writer,
    ctx: &Ctx,
    now: Timestamp,
) -> Result<Action, Error> {
    let wait = match collect_garbage(wf, uid, ns, gc_policy, jobs, pods, w, ctx, now).await? {
        Outcome::WorkflowDeleted => return Ok(Action::AwaitChange),
        Outcome::Next(wait) => wait,
    };
    let status = wf.status.clone().unwrap_or_default();
    let mut conds = status.conditions.clone();
    let raised = workflow_gc::set_condition(&mut conds, gc_policy, wf.metadata.generation.unwrap_or(0), Time(now));
    if conds != status.conditions {
        let new = WorkflowStatus { conditions: conds, ..status };
        let (recorded, _) = write_status(wf, &new, w, ctx).await?;
        if recorded && let Some(msg) = raised {
            w.event(EventType::Warning, workflow_gc::INVALID_GC_POLICY, msg, None).await;
        }
    }
    Ok(Action::Requeue(wait.map_or(ctx.resync, |d| d.min(ctx.resync))))
}

/// Garbage collection under the workflow's policy (an unusable one collects nothing; its
/// condition says why).
#[allow(clippy::too_many_arguments)]
async fn collect_garbage(
    wf: &Workflow,
    uid: &str,
    ns: &str,
    policy: &Result<gc::Policy, gc::PolicyError>,
    jobs: &[Arc<StepJob>],
    pods: &[Arc<StepPod>],
    w: &Writer,
    ctx: &Ctx,
    now: Timestamp,
) -> Result<Outcome, Error> {
    let policy = policy.as_ref().copied().unwrap_or_default();
    workflow_gc::collect(wf, uid, ns, &policy, jobs, pods, w, &ctx.metrics, now).await
}

fn attempt_ref(exec: Executor, ns: &str, name: String, uid: Option<String>) -> ObjectReference {
    let (api_version, kind) = match exec {
        Executor::Job => ("batch/v1", "Job"),
        Executor::Pod => ("v1", "Pod"),
    };
    ObjectReference { api_version: Some(api_version.into()), kind: Some(kind.into()), namespace: Some(ns.to_string()), name: Some(name), uid, ..Default::default() }
}

fn background() -> DeleteParams {
    DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() }
}

/// Patch status if it changed, guarded by the resourceVersion we read. Returns whether this
/// write recorded a change, and what to do next.
async fn write_status(wf: &Workflow, new: &WorkflowStatus, w: &Writer, ctx: &Ctx) -> Result<(bool, Action), Error> {
    if wf.status.as_ref() == Some(new) {
        return Ok((false, Action::Requeue(ctx.resync)));
    }
    ctx.metrics.status_writes.inc();
    Ok(match ctx.patch_status(w, wf, wf.status.as_ref(), new).await? {
        Some(_) => {
            // Recorded: this replica, and no other, records the spans of what ended.
            crate::telemetry::spans::workflow_recorded(wf, wf.status.as_ref(), new);
            count_finished(wf.status.as_ref(), new, &ctx.metrics);
            (true, Action::Requeue(ctx.resync))
        }
        // Changed since we read it; the watch brings the new version and we plan again.
        None => (false, Action::AwaitChange),
    })
}

/// Count what a recorded status write finished: each step that reached Succeeded or Failed
/// (its run time) and the workflow, if it reached Completed or Failed.
fn count_finished(old: Option<&WorkflowStatus>, new: &WorkflowStatus, m: &Metrics) {
    let exemplar = crate::metrics::current_exemplar();
    for st in &new.steps {
        let phase = match st.phase {
            StepPhase::Succeeded => "Succeeded",
            StepPhase::Failed => "Failed",
            _ => continue,
        };
        let before = old.and_then(|o| o.steps.iter().find(|s| s.step_name == st.step_name)).map(|s| (s.phase, s.attempt));
        if before == Some((st.phase, st.attempt)) {
            continue;
        }
        if let (Some(start), Some(end)) = (&st.started_at, &st.finished_at) {
            let secs = end.0.duration_since(start.0).as_secs_f64().max(0.0);
            m.step_duration.get_or_create(&PhaseLabel { phase }).observe(secs, exemplar.clone(), None);
        }
    }
    let finished = match new.workflow_status {
        Some(WorkflowPhase::Completed) => "Completed",
        Some(WorkflowPhase::Failed) => "Failed",
        _ => return,
    };
    if old.and_then(|o| o.workflow_status) != new.workflow_status {
        m.workflows_finished.get_or_create(&PhaseLabel { phase: finished }).inc();
    }
}

/// `shoal_workflows{phase}` and `shoal_workflow_steps{phase}`: the workflows in this
/// replica's sharded cache and their steps, by phase, counted at scrape time (summed over the
/// replicas, every workflow once).
pub struct PhaseCollector {
    pub workflows: Arc<crate::ha::Informer<Workflow>>,
}

impl std::fmt::Debug for PhaseCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhaseCollector")
    }
}

const WORKFLOW_PHASES: [(Option<WorkflowPhase>, &str); 5] =
    [(None, "Unknown"), (Some(WorkflowPhase::Created), "Created"), (Some(WorkflowPhase::Started), "Started"), (Some(WorkflowPhase::Completed), "Completed"), (Some(WorkflowPhase::Failed), "Failed")];

const STEP_PHASES: [(StepPhase, &str); 7] = [
    (StepPhase::Pending, "Pending"),
    (StepPhase::Running, "Running"),
    (StepPhase::Retrying, "Retrying"),
    (StepPhase::Succeeded, "Succeeded"),
    (StepPhase::Failed, "Failed"),
    (StepPhase::Skipped, "Skipped"),
    (StepPhase::Cancelled, "Cancelled"),
];

impl PhaseCollector {
    /// (workflows, steps) by phase, indexed like `WORKFLOW_PHASES` and `STEP_PHASES`.
    pub fn count(&self) -> ([i64; 5], [i64; 7]) {
        let (mut wfs, mut steps) = ([0i64; 5], [0i64; 7]);
        self.workflows.for_each(|w| {
            let status = w.status.as_ref();
            let phase = status.and_then(|s| s.workflow_status);
            if let Some(i) = WORKFLOW_PHASES.iter().position(|(p, _)| *p == phase) {
                wfs[i] += 1;
            }
            for st in status.map(|s| s.steps.as_slice()).unwrap_or_default() {
                if let Some(i) = STEP_PHASES.iter().position(|(p, _)| *p == st.phase) {
                    steps[i] += 1;
                }
            }
        });
        (wfs, steps)
    }
}

impl prometheus_client::collector::Collector for PhaseCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let (wfs, steps) = self.count();
        let names = WORKFLOW_PHASES.iter().map(|(_, n)| *n).zip(wfs);
        let mut family = encoder.encode_descriptor("shoal_workflows", "Workflows in this replica's shards, by phase", None, prometheus_client::metrics::MetricType::Gauge)?;
        for (phase, n) in names {
            ConstGauge::new(n).encode(family.encode_family(&PhaseLabel { phase })?)?;
        }
        let names = STEP_PHASES.iter().map(|(_, n)| *n).zip(steps);
        let mut family = encoder.encode_descriptor("shoal_workflow_steps", "Steps of the workflows in this replica's shards, by phase", None, prometheus_client::metrics::MetricType::Gauge)?;
        for (phase, n) in names {
            ConstGauge::new(n).encode(family.encode_family(&PhaseLabel { phase })?)?;
        }
        Ok(())
    }
}

/// Everything a step attempt is made of, whichever object runs it.
struct Attempt {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    pod_labels: BTreeMap<String, String>,
    pod_annotations: BTreeMap<String, String>,
    pod: crate::api::workflow::StepPodSettings,
    timeout_seconds: i64,
    image: String,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
    env: Vec<EnvVar>,
}

impl Attempt {
    fn parts(&self) -> (jobs::Shape<'_>, jobs::Container<'_>) {
        let shape = jobs::Shape {
            name: &self.name,
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            owner: self.owner.clone(),
            pod_labels: self.pod_labels.clone(),
            pod_annotations: self.pod_annotations.clone(),
            pod: &self.pod,
            timeout_seconds: self.timeout_seconds,
        };
        (shape, jobs::Container { image: &self.image, command: self.command.as_deref(), args: self.args.as_deref(), env: &self.env, image_pull_policy: None })
    }

    fn job(&self) -> Result<Job, Error> {
        let (shape, c) = self.parts();
        jobs::build(shape, c)
    }

    fn pod(&self) -> Result<Pod, Error> {
        let (shape, c) = self.parts();
        bare_pod::build(shape, c)
    }
}

fn attempt_shape(
    wf: &Workflow,
    uid: &str,
    step: &crate::api::workflow::WorkflowStep,
    c: &plan::CreateJob,
    generation: i64,
    outputs: &HashMap<String, String>,
    shard: Option<u32>,
) -> Result<Attempt, Error> {
    let mut labels = user_labels(wf);
    let cascaded: Vec<String> = labels.keys().cloned().collect();
    // The shard of the workflow's UID, not its label: a label can be edited.
    let shard = shard.map(|s| s.to_string()).unwrap_or_default();
    let step_label = plan::step_key(&step.step_name);
    let workflow_label = plan::label_value(&wf.name_any());
    labels.insert(SHARD_LABEL.into(), shard);
    labels.insert(WORKFLOW_LABEL.into(), workflow_label.clone());
    labels.insert(WORKFLOW_UID_LABEL.into(), uid.to_string());
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
    pod_labels.insert(WORKFLOW_LABEL.into(), workflow_label);
    pod_labels.insert(WORKFLOW_UID_LABEL.into(), uid.to_string());
    pod_labels.insert(STEP_LABEL.into(), step_label);
    pod_labels.insert(ATTEMPT_LABEL.into(), c.attempt.to_string());
    let pod_annotations = step.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    let owner = wf.controller_owner_ref(&()).ok_or_else(|| Error::Json(serde::de::Error::custom("workflow has no uid")))?;
    Ok(Attempt {
        name: c.job_name.clone(),
        labels,
        annotations: BTreeMap::from([(CASCADED_ANNOTATION.to_string(), cascaded.join(","))]),
        owner,
        pod_labels,
        pod_annotations,
        pod: crate::api::workflow::StepPodSettings::merged(wf.spec.step_defaults.as_ref(), &step.pod),
        timeout_seconds: timeout,
        image: step.image.clone(),
        command: step.command.clone(),
        args: step.args.clone(),
        env,
    })
}

/// Copy the workflow's own labels onto its Jobs or pods (`C` is how the cache holds them, `K`
/// how they are written), and remove the ones it no longer has.
async fn cascade_labels<C, K>(wf: &Workflow, jobs: &[Arc<C>], api: &FencedApi<'_, K>) -> Result<(), Error>
where
    C: Resource,
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
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
        let keys: Vec<String> = want.keys().cloned().collect();
        let body = json!({"metadata": {"labels": patch, "annotations": {CASCADED_ANNOTATION: keys.join(",")}}});
        match api.patch(&j.name_any(), &Patch::Merge(&body)).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
