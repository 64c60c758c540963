//! The Activity reconciler (seed 000): empty conditions → `Initialization=True` (the seed's
//! empty-conditions handler), then, at Initialization, the workers (the seed's
//! initialization handler), then the sum of the workers' states. Workers have deterministic
//! names and are the Activity's only if their controller ownerReference is its UID; a
//! finished Activity (Completed or Failed) is never looked at again.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, jobs};
use crate::api::SHARD_LABEL;
use crate::api::activity::{ACTIVITY_LABEL, Activity, ActivityState, ActivityStatus, ActivityWorker, WorkerState, WorkerStatusEntry};
use crate::api::conditions::{self, types};
use crate::core::{activity, plan};
use crate::ha::{Action, Fence, WriteError, Writer};

/// The seed's condition type: true once the Activity is initialised.
pub const INITIALIZATION: &str = "Initialization";
/// The Activity's UID on its workers: selects exactly one Activity's workers.
pub const ACTIVITY_UID_LABEL: &str = "shoal.dev/activity-uid";
const KIND: &str = "Activity";

/// What the Activity controller keeps besides the activities: their workers.
pub struct State {
    pub workers: Arc<crate::ha::Informer<ActivityWorker>>,
}

pub type Ctx = Arc<Context<State>>;

/// The queue key of the Activity that owns a worker.
pub fn owner_key(w: &ActivityWorker) -> Option<(String, String)> {
    Some((w.namespace()?, jobs::controller_owner(&w.metadata, KIND)?.name.clone()))
}

/// A worker's arrival, its state changing and its removal matter to its Activity.
pub fn worker_change_matters(old: Option<&ActivityWorker>, new: &ActivityWorker) -> bool {
    old.is_none_or(|o| o.status.as_ref().and_then(|s| s.state) != new.status.as_ref().and_then(|s| s.state))
}

fn owned_by(w: &ActivityWorker, uid: &str) -> bool {
    jobs::controller_owner(&w.metadata, KIND).is_some_and(|o| o.uid == uid)
}

