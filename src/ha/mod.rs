//! High availability: membership, shard Leases, fencing, the leader, sharded watches and
//! sharded work queues. This is the only module that reads or writes a Lease.
//!
//! Controllers only ask an [`Ownership`] handle "do I own this object now?" (and get a
//! [`Fence`] to record the action under). They never look at a Lease themselves.
//!
//! Guarantees (see docs/ha.md): an object is in one shard (FNV-1a 64 of its UID mod S); a
//! shard is held by at most one process at a time (the Lease, written with resourceVersion
//! preconditions, names a holder unique to the process). Shard and leader Leases are written
//! only when they change hands; they stay their holder's while its member Lease is renewed.
//! A replica stops acting on every shard once the renew deadline has passed since the
//! instant read just before its last confirmed member-Lease renewal was sent. Others take
//! its shards only after seeing that member Lease unchanged for the (longer) lease duration
//! on their own monotonic clocks, and after clearing its holder on the version they saw, so
//! it stops before anyone else can take over. No wall-clock time is ever compared across replicas.

mod informer;
mod leases;
pub mod writer;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use informer::{Action, Informer, Key, Queue, Synced, controller_name, key_of, run_child_labeler, run_controller, run_labeler};
pub use leases::{LeaseError, run as run_leases};
pub use writer::{Clients, FencedApi, ReadApi, WriteError, Writer};

use crate::api::SHARD_LABEL;

/// Lease and shard settings.
#[derive(Debug, Clone, clap::Args)]
pub struct HaConfig {
    /// Number of virtual shards. Fixed at install time: every replica must agree.
    #[arg(long, env = "SHOAL_SHARDS", default_value_t = 32)]
    pub shards: u32,
    /// How long a Lease is valid after it last changed, in whole seconds (what a Lease
    /// holds); a shard or leader Lease also stays its holder's while the holder's member
    /// Lease is renewed.
    #[arg(long, env = "SHOAL_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// A replica stops acting on its shards this long after the instant just before its last
    /// confirmed member-Lease renewal was sent. Must be shorter than the lease duration.
    #[arg(long, env = "SHOAL_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,
    /// How often the member Lease is renewed and the ring is recomputed (shard and leader
    /// Leases are written only when they change hands).
    #[arg(long, env = "SHOAL_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,
    /// TEST ONLY (hidden): shift every wall-clock time this replica writes into a Lease by
    /// this many seconds (may be negative), to simulate a skewed clock. Never set it in
    /// production.
    #[arg(long, env = "SHOAL_TEST_CLOCK_OFFSET", default_value_t = 0, allow_negative_numbers = true, hide = true)]
    pub test_clock_offset: i64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self { shards: 32, lease_duration: Duration::from_secs(15), renew_deadline: Duration::from_secs(10), retry_period: Duration::from_secs(2), test_clock_offset: 0 }
    }
}

/// Parse `15s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}; use ms, s or m")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl HaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 4096 {
            return Err("shards must be between 1 and 4096".into());
        }
        // A Lease holds whole seconds; validate what is written, not what was asked for.
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.is_zero() || self.lease_duration.as_secs() > i32::MAX as u64 {
            return Err("the lease duration must be a whole number of seconds (a Lease holds whole seconds)".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err("the retry period must be above zero and shorter than the renew deadline".into());
        }
        Ok(())
    }
}

/// Proof of ownership at one moment: the shard and its Lease transition count (the fencing
/// epoch). Two different replicas never hold the same (shard, transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub shard: u32,
    pub transitions: i32,
}

/// What happened to a shard held by this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    Acquired(u32),
    /// Stop new work: the shard is being handed over, or its Lease was lost.
    Released(u32),
}

#[derive(Debug)]
struct Hold {
    transitions: i32,
    acquired: Instant,
    /// Set when the hand-over starts: the end of the member fence at that moment. Work in
    /// flight then was sent under a fence that ends by this; later member renewals do not
    /// extend it.
    draining: Option<Instant>,
    first_reconcile_seen: bool,
}

