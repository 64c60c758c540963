//! The `shoal run` process: configuration, the health and metrics server, and the
//! controllers. Controllers are added by the feature modules; this module owns the process
//! lifecycle and must never hold domain logic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::Api;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::controllers::bare_pod::StepPod;
use crate::controllers::runtime::{Runtime, Settings, named};
use crate::controllers::step_job::StepJob;
use crate::controllers::{activity, activity_worker, nsman, task, workflow};
use crate::ha::{HaConfig, HaMetrics, Ownership, Synced};

/// Settings of `shoal run`, from flags or environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// Address of the health and metrics server.
    #[arg(long, env = "SHOAL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Identity of this replica (defaults to the pod name, then the hostname).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Namespace where the operator keeps its Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "shoal-system")]
    pub namespace: String,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "SHOAL_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Append every side effect, as JSON lines, to this file (an audit of who acted on what
    /// under which shard Lease).
    #[arg(long, env = "SHOAL_ACTION_LOG")]
    pub action_log: Option<PathBuf>,
    /// Concurrent reconciles per controller.
    #[arg(long, env = "SHOAL_WORKERS", default_value_t = 16)]
    pub workers: usize,
    /// Look at every object again this often even without a change.
    #[arg(long, env = "SHOAL_RESYNC", default_value = "5m", value_parser = crate::ha::parse_duration)]
    pub resync: Duration,
    #[command(flatten)]
    pub ha: HaConfig,
    #[command(flatten)]
    pub workflow: workflow::WorkflowConfig,
    #[command(flatten)]
    pub nsman: crate::controllers::nsman::NsmanConfig,
    #[command(flatten)]
    pub outbox: crate::outbox::OutboxConfig,
}

impl RunConfig {
    /// This replica's identity: the flag, `POD_NAME`, or the hostname.
    pub fn identity(&self) -> String {
        self.identity.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "shoal".into()))
    }
}

