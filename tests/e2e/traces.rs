//! Traces in a real Jaeger v2 (all-in-one, in-memory store, built by tests/cluster/build.sh):
//! a workflow run is one trace whose step spans come from two replicas (the shard is handed
//! over mid-run; one exports over OTLP/gRPC, the other over OTLP/HTTP), a webhook delivery is
//! a trace of its own, and the JSON logs carry the trace id. The spans of the first replica reach Jaeger only through the flush at its graceful
//! exit (the batch exporter's schedule is set far beyond the test).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use shoal::api::nsman::{ActionState, NamespaceManager};
use shoal::api::workflow::{StepPhase, Workflow, WorkflowPhase};
use shoal::telemetry::ids;

use crate::common::{self, eventually};
use crate::operator::Operator;
use crate::receiver::Receiver;
use crate::workflow::{step_of, wait_phase, wf};

const SECRET: &str = "whsec_Q2hhbmdlTWVJZllvdVNlZU1lSW5BTG9nTGluZTAx";

/// A Jaeger v2 process on loopback ports of its own. Killed when dropped.
struct Jaeger {
    child: Child,
    otlp_grpc: u16,
    otlp_http: u16,
    query: u16,
    log: PathBuf,
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Jaeger {
    async fn start(dir: &std::path::Path) -> Jaeger {
        let bin = common::bin_dir().join("jaeger");
        assert!(bin.is_file(), "{} is missing: run tests/cluster/build.sh (make cluster)", bin.display());
        let p = shoal::dev::free_ports(4).expect("free ports");
        // The shared config (tests/cluster/jaeger/config.yaml) on free ports: tests run in
        // parallel.
        let config = include_str!("../cluster/jaeger/config.yaml")
            .replace("{QUERY_HTTP}", &p[0].to_string())
            .replace("{QUERY_GRPC}", &p[1].to_string())
            .replace("{OTLP_GRPC}", &p[2].to_string())
            .replace("{OTLP_HTTP}", &p[3].to_string());
        let path = dir.join("jaeger.yaml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("jaeger.log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(format!("file:{}", path.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("jaeger.stderr")).unwrap())
            .spawn()
            .expect("starting jaeger");
        let j = Jaeger { child, otlp_grpc: p[2], otlp_http: p[3], query: p[0], log };
        eventually(Duration::from_secs(60), "Jaeger's query API", || async { j.get("/api/services").await.map(|_| ()) }).await;
        j
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.query);
        let resp = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap().get(url).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        serde_json::from_str(&resp.text().await.ok()?).ok()
    }

    /// The trace `id` once it has at least `spans` spans.
    async fn trace(&self, id: &str, spans: usize) -> Value {
        let what = format!("trace {id} with {spans} spans in Jaeger (its log: {})", self.log.display());
        eventually(Duration::from_secs(30), &what, || async {
            let t = self.get(&format!("/api/traces/{id}")).await?["data"][0].clone();
            (t["spans"].as_array()?.len() >= spans).then_some(t)
        })
        .await
    }
}

/// The span of `t` named `name` whose tag `key` is `value` (or the only one named so).
fn span<'a>(t: &'a Value, name: &str, tag: Option<(&str, Value)>) -> &'a Value {
    let all = t["spans"].as_array().unwrap();
    let found: Vec<&Value> = all.iter().filter(|s| s["operationName"] == name && tag.as_ref().is_none_or(|(k, v)| tag_of(s, k) == Some(v.clone()))).collect();
    assert_eq!(found.len(), 1, "one span {name} {tag:?} in {}", names(t));
    found[0]
}

