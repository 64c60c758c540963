//! One scenario, start to end: the control plane, the bare-Job ceiling, the replicas, the
//! load, the sampling (and chaos) loop, then the figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::observe::{BARE_LABEL, Observer, workflow_resource};
use super::procs::{self, Replicas};
use super::report::{Bare, Correctness, Cpu, Idle, Machine, ReplicaFigures, Results, Sample, Settle, SettleSample, Writes};
use super::scenario::{BareRun, Executor};
use super::{Args, Scenario, writes};
use crate::api::workflow::WorkflowPhase;
use crate::controllers::workflow::{WORKFLOW_LABEL, WORKFLOW_UID_LABEL};

/// Label on every namespace and object the harness creates.
pub const RUN_LABEL: &str = "loadtest.shoal.dev/run";

/// The cluster a run drives.
pub struct Target {
    pub kubeconfig: PathBuf,
    /// The local control plane's directory, when the harness started it.
    pub local: Option<PathBuf>,
    pub client: Client,
}

impl Target {
    pub async fn start(args: &Args, name: &str) -> Result<Self> {
        if args.existing {
            let kubeconfig = args.kubeconfig.clone().context("--existing needs KUBECONFIG or --kubeconfig")?;
            let client = client(&kubeconfig).await?;
            return Ok(Self { kubeconfig, local: None, client });
        }
        let dir = std::env::temp_dir().join(format!("shoal-loadtest-{name}-{:08x}", rand32()));
        let mut opts = crate::dev::UpOptions::new(&dir);
        opts.audit = true;
        let c = crate::dev::up(&opts).await?;
        let client = client(&c.kubeconfig).await?;
        let target = Self { kubeconfig: c.kubeconfig, local: Some(dir), client };
        let bin = shoal_bin(args)?;
        if bin != std::env::current_exe()? {
            // The operator under test brings its own API: a build whose CRDs have fields this
            // one's lack (spec.executor, spec.podGC, status.executor) would have them pruned.
            if let Err(e) = apply_crds_of(&bin, &target.client).await {
                target.stop(false);
                return Err(e);
            }
        }
        Ok(target)
    }

    /// Stop the local control plane and remove its files (unless kept).
    pub fn stop(&self, keep: bool) {
        if let Some(dir) = &self.local {
            if keep {
                eprintln!("control plane left running: KUBECONFIG={}; stop: shoal dev down --dir {}", self.kubeconfig.display(), dir.display());
                return;
            }
            let _ = crate::dev::down(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    pub fn audit_log(&self) -> Option<PathBuf> {
        self.local.as_ref().map(|d| d.join("logs/audit.log"))
    }
}

/// Apply the CRDs that `bin crds` prints (server-side, forced) and wait until they serve.
async fn apply_crds_of(bin: &Path, client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let out = tokio::process::Command::new(bin).arg("crds").output().await.with_context(|| format!("{} crds", bin.display()))?;
    anyhow::ensure!(out.status.success(), "{} crds: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    let crds = parse_crds(&String::from_utf8_lossy(&out.stdout))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in &crds {
        api.patch(&crd.name_any(), &PatchParams::apply("shoal-loadtest").force(), &Patch::Apply(crd)).await.with_context(|| format!("applying CRD {}", crd.name_any()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in &crds {
        loop {
            let got = api.get(&crd.name_any()).await?;
            let conds = got.status.and_then(|s| s.conditions).unwrap_or_default();
            if conds.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "CRD {} not established after 30 s", crd.name_any());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("CRDs of {} applied ({})", bin.display(), crds.len());
    Ok(())
}

/// The CRDs of a multi-document YAML stream (`shoal crds`).
pub fn parse_crds(yaml: &str) -> Result<Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = serde_json::Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(serde_json::from_value(v)?);
        }
    }
    anyhow::ensure!(!out.is_empty(), "no CRDs in the output of `crds`");
    Ok(out)
}

/// A client whose requests the audit log names as the harness's.
pub async fn client(kubeconfig: &Path) -> Result<Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    cfg.read_timeout = Some(Duration::from_secs(60));
    cfg.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(&format!("{}/{}", super::USER_AGENT, env!("CARGO_PKG_VERSION")))?));
    Ok(Client::try_from(cfg)?)
}

pub fn rand32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}

pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

pub async fn create_namespace(client: &Client, name: &str, run: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": {RUN_LABEL: run, "shoal.dev/test": "true"}}}))?;
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Delete the namespaces of run `run` (on a cluster the harness did not start).
pub async fn cleanup_namespaces(target: &Target, run: &str) {
    if target.local.is_some() {
        return;
    }
    let api: Api<Namespace> = Api::all(target.client.clone());
    if let Ok(l) = api.list(&ListParams::default().labels(&format!("{RUN_LABEL}={run}"))).await {
        for ns in l.items {
            let _ = api.delete(&ns.name_any(), &DeleteParams::background()).await;
        }
    }
}

/// Retry a create a few times (the API server may refuse under load); true once it exists.
pub async fn create_retrying<K>(api: &Api<K>, obj: &K) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    for attempt in 0..8u64 {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 409 => return true,
            Err(_) => tokio::time::sleep(Duration::from_millis(250 * (attempt + 1))).await,
        }
    }
    false
}

/// The operator binary replicas run.
pub fn shoal_bin(args: &Args) -> Result<PathBuf> {
    match &args.shoal_bin {
        Some(b) => Ok(b.clone()),
        None => Ok(std::env::current_exe()?),
    }
}

/// Run one scenario on a target of its own.
pub async fn run_scenario(args: &Args, sc: &Scenario) -> Result<Results> {
    let load_before = procs::loadavg();
    let started_at = now_rfc3339();
    eprintln!("== {}: {} (load average {:.2} {:.2} {:.2})", sc.name, sc.description, load_before[0], load_before[1], load_before[2]);
    let target = Target::start(args, &sc.name).await?;
    let result = match sc.kind {
        super::scenario::Kind::Workflows => run_workflows(args, sc, &target).await,
        super::scenario::Kind::Namespacemanagers => super::nsman::run(args, sc, &target).await,
    };
    target.stop(args.keep);
    let mut r = result?;
    r.started_at = started_at;
    r.machine = Machine::here(load_before, procs::loadavg(), &shoal_bin(args)?, target.local.is_some());
    if starts_replicas(args) {
        r.machine.operator_env.extend(sc.env.clone());
    }
    Ok(r)
}

/// Namespaces `<prefix>NN`.
pub fn namespace_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