/// Shared state of the HTTP server.
pub struct Shared {
    pub registry: Registry,
    /// Ready: the member Lease is held and the caches of every shard held have synced.
    pub ready: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// Run the operator until SIGTERM or SIGINT. On a signal it stops taking work, drains,
/// releases its Leases (so others take over at once) and returns. If the lease machinery
/// fails, it returns an error: the process must not go on acting without fencing.
pub async fn run(cfg: RunConfig) -> Result<()> {
    cfg.ha.validate().map_err(|e| anyhow::anyhow!(e))?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(crate::metrics::process::ProcessCollector));
    let rest = crate::metrics::rest::RestMetrics::new(&mut registry);
    let clients = crate::ha::Clients::infer(Some(&rest)).await.context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    let client = clients.watch.clone();
    check_crds(&client).await?;
    let ha_metrics = HaMetrics::new(&mut registry);
    let action_log = match &cfg.action_log {
        Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    let identity = cfg.identity();
    let own = Ownership::new(cfg.ha.clone(), identity.clone(), cfg.namespace.clone(), ha_metrics, action_log);
    let shutdown = CancellationToken::new();

    let leases = tokio::spawn(crate::ha::run_leases(clients.request.clone(), own.clone(), shutdown.clone()));
    let settings = Settings { watch_namespace: cfg.watch_namespace.clone(), workers: cfg.workers, resync: cfg.resync };
    let mut rt = Runtime::new(clients, own.clone(), settings, shutdown.clone());
    // The leader labels every shoal kind (ActionPlugins are cluster-scoped and not sharded:
    // only read, never acted on).
    rt.label::<crate::api::Workflow>();
    rt.label::<crate::api::Activity>();
    rt.label::<crate::api::ActivityWorker>();
    rt.label::<crate::api::Task>();
    rt.label::<crate::api::Ignitor>();
    rt.label::<crate::api::NamespaceManager>();

    // Workflows, with their Jobs (a Job wakes the workflow that owns it).
    let workflows = rt.kind::<crate::api::Workflow>("workflow controller");
    registry.register_collector(Box::new(workflow::PhaseCollector { workflows: workflows.informer.clone() }));
    let jobs = rt.children::<_, StepJob>(&workflows, workflow::WORKFLOW_UID_LABEL, workflow::owner_key, workflow::job_change_matters);
    rt.label_children::<StepJob>(workflow::WORKFLOW_LABEL);
    // Bare step pods (`executor: Pod`): a watch of only the pods that carry the executor label.
    let pods = rt.children::<_, StepPod>(&workflows, crate::controllers::bare_pod::SELECTOR, workflow::pod_owner_key, crate::controllers::bare_pod::change_matters);
    rt.label_children::<StepPod>(crate::controllers::bare_pod::SELECTOR);
    let state = workflow::State {
        jobs,
        pods,
        default_executor: cfg.workflow.default_executor,
        step_success_events: cfg.workflow.step_success_events,
        gc: cfg.workflow.gc_defaults(),
        metrics: crate::controllers::Metrics::new(&mut registry),
        pod_looks: Default::default(),
    };
    rt.run(workflows, state, workflow::reconcile);

    // Activities, with their workers (a worker's state change wakes its Activity); workers,
    // with their Jobs. An Activity, its workers and their Jobs share the Activity's shard.
    let activities = rt.kind::<crate::api::Activity>("activity controller");
    let workers_of = rt.children::<_, crate::api::ActivityWorker>(&activities, activity::ACTIVITY_UID_LABEL, activity::owner_key, activity::worker_change_matters);
    rt.run(activities, activity::State { workers: workers_of }, activity::reconcile);
    let workers = rt.kind::<crate::api::ActivityWorker>("activityworker controller");
    let worker_jobs = rt.children::<_, StepJob>(&workers, activity_worker::WORKER_UID_LABEL, activity_worker::owner_key, crate::controllers::jobs::change_matters);
    rt.label_children::<StepJob>(activity_worker::WORKER_LABEL);
    rt.run(workers, activity_worker::State { jobs: worker_jobs }, activity_worker::reconcile);

    // Ignitors: each records its own firings; the Tasks that name it act on them.
    let ignitors = rt.kind::<crate::api::Ignitor>("ignitor controller");
    rt.run(ignitors, crate::controllers::ignitor::State { metrics: crate::controllers::ignitor::IgnitorMetrics::new(&mut registry) }, crate::controllers::ignitor::reconcile);

    // NamespaceManagers; their webhooks go through the effects outbox.
    let outbox = Arc::new(crate::outbox::Outbox::new(&cfg.outbox, &mut registry)?);
    let managers = rt.kind::<crate::api::NamespaceManager>("namespacemanager controller");
    let nsman_metrics = nsman::NsmanMetrics::new(&mut registry);
    rt.run(managers, nsman::State::new(cfg.nsman.clone(), &cfg.namespace, outbox.clone(), nsman_metrics), nsman::reconcile);

    // Tasks, with their Jobs; every replica also follows every Task and Ignitor (unsharded),
    // because a Task's triggers usually live in shards another replica owns.
    let tasks_kind = rt.kind::<crate::api::Task>("task controller");
    let task_jobs = rt.children::<_, StepJob>(&tasks_kind, task::TASK_UID_LABEL, task::owner_key, crate::controllers::jobs::change_matters);
    rt.label_children::<StepJob>(task::TASK_LABEL);
    let (peers, watch_tasks, watch_ignitors) = task::Peers::start(rt.api(), rt.api(), tasks_kind.queue.clone(), shutdown.clone());
    rt.spawn("task peers", watch_tasks);
    rt.spawn("ignitor peers", watch_ignitors);
    rt.cache(peers.clone());
    let task_state = task::State { jobs: task_jobs, peers, outbox, operator_namespace: cfg.namespace.clone(), metrics: task::TaskMetrics::new(&mut registry) };
    rt.run(tasks_kind, task_state, task::reconcile);

    let ready = {
        let own = own.clone();
        let caches = rt.caches();
        move || readiness(own.registered(), &own.active_shards(), &caches)
    };
    let mut tasks = rt.into_tasks();
    let shared = Arc::new(Shared { registry, ready: Box::new(ready) });
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr).await.with_context(|| format!("binding {}", cfg.metrics_addr))?;
    let http_shutdown = shutdown.clone();
    tasks.spawn(named("http server", async move {
        let _ = axum::serve(listener, router(shared)).with_graceful_shutdown(async move { http_shutdown.cancelled().await }).await;
    }));
    tracing::info!(%identity, holder = own.holder(), namespace = %cfg.namespace, shards = cfg.ha.shards, "shoal started");

    let result = supervise(leases, tasks, shutdown_signal(), shutdown).await;
    tracing::info!("shoal stopped");
    result
}

/// Ready means: in the ring (member Lease held) and every cache has listed every shard this
/// replica holds. A replica that holds no shard (more replicas than shards) is ready once
/// registered.
fn readiness(registered: bool, shards: &[u32], caches: &[Arc<dyn Synced>]) -> Result<(), String> {
    if !registered {
        return Err("not registered: the member Lease is not held yet".into());
    }
    if let Some(i) = caches.iter().position(|c| !c.synced(shards)) {
        return Err(format!("cache {i} has not synced every held shard ({} held)", shards.len()));
    }
    Ok(())
}

