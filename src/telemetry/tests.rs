//! Settings from the environment, JSON logs with the trace id, and the after-the-fact spans
//! of workflows and deliveries, recorded by a test span processor.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use opentelemetry::trace::{SpanId, Status, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanProcessor};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use super::*;
use crate::api::delivery::{Delivery, DeliveryState};
use crate::api::workflow::{StepPhase, StepStatus, Workflow, WorkflowPhase, WorkflowStatus};

/// Keeps every span that ends.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Collect {
    fn take(&self) -> Vec<SpanData> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A tracer like the one `init` builds (deterministic ids), whose spans are collected.
fn collecting_tracer() -> (SdkTracer, Collect, SdkTracerProvider) {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder().with_span_processor(spans.clone()).with_id_generator(ids::DeterministicIds::default()).build();
    (provider.tracer("test"), spans, provider)
}

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

#[test]
fn tracing_is_off_unless_an_endpoint_is_set() {
    assert_eq!(OtelSettings::from_env(env(&[])).unwrap(), None);
    assert_eq!(OtelSettings::from_env(env(&[("OTEL_SERVICE_NAME", "x"), ("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap(), None);
    let on = OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")])).unwrap().unwrap();
    assert_eq!(
        on,
        OtelSettings { endpoint: "http://collector:4318".into(), protocol: Protocol::HttpProtobuf, service_name: Some("shoal".into()) },
        "http/protobuf by default, as the specification says"
    );
    let grpc = OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_SERVICE_NAME", "shoal-prod")])).unwrap().unwrap();
    assert_eq!((grpc.protocol, grpc.service_name.as_deref()), (Protocol::Grpc, Some("shoal-prod")));
    let signal = OtelSettings::from_env(env(&[
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/v1/traces"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((signal.endpoint.as_str(), signal.protocol), ("http://t:4318/v1/traces", Protocol::HttpProtobuf), "the traces-specific variables win");
    assert_eq!(OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_SDK_DISABLED", "true")])).unwrap(), None);
    assert_eq!(OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_TRACES_EXPORTER", "none")])).unwrap(), None);
    let named = OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_RESOURCE_ATTRIBUTES", "team=a, service.name=wf")])).unwrap().unwrap();
    assert_eq!(named.service_name, None, "left to OTEL_RESOURCE_ATTRIBUTES");
    let err = OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])).unwrap_err();
    assert!(err.to_string().contains("grpc or http/protobuf"), "{err}");
}

/// A `MakeWriter` that appends to a shared buffer.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// JSON log lines, as `--log-format json` writes them, of every level and target.
    pub(crate) fn json_layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let w = self.clone();
        tracing_subscriber::fmt::layer().json().event_format(JsonWithTraceId::default()).with_writer(move || w.clone())
    }
}

fn lines(c: &Captured) -> Vec<serde_json::Value> {
    c.text().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn json_logs_carry_the_trace_id_of_the_current_span() {
    let (tracer, _spans, _p) = collecting_tracer();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer)).with(logs.json_layer());
    let (trace, span) = tracing::subscriber::with_default(subscriber, || {
        tracing::info!("outside any span");
        let s = tracing::info_span!("reconcile", object = "ns/wf");
        let _g = s.enter();
        tracing::warn!(step = "a", "inside");
        let sc = s.context().span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    });
    let l = lines(&logs);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l[0].get("trace_id").is_none(), "no span, no trace id: {}", l[0]);
    assert_eq!(l[0]["fields"]["message"], "outside any span");
    assert_eq!(l[1]["trace_id"], trace.as_str(), "{}", l[1]);
    assert_eq!(l[1]["span_id"], span.as_str());
    assert_eq!(trace.len(), 32);
    assert_eq!(
        (l[1]["level"].as_str(), l[1]["fields"]["step"].as_str(), l[1]["span"]["object"].as_str()),
        (Some("WARN"), Some("a"), Some("ns/wf")),
        "the rest of the line as tracing-subscriber writes it"
    );

    // Tracing off: the same lines, without ids.
    let logs = Captured::default();
    tracing::subscriber::with_default(tracing_subscriber::registry().with(logs.json_layer()), || {
        let s = tracing::info_span!("reconcile");
        s.in_scope(|| tracing::info!("inside"));
    });
    let l = lines(&logs);
    assert!(l[0].get("trace_id").is_none() && l[0]["fields"]["message"] == "inside", "{l:?}");
}

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap().checked_add(SignedDuration::from_millis(secs * 1000 + 250)).unwrap())
}

fn sys(time: &Time) -> SystemTime {
    SystemTime::from(time.0)
}

fn workflow() -> Workflow {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "etl", "namespace": "team", "uid": "wf-uid-1", "generation": 1, "creationTimestamp": "2023-11-14T22:13:18Z"},
        "spec": {"containers": [{"stepName": "a", "image": "x"}, {"stepName": "b", "image": "x"}]}
    }))
    .unwrap()
}

fn step(name: &str, phase: StepPhase, attempt: i32, started: Option<i64>, finished: Option<i64>) -> StepStatus {
    StepStatus {
        step_name: name.into(),
        phase,
        attempt,
        job_name: Some(format!("etl-{name}-{attempt}")),
        job_uid: None,
        started_at: started.map(t),
        finished_at: finished.map(t),
        output: None,
        message: None,
    }
}

