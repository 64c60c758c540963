//! controller-runtime's controller and work-queue metrics, with its names, labels and
//! buckets: `controller_runtime_reconcile_total{controller,result}`,
//! `controller_runtime_reconcile_errors_total`, `controller_runtime_reconcile_panics_total`,
//! `controller_runtime_reconcile_time_seconds`, `controller_runtime_max_concurrent_reconciles`,
//! `controller_runtime_active_workers`, and `workqueue_*{controller,name}` (both labels hold
//! the controller's name, as controller-runtime sets them).
//!
//! A controller takes its [`ControllerMetrics`] and its queue its [`QueueMetrics`] once; both
//! are child handles, so a reconcile or a queue operation only bumps atomics.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{ExemplarHistogram, TraceLabel, exemplar_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub controller: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub controller: String,
    pub name: String,
}

/// controller-runtime's reconcile time buckets.
const RECONCILE_BUCKETS: [f64; 40] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0,
    30.0, 40.0, 50.0, 60.0,
];

/// client-go's work-queue duration buckets: 10 ns to 1000 s, by tens.
fn queue_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-8, 10.0, 12))
}

fn reconcile_histogram() -> ExemplarHistogram {
    exemplar_histogram(&RECONCILE_BUCKETS)
}

/// How a reconcile ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileResult {
    /// Done; nothing scheduled (an `AwaitChange`).
    Success,
    Error,
    /// Requeued at once (shoal never asks for this; kept so the label set is complete).
    Requeue,
    /// Requeued after a delay (an `Action::Requeue`).
    RequeueAfter,
}

impl ReconcileResult {
    pub const ALL: [ReconcileResult; 4] = [ReconcileResult::Success, ReconcileResult::Error, ReconcileResult::Requeue, ReconcileResult::RequeueAfter];

    pub fn label(self) -> &'static str {
        match self {
            ReconcileResult::Success => "success",
            ReconcileResult::Error => "error",
            ReconcileResult::Requeue => "requeue",
            ReconcileResult::RequeueAfter => "requeue_after",
        }
    }
}

/// Work a queue has started and not finished: the start instants, read at scrape time.
pub trait RunningWork: Send + Sync {
    /// (sum, max) of the seconds each item being processed has run so far.
    fn running_seconds(&self) -> (f64, f64);
}

type Watched = Arc<Mutex<Vec<(QueueLabels, Weak<dyn RunningWork>)>>>;

/// Every controller's and work queue's metrics (the families; see [`RuntimeMetrics::controller`]
/// and [`RuntimeMetrics::queue`] for the handles).
#[derive(Clone)]
pub struct RuntimeMetrics {
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<ControllerLabel, Counter>,
    panics: Family<ControllerLabel, Counter>,
    time: Family<ControllerLabel, ExemplarHistogram>,
    max_concurrent: Family<ControllerLabel, Gauge>,
    active: Family<ControllerLabel, Gauge>,
    depth: Family<QueueLabels, Gauge>,
    adds: Family<QueueLabels, Counter>,
    queue_duration: Family<QueueLabels, Histogram>,
    work_duration: Family<QueueLabels, Histogram>,
    retries: Family<QueueLabels, Counter>,
    running: Watched,
}

