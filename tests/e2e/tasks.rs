//! Task, Ignitor and ActionPlugin (seed 004) against the real control plane, with kwok pods:
//! the seed's chain passing data along, failure dependents, the seed's own retry loop bounded
//! with its backoff, signed action deliveries, `concurrencyPolicy`, and every scheduled time
//! of 100 Ignitors fired and run exactly once while replicas are SIGKILLed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shoal::api::delivery::DeliveryState;
use shoal::api::task::{ActionPlugin, Ignitor, RunPhase, Task, TaskRun, TaskState, TaskStatus};

use crate::common::{self, eventually};
use crate::operator::Operator;
use crate::receiver::Receiver;

const T: Duration = Duration::from_secs(90);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const FAST_LEASES: [&str; 6] = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"];
const TASK_UID_LABEL: &str = "shoal.dev/task-uid";
const SCHEDULED_TIME: &str = "shoal.dev/scheduled-time";

fn object<K: DeserializeOwned>(kind: &str, name: &str, spec: Value) -> K {
    serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})).unwrap()
}

/// A pod template for kwok: `annotations` (delay, termination message) and `labels` (exit
/// code) on the pod.
fn template(annotations: Value, labels: Value) -> Value {
    json!({"metadata": {"annotations": annotations, "labels": labels}, "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["true"]}], "restartPolicy": "Never"}})
}

/// Replicas `names` watching a fresh work namespace, with their Leases in a fresh ops one.
async fn setup(client: &Client, prefix: &str, names: &[&str], args: &[&str]) -> (String, String, Operator) {
    let ops = common::namespace(client, &format!("{prefix}-ops")).await;
    let work = common::namespace(client, prefix).await;
    let mut op = Operator::new(&ops, &work);
    op.extra_args = args.iter().map(|s| s.to_string()).collect();
    for n in names {
        op.start(n);
    }
    (ops, work, op)
}

async fn wait_task(api: &Api<Task>, name: &str, what: &str, ok: impl Fn(&TaskStatus) -> bool) -> Task {
    eventually(T, &format!("Task {name}: {what}"), || async {
        let t = api.get(name).await.ok()?;
        ok(t.status.as_ref()?).then_some(t)
    })
    .await
}

fn state_is(s: TaskState) -> impl Fn(&TaskStatus) -> bool {
    move |st| st.state == Some(s)
}

/// The Jobs of the Task with `uid` (by its UID label).
async fn task_jobs(client: &Client, ns: &str, uid: &str) -> Vec<Job> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.list(&ListParams::default().labels(&format!("{TASK_UID_LABEL}={uid}"))).await.unwrap().items
}

/// The environment of the first container of Job `job`'s pod.
async fn pod_env(client: &Client, ns: &str, job: &str) -> HashMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod =
        eventually(T, &format!("the pod of Job {job}"), || async { pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"))).await.ok()?.items.into_iter().next() })
            .await;
    pod.spec.unwrap().containers[0].env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

async fn task_events(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().fields(&format!("involvedObject.name={name},involvedObject.kind=Task"))).await.unwrap().items
}

fn runs_in(st: &TaskStatus, phase: RunPhase) -> Vec<&TaskRun> {
    st.runs.iter().filter(|r| r.phase == phase).collect()
}

/// The seed's samples (examples/task-ignitor.yaml) by name.
fn seed_samples() -> BTreeMap<String, Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/task-ignitor.yaml")).unwrap();
    let mut out = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap();
        if !v.is_null() {
            out.insert(v["metadata"]["name"].as_str().unwrap().to_string(), v);
        }
    }
    out
}

