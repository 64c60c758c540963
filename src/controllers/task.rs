//! The Task reconciler (seed 004): starts a run (a Job wrapping the Task's pod template) when
//! an Ignitor it names fires or a Task it names succeeds or fails, passes data along in
//! `ORCA_INITIATOR`/`ORCA_DATA`, records each run's outcome, and delivers the Task's actions
//! through the effects outbox.
//!
//! observe → plan → act → record, with the decision recorded first: everything a trigger
//! brings (a firing, a finished run) is written into the Task's status as a Pending run, and
//! the trigger's cursor moved past it, in one write with a resourceVersion precondition;
//! only then is the run's Job created, under a name derived from what started it. The rules
//! are in `core::trigger`.
//!
//! **Triggers across shards.** The replica that owns a Task acts for it; the one that owns
//! its trigger never does. Every replica keeps [`Peers`], an unsharded cache of every Task and
//! Ignitor in the watched namespaces: an event on one wakes the Tasks that name it (the queue
//! drops those this replica does not own), and the owner reads the trigger's recorded firings
//! or finished runs from it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EnvVar, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PropagationPolicy};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::step_job::StepJob;
use super::{Context, Error, jobs, step_pod};
use crate::api::SHARD_LABEL;
use crate::api::conditions;
use crate::api::delivery::{Delivery, DeliveryState};
use crate::api::task::{ActionPlugin, Ignitor, RunPhase, Task, TaskRun, TaskSpec, TaskStatus};
use crate::core::plan;
use crate::core::trigger::{self, End, Source, Subject};
use crate::ha::{Action, Fence, Key, Queue, Synced, WriteError, Writer};
use crate::outbox::{Attempt, Outbox};

/// The Task's name on its Jobs and pods (cut with a hash when longer than 63 characters).
pub const TASK_LABEL: &str = "shoal.dev/task";
/// The Task's UID on its Jobs: selects exactly one Task's Jobs.
pub const TASK_UID_LABEL: &str = "shoal.dev/task-uid";
/// On a run's Job: what started it (`Ignitor/<name>` or `Task/<name>/<run>`).
pub const INITIATOR_ANNOTATION: &str = "shoal.dev/initiator";
/// On a run's Job started by an Ignitor: the scheduled time that fired.
pub const SCHEDULED_TIME_ANNOTATION: &str = "shoal.dev/scheduled-time";
const KIND: &str = "Task";
/// Finished deliveries kept in status (pending ones are always kept).
const DELIVERIES_KEPT: usize = 20;
const DEFAULT_TIMEOUT_SECONDS: i64 = 10;
const DEFAULT_MAX_ATTEMPTS: i32 = 8;
/// How often a delivery waiting for its signing Secret looks again.
const RECHECK: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Task metrics.
#[derive(Clone)]
pub struct TaskMetrics {
    /// Runs by outcome: started, succeeded, failed, skipped, stopped.
    pub runs: Family<OutcomeLabel, Counter>,
}

impl TaskMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self { runs: Family::default() };
        for outcome in ["started", "succeeded", "failed", "skipped", "stopped"] {
            let _ = m.runs.get_or_create(&OutcomeLabel { outcome: outcome.into() });
        }
        registry.register("shoal_task_runs", "Task runs by outcome (started, succeeded, failed, skipped, stopped)", m.runs.clone());
        m
    }
    fn count(&self, outcome: &str, n: usize) {
        self.runs.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc_by(n as u64);
    }
}

/// What the Task controller keeps besides the Tasks it owns.
pub struct State {
    /// The Jobs of the Tasks this replica owns.
    pub jobs: Arc<crate::ha::Informer<StepJob>>,
    /// Every Task and Ignitor, for triggers.
    pub peers: Arc<Peers>,
    pub outbox: Arc<Outbox>,
    /// Where ActionPlugins' signing Secrets live.
    pub operator_namespace: String,
    pub metrics: TaskMetrics,
}

pub type Ctx = Arc<Context<State>>;

/// The queue key of the Task that owns a Job.
pub fn owner_key(job: &StepJob) -> Option<(String, String)> {
    jobs::owner_key(job, KIND)
}

/// Every Task and Ignitor in the watched namespaces, on every replica (not sharded): a Task's
/// triggers usually hash to shards another replica owns. An event on one wakes the Tasks
/// that name it.
pub struct Peers {
    tasks: Store<Task>,
    ignitors: Store<Ignitor>,
    tasks_ready: AtomicBool,
    ignitors_ready: AtomicBool,
}

