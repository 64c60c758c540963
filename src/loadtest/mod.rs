//! `shoal loadtest`: drives a scenario (loadtest/scenarios/*.yaml) against a cluster and
//! writes a report. By default it starts a fresh local control plane per scenario and the
//! operator replicas as `shoal run` processes; against a user's cluster it only drives load.
//!
//! This module owns the harness only. The operator never calls into it.

pub mod nsman;
pub mod observe;
pub mod plots;
pub mod procs;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod writes;

use std::path::PathBuf;

pub use scenario::Scenario;

/// The user agent of the harness's own requests (the operator's is `shoal/<version>`).
pub const USER_AGENT: &str = "shoal-loadtest";

/// `shoal loadtest` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Scenario files or names in loadtest/scenarios (several: run in turn, each on a fresh
    /// control plane, and compare them); with --compare, report directories.
    #[arg(required = true)]
    pub scenarios: Vec<String>,
    /// Drive an existing cluster (its operator already installed) instead of starting a
    /// local control plane. Defaults to $KUBECONFIG only with --existing.
    #[arg(long)]
    pub existing: bool,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With --existing: start the scenario's replicas here anyway (a cluster without shoal
    /// installed, such as the shared test cluster).
    #[arg(long)]
    pub start_replicas: bool,
    /// The operator binary the replicas run (default: this one). Use a release build for
    /// CPU figures.
    #[arg(long, env = "SHOAL_BIN")]
    pub shoal_bin: Option<PathBuf>,
    /// Where reports go: <dir>/<scenario>-<date>/.
    #[arg(long, default_value = "loadtest/reports")]
    pub reports: PathBuf,
    /// Override the scenario's object count.
    #[arg(long)]
    pub count: Option<usize>,
    /// Override the scenario's namespace count.
    #[arg(long)]
    pub namespaces: Option<usize>,
    /// Skip the ceiling run (bare Jobs or bare pods).
    #[arg(long)]
    pub no_bare: bool,
    /// Override the scenario's ceiling run: job, pod or none.
    #[arg(long, value_parser = ["job", "pod", "none"])]
    pub bare: Option<String>,
    /// Override the scenario's executor (`spec.executor` of every workflow): Job or Pod.
    #[arg(long, value_parser = ["Job", "Pod"])]
    pub executor: Option<String>,
    /// No progress bar (logs instead).
    #[arg(long)]
    pub quiet: bool,
    /// Keep the local control plane running after the run (for a look around).
    #[arg(long)]
    pub keep: bool,
    /// Run nothing: compare the reports in the given directories (their results.json).
    #[arg(long)]
    pub compare: bool,
}

/// Find a scenario by path or by name in loadtest/scenarios.
pub fn load_scenario(s: &str) -> anyhow::Result<Scenario> {
    let p = PathBuf::from(s);
    let path = if p.is_file() { p } else { PathBuf::from("loadtest/scenarios").join(format!("{s}.yaml")) };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
    Scenario::from_yaml(&text)
}

/// The command line's overrides of a scenario's fields.
pub fn apply_overrides(args: &Args, sc: &mut Scenario) -> anyhow::Result<()> {
    if let Some(n) = args.count {
        sc.count = n;
    }
    if let Some(n) = args.namespaces {
        sc.namespaces = n;
    }
    if let Some(e) = &args.executor {
        sc.executor = Some(serde_json::from_value(serde_json::json!(e))?);
    }
    if let Some(b) = &args.bare {
        sc.bare = Some(serde_json::from_value(serde_json::json!(b))?);
    }
    if args.no_bare {
        sc.bare = Some(scenario::BareRun::None);
    }
    sc.validate()
}

/// Run every scenario in turn and write the reports; returns the report directories.
pub async fn main(args: Args) -> anyhow::Result<Vec<PathBuf>> {
    if args.compare {
        let rs: Vec<report::Results> = args.scenarios.iter().map(|d| Ok(serde_json::from_slice(&std::fs::read(PathBuf::from(d).join("results.json"))?)?)).collect::<anyhow::Result<_>>()?;
        let dir = report::write_comparison(&args.reports, &rs.iter().collect::<Vec<_>>())?;
        eprintln!("comparison: {}", dir.join("report.md").display());
        return Ok(vec![dir]);
    }
    let mut done = Vec::new();
    let mut results = Vec::new();
    for s in &args.scenarios {
        let mut sc = load_scenario(s)?;
        apply_overrides(&args, &mut sc)?;
        let r = run::run_scenario(&args, &sc).await?;
        let dir = report::write(&args.reports, &r, &[])?;
        eprintln!("report: {}", dir.join("report.md").display());
        let stop = r.interrupted;
        results.push((dir.clone(), r));
        done.push(dir);
        if stop {
            break;
        }
    }
    if results.len() > 1 {
        let rs: Vec<&report::Results> = results.iter().map(|(_, r)| r).collect();
        let dir = report::write_comparison(&args.reports, &rs)?;
        eprintln!("comparison: {}", dir.join("report.md").display());
        done.push(dir);
    }
    let failed: Vec<&str> = results.iter().filter(|(_, r)| !r.correctness.ok).map(|(_, r)| r.scenario.name.as_str()).collect();
    anyhow::ensure!(failed.is_empty(), "correctness checks failed in {failed:?} (see the reports)");
    Ok(done)
}
