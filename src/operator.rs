//! The `shoal run` process: configuration, the health and metrics server, and the
//! controllers. Controllers are added by the feature modules; this module owns the process
//! lifecycle and must never hold domain logic.

use std::net::SocketAddr;
use std::sync::Arc;

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
use tokio::sync::watch;

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
}

impl RunConfig {
    /// This replica's identity: the flag, `POD_NAME`, or the hostname.
    pub fn identity(&self) -> String {
        self.identity.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "shoal".into())
        })
    }
}

/// Shared state of the HTTP server.
pub struct Shared {
    pub registry: Registry,
    pub ready: watch::Receiver<bool>,
}

/// Run the operator until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig) -> Result<()> {
    let client = Client::try_default().await.context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    check_crds(&client).await?;
    let registry = Registry::with_prefix("shoal");
    let (ready_tx, ready_rx) = watch::channel(false);
    let shared = Arc::new(Shared { registry, ready: ready_rx });
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr).await.with_context(|| format!("binding {}", cfg.metrics_addr))?;
    tracing::info!(identity = %cfg.identity(), addr = %cfg.metrics_addr, "shoal started");
    let server = axum::serve(listener, router(shared)).with_graceful_shutdown(shutdown_signal());
    ready_tx.send_replace(true);
    server.await?;
    tracing::info!("shoal stopped");
    Ok(())
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
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if *s.ready.borrow() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
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