fn names(t: &Value) -> String {
    t["spans"].as_array().unwrap().iter().map(|s| s["operationName"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join(", ")
}

fn tag_of(s: &Value, key: &str) -> Option<Value> {
    s["tags"].as_array()?.iter().find(|t| t["key"] == key).map(|t| t["value"].clone())
}

/// The replica (`service.instance.id` of its process) that recorded span `s` of trace `t`.
fn replica(t: &Value, s: &Value) -> String {
    let p = &t["processes"][s["processID"].as_str().unwrap()];
    p["tags"].as_array().unwrap().iter().find(|t| t["key"] == "service.instance.id").map(|t| t["value"].as_str().unwrap().to_string()).unwrap_or_default()
}

fn parent(s: &Value) -> Option<String> {
    s["references"].as_array()?.iter().find(|r| r["refType"] == "CHILD_OF").map(|r| r["spanID"].as_str().unwrap().to_string())
}

async fn ready(port: u16) -> Option<()> {
    let resp = reqwest::Client::builder().no_proxy().build().unwrap().get(format!("http://127.0.0.1:{port}/readyz")).send().await.ok()?;
    resp.status().is_success().then_some(())
}

/// SIGTERM replica `name` and wait (bounded) for it to exit cleanly.
async fn stop(op: &mut Operator, name: &str) {
    kill(Pid::from_raw(op.pid(name)), Signal::SIGTERM).unwrap();
    let r = op.replicas.iter_mut().find(|r| r.name == name).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{name} did not exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{name} exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_run_is_one_trace_across_a_handover_and_a_delivery_is_another() {
    let client = common::client().await;
    let ops = common::namespace(&client, "trace-ops").await;
    let work = common::namespace(&client, "trace").await;
    let mut op = Operator::new(&ops, &work);
    let jaeger = Jaeger::start(&op.dir).await;
    op.extra_args = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"].map(String::from).to_vec();
    let endpoint = format!("http://127.0.0.1:{}", jaeger.otlp_grpc);
    let service = format!("shoal-{work}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SERVICE_NAME", service.as_str()),
        // Exported only when the queue fills (it will not) or at exit: what reaches Jaeger
        // from a replica came through its flush on shutdown.
        ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
        ("SHOAL_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,shoal::outbox=debug,kube=warn"),
    ];
    op.start_with("r1", "trace-r1", &env);
    let port = |op: &Operator, name: &str| op.replicas.iter().find(|r| r.name == name).unwrap().metrics_port;
    let p1 = port(&op, "r1");
    eventually(Duration::from_secs(60), "r1 ready", || ready(p1)).await;

    // A signed webhook (NamespaceManager, TTL 0), and a 3-step workflow whose middle step
    // fails once and is retried, each attempt running 6 s: time to hand the shard over.
    let rx = Receiver::start(Some(SECRET)).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &work);
    secrets.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "hook"}, "stringData": {"secret": SECRET}})).unwrap()).await.unwrap();
    let managers: Api<NamespaceManager> = Api::namespaced(client.clone(), &work);
    let hook = json!({"policies": [{"name": "now", "condition": {"type": "TTL", "params": {"ttlSeconds": 0}},
        "action": {"type": "WEBHOOK", "params": {"url": rx.url("/traced"), "secretRef": {"name": "hook"}}}}]});
    managers
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "NamespaceManager", "metadata": {"name": "hook"}, "spec": hook})).unwrap())
        .await
        .unwrap();
    let wfs: Api<Workflow> = Api::namespaced(client.clone(), &work);
    let slow = json!({"stepName": "b", "image": "busybox", "dependsOn": ["a"], "retries": 1, "metadata": {"annotations": {"kwok.shoal.dev/delay": "6s", "kwok.shoal.dev/fail-attempts": "1"}}});
    wfs.create(&PostParams::default(), &wf("traced", json!({"containers": [{"stepName": "a", "image": "busybox"}, slow, {"stepName": "c", "image": "busybox", "dependsOn": ["b"]}]}))).await.unwrap();

    // r1 alone records step a and the delivery; then r2 joins and r1 leaves (SIGTERM: it
    // hands its shards over and flushes its spans).
    eventually(Duration::from_secs(90), "step a Succeeded, recorded by r1", || async {
        let w = wfs.get("traced").await.ok()?;
        (w.status.as_ref()?.steps.iter().any(|s| s.step_name == "a" && s.phase == StepPhase::Succeeded)).then_some(())
    })
    .await;
    let m = eventually(Duration::from_secs(60), "the webhook delivered", || async {
        let m = managers.get("hook").await.ok()?;
        (m.status.as_ref()?.action.as_ref()?.state == ActionState::Succeeded).then_some(m)
    })
    .await;
    let delivery = m.status.unwrap().action.unwrap().delivery_id.expect("the delivery id");
    // r2 exports over OTLP/HTTP (the specification's default protocol), r1 over gRPC.
    let http_endpoint = format!("http://127.0.0.1:{}", jaeger.otlp_http);
    let mut env2 = env;
    env2[0].1 = &http_endpoint;
    env2[1].1 = "http/protobuf";
    op.start_with("r2", "trace-r2", &env2);
    let p2 = port(&op, "r2");
    eventually(Duration::from_secs(60), "r2 ready", || ready(p2)).await;
    stop(&mut op, "r1").await;
    let w = wfs.get("traced").await.unwrap();
    assert_ne!(step_of(&w, "c").phase, StepPhase::Succeeded, "step c must end after r1 left (the machine was too slow for this test's timing)");
    let w = wait_phase(&wfs, "traced", WorkflowPhase::Completed).await;
    stop(&mut op, "r2").await;

    // The run's trace: its id from the workflow's UID and generation, as any replica computes it.
    let uid = w.uid().unwrap();
    let generation = w.metadata.generation.unwrap();
    let trace = jaeger.trace(&ids::workflow_trace(&uid, generation).to_string(), 5).await;
    eprintln!("workflow trace: {}", names(&trace));
    let root = span(&trace, "workflow", None);
    assert_eq!(root["spanID"], ids::workflow_span(&uid, generation).to_string());
    assert_eq!(parent(root), None);
    assert_eq!(tag_of(root, "shoal.workflow.phase"), Some(json!("Completed")));
    let a = span(&trace, "step a", None);
    let b0 = span(&trace, "step b", Some(("shoal.step.attempt", json!(0))));
    let b1 = span(&trace, "step b", Some(("shoal.step.attempt", json!(1))));
    let c = span(&trace, "step c", None);
    for (s, step, attempt) in [(a, "a", 0), (b0, "b", 0), (b1, "b", 1), (c, "c", 0)] {
        assert_eq!(s["spanID"], ids::step_span(&uid, generation, step, attempt).to_string(), "step {step} attempt {attempt}");
        assert_eq!(parent(s).as_deref(), root["spanID"].as_str(), "step {step} is a child of the run");
    }
    assert_eq!(tag_of(b0, "error"), Some(json!(true)), "the failed attempt is an error: {b0}");
    // From dispatch (status startedAt, whole seconds) to completion.
    let started_us = |s: &str| step_of(&w, s).started_at.unwrap().0.as_microsecond();
    assert_eq!(a["startTime"].as_i64().unwrap(), started_us("a"));
    assert_eq!(b1["startTime"].as_i64().unwrap(), started_us("b"));
    assert!(b1["duration"].as_i64().unwrap() >= 5_000_000, "attempt 1 of b ran 6 s: {b1}");
    // Two replicas, one trace.
    assert_eq!(replica(&trace, a), "trace-r1", "step a was recorded by r1");
    assert_eq!(replica(&trace, c), "trace-r2", "step c was recorded by r2, after the handover");
    assert_eq!(replica(&trace, root), "trace-r2");
    assert_eq!(trace["processes"][root["processID"].as_str().unwrap()]["serviceName"], service.as_str());

    // Reconciles are traces of their own, linked to the run.
    let found = jaeger.get(&format!("/api/traces?service={service}&operation=reconcile&limit=500&lookback=1h")).await.expect("search");
    let linked = found["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["spans"].as_array().unwrap())
        .filter(|s| s["references"].as_array().is_some_and(|r| r.iter().any(|r| r["traceID"] == trace["traceID"])))
        .count();
    assert!(linked > 0, "some reconcile span links to the run's trace");

    // The delivery: a trace of its own, its attempt a child of its root.
    let dt = jaeger.trace(&ids::delivery_trace(&delivery).to_string(), 2).await;
    let droot = span(&dt, "webhook delivery", None);
    let attempt = span(&dt, "webhook attempt", None);
    assert_eq!(droot["spanID"], ids::delivery_span(&delivery).to_string());
    assert_eq!(parent(attempt).as_deref(), droot["spanID"].as_str());
    assert_eq!(tag_of(attempt, "http.response.status_code"), Some(json!(200)));
    assert_eq!(tag_of(attempt, "webhook.id"), Some(json!(delivery)));
    assert_eq!(replica(&dt, attempt), "trace-r1");

    // JSON logs: the attempt's log line carries the delivery's trace id; no line, and no
    // span, holds the signing secret.
    let r1_log = std::fs::read_to_string(op.dir.join("r1.stderr")).unwrap();
    let lines: Vec<Value> = r1_log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty() && lines.len() == r1_log.lines().count(), "every log line is JSON:\n{r1_log}");
    let want = ids::delivery_trace(&delivery).to_string();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "webhook attempt" && l["trace_id"] == want.as_str()), "the attempt's log line carries trace_id {want}:\n{r1_log}");
    let key = SECRET.trim_start_matches("whsec_");
    for (what, text) in [("r1's log", r1_log), ("r2's log", std::fs::read_to_string(op.dir.join("r2.stderr")).unwrap()), ("the delivery trace", dt.to_string())] {
        assert!(!text.contains(key), "{what} holds the signing secret");
    }
    let got = rx.requests();
    assert!(got.iter().all(|r| r.signature_ok) && !got.is_empty());
    drop(jaeger);
    common::cleanup(&client, &work).await;
    common::cleanup(&client, &ops).await;
}