impl Peers {
    /// Start both watches; their events wake dependents in `queue` (the Task queue).
    /// Returns the cache and the two watch tasks to supervise.
    pub fn start(
        tasks: Api<Task>,
        ignitors: Api<Ignitor>,
        queue: Queue,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static, impl Future<Output = ()> + Send + 'static) {
        let (task_store, task_writer) = reflector::store();
        let (ignitor_store, ignitor_writer) = reflector::store();
        let peers = Arc::new(Peers { tasks: task_store, ignitors: ignitor_store, tasks_ready: AtomicBool::new(false), ignitors_ready: AtomicBool::new(false) });
        let (p1, q1, s1) = (peers.clone(), queue.clone(), shutdown.clone());
        let watch_tasks = follow(tasks, task_writer, s1, move |ev| match ev {
            Followed::Object(t) => {
                for k in p1.dependents(&t.namespace().unwrap_or_default(), trigger::TASK, &t.name_any()) {
                    q1.add(k);
                }
            }
            Followed::Ready => p1.tasks_ready.store(true, Ordering::Release),
        });
        let p2 = peers.clone();
        let watch_ignitors = follow(ignitors, ignitor_writer, shutdown, move |ev| match ev {
            Followed::Object(i) => {
                for k in p2.dependents(&i.namespace().unwrap_or_default(), trigger::IGNITOR, &i.name_any()) {
                    queue.add(k);
                }
            }
            Followed::Ready => p2.ignitors_ready.store(true, Ordering::Release),
        });
        (peers, watch_tasks, watch_ignitors)
    }

    /// Both caches have listed everything once.
    pub fn ready(&self) -> bool {
        self.tasks_ready.load(Ordering::Acquire) && self.ignitors_ready.load(Ordering::Acquire)
    }

    /// The Tasks in `ns` that name the `kind` object `name` as a trigger. A scan of the
    /// namespace's Tasks: Tasks are few per namespace next to their runs.
    fn dependents(&self, ns: &str, kind: &str, name: &str) -> Vec<Key> {
        let names = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| v.iter().any(|n| n == name));
        self.tasks
            .state_filter(|t| {
                t.namespace().as_deref() == Some(ns)
                    && match kind {
                        trigger::IGNITOR => names(&t.spec.start_on_ignition),
                        _ => names(&t.spec.start_on_success) || names(&t.spec.start_on_failure),
                    }
            })
            .iter()
            .map(|t| (ns.to_string(), t.name_any()))
            .collect()
    }

    /// What `task` sees of each trigger it names that exists.
    fn sources(&self, task: &Task) -> Vec<Source> {
        let ns = task.namespace().unwrap_or_default();
        let spec = &task.spec;
        let mut out = Vec::new();
        let created = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::UNIX_EPOCH);
        let mut seen = std::collections::BTreeSet::new();
        for name in spec.start_on_ignition.iter().flatten() {
            if !seen.insert((trigger::IGNITOR, name.clone())) {
                continue;
            }
            if let Some(i) = self.ignitors.get(&ObjectRef::new(name).within(&ns))
                && let Some(uid) = i.uid()
            {
                out.push(Source::Ignitor {
                    name: name.clone(),
                    uid,
                    created: created(&i.metadata),
                    data: i.spec.data.clone(),
                    policy: i.spec.concurrency_policy.unwrap_or_default(),
                    ignitions: i.status.as_ref().map(|s| s.ignitions.clone()).unwrap_or_default(),
                });
            }
        }
        let on = |v: &Option<Vec<String>>, n: &str| v.as_ref().is_some_and(|v| v.iter().any(|x| x == n));
        for name in spec.start_on_success.iter().flatten().chain(spec.start_on_failure.iter().flatten()) {
            if !seen.insert((trigger::TASK, name.clone())) {
                continue;
            }
            let peer = if *name == task.name_any() { Some(Arc::new(task.clone())) } else { self.tasks.get(&ObjectRef::new(name).within(&ns)) };
            if let Some(p) = peer
                && let Some(uid) = p.uid()
            {
                out.push(Source::Task {
                    name: name.clone(),
                    uid,
                    created: created(&p.metadata),
                    runs: p.status.as_ref().map(|s| s.runs.clone()).unwrap_or_default(),
                    on_success: on(&spec.start_on_success, name),
                    on_failure: on(&spec.start_on_failure, name),
                });
            }
        }
        out
    }
}

