//! The figures of a run (results.json) and the report that reads them (report.md, plots).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Scenario;
use super::observe::Observed;
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bare {
    pub jobs: usize,
    pub created: usize,
    pub done: usize,
    pub duration_s: f64,
    pub jobs_per_s: f64,
    pub writes_by_verb: BTreeMap<String, f64>,
    pub audit: Option<AuditWrites>,
    /// Seconds to delete the bare Jobs' namespaces before the operator's run.
    pub cleanup_s: f64,
    /// A CPU profile of the API server during this run (written beside the report).
    #[serde(skip, default)]
    pub apiserver_profile: Option<Vec<u8>>,
    /// CPU seconds of each control-plane process from the first create to the last Job done.
    #[serde(default)]
    pub control_plane_s: BTreeMap<String, f64>,
    /// CPU seconds the whole machine was busy over the same window.
    #[serde(default)]
    pub machine_busy_s: f64,
    pub interrupted: bool,
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
    pub all_clients_per_step: f64,
}

impl Writes {
    pub fn new(totals: BTreeMap<String, f64>, audit: Option<AuditWrites>, steps: f64) -> Self {
        let s = steps.max(1.0);
        let all: f64 = totals.values().sum();
        let operator_per_step = audit.as_ref().map(|a| a.client_total("shoal", false) as f64 / s);
        let operator_events_per_step = audit.as_ref().map(|a| a.client_total("shoal", true) as f64 / s);
        Self { apiserver_request_total: totals, audit, operator_per_step, operator_events_per_step, all_clients_per_step: all / s }
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
    /// Step attempts with more than one Job UID seen: "ns/workflow/step#attempt".
    pub duplicate_jobs: Vec<String>,
    /// Steps whose recorded Job UID is not a Job the watch saw for that step.
    pub uid_mismatch: Vec<String>,
    /// Jobs expected (every step of every ended workflow) and seen.
    pub jobs_expected: usize,
    pub jobs_seen: usize,
    /// The audit log's count: Jobs the operator created (HTTP 201) twice under one name.
    pub audit_jobs_created_twice: Vec<String>,
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
                let seen = st.step_uids.iter().any(|((n, wf, s, _), uids)| n == ns && wf == &name && s == step && uids.contains(uid));
                if !seen {
                    c.uid_mismatch.push(format!("{key}/{step}"));
                }
            }
        }
        for ((ns, wf, step, attempt), uids) in &st.step_uids {
            c.jobs_seen += uids.len();
            if uids.len() > 1 {
                c.duplicate_jobs.push(format!("{ns}/{wf}/{step}#{attempt} ({} Jobs)", uids.len()));
            }
        }
        c.duplicate_jobs.sort();
        if let Some(a) = writes.and_then(|w| w.audit.as_ref()) {
            c.audit_jobs_created_twice = a.jobs_created_twice.clone();
        }
        let creates: Vec<String> = actions
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["action"].as_str().map(str::to_string))
            .filter(|a| a.starts_with("create Job/"))
            .collect();
        c.action_log_job_creates = creates.len();
        c.action_log_distinct_jobs = creates.iter().collect::<BTreeSet<_>>().len();
        c.lost.truncate(50);
        c.ok = c.lost.is_empty() && c.wrong_phase.is_empty() && c.duplicate_jobs.is_empty() && c.uid_mismatch.is_empty() && c.audit_jobs_created_twice.is_empty() && c.jobs_seen >= c.jobs_expected;
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
        self.step_end_times = st.jobs.values().filter_map(|j| j.done).map(|d| d - t_load).collect();
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