/// The seed's own example: task1 (started by ignitor1, `NOW`, with data) then task2 (started
/// by task1's success). Each gets ORCA_INITIATOR and ORCA_DATA: the ignitor's data for task1,
/// task1's termination message for task2; one Job each.
#[tokio::test(flavor = "multi_thread")]
async fn seed_chain_passes_data() {
    let client = common::client().await;
    let (ops, ns, _op) = setup(&client, "tsk-seed", &["r1"], &[]).await;
    let mut seed = seed_samples();
    let data = "from ignitor1: {\"batch\": 7}";
    let message = "task1 output: 42";
    seed.get_mut("task1").unwrap()["spec"]["template"]["metadata"] = json!({"annotations": {"kwok.shoal.dev/termination-message": message}});
    seed.get_mut("ignitor1").unwrap()["spec"]["data"] = json!(data);
    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    // In the file's order: task1, task2, ignitor1.
    for name in ["task1", "task2"] {
        tasks.create(&PostParams::default(), &serde_json::from_value(seed[name].clone()).unwrap()).await.unwrap();
    }
    ignitors.create(&PostParams::default(), &serde_json::from_value(seed["ignitor1"].clone()).unwrap()).await.unwrap();

    let t1 = wait_task(&tasks, "task1", "Succeeded", state_is(TaskState::Succeeded)).await;
    let t2 = wait_task(&tasks, "task2", "Succeeded", state_is(TaskState::Succeeded)).await;
    let (s1, s2) = (t1.status.clone().unwrap(), t2.status.clone().unwrap());
    assert_eq!(s1.runs.len(), 1, "{:?}", s1.runs);
    let r1 = &s1.runs[0];
    assert_eq!((r1.phase, r1.initiator.kind.as_str(), r1.initiator.name.as_str()), (RunPhase::Succeeded, "Ignitor", "ignitor1"));
    assert_eq!(r1.output.as_deref(), Some(message), "task1's termination message is its output");
    assert_eq!(s2.runs.len(), 1, "{:?}", s2.runs);
    let r2 = &s2.runs[0];
    assert_eq!((r2.phase, r2.initiator.kind.as_str(), r2.initiator.name.as_str()), (RunPhase::Succeeded, "Task", "task1"));
    assert_eq!(r2.initiator.run.as_deref(), Some(r1.name.as_str()), "task2's run was started by task1's run");

    let env1 = pod_env(&client, &ns, &r1.name).await;
    assert_eq!(env1.get("ORCA_INITIATOR").map(String::as_str), Some("ignitor1"));
    assert_eq!(env1.get("ORCA_DATA").map(String::as_str), Some(data), "task1 gets the ignitor's data");
    let env2 = pod_env(&client, &ns, &r2.name).await;
    assert_eq!(env2.get("ORCA_INITIATOR").map(String::as_str), Some("task1"));
    assert_eq!(env2.get("ORCA_DATA").map(String::as_str), Some(message), "task2 gets task1's termination message");

    // Exactly one Job each, and still one a while later.
    for round in 0..2 {
        for t in [&t1, &t2] {
            let jobs = task_jobs(&client, &ns, &t.uid().unwrap()).await;
            let names: Vec<String> = jobs.iter().map(|j| j.name_any()).collect();
            let run = &t.status.as_ref().unwrap().runs[0].name;
            assert_eq!(names, vec![run.clone()], "round {round}: {} has exactly its run's Job", t.name_any());
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
    let s1 = tasks.get("task1").await.unwrap().status.unwrap();
    assert_eq!((s1.finished_runs, s1.failures_count), (1, 0), "task1 ran once and never failed (its startOnFailure stayed quiet)");
    assert_eq!(tasks.get("task2").await.unwrap().status.unwrap().finished_runs, 1);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

/// A failing task starts its startOnFailure dependent (with the failed run's termination
/// message), never its startOnSuccess one.
#[tokio::test(flavor = "multi_thread")]
async fn failure_starts_the_failure_dependents_only() {
    let client = common::client().await;
    let (ops, ns, _op) = setup(&client, "tsk-fail", &["r1"], &[]).await;
    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    let message = "disk full at step 3";
    let failing = template(json!({"kwok.shoal.dev/termination-message": message}), json!({"kwok.shoal.dev/exit-code": "3"}));
    tasks.create(&PostParams::default(), &object("Task", "flaky", json!({"startOnIgnition": ["go"], "template": failing}))).await.unwrap();
    tasks.create(&PostParams::default(), &object("Task", "on-failure", json!({"startOnFailure": ["flaky"], "template": template(json!({}), json!({}))}))).await.unwrap();
    tasks.create(&PostParams::default(), &object("Task", "on-success", json!({"startOnSuccess": ["flaky"], "template": template(json!({}), json!({}))}))).await.unwrap();
    ignitors.create(&PostParams::default(), &object("Ignitor", "go", json!({"scheduled": "NOW"}))).await.unwrap();

    let flaky = wait_task(&tasks, "flaky", "Failed", state_is(TaskState::Failed)).await;
    let fs = flaky.status.clone().unwrap();
    assert_eq!((fs.failures_count, fs.consecutive_failures, fs.finished_runs), (1, 1, 1));
    let failed = &fs.runs[0];
    assert_eq!(failed.phase, RunPhase::Failed);
    assert_eq!(failed.output.as_deref(), Some(message), "a failed run's termination message is kept");
    let dep = wait_task(&tasks, "on-failure", "Succeeded", state_is(TaskState::Succeeded)).await;
    let run = dep.status.unwrap().runs[0].clone();
    assert_eq!(run.initiator.run.as_deref(), Some(failed.name.as_str()));
    assert_eq!(run.data, None, "data is dropped from status once the Job holds it");
    let env = pod_env(&client, &ns, &run.name).await;
    assert_eq!(env.get("ORCA_INITIATOR").map(String::as_str), Some("flaky"));
    assert_eq!(env.get("ORCA_DATA").map(String::as_str), Some(message), "the failed run's termination message");

    // The success dependent never runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet = tasks.get("on-success").await.unwrap();
    let qs = quiet.status.clone().unwrap_or_default();
    assert!(qs.runs.is_empty(), "on-success recorded no run: {:?}", qs.runs);
    assert_ne!(qs.state, Some(TaskState::Running));
    assert!(task_jobs(&client, &ns, &quiet.uid().unwrap()).await.is_empty(), "on-success has no Job");
    assert_eq!(task_jobs(&client, &ns, &dep_uid(&tasks, "on-failure").await).await.len(), 1);
    assert_eq!(task_jobs(&client, &ns, &flaky.uid().unwrap()).await.len(), 1);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

async fn dep_uid(api: &Api<Task>, name: &str) -> String {
    api.get(name).await.unwrap().uid().unwrap()
}

/// The seed's own loop, `task1 startOnFailure: [task1]`, with a pod that always fails: the
/// loop guard stops it after maxConsecutiveFailures runs, each retry waiting its backoff.
#[tokio::test(flavor = "multi_thread")]
async fn the_self_retry_loop_stops_at_its_limit() {
    let client = common::client().await;
    let (ops, ns, _op) = setup(&client, "tsk-loop", &["r1"], &[]).await;
    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    let backoff = 1i64;
    let spec = json!({
        "startOnIgnition": ["ignitor1"], "startOnFailure": ["task1"],
        "loopGuard": {"backoffSeconds": backoff, "maxConsecutiveFailures": 3},
        // Keep every failed run (and its Job) so that all of them can be counted.
        "failedRunsHistoryLimit": 10,
        "template": template(json!({"kwok.shoal.dev/termination-message": "still broken"}), json!({"kwok.shoal.dev/exit-code": "1"})),
    });
    tasks.create(&PostParams::default(), &object("Task", "task1", spec)).await.unwrap();
    ignitors.create(&PostParams::default(), &object("Ignitor", "ignitor1", json!({"scheduled": "NOW"}))).await.unwrap();

    let t = wait_task(&tasks, "task1", "a run skipped by the loop guard", |s| s.runs.iter().any(|r| r.phase == RunPhase::Skipped)).await;
    let uid = t.uid().unwrap();
    let st = t.status.clone().unwrap();
    let skipped = runs_in(&st, RunPhase::Skipped);
    assert_eq!(skipped.len(), 1, "{:?}", st.runs);
    assert_eq!(skipped[0].reason.as_deref(), Some("LoopLimit"), "{:?}", skipped[0]);
    assert_eq!(skipped[0].failures_in_a_row, 3);
    assert_eq!(st.failures_count, 3);
    assert_eq!(st.state, Some(TaskState::Failed));
    let mut failed: Vec<&TaskRun> = runs_in(&st, RunPhase::Failed);
    failed.sort_by_key(|r| r.seq);
    assert_eq!(failed.iter().map(|r| r.failures_in_a_row).collect::<Vec<_>>(), [0, 1, 2], "{:?}", st.runs);
    assert_eq!(failed[0].initiator.kind, "Ignitor");
    for w in failed.windows(2) {
        assert_eq!(w[1].initiator.run.as_deref(), Some(w[0].name.as_str()), "each retry is started by the previous failure");
    }
    let ev = eventually(T, "a RunSkipped Event", || async { task_events(&client, &ns, "task1").await.into_iter().find(|e| e.reason.as_deref() == Some("RunSkipped")) }).await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert!(ev.message.as_deref().unwrap_or_default().contains("LoopLimit"), "{:?}", ev.message);

    // The backoff: retry n (started by the n-th failure in a row) is created at least
    // backoff * 2^(n-1) after the run before it finished (Job creationTimestamp has seconds:
    // 1 s of slack).
    let jobs = task_jobs(&client, &ns, &uid).await;
    let created: HashMap<String, Timestamp> = jobs.iter().map(|j| (j.name_any(), j.metadata.creation_timestamp.as_ref().unwrap().0)).collect();
    for w in failed.windows(2) {
        let (prev, retry) = (w[0], w[1]);
        let n = retry.failures_in_a_row;
        let delay = SignedDuration::from_secs(backoff * (1 << (n - 1)));
        let finished = prev.finished_at.as_ref().unwrap().0;
        let at = created[&retry.name];
        let gap = at.duration_since(finished);
        println!("retry {n}: Job created {:.3} s after the previous run finished (backoff {delay:?})", gap.as_secs_f64());
        assert!(gap >= delay - SignedDuration::from_secs(1), "retry {n} ({}) created {gap:?} after {} finished; backoff is {delay:?}", retry.name, prev.name);
    }

    // Exactly 3 Jobs, and no 4th well after another backoff (4 s) would have passed.
    assert_eq!(jobs.len(), 3, "{:?}", created.keys());
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(task_jobs(&client, &ns, &uid).await.len(), 3, "no 4th Job");
    let st = tasks.get("task1").await.unwrap().status.unwrap();
    assert_eq!((st.failures_count, st.finished_runs), (3, 3));
    assert!(!st.runs.iter().any(|r| matches!(r.phase, RunPhase::Pending | RunPhase::Running)), "{:?}", st.runs);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

/// Deletes the cluster-scoped ActionPlugin `name` when dropped (even when the test panics).
struct PluginGuard(String);

impl Drop for PluginGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(common::bin_dir().join("kubectl"))
            .args(["delete", "actionplugin", &self.0, "--ignore-not-found", "--wait=false"])
            .env("KUBECONFIG", common::kubeconfig())
            .output();
    }
}

/// successActions and failureActions: one signed delivery per finished run, through the
/// outbox (webhook-id = the delivery's id in status); an unknown plugin is a Failed delivery
/// that says so.
#[tokio::test(flavor = "multi_thread")]
async fn actions_are_delivered_signed_once() {
    let client = common::client().await;
    let (ops, ns, _op) = setup(&client, "tsk-act", &["r1"], &[]).await;
    let rx = Receiver::start(Some(SECRET)).await;
    // The signing Secret lives in the operator's own namespace (--namespace).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ops);
    secrets.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "hook"}, "stringData": {"signing": SECRET}})).unwrap()).await.unwrap();
    let plugin = format!("{ns}-hook");
    let _guard = PluginGuard(plugin.clone());
    let plugins: Api<ActionPlugin> = Api::all(client.clone());
    let p: ActionPlugin = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "ActionPlugin", "metadata": {"name": plugin},
        "spec": {"url": rx.url("/hooks/task"), "secretRef": {"name": "hook", "key": "signing"}, "timeoutSeconds": 5},
    }))
    .unwrap();
    plugins.create(&PostParams::default(), &p).await.unwrap();

    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    let actions = json!([plugin]);
    let ok = template(json!({"kwok.shoal.dev/termination-message": "all good"}), json!({}));
    let bad = template(json!({"kwok.shoal.dev/termination-message": "it broke"}), json!({"kwok.shoal.dev/exit-code": "2"}));
    for (name, tpl) in [("ok", ok.clone()), ("bad", bad)] {
        let spec = json!({"startOnIgnition": ["go"], "successActions": actions, "failureActions": actions, "template": tpl});
        tasks.create(&PostParams::default(), &object("Task", name, spec)).await.unwrap();
    }
    let unknown = format!("no-such-plugin-{ns}");
    tasks.create(&PostParams::default(), &object("Task", "lost", json!({"startOnIgnition": ["go"], "successActions": [unknown], "template": ok}))).await.unwrap();
    ignitors.create(&PostParams::default(), &object("Ignitor", "go", json!({"scheduled": "NOW"}))).await.unwrap();

    // One delivery per finished run with actions: ok's success, bad's failure.
    let delivered = |s: &TaskStatus| s.deliveries.len() == 1 && s.deliveries[0].state == DeliveryState::Delivered;
    let ok_t = wait_task(&tasks, "ok", "its delivery Delivered", delivered).await;
    let bad_t = wait_task(&tasks, "bad", "its delivery Delivered", delivered).await;
    rx.wait_for(2, T).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = rx.requests();
    assert_eq!(got.len(), 2, "one request per finished run, no repeat: {:?}", got.iter().map(|r| (&r.id, &r.body)).collect::<Vec<_>>());
    for (t, outcome, output) in [(&ok_t, "Succeeded", "all good"), (&bad_t, "Failed", "it broke")] {
        let st = tasks.get(&t.name_any()).await.unwrap().status.unwrap();
        let d = &st.deliveries[0];
        assert_eq!(d.attempts, 1);
        assert_eq!(d.target, rx.url("/hooks/task"));
        let run = &st.runs[0];
        let r = got.iter().find(|r| r.id == d.id).unwrap_or_else(|| panic!("{}: no request with the delivery id {}", t.name_any(), d.id));
        assert!(r.signature_ok, "{}: the signature verifies with the plugin's secret", t.name_any());
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hooks/task");
        let b = &r.body;
        assert_eq!(b["task"], json!(t.name_any()));
        assert_eq!(b["namespace"], json!(ns));
        assert_eq!(b["run"], json!(run.name));
        assert_eq!(b["outcome"], json!(outcome));
        assert_eq!(b["output"], json!(output));
        assert_eq!(b["action"], json!(plugin));
        assert_eq!(b["initiator"]["name"], json!("go"));
    }
    let ids: BTreeSet<String> = got.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 2, "distinct ids");

    // An unknown plugin: the delivery fails at once and says why.
    let lost = wait_task(&tasks, "lost", "its delivery Failed", |s| s.deliveries.first().is_some_and(|d| d.state == DeliveryState::Failed)).await;
    let d = &lost.status.as_ref().unwrap().deliveries[0];
    assert_eq!(d.last_error.as_deref(), Some(format!("no ActionPlugin named {unknown}").as_str()));
    assert_eq!(d.attempts, 0, "nothing was sent");
    let ev = eventually(T, "an ActionFailed Event on lost", || async { task_events(&client, &ns, "lost").await.into_iter().find(|e| e.reason.as_deref() == Some("ActionFailed")) }).await;
    assert!(ev.message.as_deref().unwrap_or_default().contains(&unknown), "{:?}", ev.message);
    assert_eq!(rx.requests().len(), 2, "nothing sent for the unknown plugin");
    let text = serde_json::to_string(&tasks.list(&ListParams::default()).await.unwrap().items).unwrap();
    assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "the secret is in no status");

    plugins.delete(&plugin, &DeleteParams::default()).await.unwrap();
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