pub async fn start_replicas(args: &Args, sc: &Scenario, target: &Target, run: &str, watch_ns: Option<String>) -> Result<Option<Replicas>> {
    if !starts_replicas(args) {
        if !sc.env.is_empty() {
            eprintln!("the scenario's env is not applied: the cluster's own operator runs the workflows");
        }
        return Ok(None);
    }
    let ops = format!("lt-{run}-ops");
    create_namespace(&target.client, &ops, run).await?;
    let dir = std::env::temp_dir().join(format!("shoal-loadtest-{run}-replicas"));
    std::fs::create_dir_all(&dir)?;
    let mut reps = Replicas::new(shoal_bin(args)?, target.kubeconfig.clone(), ops, watch_ns, dir);
    reps.env = sc.env.clone();
    for i in 1..=sc.replicas {
        reps.start(&format!("r{i}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let held = reps.metric_sum("shoal_shards_owned").await;
        if held >= 32.0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the replicas hold {held} of 32 shards after 180 s; logs in {}", reps.dir.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Some(reps))
}

pub fn progress(args: &Args, len: usize, what: &str) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(&format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}}")).unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style.progress_chars("=> "));
    pb
}

/// How long the API server's CPU is profiled in each phase of a run on the local control
/// plane, starting this long after the phase begins.
pub const PROFILE: (Duration, u32) = (Duration::from_secs(10), 20);

/// A CPU profile of the API server (`/debug/pprof/profile`, gzipped protobuf for `go tool
/// pprof`) taken `PROFILE.1` seconds from `PROFILE.0` after now; on the local control plane
/// only (another cluster's API server is not ours to profile).
fn profile_apiserver(target: &Target) -> Option<tokio::task::JoinHandle<Option<Vec<u8>>>> {
    target.local.as_ref()?;
    let client = target.client.clone();
    Some(tokio::spawn(async move {
        tokio::time::sleep(PROFILE.0).await;
        let req = http::Request::get(format!("/debug/pprof/profile?seconds={}", PROFILE.1)).body(Vec::new()).ok()?;
        let mut body = Box::pin(client.request_stream(req).await.map_err(|e| eprintln!("API server profile: {e}")).ok()?);
        let mut buf = Vec::new();
        futures::AsyncReadExt::read_to_end(&mut body, &mut buf).await.ok()?;
        Some(buf)
    }))
}

/// The profile `h` took, if it finished (it is not waited for past the phase's end).
async fn profile_taken(h: Option<tokio::task::JoinHandle<Option<Vec<u8>>>>) -> Option<Vec<u8>> {
    let h = h?;
    if !h.is_finished() {
        h.abort();
        return None;
    }
    h.await.ok().flatten()
}

/// A bare Job or bare pod of the ceiling run: the step's pod (same image, command and kwok
/// delay) with nothing of the operator's around it.
pub fn bare_object(kind: Executor, i: usize, delay: &str) -> serde_json::Value {
    let name = format!("bare-{i:06}");
    let annotations = json!({crate::dev::DELAY_ANNOTATION: delay});
    let pod_spec = json!({"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]});
    match kind {
        Executor::Job => json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {BARE_LABEL: "true"}},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"annotations": annotations}, "spec": pod_spec}}
        }),
        Executor::Pod => json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {BARE_LABEL: "true"}, "annotations": annotations},
            "spec": pod_spec
        }),
    }
}

fn bare_resource(kind: Executor) -> ApiResource {
    match kind {
        Executor::Job => ApiResource::erase::<Job>(&()),
        Executor::Pod => ApiResource::erase::<Pod>(&()),
    }
}

/// The ceiling: `n` bare Jobs or bare pods (same pod duration, same namespaces' count), no
/// operator, all created at once; objects finished per second. Their namespaces are deleted
/// afterwards, and the run waits until they are gone, so the operator's run starts clean.
async fn bare_ceiling(args: &Args, sc: &Scenario, kind: Executor, target: &Target, run: &str, obs: &Observer) -> Result<Bare> {
    let n = sc.count * sc.steps_per_workflow();
    let noun = match kind {
        Executor::Job => "Jobs",
        Executor::Pod => "pods",
    };
    let nss = namespace_names(&format!("lt-{run}-b"), sc.namespaces);
    for ns in &nss {
        create_namespace(&target.client, ns, run).await?;
    }
    let totals_before = writes::request_totals(&target.client).await.unwrap_or_default();
    let audit_from = now_rfc3339();
    let pb = progress(args, n, &format!("bare {noun} done"));
    let cp_pids = target.local.as_deref().map(procs::control_plane_pids).unwrap_or_default();
    let (cp_before, busy_before) = (procs::cpu_by_name(&cp_pids), procs::machine_busy_s());
    let profile = profile_apiserver(target);
    let t_start = obs.now();
    let delay = super::scenario::go_duration(sc.step_duration);
    let (client, nss2, ar) = (target.client.clone(), nss.clone(), bare_resource(kind));
    let creator = tokio::spawn(async move {
        futures::stream::iter(0..n)
            .map(|i| {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &nss2[i % nss2.len()], &ar);
                let obj: DynamicObject = serde_json::from_value(bare_object(kind, i, &delay)).expect("a bare object");
                async move { create_retrying(&api, &obj).await }
            })
            .buffer_unordered(32)
            .filter(|ok| futures::future::ready(*ok))
            .count()
            .await
    });
    let deadline = Instant::now() + sc.timeout;
    let mut interrupted = false;
    loop {
        let done = obs.state.lock().map(|s| s.bare.values().filter(|j| j.done.is_some()).count()).unwrap_or(0);
        pb.set_position(done as u64);
        if done >= n || Instant::now() > deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
        }
    }
    pb.finish_and_clear();
    let control_plane_s = procs::cpu_delta(&procs::cpu_by_name(&cp_pids), &cp_before);
    let machine_busy_s = procs::machine_busy_s() - busy_before;
    let created = if creator.is_finished() {
        creator.await.unwrap_or(0)
    } else {
        creator.abort();
        0
    };
    let (done, last) = {
        let s = obs.state.lock().map_err(|_| anyhow::anyhow!("observer lock"))?;
        (s.bare.values().filter(|j| j.done.is_some()).count(), s.bare.values().filter_map(|j| j.done).fold(t_start, f64::max))
    };
    let totals_after = writes::request_totals(&target.client).await.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let audit = target.audit_log().and_then(|p| writes::read_audit(&p, &audit_from, &now_rfc3339()).ok());
    let duration = last - t_start;
    eprintln!("bare {noun}: {done}/{n} done in {duration:.1} s ({:.1} {noun}/s)", done as f64 / duration.max(1e-9));
    // Clean ground for the operator's run.
    let t_clean = Instant::now();
    let api: Api<Namespace> = Api::all(target.client.clone());
    for ns in &nss {
        let _ = api.delete(ns, &DeleteParams::background()).await;
    }
    let clean_deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < clean_deadline && !interrupted {
        let left =
            api.list(&ListParams::default().labels(&format!("{RUN_LABEL}={run}"))).await.map(|l| l.items.iter().filter(|n| n.name_any().starts_with(&format!("lt-{run}-b"))).count()).unwrap_or(1);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Bare {
        kind,
        objects: n,
        created,
        done,
        duration_s: duration,
        per_s: done as f64 / duration.max(1e-9),
        writes_by_verb: writes::delta(&totals_before, &totals_after),
        audit,
        cleanup_s: t_clean.elapsed().as_secs_f64(),
        control_plane_s,
        machine_busy_s,
        interrupted,
        apiserver_profile: profile_taken(profile).await,
    })
}