/// For every step with dependencies: its Job's appearance minus the latest finish of the
/// Jobs of its dependencies (first attempts; the steps of these scenarios never retry).
pub fn dispatch_latencies(sc: &Scenario, st: &Observed) -> Vec<f64> {
    let dag = sc.dag();
    let mut by_step: HashMap<(&str, &str, &str), (f64, Option<f64>)> = HashMap::new();
    for ((ns, wf, step, attempt), uids) in &st.step_uids {
        if attempt != "0" {
            continue;
        }
        if let Some(j) = uids.iter().filter_map(|u| st.jobs.get(u)).min_by(|a, b| a.added.total_cmp(&b.added)) {
            by_step.insert((ns, wf, step), (j.added, j.done));
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
        let _ = writeln!(s, "| step attempts with two Jobs (watch, by UID) | {} |", c.duplicate_jobs.len());
        let _ = writeln!(s, "| Jobs created twice under one name (audit log, HTTP 201) | {} |", c.audit_jobs_created_twice.len());
        let _ = writeln!(s, "| recorded Job UID not the step's Job | {} |", c.uid_mismatch.len());
        let _ = writeln!(s, "| Jobs seen / expected | {} / {} |", c.jobs_seen, c.jobs_expected);
        let _ = writeln!(s, "| fenced create attempts (action logs) / distinct Jobs | {} / {} |", c.action_log_job_creates, c.action_log_distinct_jobs);
    }
    for (what, v) in [("lost", &c.lost), ("wrong phase", &c.wrong_phase), ("duplicates", &c.duplicate_jobs), ("uid mismatch", &c.uid_mismatch), ("two ids", &c.webhook_two_ids)] {
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
            "| step dispatch latency p50 / p90 / p99 / max ({} dependent steps; dependency's Job Complete → dependent Job created, both as the harness's watch saw them) | {} / {} / {} / {} |",
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
        let _ = writeln!(s, "| bare-Job ceiling (same control plane, no operator, {} Jobs at once) | {:.1} Jobs/s ({} done in {:.1} s) |", b.jobs, b.jobs_per_s, b.done, b.duration_s);
        let _ = writeln!(s, "| shoal's steps/s as a fraction of the ceiling | {} |", r.fraction_of_ceiling.map(|f| format!("{:.0} %", f * 100.0)).unwrap_or_else(|| "n/a".into()));
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
                    "\nWhat a step costs each component, against a bare Job of the ceiling run (CPU ms per step or Job; the difference is what the operator's requests, watches and Events add):\n\n| component | bare Job | shoal step | ratio |\n|---|---|---|---|"
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

    if let Some(w) = &r.writes {
        let _ = writeln!(s, "\n## API writes\n");
        if let Some(a) = &w.audit {
            let _ = writeln!(
                s,
                "From the API server's audit log, by client (user agent). The operator: **{} writes per completed step** without Events and Leases, **{} Events per step**; {} writes answered 409. Its Lease upkeep is apart: {} Lease writes over {:.0} s ({:.1} a second for {} replica(s), whatever the load).\n",
                opt(w.operator_per_step, 2),
                opt(w.operator_events_per_step, 2),
                a.operator_conflicts,
                a.lease_writes("shoal"),
                r.cpu.as_ref().map(|c| c.window_s).unwrap_or(r.duration_s),
                a.lease_writes("shoal") as f64 / r.cpu.as_ref().map(|c| c.window_s).unwrap_or(r.duration_s).max(1e-9),
                r.scenario.replicas
            );
            let _ = writeln!(s, "| client | verb resource | writes | per step |\n|---|---|---|---|");
            let steps = r.steps_done.max(1) as f64;
            for (client, m) in &a.by_client {
                for (k, v) in m {
                    let _ = writeln!(s, "| {client} | {k}{} | {v} | {:.2} |", if is_event(k) { " (Event)" } else { "" }, *v as f64 / steps);
                }
            }
        }
        let _ = writeln!(s, "\n`apiserver_request_total` over the run (every client), writes only: {:.2} per step.\n\n| verb resource | writes |\n|---|---|", w.all_clients_per_step);
        for (k, v) in &w.apiserver_request_total {
            let _ = writeln!(s, "| {k} | {v:.0} |");
        }
        if let Some(b) = &r.bare {
            let total: f64 = b.writes_by_verb.values().sum();
            let _ = writeln!(s, "\nThe bare-Job run, for comparison (no operator; the harness creates the Jobs): {:.2} writes per Job, every client.", total / b.jobs.max(1) as f64);
        }
    }

    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for p in plots {
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
        "\n## Method\n\nThe harness (`shoal loadtest`) watches every step Job and workflow itself and times them on one clock: a workflow's completion latency runs from just before its create to the watch event with its final phase; a step's dispatch latency from the watch event that shows its dependency's Job `Complete` to the one that shows its own Job. Operator CPU is user + system time from `/proc/<pid>/stat` of the replicas it started (a killed replica's CPU is read just before the kill), peak RSS is `VmHWM`. Writes come from the API server: `apiserver_request_total` for every client, and the audit log (metadata of every write) to tell the operator's writes (`User-Agent: shoal/…`) from the rest. Duplicates: every Job UID the watch saw per (namespace, workflow, step, attempt); the audit log's 201 creates per Job name; the replicas' fenced action logs. `results.json` holds every figure."
    );
    s
}

/// Throughput against replica count, and every run side by side.
pub fn write_comparison(root: &Path, rs: &[&Results]) -> anyhow::Result<PathBuf> {
    let first = rs.first().map(|r| r.started_at.clone()).unwrap_or_default();
    let dir = date_dir(root, "comparison", &first);
    std::fs::create_dir_all(&dir)?;
    let mut s = String::from(
        "# Load test comparison\n\nEach run on a fresh local control plane, one after another.\n\n| run | replicas | duration | workflows/min | steps/s | fraction of bare ceiling | completion p99 | dispatch p99 | CPU ms/step | operator writes/step | correct | load avg before → after |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} s | {:.0} | {:.1} | {} | {:.1} s | {} | {} | {} | {} | {:.2} → {:.2} |",
            r.scenario.name,
            r.scenario.replicas,
            r.duration_s,
            r.workflows_per_min,
            r.steps_per_s,
            r.fraction_of_ceiling.map(|f| format!("{:.0} %", f * 100.0)).unwrap_or_else(|| "n/a".into()),
            r.completion_latency_s.p99,
            ms(r.dispatch_latency_s.p99),
            r.cpu.as_ref().map(|c| format!("{:.2}", c.per_step_ms)).unwrap_or_else(|| "n/a".into()),
            opt(r.writes.as_ref().and_then(|w| w.operator_per_step), 2),
            if r.correctness.ok { "yes" } else { "**no**" },
            r.machine.load_before[0],
            r.machine.load_after[0]
        );
    }
    let plots = super::plots::comparison_plots(&dir, rs);
    for p in plots {
        let _ = writeln!(s, "\n![{p}]({p})");
    }
    let summary: Vec<serde_json::Value> = rs.iter().map(|r| serde_json::json!({"scenario": r.scenario.name, "replicas": r.scenario.replicas, "steps_per_s": r.steps_per_s, "workflows_per_min": r.workflows_per_min, "duration_s": r.duration_s, "correct": r.correctness.ok})).collect();
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&summary)?)?;
    std::fs::write(dir.join("report.md"), s)?;
    Ok(dir)
}

/// Completions per second over time, in 5 s buckets.
pub fn throughput_series(r: &Results) -> Vec<(f64, f64)> {
    let end = r.end_times.iter().copied().fold(1.0, f64::max);
    rate_series(&r.step_end_times, 5.0, end)
}

#[cfg(test)]
mod tests {
    use super::{histogram_quantile, histogram_quantile_where, peak_live};

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
