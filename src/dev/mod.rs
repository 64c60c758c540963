//! The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok, built from Go modules (tests/cluster) and started on 127.0.0.1 with free ports.
//!
//! `shoal dev up|down`, the integration tests and the load tests all use this module. It
//! starts only processes it can stop again: every pid and the binary it ran are recorded in
//! `DIR/state.json`, and `down` signals exactly those.
//!
//! [`receiver`] is the loopback webhook receiver of the outbox tests.

mod certs;
pub mod receiver;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::{Deserialize, Serialize};

use certs::Pki;

/// Kubernetes version of the control plane; it names the binary cache directory.
pub const K8S_VERSION: &str = "v1.35.4";
/// Label carried by the fake nodes that kwok manages.
pub const NODE_LABEL: (&str, &str) = ("type", "kwok");
/// Label that makes a kwok pod fail with the given exit code.
pub const EXIT_CODE_LABEL: &str = "kwok.shoal.dev/exit-code";
/// Env variable that makes a kwok pod fail (exit code 1) when its value equals the pod's
/// `ACTIVITY_WORKER_INDEX`: "fail worker N of an Activity".
pub const FAIL_WORKER_ENV: &str = "KWOK_FAIL_WORKER";
/// Annotation with a Go duration ("2s") after which a kwok pod finishes.
pub const DELAY_ANNOTATION: &str = "kwok.shoal.dev/delay";
/// Annotation whose value becomes a finished kwok pod's termination message.
pub const MESSAGE_ANNOTATION: &str = "kwok.shoal.dev/termination-message";

const GO_MOD: &str = include_str!("../../tests/cluster/go.mod");
const GO_SUM: &str = include_str!("../../tests/cluster/go.sum");
const BUILD_SH: &str = include_str!("../../tests/cluster/build.sh");
const KWOK_GO_MOD: &str = include_str!("../../tests/cluster/kwok/go.mod");
const KWOK_GO_SUM: &str = include_str!("../../tests/cluster/kwok/go.sum");
const HELM_GO_MOD: &str = include_str!("../../tests/cluster/helm/go.mod");
const HELM_GO_SUM: &str = include_str!("../../tests/cluster/helm/go.sum");
const KWOK_STAGES: &str = include_str!("kwok-stages.yaml");
const COMPONENTS: [&str; 7] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "kwok", "helm"];

/// Options of [`up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Where the cluster keeps its state, logs and kubeconfig.
    pub dir: PathBuf,
    /// Number of kwok nodes.
    pub nodes: usize,
    /// Build missing binaries (needs Go and its module proxy).
    pub build: bool,
    /// Install shoal's CRDs.
    pub install_crds: bool,
    /// Write an audit log of every write request (verb, resource, user agent) to
    /// `DIR/logs/audit.log`; the load tests count writes per client from it.
    pub audit: bool,
}

impl UpOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), nodes: 3, build: true, install_crds: true, audit: false }
    }
}

/// A running local control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevCluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub bin_dir: PathBuf,
    pub processes: Vec<Proc>,
    /// Seconds from the first process start to a ready cluster.
    pub start_seconds: f64,
}

/// One process this module started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: i32,
    pub exe: PathBuf,
    /// Its flags, so [`restart`] can start it again as it was.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Directory holding the control-plane binaries (`$SHOAL_CACHE_DIR` or `~/.cache/shoal`).
pub fn bin_dir() -> PathBuf {
    let base = std::env::var_os("SHOAL_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".cache/shoal")
    });
    base.join(format!("k8s-{K8S_VERSION}")).join("bin")
}

/// Make sure every control-plane binary is in [`bin_dir`], building what is missing from the
/// pinned Go modules. A second call finds them and does nothing.
pub fn ensure_binaries(build: bool) -> Result<PathBuf> {
    let bin = bin_dir();
    let missing: Vec<_> = COMPONENTS.iter().filter(|c| !bin.join(c).is_file()).collect();
    if missing.is_empty() {
        return Ok(bin);
    }
    if !build {
        bail!("control-plane binaries missing from {}: {missing:?}; run `make cluster` or `shoal dev up`", bin.display());
    }
    let src = bin.parent().unwrap_or(&bin).join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("go.mod"), GO_MOD)?;
    std::fs::write(src.join("go.sum"), GO_SUM)?;
    std::fs::write(src.join("build.sh"), BUILD_SH)?;
    std::fs::create_dir_all(src.join("kwok"))?;
    std::fs::write(src.join("kwok/go.mod"), KWOK_GO_MOD)?;
    std::fs::write(src.join("kwok/go.sum"), KWOK_GO_SUM)?;
    std::fs::create_dir_all(src.join("helm"))?;
    std::fs::write(src.join("helm/go.mod"), HELM_GO_MOD)?;
    std::fs::write(src.join("helm/go.sum"), HELM_GO_SUM)?;
    eprintln!("building the control plane ({missing:?}) into {}; this takes several minutes on a cold cache", bin.display());
    let status = Command::new("bash")
        .arg(src.join("build.sh"))
        .env("SHOAL_CACHE_DIR", bin.parent().and_then(Path::parent).unwrap_or(&bin))
        .status()
        .context("running the control-plane build (is Go installed?)")?;
    if !status.success() {
        bail!("control-plane build failed ({status})");
    }
    Ok(bin)
}

