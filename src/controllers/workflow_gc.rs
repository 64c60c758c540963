//! Garbage collection for the Workflow reconciler: observe (the status as recorded, the
//! workflow's step objects in the sharded Job and pod caches) → plan (`core::gc`, pure) → act
//! (deletes through the fenced writer, each with a UID precondition, so a recreated object of
//! the same name is never touched; already gone is done).
//!
//! Level-based: nothing is written to remember what was collected. What the caches still hold
//! is what is left; an object not in the cache yet (just created, or listed after a takeover)
//! wakes its workflow when it arrives and is judged then. Only what the status read at the
//! start of the reconcile records is acted on, never what the same reconcile is about to
//! record, so an object goes only once its result (and output) is in status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{DeleteParams, Preconditions, PropagationPolicy};

use super::bare_pod::StepPod;
use super::step_job::StepJob;
use super::workflow::{ATTEMPT_LABEL, GENERATION_LABEL, STEP_LABEL};
use super::{Error, KindLabel, Metrics};
use crate::api::conditions;
use crate::api::workflow::Workflow;
use crate::core::gc::{self, Policy, PolicyError};
use crate::ha::Writer;

/// The condition a workflow carries while its garbage collection policy cannot be used
/// (status False, reason [`INVALID_GC_POLICY`]); absent otherwise.
pub const GC_CONDITION: &str = "GarbageCollection";
/// Reason of [`GC_CONDITION`] and of the Warning Event that announces it.
pub const INVALID_GC_POLICY: &str = "InvalidGCPolicy";

/// Deletes sent at once for one workflow.
const CONCURRENT_DELETES: usize = 8;

/// What garbage collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The workflow's TTL ran out and it was deleted (or was already gone).
    WorkflowDeleted,
    /// Look again after this long, if anything is still due.
    Next(Option<Duration>),
}

fn label<'a>(m: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    m.labels.as_ref()?.get(key).map(String::as_str)
}

/// Delete with background propagation (a Job's pods go after it), only the object with `uid`.
fn delete_params(uid: &str) -> DeleteParams {
    DeleteParams { propagation_policy: Some(PropagationPolicy::Background), preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }), ..Default::default() }
}