impl Hold {
    fn new(transitions: i32, acquired: Instant) -> Self {
        Self { transitions, acquired, draining: None, first_reconcile_seen: false }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseWriteLabels {
    /// `member`, `shard` or `leader`.
    pub role: String,
    /// `create`, `update` or `delete`.
    pub verb: String,
}

/// HA metrics.
#[derive(Clone)]
pub struct HaMetrics {
    pub shards_owned: Gauge,
    pub acquisitions: Family<ReasonLabel, Counter>,
    pub releases: Family<ReasonLabel, Counter>,
    pub ownership_denied: Counter,
    pub mislabelled: Counter,
    pub relabelled: Family<ReasonLabel, Counter>,
    pub leader: Family<NameLabel, Gauge>,
    /// Every Lease write request this replica sends, whatever its answer.
    pub lease_writes: Family<LeaseWriteLabels, Counter>,
    pub acquire_to_first_reconcile: Histogram,
    pub cache_objects: Family<KindLabel, Gauge>,
    pub members: Gauge,
    /// controller-runtime's controller and work-queue metrics (the runtime of every kind
    /// lives here, in `ha`).
    pub runtime: crate::metrics::RuntimeMetrics,
}

impl HaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            shards_owned: Gauge::default(),
            acquisitions: Family::default(),
            releases: Family::default(),
            ownership_denied: Counter::default(),
            mislabelled: Counter::default(),
            relabelled: Family::default(),
            leader: Family::default(),
            lease_writes: Family::default(),
            acquire_to_first_reconcile: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            cache_objects: Family::default(),
            members: Gauge::default(),
            runtime: crate::metrics::RuntimeMetrics::new(registry),
        };
        // Every reason from the start, so that a rate (a flapping alert) sees the first one.
        for reason in ["new", "free", "expired"] {
            let _ = m.acquisitions.get_or_create(&ReasonLabel { reason: reason.into() });
        }
        for reason in ["rebalance", "shutdown", "taken", "renew_deadline"] {
            let _ = m.releases.get_or_create(&ReasonLabel { reason: reason.into() });
        }
        for role in ["member", "shard", "leader"] {
            for verb in ["create", "update", "delete"] {
                let _ = m.lease_writes.get_or_create(&LeaseWriteLabels { role: role.into(), verb: verb.into() });
            }
        }
        registry.register("shoal_shards_owned", "Shards this replica holds", m.shards_owned.clone());
        registry.register("shoal_shard_acquisitions", "Shard Leases acquired, by reason", m.acquisitions.clone());
        registry.register("shoal_shard_releases", "Shard Leases released or lost, by reason", m.releases.clone());
        registry.register("shoal_lease_writes", "Lease write requests sent, by the Lease's role and the verb, whatever the answer", m.lease_writes.clone());
        registry.register("shoal_ownership_denied", "Work dropped because this replica did not own the object", m.ownership_denied.clone());
        registry.register("shoal_objects_mislabelled", "Objects kept out of the cache or refused work because their shard label is not the shard of their UID", m.mislabelled.clone());
        registry.register("shoal_objects_relabelled", "Shard labels corrected to the shard of the object's UID, by what was wrong (missing, out_of_range, wrong)", m.relabelled.clone());
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
            m.leader.clone(),
        );
        registry.register("shoal_shard_acquire_to_first_reconcile_seconds", "Time from a shard's acquisition to its first reconcile", m.acquire_to_first_reconcile.clone());
        registry.register("shoal_cache_objects", "Objects in this replica's sharded cache", m.cache_objects.clone());
        registry.register("shoal_ring_members", "Live members this replica sees", m.members.clone());
        m
    }
}

/// One entry of the action log: who did what to which object, under which fence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionRecord {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The holder string of the process that acted: `<identity>_<instance>`.
    pub replica: String,
    pub object: String,
    pub uid: String,
    pub shard: u32,
    pub transitions: i32,
    pub action: String,
}

struct Inner {
    cfg: HaConfig,
    identity: String,
    /// `<identity>_<instance>`: what this process writes as a Lease holder. The instance is
    /// random per process, so two processes with the same identity are different holders.
    holder: String,
    namespace: String,
    held: Mutex<HashMap<u32, Hold>>,
    in_flight: Mutex<HashMap<u32, usize>>,
    /// The local instant read just before the last confirmed write of this replica's member
    /// Lease was sent (counted only once a list of the Leases made after it was answered):
    /// the fence of every shard held, and of the leadership, ends the renew deadline after
    /// it. `None` while this replica has no member Lease of its own.
    member_renewed: Mutex<Option<Instant>>,
    /// The leader Lease's transition count while this replica holds it, else -1.
    leader_epoch: AtomicI64,
    /// Set once this process holds its member Lease and has run one full tick of the lease
    /// loop (it joined the ring and took the shards it could).
    registered: std::sync::atomic::AtomicBool,
    events: broadcast::Sender<ShardEvent>,
    metrics: HaMetrics,
    action_log: Option<Mutex<std::fs::File>>,
}

