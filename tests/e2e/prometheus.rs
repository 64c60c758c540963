//! A real Prometheus (Debian's `prometheus`, which `.ci/run` installs) scrapes a running
//! replica every second while workflows, an Ignitor and a NamespaceManager webhook run; then
//! every query of every panel of the Grafana dashboard (helm/shoal/dashboards/shoal.json, the
//! same file as docs/grafana-dashboard.json) returns data from it, and so do the queries of
//! its template variables. When the OpenTelemetry pipeline is built in, the replica traces
//! (to an OTLP endpoint nobody listens on) and Prometheus returns a reconcile's trace id as an
//! exemplar through `/api/v1/query_exemplars`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use shoal::api::workflow::{Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::operator::{self, Operator, free_port};
use crate::receiver::Receiver;
use crate::workflow::{step, wf};

const T: Duration = Duration::from_secs(90);
/// What `$__rate_interval` stands for in the test's queries: longer than the whole run, so a
/// rate or a quantile over it sees everything the run did.
const RATE_INTERVAL: &str = "10m";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo("helm/shoal/dashboards/shoal.json")).unwrap()).expect("the dashboard is JSON")
}

/// (panel title, refId, expr) of every target of every panel, rows' panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((title.to_string(), t["refId"].as_str().unwrap_or_default().to_string(), t["expr"].as_str().unwrap_or_default().to_string()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Grafana's variables as Grafana would fill them in with "All" selected.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL).replace("${job}", ".*").replace("$job", ".*").replace("${instance}", ".*").replace("$instance", ".*")
}

fn prometheus_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).find(|p| p.is_file()));
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file())).expect("no prometheus binary: install Debian's `prometheus` package (.ci/run does)")
}

/// A Prometheus server scraping one target every second; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target_port: u16, dir: &Path) -> Self {
        let dir = dir.join("prometheus");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Self { child, port, http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap() }
    }

    /// GET an API path with `params`; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = url::Url::parse_with_params(&format!("http://127.0.0.1:{}{path}", self.port), params).unwrap();
        let body = self.http.get(url).send().await.map_err(|e| e.to_string())?.text().await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// The samples of an instant query: (labels, value).
    async fn query(&self, expr: &str) -> Result<Vec<(Value, f64)>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        let sample = |r: &Value| (r["metric"].clone(), r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN));
        Ok(data["result"].as_array().map(|a| a.iter().map(sample).collect()).unwrap_or_default())
    }
}

/// Panels that read zero in a healthy run like this one (nothing failed, nothing is stuck or
/// waiting once the work is done, no Task runs, and the shards were all taken before the
/// first scrape): they need series, not activity.
const QUIET_PANELS: [&str; 6] = ["Reconcile errors and panics by controller", "Work queue depth", "Unfinished work", "Work refused for ownership", "Task runs", "Shard acquisitions"];

/// Why the query does not show data yet, if it does not: no series, or none with a finite
/// value (a quantile of a histogram with no observations is NaN). Else whether some value is
/// not zero.
async fn data(prom: &Prometheus, expr: &str) -> Result<bool, String> {
    match prom.query(expr).await {
        Err(e) => Err(format!("error: {e}")),
        Ok(samples) if samples.is_empty() => Err("no series".into()),
        Ok(samples) if !samples.iter().any(|(_, v)| v.is_finite()) => Err(format!("no finite value: {samples:?}")),
        Ok(samples) => Ok(samples.iter().any(|(_, v)| v.is_finite() && *v != 0.0)),
    }
}

