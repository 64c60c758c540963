//! API outages under running workflows: the API server hung (SIGSTOP) or killed and
//! restarted, each for longer than the lease, with 3 replicas. Every workflow must finish
//! promptly once the API server is back (well before the 5-minute resync the replicas run
//! with), with exactly one Job per step attempt.
//!
//! These tests hang and kill an API server, so each starts a control plane of its own (never
//! the shared one) and stops it when it ends, panics included.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shoal::api::workflow::{Workflow, WorkflowPhase};
use shoal::dev::{DevCluster, UpOptions};

use crate::common;
use crate::operator::Operator;
use crate::workflow::wf;

const WORKFLOWS: usize = 60;
const STEPS: usize = 5;
/// Longer than the lease (5 s), shorter than the lease loop's exit bound (4 leases + jitter).
const OUTAGE: Duration = Duration::from_secs(12);
/// Longer than any replica's exit bound (4 leases + up to 50 %: 30 s).
const LONG_OUTAGE: Duration = Duration::from_secs(35);
/// From the API server's return to every workflow Completed: generous (this machine is
/// shared), and well below the replicas' 5-minute resync, so that a workflow that only the
/// resync would pick up again fails the test.
const AFTER_OUTAGE: Duration = Duration::from_secs(180);
const APISERVER: &str = "kube-apiserver";
/// The replicas' log filter: their watches' errors and back-offs included.
const LOG: &str = "info,kube=warn,shoal::ha=debug";

/// A control plane of this test's own, stopped on drop (the API server is resumed first,
/// should the test have panicked while it was stopped).
struct OwnCluster {
    dir: PathBuf,
    cluster: DevCluster,
}

impl OwnCluster {
    async fn up(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shoal-outage-{name}-{}", std::process::id()));
        let cluster = shoal::dev::up(&UpOptions::new(&dir)).await.expect("starting a control plane for the outage test");
        Self { dir, cluster }
    }