/// The handle controllers use to ask whether they may act.
#[derive(Clone)]
pub struct Ownership {
    inner: Arc<Inner>,
}

/// Keeps a shard's in-flight count up while a reconcile runs, so a release can drain.
pub struct InFlight {
    inner: Arc<Inner>,
    shard: u32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.in_flight.lock()
            && let Some(c) = m.get_mut(&self.shard)
        {
            *c = c.saturating_sub(1);
        }
    }
}

impl Ownership {
    pub fn new(cfg: HaConfig, identity: String, namespace: String, metrics: HaMetrics, action_log: Option<std::fs::File>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                cfg,
                holder: format!("{identity}_{}", instance_id()),
                identity,
                namespace,
                held: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashMap::new()),
                member_renewed: Mutex::new(None),
                leader_epoch: AtomicI64::new(-1),
                registered: std::sync::atomic::AtomicBool::new(false),
                events,
                metrics,
                action_log: action_log.map(Mutex::new),
            }),
        }
    }

    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The holder string this process writes into Leases (and the action log):
    /// `<identity>_<instance>`, unique to the process.
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// Has this process taken its member Lease (is it in the ring)?
    pub fn registered(&self) -> bool {
        self.inner.registered.load(Ordering::SeqCst)
    }

    pub(crate) fn set_registered(&self, yes: bool) {
        self.inner.registered.store(yes, Ordering::SeqCst);
    }

    /// Shards held and not being handed over: the ones whose caches must be synced for this
    /// replica to be ready.
    pub fn active_shards(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.inner.held.lock().map(|h| h.iter().filter(|(_, h)| h.draining.is_none()).map(|(s, _)| *s).collect()).unwrap_or_default();
        v.sort();
        v
    }

    pub fn config(&self) -> &HaConfig {
        &self.inner.cfg
    }

    pub fn metrics(&self) -> &HaMetrics {
        &self.inner.metrics
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ShardEvent> {
        self.inner.events.subscribe()
    }

    /// The shard an object's label names. Only the sharded watches go by it: it decides
    /// which replica *sees* an object, never which one may act on it.
    pub fn shard_label<K: Resource>(obj: &K) -> Option<u32> {
        obj.meta().labels.as_ref()?.get(SHARD_LABEL)?.parse().ok()
    }

    /// The shard an object belongs in, from its UID (what the leader labels it with); for a
    /// member of a family (see [`family_root`]), from its root's UID.
    pub fn shard_for<K: Resource>(&self, obj: &K) -> Option<u32> {
        family_root(obj.meta()).or(obj.meta().uid.as_deref()).map(|u| crate::core::shard::shard_of(u, self.inner.cfg.shards))
    }

    /// The shard a child belongs in: the shard of its controller owner's UID (the label its
    /// owner gave it at creation); for a member of a family, its root's.
    pub fn shard_for_child<K: Resource>(&self, obj: &K) -> Option<u32> {
        if let Some(root) = family_root(obj.meta()) {
            return Some(crate::core::shard::shard_of(root, self.inner.cfg.shards));
        }
        let owner = obj.meta().owner_references.as_ref()?.iter().find(|r| r.controller == Some(true))?;
        Some(crate::core::shard::shard_of(&owner.uid, self.inner.cfg.shards))
    }

    /// The shard `obj` belongs in, by `sharding`.
    pub fn home_shard<K: Resource>(&self, obj: &K, sharding: Sharding) -> Option<u32> {
        match sharding {
            Sharding::OwnUid => self.shard_for(obj),
            Sharding::ControllerUid => self.shard_for_child(obj),
        }
    }

    /// The shard an object is in: the shard of its UID, and only while its label says so.
    /// An object whose label disagrees (edited, copied from another object, out of range
    /// after `--shards` changed) is nobody's until it is relabelled; the refusal is counted.
    pub fn checked_shard<K: Resource>(&self, obj: &K) -> Option<u32> {
        let shard = self.shard_for(obj)?;
        let label = obj.meta().labels.as_ref().and_then(|l| l.get(SHARD_LABEL));
        if label_state(label.map(String::as_str), shard, self.inner.cfg.shards) == LabelState::Right {
            Some(shard)
        } else {
            self.inner.metrics.mislabelled.inc();
            None
        }
    }

    /// Do I own this shard right now? True only while the Lease is held, not being handed
    /// over, and the member Lease renewed within the renew deadline.
    pub fn owns_shard(&self, shard: u32) -> Option<Fence> {
        let transitions = self.inner.held.lock().ok()?.get(&shard)?.transitions;
        let fence = Fence { shard, transitions };
        self.fence_deadline(fence).map(|_| fence)
    }

    /// When the fence of everything this replica holds ends: the renew deadline after the
    /// instant read just before its last confirmed member-Lease renewal. `None` without a
    /// member Lease.
    pub(crate) fn member_fence_end(&self) -> Option<Instant> {
        self.inner.member_renewed.lock().ok()?.map(|r| r + self.inner.cfg.renew_deadline)
    }

    /// The local monotonic instant at which `fence` stops holding, or `None` if it does not
    /// hold now (not held, draining, another epoch, or already past).
    pub fn fence_deadline(&self, fence: Fence) -> Option<Instant> {
        let deadline = self.member_fence_end()?;
        let held = self.inner.held.lock().ok()?;
        let h = held.get(&fence.shard)?;
        (h.draining.is_none() && h.transitions == fence.transitions && Instant::now() < deadline).then_some(deadline)
    }

    /// Do I own this object right now? Only if I own the shard of its UID and its label
    /// names that shard (see [`Ownership::checked_shard`]).
    pub fn owns<K: Resource>(&self, obj: &K) -> Option<Fence> {
        self.owns_shard(self.checked_shard(obj)?)
    }

    /// Am I the leader right now (holding the leader Lease, within the renew deadline of my
    /// member Lease)? The leader Lease's transition count.
    pub fn leader_fence(&self) -> Option<i64> {
        let epoch = self.inner.leader_epoch.load(Ordering::SeqCst);
        (epoch >= 0 && self.member_fence_end()? > Instant::now()).then_some(epoch)
    }

    fn step_down(&self) {
        self.inner.leader_epoch.store(-1, Ordering::SeqCst);
    }

    /// Count a reconcile as in flight on `shard` until the guard drops. `None` if the shard
    /// is not owned (the work is then dropped and counted).
    pub fn begin(&self, shard: u32) -> Option<(Fence, InFlight)> {
        let Some(fence) = self.owns_shard(shard) else {
            self.inner.metrics.ownership_denied.inc();
            return None;
        };
        *self.inner.in_flight.lock().ok()?.entry(shard).or_default() += 1;
        if let Ok(mut held) = self.inner.held.lock()
            && let Some(h) = held.get_mut(&shard)
            && !h.first_reconcile_seen
        {
            h.first_reconcile_seen = true;
            self.inner.metrics.acquire_to_first_reconcile.observe(h.acquired.elapsed().as_secs_f64());
        }
        Some((fence, InFlight { inner: self.inner.clone(), shard }))
    }

    /// Check the fence right before a side effect and record it in the action log.
    /// Returns false (and records nothing) if the fence no longer holds: the caller must not act.
    pub fn record<K: Resource>(&self, fence: Fence, obj: &K, action: &str) -> bool {
        let object = format!("{}/{}", obj.meta().namespace.as_deref().unwrap_or(""), obj.name_any());
        self.record_action(fence, &object, obj.meta().uid.as_deref().unwrap_or_default(), action)
    }

    /// [`Self::record`] for an object given by its `namespace/name` and UID.
    pub fn record_action(&self, fence: Fence, object: &str, uid: &str, action: &str) -> bool {
        if self.owns_shard(fence.shard) != Some(fence) {
            self.inner.metrics.ownership_denied.inc();
            return false;
        }
        if let Some(log) = &self.inner.action_log {
            let rec = ActionRecord {
                ts_ms: now_ms(),
                replica: self.inner.holder.clone(),
                object: object.to_string(),
                uid: uid.to_string(),
                shard: fence.shard,
                transitions: fence.transitions,
                action: action.to_string(),
            };
            if let (Ok(mut f), Ok(line)) = (log.lock(), serde_json::to_string(&rec)) {
                let _ = writeln!(f, "{line}");
            }
        }
        true
    }

    /// Pretend shard `shard` is held under `transitions` and the member Lease was renewed at
    /// `renewed` (unit tests only).
    #[cfg(test)]
    pub(crate) fn hold_for_test(&self, shard: u32, transitions: i32, renewed: Instant) {
        if let Ok(mut h) = self.inner.held.lock() {
            h.insert(shard, Hold::new(transitions, renewed));
        }
        if let Ok(mut m) = self.inner.member_renewed.lock() {
            *m = Some(renewed);
        }
    }

    /// Held and not being handed over (its fence may have lapsed for a moment).
    pub fn is_held_not_draining(&self, shard: u32) -> bool {
        self.inner.held.lock().map(|h| h.get(&shard).is_some_and(|h| h.draining.is_none())).unwrap_or(false)
    }

    /// Shards held right now (including those being drained).
    pub fn held_shards(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.inner.held.lock().map(|h| h.keys().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    fn in_flight(&self, shard: u32) -> usize {
        self.inner.in_flight.lock().map(|m| m.get(&shard).copied().unwrap_or(0)).unwrap_or(0)
    }
}

/// 48 random bits, as hex: the instance part of a holder string.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Kinds whose objects head a family: objects that reference one (an Activity's workers,
/// and its workers' Jobs, which reference the Activity besides their controller) sit in its
/// shard, so one replica sees and acts on the whole family. A worker is at the same time a
/// kind reconciled on its own and a child of its Activity; without this the two would ask
/// for different shard labels.
pub const FAMILY_ROOTS: [&str; 1] = ["Activity"];

/// The UID of the family root an object references (an ownerReference to a shoal object of
/// a [`FAMILY_ROOTS`] kind), if any.
pub fn family_root(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    meta.owner_references.as_ref()?.iter().find(|r| r.api_version.starts_with("shoal.dev/") && FAMILY_ROOTS.contains(&r.kind.as_str())).map(|r| r.uid.as_str())
}

/// What an object's shard is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Its own UID: an object a controller reconciles (a Workflow).
    OwnUid,
    /// Its controller owner's UID: a child (a step's Job), which must sit in its owner's
    /// shard so that the owner's replica sees it.
    ControllerUid,
}

/// How an object's shard label compares with `home`, the shard of its UID, out of `shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelState {
    Right,
    /// No label: the leader labels it.
    Missing,
    /// A value no sharded watch selects (not a shard number, or not below `shards`): the
    /// leader relabels it.
    OutOfRange,
    /// Another shard in range: the holder of that shard, the one replica that sees it,
    /// relabels it.
    Wrong,
}

