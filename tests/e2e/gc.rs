//! Garbage collection of workflows against the real control plane, with kwok pods: `podGC`
//! (step Jobs, or bare pods with the `Pod` executor), its delay, `ttlStrategy`, and the
//! operator-wide defaults. Each test runs once with each executor.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal::api::workflow::{StepPhase, StepStatus, Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::operator::Operator;
use crate::workflow::{T, attempts, attempts_of, setup_in, step, step_of, wait_phase, wf};

/// A step that succeeds after `delay`.
fn timed(name: &str, deps: &[&str], delay: &str) -> Value {
    json!({"stepName": name, "image": "busybox", "dependsOn": deps, "metadata": {"annotations": {"kwok.shoal.dev/delay": delay}}})
}

/// A step that fails (exit code 3).
fn failing(name: &str, deps: &[&str]) -> Value {
    json!({"stepName": name, "image": "busybox", "dependsOn": deps, "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}}})
}

/// Every pod of workflow `name` (a Job's pods, or the bare pods), whatever their state.
async fn pods_of(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default().labels(&format!("shoal.dev/workflow={name}"))).await.unwrap().items.iter().map(|p| p.name_any()).collect()
}

/// The step objects of one attempt of one step of workflow `name`.
async fn attempt_objects(client: &Client, ns: &str, name: &str, step: &str, attempt: i32, exec: &str) -> Vec<String> {
    let lp = ListParams::default().labels(&format!("shoal.dev/workflow={name},shoal.dev/step={step},shoal.dev/attempt={attempt}"));
    attempts(client, ns, &lp, exec).await.into_iter().map(|a| a.0).collect()
}

/// The status of step `s` of `w`, once it has one.
fn step_in(w: &Workflow, s: &str) -> Option<StepStatus> {
    w.status.as_ref()?.steps.iter().find(|x| x.step_name == s).cloned()
}

/// When `w` finished (`status.statusChanged`).
fn finished_at(w: &Workflow) -> Timestamp {
    w.status.as_ref().unwrap().status_changed.clone().unwrap().0
}

fn since(t: Timestamp) -> f64 {
    Timestamp::now().duration_since(t).as_secs_f64()
}

/// Sleep until `secs` after `t`.
async fn until(t: Timestamp, secs: f64) {
    let left = secs - since(t);
    if left > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(left)).await;
    }
}

async fn deletions(op: &Operator, kind: &str) -> f64 {
    op.metric_sum(&format!("shoal_gc_deletions_total{{kind=\"{kind}\"}}")).await
}

