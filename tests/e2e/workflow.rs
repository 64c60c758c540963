//! The Workflow controller against the real control plane, with kwok pods.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal::api::workflow::{StepPhase, StepStatus, Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::operator::{self, Operator};

pub(crate) const T: Duration = Duration::from_secs(90);

pub(crate) fn wf(name: &str, spec: Value) -> Workflow {
    serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name}, "spec": spec})).unwrap()
}

pub(crate) fn step(name: &str, deps: &[&str]) -> Value {
    json!({"stepName": name, "image": "busybox", "command": ["true"], "dependsOn": deps})
}

/// The step attempts (name → labels) that `lp` selects in `ns`: Jobs with the `Job`
/// executor, bare pods with the `Pod` executor. Asserts that the other kind has none.
pub(crate) async fn attempts(client: &Client, ns: &str, lp: &ListParams, exec: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, String)> {
    let jobs: Vec<Job> = Api::<Job>::namespaced(client.clone(), ns).list(lp).await.unwrap().items;
    let pods: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), ns).list(lp).await.unwrap().items;
    let bare: Vec<Pod> = pods.into_iter().filter(|p| p.labels().get("shoal.dev/executor").map(String::as_str) == Some("pod")).collect();
    let of = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| (m.name.clone().unwrap(), m.labels.clone().unwrap_or_default(), m.uid.clone().unwrap());
    match exec {
        "Job" => {
            assert!(bare.is_empty(), "no bare pod with the Job executor: {:?}", bare.iter().map(|p| p.name_any()).collect::<Vec<_>>());
            jobs.iter().map(|j| of(&j.metadata)).collect()
        }
        _ => {
            assert!(jobs.is_empty(), "no Job with the Pod executor: {:?}", jobs.iter().map(|j| j.name_any()).collect::<Vec<_>>());
            bare.iter().map(|p| of(&p.metadata)).collect()
        }
    }
}

/// The step attempts of workflow `name` in `ns` (see [`attempts`]).
pub(crate) async fn attempts_of(client: &Client, ns: &str, name: &str, exec: &str) -> Vec<String> {
    attempts(client, ns, &ListParams::default().labels(&format!("shoal.dev/workflow={name}")), exec).await.into_iter().map(|a| a.0).collect()
}

pub(crate) async fn setup(client: &Client, prefix: &str) -> (String, Operator) {
    setup_in(client, prefix, "Job").await
}

/// A fresh namespace and one replica whose default executor is `exec` (`Job` or `Pod`).
pub(crate) async fn setup_in(client: &Client, prefix: &str, exec: &str) -> (String, Operator) {
    let ops = common::namespace(client, &format!("{prefix}-ops")).await;
    let work = common::namespace(client, prefix).await;
    let mut op = Operator::new(&ops, &work);
    op.extra_args = vec!["--default-executor".into(), exec.into()];
    op.start("r1");
    (work, op)
}

pub(crate) async fn wait_phase(api: &Api<Workflow>, name: &str, phase: WorkflowPhase) -> Workflow {
    wait_phase_within(api, name, phase, T).await
}

pub(crate) async fn wait_phase_within(api: &Api<Workflow>, name: &str, phase: WorkflowPhase, timeout: Duration) -> Workflow {
    eventually(timeout, &format!("{name} {phase:?}"), || async {
        let w = api.get(name).await.ok()?;
        (w.status.as_ref()?.workflow_status == Some(phase)).then_some(w)
    })
    .await
}

/// The status of step `s` of `w`.
pub(crate) fn step_of(w: &Workflow, s: &str) -> StepStatus {
    w.status.as_ref().unwrap().steps.iter().find(|x| x.step_name == s).unwrap().clone()
}

pub(crate) fn step_phase(w: &Workflow, s: &str) -> StepPhase {
    step_of(w, s).phase
}

fn started(w: &Workflow, s: &str) -> k8s_openapi::jiff::Timestamp {
    w.status.as_ref().unwrap().steps.iter().find(|x| x.step_name == s).unwrap().started_at.clone().unwrap().0
}

fn finished(w: &Workflow, s: &str) -> k8s_openapi::jiff::Timestamp {
    w.status.as_ref().unwrap().steps.iter().find(|x| x.step_name == s).unwrap().finished_at.clone().unwrap().0
}