/// `n` distinct ports free on 127.0.0.1 now, chosen at random below the kernel's ephemeral
/// range: an outgoing connection never takes one, so a component can be stopped and started
/// again on its port (see [`restart`]). All are held until all are chosen, so they differ.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok()).unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(20_000));
    let mut held = Vec::new();
    for attempt in 0u32..10_000 {
        if held.len() == n {
            break;
        }
        let port = low + (random_u64(attempt) % u64::from(high - low)) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("found only {} free ports in {low}..{high}", held.len());
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn random_u64(salt: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(salt);
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn pid_alive(p: &Proc) -> bool {
    // Only count it alive if the pid still runs the binary we started (pids get reused).
    std::fs::read_link(format!("/proc/{}/exe", p.pid)).map(|e| e == p.exe).unwrap_or(false)
}

impl DevCluster {
    /// Load the state of a cluster started earlier in `dir`, if any.
    pub fn load(dir: &Path) -> Option<Self> {
        let raw = std::fs::read(state_path(dir)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// True if every recorded process still runs.
    pub fn all_alive(&self) -> bool {
        !self.processes.is_empty() && self.processes.iter().all(pid_alive)
    }

    /// A client for the admin user.
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }
}

/// A kube client for a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    cfg.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(cfg)?)
}

/// Start the local control plane in the background, or reuse the one already running in
/// `opts.dir`. Returns once the API server is ready, the nodes are Ready and schedulable,
/// the default service account exists and (optionally) the CRDs are established.
pub async fn up(opts: &UpOptions) -> Result<DevCluster> {
    let dir = std::path::absolute(&opts.dir)?;
    let result = start(opts, &dir).await;
    if result.is_err() {
        // Leave nothing running behind a failed start.
        let _ = down(&dir);
    }
    result
}

async fn start(opts: &UpOptions, dir: &Path) -> Result<DevCluster> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir)?;
    if let Some(existing) = DevCluster::load(&dir) {
        if existing.all_alive()
            && let Ok(client) = existing.client().await
            && client.apiserver_version().await.is_ok()
        {
            if opts.install_crds {
                install_crds(&client).await?;
            }
            return Ok(existing);
        }
        down(&dir)?;
    }
    let bin = ensure_binaries(opts.build)?;
    certs::ensure(&dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // A fresh etcd each time: a restarted dev cluster starts empty.
    let etcd_dir = dir.join("etcd");
    let _ = std::fs::remove_dir_all(&etcd_dir);

    let [etcd_port, peer_port, api_port, kcm_port, sched_port, kwok_port] = free_ports(6)?[..] else { bail!("free_ports") };
    let server = format!("https://127.0.0.1:{api_port}");
    let p = |rel: &str| dir.join(rel).display().to_string();

    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &p(Pki::CA_CRT), &p(Pki::ADMIN_CRT), &p(Pki::ADMIN_KEY)))?;
    let kc = kubeconfig.display().to_string();
    let sched_cfg = dir.join("scheduler.yaml");
    std::fs::write(
        &sched_cfg,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: {kc}\n  qps: 500\n  burst: 1000\nleaderElection:\n  leaderElect: false\n"
        ),
    )?;
    let stages = dir.join("kwok-stages.yaml");
    std::fs::write(&stages, KWOK_STAGES)?;
    let audit_flags = if opts.audit { audit_flags(&dir, &logs)? } else { vec![] };

    let started = Instant::now();
    let mut cluster = DevCluster { dir: dir.clone(), kubeconfig: kubeconfig.clone(), server: server.clone(), bin_dir: bin.clone(), processes: vec![], start_seconds: 0.0 };
    let spawn = |cluster: &mut DevCluster, name: &str, args: Vec<String>| -> Result<()> {
        let p = spawn_component(&bin.join(name), name, args, &logs, false)?;
        cluster.processes.push(p);
        std::fs::write(state_path(&cluster.dir), serde_json::to_vec_pretty(cluster)?)?;
        Ok(())
    };

    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    spawn(
        &mut cluster,
        "etcd",
        vec![
            format!("--data-dir={}", etcd_dir.display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--quota-backend-bytes=8589934592".into(),
            "--log-level=warn".into(),
        ],
    )?;
    spawn(
        &mut cluster,
        "kube-apiserver",
        vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p("pki")),
            format!("--tls-cert-file={}", p(Pki::SERVING_CRT)),
            format!("--tls-private-key-file={}", p(Pki::SERVING_KEY)),
            format!("--client-ca-file={}", p(Pki::CA_CRT)),
            format!("--service-account-key-file={}", p(Pki::SA_PUB)),
            format!("--service-account-signing-key-file={}", p(Pki::SA_KEY)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            "--max-requests-inflight=2000".into(),
            "--max-mutating-requests-inflight=1000".into(),
            // The load-test harness profiles the API server (loopback, admin credentials only).
            "--profiling=true".into(),
            "--v=0".into(),
        ]
        .into_iter()
        .chain(audit_flags)
        .collect(),
    )?;
    let client = wait_for_apiserver(&kubeconfig, Duration::from_secs(60), &cluster).await?;

    spawn(
        &mut cluster,
        "kube-controller-manager",
        vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", p("pki/kcm")),
            format!("--service-account-private-key-file={}", p(Pki::SA_KEY)),
            format!("--root-ca-file={}", p(Pki::CA_CRT)),
            "--use-service-account-credentials=false".into(),
            "--kube-api-qps=500".into(),
            "--kube-api-burst=1000".into(),
            "--concurrent-job-syncs=50".into(),
            "--concurrent-gc-syncs=50".into(),
            "--concurrent-namespace-syncs=20".into(),
            "--concurrent-deployment-syncs=20".into(),
            "--concurrent-replicaset-syncs=20".into(),
            "--concurrent-statefulset-syncs=20".into(),
            "--profiling=false".into(),
        ],
    )?;
    spawn(
        &mut cluster,
        "kube-scheduler",
        vec![
            format!("--config={}", sched_cfg.display()),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            format!("--cert-dir={}", p("pki/scheduler")),
            "--profiling=false".into(),
        ],
    )?;
    spawn(
        &mut cluster,
        "kwok",
        vec![
            format!("--kubeconfig={kc}"),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-label-selector={}={}", NODE_LABEL.0, NODE_LABEL.1),
            format!("--config={}", stages.display()),
            format!("--server-address=127.0.0.1:{kwok_port}"),
            "--node-ip=127.0.0.1".into(),
            "--cidr=10.244.0.0/16".into(),
        ],
    )?;

    create_nodes(&client, opts.nodes).await?;
    if opts.install_crds {
        install_crds(&client).await?;
    }
    wait_until_ready(&client, opts.nodes, Duration::from_secs(120), &cluster).await?;
    cluster.start_seconds = started.elapsed().as_secs_f64();
    std::fs::write(state_path(&dir), serde_json::to_vec_pretty(&cluster)?)?;
    Ok(cluster)
}

