//! `executor: Pod` on the real control plane: what a step's Job gave, shoal gives itself.
//! A step attempt is one bare pod with the attempt's deterministic name, owned by its
//! workflow and never adopted otherwise; its timeout is the pod's own deadline; a pod that is
//! evicted, lost with its node or deleted by someone is a failed attempt that says why (and
//! uses a retry, since no Job replaces it); a pod that cannot start is reported and not timed
//! out; fail-fast deletes the pods of cancelled steps. No Job is ever created.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, PostParams, PropagationPolicy};
use kube::{Client, ResourceExt};
use serde_json::json;
use shoal::api::workflow::{StepPhase, Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::step_pods::{at, big_node, big_pods, cordon, delete_node, events, wait_step};
use crate::workflow::{T, setup_in, step, step_of, wait_phase, wait_phase_within, wf};

fn slow(name: &str, deps: &[&str], delay: &str) -> serde_json::Value {
    json!({"stepName": name, "image": "busybox", "dependsOn": deps, "metadata": {"annotations": {"kwok.shoal.dev/delay": delay}}})
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// The pods whose controller ownerReference is `uid`.
async fn pods_owned_by(client: &Client, ns: &str, uid: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default()).await.unwrap().items.into_iter().filter(|p| p.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == uid)).collect()
}

async fn no_jobs(client: &Client, ns: &str) {
    let jobs = Api::<Job>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    assert!(jobs.is_empty(), "no Job with the Pod executor: {:?}", jobs.iter().map(|j| j.name_any()).collect::<Vec<_>>());
}