    /// The API server's pid now (it changes when it is restarted).
    fn apiserver(&self) -> Pid {
        let state = DevCluster::load(&self.dir).expect("cluster state");
        Pid::from_raw(state.processes.iter().find(|p| p.name == APISERVER).expect("an API server").pid)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = kill(self.apiserver(), Signal::SIGCONT);
        let _ = shoal::dev::down(&self.dir);
        // The cluster's logs stay after a failure, or when SHOAL_KEEP_OUTAGE_LOGS is set.
        if !std::thread::panicking() && std::env::var_os("SHOAL_KEEP_OUTAGE_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    None,
    /// SIGSTOP the API server, SIGCONT it after this long.
    Hang(Duration),
    /// SIGKILL the API server, start it again (same flags, same etcd) after this long.
    Kill(Duration),
}

/// A diamond plus a tail; each step's pod finishes 0.5–2 s after it starts. With
/// `max_step_timeout` -1 its steps have no deadline.
fn five_steps(i: usize, max_step_timeout: Option<i64>) -> serde_json::Value {
    let step = |n: usize, name: &str, deps: &[&str]| {
        let delay = format!("{}ms", 500 + ((i * 7 + n * 3) % 4) * 500);
        json!({"stepName": name, "image": "busybox", "command": ["true"], "dependsOn": deps, "metadata": {"annotations": {shoal::dev::DELAY_ANNOTATION: delay}}})
    };
    let mut spec = json!({"containers": [step(0, "a", &[]), step(1, "b", &["a"]), step(2, "c", &["a"]), step(3, "d", &["b", "c"]), step(4, "e", &["d"])]});
    if let Some(t) = max_step_timeout {
        spec["maxStepTimeout"] = json!(t);
    }
    spec
}

/// Restart every replica that has exited, as Kubernetes would restart its pod (here after
/// 2 s rather than with CrashLoopBackOff's 10 s, 20 s, …). Returns the names restarted.
fn restart_exited(op: &mut Operator, last_restart: &mut HashMap<String, Instant>) -> Vec<String> {
    let mut exited = Vec::new();
    for r in &mut op.replicas {
        if let Ok(Some(status)) = r.child.try_wait() {
            exited.push((r.name.clone(), status));
        }
    }
    let mut restarted = Vec::new();
    for (name, status) in exited {
        if last_restart.get(&name).is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
            continue;
        }
        let log = op.dir.join(format!("{name}.stderr"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // The process's last word: anyhow's `Error: …` and the first cause.
        let why: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("Error:")).filter(|l| !l.trim().is_empty()).take(3).collect();
        eprintln!("replica {name} exited ({status}); restarting it. {}", why.join(" "));
        // Keep the old log next to the new one.
        let n = (1..).find(|n| !op.dir.join(format!("{name}.stderr.{n}")).exists()).unwrap_or(0);
        let _ = std::fs::rename(&log, op.dir.join(format!("{name}.stderr.{n}")));
        op.reap(&name);
        op.start_with(&name, &name, &[("RUST_LOG", LOG)]);
        last_restart.insert(name.clone(), Instant::now());
        restarted.push(name);
    }
    restarted
}

/// Wait for the next Job of `ns` to be marked Complete (seen on a watch, as the replicas see it).
async fn next_job_completion(client: &Client, ns: &str) {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let complete = |j: &Job| j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Complete" && c.status == "True"));
    let mut events = watcher(Api::<Job>::namespaced(client.clone(), ns), watcher::Config::default()).boxed();
    let wait = async {
        while let Some(ev) = events.next().await {
            if let Ok(watcher::Event::Apply(j)) = ev
                && complete(&j)
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait).await.expect("a Job completing");
}

async fn count_phases(api: &Api<Workflow>) -> Option<(usize, Vec<Workflow>)> {
    let l = api.list(&ListParams::default()).await.ok()?;
    let done = l.items.iter().filter(|w| w.status.as_ref().and_then(|s| s.workflow_status) == Some(WorkflowPhase::Completed)).count();
    let failed: Vec<Workflow> = l.items.into_iter().filter(|w| w.status.as_ref().and_then(|s| s.workflow_status) == Some(WorkflowPhase::Failed)).collect();
    Some((done, failed))
}

/// Every step ran exactly one Job, and each recorded Job UID is that of the one Job of that
/// name: no step was retried, no Job was created twice or lost. Returns how long after its
/// Job was marked Complete each step was recorded Succeeded (whole seconds, as both times
/// are written), for the steps whose Job was marked Complete at or after `since`.
async fn assert_one_job_per_attempt(client: &Client, ns: &str, since: k8s_openapi::jiff::Timestamp) -> Vec<i64> {
    let wfs: Vec<Workflow> = Api::<Workflow>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let jobs: Vec<Job> = Api::<Job>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let by_name: HashMap<String, String> = jobs.iter().map(|j| (j.name_any(), j.uid().unwrap())).collect();
    // When the Job controller last wrote a Job's status (its Complete condition, for a
    // finished Job). Not `completionTime`: the Job controller dates that from when success
    // was first met, which after an outage can be long before it writes Complete.
    let completed: HashMap<String, k8s_openapi::jiff::Timestamp> = jobs
        .iter()
        .filter_map(|j| {
            let by_kcm = j.metadata.managed_fields.as_ref()?.iter().filter(|f| f.manager.as_deref() == Some("kube-controller-manager") && f.subresource.as_deref() == Some("status"));
            Some((j.name_any(), by_kcm.filter_map(|f| f.time.as_ref().map(|t| t.0)).max()?))
        })
        .collect();
    let mut lags = Vec::new();
    let mut planned = 0;
    for w in &wfs {
        for s in &w.status.as_ref().unwrap().steps {
            assert_eq!(s.attempt, 0, "{}/{}: retried ({:?})", w.name_any(), s.step_name, s.message);
            planned += s.attempt as usize + 1;
            let jn = s.job_name.as_ref().unwrap_or_else(|| panic!("{}/{}: no Job recorded", w.name_any(), s.step_name));
            assert_eq!(s.job_uid.as_ref(), by_name.get(jn), "{}/{}: the recorded Job UID is the one Job of that name", w.name_any(), s.step_name);
            if let (Some(done), Some(recorded)) = (completed.get(jn), s.finished_at.as_ref())
                && *done >= since
            {
                let lag = recorded.0.as_second() - done.as_second();
                if lag > 10 {
                    eprintln!("slow: {}/{} Job {jn} marked Complete at {done}, recorded Succeeded at {} ({lag}s)", w.name_any(), s.step_name, recorded.0);
                }
                lags.push(lag);
            }
        }
    }
    assert_eq!(planned, WORKFLOWS * STEPS);
    assert_eq!(jobs.len(), planned, "one Job per planned step attempt");
    lags.sort();
    lags
}

/// `WORKFLOWS` five-step workflows on 3 replicas (lease 5 s, renew deadline 3 s, retry 1 s,
/// the default 5-minute resync), with `outage` once a third of them have made progress.
async fn workflows_through(name: &str, outage: Outage) {
    let _turn = common::HEAVY.acquire().await.unwrap();
    let cluster = OwnCluster::up(name).await;
    let client = shoal::dev::client_from(&cluster.cluster.kubeconfig).await.unwrap();
    let ops = common::namespace(&client, &format!("{name}-ops")).await;
    let ns = common::namespace(&client, name).await;
    let mut op = Operator::on_cluster(&ops, &ns, cluster.cluster.kubeconfig.clone());
    op.extra_args = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s", "--resync", "5m"].map(String::from).to_vec();
    for r in ["r1", "r2", "r3"] {
        op.start_with(r, r, &[("RUST_LOG", LOG)]);
    }
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    common::eventually(Duration::from_secs(90), "all 32 shards held", || async { (op.metric_sum("shoal_shards_owned").await == 32.0).then_some(()) }).await;

    let t0 = Instant::now();
    // A step's deadline counts from its Job's start, through an outage too: an outage longer
    // than the default 60 s timeout, plus the Job controller's own recovery, fails the steps
    // that were running when it began ("attempt 0 timed out"). That is the timeout doing what
    // it says, not lost work, so the long outage runs its steps without a deadline.
    let max_step_timeout = matches!(outage, Outage::Kill(d) if d > OUTAGE).then_some(-1);
    let creates = (0..WORKFLOWS).map(|i| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &wf(&format!("w{i:03}"), five_steps(i, max_step_timeout))).await.unwrap() }
    });
    futures::future::join_all(creates).await;
    common::eventually(Duration::from_secs(120), "a third of the workflows progressing", || async {
        let l = api.list(&ListParams::default()).await.ok()?;
        (l.items.iter().filter(|w| w.status.as_ref().is_some_and(|s| !s.executed_steps.is_empty())).count() >= WORKFLOWS / 3).then_some(())
    })
    .await;
    let (done_before, _) = count_phases(&api).await.unwrap();