async fn set_suspend(api: &Api<Ignitor>, name: &str, suspend: bool) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": suspend}}))).await.unwrap();
}

/// An Ignitor firing every 2 s at a Task whose runs take 30 s: Forbid records the later
/// firings as Skipped (one Job); Replace stops the earlier run and deletes its Job.
#[tokio::test(flavor = "multi_thread")]
async fn concurrency_policy_forbid_and_replace() {
    let client = common::client().await;
    let (ops, ns, _op) = setup(&client, "tsk-conc", &["r1"], &[]).await;
    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    let long = template(json!({"kwok.shoal.dev/delay": "30s"}), json!({}));
    for (task, ign, policy) in [("slow-forbid", "every2-forbid", "Forbid"), ("slow-replace", "every2-replace", "Replace")] {
        let spec = json!({"startOnIgnition": [ign], "failedRunsHistoryLimit": 30, "template": long});
        tasks.create(&PostParams::default(), &object("Task", task, spec)).await.unwrap();
        ignitors.create(&PostParams::default(), &object("Ignitor", ign, json!({"scheduled": "*/2 * * * * *", "concurrencyPolicy": policy}))).await.unwrap();
    }

    // Forbid: one run runs, the firings meanwhile are skipped.
    let t = wait_task(&tasks, "slow-forbid", "3 firings skipped by Forbid", |s| runs_in(s, RunPhase::Skipped).len() >= 3).await;
    let st = t.status.clone().unwrap();
    let running = runs_in(&st, RunPhase::Running);
    assert_eq!(running.len(), 1, "{:?}", st.runs);
    for r in runs_in(&st, RunPhase::Skipped) {
        assert_eq!(r.reason.as_deref(), Some("ConcurrencyForbid"), "{r:?}");
        assert!(r.message.as_deref().unwrap_or_default().contains(&running[0].name), "{r:?}");
    }
    assert!(runs_in(&st, RunPhase::Pending).is_empty() && runs_in(&st, RunPhase::Stopped).is_empty(), "{:?}", st.runs);
    let jobs: Vec<String> = task_jobs(&client, &ns, &t.uid().unwrap()).await.iter().map(|j| j.name_any()).collect();
    assert_eq!(jobs, vec![running[0].name.clone()], "only the running run has a Job");

    // Replace: each firing stops the run before it and deletes its Job.
    let t = wait_task(&tasks, "slow-replace", "2 runs replaced", |s| runs_in(s, RunPhase::Stopped).len() >= 2).await;
    let st = t.status.clone().unwrap();
    let stopped: Vec<String> = runs_in(&st, RunPhase::Stopped).iter().map(|r| r.name.clone()).collect();
    for r in runs_in(&st, RunPhase::Stopped) {
        assert_eq!(r.reason.as_deref(), Some("Replaced"), "{r:?}");
    }
    assert!(runs_in(&st, RunPhase::Skipped).is_empty(), "Replace skips nothing: {:?}", st.runs);
    assert!(runs_in(&st, RunPhase::Pending).len() + runs_in(&st, RunPhase::Running).len() <= 1, "at most one active run: {:?}", st.runs);
    let uid = t.uid().unwrap();
    let job_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(20), "the replaced runs' Jobs deleted", || async {
        for name in &stopped {
            if job_api.get_opt(name).await.ok()?.is_some_and(|j| j.metadata.deletion_timestamp.is_none()) {
                return None;
            }
        }
        Some(())
    })
    .await;
    let live: Vec<Job> = task_jobs(&client, &ns, &uid).await.into_iter().filter(|j| j.metadata.deletion_timestamp.is_none()).collect();
    assert!(live.len() <= 2, "the replaced Jobs do not pile up: {:?}", live.iter().map(|j| j.name_any()).collect::<Vec<_>>());

    for ign in ["every2-forbid", "every2-replace"] {
        set_suspend(&ignitors, ign, true).await;
    }
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