/// The API server's write counter at one moment.
struct Snapshot {
    at: Instant,
    rfc3339: String,
    totals: BTreeMap<String, f64>,
}

impl Snapshot {
    /// The moment is taken before the request: the API server reads its counter as the
    /// request arrives, and a large metrics page can take a second to come back under load,
    /// which would shift the audit log's window against the counter's.
    async fn take(client: &Client) -> Self {
        let (at, rfc3339) = (Instant::now(), now_rfc3339());
        let totals = writes::request_totals(client).await.unwrap_or_default();
        Self { at, rfc3339, totals }
    }
}

/// The other clients' Lease writes a second, from `since` (the run's start) to now, waiting
/// until at least `window` has passed: nothing of the operator runs yet.
async fn lease_baseline(client: &Client, since: &Snapshot, window: Duration) -> (f64, f64) {
    let waited = since.at.elapsed();
    if waited < window {
        tokio::time::sleep(window - waited).await;
    }
    let now = Snapshot::take(client).await;
    let secs = (now.at - since.at).as_secs_f64();
    (writes::lease_total(&writes::delta(&since.totals, &now.totals)) / secs.max(1e-9), secs)
}

/// The replicas idle for the scenario's `idle`, holding every shard: their CPU and the API
/// server's writes (the operator's Lease writes from the audit log are added at the end).
async fn measure_idle(sc: &Scenario, client: &Client, reps: Option<&Replicas>, baseline: Option<(f64, f64)>) -> (Idle, (String, String)) {
    let from = Snapshot::take(client).await;
    let cpu_from = reps.map(Replicas::total_cpu).unwrap_or(0.0);
    tokio::time::sleep(sc.idle).await;
    let cpu_to = reps.map(Replicas::total_cpu).unwrap_or(0.0);
    let to = Snapshot::take(client).await;
    let window_s = (to.at - from.at).as_secs_f64();
    let writes_by_verb = writes::delta(&from.totals, &to.totals);
    let lease_writes = writes::lease_total(&writes_by_verb);
    let replicas = reps.map(|r| r.list.len()).unwrap_or(sc.replicas);
    let idle = Idle {
        window_s,
        replicas,
        cpu_s_per_s: (cpu_to - cpu_from) / window_s.max(1e-9),
        lease_per_s_per_replica: Idle::per_replica(lease_writes, window_s, baseline.map(|b| b.0), replicas),
        writes_by_verb,
        lease_writes,
        baseline_lease_per_s: baseline.map(|b| b.0),
        baseline_window_s: baseline.map(|b| b.1).unwrap_or(0.0),
        audit_operator_lease_writes: None,
        audit_lease_per_s_per_replica: None,
    };
    (idle, (from.rfc3339, to.rfc3339))
}