impl Synced for Peers {
    fn synced(&self, _shards: &[u32]) -> bool {
        self.ready()
    }
}

enum Followed<'a, K> {
    Object(&'a K),
    Ready,
}

/// Keep `writer`'s store filled from a watch of `api` until `shutdown`, calling `on` for
/// every object seen (added, changed, deleted, or listed) and once each list is complete.
async fn follow<K>(api: Api<K>, writer: reflector::store::Writer<K>, shutdown: CancellationToken, on: impl Fn(Followed<'_, K>) + Send + 'static)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
    let mut stream = std::pin::pin!(stream);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => ev,
        };
        match ev {
            None => return,
            Some(Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o))) => on(Followed::Object(&o)),
            Some(Ok(watcher::Event::InitDone)) => on(Followed::Ready),
            Some(Ok(watcher::Event::Init)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "peer watch error; retrying"),
        }
    }
}

/// Reconcile one Task under `fence`.
pub async fn reconcile(t: Arc<Task>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    if !ctx.peers.ready() {
        // Acting before every trigger is known could record a cursor late and pass over a
        // firing; the Task is looked at again once the peer caches have listed.
        return Ok(Action::Requeue(Duration::from_millis(500)));
    }
    let Some(writer) = ctx.begin(fence, t.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    let Some(uid) = t.uid() else { return Ok(Action::AwaitChange) };
    match reconcile_owned(&t, &uid, &writer, &ctx).await {
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

/// Events decided in a reconcile, published once the status that explains them is written.
type Events = Vec<(EventType, &'static str, String)>;

async fn reconcile_owned(t: &Task, uid: &str, w: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let ns = t.namespace().unwrap_or_default();
    let name = t.name_any();
    let now = Timestamp::now();
    let old = t.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let mut events: Events = Vec::new();

    // Record what the triggers brought, and what finished.
    let subject = Subject {
        name: &name,
        uid,
        created: t.metadata.creation_timestamp.as_ref().map(|c| c.0).unwrap_or(now),
        spec_changed: t.status.is_some() && old.observed_generation != t.metadata.generation,
        guard: trigger::Guard::from_spec(t.spec.loop_guard.as_ref()),
    };
    let recorded = trigger::record_triggers(&mut st, &subject, &ctx.peers.sources(t), now);
    ctx.metrics.count("skipped", recorded.skipped.len());
    ctx.metrics.count("stopped", recorded.stopped.len());
    for (run, reason, msg) in &recorded.skipped {
        events.push((EventType::Warning, "RunSkipped", format!("run {run} not started ({reason}): {msg}")));
    }
    let running: Vec<String> = st.runs.iter().filter(|r| r.phase == RunPhase::Running).map(|r| r.name.clone()).collect();
    for run in running {
        if let Some(end) = observe_run(uid, &ns, &run, ctx).await? {
            end_run(t, &mut st, &run, end, now, ctx, &mut events).await?;
        }
    }
    let (keep_ok, keep_failed) = limits(&t.spec);
    let (dropped, next_trim) = trigger::trim(&mut st, keep_ok, keep_failed, now);
    summarize(t, &mut st, now);
    let mut current = None;
    if st != old {
        match ctx.patch_status(w, t, t.status.as_ref(), &st).await {
            Ok(Some(updated)) => current = Some(updated),
            Ok(None) => return Ok(Action::AwaitChange),
            Err(e) if e.code() == Some(404) => return Ok(Action::AwaitChange),
            Err(e) => return Err(e.into()),
        }
        publish(w, std::mem::take(&mut events)).await;
    }
    let recorded_status = st.clone();

    // Act on what is recorded: stop replaced runs, drop Jobs beyond the history, start the
    // runs whose time has come, attempt the pending deliveries.
    for run in recorded.stopped.iter().chain(dropped.iter().map(|r| &r.name)) {
        delete_job(w, &ns, run).await?;
    }
    for run in trigger::startable(&st, now) {
        start_run(t, uid, &ns, &run, &mut st, now, w, ctx, &mut events).await?;
    }
    let mut next = deliver(t, &mut st, &recorded_status, w, ctx, &mut events, now).await?;
    summarize(t, &mut st, now);
    if st != recorded_status {
        let base = current.as_ref().unwrap_or(t);
        match ctx.patch_status(w, base, base.status.as_ref(), &st).await {
            Ok(Some(_)) => publish(w, events).await,
            Ok(None) => return Ok(Action::AwaitChange),
            Err(e) if e.code() == Some(404) => return Ok(Action::AwaitChange),
            Err(e) => return Err(e.into()),
        }
    }

    for at in [trigger::next_start(&st, now), next_trim].into_iter().flatten() {
        let d = Duration::from_millis(at.duration_since(now).as_millis().clamp(1, 3_600_000) as u64);
        next = Some(next.map_or(d, |n: Duration| n.min(d)));
    }
    if st.runs.iter().any(|r| r.phase == RunPhase::Pending && r.start_after.is_none()) {
        next = Some(Duration::from_millis(100));
    }
    Ok(Action::Requeue(next.map_or(ctx.resync, |n| n.min(ctx.resync))))
}

fn limits(spec: &TaskSpec) -> (usize, usize) {
    let ok = spec.successful_runs_history_limit.unwrap_or(TaskSpec::DEFAULT_SUCCESSFUL_RUNS_HISTORY_LIMIT).max(0) as usize;
    let failed = spec.failed_runs_history_limit.unwrap_or(TaskSpec::DEFAULT_FAILED_RUNS_HISTORY_LIMIT).max(0) as usize;
    (ok, failed)
}

/// State, conditions and observed generation from the runs.
fn summarize(t: &Task, st: &mut TaskStatus, now: Timestamp) {
    let state = trigger::state(st);
    st.state = Some(state);
    st.observed_generation = t.metadata.generation;
    let active = st.runs.iter().filter(|r| matches!(r.phase, RunPhase::Pending | RunPhase::Running)).count();
    let (reason, msg) = match state {
        crate::api::task::TaskState::Running => ("Running", format!("{active} run(s) waiting or running")),
        crate::api::task::TaskState::Succeeded => ("Succeeded", "the last run succeeded".to_string()),
        crate::api::task::TaskState::Failed => ("Failed", format!("the last run failed ({} failure(s) in a row)", st.consecutive_failures)),
        crate::api::task::TaskState::Pending => ("Waiting", "waiting for a trigger".to_string()),
    };
    let failed = state == crate::api::task::TaskState::Failed;
    // Keep the transition time when nothing changed, so a summary does not rewrite status.
    let same = conditions::find(&st.conditions, conditions::types::READY).is_some_and(|c| c.reason == reason && c.message == msg);
    if !same {
        conditions::set_state(&mut st.conditions, (true, active > 0, failed), reason, &msg, t.metadata.generation, Time(now));
    }
}

/// How a Running run's Job stands: `None` while it runs.
async fn observe_run(uid: &str, ns: &str, run: &str, ctx: &Ctx) -> Result<Option<End>, Error> {
    let job = match ctx.jobs.get(&(ns.to_string(), run.to_string())) {
        Some(j) => Some(j),
        None => ctx.read::<StepJob>(ns).get_opt(run).await?.map(Arc::new),
    };
    let Some(job) = job else {
        return Ok(Some(End::Stopped { reason: "JobDeleted".into(), message: format!("the run's Job {run} was deleted before it finished") }));
    };
    if !jobs::owned_by(&job, KIND, uid) {
        return Ok(Some(End::Failed { reason: "JobNotOwned".into(), message: jobs::foreign(run, "task"), output: None }));
    }
    match jobs::state(&job) {
        plan::JobState::Succeeded { .. } => {
            let pods = step_pod::job_pods(&ctx.read::<Pod>(ns), &job).await?;
            Ok(Some(End::Succeeded { output: termination_message(&pods, "Succeeded") }))
        }
        base @ plan::JobState::Failed { .. } => {
            let pods = step_pod::job_pods(&ctx.read::<Pod>(ns), &job).await?;
            // Explained by the pod the Job failed for (exit code, deadline, disruptions), as
            // for a Workflow step.
            let (reason, message) = match step_pod::finished(&job, base, &pods, None) {
                plan::JobState::Failed { reason, message } => (reason, message),
                _ => ("JobFailed".to_string(), String::new()),
            };
            Ok(Some(End::Failed { reason: if reason.is_empty() { "JobFailed".into() } else { reason }, message, output: termination_message(&pods, "Failed") }))
        }
        _ => Ok(None),
    }
}

/// The termination message of the newest pod in `phase`: its first container, in the order
/// of the pod spec, with a non-empty one.
fn termination_message(pods: &[Pod], phase: &str) -> Option<String> {
    let pod = pods.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase)).max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    pod.spec.as_ref()?.containers.iter().find_map(|c| {
        let s = statuses.iter().find(|s| s.name == c.name)?;
        s.state.as_ref()?.terminated.as_ref()?.message.clone().filter(|m| !m.is_empty())
    })
}

/// Record that `run` ended, with the deliveries of the Task's actions for it.
async fn end_run(t: &Task, st: &mut TaskStatus, run: &str, end: End, now: Timestamp, ctx: &Ctx, events: &mut Events) -> Result<(), Error> {
    let outcome = match &end {
        End::Succeeded { .. } => "succeeded",
        End::Failed { .. } => "failed",
        End::Stopped { .. } => "stopped",
    };
    let note = match &end {
        End::Succeeded { .. } => (EventType::Normal, "RunSucceeded", format!("run {run} succeeded")),
        End::Failed { reason, message, .. } => (EventType::Warning, "RunFailed", format!("run {run} failed: {reason}: {message}")),
        End::Stopped { message, .. } => (EventType::Warning, "RunStopped", format!("run {run}: {message}")),
    };
    if !trigger::finish(st, run, end, now) {
        return Ok(());
    }
    ctx.metrics.count(outcome, 1);
    events.push(note);
    let Some(r) = st.runs.iter().find(|r| r.name == run).cloned() else { return Ok(()) };
    let actions = match r.phase {
        RunPhase::Succeeded => t.spec.success_actions.clone(),
        RunPhase::Failed => t.spec.failure_actions.clone(),
        _ => None,
    };
    let ns = t.namespace().unwrap_or_default();
    let uid = t.uid().unwrap_or_default();
    for action in actions.into_iter().flatten() {
        let id = Outbox::delivery_id(&[&uid, &r.name, &action]);
        if st.deliveries.iter().any(|d| d.id == id) {
            continue;
        }
        let payload = trigger::action_payload(&t.name_any(), &ns, &r, &action);
        let mut d = Delivery::pending(id, String::new(), payload, now);
        let refused = match ctx.read_cluster::<ActionPlugin>().get_opt(&action).await? {
            None => Some(format!("no ActionPlugin named {action}")),
            Some(p) => {
                d.target = p.spec.url.clone();
                ctx.outbox.check_url(&p.spec.url).err().map(|e| format!("ActionPlugin {action}: {e}"))
            }
        };
        if let Some(why) = refused {
            d.state = DeliveryState::Failed;
            d.finished_at = Some(Time(now));
            events.push((EventType::Warning, "ActionFailed", format!("action {action} for run {}: {why}", r.name)));
            d.last_error = Some(why);
        }
        st.deliveries.push(d);
    }
    trim_deliveries(st);
    Ok(())
}

fn trim_deliveries(st: &mut TaskStatus) {
    let finished = st.deliveries.iter().filter(|d| d.state != DeliveryState::Pending).count();
    let mut extra = finished.saturating_sub(DELIVERIES_KEPT);
    st.deliveries.retain(|d| {
        if extra > 0 && d.state != DeliveryState::Pending {
            extra -= 1;
            return false;
        }
        true
    });
}

/// Create the Job of Pending run `run` and record it Running (or, when the name is taken by
/// an object this Task does not own, or the API server refuses the Job, Failed).
#[allow(clippy::too_many_arguments)]
async fn start_run(t: &Task, uid: &str, ns: &str, run: &str, st: &mut TaskStatus, now: Timestamp, w: &Writer, ctx: &Ctx, events: &mut Events) -> Result<(), Error> {
    let Some(r) = st.runs.iter().find(|r| r.name == run).cloned() else { return Ok(()) };
    // Already created (by an earlier reconcile whose status write did not land: a conflict,
    // or a write that outlived its fence): no second create.
    let cached = ctx.jobs.get(&(ns.to_string(), run.to_string())).filter(|j| jobs::owned_by(j, KIND, uid));
    let created = match cached {
        Some(j) => jobs::Created::Ours(j.uid()),
        None => jobs::create(&w.api::<Job>(ns), &ctx.read::<StepJob>(ns), &build(t, uid, &r, ctx)?, KIND, uid).await?,
    };
    match created {
        jobs::Created::New(_) | jobs::Created::Ours(_) => {
            if let Some(r) = st.runs.iter_mut().find(|r| r.name == run) {
                r.phase = RunPhase::Running;
                r.started_at = Some(Time(now));
                r.data = None;
                r.start_after = None;
            }
            ctx.metrics.count("started", 1);
        }
        jobs::Created::Gone => {}
        jobs::Created::Foreign(msg) => {
            end_run(t, st, run, End::Failed { reason: "JobNotOwned".into(), message: msg, output: None }, now, ctx, events).await?;
        }
        jobs::Created::Rejected(msg) => {
            end_run(t, st, run, End::Failed { reason: "JobRejected".into(), message: msg, output: None }, now, ctx, events).await?;
        }
    }
    Ok(())
}

/// The Job of run `r`: the Task's template, with `ORCA_INITIATOR` and `ORCA_DATA`.
fn build(t: &Task, uid: &str, r: &TaskRun, ctx: &Ctx) -> Result<Job, Error> {
    let mut labels = BTreeMap::new();
    labels.insert(SHARD_LABEL.to_string(), ctx.own.shard_for(t).map(|s| s.to_string()).unwrap_or_default());
    labels.insert(TASK_LABEL.to_string(), plan::label_value(&t.name_any()));
    labels.insert(TASK_UID_LABEL.to_string(), uid.to_string());
    let mut annotations = BTreeMap::new();
    let initiator = match &r.initiator.run {
        Some(run) => format!("{}/{}/{run}", r.initiator.kind, r.initiator.name),
        None => format!("{}/{}", r.initiator.kind, r.initiator.name),
    };
    annotations.insert(INITIATOR_ANNOTATION.to_string(), initiator);
    if let Some(MicroTime(at)) = &r.initiator.scheduled_time {
        annotations.insert(SCHEDULED_TIME_ANNOTATION.to_string(), at.to_string());
    }
    let owner = t.controller_owner_ref(&()).ok_or_else(|| Error::Json(serde::de::Error::custom("task has no uid")))?;
    let env = [
        EnvVar { name: "ORCA_INITIATOR".into(), value: Some(r.initiator.name.clone()), value_from: None },
        EnvVar { name: "ORCA_DATA".into(), value: Some(r.data.clone().unwrap_or_default()), value_from: None },
    ];
    jobs::build_from_template(&r.name, labels, annotations, owner, &t.spec.template, &env)
}

/// Delete run `run`'s Job and its pods (a 404 is fine: already gone).
async fn delete_job(w: &Writer, ns: &str, run: &str) -> Result<(), Error> {
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    match w.api::<Job>(ns).delete(run, &dp).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One attempt for each delivery that was Pending in the recorded status `recorded` and is
/// due; returns when to look again for those still pending.
async fn deliver(t: &Task, st: &mut TaskStatus, recorded: &TaskStatus, w: &Writer, ctx: &Ctx, events: &mut Events, now: Timestamp) -> Result<Option<Duration>, Error> {
    let mut next: Option<Duration> = None;
    let mut later = |d: Duration| next = Some(next.map_or(d, |n: Duration| n.min(d)));
    for d in recorded.deliveries.iter().filter(|d| d.state == DeliveryState::Pending) {
        if let Some(at) = &d.next_attempt_at
            && at.0 > now
        {
            later(Duration::from_millis(at.0.duration_since(now).as_millis().clamp(1, 3_600_000) as u64));
            continue;
        }
        let action = serde_json::from_str::<serde_json::Value>(&d.payload).ok().and_then(|v| v["action"].as_str().map(String::from)).unwrap_or_default();
        let plugin = ctx.read_cluster::<ActionPlugin>().get_opt(&action).await?;
        let Some(idx) = st.deliveries.iter().position(|x| x.id == d.id) else { continue };
        let Some(plugin) = plugin else {
            let e = &mut st.deliveries[idx];
            e.state = DeliveryState::Failed;
            e.finished_at = Some(Time(now));
            e.last_error = Some(format!("the ActionPlugin {action} was deleted"));
            events.push((EventType::Warning, "ActionFailed", format!("action {action}: the ActionPlugin was deleted before the delivery {} was made", d.id)));
            continue;
        };
        let secret = match &plugin.spec.secret_ref {
            None => None,
            Some(r) => {
                let value = ctx.read::<Secret>(&ctx.operator_namespace).get_opt(&r.name).await?.and_then(|s| s.data).and_then(|data| data.get(r.key()).cloned());
                match value.map(|b| String::from_utf8(b.0)) {
                    Some(Ok(s)) if Outbox::check_secret(&s).is_ok() => Some(s.trim().to_string()),
                    _ => {
                        // Fixing the Secret is enough: the delivery waits for it, looked at
                        // again every RECHECK; said once (in lastError and one Event).
                        let msg = format!("ActionPlugin {action}: signing secret {}/{} key {} is missing or unusable; the delivery waits for it", ctx.operator_namespace, r.name, r.key());
                        if st.deliveries[idx].last_error.as_deref() != Some(msg.as_str()) {
                            events.push((EventType::Warning, "SecretNotFound", msg.clone()));
                            st.deliveries[idx].last_error = Some(msg);
                        }
                        later(RECHECK);
                        continue;
                    }
                }
            }
        };
        let timeout = Duration::from_secs(plugin.spec.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS).clamp(1, 60) as u64);
        let max_attempts = plugin.spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1);
        let mut entry = st.deliveries[idx].clone();
        let body = entry.payload.clone().into_bytes();
        let attempt = ctx.outbox.attempt(w, &mut entry, &body, secret.as_deref(), timeout, max_attempts, now).await;
        st.deliveries[idx] = entry.clone();
        match attempt {
            Ok(Attempt::Delivered) => {}
            Ok(Attempt::Failed) => events.push((
                EventType::Warning,
                "ActionFailed",
                format!("action {action} for {}: delivery {} failed after {} attempts: {}", t.name_any(), entry.id, entry.attempts, entry.last_error.unwrap_or_default()),
            )),
            Ok(Attempt::Retry(after)) => later(after),
            Err(WriteError::Deadline) => later(Duration::from_millis(100)),
            Err(e) => return Err(e.into()),
        }
    }
    trim_deliveries(st);
    Ok(next)
}

async fn publish(w: &Writer, events: Events) {
    for (t, reason, note) in events {
        w.event(t, reason, note, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, created: i64, containers: &[&str], messages: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p{created}"), "creationTimestamp": Timestamp::from_second(1_800_000_000 + created).unwrap().to_string()},
            "spec": {"containers": containers.iter().map(|c| serde_json::json!({"name": c})).collect::<Vec<_>>()},
            "status": {"phase": phase, "containerStatuses": messages.iter().map(|(c, m)| serde_json::json!({
                "name": c, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": m}},
            })).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    #[test]
    fn the_message_comes_from_the_newest_pod_and_its_first_container_with_one() {
        let pods = [pod("Failed", 1, &["a"], &[("a", "old")]), pod("Succeeded", 2, &["b", "a"], &[("a", "from a"), ("b", "")]), pod("Succeeded", 3, &["b", "a"], &[("a", "A"), ("b", "B")])];
        assert_eq!(termination_message(&pods, "Succeeded").as_deref(), Some("B"), "spec order: b before a");
        assert_eq!(termination_message(&pods[..2], "Succeeded").as_deref(), Some("from a"), "b's is empty");
        assert_eq!(termination_message(&pods, "Failed").as_deref(), Some("old"));
        assert_eq!(termination_message(&pods[1..], "Failed"), None);
    }

    #[test]
    fn finished_deliveries_are_bounded_and_pending_ones_kept() {
        let d = |i: usize, state| Delivery { state, ..Delivery::pending(format!("d{i}"), String::new(), String::new(), Timestamp::UNIX_EPOCH) };
        let mut st = TaskStatus::default();
        st.deliveries.push(d(0, DeliveryState::Pending));
        st.deliveries.extend((1..=30).map(|i| d(i, DeliveryState::Delivered)));
        trim_deliveries(&mut st);
        assert_eq!(st.deliveries.len(), DELIVERIES_KEPT + 1);
        assert_eq!(st.deliveries[0].id, "d0");
        assert_eq!(st.deliveries.last().unwrap().id, "d30", "the newest finished ones stay");
    }
}