async fn diamond_and_wide_fan_out(exec: &'static str) {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "wf-dag", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &wf("diamond", json!({"containers": [step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["b", "c"])]}))).await.unwrap();
    let mut fan = vec![step("root", &[])];
    for i in 0..50 {
        fan.push(json!({"stepName": format!("leaf-{i}"), "image": "busybox", "dependsOn": ["root"], "metadata": {"annotations": {"kwok.shoal.dev/delay": "5s"}}}));
    }
    fan.push(step("join", &(0..50).map(|i| format!("leaf-{i}")).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>()));
    api.create(&PostParams::default(), &wf("fan", json!({"containers": fan}))).await.unwrap();

    let d = wait_phase(&api, "diamond", WorkflowPhase::Completed).await;
    assert!(started(&d, "b") >= finished(&d, "a") && started(&d, "c") >= finished(&d, "a"));
    assert!(started(&d, "d") >= finished(&d, "b") && started(&d, "d") >= finished(&d, "c"));
    let st = d.status.unwrap();
    assert_eq!(st.executed_steps.len(), 4);
    assert_eq!(st.progress.as_deref(), Some("4/4"));
    assert!(st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));

    wait_phase(&api, "fan", WorkflowPhase::Completed).await;
    // The 50 leaves ran at the same time: from their pods' own start and finish times (not
    // the status, whose start times come from one reconcile), most leaf pods were running
    // before the first one finished.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let leaf_pods: Vec<Pod> = pods
        .list(&ListParams::default().labels("shoal.dev/workflow=fan"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.labels().get("shoal.dev/step").is_some_and(|s| s.starts_with("leaf-")))
        .collect();
    assert_eq!(leaf_pods.len(), 50);
    let ran = |p: &Pod| {
        let st = p.status.as_ref().unwrap();
        let end = st.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.as_ref().unwrap().finished_at.clone().unwrap().0;
        (st.start_time.clone().unwrap().0, end)
    };
    let first_finish = leaf_pods.iter().map(|p| ran(p).1).min().unwrap();
    let concurrent = leaf_pods.iter().filter(|p| ran(p).0 < first_finish).count();
    assert!(concurrent >= 25, "only {concurrent} leaf pods were running at once");
    assert_eq!(attempts_of(&client, &ns, "fan", exec).await.len(), 52);
    assert_eq!(api.get("fan").await.unwrap().status.unwrap().executor.map(|e| e.to_string()).as_deref(), Some(exec));
    // One Event when a workflow completes; no StepSucceeded Events unless asked for.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let about = |name: &'static str, reason: &'static str| {
        let events = events.clone();
        async move {
            let l = events.list(&ListParams::default()).await.unwrap().items;
            l.into_iter().filter(|e| e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).count()
        }
    };
    eventually(T, "a WorkflowCompleted Event on diamond", || async { (about("diamond", "WorkflowCompleted").await == 1).then_some(()) }).await;
    assert_eq!(about("diamond", "StepSucceeded").await, 0);
    common::cleanup(&client, &ns).await;
}