/// Workflows (with dependencies, so dispatch latency is measured), an Ignitor firing now, and
/// a NamespaceManager whose TTL policy calls a loopback webhook: enough for every panel.
async fn run_some_work(client: &kube::Client, ns: &str, rx: &Receiver) {
    let wfs: Api<Workflow> = Api::namespaced(client.clone(), ns);
    for i in 0..3 {
        let spec = json!({"containers": [step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["b", "c"])]});
        wfs.create(&PostParams::default(), &wf(&format!("w{i}"), spec)).await.unwrap();
    }
    let ignitors = common::shoal_api(client, ns, "Ignitor");
    let ign = json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "Ignitor", "metadata": {"name": "now"}, "spec": {"scheduled": "NOW"}});
    ignitors.create(&PostParams::default(), &serde_json::from_value(ign).unwrap()).await.unwrap();
    let managers = common::shoal_api(client, ns, "NamespaceManager");
    let policy = json!({"name": "ttl", "condition": {"type": "TTL", "params": {"ttlSeconds": 1}}, "action": {"type": "WEBHOOK", "params": {"url": rx.url("/hook")}}});
    let mgr = json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "NamespaceManager", "metadata": {"name": "hook"}, "spec": {"policies": [policy]}});
    managers.create(&PostParams::default(), &serde_json::from_value(mgr).unwrap()).await.unwrap();

    eventually(T, "3 workflows Completed", || async {
        let l = wfs.list(&ListParams::default()).await.ok()?;
        (l.items.iter().filter(|w| w.status.as_ref().and_then(|s| s.workflow_status) == Some(WorkflowPhase::Completed)).count() == 3).then_some(())
    })
    .await;
    rx.wait_for(1, T).await;
    eventually(T, "the Ignitor fired", || async { (ignitors.get("now").await.ok()?.data["status"]["ignitionsCount"].as_i64()? >= 1).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_a_replica_and_every_panel_query_has_data() {
    let dashboard = dashboard();
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 30, "the dashboard's queries: {}", queries.len());
    let client = common::client().await;
    let ops = common::namespace(&client, "prom-ops").await;
    let ns = common::namespace(&client, "prom").await;
    let mut op = Operator::new(&ops, &ns);
    // Traced to an endpoint nobody listens on: the spans (and their ids) exist; exporting fails.
    let otlp = format!("http://127.0.0.1:{}", free_port());
    let env: Vec<(&str, &str)> = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp), ("OTEL_SERVICE_NAME", "shoal")];
    op.start_with("r1", "r1", &env);
    let port = op.replicas[0].metrics_port;
    eventually(T, "the replica to be ready", || async { (operator::http_get(port, "/readyz").await?.0 == 200).then_some(()) }).await;

    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let prom = Prometheus::start(port, &op.dir);
    eventually(T, "Prometheus scraping the replica", || async {
        let up = prom.query("up{job=\"shoal\"}").await.ok()?;
        (up.first()?.1 == 1.0).then_some(())
    })
    .await;

    let rx = Receiver::start(None).await;
    run_some_work(&client, &ns, &rx).await;

    // Every target of every panel, until each shows data, and every panel but the quiet ones
    // shows some activity (a few scrapes after the work).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut missing = Vec::new();
        let mut active = std::collections::HashSet::new();
        for (title, ref_id, expr) in &queries {
            let expr = substitute(expr);
            match data(&prom, &expr).await {
                Err(why) => missing.push(format!("{title} [{ref_id}] {expr}: {why}")),
                Ok(true) => {
                    active.insert(title.clone());
                }
                Ok(false) => {}
            }
        }
        let mut titles: Vec<&String> = queries.iter().map(|(t, _, _)| t).collect();
        titles.dedup();
        missing.extend(titles.into_iter().filter(|t| !active.contains(*t) && !QUIET_PANELS.contains(&t.as_str())).map(|t| format!("{t}: every value is 0")));
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {} panel queries show no data:\n{}", missing.len(), queries.len(), missing.join("\n"));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // The template variables' `label_values(<selector>, <label>)` queries.
    for v in dashboard["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let def = v["definition"].as_str().unwrap();
        let inner = def.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).unwrap_or_else(|| panic!("unexpected variable query {def}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let values = prom.api(&format!("/api/v1/label/{}/values", label.trim()), &[("match[]", &substitute(selector.trim()))]).await.unwrap();
        assert!(values.as_array().is_some_and(|a| !a.is_empty()), "variable {}: {def} has no values", v["name"]);
    }

    let end = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() + 1.0);
    let start = format!("{}", started - 1.0);
    for metric in ["controller_runtime_reconcile_time_seconds_bucket", "shoal_step_dispatch_latency_seconds_bucket"] {
        let data = prom.api("/api/v1/query_exemplars", &[("query", metric), ("start", &start), ("end", &end)]).await.unwrap();
        let ids: Vec<String> =
            data.as_array().into_iter().flatten().flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default()).filter_map(|e| Some(e["labels"]["trace_id"].as_str()?.to_string())).collect();
        assert!(ids.iter().any(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) && id.chars().any(|c| c != '0')), "{metric}: no trace-id exemplar in {data}");
    }
    drop(prom);
    drop(op);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}

#[test]
fn the_dashboard_in_the_chart_is_the_one_in_the_docs_and_uses_the_datasource_variable() {
    let chart = std::fs::read(repo("helm/shoal/dashboards/shoal.json")).unwrap();
    let docs = std::fs::read(repo("docs/grafana-dashboard.json")).unwrap();
    assert!(chart == docs, "helm/shoal/dashboards/shoal.json and docs/grafana-dashboard.json differ: copy one onto the other");
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(vars.contains(&"datasource"), "{vars:?}");
    fn walk(panels: &Value, bad: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in std::iter::once(p).chain(p["targets"].as_array().into_iter().flatten()) {
                if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                    bad.push(format!("{}: {}", p["title"], t["datasource"]));
                }
            }
            if p["type"] != "row" && p["datasource"]["uid"] != "${datasource}" {
                bad.push(format!("{}: no ${{datasource}}", p["title"]));
            }
            walk(&p["panels"], bad);
        }
    }
    let mut bad = Vec::new();
    walk(&d["panels"], &mut bad);
    assert!(bad.is_empty(), "panels not on the datasource variable: {bad:?}");
    let docs_md = std::fs::read_to_string(repo("docs/metrics.md")).unwrap();
    for (title, _, expr) in panel_queries(&d) {
        assert!(docs_md.contains(&title) && docs_md.contains(&expr), "docs/metrics.md does not list panel {title:?} with its query {expr}");
    }
}
