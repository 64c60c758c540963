//! The spans of work that outlives a reconcile: a workflow run, its step attempts, and a
//! webhook delivery. None of them can be held open in memory (a reconcile lasts
//! milliseconds, and the next one may run on another replica), so each is recorded once,
//! after the fact, by the replica whose status write records its end, with the ids of
//! [`super::ids`] and the start time status holds. Nothing here runs when tracing is off.

use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use opentelemetry::trace::{Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::ids;
use crate::api::delivery::{Delivery, DeliveryState};
use crate::api::workflow::{StepPhase, StepStatus, Workflow, WorkflowPhase, WorkflowStatus};

fn at(t: &Time) -> SystemTime {
    SystemTime::from(t.0)
}

/// The span context of the current `tracing` span (a reconcile), to link to.
fn current() -> Option<SpanContext> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// A remote, sampled parent `span` in `trace`.
fn parent(trace: TraceId, span: SpanId) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(trace, span, TraceFlags::SAMPLED, true, TraceState::default()))
}

/// One finished span with explicit ids and times.
struct Finished {
    trace: TraceId,
    span: SpanId,
    parent: Option<SpanId>,
    name: String,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    error: Option<String>,
    link: Option<SpanContext>,
}

fn emit(tracer: &SdkTracer, f: Finished) {
    let cx = f.parent.map(|p| parent(f.trace, p)).unwrap_or_default();
    let links = f.link.map(|l| vec![Link::with_context(l)]).unwrap_or_default();
    let builder = tracer.span_builder(f.name).with_kind(f.kind).with_start_time(f.start).with_attributes(f.attributes).with_links(links);
    let mut span = ids::with_ids(f.trace, f.span, || tracer.build_with_context(builder, &cx));
    if let Some(e) = f.error {
        span.set_status(Status::error(e));
    }
    span.end_with_timestamp(f.end.max(f.start));
}

/// After a status write of `wf` that was recorded (the resourceVersion precondition held, so
/// exactly one replica records each transition): the span of every step attempt this write
/// finished, and the `workflow` span if it finished the run.
pub fn workflow_recorded(wf: &Workflow, old: Option<&WorkflowStatus>, new: &WorkflowStatus) {
    let Some(tracer) = super::tracer() else {
        return;
    };
    workflow_spans(tracer, wf, old, new, current());
}

/// Link the current reconcile span to the trace of `wf`'s run, so a reconcile can be found
/// from the run's trace and the other way round.
pub fn link_reconcile(wf: &Workflow) {
    if super::tracer().is_none() {
        return;
    }
    let (Some(uid), generation) = (wf.uid(), wf.metadata.generation.unwrap_or(0)) else {
        return;
    };
    let sc = SpanContext::new(ids::workflow_trace(&uid, generation), ids::workflow_span(&uid, generation), TraceFlags::SAMPLED, true, TraceState::default());
    tracing::Span::current().add_link(sc);
}

/// Did this write end attempt `st.attempt` of its step (it was not ended before)?
fn ended_now(old: Option<&StepStatus>, st: &StepStatus) -> bool {
    let ended = st.started_at.is_some() && st.finished_at.is_some() && matches!(st.phase, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Retrying | StepPhase::Cancelled);
    ended && old.is_none_or(|o| o.attempt != st.attempt || o.finished_at.is_none() || o.started_at != st.started_at)
}

