//! The figures of a run (results.json) and the report that reads them (report.md, plots).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Scenario;
use super::observe::Observed;
use super::scenario::Executor;
use super::stats::{Quantiles, quantiles, rate_series};
use super::writes::{AuditWrites, is_event};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gb: f64,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    /// Other work ran on the machine: the load average before the run was above half the
    /// cores (nothing of the run was running then).
    pub shared: bool,
    pub operator_binary: String,
    pub release_build: bool,
    pub local_control_plane: bool,
    /// The `SHOAL_*` environment the replicas inherited (operator settings such as
    /// `SHOAL_WORKERS`), other than the binary's path.
    #[serde(default)]
    pub operator_env: BTreeMap<String, String>,
}

impl Machine {
    pub fn here(load_before: [f64; 3], load_after: [f64; 3], bin: &Path, local: bool) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()).unwrap_or_default();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gb = meminfo.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0 / 1024.0;
        let bin_s = bin.display().to_string();
        Self {
            cpus,
            cpu_model,
            memory_gb,
            load_before,
            load_after,
            shared: load_before[0] > cpus as f64 / 2.0,
            release_build: bin_s.contains("/release/"),
            operator_binary: bin_s,
            local_control_plane: local,
            operator_env: std::env::vars().filter(|(k, _)| k.starts_with("SHOAL_") && k != "SHOAL_BIN").collect(),
        }
    }
}

/// The ceiling run: bare Jobs or bare pods, no operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bare {
    /// What was created (reports before bare pods existed hold Jobs).
    #[serde(default = "job")]
    pub kind: Executor,
    #[serde(alias = "jobs")]
    pub objects: usize,
    pub created: usize,
    pub done: usize,
    pub duration_s: f64,
    /// Objects finished per second.
    #[serde(alias = "jobs_per_s")]
    pub per_s: f64,
    pub writes_by_verb: BTreeMap<String, f64>,
    pub audit: Option<AuditWrites>,
    /// Seconds to delete the bare objects' namespaces before the operator's run.
    pub cleanup_s: f64,
    /// A CPU profile of the API server during this run (written beside the report).
    #[serde(skip, default)]
    pub apiserver_profile: Option<Vec<u8>>,
    /// CPU seconds of each control-plane process from the first create to the last one done.
    #[serde(default)]
    pub control_plane_s: BTreeMap<String, f64>,
    /// CPU seconds the whole machine was busy over the same window.
    #[serde(default)]
    pub machine_busy_s: f64,
    pub interrupted: bool,
}

fn job() -> Executor {
    Executor::Job
}

impl Bare {
    /// "Job" or "pod", for the report's text.
    pub fn noun(&self) -> &'static str {
        match self.kind {
            Executor::Job => "Job",
            Executor::Pod => "pod",
        }
    }

    /// Every client's writes per bare object (the API server's counter).
    pub fn writes_per_object(&self) -> f64 {
        self.writes_by_verb.values().sum::<f64>() / self.objects.max(1) as f64
    }
}

/// The replicas idle, holding every shard, before the load: their upkeep.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Idle {
    pub window_s: f64,
    pub replicas: usize,
    /// Operator CPU seconds per second, all replicas.
    pub cpu_s_per_s: f64,
    /// Every write over the window (the API server's counter, every client).
    pub writes_by_verb: BTreeMap<String, f64>,
    /// Lease writes over the window, every client (the counter).
    pub lease_writes: f64,
    /// Lease writes a second of the other clients (kube-controller-manager, kube-scheduler,
    /// the nodes' Leases), from the counter between the run's start and the replicas' start.
    pub baseline_lease_per_s: Option<f64>,
    pub baseline_window_s: f64,
    /// The counter's Lease writes a second over the window, less the baseline, per replica.
    pub lease_per_s_per_replica: Option<f64>,
    /// The operator's own Lease writes over the window (audit log, local control plane).
    pub audit_operator_lease_writes: Option<u64>,
    pub audit_lease_per_s_per_replica: Option<f64>,
}

impl Idle {
    /// Lease writes a second per replica from the counter: the window's rate less the other
    /// clients' rate, over the replicas.
    pub fn per_replica(lease_writes: f64, window_s: f64, baseline_per_s: Option<f64>, replicas: usize) -> Option<f64> {
        let base = baseline_per_s?;
        (window_s > 0.0 && replicas > 0).then(|| ((lease_writes / window_s - base) / replicas as f64).max(0.0))
    }
}

/// One sample of what is left after the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SettleSample {
    /// Seconds since the run's end (the last workflow's end).
    pub t: f64,
    pub workflows: usize,
    pub jobs: usize,
    pub pods: usize,
    /// replica -> RSS MB now.
    pub rss_mb: BTreeMap<String, f64>,
}

/// After the run: the run's objects left over time (garbage collection at work) and the
/// replicas' memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Settle {
    pub window_s: f64,
    pub samples: Vec<SettleSample>,
    /// What garbage collection (the scenario's `workflowSpec`, the operator's environment)
    /// keeps once its delays have passed.
    pub expected: Option<Kept>,
    /// Every write over the window (the counter) and by client (audit log).
    pub writes_by_verb: BTreeMap<String, f64>,
    pub audit: Option<AuditWrites>,
    /// Operator CPU seconds over the window, all replicas.
    pub operator_cpu_s: f64,
}

/// Workflows and steps (their pods, and Jobs in Job mode) a garbage-collection policy keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub workflows: usize,
    pub steps: usize,
}

/// The operator-wide garbage-collection defaults, by environment variable (the operator's
/// `--pod-gc-*` and `--workflow-ttl-*` flags).
pub const GC_ENV: [(&str, &str, &str); 5] = [
    ("SHOAL_POD_GC_STRATEGY", "podGC", "strategy"),
    ("SHOAL_POD_GC_KEEP_LAST", "podGC", "keepLast"),
    ("SHOAL_WORKFLOW_TTL_AFTER_COMPLETION", "ttlStrategy", "secondsAfterCompletion"),
    ("SHOAL_WORKFLOW_TTL_AFTER_SUCCESS", "ttlStrategy", "secondsAfterSuccess"),
    ("SHOAL_WORKFLOW_TTL_AFTER_FAILURE", "ttlStrategy", "secondsAfterFailure"),
];

/// What garbage collection keeps of the scenario's workflows once its delays have passed, if
/// anything sets it: `spec.podGC` and `spec.ttlStrategy` from the scenario's `workflowSpec`,
/// each field left unset taken from the operator's environment `env` ([`GC_ENV`]). A
/// workflow deleted by its TTL (`secondsAfterSuccess` if it completed, `secondsAfterFailure`
/// if it failed, else `secondsAfterCompletion`) takes its steps' objects with it; otherwise
/// the pod GC strategy decides which step objects go (a failing workflow fails at its last
/// step, the others succeed), and `keepLast` keeps that many of them per workflow.
pub fn policy_keeps(sc: &Scenario, env: &BTreeMap<String, String>) -> Option<Kept> {
    let spec = sc.workflow_spec.clone().unwrap_or_default();
    let field = |group: &str, key: &str| -> Option<String> {
        match spec.get(group).and_then(|g| g.get(key)) {
            Some(serde_json::Value::String(v)) => Some(v.clone()),
            Some(v) if !v.is_null() => Some(v.to_string()),
            _ => GC_ENV.iter().find(|(_, g, k)| *g == group && *k == key).and_then(|(e, _, _)| env.get(*e).cloned()),
        }
    };
    if GC_ENV.iter().all(|(_, g, k)| field(g, k).is_none()) {
        return None;
    }
    let strategy = field("podGC", "strategy").unwrap_or_default();
    let keep_last: usize = field("podGC", "keepLast").and_then(|v| v.parse().ok()).unwrap_or(0);
    let n = sc.steps_per_workflow();
    let mut kept = Kept::default();
    for i in 0..sc.count {
        let failed = sc.fails(i);
        if field("ttlStrategy", if failed { "secondsAfterFailure" } else { "secondsAfterSuccess" }).or_else(|| field("ttlStrategy", "secondsAfterCompletion")).is_some() {
            continue;
        }
        let deleted = match strategy.as_str() {
            "OnPodCompletion" | "OnWorkflowCompletion" => n,
            "OnPodSuccess" => n - usize::from(failed),
            "OnWorkflowSuccess" if !failed => n,
            _ => 0,
        };
        kept.workflows += 1;
        kept.steps += n - deleted + keep_last.min(deleted);
    }
    Some(kept)
}