/// Reconcile one Activity under `fence`.
pub async fn reconcile(a: Arc<Activity>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    let Some(w) = ctx.begin(fence, a.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    let status = a.status.clone().unwrap_or_default();
    if matches!(status.state, Some(ActivityState::Completed) | Some(ActivityState::Failed)) {
        return Ok(Action::AwaitChange);
    }
    let Some(uid) = a.uid() else { return Ok(Action::AwaitChange) };
    match reconcile_owned(&a, &uid, status, &w, &ctx).await {
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

async fn reconcile_owned(a: &Activity, uid: &str, status: ActivityStatus, w: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let ns = a.namespace().unwrap_or_default();
    let name = a.name_any();
    let now = Timestamp::now();
    let generation = a.metadata.generation;
    let t = Time(now);
    let mut new = status.clone();
    new.observed_generation = generation;
    let mut events: Vec<(EventType, &'static str, String)> = Vec::new();

    // Empty conditions: initialise (the seed's first handler), and nothing else yet.
    if status.conditions.is_empty() {
        conditions::set_condition(&mut new.conditions, conditions::condition(INITIALIZATION, true, "Initialized", "creating workers", generation, t.clone()));
        new.state = Some(ActivityState::Initializing);
        new.message = Some("creating workers".into());
        return write(a, &new, w, ctx, events, Action::AwaitChange).await;
    }

    let total = a.spec.workers.unwrap_or(1).max(1) as usize;
    let inputs = a.spec.inputs.clone().unwrap_or_default();
    if let Some((first, second)) = activity::colliding_inputs(&inputs) {
        let msg = format!("inputs {first:?} and {second:?} would both be the environment variable {}; rename one", activity::input_env_name(&first));
        new.state = Some(ActivityState::Failed);
        new.message = Some(msg.clone());
        conditions::set_condition(&mut new.conditions, conditions::condition(types::FAILED, true, "InvalidSpec", &msg, generation, t.clone()));
        conditions::set_condition(&mut new.conditions, conditions::condition(types::READY, false, "InvalidSpec", &msg, generation, t.clone()));
        events.push((EventType::Warning, "InvalidSpec", msg));
        return write(a, &new, w, ctx, events, Action::AwaitChange).await;
    }

    // Initialization: create the workers that do not exist yet.
    let mine: BTreeMap<String, Arc<ActivityWorker>> = ctx.workers.children_of(&(ns.clone(), name.clone())).into_iter().filter(|x| owned_by(x, uid)).map(|x| (x.name_any(), x)).collect();
    let mut foreign = Vec::new();
    let mut created = 0;
    for i in 0..total as i32 {
        let worker = activity::worker_name(&name, uid, i);
        if mine.contains_key(&worker) {
            continue;
        }
        match w.api::<ActivityWorker>(&ns).create(&build_worker(a, uid, &worker, i, &inputs, ctx)?).await {
            Ok(_) => created += 1,
            Err(e) if e.code() == Some(409) => match ctx.read::<ActivityWorker>(&ns).get_opt(&worker).await? {
                Some(x) if owned_by(&x, uid) => {}
                Some(_) => foreign.push(worker),
                None => {}
            },
            Err(e) => return Err(e.into()),
        }
    }
    if !foreign.is_empty() {
        let msg = format!("worker names taken by objects this Activity does not own (not adopted): {}", foreign.join(", "));
        new.state = Some(ActivityState::Failed);
        new.message = Some(msg.clone());
        conditions::set_condition(&mut new.conditions, conditions::condition(types::FAILED, true, "WorkerNotOwned", &msg, generation, t.clone()));
        conditions::set_condition(&mut new.conditions, conditions::condition(types::READY, false, "WorkerNotOwned", &msg, generation, t.clone()));
        events.push((EventType::Warning, "WorkerNotOwned", msg));
        return write(a, &new, w, ctx, events, Action::AwaitChange).await;
    }
    if created > 0 {
        events.push((EventType::Normal, "WorkersCreated", format!("created {created} of {total} workers")));
    }

    // Sum up the workers (the cache may not have the ones just created yet: they count as
    // created, without a state).
    let entries: Vec<(String, Option<WorkerState>)> = (0..total as i32)
        .map(|i| {
            let worker = activity::worker_name(&name, uid, i);
            let state = mine.get(&worker).and_then(|x| x.status.as_ref()?.state);
            (worker, state)
        })
        .collect();
    let s = activity::summarize(&entries, total);
    new.workers_status = entries.iter().map(|(n, st)| WorkerStatusEntry { name: n.clone(), state: st.unwrap_or(WorkerState::Ready) }).collect();
    new.workers_summary = Some(s.summary.clone());
    new.message = Some(s.message.clone());
    let (ready, progressing, failed, reason) = match s.state {
        ActivityState::Completed => (true, false, false, "Completed"),
        ActivityState::Failed => (false, false, true, "WorkerFailed"),
        _ => (false, true, false, "Running"),
    };
    let state = if s.state == ActivityState::Initializing { ActivityState::Running } else { s.state };
    if new.state != Some(state) {
        match state {
            ActivityState::Completed => events.push((EventType::Normal, "ActivityCompleted", s.message.clone())),
            ActivityState::Failed => events.push((EventType::Warning, "ActivityFailed", s.message.clone())),
            _ => {}
        }
    }
    new.state = Some(state);
    conditions::set_state(&mut new.conditions, (ready, progressing, failed), reason, &s.message, generation, t);
    write(a, &new, w, ctx, events, Action::Requeue(ctx.resync)).await
}

/// Worker `index`: the Activity's job template (or seed 000's default job) with the inputs
/// and the worker's index added to its environment.
fn build_worker(a: &Activity, uid: &str, name: &str, index: i32, inputs: &BTreeMap<String, String>, ctx: &Ctx) -> Result<ActivityWorker, Error> {
    let mut job = a.spec.job.clone().unwrap_or_else(activity::default_job);
    let env = job.env.get_or_insert_with(Vec::new);
    for (k, v) in activity::input_env(inputs) {
        env.push(EnvVar { name: k, value: Some(v), ..Default::default() });
    }
    env.push(EnvVar { name: activity::WORKER_INDEX_ENV.into(), value: Some(index.to_string()), ..Default::default() });
    let owner = a.controller_owner_ref(&()).ok_or_else(|| Error::Json(serde::de::Error::custom("activity has no uid")))?;
    // The shard of the Activity's UID: its workers live in its shard (`ha::family_root`).
    let shard = ctx.own.shard_for(a).map(|s| s.to_string()).unwrap_or_default();
    let labels = BTreeMap::from([(SHARD_LABEL.to_string(), shard), (ACTIVITY_LABEL.to_string(), plan::label_value(&a.name_any())), (ACTIVITY_UID_LABEL.to_string(), uid.to_string())]);
    Ok(serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ActivityWorker",
        "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
        "spec": {"job": job, "timeoutSeconds": a.spec.timeout_seconds, "pod": a.spec.pod},
    }))?)
}

async fn write(a: &Activity, new: &ActivityStatus, w: &Writer, ctx: &Ctx, events: Vec<(EventType, &'static str, String)>, next: Action) -> Result<Action, Error> {
    if a.status.as_ref() == Some(new) {
        return Ok(next);
    }
    match ctx.patch_status(w, a, a.status.as_ref(), new).await {
        Ok(Some(_)) => {
            for (t, reason, note) in events {
                w.event(t, reason, note, None).await;
            }
            Ok(next)
        }
        Ok(None) => Ok(Action::AwaitChange),
        Err(e) if e.code() == Some(404) => Ok(Action::AwaitChange),
        Err(e) => Err(e.into()),
    }
}