pub(crate) fn workflow_spans(tracer: &SdkTracer, wf: &Workflow, old: Option<&WorkflowStatus>, new: &WorkflowStatus, link: Option<SpanContext>) {
    let Some(uid) = wf.uid() else {
        return;
    };
    let generation = wf.metadata.generation.unwrap_or(0);
    let trace = ids::workflow_trace(&uid, generation);
    let root = ids::workflow_span(&uid, generation);
    let ns = wf.namespace().unwrap_or_default();
    let name = wf.name_any();
    let common = || {
        vec![
            KeyValue::new("k8s.namespace.name", ns.clone()),
            KeyValue::new("shoal.workflow", name.clone()),
            KeyValue::new("shoal.workflow.uid", uid.clone()),
            KeyValue::new("shoal.workflow.generation", generation),
        ]
    };
    let before = |step: &str| old.and_then(|o| o.steps.iter().find(|s| s.step_name == step));
    for st in new.steps.iter().filter(|st| ended_now(before(&st.step_name), st)) {
        let (Some(start), Some(end)) = (&st.started_at, &st.finished_at) else { continue };
        let mut attributes = common();
        attributes.extend([
            KeyValue::new("shoal.step", st.step_name.clone()),
            KeyValue::new("shoal.step.attempt", i64::from(st.attempt)),
            KeyValue::new("shoal.step.phase", format!("{:?}", st.phase)),
        ]);
        if let Some(j) = &st.job_name {
            attributes.push(KeyValue::new("k8s.job.name", j.clone()));
        }
        let error = (st.phase != StepPhase::Succeeded).then(|| st.message.clone().unwrap_or_else(|| format!("{:?}", st.phase)));
        let span = ids::step_span(&uid, generation, &st.step_name, st.attempt);
        emit(
            tracer,
            Finished { trace, span, parent: Some(root), name: format!("step {}", st.step_name), kind: SpanKind::Internal, start: at(start), end: at(end), attributes, error, link: link.clone() },
        );
    }

    let was_done = old.and_then(|o| o.workflow_status).is_some_and(|p| matches!(p, WorkflowPhase::Completed | WorkflowPhase::Failed));
    let done = matches!(new.workflow_status, Some(WorkflowPhase::Completed | WorkflowPhase::Failed));
    if done && !was_done {
        let end = new.status_changed.as_ref().map(at).unwrap_or_else(SystemTime::now);
        // The run of the first spec starts when the workflow was created; a later spec's run
        // when its first step was dispatched (status keeps no time for the spec change).
        let first_dispatch = new.steps.iter().filter_map(|s| s.started_at.as_ref()).map(at).min();
        let created = wf.metadata.creation_timestamp.as_ref().map(at).filter(|_| generation <= 1);
        let start = created.or(first_dispatch).unwrap_or(end);
        let mut attributes = common();
        attributes.push(KeyValue::new("shoal.workflow.phase", format!("{:?}", new.workflow_status.unwrap_or(WorkflowPhase::Failed))));
        attributes.push(KeyValue::new("shoal.workflow.steps", new.steps.len() as i64));
        let error = (new.workflow_status == Some(WorkflowPhase::Failed)).then(|| new.message.clone().unwrap_or_else(|| "failed".into()));
        emit(tracer, Finished { trace, span: root, parent: None, name: "workflow".into(), kind: SpanKind::Internal, start, end, attributes, error, link });
    }
}

/// The span of one webhook attempt, a child of the delivery's deterministic root span (so
/// the attempts of one delivery share a trace, whichever replica makes them) and linked to
/// the reconcile that makes it. A disabled span when tracing is off.
pub fn delivery_attempt(d: &Delivery) -> tracing::Span {
    if super::tracer().is_none() {
        return tracing::Span::none();
    }
    let link = current();
    let span = tracing::info_span!("webhook attempt", otel.kind = "client", webhook.id = %d.id, url.full = %d.target, http.request.method = "POST", shoal.delivery.attempt = d.attempts + 1);
    let _ = span.set_parent(parent(ids::delivery_trace(&d.id), ids::delivery_span(&d.id)));
    if let Some(l) = link {
        span.add_link(l);
    }
    span
}

/// Record how the attempt of `span` ended, from the entry it updated.
pub fn delivery_attempted(span: &tracing::Span, d: &Delivery) {
    if span.is_disabled() {
        return;
    }
    if let Some(s) = d.last_status {
        span.set_attribute("http.response.status_code", i64::from(s));
    }
    span.set_attribute("shoal.delivery.state", format!("{:?}", d.state));
    if d.state != DeliveryState::Delivered
        && let Some(e) = &d.last_error
    {
        span.set_status(Status::error(e.clone()));
    }
}

/// The root `webhook delivery` span, from the entry's creation to its end, recorded when the
/// delivery ends (delivered or given up). Its attempts are its children.
pub fn delivery_finished(d: &Delivery) {
    let Some(tracer) = super::tracer() else {
        return;
    };
    delivery_span(tracer, d, None);
}

pub(crate) fn delivery_span(tracer: &SdkTracer, d: &Delivery, link: Option<SpanContext>) {
    let end = d.finished_at.as_ref().map(at).unwrap_or_else(SystemTime::now);
    let start = d.created_at.as_ref().map(at).unwrap_or(end);
    let mut attributes = vec![
        KeyValue::new("webhook.id", d.id.clone()),
        KeyValue::new("url.full", d.target.clone()),
        KeyValue::new("shoal.delivery.attempts", i64::from(d.attempts)),
        KeyValue::new("shoal.delivery.state", format!("{:?}", d.state)),
    ];
    if let Some(s) = d.last_status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    let error = (d.state != DeliveryState::Delivered).then(|| d.last_error.clone().unwrap_or_else(|| "failed".into()));
    let trace = ids::delivery_trace(&d.id);
    emit(tracer, Finished { trace, span: ids::delivery_span(&d.id), parent: None, name: "webhook delivery".into(), kind: SpanKind::Producer, start, end, attributes, error, link });
}