/// The attempt's pod once it is running.
async fn running(client: &Client, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(T, &format!("pod {name} running"), || async { pods.get_opt(name).await.ok()?.filter(|p| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none()) }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_pod_belongs_to_one_workflow_uid_and_is_never_adopted() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-ident", "Pod").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    api.create(&PostParams::default(), &wf("etl", json!({"containers": [step("load-daily", &[])]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("etl-load", json!({"containers": [step("daily", &[])]}))).await.unwrap();
    for name in ["etl", "etl-load"] {
        let w = wait_phase(&api, name, WorkflowPhase::Completed).await;
        let owned = pods_owned_by(&client, &ns, &w.uid().unwrap()).await;
        assert_eq!(owned.len(), 1, "{name}: exactly one pod, its own");
        let st = &w.status.as_ref().unwrap().steps[0];
        assert_eq!(st.job_uid, owned[0].uid(), "{name}: the recorded pod is the one it owns");
        assert_eq!(st.job_name.as_deref(), Some(owned[0].name_any().as_str()));
    }

    // A name taken by a pod nobody owns fails the step; the pod is left alone.
    api.create(&PostParams::default(), &wf("squat", json!({"containers": [slow("a", &[], "4s"), step("b", &["a"])]}))).await.unwrap();
    let uid = eventually(T, "squat has a UID", || async { api.get("squat").await.ok()?.uid() }).await;
    let taken = shoal::core::plan::job_name("squat", &uid, 1, "b", 0);
    let squatter: Pod = serde_json::from_value(json!({
        "metadata": {"name": taken, "labels": {"squatter": "yes", "shoal.dev/executor": "pod", "shoal.dev/workflow-uid": uid}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    let squatter = pods.create(&PostParams::default(), &squatter).await.unwrap();
    let w = wait_phase(&api, "squat", WorkflowPhase::Failed).await;
    let b = step_of(&w, "b");
    assert_eq!(b.phase, StepPhase::Failed);
    let msg = b.message.unwrap_or_default();
    assert!(msg.contains("Pod name") && msg.contains("taken by an object this workflow does not own"), "{msg}");
    assert_ne!(b.job_uid, squatter.uid(), "the foreign pod was not adopted");
    let still = pods.get(&taken).await.unwrap();
    assert_eq!(still.uid(), squatter.uid(), "the foreign pod is left alone");
    assert!(still.owner_references().is_empty(), "and not taken over");

    // Orphaned by a deleted workflow and created again under the same name: the old pod is
    // not the new workflow's.
    api.create(&PostParams::default(), &wf("again", json!({"containers": [slow("a", &[], "120s")]}))).await.unwrap();
    let first = eventually(T, "the first incarnation's pod", || async { api.get("again").await.ok()?.status?.steps.first()?.job_uid.clone() }).await;
    api.delete("again", &DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..Default::default() }).await.unwrap();
    eventually(T, "the first incarnation gone", || async { api.get_opt("again").await.ok()?.is_none().then_some(()) }).await;
    api.create(&PostParams::default(), &wf("again", json!({"containers": [step("a", &[])]}))).await.unwrap();
    let w = wait_phase(&api, "again", WorkflowPhase::Completed).await;
    assert_ne!(step_of(&w, "a").job_uid.as_deref(), Some(first.as_str()), "the orphaned pod was adopted");
    assert_eq!(pods_owned_by(&client, &ns, &w.uid().unwrap()).await.len(), 1);
    no_jobs(&client, &ns).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_pod_fails_its_attempt_and_a_retry_runs_a_new_pod() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-evict", "Pod").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let step = json!({"stepName": "work", "image": "busybox", "retries": 1, "metadata": {"annotations": {"kwok.shoal.dev/delay": "20s"}}});
    api.create(&PostParams::default(), &wf("w", json!({"containers": [step]}))).await.unwrap();
    let first = wait_step(&api, "w", "work", "the first attempt's pod", T, |s| s.job_uid.is_some()).await.job_name.unwrap();
    running(&client, &ns, &first).await;
    Api::<Pod>::namespaced(client.clone(), &ns).evict(&first, &EvictParams::default()).await.unwrap();

    let retried = wait_step(&api, "w", "work", "the second attempt", T, |s| s.attempt == 1 && s.job_uid.is_some()).await;
    assert_ne!(retried.job_name.as_deref(), Some(first.as_str()), "a new pod for the new attempt");
    let ev = eventually(T, "a StepRetried Event", || async { events(&client, &ns, "w", "StepRetried").await.into_iter().next() }).await;
    let note = ev.note.unwrap_or_default();
    assert!(note.contains("disrupted") && note.contains("EvictionByEvictionAPI"), "{note}");
    // Finish the second attempt sooner than its 20 s: nothing to wait for.
    let done = wait_phase_within(&api, "w", WorkflowPhase::Completed, Duration::from_secs(120)).await;
    let s = step_of(&done, "work");
    assert_eq!((s.phase, s.attempt), (StepPhase::Succeeded, 1), "the eviction used the retry");
    no_jobs(&client, &ns).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_deleted_by_someone_fails_its_step_saying_so() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-deleted", "Pod").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &wf("w", json!({"containers": [slow("work", &[], "60s")]}))).await.unwrap();
    let pod = wait_step(&api, "w", "work", "the pod", T, |s| s.job_uid.is_some()).await.job_name.unwrap();
    running(&client, &ns, &pod).await;
    Api::<Pod>::namespaced(client.clone(), &ns).delete(&pod, &DeleteParams::default()).await.unwrap();
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, T).await;
    let s = step_of(&failed, "work");
    assert_eq!((s.phase, s.attempt), (StepPhase::Failed, 0));
    let m = s.message.unwrap_or_default();
    assert!(m.contains("its pod was deleted"), "{m}");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_lost_with_its_node_fails_its_attempt_and_is_retried() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-node", "Pod").await;
    big_pods(&client, &ns).await;
    let (a, b) = (format!("{ns}-a"), format!("{ns}-b"));
    big_node(&client, &a, 1).await;
    big_node(&client, &b, 1).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let step = json!({"stepName": "work", "image": "busybox", "retries": 1, "timeoutSeconds": -1, "metadata": {"annotations": {"kwok.shoal.dev/delay": at(120)}}});
    api.create(&PostParams::default(), &wf("w", json!({"containers": [step]}))).await.unwrap();
    let first = wait_step(&api, "w", "work", "the first pod", T, |s| s.job_uid.is_some()).await.job_name.unwrap();
    cordon(&client, &a, false).await;
    let p = running(&client, &ns, &first).await;
    cordon(&client, &a, true).await;
    assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some(a.as_str()));

    // Pod GC fails the orphaned pod (DisruptionTarget, DeletionByPodGC) and deletes it, about
    // 40 s after the node went: a failed attempt.
    delete_node(&client, &a).await;
    let second = wait_step(&api, "w", "work", "the second attempt", Duration::from_secs(150), |s| s.attempt == 1 && s.job_uid.is_some()).await.job_name.unwrap();
    let ev = eventually(T, "a StepRetried Event", || async { events(&client, &ns, "w", "StepRetried").await.into_iter().next() }).await;
    let note = ev.note.unwrap_or_default();
    assert!(note.contains("disrupted") || note.contains("deleted"), "{note}");
    cordon(&client, &b, false).await;
    let p = running(&client, &ns, &second).await;
    cordon(&client, &b, true).await;
    assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some(b.as_str()));
    let done = wait_phase_within(&api, "w", WorkflowPhase::Completed, Duration::from_secs(180)).await;
    assert_eq!(step_of(&done, "work").attempt, 1);
    delete_node(&client, &b).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_cannot_start_is_reported_and_not_timed_out() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-pending", "Pod").await;
    big_pods(&client, &ns).await;
    let node = format!("{ns}-c");
    big_node(&client, &node, 1).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let step = json!({"stepName": "work", "image": "busybox", "timeoutSeconds": 3, "metadata": {"annotations": {"kwok.shoal.dev/delay": "1s"}}});
    api.create(&PostParams::default(), &wf("short", json!({"containers": [step]}))).await.unwrap();
    let s = wait_step(&api, "short", "work", "cannot start", T, |s| s.message.as_deref().is_some_and(|m| m.starts_with("pod cannot start"))).await;
    let m = s.message.clone().unwrap();
    assert!(m.starts_with("pod cannot start: Unschedulable: 0/") && m.contains("Insufficient cpu"), "{m}");
    assert_eq!((s.phase, s.attempt), (StepPhase::Running, 0));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(step_of(&api.get("short").await.unwrap(), "work").phase, StepPhase::Running, "held past its 3 s timeout, not timed out");
    assert_eq!(events(&client, &ns, "short", "StepCannotStart").await.len(), 1, "one Warning Event");
    cordon(&client, &node, false).await;
    let done = wait_phase_within(&api, "short", WorkflowPhase::Completed, T).await;
    let s = step_of(&done, "work");
    assert_eq!((s.phase, s.attempt, s.message), (StepPhase::Succeeded, 0, None), "the note is cleared once it runs");
    cordon(&client, &node, true).await;
    delete_node(&client, &node).await;
    no_jobs(&client, &ns).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pods_own_deadline_times_it_out_and_failures_say_why() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-deadline", "Pod").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf("w", json!({"containers": [{"stepName": "sleepy", "image": "busybox", "timeoutSeconds": 3, "metadata": {"annotations": {"kwok.shoal.dev/delay": "60s"}}}]})),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &wf("bad", json!({"containers": [{"stepName": "bad", "image": "busybox", "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}, "annotations": {"kwok.shoal.dev/termination-message": "no such table: rows\n"}}}]})),
    )
    .await
    .unwrap();
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, T).await;
    let s = step_of(&failed, "sleepy");
    assert_eq!(s.message.as_deref(), Some("attempt 0 timed out"));
    let pod = Api::<Pod>::namespaced(client.clone(), &ns).get(&s.job_name.unwrap()).await.unwrap();
    assert_eq!(pod.spec.as_ref().unwrap().active_deadline_seconds, Some(3));
    let st = pod.status.unwrap();
    assert_eq!((st.phase.as_deref(), st.reason.as_deref()), (Some("Failed"), Some("DeadlineExceeded")), "the pod's own deadline stopped it");
    eventually(T, "a StepTimedOut Event", || async { (!events(&client, &ns, "w", "StepTimedOut").await.is_empty()).then_some(()) }).await;

    let bad = wait_phase_within(&api, "bad", WorkflowPhase::Failed, T).await;
    let s = step_of(&bad, "bad");
    assert_eq!(s.message.as_deref(), Some("attempt 0 failed: container main exited with code 3 (Error): no such table: rows"));
    assert_eq!(s.output, None);
    no_jobs(&client, &ns).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_fast_deletes_the_pods_of_cancelled_steps() {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "bp-cancel", "Pod").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let bad = json!({"stepName": "bad", "image": "busybox", "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}, "annotations": {"kwok.shoal.dev/delay": "1s"}}});
    api.create(&PostParams::default(), &wf("ff", json!({"containers": [bad, slow("long", &[], "300s"), step("after", &["long"])]}))).await.unwrap();
    let w = wait_phase(&api, "ff", WorkflowPhase::Failed).await;
    let long = step_of(&w, "long");
    assert_eq!(long.phase, StepPhase::Cancelled, "{long:?}");
    let pod = long.job_name.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually(T, "the cancelled step's pod deleted", || async { pods.get_opt(&pod).await.ok()?.is_none_or(|p| p.metadata.deletion_timestamp.is_some()).then_some(()) }).await;
    common::cleanup(&client, &ns).await;
}