impl RuntimeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            panics: Family::default(),
            time: Family::new_with_constructor(reconcile_histogram),
            max_concurrent: Family::default(),
            active: Family::default(),
            depth: Family::default(),
            adds: Family::default(),
            queue_duration: Family::new_with_constructor(queue_histogram),
            work_duration: Family::new_with_constructor(queue_histogram),
            retries: Family::default(),
            running: Arc::default(),
        };
        registry.register("controller_runtime_reconcile", "Total number of reconciliations per controller", m.reconciles.clone());
        registry.register("controller_runtime_reconcile_errors", "Total number of reconciliation errors per controller", m.errors.clone());
        registry.register("controller_runtime_reconcile_panics", "Total number of reconciliation panics per controller", m.panics.clone());
        registry.register("controller_runtime_reconcile_time_seconds", "Length of time per reconciliation per controller", m.time.clone());
        registry.register("controller_runtime_max_concurrent_reconciles", "Maximum number of concurrent reconciles per controller", m.max_concurrent.clone());
        registry.register("controller_runtime_active_workers", "Number of currently used workers per controller", m.active.clone());
        registry.register("workqueue_depth", "Current depth of workqueue", m.depth.clone());
        registry.register("workqueue_adds", "Total number of adds handled by workqueue", m.adds.clone());
        registry.register("workqueue_queue_duration_seconds", "How long in seconds an item stays in workqueue before being requested", m.queue_duration.clone());
        registry.register("workqueue_work_duration_seconds", "How long in seconds processing an item from workqueue takes", m.work_duration.clone());
        registry.register("workqueue_retries", "Total number of retries handled by workqueue", m.retries.clone());
        registry.register_collector(Box::new(UnfinishedWork { running: m.running.clone() }));
        m
    }

    /// The handles of controller `name`, which runs `workers` reconciles at most at once.
    /// Every result starts at zero, so that rates and alerts see the series from the start.
    pub fn controller(&self, name: &str, workers: usize) -> ControllerMetrics {
        let label = ControllerLabel { controller: name.to_string() };
        let result = |r: ReconcileResult| self.reconciles.get_or_create(&ResultLabel { controller: name.to_string(), result: r.label() }).clone();
        self.max_concurrent.get_or_create(&label).set(workers as i64);
        ControllerMetrics {
            results: ReconcileResult::ALL.map(result),
            errors: self.errors.get_or_create(&label).clone(),
            panics: self.panics.get_or_create(&label).clone(),
            time: self.time.get_or_create(&label).clone(),
            active: self.active.get_or_create(&label).clone(),
        }
    }

    /// The handles of the work queue of controller `name`.
    pub fn queue(&self, name: &str) -> QueueMetrics {
        let labels = QueueLabels { controller: name.to_string(), name: name.to_string() };
        QueueMetrics {
            depth: self.depth.get_or_create(&labels).clone(),
            adds: self.adds.get_or_create(&labels).clone(),
            queue_duration: self.queue_duration.get_or_create(&labels).clone(),
            work_duration: self.work_duration.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            labels,
            running: self.running.clone(),
        }
    }
}

/// One controller's handles.
#[derive(Clone)]
pub struct ControllerMetrics {
    /// Indexed by [`ReconcileResult`] (in the order of [`ReconcileResult::ALL`]).
    results: [Counter; 4],
    errors: Counter,
    panics: Counter,
    time: ExemplarHistogram,
    active: Gauge,
}

impl ControllerMetrics {
    /// A worker starts a reconcile.
    pub fn start(&self) {
        self.active.inc();
    }

    /// A reconcile that took `elapsed` ended with `result`; `exemplar` is its trace.
    pub fn finish(&self, result: ReconcileResult, elapsed: Duration, exemplar: Option<TraceLabel>) {
        self.active.dec();
        self.results[result as usize].inc();
        if result == ReconcileResult::Error {
            self.errors.inc();
        }
        self.time.observe(elapsed.as_secs_f64(), exemplar, None);
    }

    pub fn panicked(&self) {
        self.panics.inc();
    }

    /// Reconciles that ended with `result` so far.
    pub fn count(&self, result: ReconcileResult) -> u64 {
        self.results[result as usize].get()
    }

    pub fn panics(&self) -> u64 {
        self.panics.get()
    }

    pub fn errors(&self) -> u64 {
        self.errors.get()
    }
}

/// One work queue's handles.
#[derive(Clone)]
pub struct QueueMetrics {
    pub depth: Gauge,
    pub adds: Counter,
    pub queue_duration: Histogram,
    pub work_duration: Histogram,
    pub retries: Counter,
    labels: QueueLabels,
    running: Watched,
}

impl std::fmt::Debug for QueueMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueMetrics").field("labels", &self.labels).finish()
    }
}