fn status(phase: WorkflowPhase, steps: Vec<StepStatus>, changed: i64) -> WorkflowStatus {
    WorkflowStatus { workflow_status: Some(phase), status_changed: Some(t(changed)), steps, ..Default::default() }
}

#[test]
fn a_step_span_is_recorded_once_when_its_end_is_recorded_with_the_times_of_status() {
    let (tracer, spans, _p) = collecting_tracer();
    let wf = workflow();
    let (trace, root) = (ids::workflow_trace("wf-uid-1", 1), ids::workflow_span("wf-uid-1", 1));
    let s0 = status(WorkflowPhase::Started, vec![step("a", StepPhase::Running, 0, Some(1), None), step("b", StepPhase::Pending, 0, None, None)], 1);
    let s1 = status(WorkflowPhase::Started, vec![step("a", StepPhase::Succeeded, 0, Some(1), Some(4)), step("b", StepPhase::Running, 0, Some(4), None)], 1);
    spans::workflow_spans(&tracer, &wf, Some(&s0), &s1, None);
    let got = spans.take();
    assert_eq!(got.len(), 1, "only step a ended: {got:?}");
    let a = &got[0];
    assert_eq!((a.span_context.trace_id(), a.span_context.span_id(), a.parent_span_id), (trace, ids::step_span("wf-uid-1", 1, "a", 0), root));
    assert!(a.parent_span_is_remote);
    assert_eq!((a.start_time, a.end_time), (sys(&t(1)), sys(&t(4))), "from dispatch to completion, as status records them");
    assert_eq!(a.name, "step a");
    assert_eq!(a.status, Status::Unset);
    assert!(a.attributes.iter().any(|kv| kv.key.as_str() == "k8s.job.name" && kv.value.as_str() == "etl-a-0"));

    // The same write seen again (a resync, or another replica reading it): nothing new.
    spans::workflow_spans(&tracer, &wf, Some(&s1), &s1, None);
    assert!(spans.take().is_empty());

    // b fails once and is retried: the failed attempt has its span, with an error status.
    let mut s2 = s1.clone();
    s2.steps[1] = StepStatus { message: Some("attempt 0 failed (BackoffLimitExceeded); retrying".into()), ..step("b", StepPhase::Retrying, 0, Some(4), Some(6)) };
    spans::workflow_spans(&tracer, &wf, Some(&s1), &s2, None);
    let got = spans.take();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].span_context.span_id(), ids::step_span("wf-uid-1", 1, "b", 0));
    assert!(matches!(&got[0].status, Status::Error { description } if description.contains("BackoffLimitExceeded")), "{:?}", got[0].status);

    // Attempt 1 succeeds and ends the run: its span and the workflow's, on another replica
    // (a tracer of its own) that took the shard over.
    let (tracer2, spans2, _p2) = collecting_tracer();
    let mut s3 = status(WorkflowPhase::Completed, s2.steps.clone(), 9);
    s3.steps[1] = step("b", StepPhase::Succeeded, 1, Some(7), Some(9));
    let mut s2b = s2.clone();
    s2b.steps[1] = step("b", StepPhase::Running, 1, Some(7), None);
    spans::workflow_spans(&tracer2, &wf, Some(&s2b), &s3, None);
    let got = spans2.take();
    assert_eq!(got.len(), 2, "{got:?}");
    let b1 = got.iter().find(|s| s.name == "step b").unwrap();
    assert_eq!((b1.span_context.trace_id(), b1.span_context.span_id(), b1.parent_span_id), (trace, ids::step_span("wf-uid-1", 1, "b", 1), root));
    let w = got.iter().find(|s| s.name == "workflow").unwrap();
    assert_eq!((w.span_context.trace_id(), w.span_context.span_id(), w.parent_span_id), (trace, root, SpanId::INVALID), "the root: same ids on every replica");
    assert_eq!(w.start_time, sys(&Time("2023-11-14T22:13:18Z".parse().unwrap())), "the first spec's run starts at the workflow's creation");
    assert_eq!(w.end_time, sys(&t(9)));
    spans::workflow_spans(&tracer2, &wf, Some(&s3), &s3, None);
    assert!(spans2.take().is_empty(), "a finished run is recorded once");
}

#[test]
fn a_delivery_span_has_the_ids_of_its_webhook_id() {
    let (tracer, spans, _p) = collecting_tracer();
    let d = Delivery {
        id: "msg_0123".into(),
        target: "http://127.0.0.1:9/hook".into(),
        payload: "{}".into(),
        state: DeliveryState::Failed,
        attempts: 3,
        last_error: Some("receiver answered 500".into()),
        last_status: Some(500),
        created_at: Some(t(0)),
        last_attempt_at: Some(t(5)),
        next_attempt_at: None,
        finished_at: Some(t(5)),
    };
    spans::delivery_span(&tracer, &d, None);
    let got = spans.take();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].span_context.trace_id(), got[0].span_context.span_id()), (ids::delivery_trace("msg_0123"), ids::delivery_span("msg_0123")));
    assert_eq!((got[0].start_time, got[0].end_time), (sys(&t(0)), sys(&t(5))));
    assert!(matches!(&got[0].status, Status::Error { description } if description.contains("500")));
}

#[test]
fn nothing_is_built_when_tracing_is_off() {
    // No tracer installed in this test binary: the entry points return at once.
    assert!(!enabled());
    assert!(spans::delivery_attempt(&Delivery::pending("msg_1".into(), "http://x".into(), String::new(), t(0).0)).is_disabled());
}