async fn failures_fail_fast_and_cycles(exec: &'static str) {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "wf-fail", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let bad = json!({"stepName": "bad", "image": "busybox", "dependsOn": ["a"], "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}}});
    api.create(&PostParams::default(), &wf("fast", json!({"containers": [step("a", &[]), bad.clone(), step("after-bad", &["bad"])]}))).await.unwrap();
    api.create(
        &PostParams::default(),
        &wf(
            "slow",
            json!({"failFast": false, "containers": [
                step("a", &[]), bad, step("after-bad", &["bad"]),
                {"stepName": "ok", "image": "busybox", "dependsOn": ["a"], "metadata": {"annotations": {"kwok.shoal.dev/delay": "2s"}}},
                step("after-ok", &["ok"]),
            ]}),
        ),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &wf("rejected", json!({"containers": [{"stepName": "a", "image": "busybox", "env": [{"name": "A=B", "value": "x"}]}]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("cycle", json!({"containers": [step("a", &["c"]), step("b", &["a"]), step("c", &["b"])]}))).await.unwrap();

    let f = wait_phase(&api, "fast", WorkflowPhase::Failed).await;
    assert_eq!(step_phase(&f, "bad"), StepPhase::Failed);
    assert_ne!(step_phase(&f, "after-bad"), StepPhase::Running);
    assert!(f.status.as_ref().unwrap().message.as_deref().unwrap().contains("bad"));

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually(T, "a StepFailed Event on the workflow", || async {
        let l = events.list(&ListParams::default()).await.ok()?;
        l.items.iter().any(|e| e.reason.as_deref() == Some("StepFailed") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("fast")).then_some(())
    })
    .await;

    let s = wait_phase(&api, "slow", WorkflowPhase::Failed).await;
    assert_eq!(step_phase(&s, "after-ok"), StepPhase::Succeeded, "failFast: false lets the other branch finish");
    assert_eq!(step_phase(&s, "after-bad"), StepPhase::Skipped);

    // A Job (or pod) the API server refuses fails its step with the server's reason, once.
    let r = wait_phase(&api, "rejected", WorkflowPhase::Failed).await;
    let m = r.status.as_ref().unwrap().steps[0].message.clone().unwrap_or_default();
    assert!(m.contains(&format!("{exec} rejected by the API server")) && m.contains("A=B"), "{m}");

    let c = wait_phase(&api, "cycle", WorkflowPhase::Failed).await;
    let cond = c.status.as_ref().unwrap().conditions.iter().find(|x| x.type_ == "Failed").unwrap().clone();
    assert_eq!(cond.reason, "InvalidSpec");
    assert!(cond.message.contains("dependency cycle") && cond.message.contains("a") && cond.message.contains("c"), "{}", cond.message);
    assert!(attempts_of(&client, &ns, "cycle", exec).await.is_empty(), "no Job or pod for a cyclic workflow");
    common::cleanup(&client, &ns).await;
}

async fn timeout_retry_and_outputs(exec: &'static str) {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "wf-retry", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "slowpoke",
            json!({"containers": [
                {"stepName": "sleepy", "image": "busybox", "timeoutSeconds": 2, "metadata": {"annotations": {"kwok.shoal.dev/delay": "60s"}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &wf(
            "flaky",
            json!({"containers": [
                {"stepName": "flaky", "image": "busybox", "retries": 2, "metadata": {"annotations": {"kwok.shoal.dev/fail-attempts": "1"}}},
            ]}),
        ),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &wf(
            "pipe",
            json!({"containers": [
                {"stepName": "produce", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/termination-message": "{\"rows\": 42}"}}},
                {"stepName": "consume", "image": "busybox", "dependsOn": ["produce"]},
            ]}),
        ),
    )
    .await
    .unwrap();

    let s = wait_phase(&api, "slowpoke", WorkflowPhase::Failed).await;
    let m = s.status.as_ref().unwrap().steps[0].message.clone().unwrap_or_default();
    assert!(m.contains("timed out"), "{m}");

    let f = wait_phase(&api, "flaky", WorkflowPhase::Completed).await;
    let st = &f.status.as_ref().unwrap().steps[0];
    assert_eq!(st.attempt, 1, "succeeded on the second attempt");
    let names: HashSet<String> = attempts_of(&client, &ns, "flaky", exec).await.into_iter().collect();
    assert_eq!(names.len(), 2, "one {exec} per attempt: {names:?}");

    let p = wait_phase(&api, "pipe", WorkflowPhase::Completed).await;
    assert_eq!(p.status.as_ref().unwrap().steps[0].output.as_deref(), Some("{\"rows\": 42}"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods.list(&ListParams::default().labels("shoal.dev/workflow=pipe,shoal.dev/step=consume")).await.unwrap().items.remove(0);
    let env: HashMap<String, String> = pod.spec.unwrap().containers[0].env.clone().unwrap().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect();
    assert_eq!(env["SHOAL_OUTPUT_PRODUCE"], "{\"rows\": 42}");
    assert_eq!(env["ORCA_DATA"], "{\"rows\": 42}");
    assert_eq!(env["ORCA_INITIATOR"], "produce");
    common::cleanup(&client, &ns).await;
}

async fn relabel_delete_and_spec_update_cascade(exec: &'static str) {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "wf-cascade", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let slow = json!({"stepName": "a", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": "60s"}}});
    api.create(&PostParams::default(), &wf("w", json!({"containers": [slow]}))).await.unwrap();
    let lp = ListParams::default().labels("shoal.dev/workflow=w");
    let listed = |lp: ListParams| {
        let client = client.clone();
        let ns = ns.clone();
        async move { attempts(&client, &ns, &lp, exec).await }
    };
    eventually(T, "the Job or pod", || async { (!listed(lp.clone()).await.is_empty()).then_some(()) }).await;

    api.patch("w", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "blue"}}}))).await.unwrap();
    eventually(T, "label cascaded", || async { listed(lp.clone()).await.iter().all(|j| j.1.get("team").map(String::as_str) == Some("blue")).then_some(()) }).await;
    api.patch("w", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(json!([{"op": "remove", "path": "/metadata/labels/team"}])).unwrap())).await.unwrap();
    eventually(T, "label removal cascaded", || async { listed(lp.clone()).await.iter().all(|j| !j.1.contains_key("team")).then_some(()) }).await;

    // A spec update deletes the old spec's Jobs and starts again.
    let old: Vec<String> = listed(lp.clone()).await.into_iter().map(|j| j.0).collect();
    api.patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"containers": [step("x", &[]), step("y", &["x"])]}}))).await.unwrap();
    let done = wait_phase(&api, "w", WorkflowPhase::Completed).await;
    let st = done.status.unwrap();
    assert_eq!(st.executed_steps, vec!["x".to_string(), "y".to_string()]);
    assert_eq!(st.observed_generation, done.metadata.generation);
    eventually(T, "old Jobs deleted", || async {
        let now: HashSet<String> = listed(lp.clone()).await.into_iter().map(|j| j.0).collect();
        old.iter().all(|o| !now.contains(o)).then_some(())
    })
    .await;

    // Deleting the workflow deletes its Jobs (ownerReferences + the garbage collector).
    api.delete("w", &DeleteParams::background()).await.unwrap();
    eventually(T, "Jobs or pods garbage-collected", || async { listed(lp.clone()).await.is_empty().then_some(()) }).await;
    common::cleanup(&client, &ns).await;
}

