//! Metrics that belong to no one controller: controller-runtime's controller and work-queue
//! metrics ([`runtime`]), client-go's Kubernetes request metrics ([`rest`]), the process
//! metrics ([`process`]), and the trace-id exemplars every latency histogram carries.
//!
//! Names and labels are controller-runtime's and client-go's wherever one exists, so that
//! kubebuilder's dashboards and alerts work unchanged; shoal's own metrics start `shoal_`.
//! The full list, and the dashboard's panels, are in docs/metrics.md.
//!
//! The hot paths (every reconcile, every queue operation, every API request) update child
//! handles taken out of a `Family` once; they must never build a label set per event.

pub mod process;
pub mod rest;
pub mod runtime;

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;

pub use runtime::{ControllerMetrics, QueueMetrics, ReconcileResult, RuntimeMetrics};

/// An OpenTelemetry trace id as an exemplar label value: 32 lower-case hex digits, written
/// straight into the page (no string is built per observation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub opentelemetry::trace::TraceId);

impl EncodeLabelValue for TraceId {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

/// The exemplar label set: `{trace_id="…"}`, what Grafana follows to the trace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: TraceId,
}

/// A histogram whose buckets each keep the trace id of their last observation.
pub type ExemplarHistogram = HistogramWithExemplars<TraceLabel>;

/// An [`ExemplarHistogram`] over `buckets`.
pub fn exemplar_histogram(buckets: &[f64]) -> ExemplarHistogram {
    HistogramWithExemplars::new(buckets.iter().copied())
}

/// The trace `span` belongs to, as an exemplar; `None` when tracing is off (no
/// OpenTelemetry layer, or the span is disabled) or the trace is not sampled (it will not be
/// exported, so there would be nothing to jump to), so no exemplar is recorded then.
pub fn exemplar(span: &tracing::Span) -> Option<TraceLabel> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceLabel { trace_id: TraceId(sc.trace_id()) })
}

/// The exemplar of the current span (see [`exemplar`]).
pub fn current_exemplar() -> Option<TraceLabel> {
    exemplar(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use tracing_subscriber::layer::SubscriberExt;

    fn page(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    #[test]
    fn a_histogram_carries_the_trace_id_of_the_span_only_when_tracing_is_on() {
        let h = exemplar_histogram(&[0.1, 1.0]);
        let mut registry = Registry::default();
        registry.register("t_seconds", "test", h.clone());

        // Tracing off: a span exists (a fmt-like subscriber), but no OpenTelemetry layer.
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            let span = tracing::info_span!("reconcile");
            assert!(exemplar(&span).is_none());
            h.observe(0.05, exemplar(&span), None);
        });
        assert!(!page(&registry).contains("trace_id"), "no exemplar without tracing:\n{}", page(&registry));

        // Tracing on: an in-process tracer provider that exports nothing.
        use opentelemetry::trace::TracerProvider as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("reconcile");
            let label = exemplar(&span).expect("a valid span context");
            h.observe(0.5, Some(label.clone()), None);
            // Inside the span, the current span is the same trace.
            let _g = span.enter();
            assert_eq!(current_exemplar(), Some(label.clone()));
            label.trace_id.0
        });
        // A trace that is not sampled is never exported: nothing to link to.
        let unsampled = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff).build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(unsampled.tracer("test")));
        tracing::subscriber::with_default(subscriber, || assert!(exemplar(&tracing::info_span!("reconcile")).is_none(), "an unsampled trace"));
        let text = page(&registry);
        let expected = format!("t_seconds_bucket{{le=\"1.0\"}} 2 # {{trace_id=\"{trace_id:032x}\"}} 0.5");
        assert!(text.contains(&expected), "{expected:?} not in\n{text}");
        assert_eq!(text.matches("trace_id").count(), 1, "only the traced observation has an exemplar:\n{text}");
    }
}