async fn run_workflows(args: &Args, sc: &Scenario, target: &Target) -> Result<Results> {
    let run = format!("{:06x}", rand32() & 0xff_ffff);
    let obs = Observer::new(format!("lt-{run}-"));
    let watches = obs.spawn(&target.client);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run_start = Snapshot::take(&target.client).await;

    let bare = match sc.bare_run() {
        BareRun::Job => Some(bare_ceiling(args, sc, Executor::Job, target, &run, &obs).await?),
        BareRun::Pod => Some(bare_ceiling(args, sc, Executor::Pod, target, &run, &obs).await?),
        BareRun::None => None,
    };
    if bare.as_ref().is_some_and(|b| b.interrupted) {
        for w in &watches {
            w.abort();
        }
        let mut r = Results::empty(sc);
        r.interrupted = true;
        r.bare = bare;
        return Ok(r);
    }

    let nss = namespace_names(&format!("lt-{run}-w"), sc.namespaces);
    for ns in &nss {
        create_namespace(&target.client, ns, &run).await?;
    }
    let watch_ns = (args.existing && sc.namespaces == 1).then(|| nss[0].clone());
    // The other clients' Lease writes, before any replica of ours runs (an operator already
    // running on an existing cluster would be in it: no baseline then).
    let baseline = if starts_replicas(args) { Some(lease_baseline(&target.client, &run_start, sc.idle).await) } else { None };
    let mut reps = start_replicas(args, sc, target, &run, watch_ns).await?;
    let cp_pids = target.local.as_deref().map(procs::control_plane_pids).unwrap_or_default();

    // The replicas' upkeep, so the work's own share can be told.
    let (mut idle, idle_window) = measure_idle(sc, &target.client, reps.as_ref(), baseline).await;
    let cpu_at_start = reps.as_ref().map(Replicas::total_cpu).unwrap_or(0.0);

    let audit_from = now_rfc3339();
    let totals_before = writes::request_totals(&target.client).await.unwrap_or_default();
    let cp_before = procs::cpu_by_name(&cp_pids);
    let busy_before = procs::machine_busy_s();
    let profile = profile_apiserver(target);
    let t_load = obs.now();

    let creator = spawn_creator(sc, &target.client, &nss, &run, &obs);
    let pb = progress(args, sc.count, "workflows ended");
    let deadline = Instant::now() + sc.timeout;
    let mut series = Vec::new();
    let mut interrupted = false;
    let mut timed_out = false;
    let mut next_kill = sc.chaos.as_ref().map(|c| Instant::now() + c.every);
    let mut victim = 0usize;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => { interrupted = true; }
        }
        let (ended, created, jobs_done) = {
            let s = obs.state.lock().map_err(|_| anyhow::anyhow!("observer lock"))?;
            (s.workflows.values().filter(|w| w.ended.is_some()).count(), s.workflows.values().filter(|w| w.created.is_some()).count(), s.steps.values().filter(|j| j.done.is_some()).count())
        };
        let t = obs.now() - t_load;
        let replicas = reps.as_mut().map(|r| r.poll()).unwrap_or_default();
        let cp = procs::cpu_by_name(&cp_pids);
        series.push(Sample { t, created, ended, jobs_done, replicas: replicas.iter().map(|(n, c, m)| (n.clone(), (*c, *m))).collect(), control_plane_cpu: cp });
        pb.set_position(ended as u64);
        pb.set_message(format!("(created {created}, steps done {jobs_done})"));
        if args.quiet && series.len() % 10 == 0 {
            eprintln!("{t:.0}s: created {created}, ended {ended}/{}, steps done {jobs_done}", sc.count);
        }
        if interrupted || (ended >= sc.count && creator.is_finished()) {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        if let (Some(at), Some(r), Some(chaos)) = (next_kill, reps.as_mut(), sc.chaos.as_ref())
            && Instant::now() >= at
        {
            let i = victim % r.list.len();
            r.kill_and_restart(i)?;
            pb.println(format!("chaos: kill -9 {} at {t:.1}s, started again", r.list[i].name));
            victim += 1;
            next_kill = Some(at + chaos.every);
        }
    }
    pb.finish_and_clear();
    if !creator.is_finished() {
        creator.abort();
    }
    let t_end = obs.now();
    let cpu_total = reps.as_ref().map(Replicas::total_cpu).unwrap_or(0.0);
    let cp_after = procs::cpu_by_name(&cp_pids);
    let busy = procs::machine_busy_s() - busy_before;
    let operator_profile = profile_taken(profile).await;
    let audit_to = now_rfc3339();
    let totals_after = writes::request_totals(&target.client).await.unwrap_or_default();
    let pages = match &reps {
        Some(r) => r.pages().await,
        None => vec![],
    };
    let actions = reps.as_ref().map(Replicas::action_logs).unwrap_or_default();
    let replica_figs: Vec<ReplicaFigures> = reps.as_mut().map(Replicas::figures).unwrap_or_default();
    let settled = match sc.settle {
        Some(window) if !interrupted => Some(settle(args, sc, &target.client, &run, reps.as_mut(), window).await),
        _ => None,
    };
    // Stop the operator before reading the audit log: its batches are flushed within a second.
    let replica_dir = reps.as_ref().map(|r| r.dir.clone());
    drop(reps);
    for w in &watches {
        w.abort();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let audit_of = |from: &str, to: &str| target.audit_log().and_then(|p| writes::read_audit(&p, from, to).ok());
    let audit = audit_of(&audit_from, &audit_to);
    if let Some(a) = audit_of(&idle_window.0, &idle_window.1) {
        let n = a.lease_writes("shoal");
        idle.audit_operator_lease_writes = Some(n);
        idle.audit_lease_per_s_per_replica = Some(n as f64 / idle.window_s.max(1e-9) / idle.replicas.max(1) as f64);
    }
    let settled = settled.map(|(mut st, window)| {
        st.audit = audit_of(&window.0, &window.1);
        st
    });
    if let Some(d) = replica_dir {
        let _ = std::fs::remove_dir_all(d);
    }

    let state = std::mem::take(&mut *obs.state.lock().map_err(|_| anyhow::anyhow!("observer lock"))?);
    let mut r = Results::empty(sc);
    r.interrupted = interrupted;
    r.timed_out = timed_out;
    r.figures_from_observed(sc, &state, t_load, t_end);
    let steps_done = r.steps_done as f64;
    r.cpu = Some(Cpu {
        replicas: replica_figs,
        total_s: cpu_total - cpu_at_start,
        idle_rate_s_per_s: idle.cpu_s_per_s,
        per_step_ms: (cpu_total - cpu_at_start) / steps_done.max(1.0) * 1000.0,
        per_step_ms_net_of_idle: ((cpu_total - cpu_at_start) - idle.cpu_s_per_s * (t_end - t_load)).max(0.0) / steps_done.max(1.0) * 1000.0,
        control_plane_s: procs::cpu_delta(&cp_after, &cp_before),
        machine_busy_s: busy,
        window_s: t_end - t_load,
        operator_dispatch_p50_le: crate::loadtest::report::histogram_quantile(&pages, "shoal_step_dispatch_latency_seconds", 0.5),
        operator_dispatch_p99_le: crate::loadtest::report::histogram_quantile(&pages, "shoal_step_dispatch_latency_seconds", 0.99),
        operator_breakdown: crate::loadtest::report::dispatch_breakdown(&pages, "workflow"),
    });
    r.writes = Some(Writes::new(writes::delta(&totals_before, &totals_after), audit, steps_done));
    r.correctness = Correctness::check(sc, &state, r.writes.as_ref(), &actions, &nss);
    cleanup_namespaces(target, &run).await;
    r.fraction_of_ceiling = bare.as_ref().map(|b| b.per_s).filter(|v| *v > 0.0).map(|v| r.steps_per_s / v);
    r.bare = bare;
    r.idle = Some(idle);
    r.settle = settled;
    r.series = series;
    r.apiserver_profile = operator_profile;
    Ok(r)
}