impl QueueMetrics {
    /// Report `queue`'s unfinished work at every scrape, for as long as it lives.
    pub fn watch(&self, queue: Weak<dyn RunningWork>) {
        if let Ok(mut w) = self.running.lock() {
            w.retain(|(_, q)| q.strong_count() > 0);
            w.push((self.labels.clone(), queue));
        }
    }
}

/// `workqueue_unfinished_work_seconds` and `workqueue_longest_running_processor_seconds`,
/// computed from the queues' start instants at scrape time.
#[derive(Debug)]
struct UnfinishedWork {
    running: Watched,
}

impl Collector for UnfinishedWork {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values: Vec<(QueueLabels, (f64, f64))> = match self.running.lock() {
            Ok(w) => w.iter().filter_map(|(l, q)| Some((l.clone(), q.upgrade()?.running_seconds()))).collect(),
            Err(_) => return Ok(()),
        };
        let unfinished = "How many seconds of work has been done that is in progress and hasn't been observed by work_duration. Large values indicate stuck threads.";
        let longest = "How many seconds has the longest running processor for workqueue been running.";
        for (name, help, max) in [("workqueue_unfinished_work_seconds", unfinished, false), ("workqueue_longest_running_processor_seconds", longest, true)] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, (sum_s, max_s)) in &values {
                ConstGauge::new(if max { *max_s } else { *sum_s }).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    struct Busy(f64, f64);
    impl RunningWork for Busy {
        fn running_seconds(&self) -> (f64, f64) {
            (self.0, self.1)
        }
    }

    #[test]
    fn names_and_labels_are_controller_runtime_s() {
        let mut registry = Registry::default();
        let m = RuntimeMetrics::new(&mut registry);
        let c = m.controller("workflow", 16);
        c.start();
        c.finish(ReconcileResult::RequeueAfter, Duration::from_millis(30), None);
        c.start();
        c.finish(ReconcileResult::Error, Duration::from_millis(3), None);
        c.start();
        let q = m.queue("workflow");
        q.adds.inc();
        q.retries.inc();
        let busy: Arc<dyn RunningWork> = Arc::new(Busy(3.5, 2.0));
        q.watch(Arc::downgrade(&busy));
        let text = page(&registry);
        for line in [
            "controller_runtime_reconcile_total{controller=\"workflow\",result=\"success\"} 0",
            "controller_runtime_reconcile_total{controller=\"workflow\",result=\"error\"} 1",
            "controller_runtime_reconcile_total{controller=\"workflow\",result=\"requeue\"} 0",
            "controller_runtime_reconcile_total{controller=\"workflow\",result=\"requeue_after\"} 1",
            "controller_runtime_reconcile_errors_total{controller=\"workflow\"} 1",
            "controller_runtime_reconcile_panics_total{controller=\"workflow\"} 0",
            "controller_runtime_reconcile_time_seconds_bucket{le=\"0.005\",controller=\"workflow\"} 1",
            "controller_runtime_reconcile_time_seconds_count{controller=\"workflow\"} 2",
            "controller_runtime_max_concurrent_reconciles{controller=\"workflow\"} 16",
            "controller_runtime_active_workers{controller=\"workflow\"} 1",
            "workqueue_adds_total{controller=\"workflow\",name=\"workflow\"} 1",
            "workqueue_retries_total{controller=\"workflow\",name=\"workflow\"} 1",
            "workqueue_depth{controller=\"workflow\",name=\"workflow\"} 0",
            "workqueue_queue_duration_seconds_count{controller=\"workflow\",name=\"workflow\"} 0",
            "workqueue_work_duration_seconds_count{controller=\"workflow\",name=\"workflow\"} 0",
            "workqueue_unfinished_work_seconds{controller=\"workflow\",name=\"workflow\"} 3.5",
            "workqueue_longest_running_processor_seconds{controller=\"workflow\",name=\"workflow\"} 2.0",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        // A queue that is gone is no longer reported.
        drop(busy);
        assert!(!page(&registry).contains("workqueue_unfinished_work_seconds{"));
    }
}
