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
    use std::sync::Mutex;

    use prometheus_client::registry::Registry;
    use serde_json::{Value, json};

    use crate::ha::{Fence, HaConfig, HaMetrics, Ownership};

    /// What the stand-in API server was asked: (method, path, body).
    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// An API server stand-in where the object of every name now has UID `current`: a DELETE
    /// whose UID precondition names another object is refused with 409, as the API server
    /// refuses it.
    async fn serving(current: &'static str) -> (kube::Client, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let uid = body["preconditions"]["uid"].as_str().map(String::from);
                log.lock().unwrap().push((parts.method.to_string(), parts.uri.path().to_string(), body));
                let (code, status) = match uid.as_deref() {
                    Some(u) if u != current => (
                        409,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409,
                        "message": format!("Precondition failed: UID in precondition: {u}, UID in object meta: {current}")}),
                    ),
                    _ => (200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})),
                };
                (axum::http::StatusCode::from_u16(code).unwrap(), [(axum::http::header::CONTENT_TYPE, "application/json")], status.to_string())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap(), seen)
    }

    fn writer(client: kube::Client, wf: &Workflow) -> Writer {
        let cfg = HaConfig { shards: 4, lease_duration: Duration::from_secs(10), renew_deadline: Duration::from_secs(5), ..Default::default() };
        let own = Ownership::new(cfg, "me".into(), "ops".into(), HaMetrics::new(&mut Registry::default()), None);
        own.hold_for_test(1, 1, std::time::Instant::now());
        let recorder = kube::runtime::events::Recorder::new(client.clone(), kube::runtime::events::Reporter { controller: "t".into(), instance: None });
        Writer::new(own, Fence { shard: 1, transitions: 1 }, client, recorder, wf)
    }

    /// Workflow `w` with UID `uid`, completed at 00:00:10, with `spec` merged in.
    fn finished(uid: &str, spec: Value) -> Workflow {
        let mut v = json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "w", "namespace": "ns", "uid": uid, "generation": 1},
            "spec": {"containers": [{"stepName": "a", "image": "busybox"}]},
            "status": {"workflowStatus": "Completed", "statusChanged": "2026-01-01T00:00:10Z", "observedGeneration": 1,
                "steps": [{"stepName": "a", "phase": "Succeeded", "attempt": 0, "jobName": "w-a", "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:10Z"}]}});
        for (k, x) in spec.as_object().unwrap() {
            v["spec"][k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn deleted(m: &Metrics, kind: &'static str) -> u64 {
        m.gc_deletions.get_or_create(&KindLabel { kind }).get()
    }

    #[tokio::test]
    async fn the_workflow_goes_only_with_its_own_uid_and_a_successor_of_its_name_stays() {
        let now: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let m = Metrics::new(&mut Registry::default());
        let (client, seen) = serving("uid-successor").await;
        // A stale copy: the workflow of this name now is another one.
        let stale = finished("uid-first", json!({"ttlStrategy": {"secondsAfterCompletion": 60}}));
        let policy = gc::policy(stale.spec.pod_gc.as_ref(), stale.spec.ttl_strategy.as_ref(), &gc::Defaults::default()).unwrap();
        let out = collect(&stale, "uid-first", "ns", &policy, &[], &[], &writer(client.clone(), &stale), &m, now).await.unwrap();
        assert_eq!(out, Outcome::WorkflowDeleted, "refused by its precondition: done");
        let (method, path, body) = seen.lock().unwrap()[0].clone();
        assert_eq!((method.as_str(), path.as_str()), ("DELETE", "/apis/shoal.dev/v1alpha1/namespaces/ns/workflows/w"));
        assert_eq!(body["preconditions"]["uid"], "uid-first");
        assert_eq!(body["propagationPolicy"], "Background");
        assert_eq!(deleted(&m, "Workflow"), 0, "nothing was deleted");
        // The workflow itself: deleted and counted.
        let current = finished("uid-successor", json!({"ttlStrategy": {"secondsAfterCompletion": 60}}));
        let out = collect(&current, "uid-successor", "ns", &policy, &[], &[], &writer(client, &current), &m, now).await.unwrap();
        assert_eq!(out, Outcome::WorkflowDeleted);
        assert_eq!(deleted(&m, "Workflow"), 1);
    }

    #[tokio::test]
    async fn a_step_object_goes_with_its_uid_and_only_the_current_generations() {
        let now: Timestamp = "2026-01-01T00:00:20Z".parse().unwrap();
        let m = Metrics::new(&mut Registry::default());
        let (client, seen) = serving("job-uid").await;
        let wf = finished("wu", json!({"podGC": {"strategy": "OnWorkflowCompletion", "deleteDelayDuration": "5s"}}));
        let policy = gc::policy(wf.spec.pod_gc.as_ref(), None, &gc::Defaults::default()).unwrap();
        let job = |name: &str, generation: &str, deleting: bool| -> Arc<StepJob> {
            let mut meta = json!({"name": name, "namespace": "ns", "uid": "job-uid", "labels": {GENERATION_LABEL: generation, STEP_LABEL: "a", ATTEMPT_LABEL: "0"}});
            if deleting {
                meta["deletionTimestamp"] = json!("2026-01-01T00:00:15Z");
            }
            Arc::new(serde_json::from_value(json!({"metadata": meta})).unwrap())
        };
        let jobs = [job("w-a", "1", false), job("old", "0", false), job("going", "1", true)];
        let out = collect(&wf, "wu", "ns", &policy, &jobs, &[], &writer(client, &wf), &m, now).await.unwrap();
        assert_eq!(out, Outcome::Next(None));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one delete: not another generation's object, not one being deleted: {seen:?}");
        assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("DELETE", "/apis/batch/v1/namespaces/ns/jobs/w-a"));
        assert_eq!(seen[0].2["preconditions"]["uid"], "job-uid");
        assert_eq!(seen[0].2["propagationPolicy"], "Background", "its pod goes with it");
        assert_eq!(deleted(&m, "Job"), 1);
        // Before the delay: nothing yet, and when to look again.
        let early: Timestamp = "2026-01-01T00:00:12Z".parse().unwrap();
        let (client, seen) = serving("job-uid").await;
        let out = collect(&wf, "wu", "ns", &policy, &jobs, &[], &writer(client, &wf), &m, early).await.unwrap();
        assert_eq!(out, Outcome::Next(Some(Duration::from_secs(3))));
        assert!(seen.lock().unwrap().is_empty());
    }

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
