//! Activity and ActivityWorker (seed 000) against the real control plane, with kwok pods.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal::api::activity::{Activity, ActivityState, ActivityWorker, WorkerState};

use crate::common::{self, eventually};
use crate::operator::Operator;

const T: Duration = Duration::from_secs(90);

fn activity(name: &str, spec: Value) -> Activity {
    serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Activity", "metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn setup(client: &Client, prefix: &str) -> (String, Operator) {
    let ops = common::namespace(client, &format!("{prefix}-ops")).await;
    let work = common::namespace(client, prefix).await;
    let mut op = Operator::new(&ops, &work);
    op.start("r1");
    (work, op)
}

async fn wait_state(api: &Api<Activity>, name: &str, state: ActivityState) -> Activity {
    eventually(T, &format!("{name} {state:?}"), || async {
        let a = api.get(name).await.ok()?;
        (a.status.as_ref()?.state == Some(state)).then_some(a)
    })
    .await
}

async fn workers_of(client: &Client, ns: &str, activity: &str) -> Vec<ActivityWorker> {
    let api: Api<ActivityWorker> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels(&format!("shoal.dev/activity={activity}"))).await.unwrap().items
}

fn env_of(pod: &Pod) -> HashMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0].env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_sample_runs_the_default_job_to_completion() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "act-seed").await;
    // examples/activity.yaml is seed 000's config/samples Activity, apiVersion changed.
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/activity.yaml")).unwrap();
    let sample: Activity = serde_yaml_ng::from_str(&text).unwrap();
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &sample).await.unwrap();
    let a = wait_state(&api, "my-activity", ActivityState::Completed).await;
    let st = a.status.unwrap();
    let init = st.conditions.iter().find(|c| c.type_ == "Initialization").expect("the seed's Initialization condition");
    assert_eq!(init.status, "True");
    assert_eq!(st.workers_summary.as_deref(), Some("1/1"));
    assert_eq!(st.workers_status.len(), 1);
    assert_eq!(st.workers_status[0].state, WorkerState::Completed);
    let ws = workers_of(&client, &ns, "my-activity").await;
    assert_eq!(ws.len(), 1, "`kubectl get activityworkers -l shoal.dev/activity=my-activity` finds the one worker");
    let w = &ws[0];
    assert_eq!(w.owner_references()[0].uid, a.metadata.uid.clone().unwrap(), "owned by the Activity");
    let job = &w.spec.job;
    assert_eq!((job.image.as_str(), job.command.clone().unwrap(), job.args.clone().unwrap()), ("bash:5.0", vec!["bash".to_string(), "-c".to_string()], vec!["echo done!".to_string()]));
    assert!(job.env.iter().flatten().any(|e| e.name == "TEST" && e.value.as_deref() == Some("FAKE")));
    let wst = w.status.clone().unwrap();
    assert_eq!(wst.state, Some(WorkerState::Completed));
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let j = jobs.get(wst.job_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(j.owner_references().iter().find(|r| r.controller == Some(true)).unwrap().uid, w.metadata.uid.clone().unwrap(), "the Job is the worker's");
    assert!(j.status.unwrap().succeeded == Some(1));
    // The printer columns the seed's users expect.
    let out = std::process::Command::new(common::bin_dir().join("kubectl")).args(["get", "activity,activityworkers", "-n", &ns]).env("KUBECONFIG", common::kubeconfig()).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("STATE") && table.contains("WORKERS") && table.contains("Completed") && table.contains("1/1"), "{table}");
    assert!(table.contains("ACTIVITY") && table.contains("JOB") && table.contains("COMPLETED"), "{table}");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_reach_the_pod_environment() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "act-inputs").await;
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    let inputs = json!({"dataset": "production-data", "batch-size": "1000", "region": "us-west-2"});
    let spec = json!({"name": "data-processing-task", "inputs": inputs, "workers": 2,
                      "job": {"name": "proc", "image": "busybox", "command": ["sh", "-c", "env"], "env": [{"name": "MODE", "value": "fast"}]}});
    api.create(&PostParams::default(), &activity("inputs", spec)).await.unwrap();
    wait_state(&api, "inputs", ActivityState::Completed).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let all = pods.list(&ListParams::default().labels("shoal.dev/activity=inputs")).await.unwrap().items;
    assert_eq!(all.len(), 2, "one pod per worker");
    let mut indexes = Vec::new();
    for p in &all {
        let env = env_of(p);
        assert_eq!(env.get("ACTIVITY_INPUT_DATASET").map(String::as_str), Some("production-data"));
        assert_eq!(env.get("ACTIVITY_INPUT_BATCH_SIZE").map(String::as_str), Some("1000"));
        assert_eq!(env.get("ACTIVITY_INPUT_REGION").map(String::as_str), Some("us-west-2"));
        assert_eq!(env.get("MODE").map(String::as_str), Some("fast"), "the template's own env is kept");
        let all: BTreeMap<String, String> = serde_json::from_str(env.get("ACTIVITY_INPUTS").unwrap()).unwrap();
        assert_eq!(serde_json::to_value(all).unwrap(), inputs);
        indexes.push(env.get("ACTIVITY_WORKER_INDEX").unwrap().clone());
        assert_eq!(p.spec.as_ref().unwrap().automount_service_account_token, Some(false), "step pod settings: no API token unless asked");
    }
    indexes.sort();
    assert_eq!(indexes, ["0", "1"]);
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn colliding_inputs_are_refused() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "act-clash").await;
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &activity("clash", json!({"name": "x", "inputs": {"batch-size": "1", "BATCH_SIZE": "2"}}))).await.unwrap();
    let a = wait_state(&api, "clash", ActivityState::Failed).await;
    let st = a.status.unwrap();
    assert!(st.message.as_deref().unwrap().contains("ACTIVITY_INPUT_BATCH_SIZE"), "{:?}", st.message);
    assert_eq!(st.conditions.iter().find(|c| c.type_ == "Failed").unwrap().reason, "InvalidSpec");
    assert!(workers_of(&client, &ns, "clash").await.is_empty(), "no worker was created");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failing_worker_fails_the_activity() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "act-fail").await;
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    // kwok fails the pod whose KWOK_FAIL_WORKER equals its ACTIVITY_WORKER_INDEX (README).
    let spec = json!({"name": "x", "workers": 3, "job": {"name": "j", "image": "busybox", "command": ["true"], "env": [{"name": "KWOK_FAIL_WORKER", "value": "1"}]}});
    api.create(&PostParams::default(), &activity("fails", spec)).await.unwrap();
    let a = wait_state(&api, "fails", ActivityState::Failed).await;
    let st = a.status.unwrap();
    let failed: Vec<_> = st.workers_status.iter().filter(|w| w.state == WorkerState::Failed).collect();
    assert_eq!(failed.len(), 1, "{:?}", st.workers_status);
    assert_eq!(st.message.as_deref(), Some(format!("worker {} failed", failed[0].name).as_str()));
    assert_eq!(st.conditions.iter().find(|c| c.type_ == "Failed").unwrap().status, "True");
    let ws = workers_of(&client, &ns, "fails").await;
    let w = ws.iter().find(|w| w.name_any() == failed[0].name).unwrap();
    let msg = w.status.as_ref().unwrap().message.clone().unwrap();
    assert!(msg.contains("failed"), "the worker says why: {msg}");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_activity_removes_workers_and_jobs() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "act-del").await;
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    let spec = json!({"name": "x", "workers": 2, "job": {"name": "j", "image": "busybox", "command": ["true"]}});
    api.create(&PostParams::default(), &activity("gone", spec)).await.unwrap();
    wait_state(&api, "gone", ActivityState::Completed).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert_eq!(jobs.list(&ListParams::default().labels("shoal.dev/activity=gone")).await.unwrap().items.len(), 2);
    api.delete("gone", &DeleteParams::foreground()).await.unwrap();
    eventually(T, "workers and Jobs garbage-collected", || async {
        let w = workers_of(&client, &ns, "gone").await.len();
        let j = jobs.list(&ListParams::default().labels("shoal.dev/activity=gone")).await.ok()?.items.len();
        (w == 0 && j == 0).then_some(())
    })
    .await;
    common::cleanup(&client, &ns).await;
}