/// Run until `signal`, or until the lease loop or any other task ends or fails. Every one of
/// them is meant to run for the life of the process, so one that ends is a fault: the process
/// stops working (cancels, lets the lease loop drain and release) and returns an error, to
/// exit non-zero and be restarted.
async fn supervise(
    mut leases: tokio::task::JoinHandle<Result<()>>,
    mut tasks: tokio::task::JoinSet<&'static str>,
    signal: impl std::future::Future<Output = ()>,
    shutdown: CancellationToken,
) -> Result<()> {
    let result = tokio::select! {
        _ = signal => {
            tracing::info!("signal received: draining and releasing leases");
            shutdown.cancel();
            match (&mut leases).await {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("lease loop panicked: {e}")),
            }
        }
        r = &mut leases => {
            shutdown.cancel();
            match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("lease loop stopped unexpectedly")),
                Ok(Err(e)) => Err(e.context("lease machinery failed; exiting rather than acting without fencing")),
                Err(e) => Err(anyhow::anyhow!("lease loop panicked: {e}")),
            }
        }
        Some(ended) = tasks.join_next() => {
            let what = match ended {
                Ok(name) => anyhow::anyhow!("the {name} stopped unexpectedly; exiting so that the process is restarted"),
                Err(e) => anyhow::anyhow!("a task failed ({e}); exiting so that the process is restarted"),
            };
            tracing::error!(error = %what, "supervisor");
            shutdown.cancel();
            let _ = (&mut leases).await;
            Err(what)
        }
    };
    tasks.abort_all();
    result
}

/// Fail fast, with a clear message, when the CRDs are not installed.
async fn check_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds::all() {
        let name = crd.metadata.name.unwrap_or_default();
        api.get_opt(&name).await?.with_context(|| format!("CRD {name} is not installed; apply crds/ or `shoal crds | kubectl apply --server-side -f -`"))?;
    }
    Ok(())
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz)).route("/metrics", get(metrics)).with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease loop and a "job informer" that both run until `shutdown`.
    fn fleet(shutdown: &CancellationToken) -> (tokio::task::JoinHandle<Result<()>>, tokio::task::JoinSet<&'static str>) {
        let s = shutdown.clone();
        let leases = tokio::spawn(async move {
            s.cancelled().await;
            Ok(())
        });
        let mut tasks = tokio::task::JoinSet::new();
        let s = shutdown.clone();
        tasks.spawn(named("job informer", async move { s.cancelled().await }));
        (leases, tasks)
    }

    #[tokio::test]
    async fn a_task_that_ends_stops_the_process_with_an_error() {
        let shutdown = CancellationToken::new();
        let (leases, mut tasks) = fleet(&shutdown);
        tasks.spawn(named("workflow controller", async {}));
        let r = tokio::time::timeout(Duration::from_secs(10), supervise(leases, tasks, std::future::pending(), shutdown.clone())).await.expect("supervise returns");
        let e = r.expect_err("a task that ends is a fault");
        assert!(e.to_string().contains("workflow controller stopped unexpectedly"), "{e}");
        assert!(shutdown.is_cancelled(), "everything else is told to stop");
    }

    struct Cache(Vec<u32>);
    impl Synced for Cache {
        fn synced(&self, shards: &[u32]) -> bool {
            shards.iter().all(|s| self.0.contains(s))
        }
    }

    #[test]
    fn ready_only_when_registered_and_every_cache_synced_every_held_shard() {
        let caches: Vec<Arc<dyn Synced>> = vec![Arc::new(Cache(vec![1, 2, 3])), Arc::new(Cache(vec![1, 2]))];
        assert!(readiness(false, &[], &caches).unwrap_err().contains("not registered"));
        assert!(readiness(true, &[1, 2], &caches).is_ok());
        assert!(readiness(true, &[1, 2, 3], &caches).unwrap_err().contains("cache 1"));
        assert!(readiness(true, &[], &caches).is_ok(), "no shard held (more replicas than shards) is ready");
    }

    #[tokio::test]
    async fn a_signal_is_a_clean_stop() {
        let shutdown = CancellationToken::new();
        let (leases, tasks) = fleet(&shutdown);
        let r = supervise(leases, tasks, async {}, shutdown.clone()).await;
        assert!(r.is_ok(), "{r:?}");
    }
}