/// Collect `wf`'s garbage under `policy` at `now`: `jobs` and `pods` are its own step objects
/// (controller-owned by its UID) in the caches.
#[allow(clippy::too_many_arguments)]
pub async fn collect(wf: &Workflow, uid: &str, ns: &str, policy: &Policy, jobs: &[Arc<StepJob>], pods: &[Arc<StepPod>], w: &Writer, metrics: &Metrics, now: Timestamp) -> Result<Outcome, Error> {
    if *policy == Policy::default() {
        return Ok(Outcome::Next(None));
    }
    let generation = wf.metadata.generation.unwrap_or(0);
    // A status of another generation is about another spec's steps (the caller restarts it).
    let Some(status) = wf.status.as_ref().filter(|s| s.observed_generation == Some(generation)) else {
        return Ok(Outcome::Next(None));
    };
    let this_generation = generation.to_string();
    // Objects being deleted already are gone for this purpose; an old generation's are the
    // caller's to delete.
    let objects: Vec<(&'static str, &ObjectMeta)> = jobs
        .iter()
        .map(|j| ("Job", &j.metadata))
        .chain(pods.iter().map(|p| ("Pod", &p.metadata)))
        .filter(|(_, m)| m.deletion_timestamp.is_none() && label(m, GENERATION_LABEL) == Some(this_generation.as_str()))
        .collect();
    let children: Vec<gc::Child<'_>> = objects
        .iter()
        .map(|(_, m)| gc::Child { name: m.name.as_deref().unwrap_or_default(), step: label(m, STEP_LABEL).unwrap_or_default(), attempt: label(m, ATTEMPT_LABEL).and_then(|a| a.parse().ok()) })
        .collect();
    let observed = gc::Observed { phase: status.workflow_status, status_changed: status.status_changed.as_ref().map(|t| t.0), steps: &status.steps, children: &children };
    let decision = gc::decide(policy, &observed, now);

    if decision.delete_workflow {
        let name = wf.name_any();
        match w.api::<Workflow>(ns).remove(&name, &delete_params(uid)).await {
            Ok(deleted) => {
                if deleted {
                    metrics.gc_deletions.get_or_create(&KindLabel { kind: "Workflow" }).inc();
                    tracing::info!(namespace = ns, workflow = %name, "the workflow's TTL ran out; deleted it");
                }
            }
            // The UID precondition failed: the name now belongs to another workflow.
            Err(e) if e.code() == Some(409) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Outcome::WorkflowDeleted);
    }

    let jobs_api = w.api::<Job>(ns);
    let pods_api = w.api::<Pod>(ns);
    let mut deletes = Vec::with_capacity(decision.delete.len());
    for &i in &decision.delete {
        let (kind, m) = objects[i];
        let name = m.name.clone().unwrap_or_default();
        let dp = delete_params(m.uid.as_deref().unwrap_or_default());
        let (jobs_api, pods_api) = (&jobs_api, &pods_api);
        deletes.push(async move {
            let r = match kind {
                "Job" => jobs_api.remove(&name, &dp).await,
                _ => pods_api.remove(&name, &dp).await,
            };
            match r {
                Ok(true) => Ok(Some(kind)),
                Ok(false) => Ok(None),
                // Another object has this name now: not the one judged.
                Err(e) if e.code() == Some(409) => Ok(None),
                Err(e) => Err(Error::from(e)),
            }
        });
    }
    let results: Vec<Result<Option<&'static str>, Error>> = futures::stream::iter(deletes).buffer_unordered(CONCURRENT_DELETES).collect().await;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(Some(kind)) => {
                metrics.gc_deletions.get_or_create(&KindLabel { kind }).inc();
            }
            Ok(None) => {}
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let wait = decision.next.map(|t| Duration::try_from(t.duration_since(now)).unwrap_or_default());
    Ok(Outcome::Next(wait))
}

/// Set [`GC_CONDITION`] in `conds` from `policy`: False with the reason why while it cannot be
/// used, absent once it can. Returns the message if it is newly raised (or says something
/// new), for a Warning Event.
pub fn set_condition(conds: &mut Vec<Condition>, policy: &Result<Policy, PolicyError>, generation: i64, now: Time) -> Option<String> {
    match policy {
        Ok(_) => {
            conds.retain(|c| c.type_ != GC_CONDITION);
            None
        }
        Err(e) => {
            let message = format!("{e}; nothing is garbage-collected until it is fixed");
            let before = conditions::find(conds, GC_CONDITION).map(|c| c.message.clone());
            conditions::set_condition(conds, conditions::condition(GC_CONDITION, false, INVALID_GC_POLICY, message.clone(), Some(generation), now));
            (before.as_deref() != Some(message.as_str())).then_some(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_is_there_only_while_the_policy_is_unusable() {
        let t = |s| Time(Timestamp::from_second(s).unwrap());
        let bad: Result<Policy, PolicyError> = Err(PolicyError::KeepLast(-1));
        let mut conds = vec![];
        let raised = set_condition(&mut conds, &bad, 1, t(10));
        assert!(raised.unwrap().contains("spec.podGC.keepLast -1"));
        assert_eq!((conds[0].type_.as_str(), conds[0].status.as_str(), conds[0].reason.as_str()), (GC_CONDITION, "False", INVALID_GC_POLICY));
        assert_eq!(set_condition(&mut conds, &bad, 1, t(20)), None, "raised once");
        assert_eq!(conds[0].last_transition_time, t(10));
        assert_eq!(set_condition(&mut conds, &Ok(Policy::default()), 1, t(30)), None);
        assert!(conds.is_empty());
    }
}