/// 200 workflows of 5 steps, 3 replicas; optionally one replica is killed mid-run.
async fn many_workflows(prefix: &str, kill_one: bool, exec: &'static str) {
    let _turn = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let ops = common::namespace(&client, &format!("{prefix}-ops")).await;
    let ns = common::namespace(&client, prefix).await;
    let mut op = Operator::new(&ops, &ns);
    op.extra_args = vec!["--default-executor".into(), exec.into()];
    for r in ["r1", "r2", "r3"] {
        op.start(r);
    }
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    // Let the replicas settle (all shards held), then sample their idle CPU for 10 s (/proc
    // counts 10 ms ticks), so the report can separate the work's CPU from the Lease upkeep.
    eventually(T, "all 32 shards held", || async { (op.metric_sum("shoal_shards_owned").await == 32.0).then_some(()) }).await;
    let idle_from = op.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let at_start = op.cpu_seconds();
    let idle_per_s: f64 = at_start.iter().map(|(r, c)| c - idle_from.get(r).copied().unwrap_or(*c)).sum::<f64>() / 10.0;
    let t0 = Instant::now();
    let creates = (0..200).map(|i| {
        let api = api.clone();
        async move {
            let spec = json!({"containers": [step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["b", "c"]), step("e", &["d"])]});
            api.create(&PostParams::default(), &wf(&format!("w{i:03}"), spec)).await.unwrap();
        }
    });
    futures::future::join_all(creates).await;
    if kill_one {
        eventually(T, "a third of the workflows progressing", || async {
            let l = api.list(&ListParams::default()).await.ok()?;
            (l.items.iter().filter(|w| w.status.as_ref().is_some_and(|s| !s.executed_steps.is_empty())).count() >= 60).then_some(())
        })
        .await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(op.pid("r2")), nix::sys::signal::Signal::SIGKILL).unwrap();
        op.reap("r2");
    }
    eventually(Duration::from_secs(300), "all 200 workflows Completed", || async {
        let l = api.list(&ListParams::default()).await.ok()?;
        (l.items.iter().filter(|w| w.status.as_ref().and_then(|s| s.workflow_status) == Some(WorkflowPhase::Completed)).count() == 200).then_some(())
    })
    .await;
    let elapsed = t0.elapsed();
    let wfs = api.list(&ListParams::default()).await.unwrap().items;
    let all_jobs = attempts(&client, &ns, &ListParams::default(), exec).await;
    let planned: usize = wfs.iter().map(|w| w.status.as_ref().unwrap().steps.iter().map(|s| s.attempt as usize + 1).sum::<usize>()).sum();
    assert_eq!(planned, 1000, "no retries were needed");
    assert_eq!(all_jobs.len(), planned, "Jobs (or pods) created == step attempts planned");
    let by_name: HashMap<String, String> = all_jobs.into_iter().map(|j| (j.0, j.2)).collect();
    for w in &wfs {
        for s in &w.status.as_ref().unwrap().steps {
            let jn = s.job_name.as_ref().unwrap();
            assert_eq!(s.job_uid.as_ref(), by_name.get(jn), "{}/{}: the recorded Job UID is the one Job", w.name_any(), s.step_name);
        }
    }
    // Operator CPU of the surviving replicas over the run, and that minus their idle rate.
    let at_end = op.cpu_seconds();
    let run_cpu: f64 = at_end.iter().map(|(r, c)| c - at_start.get(r).copied().unwrap_or(0.0)).sum();
    let idle_share = idle_per_s * at_end.len() as f64 / at_start.len() as f64 * elapsed.as_secs_f64();
    eprintln!(
        "{prefix}: operator CPU over the run {run_cpu:.2}s = {:.2} ms per step; idle upkeep {:.3} s/s, so the work itself {:.2} ms per step (surviving replicas)",
        run_cpu,
        idle_per_s,
        (run_cpu - idle_share).max(0.0)
    );
    // Writes per step and dispatch latency, from the surviving replicas' metrics.
    let created = op.metric_sum("shoal_jobs_created_total").await;
    let writes = op.metric_sum("shoal_status_writes_total").await;
    let mut pages = Vec::new();
    for r in &op.replicas {
        pages.extend(operator::metrics_page(r.metrics_port).await);
    }
    let q = |q| operator::histogram_quantile(&pages, "shoal_step_dispatch_latency_seconds", q).unwrap_or(f64::NAN);
    eprintln!(
        "{prefix}: 200 workflows x 5 steps, 3 replicas{}: {:.1}s; Jobs or pods created {created}, status writes {writes} ({:.2} per step, surviving replicas); dispatch latency p50 <= {}s, p99 <= {}s (bucket bounds)",
        if kill_one { ", one killed mid-run" } else { "" },
        elapsed.as_secs_f64(),
        (created + writes) / 1000.0,
        q(0.5),
        q(0.99)
    );
    if !kill_one {
        assert_eq!(created, 1000.0, "every Job created exactly once");
        assert!((created + writes) / 1000.0 <= 3.0, "writes per step: {}", (created + writes) / 1000.0);
    }
    drop(op);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