/// The `SHOAL_*` environment the replicas run with: the harness's own, and the scenario's.
fn operator_env(sc: &Scenario) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("SHOAL_")).collect();
    env.extend(sc.env.clone());
    env
}

/// Whether the harness starts the replicas (otherwise the cluster's operator runs them).
fn starts_replicas(args: &Args) -> bool {
    !args.existing || args.start_replicas
}

/// After the run: every few seconds for `window`, the run's workflows, Jobs and pods still in
/// the API and each replica's RSS; with the writes and the operator's CPU over the window
/// (the window's bounds are returned for the audit log, read once the replicas stop).
async fn settle(args: &Args, sc: &Scenario, client: &Client, run: &str, mut reps: Option<&mut Replicas>, window: Duration) -> (Settle, (String, String)) {
    let every = Duration::from_secs(5).max(window / 40);
    let from = Snapshot::take(client).await;
    let cpu_from = reps.as_deref().map(Replicas::total_cpu).unwrap_or(0.0);
    let pb = progress(args, window.as_secs() as usize, "s of settling");
    let mut samples = Vec::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let t = from.at.elapsed().as_secs_f64();
        let (workflows, jobs, pods) = left(client, run).await;
        let rss_mb = reps.as_deref_mut().map(|r| r.poll()).unwrap_or_default().into_iter().map(|(n, _, rss)| (n, rss)).collect();
        samples.push(SettleSample { t, workflows, jobs, pods, rss_mb });
        pb.set_position(t as u64);
        pb.set_message(format!("(left: {workflows} workflows, {jobs} Jobs, {pods} pods)"));
        if args.quiet {
            eprintln!("settling {t:.0}s: left {workflows} workflows, {jobs} Jobs, {pods} pods");
        }
        if from.at.elapsed() >= window {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(every.min(window.saturating_sub(from.at.elapsed()))) => {}
            _ = &mut ctrl_c => break,
        }
    }
    pb.finish_and_clear();
    let to = Snapshot::take(client).await;
    let st = Settle {
        window_s: (to.at - from.at).as_secs_f64(),
        samples,
        expected: super::report::policy_keeps(sc, &operator_env(sc)),
        writes_by_verb: writes::delta(&from.totals, &to.totals),
        audit: None,
        operator_cpu_s: reps.as_deref().map(Replicas::total_cpu).unwrap_or(0.0) - cpu_from,
    };
    (st, (from.rfc3339, to.rfc3339))
}