impl LabelState {
    pub fn reason(self) -> &'static str {
        match self {
            LabelState::Right => "right",
            LabelState::Missing => "missing",
            LabelState::OutOfRange => "out_of_range",
            LabelState::Wrong => "wrong",
        }
    }
}

pub fn label_state(label: Option<&str>, home: u32, shards: u32) -> LabelState {
    let Some(label) = label else { return LabelState::Missing };
    if label == home.to_string() {
        return LabelState::Right;
    }
    // Exactly the values `shoal.dev/shard=<i>` selects for some i < shards ("03" is not one).
    match label.parse::<u32>() {
        Ok(i) if i < shards && label == i.to_string() => LabelState::Wrong,
        _ => LabelState::OutOfRange,
    }
}

/// The label selector of every object no sharded watch sees: no shard label, or one that
/// is not `0`..`shards - 1`. (`notin` also matches objects without the key.)
pub fn unsharded_selector(shards: u32) -> String {
    let all: Vec<String> = (0..shards).map(|i| i.to_string()).collect();
    format!("{SHARD_LABEL} notin ({})", all.join(","))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_is_right_only_when_it_names_the_shard_of_the_uid() {
        assert_eq!(label_state(Some("3"), 3, 8), LabelState::Right);
        assert_eq!(label_state(None, 3, 8), LabelState::Missing);
        assert_eq!(label_state(Some("7"), 3, 8), LabelState::Wrong);
        assert_eq!(label_state(Some("0"), 3, 8), LabelState::Wrong);
        for bad in ["8", "40", "03", "-1", "", "x", " 3"] {
            assert_eq!(label_state(Some(bad), 3, 8), LabelState::OutOfRange, "{bad:?}");
        }
    }

    fn object(uid: &str, label: Option<&str>) -> k8s_openapi::api::core::v1::ConfigMap {
        let mut o = k8s_openapi::api::core::v1::ConfigMap::default();
        o.metadata.uid = Some(uid.into());
        o.metadata.labels = label.map(|l| [(SHARD_LABEL.to_string(), l.to_string())].into());
        o
    }

    #[test]
    fn ownership_follows_the_uid_and_refuses_a_label_that_disagrees() {
        let cfg = HaConfig { shards: 8, ..HaConfig::default() };
        let own = Ownership::new(cfg, "me".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None);
        let uid = "6f1c1a2e-0000-4000-8000-000000000001";
        let home = crate::core::shard::shard_of(uid, 8);
        let other = (home + 1) % 8;
        for s in [home, other] {
            let now = Instant::now();
            own.hold_for_test(s, 1, now);
        }
        assert_eq!(own.owns(&object(uid, Some(&home.to_string()))), Some(Fence { shard: home, transitions: 1 }));
        // Held, but the label names another shard I also hold: still not mine to act on.
        for label in [Some(other.to_string()), Some("8".into()), Some("x".into()), None] {
            assert_eq!(own.owns(&object(uid, label.as_deref())), None, "{label:?}");
        }
        assert_eq!(own.metrics().mislabelled.get(), 4);
        assert_eq!(own.checked_shard(&object(uid, Some(&home.to_string()))), Some(home));
    }

    #[test]
    fn a_child_belongs_in_the_shard_of_its_controller_owner() {
        let own = Ownership::new(HaConfig { shards: 8, ..HaConfig::default() }, "me".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None);
        let owner = "6f1c1a2e-0000-4000-8000-00000000000a";
        let mut job = object("6f1c1a2e-0000-4000-8000-00000000000b", None);
        let reference = |uid: &str, controller: Option<bool>| k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference { uid: uid.into(), controller, ..Default::default() };
        job.metadata.owner_references = Some(vec![reference("someone-else", None), reference(owner, Some(true))]);
        assert_eq!(own.home_shard(&job, Sharding::ControllerUid), Some(crate::core::shard::shard_of(owner, 8)));
        assert_eq!(own.home_shard(&job, Sharding::OwnUid), own.shard_for(&job));
        job.metadata.owner_references = Some(vec![reference(owner, None)]);
        assert_eq!(own.home_shard(&job, Sharding::ControllerUid), None, "no controller, no shard: left alone");
    }

    #[test]
    fn an_activity_s_workers_and_their_jobs_sit_in_the_activity_s_shard() {
        let own = Ownership::new(HaConfig { shards: 32, ..HaConfig::default() }, "me".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None);
        let reference = |kind: &str, uid: &str, controller: bool| k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "shoal.dev/v1alpha1".into(),
            kind: kind.into(),
            name: "x".into(),
            uid: uid.into(),
            controller: Some(controller),
            ..Default::default()
        };
        let (activity, worker) = ("aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002");
        let home = crate::core::shard::shard_of(activity, 32);
        let mut w = object(worker, None);
        w.metadata.owner_references = Some(vec![reference("Activity", activity, true)]);
        assert_eq!(own.home_shard(&w, Sharding::OwnUid), Some(home), "a worker as a kind of its own");
        assert_eq!(own.home_shard(&w, Sharding::ControllerUid), Some(home), "a worker as the Activity's child");
        let mut job = object("cccccccc-0000-4000-8000-000000000003", None);
        job.metadata.owner_references = Some(vec![reference("ActivityWorker", worker, true), reference("Activity", activity, false)]);
        assert_eq!(own.home_shard(&job, Sharding::ControllerUid), Some(home), "the worker's Job");
        // A worker made by hand (no Activity) is its own root, and its Job follows it.
        let lone = object(worker, None);
        assert_eq!(own.home_shard(&lone, Sharding::OwnUid), Some(crate::core::shard::shard_of(worker, 32)));
        job.metadata.owner_references = Some(vec![reference("ActivityWorker", worker, true)]);
        assert_eq!(own.home_shard(&job, Sharding::ControllerUid), Some(crate::core::shard::shard_of(worker, 32)));
        // A reference to an Activity of another API group is not one.
        let mut foreign = reference("Activity", activity, true);
        foreign.api_version = "example.com/v1".into();
        w.metadata.owner_references = Some(vec![foreign]);
        assert_eq!(own.home_shard(&w, Sharding::OwnUid), Some(crate::core::shard::shard_of(worker, 32)));
    }

    #[test]
    fn the_unsharded_selector_lists_every_shard() {
        assert_eq!(unsharded_selector(3), "shoal.dev/shard notin (0,1,2)");
        assert_eq!(unsharded_selector(1), "shoal.dev/shard notin (0)");
    }
}