/// Audit policy: metadata of every write (no reads, no bodies), written in batches so the
/// log does not slow the requests it records.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: None\n  verbs: [get, list, watch]\n- level: Metadata\n";

fn audit_flags(dir: &Path, logs: &Path) -> Result<Vec<String>> {
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY)?;
    Ok(vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", logs.join("audit.log").display()),
        "--audit-log-mode=batch".into(),
        "--audit-log-format=json".into(),
        // No rotation (its default is 100 MB): one file holds the whole run.
        "--audit-log-maxsize=1000000".into(),
    ])
}

/// Start one component, its output written (or appended) to `logs/<name>.log`.
fn spawn_component(exe: &Path, name: &str, args: Vec<String>, logs: &Path, append: bool) -> Result<Proc> {
    let log = std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(logs.join(format!("{name}.log")))?;
    let child = Command::new(exe).args(&args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0).spawn().with_context(|| format!("starting {}", exe.display()))?;
    Ok(Proc { name: name.to_string(), pid: child.id() as i32, exe: exe.to_path_buf(), args })
}

/// Start component `name` of the cluster in `dir` again, with the flags it was started with
/// (same ports, same data), after it stopped or was killed; kills it first if it still runs.
/// Returns once the process is started; for the API server, once it is ready again. For
/// outage tests.
pub async fn restart(dir: &Path, name: &str) -> Result<Proc> {
    use nix::sys::signal::{Signal, kill};
    let mut cluster = DevCluster::load(dir).ok_or_else(|| anyhow!("no cluster in {}", dir.display()))?;
    let i = cluster.processes.iter().position(|p| p.name == name).ok_or_else(|| anyhow!("no component {name}"))?;
    let old = cluster.processes[i].clone();
    if old.args.is_empty() {
        bail!("{name} was started without recorded flags; start the cluster again");
    }
    if pid_alive(&old) {
        let _ = kill(nix::unistd::Pid::from_raw(old.pid), Signal::SIGKILL);
    }
    // Collect only this child: the caller's other children (say, operator replicas it
    // supervises) are its own to wait for.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(&old) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(old.pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    let p = spawn_component(&old.exe, name, old.args.clone(), &cluster.dir.join("logs"), true)?;
    cluster.processes[i] = p.clone();
    std::fs::write(state_path(&cluster.dir), serde_json::to_vec_pretty(&cluster)?)?;
    if name == "kube-apiserver" {
        wait_for_apiserver(&cluster.kubeconfig, Duration::from_secs(60), &cluster).await?;
    }
    Ok(p)
}