/// 300 activities on 3 replicas, one killed with SIGKILL mid-run: every activity completes and
/// no worker's Job is created twice (each Job name is created once: the API server keeps one
/// object per name, so a second create would be a 409, and a deleted-and-recreated Job would
/// show a second UID in the workers' status history; the action logs count the creates).
#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_activities_three_replicas_with_a_kill() {
    let _heavy = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let ops = common::namespace(&client, "act-many-ops").await;
    let ns = common::namespace(&client, "act-many").await;
    let mut op = Operator::new(&ops, &ns);
    op.extra_args = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"].map(String::from).to_vec();
    for r in ["r1", "r2", "r3"] {
        op.start(r);
    }
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    let n = 300;
    for i in 0..n {
        let spec = json!({"name": "x", "job": {"name": "j", "image": "busybox", "command": ["true"]}});
        api.create(&PostParams::default(), &activity(&format!("a{i}"), spec)).await.unwrap();
        if i == n / 2 {
            let pid = op.pid("r2");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        }
    }
    op.reap("r2");
    op.start("r2");
    eventually(Duration::from_secs(300), "every activity completed", || async {
        let all = api.list(&ListParams::default()).await.ok()?.items;
        let done = all.iter().filter(|a| a.status.as_ref().and_then(|s| s.state) == Some(ActivityState::Completed)).count();
        (done == n).then_some(())
    })
    .await;
    // Every Job create any replica sent, from the action logs: one per worker.
    let mut creates: HashMap<String, usize> = HashMap::new();
    for a in crate::ha::read_actions(&op.dir) {
        if let Some(job) = a.action.strip_prefix("create Job/") {
            *creates.entry(job.to_string()).or_default() += 1;
        }
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let all_jobs = jobs.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all_jobs.len(), n, "one Job per worker");
    let twice: Vec<_> = creates.iter().filter(|(_, c)| **c > 1).collect();
    println!("300 activities, 3 replicas, one SIGKILL: {} Job creates sent for {} Jobs; names sent twice: {}", creates.values().sum::<usize>(), all_jobs.len(), twice.len());
    assert!(creates.len() >= n * 9 / 10, "the action logs record the creates ({} names)", creates.len());
    for j in &all_jobs {
        let w = j.owner_references().iter().find(|r| r.controller == Some(true)).unwrap().name.clone();
        let worker: ActivityWorker = Api::namespaced(client.clone(), &ns).get(&w).await.unwrap();
        assert_eq!(worker.status.unwrap().job_uid, j.metadata.uid.clone(), "the worker ran the Job that exists, created once");
    }
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