/// The run's workflows, step Jobs and step pods (a Job's or the Pod executor's) still in the
/// API, from metadata-only lists.
async fn left(client: &Client, run: &str) -> (usize, usize, usize) {
    let ours = format!("lt-{run}-w");
    let wf: Api<DynamicObject> = Api::all_with(client.clone(), &workflow_resource());
    let workflows = in_namespaces(wf.list_metadata(&ListParams::default().labels(&format!("{RUN_LABEL}={run}"))).await, &ours);
    let jobs = in_namespaces(Api::<Job>::all(client.clone()).list_metadata(&ListParams::default().labels(WORKFLOW_LABEL)).await, &ours);
    let pods = in_namespaces(Api::<Pod>::all(client.clone()).list_metadata(&ListParams::default().labels(WORKFLOW_UID_LABEL)).await, &ours);
    (workflows, jobs, pods)
}

/// Objects of a list in namespaces starting with `prefix` (0 if the list failed).
fn in_namespaces<K: Clone>(l: kube::Result<kube::core::ObjectList<kube::core::PartialObjectMeta<K>>>, prefix: &str) -> usize {
    l.map(|l| l.items.iter().filter(|o| o.metadata.namespace.as_deref().is_some_and(|n| n.starts_with(prefix))).count()).unwrap_or(0)
}

