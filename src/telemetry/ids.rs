//! Deterministic trace and span ids. A workflow run, a step attempt and a webhook delivery
//! each get ids that every replica computes alike from what status records (UIDs, the spec
//! generation, the step name and attempt, the delivery id), so a replica that takes a shard
//! over mid-run adds its spans to the trace the previous owner began.
//!
//! The derivation is part of the contract with whoever looks traces up (docs/tracing.md): a
//! change here splits the traces of runs that span an upgrade.

use std::cell::Cell;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

/// SHA-256 of the parts, each prefixed by its length (so `["a/b", "c"]` and `["a", "b/c"]`
/// differ).
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = hmac_sha256::Hash::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize()
}

fn trace_id(parts: &[&[u8]]) -> TraceId {
    let d = digest(parts);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    // An all-zero id is invalid; a digest that starts with 16 zero bytes will not happen,
    // but the id must be valid whatever the input.
    if b == [0; 16] {
        b[15] = 1;
    }
    TraceId::from_bytes(b)
}

fn span_id(parts: &[&[u8]]) -> SpanId {
    let d = digest(parts);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    if b == [0; 8] {
        b[7] = 1;
    }
    SpanId::from_bytes(b)
}

/// The trace of one run of a workflow: its UID and the spec generation that run executes (a
/// new spec starts the steps again from scratch, and so a new trace).
pub fn workflow_trace(uid: &str, generation: i64) -> TraceId {
    trace_id(&[b"shoal.dev/workflow", uid.as_bytes(), &generation.to_be_bytes()])
}

/// The root span of a workflow run (the `workflow` span), parent of its step spans.
pub fn workflow_span(uid: &str, generation: i64) -> SpanId {
    span_id(&[b"shoal.dev/workflow-span", uid.as_bytes(), &generation.to_be_bytes()])
}

/// The span of one attempt of one step, from its dispatch to its completion.
pub fn step_span(uid: &str, generation: i64, step: &str, attempt: i32) -> SpanId {
    span_id(&[b"shoal.dev/step-span", uid.as_bytes(), &generation.to_be_bytes(), step.as_bytes(), &attempt.to_be_bytes()])
}

/// The trace of one webhook delivery, by its deterministic id (`webhook-id`): every attempt,
/// by whichever replica makes it, lands in this trace.
pub fn delivery_trace(delivery_id: &str) -> TraceId {
    trace_id(&[b"shoal.dev/delivery", delivery_id.as_bytes()])
}

/// The root span of a webhook delivery (the `webhook delivery` span).
pub fn delivery_span(delivery_id: &str) -> SpanId {
    span_id(&[b"shoal.dev/delivery-span", delivery_id.as_bytes()])
}

thread_local! {
    static NEXT: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The tracer provider's id generator: random ids, except inside [`with_ids`], where the SDK
/// is handed the ids given there. The SDK has no other way to start a span under an id of
/// our choosing, and it asks for ids synchronously while it builds the span, on the calling
/// thread.
#[derive(Debug, Default)]
pub struct DeterministicIds {
    random: RandomIdGenerator,
}

impl IdGenerator for DeterministicIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(Cell::get).map(|(t, _)| t).unwrap_or_else(|| self.random.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        NEXT.with(Cell::get).map(|(_, s)| s).unwrap_or_else(|| self.random.new_span_id())
    }
}

/// Run `f` (which must build exactly one span, synchronously) with the provider's
/// [`DeterministicIds`] handing out `trace` and `span`. The trace id is used only for a span
/// without a parent; a child takes its parent's.
pub fn with_ids<T>(trace: TraceId, span: SpanId, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            NEXT.with(|n| n.set(None));
        }
    }
    NEXT.with(|n| n.set(Some((trace, span))));
    let _reset = Reset;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        // Golden values: replicas of different versions must compute the same ids, so a change
        // of derivation is a visible, deliberate change (docs/tracing.md documents it).
        assert_eq!(workflow_trace("0b9c1f2e-uid", 1).to_string(), "2d5d2b30e2058228719603a87f32fcce");
        assert_eq!(step_span("0b9c1f2e-uid", 1, "build", 0).to_string(), "6cb9e692ec96fe64");
        assert_ne!(workflow_trace("u", 1), workflow_trace("u", 2), "a new spec generation is a new run");
        assert_ne!(workflow_trace("u", 1), workflow_trace("v", 1));
        assert_ne!(step_span("u", 1, "a", 0), step_span("u", 1, "a", 1), "each attempt has its span");
        assert_ne!(step_span("u", 1, "a", 0), step_span("u", 1, "b", 0));
        assert_ne!(step_span("u", 1, "ab", 0), step_span("u", 1, "a", 0));
        assert_ne!(workflow_span("u", 1), step_span("u", 1, "", 0));
        assert_ne!(delivery_trace("msg_1"), delivery_trace("msg_2"));
        assert!(workflow_trace("u", 1) != TraceId::INVALID && workflow_span("u", 1) != SpanId::INVALID);
    }

    #[test]
    fn the_generator_hands_out_the_given_ids_only_inside_with_ids() {
        let g = DeterministicIds::default();
        let (t, s) = (workflow_trace("u", 1), workflow_span("u", 1));
        let (t2, s2) = with_ids(t, s, || (g.new_trace_id(), g.new_span_id()));
        assert_eq!((t2, s2), (t, s));
        assert_ne!(g.new_trace_id(), t, "random again outside");
        assert_ne!(g.new_span_id(), s);
    }
}
