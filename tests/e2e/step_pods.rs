//! A step's pod on the real control plane: disrupted pods (the Eviction API, a deleted node)
//! are replaced without using a retry, up to a bound; the step's timeout counts from its pod's
//! start, so a pod that cannot start is reported as such and not timed out; a pod that runs
//! too long times out from the pod's own deadline; outputs come only from the Job's own pod
//! and stay within the workflow's budget.
//!
//! Pods that must go to a particular node get a LimitRange in their namespace that makes
//! them request 100 CPUs: only the nodes these tests add (128 CPUs, one pod each) fit them.
//! Those nodes stay cordoned except while one of our pods waits for them, so other tests'
//! pods do not land there.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{LimitRange, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal::api::workflow::{StepPhase, StepStatus, Workflow, WorkflowPhase};
use shoal::controllers::step_pod::{MAX_DISRUPTIONS, OUTPUT_BUDGET_BYTES};

use crate::common::{self, eventually};
use crate::workflow::{T, setup, step_of, wait_phase_within, wf};

/// The step's status once `pred` holds for it.
pub(crate) async fn wait_step(api: &Api<Workflow>, name: &str, step: &str, what: &str, timeout: Duration, pred: impl Fn(&StepStatus) -> bool) -> StepStatus {
    eventually(timeout, what, || async {
        let w = api.get(name).await.ok()?;
        let s = w.status.as_ref()?.steps.iter().find(|s| s.step_name == step)?.clone();
        pred(&s).then_some(s)
    })
    .await
}

/// The pods of the step's Job that are not finished and not being deleted.
async fn live_pods(client: &Client, ns: &str, job: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let l = pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"))).await.unwrap();
    l.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none() && !matches!(phase(p), "Succeeded" | "Failed")).collect()
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// The running pod of the step's Job, once there is one other than `not`.
async fn running_pod(client: &Client, ns: &str, job: &str, not: &[String], timeout: Duration) -> Pod {
    eventually(timeout, &format!("a running pod of {job} other than {not:?}"), || async {
        live_pods(client, ns, job).await.into_iter().find(|p| phase(p) == "Running" && !not.contains(&p.name_any()))
    })
    .await
}

async fn job(client: &Client, ns: &str, name: &str) -> Job {
    Api::<Job>::namespaced(client.clone(), ns).get(name).await.unwrap()
}

/// An RFC 3339 time `secs` from now: a kwok delay that every pod of a Job shares, so a
/// replacement pod finishes when the first one would have.
pub(crate) fn at(secs: i64) -> String {
    (Timestamp::now() + SignedDuration::from_secs(secs)).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Make every pod created in `ns` request (and be limited to) 100 CPUs, more than a shared
/// kwok node has.
pub(crate) async fn big_pods(client: &Client, ns: &str) {
    let lr: LimitRange = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"limits": [{"type": "Container", "default": {"cpu": "100"}, "defaultRequest": {"cpu": "100"}}]},
    }))
    .unwrap();
    Api::<LimitRange>::namespaced(client.clone(), ns).create(&PostParams::default(), &lr).await.unwrap();
}

/// A kwok node with room for `pods` of our big pods, cordoned, once it is Ready.
pub(crate) async fn big_node(client: &Client, name: &str, pods: u32) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {shoal::dev::NODE_LABEL.0: shoal::dev::NODE_LABEL.1, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "shoal.dev/test-node": "true"},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"unschedulable": true},
        "status": {
            "allocatable": {"cpu": (128 * pods).to_string(), "memory": "256Gi", "pods": pods.to_string()},
            "capacity": {"cpu": (128 * pods).to_string(), "memory": "256Gi", "pods": pods.to_string()},
        },
    }))
    .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &node).await.unwrap();
    eventually(T, &format!("node {name} Ready"), || async {
        let n = nodes.get(name).await.ok()?;
        n.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
}

pub(crate) async fn cordon(client: &Client, name: &str, on: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"unschedulable": on}}))).await.unwrap();
}

pub(crate) async fn delete_node(client: &Client, name: &str) {
    let _ = Api::<Node>::all(client.clone()).delete(name, &DeleteParams::default()).await;
}