/// Which executor the steps ran under, as seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecutorSeen {
    pub step_jobs: usize,
    pub step_pods: usize,
    /// `status.executor` -> workflows, where the operator records it.
    pub status_executor: BTreeMap<String, usize>,
}

impl ExecutorSeen {
    pub fn from_observed(st: &Observed) -> Self {
        let (step_jobs, step_pods) = st.step_objects();
        let mut status_executor = BTreeMap::new();
        for e in st.workflows.values().filter_map(|w| w.executor.clone()) {
            *status_executor.entry(e).or_insert(0) += 1;
        }
        Self { step_jobs, step_pods, status_executor }
    }

    /// A warning when the scenario asked for an executor the steps did not run under.
    pub fn mismatch(&self, asked: Option<Executor>) -> Option<String> {
        let asked = asked?;
        let (wrong, what) = match asked {
            Executor::Pod => (self.step_jobs, "step Jobs"),
            Executor::Job => (self.step_pods, "step pods (Pod executor)"),
        };
        (wrong > 0).then(|| format!("the scenario asks for executor {asked:?}, but {wrong} {what} ran: the operator ignored `spec.executor` (an API without the field prunes it)"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaFigures {
    pub name: String,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    pub kills: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cpu {
    pub replicas: Vec<ReplicaFigures>,
    /// Operator CPU seconds from the first create to the end (all replicas, all processes).
    pub total_s: f64,
    pub idle_rate_s_per_s: f64,
    pub per_step_ms: f64,
    #[serde(deserialize_with = "super::stats::nan_if_null")]
    pub per_step_ms_net_of_idle: f64,
    /// CPU seconds of each control-plane process over the same window.
    pub control_plane_s: BTreeMap<String, f64>,
    /// CPU seconds the whole machine was busy over the window (everyone's work).
    pub machine_busy_s: f64,
    /// The window CPU is measured over: first create to the end of the run.
    pub window_s: f64,
    /// The operator's own dispatch histogram (upper bucket bounds, surviving processes).
    pub operator_dispatch_p50_le: Option<f64>,
    pub operator_dispatch_p99_le: Option<f64>,
    /// Where the operator's time goes: (what, p50, p99), upper bucket bounds in seconds.
    #[serde(default)]
    pub operator_breakdown: Vec<(String, Option<f64>, Option<f64>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Writes {
    /// `apiserver_request_total` deltas over the run, every client: "VERB resource" -> n.
    pub apiserver_request_total: BTreeMap<String, f64>,
    /// From the audit log (local control plane only), by client.
    pub audit: Option<AuditWrites>,
    pub operator_per_step: Option<f64>,
    pub operator_events_per_step: Option<f64>,
    /// Every write of every client (the API server's counter) per completed step: creates,
    /// bindings, status updates, the operator's patches, Events, Leases, deletes.
    pub all_clients_per_step: f64,
    /// The same from the audit log without the harness's own writes (its workflow creates).
    #[serde(default)]
    pub all_clients_but_harness_per_step: Option<f64>,
}

impl Writes {
    pub fn new(totals: BTreeMap<String, f64>, audit: Option<AuditWrites>, steps: f64) -> Self {
        let s = steps.max(1.0);
        let all = totals.values().fold(0.0, |a, v| a + v);
        let operator_per_step = audit.as_ref().map(|a| a.client_total("shoal", false) as f64 / s);
        let operator_events_per_step = audit.as_ref().map(|a| a.client_total("shoal", true) as f64 / s);
        let all_clients_but_harness_per_step = audit.as_ref().map(|a| (a.total() - a.per_client().get("loadtest").copied().unwrap_or(0)) as f64 / s);
        Self { apiserver_request_total: totals, audit, operator_per_step, operator_events_per_step, all_clients_per_step: all / s, all_clients_but_harness_per_step }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Correctness {
    pub created: usize,
    pub ended: usize,
    /// Created but never ended ("ns/name").
    pub lost: Vec<String>,
    /// Ended in the wrong phase (a healthy one Failed, or a failing one Completed).
    pub wrong_phase: Vec<String>,
    /// Step attempts with more than one object (Jobs or pods) seen:
    /// "ns/workflow/step@generation#attempt (n objects)".
    pub duplicate_jobs: Vec<String>,
    /// Steps whose recorded UID is not an object (Job or pod) the watch saw for that step.
    pub uid_mismatch: Vec<String>,
    /// Step objects (Jobs or pods) expected (every step of every ended workflow) and seen.
    pub jobs_expected: usize,
    pub jobs_seen: usize,
    /// The audit log's count: Jobs the operator created (HTTP 201) twice under one name.
    pub audit_jobs_created_twice: Vec<String>,
    /// ... and pods (the Pod executor's steps).
    #[serde(default)]
    pub audit_pods_created_twice: Vec<String>,
    /// Create attempts in the replicas' action logs (one recorded per fenced create; a
    /// repeat gets AlreadyExists and makes nothing).
    pub action_log_job_creates: usize,
    pub action_log_distinct_jobs: usize,
    /// NamespaceManager runs: managers whose webhook arrived under two ids, and managers
    /// whose webhook never arrived.
    pub webhook_two_ids: Vec<String>,
    pub webhook_missing: Vec<String>,
    pub webhook_repeats_same_id: usize,
    pub ok: bool,
}

impl Correctness {
    pub fn check(sc: &Scenario, st: &Observed, writes: Option<&Writes>, actions: &[String], nss: &[String]) -> Self {
        let mut c = Correctness::default();
        for i in 0..sc.count {
            let ns = &nss[i % nss.len()];
            let name = format!("w{i:05}");
            let key = format!("{ns}/{name}");
            let Some(w) = st.workflows.get(&(ns.clone(), name.clone())) else {
                c.lost.push(key);
                continue;
            };
            if w.created.is_some() {
                c.created += 1;
            }
            let Some(phase) = w.phase else {
                c.lost.push(key);
                continue;
            };
            c.ended += 1;
            c.jobs_expected += sc.steps_per_workflow();
            if phase != super::run::expected_phase(sc, i) {
                c.wrong_phase.push(format!("{key} ({phase:?})"));
            }
            for (step, uid) in &w.recorded_uids {
                let seen = st.step_uids.iter().any(|(k, uids)| &k.namespace == ns && k.workflow == name && &k.step == step && uids.contains(uid));
                if !seen {
                    c.uid_mismatch.push(format!("{key}/{step}"));
                }
            }
        }
        c.jobs_seen = st.step_uids.values().map(|u| u.len()).sum();
        c.duplicate_jobs = st.duplicates();
        if let Some(a) = writes.and_then(|w| w.audit.as_ref()) {
            c.audit_jobs_created_twice = a.jobs_created_twice.clone();
            c.audit_pods_created_twice = a.pods_created_twice.clone();
        }
        let creates: Vec<String> = actions
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["action"].as_str().map(str::to_string))
            .filter(|a| a.starts_with("create Job/") || a.starts_with("create Pod/"))
            .collect();
        c.action_log_job_creates = creates.len();
        c.action_log_distinct_jobs = creates.iter().collect::<BTreeSet<_>>().len();
        c.lost.truncate(50);
        c.ok = c.lost.is_empty()
            && c.wrong_phase.is_empty()
            && c.duplicate_jobs.is_empty()
            && c.uid_mismatch.is_empty()
            && c.audit_jobs_created_twice.is_empty()
            && c.audit_pods_created_twice.is_empty()
            && c.jobs_seen >= c.jobs_expected;
        c
    }
}

/// One sample a second while the load runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub created: usize,
    pub ended: usize,
    pub jobs_done: usize,
    /// replica -> (CPU seconds so far, RSS MB now).
    pub replicas: BTreeMap<String, (f64, f64)>,
    pub control_plane_cpu: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub scenario: Scenario,
    pub started_at: String,
    pub machine: Machine,
    pub interrupted: bool,
    pub timed_out: bool,
    /// From the first create to the last workflow's end.
    pub duration_s: f64,
    pub workflows_ended: usize,
    pub steps_done: usize,
    pub workflows_per_min: f64,
    pub steps_per_s: f64,
    /// Shoal's steps per second over the bare Jobs per second.
    pub fraction_of_ceiling: Option<f64>,
    pub completion_latency_s: Quantiles,
    pub dispatch_latency_s: Quantiles,
    /// The most workflows that existed and had not yet ended at one moment.
    #[serde(default)]
    pub peak_live_workflows: usize,
    pub cpu: Option<Cpu>,
    pub writes: Option<Writes>,
    pub bare: Option<Bare>,
    /// The replicas' upkeep before the load.
    #[serde(default)]
    pub idle: Option<Idle>,
    /// What was left after the run, over time.
    #[serde(default)]
    pub settle: Option<Settle>,
    /// The step objects the run saw: Jobs or pods.
    #[serde(default)]
    pub executor_seen: ExecutorSeen,
    pub correctness: Correctness,
    /// NamespaceManager runs: lateness of each firing past its due time.
    pub lateness_s: Option<Quantiles>,
    pub series: Vec<Sample>,
    #[serde(skip, default)]
    pub completion_latencies: Vec<f64>,
    #[serde(skip, default)]
    pub dispatch_latencies: Vec<f64>,
    #[serde(skip, default)]
    pub end_times: Vec<f64>,
    #[serde(skip, default)]
    pub step_end_times: Vec<f64>,
    /// A CPU profile of the API server with the operator at work (written beside the report).
    #[serde(skip, default)]
    pub apiserver_profile: Option<Vec<u8>>,
}

impl Results {
    pub fn empty(sc: &Scenario) -> Self {
        Self {
            scenario: sc.clone(),
            started_at: String::new(),
            machine: Machine::default(),
            interrupted: false,
            timed_out: false,
            duration_s: 0.0,
            workflows_ended: 0,
            steps_done: 0,
            workflows_per_min: 0.0,
            steps_per_s: 0.0,
            fraction_of_ceiling: None,
            completion_latency_s: Quantiles::default(),
            dispatch_latency_s: Quantiles::default(),
            peak_live_workflows: 0,
            cpu: None,
            writes: None,
            bare: None,
            idle: None,
            settle: None,
            executor_seen: ExecutorSeen::default(),
            correctness: Correctness::default(),
            lateness_s: None,
            series: vec![],
            completion_latencies: vec![],
            dispatch_latencies: vec![],
            end_times: vec![],
            step_end_times: vec![],
            apiserver_profile: None,
        }
    }

    /// Throughput and latencies from what the watches saw; times relative to `t_load`.
    pub fn figures_from_observed(&mut self, sc: &Scenario, st: &Observed, t_load: f64, t_end: f64) {
        let ended: Vec<(f64, f64)> = st.workflows.values().filter_map(|w| Some((w.created?, w.ended?))).collect();
        self.completion_latencies = ended.iter().map(|(c, e)| e - c).collect();
        self.end_times = ended.iter().map(|(_, e)| e - t_load).collect();
        self.step_end_times = st.steps.values().filter_map(|j| j.done).map(|d| d - t_load).collect();
        self.workflows_ended = ended.len();
        self.steps_done = self.step_end_times.len();
        let first = st.workflows.values().filter_map(|w| w.created).fold(f64::INFINITY, f64::min);
        let last = ended.iter().map(|(_, e)| *e).fold(first, f64::max);
        self.duration_s = if self.workflows_ended == sc.count { last - first } else { t_end - first.min(t_end) };
        let d = self.duration_s.max(1e-9);
        self.workflows_per_min = self.workflows_ended as f64 / d * 60.0;
        self.steps_per_s = self.steps_done as f64 / d;
        self.completion_latency_s = quantiles(&self.completion_latencies);
        self.dispatch_latencies = dispatch_latencies(sc, st);
        self.dispatch_latency_s = quantiles(&self.dispatch_latencies);
        self.peak_live_workflows = peak_live(st.workflows.values().filter_map(|w| Some((w.created?, w.ended))));
        self.executor_seen = ExecutorSeen::from_observed(st);
    }

    /// The ceiling's objects a second, if there was a ceiling run.
    pub fn ceiling_per_s(&self) -> Option<f64> {
        self.bare.as_ref().map(|b| b.per_s).filter(|v| *v > 0.0)
    }
}

/// The most intervals (created, ended or still running) open at one moment.
pub fn peak_live(spans: impl Iterator<Item = (f64, Option<f64>)>) -> usize {
    // Ends sort before starts at the same instant: a workflow that ended as another began
    // was not live with it.
    let mut edges: Vec<(f64, i64)> = spans.flat_map(|(c, e)| std::iter::once((c, 1)).chain(e.map(|e| (e, -1)))).collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut live, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        live += d;
        peak = peak.max(live);
    }
    peak as usize
}

/// For every step with dependencies: its Job's (or pod's) appearance minus the latest finish
/// of the Jobs (or pods) of its dependencies (first attempts; the steps of these scenarios
/// never retry).
pub fn dispatch_latencies(sc: &Scenario, st: &Observed) -> Vec<f64> {
    let dag = sc.dag();
    let mut by_step: HashMap<(&str, &str, &str), (f64, Option<f64>)> = HashMap::new();
    for (k, uids) in &st.step_uids {
        if k.attempt != "0" {
            continue;
        }
        if let Some(j) = uids.iter().filter_map(|u| st.steps.get(u)).min_by(|a, b| a.added.total_cmp(&b.added)) {
            by_step.insert((&k.namespace, &k.workflow, &k.step), (j.added, j.done));
        }
    }
    let mut out = Vec::new();
    for (ns, wf) in st.workflows.keys() {
        for (step, deps) in dag.iter().filter(|(_, d)| !d.is_empty()) {
            let Some((added, _)) = by_step.get(&(ns.as_str(), wf.as_str(), step.as_str())) else { continue };
            let done: Option<Vec<f64>> = deps.iter().map(|d| by_step.get(&(ns.as_str(), wf.as_str(), d.as_str())).and_then(|(_, done)| *done)).collect();
            if let Some(done) = done {
                out.push(added - done.into_iter().fold(f64::NEG_INFINITY, f64::max));
            }
        }
    }
    out
}

/// The upper bound of the bucket holding quantile `q` of a histogram summed over pages.
pub fn histogram_quantile(pages: &[String], name: &str, q: f64) -> Option<f64> {
    histogram_quantile_where(pages, name, &[], q)
}

/// [`histogram_quantile`] over the series whose labels include every `(name, value)` of
/// `labels` (summed over the other labels).
pub fn histogram_quantile_where(pages: &[String], name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let prefix = format!("{name}_bucket{{");
    for line in pages.iter().flat_map(|p| p.lines()) {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let Some((set, count)) = rest.split_once("} ") else { continue };
        if !labels.iter().all(|(k, v)| set.split(',').any(|l| l == format!("{k}=\"{v}\""))) {
            continue;
        }
        let Some(le) = set.split(',').find_map(|l| l.strip_prefix("le=\"")?.strip_suffix('"')) else { continue };
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        let count: f64 = count.split_whitespace().next()?.parse().ok()?;
        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last()?.1;
    if total == 0.0 {
        return None;
    }
    sorted.into_iter().find(|(_, c)| *c >= q * total).map(|(le, _)| le)
}

/// Where a replica's time between a watch event and its write goes, from the operator's own
/// histograms: (what, p50, p99), upper bucket bounds in seconds.
pub fn dispatch_breakdown(pages: &[String], controller: &str) -> Vec<(String, Option<f64>, Option<f64>)> {
    let row = |what: String, name: &str, labels: &[(&str, &str)]| (what, histogram_quantile_where(pages, name, labels, 0.5), histogram_quantile_where(pages, name, labels, 0.99));
    vec![
        row(format!("wait in the {controller} work queue"), "workqueue_queue_duration_seconds", &[("name", controller)]),
        row(format!("one {controller} reconcile (its reads and writes included)"), "controller_runtime_reconcile_time_seconds", &[("controller", controller)]),
        row("API server answer to a create (POST)".into(), "rest_client_request_duration_seconds", &[("verb", "POST")]),
        row("API server answer to a patch (PATCH)".into(), "rest_client_request_duration_seconds", &[("verb", "PATCH")]),
    ]
}

fn ms(x: f64) -> String {
    if x.is_finite() { format!("{:.0} ms", x * 1000.0) } else { "n/a".into() }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        Some(v) if v > 0.0 => "+Inf (above the largest bucket)".into(),
        _ => "n/a".into(),
    }
}

fn date_dir(root: &Path, name: &str, started_at: &str) -> PathBuf {
    let date: String = started_at.chars().take(16).map(|c| if c == ':' { '-' } else { c }).collect();
    root.join(format!("{name}-{date}"))
}

/// Write report.md, results.json and the plots of one run.
pub fn write(root: &Path, r: &Results, _others: &[&Results]) -> anyhow::Result<PathBuf> {
    let dir = date_dir(root, &r.scenario.name, &r.started_at);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    let plots = super::plots::run_plots(&dir, r);
    let mut profiles = Vec::new();
    for (name, data) in [("apiserver-bare", r.bare.as_ref().and_then(|b| b.apiserver_profile.as_ref())), ("apiserver-operator", r.apiserver_profile.as_ref())] {
        if let Some(data) = data {
            profiles.extend(write_profile(&dir, name, data));
        }
    }
    std::fs::write(dir.join("report.md"), markdown(r, &plots, &profiles))?;
    Ok(dir)
}

/// Write a pprof profile as `<name>.pprof.gz` and, when Go is installed, its flat and
/// cumulative top functions as `<name>.top.txt`; the files written.
fn write_profile(dir: &Path, name: &str, data: &[u8]) -> Vec<String> {
    let raw = format!("{name}.pprof.gz");
    if std::fs::write(dir.join(&raw), data).is_err() {
        return vec![];
    }
    let mut out = vec![raw.clone()];
    let top = |extra: &[&str]| std::process::Command::new("go").args(["tool", "pprof", "-top", "-nodecount=40"]).args(extra).arg(dir.join(&raw)).output().ok().filter(|o| o.status.success());
    if let (Some(flat), Some(cum)) = (top(&[]), top(&["-cum"])) {
        let text = format!("# {name}: flat\n\n{}\n# {name}: cumulative\n\n{}", String::from_utf8_lossy(&flat.stdout), String::from_utf8_lossy(&cum.stdout));
        if std::fs::write(dir.join(format!("{name}.top.txt")), text).is_ok() {
            out.push(format!("{name}.top.txt"));
        }
    }
    out
}

fn markdown(r: &Results, plots: &[String], profiles: &[String]) -> String {
    let sc = &r.scenario;
    let mut s = String::new();
    let _ = writeln!(s, "# Load test `{}`: {}\n", sc.name, r.started_at);
    let _ = writeln!(s, "{}\n", sc.description);
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {:.1} GB; load average before {:.2} / {:.2} / {:.2}, after {:.2} / {:.2} / {:.2}{}. Operator binary: `{}` ({} build). {}\n",
        m.cpus,
        m.cpu_model,
        m.memory_gb,
        m.load_before[0],
        m.load_before[1],
        m.load_before[2],
        m.load_after[0],
        m.load_after[1],
        m.load_after[2],
        if m.shared {
            " — the load average before the run was above half the cores: other work was running, or a run had just ended (the 1-minute figure decays slowly); the CPU table's \"everything else\" row tells which"
        } else {
            ""
        },
        m.operator_binary.rsplit('/').take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("/"),
        if m.release_build {
            "release"
        } else if m.operator_binary.contains("/debug/") {
            "debug"
        } else {
            "profile not known from its path"
        },
        if m.local_control_plane { "A fresh local control plane (`shoal dev up`, audit log on) for this run." } else { "An existing cluster (KUBECONFIG)." }
    );
    if !m.operator_env.is_empty() {
        let env: Vec<String> = m.operator_env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        let _ = writeln!(s, "Operator settings from the environment: {}.\n", env.join(", "));
    }
    if r.interrupted || r.timed_out {
        let _ = writeln!(s, "**Partial run: {}.** The figures cover what was measured until then.\n", if r.interrupted { "stopped by Ctrl-C" } else { "timed out" });
    }
    if sc.kind == super::scenario::Kind::Namespacemanagers {
        let _ = writeln!(
            s,
            "Scenario: {} TTL NamespaceManagers over {} namespaces, each firing one webhook at the harness, due over {} once all exist, {} replica(s). Per-step figures below are per firing.\n",
            sc.count,
            sc.namespaces,
            super::scenario::go_duration(sc.ttl_spread),
            sc.replicas
        );
    } else {
        let _ = writeln!(
            s,
            "Scenario: {} {:?} workflows × {} steps ({} each), {:.0} % failing on purpose, over {} namespaces, {}, {} replica(s){}.\n",
            sc.count,
            sc.shape,
            sc.steps_per_workflow(),
            super::scenario::go_duration(sc.step_duration),
            sc.failure_fraction * 100.0,
            sc.namespaces,
            if sc.arrival_rate > 0.0 { format!("{} a second", sc.arrival_rate) } else { "all at once".into() },
            sc.replicas,
            sc.chaos.as_ref().map(|c| format!(", one replica kill -9ed every {} and started again", super::scenario::go_duration(c.every))).unwrap_or_default()
        );
        scenario_extras(&mut s, r);
    }

    let c = &r.correctness;
    let _ = writeln!(s, "## Correctness: {}\n", if c.ok { "every check passed" } else { "**FAILED**" });
    let _ = writeln!(s, "| check | result |\n|---|---|");
    if sc.kind == super::scenario::Kind::Namespacemanagers {
        let _ = writeln!(s, "| managers fired | {} of {} |", c.ended, sc.count);
        let _ = writeln!(s, "| webhook under two ids | {} |", c.webhook_two_ids.len());
        let _ = writeln!(s, "| webhook never arrived | {} |", c.webhook_missing.len());
        let _ = writeln!(s, "| repeats under the same id (deduped by the receiver) | {} |", c.webhook_repeats_same_id);
    } else {
        let _ = writeln!(s, "| workflows ended / created | {} / {} |", c.ended, c.created);
        let _ = writeln!(s, "| lost (never ended) | {} |", c.lost.len());
        let _ = writeln!(s, "| ended in the wrong phase | {} |", c.wrong_phase.len());
        let _ = writeln!(s, "| step attempts with two objects, Jobs or pods (watch, by UID) | {} |", c.duplicate_jobs.len());
        let _ = writeln!(s, "| Jobs created twice under one name (audit log, HTTP 201) | {} |", c.audit_jobs_created_twice.len());
        let _ = writeln!(s, "| pods created twice under one name by the operator (audit log, HTTP 201) | {} |", c.audit_pods_created_twice.len());
        let _ = writeln!(s, "| recorded UID not the step's Job or pod | {} |", c.uid_mismatch.len());
        let e = &r.executor_seen;
        let _ = writeln!(s, "| step objects seen / expected | {} / {} ({} Jobs, {} pods) |", c.jobs_seen, c.jobs_expected, e.step_jobs, e.step_pods);
        let _ = writeln!(s, "| fenced create attempts (action logs) / distinct Jobs or pods | {} / {} |", c.action_log_job_creates, c.action_log_distinct_jobs);
    }
    for (what, v) in [
        ("lost", &c.lost),
        ("wrong phase", &c.wrong_phase),
        ("duplicates", &c.duplicate_jobs),
        ("Jobs created twice", &c.audit_jobs_created_twice),
        ("pods created twice", &c.audit_pods_created_twice),
        ("uid mismatch", &c.uid_mismatch),
        ("two ids", &c.webhook_two_ids),
    ] {
        if !v.is_empty() {
            let _ = writeln!(s, "\n{what}: {}", v.iter().take(10).cloned().collect::<Vec<_>>().join(", "));
        }
    }

    let _ = writeln!(s, "\n## Throughput and latency\n\n| figure | value |\n|---|---|");
    if let Some(l) = &r.lateness_s {
        let _ = writeln!(s, "| firing lateness p50 / p99 / max | {:.2} s / {:.2} s / {:.2} s |", l.p50, l.p99, l.max);
        let _ = writeln!(s, "| duration (first create to last firing) | {:.1} s |", r.duration_s);
        for (what, p50, p99) in r.cpu.iter().flat_map(|c| &c.operator_breakdown) {
            let _ = writeln!(s, "| {what}, p50 / p99 (the replica's histograms, bucket upper bounds) | ≤ {} s / ≤ {} s |", opt(*p50, 3), opt(*p99, 3));
        }
    } else {
        let _ = writeln!(s, "| duration (first create to last end) | {:.1} s |", r.duration_s);
        let _ = writeln!(s, "| throughput | {:.0} workflows/min, {:.1} steps/s |", r.workflows_per_min, r.steps_per_s);
        let cl = &r.completion_latency_s;
        let _ = writeln!(s, "| completion latency p50 / p99 / max | {:.1} s / {:.1} s / {:.1} s |", cl.p50, cl.p99, cl.max);
        let _ = writeln!(s, "| most workflows live at once (created, not yet ended) | {} |", r.peak_live_workflows);
        let dl = &r.dispatch_latency_s;
        let _ = writeln!(
            s,
            "| step dispatch latency p50 / p90 / p99 / max ({} dependent steps; dependency's Job Complete or pod Succeeded → dependent Job or pod created, both as the harness's watch saw them) | {} / {} / {} / {} |",
            dl.n,
            ms(dl.p50),
            ms(dl.p90),
            ms(dl.p99),
            ms(dl.max)
        );
        if let Some(cpu) = &r.cpu {
            let _ =
                writeln!(s, "| the operator's own dispatch histogram p50 / p99 (bucket upper bounds) | ≤ {} s / ≤ {} s |", opt(cpu.operator_dispatch_p50_le, 3), opt(cpu.operator_dispatch_p99_le, 3));
            for (what, p50, p99) in &cpu.operator_breakdown {
                let _ = writeln!(s, "| … of which: {what}, p50 / p99 (the replicas' histograms, bucket upper bounds) | ≤ {} s / ≤ {} s |", opt(*p50, 3), opt(*p99, 3));
            }
        }
    }
    if let Some(b) = &r.bare {
        let n = b.noun();
        let _ = writeln!(s, "| bare-{n} ceiling (same control plane, no operator, {} {n}s at once) | {:.1} {n}s/s ({} done in {:.1} s) |", b.objects, b.per_s, b.done, b.duration_s);
        let _ = writeln!(s, "| shoal's steps/s as a fraction of the bare-{n} ceiling | {} |", r.fraction_of_ceiling.map(|f| format!("{:.0} %", f * 100.0)).unwrap_or_else(|| "n/a".into()));
    }

    if let Some(cpu) = &r.cpu {
        let _ = writeln!(s, "\n## CPU and memory\n\n| replica | CPU s | peak RSS | kill -9 |\n|---|---|---|---|");
        for x in &cpu.replicas {
            let _ = writeln!(s, "| {} | {:.2} | {:.1} MB | {} |", x.name, x.cpu_s, x.peak_rss_mb, x.kills);
        }
        let _ = writeln!(
            s,
            "\nOperator CPU over the run: {:.2} s = **{:.2} ms per completed step** (summed over replicas); idle upkeep (Leases) {:.3} CPU-s/s, so the work itself {} ms per step.\n",
            cpu.total_s,
            cpu.per_step_ms,
            cpu.idle_rate_s_per_s,
            opt(Some(cpu.per_step_ms_net_of_idle).filter(|v| !v.is_nan()), 2)
        );
        if !cpu.control_plane_s.is_empty() {
            let _ = writeln!(s, "CPU seconds per component over the same window (who the bottleneck is):\n\n| component | CPU s | share of the machine's busy time |\n|---|---|---|");
            let mut rows: Vec<(String, f64)> = cpu.control_plane_s.iter().map(|(k, v)| (k.clone(), *v)).collect();
            rows.push(("shoal (operator)".into(), cpu.total_s));
            rows.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (k, v) in rows {
                let _ = writeln!(s, "| {k} | {v:.1} | {:.0} % |", v / cpu.machine_busy_s.max(1e-9) * 100.0);
            }
            let others = cpu.machine_busy_s - cpu.control_plane_s.values().sum::<f64>() - cpu.total_s;
            let _ = writeln!(s, "| everything else (the harness itself, the system, any other tenant) | {others:.1} | {:.0} % |", others / cpu.machine_busy_s.max(1e-9) * 100.0);
            let _ = writeln!(
                s,
                "| whole machine busy (everyone) | {:.1} of {:.1} available | {:.0} % |",
                cpu.machine_busy_s,
                cpu.window_s * r.machine.cpus as f64,
                cpu.machine_busy_s / (cpu.window_s * r.machine.cpus as f64).max(1e-9) * 100.0
            );
            if let Some(b) = r.bare.as_ref().filter(|b| !b.control_plane_s.is_empty() && b.done > 0 && r.steps_done > 0) {
                let _ = writeln!(
                    s,
                    "\nWhat a step costs each component, against a bare {n} of the ceiling run (CPU ms per step or {n}; the difference is what the operator's requests, watches and Events add):\n\n| component | bare {n} | shoal step | ratio |\n|---|---|---|---|",
                    n = b.noun()
                );
                let per = |v: f64, n: usize| v / n as f64 * 1000.0;
                let mut names: Vec<&String> = cpu.control_plane_s.keys().collect();
                names.sort_by(|a, b| cpu.control_plane_s[*b].total_cmp(&cpu.control_plane_s[*a]));
                for k in names {
                    let (bj, st) = (per(b.control_plane_s.get(k).copied().unwrap_or(0.0), b.done), per(cpu.control_plane_s[k], r.steps_done));
                    let _ = writeln!(s, "| {k} | {bj:.1} | {st:.1} | {} |", if bj > 0.0 { format!("{:.2}", st / bj) } else { "n/a".into() });
                }
                let (bj, st) = (per(b.machine_busy_s, b.done), per(cpu.machine_busy_s, r.steps_done));
                let _ = writeln!(s, "| whole machine | {bj:.1} | {st:.1} | {} |", if bj > 0.0 { format!("{:.2}", st / bj) } else { "n/a".into() });
            }
        }
    }

    idle_section(&mut s, r);
    if let Some(w) = &r.writes {
        writes_section(&mut s, r, w);
    }
    settle_section(&mut s, r, plots);

    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for p in plots.iter().filter(|p| !p.starts_with("settle")) {
            let _ = writeln!(s, "![{p}]({p})\n");
        }
    }
    if !profiles.is_empty() {
        let _ = writeln!(
            s,
            "\n## API server profiles\n\nCPU profiles of the kube-apiserver, {} s each, starting {} s into the bare-Job run and into the operator's run (`go tool pprof -top <file>` reads them):\n",
            super::run::PROFILE.1,
            super::run::PROFILE.0.as_secs()
        );
        for p in profiles {
            let _ = writeln!(s, "- [{p}]({p})");
        }
    }
    let _ = writeln!(
        s,
        "\n## Method\n\nThe harness (`shoal loadtest`) watches every step Job, every step pod of the Pod executor (label `shoal.dev/executor=pod`) and every workflow itself and times them on one clock: a workflow's completion latency runs from just before its create to the watch event with its final phase; a step's dispatch latency from the watch event that shows its dependency's Job `Complete` (or pod `Succeeded`) to the one that shows its own Job (or pod). Operator CPU is user + system time from `/proc/<pid>/stat` of the replicas it started (a killed replica's CPU is read just before the kill), peak RSS is `VmHWM`. Writes come from the API server: `apiserver_request_total` for every client, and the audit log (metadata of every write) to tell the operator's writes (`User-Agent: shoal/…`) from the rest. Duplicates: every Job or pod UID the watch saw per (namespace, workflow, workflow UID, step, generation, attempt); the audit log's 201 creates per Job name and per pod name the operator created; the replicas' fenced action logs. `results.json` holds every figure."
    );
    s
}

/// The scenario's executor, ceiling run, extra workflow spec fields and operator environment,
/// and a warning when the steps did not run under the executor asked for.
fn scenario_extras(s: &mut String, r: &Results) {
    let sc = &r.scenario;
    let executor = match sc.executor {
        Some(e) => format!("`spec.executor: {e:?}` on every workflow"),
        None => "no `spec.executor` (the operator's default)".into(),
    };
    let bare = match sc.bare_run() {
        super::scenario::BareRun::Job => "bare Jobs",
        super::scenario::BareRun::Pod => "bare pods",
        super::scenario::BareRun::None => "none",
    };
    let mut line = format!("Executor: {executor}. Ceiling run: {bare}.");
    if let Some(extra) = &sc.workflow_spec {
        let _ = write!(line, " Merged into every workflow's spec: `{extra}`.");
    }
    if !sc.env.is_empty() {
        let env: Vec<String> = sc.env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        let _ = write!(line, " The scenario's operator environment: {}.", env.join(", "));
    }
    let _ = writeln!(s, "{line}");
    let e = &r.executor_seen;
    let status: Vec<String> = e.status_executor.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    let _ = writeln!(
        s,
        "\nThe steps ran as {} Jobs and {} pods (the Pod executor's); `status.executor` of the ended workflows: {}.\n",
        e.step_jobs,
        e.step_pods,
        if status.is_empty() { "not recorded".into() } else { status.join(", ") }
    );
    if let Some(w) = e.mismatch(sc.executor) {
        let _ = writeln!(s, "**Warning: {w}.**\n");
    }
}

/// The replicas' upkeep while idle: CPU and Lease writes per replica.
fn idle_section(s: &mut String, r: &Results) {
    let Some(i) = &r.idle else { return };
    let _ = writeln!(s, "\n## Idle upkeep\n\nThe {} replica(s) idle for {:.0} s, holding every shard, before the load.\n\n| figure | value |\n|---|---|", i.replicas, i.window_s);
    let _ = writeln!(s, "| operator CPU, all replicas | {:.4} CPU-s/s |", i.cpu_s_per_s);
    let _ = writeln!(s, "| **Lease writes a second per replica** (`apiserver_request_total`, less the other clients' rate) | {} |", opt(i.lease_per_s_per_replica, 3));
    let _ = writeln!(s, "| Lease writes over the window, every client (counter) | {:.0} ({:.2}/s) |", i.lease_writes, i.lease_writes / i.window_s.max(1e-9));
    let _ = writeln!(
        s,
        "| the other clients' Lease writes (kube-controller-manager, kube-scheduler, the nodes' Leases; counter over the {:.0} s before the replicas started) | {} /s |",
        i.baseline_window_s,
        opt(i.baseline_lease_per_s, 2)
    );
    if let Some(n) = i.audit_operator_lease_writes {
        let _ = writeln!(s, "| the operator's Lease writes (audit log, `shoal/…`) | {n}: {} per replica a second |", opt(i.audit_lease_per_s_per_replica, 3));
    }
    let other = i.writes_by_verb.iter().filter(|(k, _)| !super::writes::is_lease(k)).fold(0.0, |a, (_, v)| a + v);
    let _ = writeln!(s, "| other writes over the window, every client (counter) | {other:.0} |");
}

/// Writes per completed step, every client, by client and by resource; the operator's part;
/// the ceiling's writes per object beside them.
fn writes_section(s: &mut String, r: &Results, w: &Writes) {
    let steps = r.steps_done.max(1) as f64;
    let _ = writeln!(
        s,
        "\n## API writes\n\n**{:.2} writes per completed step, every client** (the API server's `apiserver_request_total`, all write verbs, from the first create to the end, over {} completed steps): object creates, bindings, kubelet (kwok) status updates, the Job controller's writes, the operator's patches, Events, every client's Lease upkeep over the window, and the harness's own workflow creates; {} without the harness's writes (audit log).\n",
        w.all_clients_per_step,
        r.steps_done,
        opt(w.all_clients_but_harness_per_step, 2)
    );
    if let Some(a) = &w.audit {
        let _ = writeln!(s, "By client (audit log, user agent):\n\n| client | writes | per step |\n|---|---|---|");
        for (client, n) in a.per_client() {
            let _ = writeln!(s, "| {client} | {n} | {:.2} |", n as f64 / steps);
        }
        let _ = writeln!(s, "| every client | {} | {:.2} |\n", a.total(), a.total() as f64 / steps);
    }
    let _ = writeln!(s, "By resource (counter, every client, verbs summed):\n\n| resource | writes | per step |\n|---|---|---|");
    for (res, n) in super::writes::per_resource(w.apiserver_request_total.iter().map(|(k, v)| (k, *v))) {
        let _ = writeln!(s, "| {res} | {n:.0} | {:.2} |", n / steps);
    }
    if let Some(a) = &w.audit {
        let window = r.cpu.as_ref().map(|c| c.window_s).unwrap_or(r.duration_s).max(1e-9);
        let _ = writeln!(
            s,
            "\nThe operator: **{} writes per completed step** without Events and Leases, **{} Events per step**; {} writes answered 409. Its Lease upkeep is apart: {} Lease writes over {:.0} s ({:.1} a second for {} replica(s), whatever the load).\n",
            opt(w.operator_per_step, 2),
            opt(w.operator_events_per_step, 2),
            a.operator_conflicts,
            a.lease_writes("shoal"),
            window,
            a.lease_writes("shoal") as f64 / window,
            r.scenario.replicas
        );
        let _ = writeln!(s, "| client | verb resource | writes | per step |\n|---|---|---|---|");
        for (client, m) in &a.by_client {
            for (k, v) in m {
                let _ = writeln!(s, "| {client} | {k}{} | {v} | {:.2} |", if is_event(k) { " (Event)" } else { "" }, *v as f64 / steps);
            }
        }
    }
    let _ = writeln!(s, "\n`apiserver_request_total` over the run (every client), writes only:\n\n| verb resource | writes |\n|---|---|");
    for (k, v) in &w.apiserver_request_total {
        let _ = writeln!(s, "| {k} | {v:.0} |");
    }
    if let Some(b) = &r.bare {
        let n = b.noun();
        let per = b.objects.max(1) as f64;
        let _ = writeln!(
            s,
            "\nThe bare-{n} run, for comparison (no operator; the harness creates the {n}s): **{:.2} writes per {n}, every client** (counter).\n\n| resource | writes | per {n} |\n|---|---|---|",
            b.writes_per_object()
        );
        for (res, v) in super::writes::per_resource(b.writes_by_verb.iter().map(|(k, v)| (k, *v))) {
            let _ = writeln!(s, "| {res} | {v:.0} | {:.2} |", v / per);
        }
        if let Some(a) = &b.audit {
            let _ = writeln!(s, "\n| client | writes | per {n} |\n|---|---|---|");
            for (client, v) in a.per_client() {
                let _ = writeln!(s, "| {client} | {v} | {:.2} |", v as f64 / per);
            }
        }
    }
}

/// What was left after the run, over time: workflows, Jobs, pods, the replicas' RSS.
fn settle_section(s: &mut String, r: &Results, plots: &[String]) {
    let Some(st) = &r.settle else { return };
    let _ = writeln!(
        s,
        "\n## After the run: what is left\n\nFor {:.0} s after the last workflow ended, the run's workflows, Jobs and pods still in the API (lists) and each replica's RSS:\n",
        st.window_s
    );
    let names: Vec<String> = st.samples.iter().flat_map(|x| x.rss_mb.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let _ = writeln!(s, "| s after the end | workflows | Jobs | pods |{}\n|---|---|---|---|{}", names.iter().map(|n| format!(" RSS {n} |")).collect::<String>(), "---|".repeat(names.len()));
    for x in thin(&st.samples, 25) {
        let rss: String = names.iter().map(|n| format!(" {} |", x.rss_mb.get(n).map(|v| format!("{v:.0} MB")).unwrap_or_else(|| "–".into()))).collect();
        let _ = writeln!(s, "| {:.0} | {} | {} | {} |{rss}", x.t, x.workflows, x.jobs, x.pods);
    }
    if let Some(k) = &st.expected {
        let last = st.samples.last();
        let reached = st.samples.iter().find(|x| x.workflows == k.workflows && x.pods == k.steps).map(|x| format!("reached {:.0} s after the end", x.t));
        let _ = writeln!(
            s,
            "\nWhat garbage collection (the workflows' `podGC` and `ttlStrategy`, the operator's defaults from its environment) keeps once its delays have passed: {} workflows and the objects of {} steps (their pods, and their Jobs in Job mode); at the end of the window {} workflows and {} pods were left: {}.",
            k.workflows,
            k.steps,
            last.map(|x| x.workflows).unwrap_or(0),
            last.map(|x| x.pods).unwrap_or(0),
            reached.unwrap_or_else(|| "**not reached** within the window".into())
        );
    }
    if let (Some(first), Some(last)) = (st.samples.first(), st.samples.last()) {
        let change: Vec<String> = names.iter().filter_map(|n| Some(format!("{n} {:.0} → {:.0} MB", first.rss_mb.get(n)?, last.rss_mb.get(n)?))).collect();
        if !change.is_empty() {
            let _ = writeln!(s, "\nReplica RSS over the window: {}.", change.join(", "));
        }
    }
    let total = st.writes_by_verb.values().fold(0.0, |a, v| a + v);
    let _ = writeln!(s, "\nOver the window: {total:.0} writes, every client (counter); the operator's CPU {:.2} s.", st.operator_cpu_s);
    if !st.writes_by_verb.is_empty() {
        let _ = writeln!(s, "\n| verb resource | writes |\n|---|---|");
        for (k, v) in &st.writes_by_verb {
            let _ = writeln!(s, "| {k} | {v:.0} |");
        }
    }
    if let Some(a) = &st.audit {
        let by: Vec<String> = a.per_client().iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = writeln!(s, "\nBy client (audit log): {}.", by.join(", "));
    }
    for p in plots.iter().filter(|p| p.starts_with("settle")) {
        let _ = writeln!(s, "\n![{p}]({p})");
    }
}

/// At most `n` of `v`, evenly spaced, the last one always kept.
pub fn thin<T>(v: &[T], n: usize) -> Vec<&T> {
    let step = v.len().div_ceil(n.max(1)).max(1);
    let mut out: Vec<&T> = v.iter().step_by(step).collect();
    if let Some(last) = v.last()
        && !(v.len() - 1).is_multiple_of(step)
    {
        out.push(last);
    }
    out
}

/// Throughput against replica count, and every run side by side.
pub fn write_comparison(root: &Path, rs: &[&Results]) -> anyhow::Result<PathBuf> {
    let first = rs.first().map(|r| r.started_at.clone()).unwrap_or_default();
    let dir = date_dir(root, "comparison", &first);
    std::fs::create_dir_all(&dir)?;
    let mut s = String::from(
        "# Load test comparison\n\nEach run on a fresh local control plane, one after another. The fraction is of the run's own ceiling (bare Jobs or bare pods, as the ceiling column says); writes per step count every client (`apiserver_request_total`); idle Lease writes are per replica and second.\n\n| run | replicas | executor (steps seen as) | duration | workflows/min | steps/s | bare ceiling | fraction of bare ceiling | completion p99 | dispatch p99 | CPU ms/step | writes/step, every client | operator writes/step | idle Lease writes/s per replica | correct | load avg before → after |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} s | {:.0} | {:.1} | {} | {} | {:.1} s | {} | {} | {} | {} | {} | {} | {:.2} → {:.2} |",
            r.scenario.name,
            r.scenario.replicas,
            executor_cell(r),
            r.duration_s,
            r.workflows_per_min,
            r.steps_per_s,
            r.bare.as_ref().map(|b| format!("{:.1} {}s/s", b.per_s, b.noun())).unwrap_or_else(|| "n/a".into()),
            r.fraction_of_ceiling.map(|f| format!("{:.0} %", f * 100.0)).unwrap_or_else(|| "n/a".into()),
            r.completion_latency_s.p99,
            ms(r.dispatch_latency_s.p99),
            r.cpu.as_ref().map(|c| format!("{:.2}", c.per_step_ms)).unwrap_or_else(|| "n/a".into()),
            r.writes.as_ref().map(|w| format!("{:.2}", w.all_clients_per_step)).unwrap_or_else(|| "n/a".into()),
            opt(r.writes.as_ref().and_then(|w| w.operator_per_step), 2),
            opt(r.idle.as_ref().and_then(|i| i.audit_lease_per_s_per_replica.or(i.lease_per_s_per_replica)), 2),
            if r.correctness.ok { "yes" } else { "**no**" },
            r.machine.load_before[0],
            r.machine.load_after[0]
        );
    }
    let writes: Vec<&&Results> = rs.iter().filter(|r| r.writes.is_some()).collect();
    if !writes.is_empty() {
        let _ = writeln!(s, "\nWrites per completed step, every client, by resource (counter):\n");
        let resources: BTreeSet<String> =
            writes.iter().flat_map(|r| super::writes::per_resource(r.writes.iter().flat_map(|w| w.apiserver_request_total.iter().map(|(k, v)| (k, *v)))).into_keys()).collect();
        let _ = writeln!(s, "| resource |{}\n|---|{}", writes.iter().map(|r| format!(" {} |", r.scenario.name)).collect::<String>(), "---|".repeat(writes.len()));
        let per_run: Vec<BTreeMap<String, f64>> = writes.iter().map(|r| super::writes::per_resource(r.writes.iter().flat_map(|w| w.apiserver_request_total.iter().map(|(k, v)| (k, *v))))).collect();
        for res in &resources {
            let cells: String = writes.iter().zip(&per_run).map(|(r, m)| format!(" {:.2} |", m.get(res).copied().unwrap_or(0.0) / r.steps_done.max(1) as f64)).collect();
            let _ = writeln!(s, "| {res} |{cells}");
        }
        let clients: BTreeSet<String> = writes.iter().filter_map(|r| r.writes.as_ref()?.audit.as_ref()).flat_map(|a| a.by_client.keys().cloned()).collect();
        if !clients.is_empty() {
            let _ = writeln!(s, "\nBy client (audit log):\n\n| client |{}\n|---|{}", writes.iter().map(|r| format!(" {} |", r.scenario.name)).collect::<String>(), "---|".repeat(writes.len()));
            for c in &clients {
                let cells: String = writes
                    .iter()
                    .map(|r| match r.writes.as_ref().and_then(|w| w.audit.as_ref()) {
                        Some(a) => format!(" {:.2} |", a.per_client().get(c).copied().unwrap_or(0) as f64 / r.steps_done.max(1) as f64),
                        None => " n/a |".into(),
                    })
                    .collect();
                let _ = writeln!(s, "| {c} |{cells}");
            }
        }
    }
    let plots = super::plots::comparison_plots(&dir, rs);
    for p in plots {
        let _ = writeln!(s, "\n![{p}]({p})");
    }
    let summary: Vec<serde_json::Value> = rs
        .iter()
        .map(|r| {
            serde_json::json!({"scenario": r.scenario.name, "replicas": r.scenario.replicas, "executor": r.scenario.executor, "steps_per_s": r.steps_per_s, "workflows_per_min": r.workflows_per_min,
                "duration_s": r.duration_s, "fraction_of_ceiling": r.fraction_of_ceiling, "writes_per_step_all_clients": r.writes.as_ref().map(|w| w.all_clients_per_step), "correct": r.correctness.ok})
        })
        .collect();
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&summary)?)?;
    std::fs::write(dir.join("report.md"), s)?;
    Ok(dir)
}

/// The executor a run asked for, and what its steps ran as.
fn executor_cell(r: &Results) -> String {
    let asked = r.scenario.executor.map(|e| format!("{e:?}")).unwrap_or_else(|| "default".into());
    let e = &r.executor_seen;
    match (e.step_jobs, e.step_pods) {
        (0, 0) => asked,
        (_, 0) => format!("{asked} (Jobs)"),
        (0, _) => format!("{asked} (pods)"),
        (j, p) => format!("{asked} ({j} Jobs, {p} pods)"),
    }
}

/// Completions per second over time, in 5 s buckets.
pub fn throughput_series(r: &Results) -> Vec<(f64, f64)> {
    let end = r.end_times.iter().copied().fold(1.0, f64::max);
    rate_series(&r.step_end_times, 5.0, end)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{ExecutorSeen, Idle, Kept, Writes, histogram_quantile, histogram_quantile_where, peak_live, policy_keeps, thin};
    use crate::loadtest::Scenario;
    use crate::loadtest::scenario::Executor;
    use crate::loadtest::writes::AuditWrites;

    fn scenario(extra: &str) -> Scenario {
        Scenario::from_yaml(&format!("name: x\ncount: 100\nfailureFraction: 0.1\n{extra}")).unwrap()
    }

    #[test]
    fn what_garbage_collection_keeps() {
        let no_env = BTreeMap::new();
        assert_eq!(policy_keeps(&scenario(""), &no_env), None, "no policy anywhere: nothing to expect");
        let keeps = |spec: &str| policy_keeps(&scenario(&format!("workflowSpec: {spec}\n")), &no_env).unwrap();
        // 100 five-step workflows, 10 failing at their last step.
        assert_eq!(keeps("{podGC: {strategy: OnWorkflowSuccess}}"), Kept { workflows: 100, steps: 50 });
        assert_eq!(keeps("{podGC: {strategy: OnPodSuccess}}"), Kept { workflows: 100, steps: 10 });
        assert_eq!(keeps("{podGC: {strategy: OnPodCompletion}}"), Kept { workflows: 100, steps: 0 });
        assert_eq!(keeps("{podGC: {strategy: OnWorkflowCompletion, deleteDelayDuration: 5s}}"), Kept { workflows: 100, steps: 0 });
        assert_eq!(keeps("{podGC: {strategy: OnWorkflowSuccess}, ttlStrategy: {secondsAfterSuccess: 30}}"), Kept { workflows: 10, steps: 50 });
        assert_eq!(keeps("{ttlStrategy: {secondsAfterFailure: 30}}"), Kept { workflows: 90, steps: 450 });
        assert_eq!(keeps("{ttlStrategy: {secondsAfterCompletion: 0}}"), Kept { workflows: 0, steps: 0 });
        assert_eq!(keeps("{podGC: {strategy: Never}}"), Kept { workflows: 100, steps: 500 });
        assert_eq!(keeps("{podGC: {strategy: OnPodCompletion, keepLast: 2}}"), Kept { workflows: 100, steps: 200 }, "two of each workflow's five");
        // The operator's defaults fill what the spec leaves unset; the spec wins.
        let env = BTreeMap::from([("SHOAL_POD_GC_STRATEGY".to_string(), "OnPodCompletion".to_string()), ("SHOAL_WORKFLOW_TTL_AFTER_FAILURE".to_string(), "1m".to_string())]);
        assert_eq!(policy_keeps(&scenario(""), &env), Some(Kept { workflows: 90, steps: 0 }));
        assert_eq!(policy_keeps(&scenario("workflowSpec: {podGC: {strategy: OnWorkflowSuccess}}\n"), &env), Some(Kept { workflows: 90, steps: 0 }));
        assert_eq!(policy_keeps(&scenario("workflowSpec: {podGC: {strategy: Never}}\n"), &env), Some(Kept { workflows: 90, steps: 450 }));
    }

    #[test]
    fn writes_per_step_count_every_client_and_split_the_harness_off() {
        let totals = BTreeMap::from([("POST pods".to_string(), 100.0), ("PATCH pods/status".to_string(), 300.0), ("PUT leases".to_string(), 50.0), ("POST workflows".to_string(), 20.0)]);
        let mut a = AuditWrites::default();
        a.by_client.insert("loadtest".into(), BTreeMap::from([("create workflows".into(), 20)]));
        a.by_client.insert("shoal".into(), BTreeMap::from([("create pods".into(), 100), ("patch workflows/status".into(), 120), ("create events".into(), 100), ("update leases".into(), 30)]));
        a.by_client.insert("kwok".into(), BTreeMap::from([("patch pods/status".into(), 300)]));
        let w = Writes::new(totals, Some(a), 100.0);
        assert_eq!(w.all_clients_per_step, 4.7);
        assert_eq!(w.all_clients_but_harness_per_step, Some(6.5));
        assert_eq!(w.operator_per_step, Some(2.2), "without Events and Leases");
        assert_eq!(w.operator_events_per_step, Some(1.0));
        let none = Writes::new(BTreeMap::new(), None, 0.0);
        assert_eq!((none.all_clients_per_step, none.operator_per_step), (0.0, None));
    }

    #[test]
    fn idle_lease_writes_per_replica_net_of_the_other_clients() {
        // 30 s: 120 Lease writes in all, the others write 1.5 a second, 3 replicas.
        assert_eq!(Idle::per_replica(120.0, 30.0, Some(1.5), 3), Some(5.0 / 6.0));
        assert_eq!(Idle::per_replica(120.0, 30.0, None, 3), None, "no baseline, no figure");
        assert_eq!(Idle::per_replica(10.0, 30.0, Some(1.5), 3), Some(0.0), "never below zero");
    }

    #[test]
    fn a_pruned_executor_is_told() {
        let ran_as_jobs = ExecutorSeen { step_jobs: 5, step_pods: 0, status_executor: BTreeMap::new() };
        assert!(ran_as_jobs.mismatch(Some(Executor::Pod)).unwrap().contains("5 step Jobs"));
        assert_eq!(ran_as_jobs.mismatch(Some(Executor::Job)), None);
        assert_eq!(ran_as_jobs.mismatch(None), None);
        let ran_as_pods = ExecutorSeen { step_jobs: 0, step_pods: 5, status_executor: BTreeMap::new() };
        assert_eq!(ran_as_pods.mismatch(Some(Executor::Pod)), None);
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let v: Vec<usize> = (0..100).collect();
        let t = thin(&v, 25);
        assert_eq!((t.len(), *t[0], **t.last().unwrap()), (26, 0, 99));
        assert_eq!(thin(&v[..3], 25).len(), 3);
        assert!(thin::<usize>(&[], 5).is_empty());
    }

    #[test]
    fn old_results_still_read() {
        // A ceiling run and audit counts as reports wrote them before bare pods.
        let bare: super::Bare = serde_json::from_value(serde_json::json!({"jobs": 10, "created": 10, "done": 10, "duration_s": 2.0, "jobs_per_s": 5.0,
            "writes_by_verb": {}, "audit": {"by_client": {}, "jobs_created_twice": [], "operator_job_creates": 0, "operator_conflicts": 0}, "cleanup_s": 1.0, "interrupted": false}))
        .unwrap();
        assert_eq!((bare.kind, bare.objects, bare.per_s, bare.noun()), (Executor::Job, 10, 5.0, "Job"));
    }

    #[test]
    fn quantiles_of_labelled_histograms_sum_the_matching_series_only() {
        let page = [
            "x_bucket{verb=\"POST\",host=\"h\",le=\"0.1\"} 90",
            "x_bucket{verb=\"POST\",host=\"h\",le=\"1.0\"} 100",
            "x_bucket{verb=\"POST\",host=\"h\",le=\"+Inf\"} 100",
            "x_bucket{verb=\"PATCH\",host=\"h\",le=\"0.1\"} 0",
            "x_bucket{verb=\"PATCH\",host=\"h\",le=\"1.0\"} 0",
            "x_bucket{verb=\"PATCH\",host=\"h\",le=\"+Inf\"} 10",
            "y_bucket{le=\"0.5\"} 3",
            "y_bucket{le=\"+Inf\"} 4",
        ]
        .join("\n");
        let pages = [page];
        assert_eq!(histogram_quantile_where(&pages, "x", &[("verb", "POST")], 0.5), Some(0.1));
        assert_eq!(histogram_quantile_where(&pages, "x", &[("verb", "POST")], 0.99), Some(1.0));
        assert_eq!(histogram_quantile_where(&pages, "x", &[("verb", "PATCH")], 0.5), Some(f64::INFINITY));
        assert_eq!(histogram_quantile_where(&pages, "x", &[("verb", "GET")], 0.5), None, "no such series");
        // Summed over every series: 90 of 110 by 0.1.
        assert_eq!(histogram_quantile(&pages, "x", 0.8), Some(0.1));
        assert_eq!(histogram_quantile(&pages, "x", 0.9), Some(1.0));
        assert_eq!(histogram_quantile(&pages, "x", 0.95), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(&pages, "y", 0.5), Some(0.5));
    }

    #[test]
    fn peak_live_counts_overlaps_and_running_workflows() {
        // 0..10 and 5..15 overlap; 15..20 starts as the second ends; 30.. never ended.
        let spans = [(0.0, Some(10.0)), (5.0, Some(15.0)), (15.0, Some(20.0)), (30.0, None)];
        assert_eq!(peak_live(spans.into_iter()), 2);
        let all_running = (0..5).map(|i| (i as f64, None));
        assert_eq!(peak_live(all_running), 5);
        assert_eq!(peak_live(std::iter::empty()), 0);
    }
}