/// The headline test. 100 Ignitors firing every 10 s (maxCatchUp 20), each starting
/// one Task, on 3 replicas; a replica is SIGKILLed (and restarted) every 20 s. Then every
/// Ignitor is suspended, and for each one: its recorded firings are every cron time from the
/// first to the last, none missed, none twice, and its Task ran exactly one Job per time.
#[tokio::test(flavor = "multi_thread")]
async fn failover_fires_every_scheduled_time_exactly_once() {
    let _heavy = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let n = 100usize;
    let period = 10i64;
    let replicas = ["r1", "r2", "r3"];
    let (ops, ns, mut op) = setup(&client, "tsk-fo", &replicas, &FAST_LEASES).await;
    let tasks: Api<Task> = Api::namespaced(client.clone(), &ns);
    let ignitors: Api<Ignitor> = Api::namespaced(client.clone(), &ns);
    let creates = (0..n).map(|i| {
        let tasks = tasks.clone();
        async move {
            let spec = json!({"startOnIgnition": [format!("i{i:03}")], "successfulRunsHistoryLimit": 50, "template": template(json!({}), json!({}))});
            tasks.create(&PostParams::default(), &object("Task", &format!("t{i:03}"), spec)).await.unwrap();
        }
    });
    futures::future::join_all(creates).await;
    let creates = (0..n).map(|i| {
        let ignitors = ignitors.clone();
        async move {
            let spec = json!({"scheduled": format!("*/{period} * * * * *"), "maxCatchUp": 20});
            ignitors.create(&PostParams::default(), &object("Ignitor", &format!("i{i:03}"), spec)).await.unwrap();
        }
    });
    futures::future::join_all(creates).await;

    // ~70 s: a replica SIGKILLed every 20 s, restarted at once under the same identity
    // (which waits for its old member Lease to expire). Each kill comes 2 s before a
    // scheduled time, so the dead replica's Ignitors are orphaned at that time and fire late,
    // once their shards are taken over.
    let t0 = Instant::now();
    let to_cron = Duration::from_millis((((period - 2) * 1000 - Timestamp::now().as_millisecond() % (period * 1000)).rem_euclid(period * 1000)) as u64);
    let mut kills = 0;
    for (k, at) in [15u64, 35, 55].into_iter().enumerate() {
        let at = Duration::from_secs(at / period as u64 * period as u64) + to_cron;
        tokio::time::sleep_until((t0 + at).into()).await;
        let victim = replicas[k % replicas.len()];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(op.pid(victim)), nix::sys::signal::Signal::SIGKILL).unwrap();
        op.reap(victim);
        op.start(victim);
        kills += 1;
        println!("{:>5.1} s: SIGKILLed and restarted {victim}", t0.elapsed().as_secs_f64());
    }
    // Past the last lease expiry and a firing or two with every replica up.
    tokio::time::sleep_until((t0 + Duration::from_secs(80)).into()).await;
    let suspended_at = Timestamp::now();
    let patches = (0..n).map(|i| {
        let ignitors = ignitors.clone();
        async move { set_suspend(&ignitors, &format!("i{i:03}"), true).await }
    });
    futures::future::join_all(patches).await;
    println!("{:>5.1} s: every Ignitor suspended", t0.elapsed().as_secs_f64());

    // Settle: every Task has acted on its Ignitor's last firing, and no run is active.
    let settle_start = Instant::now();
    let (igns, tsks) = eventually(Duration::from_secs(300), "every firing acted on and every run finished", || async {
        let igns = ignitors.list(&ListParams::default()).await.ok()?.items;
        let tsks = tasks.list(&ListParams::default()).await.ok()?.items;
        if igns.len() != n || tsks.len() != n {
            return None;
        }
        let last: HashMap<String, Timestamp> = igns.iter().filter_map(|i| Some((i.name_any().replacen('i', "t", 1), i.status.as_ref()?.ignitions.iter().map(|x| x.scheduled_time.0).max()?))).collect();
        let settled = tsks.iter().all(|t| {
            let Some(st) = t.status.as_ref() else { return false };
            let cursor = st.triggers.iter().find(|c| c.kind == "Ignitor").and_then(|c| c.scheduled_time.as_ref()).map(|c| c.0);
            cursor.is_some() && cursor == last.get(&t.name_any()).copied() && !st.runs.iter().any(|r| matches!(r.phase, RunPhase::Pending | RunPhase::Running))
        });
        settled.then_some((igns, tsks))
    })
    .await;
    println!("settled {:.1} s after the suspension", settle_start.elapsed().as_secs_f64());
    // Let anything still in flight land before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let job_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    let all_jobs = job_api.list(&ListParams::default()).await.unwrap().items;
    let mut jobs_by_task: HashMap<String, Vec<&Job>> = HashMap::new();
    for j in &all_jobs {
        jobs_by_task.entry(j.labels().get(TASK_UID_LABEL).cloned().unwrap_or_default()).or_default().push(j);
    }
    let tasks_by_name: HashMap<String, &Task> = tsks.iter().map(|t| (t.name_any(), t)).collect();
    let mut times_total = 0usize;
    let mut max_late = SignedDuration::ZERO;
    let mut late_firings = 0usize;
    let mut per_ignitor = BTreeMap::new();
    for ign in &igns {
        let name = ign.name_any();
        let st = ign.status.clone().unwrap();
        let created = ign.metadata.creation_timestamp.as_ref().unwrap().0;
        let times: Vec<Timestamp> = st.ignitions.iter().map(|x| x.scheduled_time.0).collect();
        assert_eq!(st.missed_count, 0, "{name}: nothing missed ({:?})", st.missed);
        assert_eq!(st.ignitions_count as usize, times.len(), "{name}: every firing is still listed");
        assert!(times.len() >= 2, "{name} fired {} times", times.len());
        for w in times.windows(2) {
            assert_eq!(w[1].duration_since(w[0]), SignedDuration::from_secs(period), "{name}: consecutive cron times, no gap, no duplicate: {times:?}");
        }
        let first = times[0];
        assert_eq!(first.as_second() % period, 0, "{name}: {first} is a cron time");
        assert!(first > created && first.duration_since(created) <= SignedDuration::from_secs(period), "{name}: the first firing ({first}) is the first cron time after its creation ({created})");
        let last = *times.last().unwrap();
        assert!(suspended_at.duration_since(last) <= SignedDuration::from_secs(period + 15), "{name}: fired until the suspension (last {last}, suspended at {suspended_at})");
        for x in &st.ignitions {
            let late = x.fired_at.0.duration_since(x.scheduled_time.0);
            max_late = max_late.max(late);
            if late >= SignedDuration::from_secs(2) {
                late_firings += 1;
            }
        }
        times_total += times.len();
        *per_ignitor.entry(times.len()).or_insert(0) += 1;

        let task = tasks_by_name[&name.replacen('i', "t", 1)];
        let jobs = jobs_by_task.get(&task.uid().unwrap()).cloned().unwrap_or_default();
        let mut annotated: Vec<Timestamp> = jobs.iter().map(|j| j.annotations()[SCHEDULED_TIME].parse::<Timestamp>().unwrap()).collect();
        annotated.sort();
        assert_eq!(annotated, times, "{}: one Job per scheduled time of {name}", task.name_any());
        let ts = task.status.as_ref().unwrap();
        let succeeded: BTreeSet<Timestamp> = runs_in(ts, RunPhase::Succeeded).iter().map(|r| r.initiator.scheduled_time.as_ref().unwrap().0).collect();
        assert_eq!(succeeded.into_iter().collect::<Vec<_>>(), times, "{}: one successful run per time", task.name_any());
        assert_eq!(ts.runs.len(), times.len(), "{}: no other run {:?}", task.name_any(), ts.runs);
    }
    assert_eq!(all_jobs.len(), times_total, "no Job outside the Tasks' runs");
    assert!(late_firings > 0, "the kills orphaned some scheduled times, fired late once taken over (max lateness {max_late:?})");

    // The action logs: every Job create any replica sent. A create repeated after a crash
    // meets AlreadyExists; the names created are exactly the Jobs that exist.
    let mut sent: HashMap<String, usize> = HashMap::new();
    // The same create sent twice by one process under one shard epoch: not a takeover's
    // repeat, a reconcile that planned from a copy older than its own writes.
    let mut by_epoch: HashMap<(String, String, u32, i32), usize> = HashMap::new();
    for a in crate::ha::read_actions(&op.dir) {
        if let Some(job) = a.action.strip_prefix("create Job/") {
            *sent.entry(job.to_string()).or_default() += 1;
            *by_epoch.entry((job.to_string(), a.replica.clone(), a.shard, a.transitions)).or_default() += 1;
        }
    }
    let repeated_in_epoch: Vec<_> = by_epoch.iter().filter(|(_, c)| **c > 1).map(|(k, c)| (k.clone(), *c)).collect();
    let names: BTreeSet<String> = all_jobs.iter().map(|j| j.name_any()).collect();
    let sent_names: BTreeSet<String> = sent.keys().cloned().collect();
    let twice = sent.values().filter(|c| **c > 1).count();
    println!(
        "failover: {n} ignitors (*/{period} s, maxCatchUp 20), {kills} SIGKILLs over ~70 s on 3 replicas: {times_total} scheduled times fired (per ignitor: {per_ignitor:?}), \
         {} Jobs, {} Job creates sent for {} names ({twice} names sent more than once, {} of them by one process in one shard epoch), 0 missed, max firing lateness {:.3} s ({late_firings} firings 2 s or more late)",
        all_jobs.len(),
        sent.values().sum::<usize>(),
        sent_names.len(),
        repeated_in_epoch.len(),
        max_late.as_secs_f64()
    );
    assert_eq!(sent_names, names, "the Job names created are exactly the Jobs");
    // A reconcile repeats a create only when its own status write did not land for sure (a
    // request that outlived its fence on a slow machine): the replicas' logs say so.
    let abandoned: usize = op.replicas.iter().map(|r| std::fs::read_to_string(op.dir.join(format!("{}.stderr", r.name))).unwrap_or_default().matches("outlived its fence").count()).sum();
    assert!(
        repeated_in_epoch.is_empty() || abandoned > 0,
        "{} Job creates repeated by the same process under the same shard epoch with no request abandoned (a stale copy planned from), e.g. {:?}",
        repeated_in_epoch.len(),
        repeated_in_epoch.iter().take(3).collect::<Vec<_>>()
    );
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}