/// OnWorkflowSuccess deletes every step object of a workflow that completed (its outputs stay
/// in status) and keeps every one of a workflow that failed.
async fn on_workflow_success_keeps_a_failed_workflows_objects(exec: &'static str) {
    let client = common::client().await;
    let (ns, op) = setup_in(&client, "gc-wfsuccess", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let gc = json!({"strategy": "OnWorkflowSuccess"});
    let produce = json!({"stepName": "produce", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/termination-message": "42"}}});
    api.create(&PostParams::default(), &wf("ok", json!({"podGC": gc, "containers": [produce, step("b", &["produce"])]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("bad", json!({"podGC": gc, "failFast": false, "containers": [step("a", &[]), failing("b", &["a"])]}))).await.unwrap();

    wait_phase(&api, "ok", WorkflowPhase::Completed).await;
    let bad = wait_phase(&api, "bad", WorkflowPhase::Failed).await;
    eventually(T, "the completed workflow's step objects deleted", || async { attempts_of(&client, &ns, "ok", exec).await.is_empty().then_some(()) }).await;
    eventually(T, "the completed workflow's pods gone", || async { pods_of(&client, &ns, "ok").await.is_empty().then_some(()) }).await;
    let ok = api.get("ok").await.unwrap();
    assert_eq!(step_of(&ok, "produce").output.as_deref(), Some("42"), "the output outlives its pod");
    assert_eq!(ok.status.as_ref().unwrap().executed_steps.len(), 2);
    // The failed one was looked at after it finished (its own status write wakes it), and
    // kept: give it a few seconds more than the completed one needed.
    until(finished_at(&bad).max(finished_at(&ok)), 3.0).await;
    assert_eq!(attempts_of(&client, &ns, "bad", exec).await.len(), 2, "a failed workflow keeps its step objects for inspection");
    assert_eq!(pods_of(&client, &ns, "bad").await.len(), 2);
    assert!(deletions(&op, exec).await >= 2.0, "shoal_gc_deletions_total{{kind={exec}}}");
    assert!(api.get_opt("ok").await.unwrap().is_some(), "podGC deletes step objects, not the workflow");
    drop(op);
    common::cleanup(&client, &ns).await;
}

/// OnPodCompletion deletes each step attempt's object once its result is recorded, while the
/// workflow still runs (a failed attempt that is retried too, never a running one); outputs
/// still reach the steps downstream and stay in status. OnPodSuccess keeps a failed step's.
async fn on_pod_completion_collects_while_the_workflow_runs(exec: &'static str) {
    let client = common::client().await;
    let (ns, op) = setup_in(&client, "gc-podcompl", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let spec = json!({"podGC": {"strategy": "OnPodCompletion"}, "containers": [
        {"stepName": "produce", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/termination-message": "42"}}},
        {"stepName": "flaky", "image": "busybox", "dependsOn": ["produce"], "retries": 1,
            "metadata": {"annotations": {"kwok.shoal.dev/fail-attempts": "1", "kwok.shoal.dev/delay": "4s"}}},
        timed("consume", &["flaky"], "4s"),
    ]});
    api.create(&PostParams::default(), &wf("pipe", spec)).await.unwrap();
    api.create(&PostParams::default(), &wf("keep", json!({"podGC": {"strategy": "OnPodSuccess"}, "containers": [step("ok", &[]), failing("bad", &["ok"])]}))).await.unwrap();

    // While flaky's second attempt runs: produce's object and flaky's failed first attempt's
    // are gone, the running attempt's is there.
    eventually(T, "produce's and flaky's first attempt's objects deleted while flaky retries", || async {
        let w = api.get("pipe").await.ok()?;
        let flaky = step_in(&w, "flaky")?;
        if (flaky.phase, flaky.attempt) != (StepPhase::Running, 1) {
            return None;
        }
        let produce = attempt_objects(&client, &ns, "pipe", "produce", 0, exec).await;
        let first = attempt_objects(&client, &ns, "pipe", "flaky", 0, exec).await;
        (produce.is_empty() && first.is_empty()).then_some(())
    })
    .await;
    let w = api.get("pipe").await.unwrap();
    assert_eq!(w.status.as_ref().unwrap().workflow_status, Some(WorkflowPhase::Started));
    assert_eq!(attempt_objects(&client, &ns, "pipe", "flaky", 1, exec).await.len(), 1, "a running attempt's object stays");

    // flaky's second attempt was created after produce's object was deleted, and still got
    // produce's output: it comes from status.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let env = eventually(T, "flaky's second attempt's pod", || async {
        let p = pods.list(&ListParams::default().labels("shoal.dev/workflow=pipe,shoal.dev/step=flaky,shoal.dev/attempt=1")).await.ok()?.items.into_iter().next()?;
        p.spec?.containers[0].env.clone()
    })
    .await;
    assert!(env.iter().any(|e| e.name == "SHOAL_OUTPUT_PRODUCE" && e.value.as_deref() == Some("42")), "{env:?}");

    let done = wait_phase(&api, "pipe", WorkflowPhase::Completed).await;
    assert_eq!(step_of(&done, "produce").output.as_deref(), Some("42"), "outputs stay in status");
    eventually(T, "every step object of pipe deleted", || async { attempts_of(&client, &ns, "pipe", exec).await.is_empty().then_some(()) }).await;
    eventually(T, "every pod of pipe gone", || async { pods_of(&client, &ns, "pipe").await.is_empty().then_some(()) }).await;

    // OnPodSuccess: the succeeded step's object goes, the failed one's stays.
    let keep = wait_phase(&api, "keep", WorkflowPhase::Failed).await;
    eventually(T, "the succeeded step's object deleted", || async { attempt_objects(&client, &ns, "keep", "ok", 0, exec).await.is_empty().then_some(()) }).await;
    until(finished_at(&keep), 2.0).await;
    assert_eq!(attempt_objects(&client, &ns, "keep", "bad", 0, exec).await.len(), 1, "OnPodSuccess keeps a failed attempt's object");
    // pipe: produce, flaky 0, flaky 1, consume; keep: ok.
    assert!(deletions(&op, exec).await >= 5.0);
    drop(op);
    common::cleanup(&client, &ns).await;
}

/// deleteDelayDuration holds deletion off: from the workflow's end with OnWorkflowCompletion,
/// from the attempt's end with OnPodCompletion.
async fn delete_delay_holds_collection_off(exec: &'static str) {
    let client = common::client().await;
    let (ns, op) = setup_in(&client, "gc-delay", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &wf("late", json!({"podGC": {"strategy": "OnWorkflowCompletion", "deleteDelayDuration": "6s"}, "containers": [step("a", &[])]}))).await.unwrap();

    let late = wait_phase(&api, "late", WorkflowPhase::Completed).await;
    let end = finished_at(&late);
    until(end, 3.0).await;
    assert_eq!(attempts_of(&client, &ns, "late", exec).await.len(), 1, "deleted before its delay");
    eventually(T, "late's step object deleted after the delay", || async { attempts_of(&client, &ns, "late", exec).await.is_empty().then_some(()) }).await;
    let waited = since(end);
    assert!((6.0..16.0).contains(&waited), "deleted {waited:.1}s after the workflow finished, delay 6s");

    // stepwise: a's object goes 4 s after a finished, while b still runs.
    api.create(&PostParams::default(), &wf("stepwise", json!({"podGC": {"strategy": "OnPodCompletion", "deleteDelayDuration": "4s"}, "containers": [step("a", &[]), timed("b", &["a"], "15s")]})))
        .await
        .unwrap();
    let a_end = eventually(T, "stepwise's a finished", || async {
        let w = api.get("stepwise").await.ok()?;
        Some(step_in(&w, "a")?.finished_at?.0)
    })
    .await;
    until(a_end, 2.0).await;
    assert_eq!(attempt_objects(&client, &ns, "stepwise", "a", 0, exec).await.len(), 1, "deleted before its delay");
    eventually(T, "a's object deleted after the delay", || async { attempt_objects(&client, &ns, "stepwise", "a", 0, exec).await.is_empty().then_some(()) }).await;
    let waited = since(a_end);
    assert!((4.0..14.0).contains(&waited), "deleted {waited:.1}s after the step finished, delay 4s");
    assert_eq!(api.get("stepwise").await.unwrap().status.unwrap().workflow_status, Some(WorkflowPhase::Started));
    assert_eq!(attempt_objects(&client, &ns, "stepwise", "b", 0, exec).await.len(), 1);
    drop(op);
    common::cleanup(&client, &ns).await;
}

/// ttlStrategy deletes the workflow (its step objects go with it) that long after it finished,
/// by outcome; a workflow deleted and created again under the same name is another workflow,
/// which the first one's TTL never touches, even when the operator acts on a stale copy of
/// the first (it is stopped while the name changes hands, so its cache and timers lag).
async fn ttl_deletes_the_workflow_and_not_its_successor(exec: &'static str) {
    let client = common::client().await;
    let (ns, op) = setup_in(&client, "gc-ttl", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let ttl = json!({"secondsAfterSuccess": 3, "secondsAfterFailure": 600});
    api.create(&PostParams::default(), &wf("short", json!({"ttlStrategy": ttl, "containers": [step("a", &[]), step("b", &["a"])]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("failed", json!({"ttlStrategy": ttl, "containers": [failing("a", &[])]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("failed-short", json!({"ttlStrategy": {"secondsAfterCompletion": 2}, "containers": [failing("a", &[])]}))).await.unwrap();

    let short = wait_phase(&api, "short", WorkflowPhase::Completed).await;
    let end = finished_at(&short);
    eventually(T, "short deleted by its TTL", || async { api.get_opt("short").await.ok()?.is_none().then_some(()) }).await;
    let waited = since(end);
    assert!((3.0..13.0).contains(&waited), "deleted {waited:.1}s after it finished, TTL 3s");
    eventually(T, "short's step objects gone with it", || async { (attempts_of(&client, &ns, "short", exec).await.is_empty() && pods_of(&client, &ns, "short").await.is_empty()).then_some(()) }).await;
    eventually(T, "failed-short deleted (secondsAfterCompletion)", || async { api.get_opt("failed-short").await.ok()?.is_none().then_some(()) }).await;
    assert!(api.get_opt("failed").await.unwrap().is_some(), "secondsAfterFailure: 600 keeps a failed workflow");
    assert!(deletions(&op, "Workflow").await >= 2.0);

    // The name changes hands while the operator is stopped: when it resumes, its cache still
    // holds the first workflow (finished, its TTL run out) and its timer for it fires.
    api.create(&PostParams::default(), &wf("reused", json!({"ttlStrategy": {"secondsAfterCompletion": 3}, "containers": [step("a", &[])]}))).await.unwrap();
    let first = wait_phase(&api, "reused", WorkflowPhase::Completed).await;
    let pid = nix::unistd::Pid::from_raw(op.pid("r1"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resume = Resume(pid);
    api.delete("reused", &DeleteParams::background()).await.unwrap();
    eventually(T, "the first reused gone", || async { api.get_opt("reused").await.ok()?.is_none().then_some(()) }).await;
    let second = api.create(&PostParams::default(), &wf("reused", json!({"containers": [timed("a", &[], "60s")]}))).await.unwrap();
    until(finished_at(&first), 4.0).await;
    drop(resume);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = api.get_opt("reused").await.unwrap().expect("the second reused was deleted by the first one's TTL");
    assert_eq!(now.uid(), second.uid());
    drop(op);
    common::cleanup(&client, &ns).await;
}

/// SIGCONT on drop, so a failing test never leaves the replica stopped.
struct Resume(nix::unistd::Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The operator's defaults (here from SHOAL_POD_GC_STRATEGY and
/// SHOAL_WORKFLOW_TTL_AFTER_FAILURE, as the chart sets them) apply to the fields a workflow
/// leaves unset, and a workflow's own fields win.
async fn operator_defaults_apply_when_the_spec_says_nothing(exec: &'static str) {
    let client = common::client().await;
    let ops = common::namespace(&client, "gc-defaults-ops").await;
    let ns = common::namespace(&client, "gc-defaults").await;
    let mut op = Operator::new(&ops, &ns);
    op.extra_args = vec!["--default-executor".into(), exec.into()];
    op.start_with("r1", "r1", &[("SHOAL_POD_GC_STRATEGY", "OnWorkflowCompletion"), ("SHOAL_WORKFLOW_TTL_AFTER_FAILURE", "3s")]);
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    api.create(&pp, &wf("plain", json!({"containers": [step("a", &[]), step("b", &["a"])]}))).await.unwrap();
    api.create(&pp, &wf("optout", json!({"podGC": {"strategy": "Never"}, "containers": [step("a", &[])]}))).await.unwrap();
    api.create(&pp, &wf("fails", json!({"containers": [failing("a", &[])]}))).await.unwrap();
    api.create(&pp, &wf("stays", json!({"ttlStrategy": {"secondsAfterFailure": 3600}, "podGC": {"strategy": "OnWorkflowSuccess"}, "containers": [failing("a", &[])]}))).await.unwrap();

    wait_phase(&api, "plain", WorkflowPhase::Completed).await;
    eventually(T, "plain's step objects deleted by the default strategy", || async { attempts_of(&client, &ns, "plain", exec).await.is_empty().then_some(()) }).await;
    let fails = wait_phase(&api, "fails", WorkflowPhase::Failed).await;
    eventually(T, "fails deleted by the default TTL", || async { api.get_opt("fails").await.ok()?.is_none().then_some(()) }).await;
    assert!(since(finished_at(&fails)) >= 3.0);
    let stays = wait_phase(&api, "stays", WorkflowPhase::Failed).await;
    let optout = wait_phase(&api, "optout", WorkflowPhase::Completed).await;
    until(finished_at(&stays).max(finished_at(&optout)), 4.0).await;
    assert!(api.get_opt("stays").await.unwrap().is_some(), "its own secondsAfterFailure wins");
    assert_eq!(attempts_of(&client, &ns, "stays", exec).await.len(), 1, "its own OnWorkflowSuccess keeps a failed workflow's objects");
    assert_eq!(attempts_of(&client, &ns, "optout", exec).await.len(), 1, "strategy Never opts out of the default");
    assert!(api.get_opt("plain").await.unwrap().is_some(), "no TTL for a success by default");
    drop(op);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

// Every test above, once with each executor (`gc::job::*`, `gc::pod::*`).
in_both_executors!(
    on_workflow_success_keeps_a_failed_workflows_objects,
    on_pod_completion_collects_while_the_workflow_runs,
    delete_delay_holds_collection_off,
    ttl_deletes_the_workflow_and_not_its_successor,
    operator_defaults_apply_when_the_spec_says_nothing,
);
