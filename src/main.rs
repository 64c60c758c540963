use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use shoal::telemetry::{LogArgs, OtelSettings};

// mimalloc instead of glibc's malloc: a profile of a replica under load spent about a quarter
// of its time in the allocator (decoding watch events allocates and frees many small strings
// and maps); docs/performance.md has the before and after.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// shoal: a highly available Kubernetes workflow operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the operator.
    Run(Box<shoal::operator::RunConfig>),
    /// Print every CRD as YAML, or write one file per kind into --dir.
    Crds {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print a workflow's DAG as Graphviz DOT, coloured by step state
    /// (`shoal graph my-wf | dot -Tsvg > my-wf.svg`).
    Graph {
        workflow: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Drive a load scenario (loadtest/scenarios) and write a report with plots: on a fresh
    /// local control plane with its own replicas by default, or on $KUBECONFIG's cluster
    /// with --existing.
    Loadtest(shoal::loadtest::Args),
    /// A local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok).
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Build what is missing, start the cluster in the background and install the CRDs.
    Up {
        #[arg(long, default_value = ".shoal-dev")]
        dir: PathBuf,
        /// Number of kwok nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Stop exactly the processes `dev up` started.
    Down {
        #[arg(long, default_value = ".shoal-dev")]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `dev up` polls the API server while it starts; the client's connect errors are expected
    // then and only noise.
    let default_filter = if matches!(cli.cmd, Cmd::Dev { .. } | Cmd::Loadtest(_)) { "warn,kube_client=off,kube_runtime=off" } else { "info" };
    // Traces only from the operator, and only when an OTLP endpoint is set.
    let (otel, instance) = match &cli.cmd {
        Cmd::Run(cfg) => (OtelSettings::from_env(|k| std::env::var(k).ok())?, Some(cfg.identity())),
        _ => (None, None),
    };
    let telemetry = shoal::telemetry::init(cli.log.log_format, default_filter, otel.as_ref(), instance.as_deref())?;
    let result = command(cli.cmd).await;
    // Graceful shutdown: the spans still queued are exported before the process exits.
    telemetry.shutdown(std::time::Duration::from_secs(5)).await;
    result
}

async fn command(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run(cfg) => shoal::operator::run(*cfg).await,
        Cmd::Crds { dir: None } => {
            print!("{}", shoal::api::crds::all_yaml());
            Ok(())
        }
        Cmd::Crds { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for crd in shoal::api::crds::all() {
                std::fs::write(dir.join(shoal::api::crds::file_name(&crd)), shoal::api::crds::to_yaml(&crd))?;
            }
            Ok(())
        }
        Cmd::Graph { workflow, namespace } => {
            let client = kube::Client::try_default().await?;
            let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
            let api: kube::Api<shoal::api::Workflow> = kube::Api::namespaced(client, &ns);
            print!("{}", shoal::core::graph::dot(&api.get(&workflow).await?));
            Ok(())
        }
        Cmd::Loadtest(args) => {
            let reports = shoal::loadtest::main(args).await?;
            anyhow::ensure!(!reports.is_empty(), "no report written");
            Ok(())
        }
        Cmd::Dev { cmd: DevCmd::Up { dir, nodes } } => {
            let mut opts = shoal::dev::UpOptions::new(dir);
            opts.nodes = nodes;
            let c = shoal::dev::up(&opts).await?;
            println!("shoal dev cluster ready at {} ({:.1}s to start)", c.server, c.start_seconds);
            println!("  export KUBECONFIG={}", c.kubeconfig.display());
            println!("  export PATH={}:$PATH   # kubectl {}", c.bin_dir.display(), shoal::dev::K8S_VERSION);
            println!("  kubectl get nodes; kubectl get shoal -A");
            println!("logs: {}/logs   stop: shoal dev down --dir {}", c.dir.display(), c.dir.display());
            Ok(())
        }
        Cmd::Dev { cmd: DevCmd::Down { dir } } => {
            shoal::dev::down(&dir)?;
            println!("stopped the dev cluster in {}", dir.display());
            Ok(())
        }
    }
}