/// Stop exactly the processes `up` started in `dir` (newest first) and forget them.
pub fn down(dir: &Path) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(cluster) = DevCluster::load(dir) else {
        return Ok(());
    };
    for p in cluster.processes.iter().rev() {
        if pid_alive(p) {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.processes.iter().any(pid_alive) && Instant::now() < deadline {
        reap();
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in cluster.processes.iter().filter(|p| pid_alive(p)) {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
    }
    reap();
    std::fs::remove_file(state_path(dir)).ok();
    Ok(())
}

/// Collect exited children of this process, if `up` ran in it.
fn reap() {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if matches!(status, nix::sys::wait::WaitStatus::StillAlive) {
            break;
        }
    }
}

fn kubeconfig_yaml(server: &str, ca: &str, crt: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: shoal-dev\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: shoal-admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: shoal-dev\n  context:\n    cluster: shoal-dev\n    user: shoal-admin\n    namespace: default\ncurrent-context: shoal-dev\n"
    )
}

fn dead_component(cluster: &DevCluster) -> Option<String> {
    cluster.processes.iter().find(|p| !pid_alive(p)).map(|p| {
        let log = cluster.dir.join("logs").join(format!("{}.log", p.name));
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        format!("{} exited; last lines of {}:\n{}", p.name, log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    })
}

async fn wait_for_apiserver(kubeconfig: &Path, timeout: Duration, cluster: &DevCluster) -> Result<Client> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dead) = dead_component(cluster) {
            bail!(dead);
        }
        if let Ok(client) = client_from(kubeconfig).await {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            bail!("kube-apiserver not ready after {timeout:?}; see {}/logs", cluster.dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_nodes(client: &Client, n: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..n {
        let name = format!("kwok-node-{i}");
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    NODE_LABEL.0: NODE_LABEL.1,
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {},
            "status": {
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "2000"},
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": "2000"},
                "nodeInfo": {"kubeletVersion": "fake", "kubeProxyVersion": "fake", "architecture": "amd64", "operatingSystem": "linux"},
            },
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Server-side apply every shoal CRD and wait until each is Established.
pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("shoal-dev").force();
    for crd in crate::api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await.with_context(|| format!("applying CRD {name}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in crate::api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let got = api.get(&name).await?;
            let established = got.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
            if established {
                break;
            }
            if Instant::now() > deadline {
                bail!("CRD {name} not established after 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn wait_until_ready(client: &Client, n: usize, timeout: Duration, cluster: &DevCluster) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let nodes: Api<Node> = Api::all(client.clone());
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    loop {
        if let Some(dead) = dead_component(cluster) {
            bail!(dead);
        }
        let list = nodes.list(&ListParams::default().labels(&format!("{}={}", NODE_LABEL.0, NODE_LABEL.1))).await?;
        let ready = list
            .items
            .iter()
            .filter(|node| {
                let is_ready = node.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| !t.is_empty());
                is_ready && !tainted
            })
            .count();
        let sa = sas.get_opt("default").await?.is_some();
        let ns = namespaces.get_opt("kube-system").await?.is_some();
        if ready >= n && sa && ns {
            return Ok(());
        }
        let last = format!("{ready}/{n} nodes ready and untainted, default service account: {sa}");
        if Instant::now() > deadline {
            return Err(anyhow!("cluster not ready after {timeout:?}: {last}; see {}/logs", cluster.dir.display()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