/// A worker or a Job found under the name shoal would give it, but not owned (as controller)
/// by the Activity or the worker's UID, is never adopted: the owner fails and says so.
#[tokio::test(flavor = "multi_thread")]
async fn squatters_are_never_adopted() {
    let client = common::client().await;
    let ops = common::namespace(&client, "act-squat-ops").await;
    let ns = common::namespace(&client, "act-squat").await;
    // No operator yet: the squatters go in first.
    let api: Api<Activity> = Api::namespaced(client.clone(), &ns);
    let a = api.create(&PostParams::default(), &activity("squatted", json!({"name": "x", "workers": 2}))).await.unwrap();
    let taken = shoal::core::activity::worker_name("squatted", &a.uid().unwrap(), 1);
    let workers: Api<ActivityWorker> = Api::namespaced(client.clone(), &ns);
    let squatter: ActivityWorker = serde_json::from_value(json!({"metadata": {"name": taken}, "spec": {"job": {"name": "j", "image": "busybox"}}})).unwrap();
    workers.create(&PostParams::default(), &squatter).await.unwrap();
    // A hand-made worker whose Job name is taken by a Job it does not own.
    let lone = workers.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "lone"}, "spec": {"job": {"name": "j", "image": "busybox"}}})).unwrap()).await.unwrap();
    let job_name = shoal::core::activity::job_name("lone", &lone.uid().unwrap(), 0);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job: Job =
        serde_json::from_value(json!({"metadata": {"name": job_name}, "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}})).unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let mut op = Operator::new(&ops, &ns);
    op.start("r1");
    let a = wait_state(&api, "squatted", ActivityState::Failed).await;
    let msg = a.status.unwrap().message.unwrap();
    assert!(msg.contains(&taken) && msg.contains("not adopted"), "{msg}");
    let lone = eventually(T, "the lone worker failed", || async {
        let w = workers.get("lone").await.ok()?;
        (w.status.as_ref()?.state == Some(WorkerState::Failed)).then_some(w)
    })
    .await;
    let msg = lone.status.unwrap().message.unwrap();
    assert!(msg.contains(&job_name) && msg.contains("not adopted"), "{msg}");
    assert!(jobs.get(&job_name).await.unwrap().owner_references().is_empty(), "the squatter Job was left as it was");
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}
