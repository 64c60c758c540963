//! Proof that the local control plane is real: Jobs complete on kwok nodes, pods fail with
//! exit codes and termination messages, namespaces really go away, Deployments scale, and
//! the garbage collector removes children of deleted owners.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::{self, eventually};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn kwok_nodes_are_ready_and_schedulable() {
    let client = common::client().await;
    let nodes: Api<Node> = Api::all(client);
    // The dev cluster's own nodes; tests may add (and cordon) nodes of their own, labelled
    // shoal.dev/test-node.
    let list = nodes.list(&ListParams::default().labels("type=kwok,!shoal.dev/test-node")).await.unwrap();
    assert!(list.items.len() >= 3, "expected at least 3 kwok nodes, got {}", list.items.len());
    for n in list.items {
        let ready = n.status.unwrap().conditions.unwrap().into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "node {:?} not Ready", n.metadata.name);
        assert!(n.spec.unwrap().taints.unwrap_or_default().is_empty(), "node still tainted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn job_runs_on_a_kwok_node_and_completes() {
    let client = common::client().await;
    let ns = common::namespace(&client, "job").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"kwok.shoal.dev/termination-message": "hi there"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox", "command": ["echo", "hi"]}]}
        }}
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    eventually(T, "Job Complete", || async {
        let j = jobs.get("hello").await.ok()?;
        j.status?.conditions?.into_iter().find(|c| c.type_ == "Complete" && c.status == "True")
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods.list(&ListParams::default().labels("job-name=hello")).await.unwrap();
    let pod = list.items.first().expect("the Job's pod");
    assert!(pod.spec.as_ref().unwrap().node_name.as_deref().unwrap_or("").starts_with("kwok-node-"), "scheduled onto a kwok node");
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let term = status.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    assert_eq!(term.exit_code, 0);
    assert_eq!(term.message.as_deref(), Some("hi there"));
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn labelled_pod_fails_with_its_exit_code_and_message() {
    let client = common::client().await;
    let ns = common::namespace(&client, "podfail").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "boom", "labels": {"kwok.shoal.dev/exit-code": "3"},
                     "annotations": {"kwok.shoal.dev/termination-message": "disk on fire", "kwok.shoal.dev/delay": "100ms"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let term = eventually(T, "pod Failed", || async {
        let p = pods.get("boom").await.ok()?;
        let st = p.status?;
        if st.phase.as_deref() != Some("Failed") {
            return None;
        }
        st.container_statuses?.into_iter().next()?.state?.terminated
    })
    .await;
    assert_eq!(term.exit_code, 3);
    assert_eq!(term.reason.as_deref(), Some("Error"));
    assert_eq!(term.message.as_deref(), Some("disk on fire"));
    common::cleanup(&client, &ns).await;
}

/// An Activity's e2e test makes one worker of several fail: every worker's pod carries
/// `KWOK_FAIL_WORKER=N`, and only the one whose `ACTIVITY_WORKER_INDEX` is N fails (exit code 1).
#[tokio::test(flavor = "multi_thread")]
async fn the_pod_of_the_worker_named_by_kwok_fail_worker_fails() {
    let client = common::client().await;
    let ns = common::namespace(&client, "failworker").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let worker = |index: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("worker-{index}"), "annotations": {"kwok.shoal.dev/delay": "100ms"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox", "env": [
                {"name": shoal::dev::FAIL_WORKER_ENV, "value": "1"},
                {"name": shoal::core::activity::WORKER_INDEX_ENV, "value": index},
            ]}]}
        }))
        .unwrap()
    };
    for index in ["0", "1"] {
        pods.create(&PostParams::default(), &worker(index)).await.unwrap();
    }
    let finished = |name: &'static str| {
        let pods = pods.clone();
        async move {
            eventually(T, &format!("{name} finished"), || async {
                let st = pods.get(name).await.ok()?.status?;
                let phase = st.phase.filter(|p| p == "Succeeded" || p == "Failed")?;
                Some((phase, st.container_statuses?.into_iter().next()?.state?.terminated?.exit_code))
            })
            .await
        }
    };
    assert_eq!(finished("worker-1").await, ("Failed".to_string(), 1), "the worker named by KWOK_FAIL_WORKER fails");
    assert_eq!(finished("worker-0").await, ("Succeeded".to_string(), 0), "the other worker succeeds");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_namespace_really_removes_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "nsdel").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "x"}, "data": {"a": "b"}})).unwrap()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "sleeper"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually(T, "pod Running", || async { (pods.get("sleeper").await.ok()?.status?.phase? == "Running").then_some(()) }).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(&ns, &DeleteParams::default()).await.unwrap();
    eventually(T, "namespace gone", || async { matches!(namespaces.get_opt(&ns).await, Ok(None)).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_a_deployment_to_zero_removes_its_pods() {
    let client = common::client().await;
    let ns = common::namespace(&client, "scale").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("app=web");
    eventually(T, "3 Running pods", || async {
        let l = pods.list(&lp).await.ok()?;
        (l.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count() == 3).then_some(())
    })
    .await;
    // Deployment pods (restartPolicy Always) must stay Running, not complete.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = pods.list(&lp).await.unwrap();
    assert!(l.items.iter().all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")), "Deployment pods must stay Running");
    deploys.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}}))).await.unwrap();
    eventually(T, "no pods left", || async { pods.list(&lp).await.ok()?.items.is_empty().then_some(()) }).await;
    common::cleanup(&client, &ns).await;
}

fn one_step_workflow(name: &str) -> shoal::api::Workflow {
    serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"containers": [{"stepName": "a", "image": "busybox"}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_owner_garbage_collects_its_children() {
    let client = common::client().await;
    let ns = common::namespace(&client, "gc").await;
    // The owner is a shoal Workflow, so this also proves GC works across our CRDs.
    let wfs: Api<shoal::api::Workflow> = Api::namespaced(client.clone(), &ns);
    let wf = one_step_workflow("owner");
    let wf = wfs.create(&PostParams::default(), &wf).await.unwrap();
    let owner_ref = wf.controller_owner_ref(&()).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut child: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "child"}, "data": {"k": "v"}})).unwrap();
    child.metadata.owner_references = Some(vec![owner_ref]);
    cms.create(&PostParams::default(), &child).await.unwrap();
    wfs.delete("owner", &DeleteParams::background()).await.unwrap();
    eventually(T, "child garbage-collected", || async { matches!(cms.get_opt("child").await, Ok(None)).then_some(()) }).await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_get_shoal_lists_a_workflow_with_its_printer_columns() {
    let client = common::client().await;
    let ns = common::namespace(&client, "category").await;
    let wfs: Api<shoal::api::Workflow> = Api::namespaced(client.clone(), &ns);
    let wf = one_step_workflow("listed");
    wfs.create(&PostParams::default(), &wf).await.unwrap();
    let out = std::process::Command::new(common::bin_dir().join("kubectl")).args(["get", "shoal", "-A"]).env("KUBECONFIG", common::kubeconfig()).output().expect("running kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl get shoal -A failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("workflow.shoal.dev/listed"), "kubectl get shoal -A output:\n{stdout}");
    let out = std::process::Command::new(common::bin_dir().join("kubectl")).args(["get", "wf", "-n", &ns]).env("KUBECONFIG", common::kubeconfig()).output().expect("running kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for col in ["NAME", "STATUS", "STEPS", "AGE", "MESSAGE"] {
        assert!(stdout.contains(col), "printer column {col} missing:\n{stdout}");
    }
    common::cleanup(&client, &ns).await;
}