/// Events with `reason` about workflow `name`.
pub(crate) async fn events(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    let l = Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    l.items.into_iter().filter(|e| e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_pod_is_replaced_without_using_a_retry() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-evict").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "w",
            json!({"containers": [
                {"stepName": "work", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": at(40)}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    let st = wait_step(&api, "w", "work", "the step's Job", T, |s| s.job_uid.is_some()).await;
    let jn = st.job_name.unwrap();

    let first = running_pod(&client, &ns, &jn, &[], T).await;
    Api::<Pod>::namespaced(client.clone(), &ns).evict(&first.name_any(), &EvictParams::default()).await.unwrap();

    let noted = wait_step(&api, "w", "work", "the replacement noted", T, |s| s.message.as_deref().is_some_and(|m| m.contains("disrupted pod(s) replaced"))).await;
    assert_eq!(noted.phase, StepPhase::Running);
    let second = running_pod(&client, &ns, &jn, &[first.name_any()], T).await;
    assert_ne!(second.name_any(), first.name_any());

    let done = wait_phase_within(&api, "w", WorkflowPhase::Completed, T).await;
    let s = step_of(&done, "work");
    assert_eq!(s.phase, StepPhase::Succeeded);
    assert_eq!(s.attempt, 0, "the eviction used no retry");
    assert_eq!(s.job_name.as_deref(), Some(jn.as_str()), "the same Job ran the step to the end");
    assert_eq!(job(&client, &ns, &jn).await.status.unwrap().failed, Some(1), "the Job counted one disrupted pod");
    // The step's timeout is on the pod, not on the Job.
    let j = job(&client, &ns, &jn).await;
    let spec = j.spec.as_ref().unwrap();
    assert_eq!(spec.active_deadline_seconds, None);
    assert_eq!(spec.template.spec.as_ref().unwrap().active_deadline_seconds, Some(60));
    assert_eq!(spec.backoff_limit, Some(MAX_DISRUPTIONS));
    assert!(spec.pod_failure_policy.is_some());

    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_whose_pod_is_disrupted_too_often_fails_saying_so() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-evict-bound").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "w",
            json!({"containers": [
                {"stepName": "work", "image": "busybox", "timeoutSeconds": -1, "metadata": {"annotations": {"kwok.shoal.dev/delay": "10m"}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    let jn = wait_step(&api, "w", "work", "the step's Job", T, |s| s.job_uid.is_some()).await.job_name.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut evicted: Vec<String> = vec![];
    // The Job controller waits 10 s, 20 s, 40 s before each replacement.
    for _ in 0..=MAX_DISRUPTIONS {
        let p = running_pod(&client, &ns, &jn, &evicted, Duration::from_secs(120)).await;
        pods.evict(&p.name_any(), &EvictParams::default()).await.unwrap();
        evicted.push(p.name_any());
    }
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, T).await;
    let s = step_of(&failed, "work");
    assert_eq!(s.phase, StepPhase::Failed);
    assert_eq!(s.attempt, 0);
    let m = s.message.unwrap_or_default();
    assert!(m.contains("disrupted") && m.contains(&format!("{} times", MAX_DISRUPTIONS + 1)), "{m}");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_lost_with_its_node_is_replaced_without_using_a_retry() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-node").await;
    big_pods(&client, &ns).await;
    let (a, b) = (format!("{ns}-a"), format!("{ns}-b"));
    big_node(&client, &a, 1).await;
    big_node(&client, &b, 1).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "w",
            json!({"containers": [
                {"stepName": "work", "image": "busybox", "timeoutSeconds": -1, "metadata": {"annotations": {"kwok.shoal.dev/delay": at(120)}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    let jn = wait_step(&api, "w", "work", "the step's Job", T, |s| s.job_uid.is_some()).await.job_name.unwrap();
    eventually(T, "a pending pod", || async { (!live_pods(&client, &ns, &jn).await.is_empty()).then_some(()) }).await;
    cordon(&client, &a, false).await;
    let first = running_pod(&client, &ns, &jn, &[], T).await;
    assert_eq!(first.spec.as_ref().unwrap().node_name.as_deref(), Some(a.as_str()));

    delete_node(&client, &a).await;
    // Pod GC marks the pod Failed with DisruptionTarget (DeletionByPodGC); the Job replaces it.
    eventually(T, "a replacement pod", || async { live_pods(&client, &ns, &jn).await.into_iter().find(|p| p.name_any() != first.name_any()).map(|_| ()) }).await;
    cordon(&client, &b, false).await;
    let second = running_pod(&client, &ns, &jn, &[first.name_any()], T).await;
    cordon(&client, &b, true).await;
    assert_eq!(second.spec.as_ref().unwrap().node_name.as_deref(), Some(b.as_str()));

    let done = wait_phase_within(&api, "w", WorkflowPhase::Completed, Duration::from_secs(180)).await;
    let s = step_of(&done, "work");
    assert_eq!((s.phase, s.attempt), (StepPhase::Succeeded, 0), "the lost pod used no retry");
    assert_eq!(job(&client, &ns, &jn).await.status.unwrap().failed, Some(1), "the Job counted one disrupted pod");
    delete_node(&client, &b).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_cannot_start_is_reported_and_not_timed_out() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-pending").await;
    big_pods(&client, &ns).await;
    let node = format!("{ns}-c");
    big_node(&client, &node, 2).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let step = |timeout: i64| json!({"stepName": "work", "image": "busybox", "timeoutSeconds": timeout, "metadata": {"annotations": {"kwok.shoal.dev/delay": "1s"}}});
    api.create(&PostParams::default(), &wf("short", json!({"containers": [step(3)]}))).await.unwrap();
    api.create(
        &PostParams::default(),
        &wf("unlimited", json!({"maxStepTimeout": -1, "containers": [{"stepName": "work", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": "1s"}}}]})),
    )
    .await
    .unwrap();

    for name in ["short", "unlimited"] {
        let s = wait_step(&api, name, "work", &format!("{name}: cannot start"), T, |s| s.message.as_deref().is_some_and(|m| m.starts_with("pod cannot start"))).await;
        let m = s.message.clone().unwrap();
        assert!(m.starts_with("pod cannot start: Unschedulable: 0/") && m.contains("Insufficient cpu"), "{m}");
        assert_eq!((s.phase, s.attempt), (StepPhase::Running, 0));
    }
    // Held far past its 3 s timeout, still not timed out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let short = api.get("short").await.unwrap();
    assert_eq!(step_of(&short, "work").phase, StepPhase::Running);
    assert_eq!(events(&client, &ns, "short", "StepCannotStart").await.len(), 1, "one Warning Event");
    assert!(events(&client, &ns, "short", "StepTimedOut").await.is_empty());

    // Once it can start, its timeout counts from its own start, and it finishes in time.
    cordon(&client, &node, false).await;
    for name in ["short", "unlimited"] {
        let done = wait_phase_within(&api, name, WorkflowPhase::Completed, T).await;
        let s = step_of(&done, "work");
        assert_eq!((s.phase, s.attempt, s.message), (StepPhase::Succeeded, 0, None));
    }
    cordon(&client, &node, true).await;
    delete_node(&client, &node).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_running_past_its_timeout_times_out() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-deadline").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "w",
            json!({"containers": [
                {"stepName": "sleepy", "image": "busybox", "timeoutSeconds": 3, "metadata": {"annotations": {"kwok.shoal.dev/delay": "60s"}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, T).await;
    let s = step_of(&failed, "sleepy");
    assert_eq!(s.message.as_deref(), Some("attempt 0 timed out"));
    let jn = s.job_name.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={jn}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("the step's pod is kept: its own deadline stopped it, the Job did not delete it");
    let st = pod.status.unwrap();
    assert_eq!((st.phase.as_deref(), st.reason.as_deref()), (Some("Failed"), Some("DeadlineExceeded")), "the pod's own deadline stopped it");
    assert_eq!(job(&client, &ns, &jn).await.spec.unwrap().active_deadline_seconds, None, "no deadline on the Job");
    eventually(T, "a StepTimedOut Event", || async { (!events(&client, &ns, "w", "StepTimedOut").await.is_empty()).then_some(()) }).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_come_only_from_the_jobs_own_pod() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-output").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "w",
            json!({"containers": [
                {"stepName": "produce", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": "8s", "kwok.shoal.dev/termination-message": "real"}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    let st = wait_step(&api, "w", "produce", "the step's Job", T, |s| s.job_uid.is_some()).await;
    let jn = st.job_name.unwrap();
    running_pod(&client, &ns, &jn, &[], T).await;
    // Pods labelled with the Job's name (not its selector, so the Job controller does not
    // adopt them) that are not the Job's, newer than its pod and first and last by name,
    // finish first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for name in ["aaa-impostor", "zzz-impostor"] {
        let impostor: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": jn, "job-name": jn},
                "annotations": {"kwok.shoal.dev/termination-message": "forged"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]},
        }))
        .unwrap();
        Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &impostor).await.unwrap();
    }
    let done = wait_phase_within(&api, "w", WorkflowPhase::Completed, T).await;
    assert_eq!(step_of(&done, "produce").output.as_deref(), Some("real"));
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_beyond_the_workflows_budget_fail_the_step() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-budget").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let full = "x".repeat(4096);
    let n = OUTPUT_BUDGET_BYTES / 4096 + 1;
    let steps: Vec<Value> = (0..n).map(|i| json!({"stepName": format!("s{i}"), "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/termination-message": full}}})).collect();
    api.create(&PostParams::default(), &wf("w", json!({"failFast": false, "containers": steps}))).await.unwrap();
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, Duration::from_secs(180)).await;
    let st = failed.status.unwrap();
    let bad: Vec<&StepStatus> = st.steps.iter().filter(|s| s.phase == StepPhase::Failed).collect();
    assert_eq!(bad.len(), 1, "exactly one output did not fit");
    let m = bad[0].message.clone().unwrap_or_default();
    assert!(m.contains("output budget") && m.contains("4096 bytes"), "{m}");
    assert_eq!(bad[0].attempt, 0);
    let recorded: usize = st.steps.iter().filter_map(|s| s.output.as_ref()).map(String::len).sum();
    assert!(recorded <= OUTPUT_BUDGET_BYTES, "{recorded} bytes recorded");
    assert_eq!(st.steps.iter().filter(|s| s.phase == StepPhase::Succeeded).count(), n - 1);
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_says_why_from_its_pod() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "pod-why").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf("w", json!({"containers": [{"stepName": "bad", "image": "busybox", "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}, "annotations": {"kwok.shoal.dev/termination-message": "no such table: rows\n"}}}]})),
    )
    .await
    .unwrap();
    let failed = wait_phase_within(&api, "w", WorkflowPhase::Failed, T).await;
    let s = step_of(&failed, "bad");
    assert_eq!(s.message.as_deref(), Some("attempt 0 failed: container main exited with code 3 (Error): no such table: rows"));
    assert_eq!(s.output, None, "a failed step records no output");
    common::cleanup(&client, &ns).await;
}