    if let Outage::Hang(_) = outage {
        // Hang it right as a Job completes: the replica that owns the step is then reading
        // the step's output, and the hang catches it between that read and its status write.
        next_job_completion(&client, &ns).await;
    }
    let mut last_restart: HashMap<String, Instant> = HashMap::new();
    // Each replica restart: which, and how long after the outage began.
    let mut restarts: Vec<(String, f64)> = Vec::new();
    let cpu_before = op.cpu_seconds();
    let outage_started = Instant::now();
    let outage_wall = k8s_openapi::jiff::Timestamp::now();
    let mut supervise = |op: &mut Operator, restarts: &mut Vec<(String, f64)>| {
        for r in restart_exited(op, &mut last_restart) {
            restarts.push((r, outage_started.elapsed().as_secs_f64()));
        }
    };
    let wait_out = |d: Duration| {
        let until = Instant::now() + d;
        async move {
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    match outage {
        Outage::None => {}
        Outage::Hang(d) => {
            kill(cluster.apiserver(), Signal::SIGSTOP).unwrap();
            wait_out(d).await;
            supervise(&mut op, &mut restarts);
            kill(cluster.apiserver(), Signal::SIGCONT).unwrap();
        }
        Outage::Kill(d) => {
            kill(cluster.apiserver(), Signal::SIGKILL).unwrap();
            // The replicas are supervised while the API server is away: one that exits is
            // started again (and fails again until the API server is back).
            let until = Instant::now() + d;
            while Instant::now() < until {
                supervise(&mut op, &mut restarts);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let cpu_after = op.cpu_seconds();
    let window = outage_started.elapsed().as_secs_f64();
    if let Outage::Kill(_) = outage {
        shoal::dev::restart(&cluster.dir, APISERVER).await.expect("restarting the API server");
    }
    let back = Instant::now();

    let deadline = back + AFTER_OUTAGE;
    let mut last_report = Instant::now();
    loop {
        supervise(&mut op, &mut restarts);
        if let Some((done, failed)) = count_phases(&api).await {
            if let Some(f) = failed.first() {
                let st = f.status.as_ref().unwrap();
                let steps: Vec<String> = st.steps.iter().map(|s| format!("{}: {:?} {:?}", s.step_name, s.phase, s.message)).collect();
                panic!("{name}: workflow {} Failed: {:?}; steps {steps:?}", f.name_any(), st.message);
            }
            if done == WORKFLOWS {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(20) {
                eprintln!("{name}: {done}/{WORKFLOWS} Completed, {:.0}s after the API server came back", back.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
        }
        if Instant::now() > deadline {
            let l = api.list(&ListParams::default()).await.unwrap();
            let stuck: Vec<String> = l
                .items
                .iter()
                .filter(|w| w.status.as_ref().and_then(|s| s.workflow_status) != Some(WorkflowPhase::Completed))
                .map(|w| {
                    let st = w.status.as_ref();
                    format!("{} {:?} {:?}", w.name_any(), st.and_then(|s| s.workflow_status), st.and_then(|s| s.progress.clone()))
                })
                .collect();
            panic!("{name}: {} workflows not Completed {AFTER_OUTAGE:?} after the API server came back: {stuck:?}", stuck.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = t0.elapsed();
    let after = back.elapsed();
    // How long after its Job was marked Complete shoal recorded each step whose Job completed
    // after the outage began. The cluster's own controllers (the Job controller, kwok) also
    // recover from the outage, with back-offs of their own, so this, not the time to finish,
    // says whether shoal reacted promptly.
    let lags = assert_one_job_per_attempt(&client, &ns, outage_wall).await;
    let lag_max = lags.last().copied().unwrap_or(0);
    let lag_p50 = lags.get(lags.len() / 2).copied().unwrap_or(0);

    // CPU of the processes that ran through the whole outage (a restarted one is another).
    let restarted = |r: &String| restarts.iter().any(|(x, at)| x == r && *at <= window + 0.5);
    let cpu_used: Vec<(String, f64)> = cpu_before.iter().filter(|(r, _)| !restarted(r)).filter_map(|(r, c)| Some((r.clone(), cpu_after.get(r)? - c))).collect();
    let cpu: Vec<String> = cpu_used.iter().map(|(r, c)| format!("{r} {c:.2}s")).collect();
    let exits: Vec<String> = restarts.iter().map(|(r, at)| format!("{r} at {at:.1}s")).collect();
    eprintln!(
        "{name}: {WORKFLOWS} workflows x {STEPS} steps, 3 replicas, outage {outage:?} ({done_before} Completed before it): all Completed {:.1}s after creation, {:.1}s after the API server was back; \
         replica CPU during the {window:.1}s outage: {}; replicas that exited and were restarted (after the outage began): {}; \
         {} steps whose Job was marked Complete after the outage began, recorded Succeeded p50 {lag_p50}s, max {lag_max}s after that",
        total.as_secs_f64(),
        after.as_secs_f64(),
        cpu.join(", "),
        if exits.is_empty() { "none".to_string() } else { exits.join(", ") },
        lags.len(),
    );
    // Measured: at most 1-2 s. A watch left waiting out a back-off that the outage grew
    // (instead of relisting as soon as the API server is back) made it 16-30 s.
    assert!(lag_max <= 20, "a step was recorded {lag_max}s after its Job was marked Complete");
    match outage {
        // Shorter than the exit bound (four leases, 20 s here, and more): each replica rides
        // it out and recovers by itself.
        Outage::Hang(d) | Outage::Kill(d) if d <= OUTAGE => assert!(restarts.is_empty(), "no replica exits over an outage shorter than its exit bound: {exits:?}"),
        // Longer than any exit bound (30 s at most): every replica gives up, at its own time.
        Outage::Kill(_) => {
            for r in ["r1", "r2", "r3"] {
                assert!(restarts.iter().any(|(x, at)| x == r && *at < window), "{r} did not exit during the outage: {exits:?}");
            }
        }
        _ => {}
    }
    for (r, used) in cpu_used.iter().filter(|_| !matches!(outage, Outage::None)) {
        assert!(*used < window * 0.3, "{r} used {used:.2} CPU seconds in a {window:.1}s outage: it spins");
    }
    drop(op);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_api_server_loses_no_workflow() {
    workflows_through("outage-hang", Outage::Hang(OUTAGE)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_and_restarted_api_server_loses_no_workflow() {
    workflows_through("outage-kill", Outage::Kill(OUTAGE)).await;
}

/// An outage longer than the lease loop's exit bound: every replica exits (each at its own
/// time, within 4 to 6 lease durations), is restarted by the test as Kubernetes would, and
/// the new processes take over once the API server is back.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_that_exit_in_a_long_outage_are_restarted_and_lose_no_workflow() {
    workflows_through("outage-long", Outage::Kill(LONG_OUTAGE)).await;
}

/// The same run without an outage, for comparison (`--ignored`).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn baseline_without_outage() {
    workflows_through("outage-none", Outage::None).await;
}