async fn two_hundred_workflows_three_replicas(exec: &'static str) {
    many_workflows(&format!("wf-load-{}", exec.to_lowercase()), false, exec).await;
}

async fn two_hundred_workflows_with_a_crash(exec: &'static str) {
    many_workflows(&format!("wf-crash-{}", exec.to_lowercase()), true, exec).await;
}

async fn steps_run_with_their_pod_settings(exec: &'static str) {
    let client = common::client().await;
    let (ns, _op) = setup_in(&client, "wf-podset", exec).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &wf(
            "podset",
            json!({
                "stepDefaults": {
                    "serviceAccountName": "default",
                    "nodeSelector": {"type": "kwok"},
                    "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
                    "imagePullSecrets": [{"name": "registry-creds"}],
                    "podSecurityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
                },
                "containers": [
                    step("plain", &[]),
                    {"stepName": "custom", "image": "busybox", "resources": {"requests": {"cpu": "250m"}}, "automountServiceAccountToken": true},
                ]
            }),
        ),
    )
    .await
    .unwrap();
    wait_phase(&api, "podset", WorkflowPhase::Completed).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_of = |step: &'static str| {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default().labels(&format!("shoal.dev/workflow=podset,shoal.dev/step={step}"))).await.unwrap().items.remove(0).spec.unwrap() }
    };
    let plain = pod_of("plain").await;
    assert_eq!(plain.service_account_name.as_deref(), Some("default"));
    assert_eq!(plain.automount_service_account_token, Some(false), "no API token unless asked");
    assert_eq!(plain.node_selector.as_ref().unwrap()["type"], "kwok");
    assert_eq!(plain.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("batch"));
    assert_eq!(plain.image_pull_secrets.as_ref().unwrap()[0].name, "registry-creds");
    assert_eq!(plain.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let c = &plain.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().allow_privilege_escalation, Some(false));
    assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0, "100m");
    let custom = pod_of("custom").await;
    assert_eq!(custom.automount_service_account_token, Some(true));
    let r = custom.containers[0].resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(r["cpu"].0, "250m", "a step's resources replace the default's");
    assert!(!r.contains_key("memory"), "as a whole");
    assert_eq!(custom.node_selector.as_ref().unwrap()["type"], "kwok", "other defaults still apply");
    common::cleanup(&client, &ns).await;
}

// Every Workflow test above, once with each executor: the same assertions, with the step
// attempts as Jobs (`workflow::job::*`) and as bare pods (`workflow::pod::*`).
in_both_executors!(
    diamond_and_wide_fan_out,
    failures_fail_fast_and_cycles,
    timeout_retry_and_outputs,
    relabel_delete_and_spec_update_cascade,
    two_hundred_workflows_three_replicas,
    two_hundred_workflows_with_a_crash,
    steps_run_with_their_pod_settings,
);