/// The workflow objects the harness creates: untyped, so spec fields this branch's API types
/// lack (`executor`, `podGC`, …) reach the API server.
pub fn workflow_object(name: &str, run: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name, "labels": {RUN_LABEL: run}}, "spec": spec})
}

/// Create the workflows, all at once (32 in flight) or at the scenario's rate.
fn spawn_creator(sc: &Scenario, client: &Client, nss: &[String], run: &str, obs: &Observer) -> tokio::task::JoinHandle<usize> {
    let (sc, client, nss, run, obs) = (sc.clone(), client.clone(), nss.to_vec(), run.to_string(), obs.clone());
    let ar = workflow_resource();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        futures::stream::iter(0..sc.count)
            .map(|i| {
                let (client, ns, obs, run) = (client.clone(), nss[i % nss.len()].clone(), obs.clone(), run.clone());
                let spec = sc.workflow_spec(i);
                let at = (sc.arrival_rate > 0.0).then(|| start + Duration::from_secs_f64(i as f64 / sc.arrival_rate));
                let ar = ar.clone();
                async move {
                    if let Some(at) = at {
                        tokio::time::sleep_until(at).await;
                    }
                    let name = format!("w{i:05}");
                    let wf: DynamicObject = serde_json::from_value(workflow_object(&name, &run, spec)).expect("a workflow");
                    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
                    obs.created(&ns, &name);
                    create_retrying(&api, &wf).await
                }
            })
            .buffer_unordered(32)
            .filter(|ok| futures::future::ready(*ok))
            .count()
            .await
    })
}

/// The phase workflow `i` must end in.
pub fn expected_phase(sc: &Scenario, i: usize) -> WorkflowPhase {
    if sc.fails(i) { WorkflowPhase::Failed } else { WorkflowPhase::Completed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_objects_carry_the_label_and_the_pods_delay() {
        let pod: Pod = serde_json::from_value(bare_object(Executor::Pod, 7, "500ms")).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("bare-000007"));
        assert!(pod.metadata.labels.unwrap().contains_key(BARE_LABEL));
        assert_eq!(pod.metadata.annotations.unwrap()[crate::dev::DELAY_ANNOTATION], "500ms");
        assert_eq!(pod.spec.unwrap().restart_policy.as_deref(), Some("Never"));
        let job: Job = serde_json::from_value(bare_object(Executor::Job, 7, "1s")).unwrap();
        assert!(job.metadata.labels.unwrap().contains_key(BARE_LABEL));
        let template = job.spec.unwrap().template;
        assert_eq!(template.metadata.unwrap().annotations.unwrap()[crate::dev::DELAY_ANNOTATION], "1s");
        assert!(template.spec.unwrap().containers[0].command.is_some());
    }

    #[test]
    fn crds_read_from_the_operators_own_stream() {
        let crds = parse_crds(&crate::api::crds::all_yaml()).unwrap();
        assert_eq!(crds.len(), crate::api::crds::all().len());
        assert!(crds.iter().any(|c| c.name_any() == "workflows.shoal.dev"));
        assert!(parse_crds("").is_err());
    }

    #[test]
    fn workflows_keep_spec_fields_the_api_types_lack() {
        let sc = Scenario::from_yaml("name: x\ncount: 1\nexecutor: Pod\nworkflowSpec: {podGC: {strategy: OnPodSuccess}}\n").unwrap();
        let wf: DynamicObject = serde_json::from_value(workflow_object("w00000", "r", sc.workflow_spec(0))).unwrap();
        let sent = serde_json::to_value(&wf).unwrap();
        assert_eq!((sent["spec"]["executor"].as_str(), sent["spec"]["podGC"]["strategy"].as_str()), (Some("Pod"), Some("OnPodSuccess")));
        assert_eq!((sent["kind"].as_str(), sent["metadata"]["labels"][RUN_LABEL].as_str()), (Some("Workflow"), Some("r")));
    }
}
