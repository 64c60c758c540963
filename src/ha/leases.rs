//! The lease loop: keeps this replica's member Lease fresh, computes the ring, acquires the
//! shard Leases it should hold, drains and releases (in the background) the ones it should
//! not, holds or takes the leader Lease, and knows when its fence ends.
//!
//! Only the member Lease is renewed. A shard or leader Lease is written when it changes hands
//! (acquire, release, takeover) and stays its holder's while the holder's member Lease is
//! renewed; the fence of everything a replica holds counts from its last confirmed member
//! renewal. Another replica takes a shard or leader Lease only when it is free, or when the
//! Lease has not changed for a lease duration and its holder's member Lease is gone, names
//! another process, or has not changed for a lease duration either; in that last case it
//! first clears that member Lease's holder on the version it saw, so a renewal racing with
//! the takeover either lands first (and the clearing fails) or is refused.
//!
//! Expiry is judged as client-go judges it, by observation on the local monotonic clock: a
//! Lease has expired when its record has not changed for its `leaseDurationSeconds` since
//! this replica first saw it so. The wall-clock times in a Lease are written for people and
//! other tools, and never compared with the local wall clock, so only the *rate* of the
//! replicas' clocks matters.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::informer::{API_BACK, with_backoff};
use super::{Hold, Ownership, ReasonLabel, ShardEvent};

const MANAGED: &str = "app.kubernetes.io/managed-by=shoal";
const ROLE: &str = "shoal.dev/lease-role";
/// Marks a Lease written under this protocol (only member Leases renewed). A replica of an
/// earlier version renews every Lease it holds and takes a shard Lease once the Lease itself
/// has not changed for a lease duration, so it would take the quiet shard Leases of this
/// one: the two must never run together, and a member Lease without this label is theirs.
const PROTOCOL: &str = "shoal.dev/lease-protocol";
const PROTOCOL_VERSION: &str = "2";
const LEADER_LEASE: &str = "shoal-leader";
/// What a Lease without `leaseDurationSeconds` is taken to mean (the Kubernetes default).
const DEFAULT_LEASE_SECS: i32 = 15;
/// The leader deletes a member Lease unchanged for this many lease durations.
const DEAD_MEMBER_LEASES: u32 = 4;
/// The lease loop gives up when the Lease API (or the member Lease) has failed for this
/// many lease durations, plus up to [`UNREACHABLE_JITTER`] of that again.
const UNREACHABLE_LEASES: u32 = 4;
/// The random part of the exit bound, drawn once per process, so that replicas cut off
/// together do not all exit (and restart, and relist) at the same instant.
const UNREACHABLE_JITTER: f64 = 0.5;

/// How long the Lease API may stay unreachable before the lease loop gives up:
/// [`UNREACHABLE_LEASES`] lease durations, stretched by `draw` (in 0..1) times
/// [`UNREACHABLE_JITTER`].
pub(super) fn unreachable_limit(lease: Duration, draw: f64) -> Duration {
    (lease * UNREACHABLE_LEASES).mul_f64(1.0 + UNREACHABLE_JITTER * draw.clamp(0.0, 1.0))
}

/// A number in 0..1, different at every call (and in every process).
pub(super) fn random_draw() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why the lease loop stopped: the process must exit rather than act without fencing.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "identity {identity:?}: member Lease {lease} is held by {holder:?}, which kept renewing it for {waited:?}; \
         another process is running with this identity (or one that maps to the same Lease name). \
         Give every replica a unique --identity"
    )]
    IdentityInUse { identity: String, lease: String, holder: String, waited: Duration },
    #[error("member Lease {lease} was taken over by {holder:?} while this process was not renewing it; exiting")]
    MemberTaken { lease: String, holder: String },
    #[error(
        "a replica of an earlier shoal version is running ({holder:?}, member Lease {lease}): it renews its shard Leases \
         and would take this version's, which are written only when they change hands, so the two cannot run together. \
         Stop every replica, then start the new version"
    )]
    OlderVersion { holder: String, lease: String },
    #[error("{what} failed for {waited:?}: {last}")]
    Unreachable { what: &'static str, waited: Duration, last: String },
}

/// Lease names must be DNS subdomains; identities (pod or host names) nearly always are.
fn member_lease_name(identity: &str) -> String {
    let clean: String = identity.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).collect();
    format!("shoal-member-{}", clean.trim_matches('-'))
}

pub fn shard_lease_name(shard: u32) -> String {
    format!("shoal-shard-{shard}")
}

/// The member Lease of the process whose holder string is `holder` (`<identity>_<instance>`).
pub(super) fn member_of(holder: &str) -> String {
    member_lease_name(holder.rsplit_once('_').map_or(holder, |(identity, _)| identity))
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

fn transitions(lease: &Lease) -> i32 {
    lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0)
}

fn role(lease: &Lease) -> Option<&str> {
    lease.metadata.labels.as_ref()?.get(ROLE).map(String::as_str)
}

/// A member Lease written by a replica of an earlier version, which renews its shard Leases.
fn is_older(lease: &Lease) -> bool {
    role(lease) == Some("member") && lease.metadata.labels.as_ref().and_then(|l| l.get(PROTOCOL)).map(String::as_str) != Some(PROTOCOL_VERSION)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A local monotonic instant and the wall time, read together immediately before a Lease
/// write is sent: the write carries `wall` as its renewTime, and the fence it confirms
/// counts from `at`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    pub at: Instant,
    pub wall: Timestamp,
}

/// The clock Lease writes are stamped with; `offset` shifts the wall clock (tests only).
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset: SignedDuration,
}

impl Clock {
    fn stamp(&self) -> Stamp {
        Stamp { at: Instant::now(), wall: Timestamp::now() + self.offset }
    }
}

/// The parts of a Lease a holder's write changes: any change counts as a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    holder: Option<String>,
    renew: Option<Timestamp>,
    acquire: Option<Timestamp>,
    transitions: i32,
    lease_secs: i32,
}

impl Record {
    /// What a Lease that is not there reads as: it counts as unchanged from the moment this
    /// replica first noticed it missing. (No real Lease has a negative transition count.)
    pub fn absent(lease_secs: i32) -> Self {
        Self { holder: None, renew: None, acquire: None, transitions: -1, lease_secs }
    }

    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: holder(lease).map(String::from),
            renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            acquire: spec.and_then(|s| s.acquire_time.as_ref()).map(|t| t.0),
            transitions: transitions(lease),
            lease_secs: spec.and_then(|s| s.lease_duration_seconds).unwrap_or(DEFAULT_LEASE_SECS),
        }
    }
}

/// What this replica has seen of each Lease: the last record, and the local instant it first
/// saw that record. Pure: every instant comes in as an argument.
#[derive(Debug, Default)]
pub(super) struct Observations {
    seen: HashMap<String, (Record, Instant)>,
}

impl Observations {
    /// Note that Lease `name` reads `record` at `now`. A record not seen before (a Lease seen
    /// for the first time, or a changed one) counts as renewed at `now`.
    pub fn observe(&mut self, name: &str, record: Record, now: Instant) {
        if self.seen.get(name).is_none_or(|(r, _)| *r != record) {
            self.seen.insert(name.to_string(), (record, now));
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }

    /// Forget every Lease `keep` does not keep.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.seen.retain(|n, _| keep(n));
    }

    /// When Lease `name` will have stayed unchanged for `times` lease durations, if it does
    /// not change. `None` if it was never seen.
    pub fn expires_at(&self, name: &str, times: u32) -> Option<Instant> {
        let (record, since) = self.seen.get(name)?;
        let secs = u64::try_from(record.lease_secs).unwrap_or(0);
        Some(*since + Duration::from_secs(secs) * times)
    }

    /// Has Lease `name` stayed unchanged for `times` lease durations by `now`? A Lease never
    /// seen has not.
    pub fn expired(&self, name: &str, now: Instant, times: u32) -> bool {
        self.expires_at(name, times).is_some_and(|t| now >= t)
    }
}

/// The live members by holder string: member Leases that changed within their lease
/// duration, as observed here. This replica always counts itself.
pub(super) fn live_members(leases: &HashMap<String, Lease>, seen: &Observations, now: Instant, me: &str) -> Vec<String> {
    let mut members: BTreeSet<String> = BTreeSet::from([me.to_string()]);
    for (name, l) in leases {
        if role(l) == Some("member")
            && !seen.expired(name, now, 1)
            && let Some(h) = holder(l)
        {
            members.insert(h.to_string());
        }
    }
    members.into_iter().collect()
}

fn lease_meta(name: &str, role: &str) -> ObjectMeta {
    let labels = [("app.kubernetes.io/managed-by", "shoal"), (ROLE, role), (PROTOCOL, PROTOCOL_VERSION)].map(|(k, v)| (k.to_string(), v.to_string()));
    ObjectMeta { name: Some(name.to_string()), labels: Some(labels.into()), ..Default::default() }
}

/// `lease` renewed by its holder at `stamp`.
pub(super) fn renewed(mut lease: Lease, lease_secs: i32, stamp: Stamp) -> Lease {
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.renew_time = Some(MicroTime(stamp.wall));
    spec.lease_duration_seconds = Some(lease_secs);
    lease
}

/// `lease` (or, if there is none, a new Lease `name` with `role`) taken by `holder` at
/// `stamp`. A new holder is a new fencing epoch, so the transition count goes up; returns it.
pub(super) fn taken(lease: Option<Lease>, name: &str, role: &str, holder: &str, lease_secs: i32, stamp: Stamp) -> (Lease, i32) {
    let mut lease = lease.unwrap_or_else(|| Lease { metadata: lease_meta(name, role), spec: None });
    lease.metadata.labels.get_or_insert_default().extend(lease_meta(name, role).labels.unwrap_or_default());
    let spec = lease.spec.get_or_insert_with(Default::default);
    let transitions = spec.lease_transitions.unwrap_or(0) + 1;
    spec.holder_identity = Some(holder.to_string());
    spec.lease_duration_seconds = Some(lease_secs);
    spec.acquire_time = Some(MicroTime(stamp.wall));
    spec.renew_time = Some(MicroTime(stamp.wall));
    spec.lease_transitions = Some(transitions);
    (lease, transitions)
}

/// `lease` freed for the next holder, who need not wait for it to expire. On a member Lease:
/// the membership is over (see [`Verdict::Bury`]).
pub(super) fn cleared(mut lease: Lease) -> Lease {
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
    }
    lease
}

/// Why this replica may take its member Lease now; `None` while someone (a previous life of
/// this replica included) holds it and it has not expired.
pub(super) fn may_take(lease: Option<&Lease>, expired: bool) -> Option<&'static str> {
    match lease {
        None => Some("new"),
        Some(l) if holder(l).is_none() => Some("free"),
        Some(_) if expired => Some("expired"),
        Some(_) => None,
    }
}

/// What this replica may do about a shard or leader Lease it wants and does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Take it now (with a resourceVersion precondition, the transition count + 1); the
    /// reason: `new`, `free` or `expired`.
    Take(&'static str),
    /// Its holder's member Lease has not changed for a lease duration: first end that
    /// membership by clearing the member Lease's holder on the version seen here, then take
    /// this one (as `expired`) only if that write went through. A renewal that races with it
    /// either lands first, and the clearing fails, or is refused.
    Bury { member: String, version: Option<String> },
    /// Its holder is alive, or the Lease itself changed within a lease duration.
    Leave,
}

/// What may be done about Lease `name` (a shard or leader Lease) by holder `me`, which does
/// not hold it, given every Lease listed and what this replica has seen of them.
///
/// Such a Lease stays its holder's while the holder's member Lease is renewed. It may be
/// taken when it does not exist or names no holder; at once when it names `me` (left by
/// this very process, which is not acting under it: a release whose write failed, an
/// acquisition whose answer was lost, or a membership it lost); otherwise only once the
/// Lease itself has not changed for a lease duration and the holder's member Lease names
/// another process or none, or has been missing for a lease duration, or has not changed
/// for a lease duration (then [`Verdict::Bury`]).
pub(super) fn verdict(name: &str, leases: &HashMap<String, Lease>, seen: &Observations, now: Instant, me: &str) -> Verdict {
    let Some(lease) = leases.get(name) else { return Verdict::Take("new") };
    let Some(h) = holder(lease) else { return Verdict::Take("free") };
    if h == me {
        return Verdict::Take("free");
    }
    if !seen.expired(name, now, 1) {
        return Verdict::Leave;
    }
    let member = member_of(h);
    match leases.get(&member) {
        // Deleted: by the leader, long after the member went silent; by its holder, after
        // releasing; or by hand, so wait a lease duration as if it had gone silent.
        None if seen.expired(&member, now, 1) => Verdict::Take("expired"),
        None => Verdict::Leave,
        Some(m) if holder(m) != Some(h) => Verdict::Take("expired"),
        Some(m) if seen.expired(&member, now, 1) => Verdict::Bury { member, version: m.metadata.resource_version.clone() },
        Some(_) => Verdict::Leave,
    }
}

/// A member Lease of another process written by an earlier version, alive as seen here:
/// `(Lease name, holder)`.
pub(super) fn older_replica(leases: &HashMap<String, Lease>, seen: &Observations, now: Instant, me: &str) -> Option<(String, String)> {
    leases.iter().filter(|(n, l)| is_older(l) && !seen.expired(n, now, 1)).find_map(|(n, l)| holder(l).filter(|h| *h != me).map(|h| (n.clone(), h.to_string())))
}

/// A draining shard is handed over once its in-flight work has ended or its fence has
/// expired; never while work runs under a live fence.
pub(super) fn may_hand_over(in_flight: usize, fence_deadline: Instant, now: Instant) -> bool {
    in_flight == 0 || now >= fence_deadline
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[derive(Clone)]
struct Loop {
    api: Api<Lease>,
    own: Ownership,
    member: String,
    lease_secs: i32,
    clock: Clock,
    seen: Arc<Mutex<Observations>>,
    /// Shards being drained and released in the background.
    releasing: Arc<Mutex<HashMap<u32, JoinHandle<()>>>>,
    /// How long the Lease API may stay unreachable before the loop gives up (jittered).
    unreachable_limit: Duration,
    /// When the last list of the Leases was answered.
    last_list: Arc<Mutex<Instant>>,
    /// The stamp of the last confirmed write of this membership's member Lease; the fence
    /// counts from it once a list of the Leases made after it has been answered.
    member_written: Arc<Mutex<Option<Instant>>>,
}

/// What one tick learned.
struct Tick {
    /// The member Lease is this replica's and was renewed recently enough.
    member_renewed: bool,
    /// The next instant a Lease seen here expires, if nothing changes.
    next_expiry: Option<Instant>,
}

/// How renewing the member Lease went.
enum Renewal {
    /// Written, and confirmed.
    Written,
    /// Not written: the last write is younger than half a retry period (an early tick).
    Fresh,
    /// The write failed (logged).
    Failed,
}

/// Run the lease loop until `shutdown`; then drain, release every Lease and return.
///
/// First it takes this identity's member Lease; if another process keeps it renewed for two
/// lease durations, it returns [`LeaseError::IdentityInUse`]. It also returns an error if
/// the Lease API stays unreachable for several lease durations, or if a replica of an
/// earlier version runs: the caller must then exit rather than go on without fencing.
pub async fn run(client: Client, own: Ownership, shutdown: CancellationToken) -> Result<()> {
    let cfg = own.config().clone();
    let api: Api<Lease> = Api::namespaced(client, &own.inner.namespace);
    let lp = Loop {
        api: api.clone(),
        member: member_lease_name(own.identity()),
        lease_secs: i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX),
        clock: Clock { offset: SignedDuration::from_secs(cfg.test_clock_offset) },
        seen: Arc::default(),
        releasing: Arc::default(),
        unreachable_limit: unreachable_limit(cfg.lease_duration, random_draw()),
        last_list: Arc::new(Mutex::new(Instant::now())),
        member_written: Arc::default(),
        own,
    };
    tracing::info!(limit = ?lp.unreachable_limit, "the process exits if the Lease API stays unreachable this long");
    let notify = Arc::new(Notify::new());
    let watch_task = tokio::spawn(watch_leases(api, notify.clone(), lp.seen.clone()));
    let result = lp.run(&notify, &shutdown).await;
    watch_task.abort();
    let hand_over = match &result {
        Ok(()) => true,
        // Hand everything to the older replica at once rather than make it wait.
        Err(e) => matches!(e.downcast_ref::<LeaseError>(), Some(LeaseError::OlderVersion { .. })),
    };
    if hand_over {
        lp.release_all().await;
    }
    result
}

/// Record every Lease change as it is seen, and wake the loop early when membership changes
/// or a shard or leader Lease is freed, so handover does not wait for the next retry period.
/// Errors back off (0.8 s doubling to 15 s, jittered) until the watch makes progress again.
async fn watch_leases(api: Api<Lease>, notify: Arc<Notify>, seen: Arc<Mutex<Observations>>) {
    let mut members: HashMap<String, Option<String>> = HashMap::new();
    let mut stream = with_backoff(watcher(api, watcher::Config::default().labels(MANAGED)), &API_BACK).boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::debug!(error = %e, "Lease watch failed; backing off");
                continue;
            }
        };
        match ev {
            watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
                let name = l.metadata.name.clone().unwrap_or_default();
                lock(&seen).observe(&name, Record::of(&l), Instant::now());
                match role(&l) {
                    Some("member") => {
                        let h = holder(&l).map(String::from);
                        if members.insert(name, h.clone()) != Some(h) {
                            notify.notify_one();
                        }
                    }
                    Some("shard") | Some("leader") if holder(&l).is_none() => notify.notify_one(),
                    _ => {}
                }
            }
            watcher::Event::Delete(l) => {
                let name = l.metadata.name.as_deref().unwrap_or_default();
                lock(&seen).forget(name);
                members.remove(name);
                notify.notify_one();
            }
            _ => {}
        }
    }
}

impl Loop {
    fn me(&self) -> &str {
        self.own.holder()
    }

    /// Count a Lease write request (whatever its answer).
    fn wrote(&self, role: &str, verb: &str) {
        self.own.metrics().lease_writes.get_or_create(&super::LeaseWriteLabels { role: role.into(), verb: verb.into() }).inc();
    }

    async fn run(&self, notify: &Notify, shutdown: &CancellationToken) -> Result<()> {
        tokio::select! {
            r = self.join() => r?,
            _ = shutdown.cancelled() => return Ok(()),
        }
        *lock(&self.last_list) = Instant::now();
        let cfg = self.own.config().clone();
        let limit = self.unreachable_limit;
        let (mut api_ok, mut member_ok) = (Instant::now(), Instant::now());
        while !shutdown.is_cancelled() {
            let mut wake = Instant::now() + cfg.retry_period;
            match self.tick().await {
                Ok(t) => {
                    // In the ring, and this tick took the shards it could: ready once their
                    // caches have synced.
                    self.own.set_registered(true);
                    api_ok = Instant::now();
                    if t.member_renewed {
                        member_ok = api_ok;
                    } else if member_ok.elapsed() > limit {
                        let waited = member_ok.elapsed();
                        return Err(LeaseError::Unreachable { what: "renewing the member Lease", waited, last: String::new() }.into());
                    }
                    if let Some(next) = t.next_expiry {
                        wake = wake.min(next + Duration::from_millis(10));
                    }
                }
                Err(e) if e.is::<LeaseError>() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "lease loop tick failed");
                    if api_ok.elapsed() > limit {
                        return Err(LeaseError::Unreachable { what: "the Lease API", waited: api_ok.elapsed(), last: e.to_string() }.into());
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {},
                _ = notify.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
                _ = shutdown.cancelled() => {},
            }
        }
        Ok(())
    }

    /// Take this identity's member Lease before doing anything else. A member Lease left by
    /// a previous life (another holder) is taken once it has expired as observed here; one
    /// that another process keeps renewing means that process runs with this identity. While
    /// a replica of an earlier version runs, wait (it would take this one's shards), and give
    /// up after two lease durations. Every Lease listed meanwhile is observed, so shard
    /// Leases left by a previous life have been seen unchanged for as long as its member.
    async fn join(&self) -> Result<()> {
        let cfg = self.own.config().clone();
        let started = Instant::now();
        loop {
            match self.api.list(&ListParams::default().labels(MANAGED)).await {
                Ok(list) => {
                    let now = Instant::now();
                    let by_name: HashMap<String, Lease> = list.items.into_iter().filter_map(|l| Some((l.metadata.name.clone()?, l))).collect();
                    let (expired, older) = {
                        let mut seen = lock(&self.seen);
                        for (name, l) in &by_name {
                            seen.observe(name, Record::of(l), now);
                        }
                        let others: HashMap<String, Lease> = by_name.iter().filter(|(n, _)| **n != self.member).map(|(n, l)| (n.clone(), l.clone())).collect();
                        (seen.expired(&self.member, now, 1), older_replica(&others, &seen, now, self.me()))
                    };
                    let current = by_name.get(&self.member).cloned();
                    let waited = started.elapsed() >= cfg.lease_duration * 2;
                    if may_take(current.as_ref(), expired).is_none() {
                        let other = current.as_ref().and_then(holder).unwrap_or_default().to_string();
                        if waited {
                            let (identity, lease) = (self.own.identity().to_string(), self.member.clone());
                            return Err(LeaseError::IdentityInUse { identity, lease, holder: other, waited: started.elapsed() }.into());
                        }
                        tracing::warn!(lease = %self.member, holder = %other, "member Lease held by another process; waiting for it to expire or be released");
                    } else if let Some((lease, holder)) = older {
                        if waited {
                            return Err(LeaseError::OlderVersion { holder, lease }.into());
                        }
                        tracing::warn!(%lease, %holder, "a replica of an earlier version is running; waiting for it to stop");
                    } else {
                        match self.write_member(current).await {
                            Ok(stamp) => {
                                *lock(&self.member_written) = Some(stamp.at);
                                return Ok(());
                            }
                            Err(e) if is_conflict(&e) => continue,
                            Err(e) => tracing::warn!(error = %e, lease = %self.member, "taking the member Lease failed"),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing the Leases failed");
                    if started.elapsed() > self.unreachable_limit {
                        return Err(LeaseError::Unreachable { what: "the Lease API", waited: started.elapsed(), last: e.to_string() }.into());
                    }
                }
            }
            tokio::time::sleep(cfg.retry_period).await;
        }
    }

    /// Renew the member Lease if it is ours, take it if it is free or missing.
    async fn write_member(&self, current: Option<Lease>) -> kube::Result<Stamp> {
        let pp = PostParams::default();
        let stamp = self.clock.stamp();
        let result = match current {
            Some(l) if holder(&l) == Some(self.me()) => {
                self.wrote("member", "update");
                self.api.replace(&self.member, &pp, &renewed(l, self.lease_secs, stamp)).await
            }
            Some(l) => {
                self.wrote("member", "update");
                self.api.replace(&self.member, &pp, &taken(Some(l), &self.member, "member", self.me(), self.lease_secs, stamp).0).await
            }
            None => {
                self.wrote("member", "create");
                self.api.create(&pp, &taken(None, &self.member, "member", self.me(), self.lease_secs, stamp).0).await
            }
        };
        result.map(|_| stamp)
    }

    /// Renew the member Lease: the one write an idle replica makes. A failure is logged and
    /// the tick goes on. A member Lease that no longer names this process ends its
    /// membership: it stops acting on every shard and as leader at once (another replica saw
    /// it silent for a lease duration and may be taking them). If it names no one (cleared
    /// by that replica) or is gone, this process takes it again and starts over; its shards
    /// come back under new epochs. If another process holds it, the loop stops.
    async fn renew_member(&self) -> Result<Renewal> {
        let last = *lock(&self.member_written);
        if last.is_some_and(|t| t.elapsed() < self.own.config().retry_period / 2) {
            return Ok(Renewal::Fresh);
        }
        let current = match self.api.get_opt(&self.member).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the member Lease failed");
                return Ok(Renewal::Failed);
            }
        };
        match current.as_ref().and_then(holder) {
            Some(h) if h == self.me() => {}
            Some(h) => {
                self.end_membership();
                return Err(LeaseError::MemberTaken { lease: self.member.clone(), holder: h.to_string() }.into());
            }
            None => {
                if last.is_some() {
                    tracing::warn!(lease = %self.member, "the member Lease was cleared or deleted: this replica was seen silent for a lease duration; it stops acting on everything and joins again");
                }
                self.end_membership();
            }
        }
        match self.write_member(current).await {
            Ok(stamp) => {
                *lock(&self.member_written) = Some(stamp.at);
                Ok(Renewal::Written)
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the member Lease failed");
                Ok(Renewal::Failed)
            }
        }
    }

    /// The membership is over: no fence, no shard, no leadership.
    fn end_membership(&self) {
        *lock(&self.member_written) = None;
        *lock(&self.own.inner.member_renewed) = None;
        self.own.step_down();
        for s in self.own.held_shards() {
            self.lose(s, "renew_deadline");
        }
    }

    async fn tick(&self) -> Result<Tick> {
        let cfg = self.own.config().clone();
        let me = self.me().to_string();
        let renewal = self.renew_member().await?;
        let list = self.api.list(&ListParams::default().labels(MANAGED)).await?;
        let now = Instant::now();
        // No list answered for longer than the renew deadline (the API server was away or
        // hung): that nothing changed meanwhile says nothing about the holders, who most
        // likely could not reach it either.
        let blind = now.duration_since(std::mem::replace(&mut *lock(&self.last_list), now)) > cfg.renew_deadline;
        let by_name: HashMap<String, Lease> = list.items.into_iter().filter_map(|l| Some((l.metadata.name.clone()?, l))).collect();
        // The member Leases that shard and leader Leases name: one that is missing counts as
        // unchanged from when it was first seen missing.
        let named: HashSet<String> = by_name.values().filter(|l| matches!(role(l), Some("shard") | Some("leader"))).filter_map(holder).map(member_of).collect();
        let (members, older) = {
            let mut seen = lock(&self.seen);
            if blind {
                // Every Lease counts as renewed now, as for a replica that just started: a
                // holder gets a whole lease duration to renew before anyone takes its shards,
                // instead of all of them changing hands the moment the API server is back.
                tracing::info!("the Lease API is back after more than the renew deadline; every Lease counts as renewed now");
                seen.retain(|_| false);
                API_BACK.notify_waiters();
            }
            seen.retain(|n| by_name.contains_key(n) || named.contains(n));
            for (name, l) in &by_name {
                seen.observe(name, Record::of(l), now);
            }
            for name in named.iter().filter(|n| !by_name.contains_key(*n)) {
                seen.observe(name, Record::absent(self.lease_secs), now);
            }
            (live_members(&by_name, &seen, now, &me), older_replica(&by_name, &seen, now, &me))
        };
        if let Some((lease, holder)) = older {
            return Err(LeaseError::OlderVersion { holder, lease }.into());
        }
        // Only now, with a list made after it was sent showing no replica of an earlier
        // version, does a renewal extend the fence.
        if let Some(at) = *lock(&self.member_written) {
            let mut renewed = lock(&self.own.inner.member_renewed);
            *renewed = Some(renewed.map_or(at, |r| r.max(at)));
        }
        self.own.metrics().members.set(members.len() as i64);
        let desired: HashSet<u32> = crate::core::shard::preferred_shards(cfg.shards, &members, &me).into_iter().collect();
        // Take nothing without a fence to act under.
        let fenced = self.own.member_fence_end().is_some_and(|t| Instant::now() < t);

        let mut takes: Vec<(u32, Option<Lease>, &'static str)> = Vec::new();
        // (shard, or None for the leader Lease; the Lease; its holder's member Lease)
        let mut after_burial: Vec<(Option<u32>, Option<Lease>, String)> = Vec::new();
        let mut graves: HashMap<String, Lease> = HashMap::new();
        let mut orphans = Vec::new();
        let verdict_of = |name: &str| verdict(name, &by_name, &lock(&self.seen), now, &me);
        for s in 0..cfg.shards {
            let name = shard_lease_name(s);
            let lease = by_name.get(&name);
            let draining = lock(&self.own.inner.held).get(&s).map(|h| h.draining.is_some());
            match draining {
                Some(true) => {}
                Some(false) if lease.and_then(holder) != Some(me.as_str()) => self.lose(s, "taken"),
                Some(false) if desired.contains(&s) => {}
                Some(false) => self.start_release(s, "rebalance"),
                None if desired.contains(&s) => match verdict_of(&name) {
                    _ if !fenced => {}
                    Verdict::Take(reason) => takes.push((s, lease.cloned(), reason)),
                    Verdict::Bury { member, .. } => {
                        graves.extend(by_name.get(&member).map(|m| (member.clone(), m.clone())));
                        after_burial.push((Some(s), lease.cloned(), member));
                    }
                    Verdict::Leave => {}
                },
                // Left by this process and not wanted: free it, or nobody could take it while
                // this replica lives.
                None if lease.and_then(holder) == Some(me.as_str()) => orphans.extend(lease.cloned().map(|l| (s, l))),
                None => {}
            }
        }
        let mut leader_take = None;
        let leading = self.own.inner.leader_epoch.load(Ordering::SeqCst);
        let leader = by_name.get(LEADER_LEASE);
        if leading >= 0 {
            if leader.is_none_or(|l| holder(l) != Some(me.as_str()) || i64::from(transitions(l)) != leading) {
                tracing::warn!("the leader Lease changed hands; stepping down");
                self.own.step_down();
            }
        } else if fenced {
            match verdict_of(LEADER_LEASE) {
                Verdict::Take(_) => leader_take = Some(leader.cloned()),
                Verdict::Bury { member, .. } => {
                    graves.extend(by_name.get(&member).map(|m| (member.clone(), m.clone())));
                    after_burial.push((None, leader.cloned(), member));
                }
                Verdict::Leave => {}
            }
        }

        // One write per silent member, however many of its Leases are wanted.
        let buried: HashSet<String> = futures::future::join_all(graves.into_iter().map(|(m, l)| async move { self.bury(&m, l).await.then_some(m) })).await.into_iter().flatten().collect();
        for (shard, lease, _) in after_burial.into_iter().filter(|(_, _, m)| buried.contains(m)) {
            match shard {
                Some(s) => takes.push((s, lease, "expired")),
                None => leader_take = Some(lease),
            }
        }
        let acquisitions = futures::future::join_all(takes.into_iter().map(|(s, l, reason)| self.acquire(s, l, reason)));
        let frees = futures::future::join_all(orphans.into_iter().map(|(s, l)| self.free_orphan(s, l)));
        let leader_write = async {
            if let Some(lease) = leader_take {
                self.take_leader(lease).await;
            }
        };
        futures::future::join3(acquisitions, frees, leader_write).await;
        let label = super::NameLabel { name: LEADER_LEASE.into() };
        self.own.metrics().leader.get_or_create(&label).set(i64::from(self.own.leader_fence().is_some()));

        if self.own.leader_fence().is_some() {
            self.collect_dead_members(&by_name, now).await;
        }
        self.own.metrics().shards_owned.set(lock(&self.own.inner.held).len() as i64);
        // When the next Lease that could change hands expires: one held by someone else, or a
        // missing member Lease that a shard or leader Lease names. (Every tick may renew the
        // member Lease, so this replica's own Leases must not wake it.)
        let next_expiry = {
            let (seen, now) = (lock(&self.seen), Instant::now());
            let others = by_name.iter().filter(|(_, l)| holder(l).is_some_and(|h| h != me)).map(|(n, _)| n);
            others.chain(named.iter().filter(|n| !by_name.contains_key(*n))).filter_map(|n| seen.expires_at(n, 1)).filter(|t| *t > now).min()
        };
        let member_renewed = match renewal {
            Renewal::Written | Renewal::Fresh => true,
            Renewal::Failed => false,
        };
        Ok(Tick { member_renewed, next_expiry })
    }

    /// End the membership of a holder whose member Lease has not changed for a lease
    /// duration, by clearing its holder on the version seen; true if that went through. The
    /// holder stopped acting the renew deadline after its last renewal, and any renewal it
    /// sends after this is refused.
    async fn bury(&self, member: &str, seen: Lease) -> bool {
        self.wrote("member", "update");
        match self.api.replace(member, &PostParams::default(), &cleared(seen)).await {
            Ok(_) => {
                tracing::info!(lease = %member, "ended the membership of a replica seen silent for a lease duration");
                true
            }
            Err(e) => {
                tracing::debug!(lease = %member, error = %e, "ending a silent replica's membership failed");
                false
            }
        }
    }

    /// Take shard `s`.
    async fn acquire(&self, s: u32, lease: Option<Lease>, reason: &'static str) {
        let name = shard_lease_name(s);
        let exists = lease.is_some();
        let stamp = self.clock.stamp();
        let (l, transitions) = taken(lease, &name, "shard", self.me(), self.lease_secs, stamp);
        self.wrote("shard", if exists { "update" } else { "create" });
        let result = if exists { self.api.replace(&name, &PostParams::default(), &l).await } else { self.api.create(&PostParams::default(), &l).await };
        match result {
            Ok(_) => {
                lock(&self.own.inner.held).insert(s, Hold::new(transitions, stamp.at));
                self.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
                tracing::info!(shard = s, transitions, reason, "acquired shard");
                let _ = self.own.inner.events.send(ShardEvent::Acquired(s));
            }
            Err(e) if is_conflict(&e) => {}
            Err(e) => tracing::debug!(shard = s, error = %e, "acquire failed"),
        }
    }

    /// Free shard `s`, which names this process but which it does not hold or want (it is not
    /// acting under it), on the version listed.
    async fn free_orphan(&self, s: u32, lease: Lease) {
        self.wrote("shard", "update");
        match self.api.replace(&shard_lease_name(s), &PostParams::default(), &cleared(lease)).await {
            Ok(_) => tracing::info!(shard = s, "freed a shard Lease this replica had left"),
            Err(e) => tracing::debug!(shard = s, error = %e, "freeing a shard Lease failed; again next tick"),
        }
    }

    /// Stop new work on `s` at once and release it in the background (once per shard).
    fn start_release(&self, s: u32, reason: &'static str) {
        let mut releasing = lock(&self.releasing);
        if releasing.contains_key(&s) {
            return;
        }
        let fence_end = self.own.member_fence_end().unwrap_or_else(Instant::now);
        let epoch = lock(&self.own.inner.held).get_mut(&s).map(|h| {
            h.draining = Some(fence_end);
            h.transitions
        });
        let Some(epoch) = epoch else { return };
        let _ = self.own.inner.events.send(ShardEvent::Released(s));
        let lp = self.clone();
        releasing.insert(
            s,
            tokio::spawn(async move {
                lp.release(s, epoch, reason).await;
                lock(&lp.releasing).remove(&s);
            }),
        );
    }

    /// Wait until the shard's in-flight work has ended or the fence it was sent under has
    /// expired, then free its Lease (if it is still ours, same epoch) so the next owner need
    /// not wait.
    async fn release(&self, s: u32, epoch: i32, reason: &str) {
        loop {
            let Some(fence_end) = lock(&self.own.inner.held).get(&s).map(|h| h.draining.unwrap_or_else(Instant::now)) else {
                return;
            };
            if may_hand_over(self.own.in_flight(s), fence_end, Instant::now()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let name = shard_lease_name(s);
        match self.api.get_opt(&name).await {
            Ok(Some(l)) if holder(&l) == Some(self.me()) && transitions(&l) == epoch => {
                self.wrote("shard", "update");
                if let Err(e) = self.api.replace(&name, &PostParams::default(), &cleared(l)).await {
                    tracing::debug!(shard = s, error = %e, "release write failed; freed again next tick");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(shard = s, error = %e, "release read failed; freed again next tick")
            }
        }
        lock(&self.own.inner.held).remove(&s);
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::info!(shard = s, reason, "released shard");
    }

    fn lose(&self, s: u32, reason: &str) {
        if lock(&self.own.inner.held).remove(&s).is_none() {
            return;
        }
        let _ = self.own.inner.events.send(ShardEvent::Released(s));
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::warn!(shard = s, reason, "lost shard");
    }

    /// Take the leader Lease (it is never renewed: it stays this replica's while its member
    /// Lease is).
    async fn take_leader(&self, lease: Option<Lease>) {
        let pp = PostParams::default();
        let exists = lease.is_some();
        let stamp = self.clock.stamp();
        let (l, t) = taken(lease, LEADER_LEASE, "leader", self.me(), self.lease_secs, stamp);
        self.wrote("leader", if exists { "update" } else { "create" });
        let result = if exists { self.api.replace(LEADER_LEASE, &pp, &l).await } else { self.api.create(&pp, &l).await };
        match result {
            Ok(_) => {
                self.own.inner.leader_epoch.store(i64::from(t), Ordering::SeqCst);
                tracing::info!(epoch = t, "became leader");
            }
            Err(e) => tracing::debug!(error = %e, "taking the leader Lease failed"),
        }
    }

    /// Delete member Leases unchanged for several lease durations (one of an earlier
    /// version's replicas after one), as observed here; the delete is conditional on the
    /// version seen, so a member that just renewed stays.
    async fn collect_dead_members(&self, by_name: &HashMap<String, Lease>, now: Instant) {
        let dead: Vec<(String, Option<String>)> = {
            let seen = lock(&self.seen);
            by_name
                .iter()
                .filter(|(n, l)| role(l) == Some("member") && holder(l) != Some(self.me()) && seen.expired(n, now, if is_older(l) { 1 } else { DEAD_MEMBER_LEASES }))
                .map(|(n, l)| (n.clone(), l.metadata.resource_version.clone()))
                .collect()
        };
        for (name, rv) in dead {
            let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: rv, uid: None }), ..Default::default() };
            self.wrote("member", "delete");
            if self.api.delete(&name, &dp).await.is_ok() {
                tracing::info!(lease = %name, "deleted a dead member's Lease");
            }
        }
    }

    /// Graceful shutdown: stop all work, drain, free every Lease and leave the ring.
    async fn release_all(&self) {
        for s in self.own.held_shards() {
            self.start_release(s, "shutdown");
        }
        let tasks: Vec<JoinHandle<()>> = lock(&self.releasing).drain().map(|(_, t)| t).collect();
        futures::future::join_all(tasks).await;
        self.own.step_down();
        if let Ok(Some(l)) = self.api.get_opt(LEADER_LEASE).await
            && holder(&l) == Some(self.me())
        {
            self.wrote("leader", "update");
            let _ = self.api.replace(LEADER_LEASE, &PostParams::default(), &cleared(l)).await;
        }
        if let Ok(Some(l)) = self.api.get_opt(&self.member).await
            && holder(&l) == Some(self.me())
        {
            let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: l.metadata.resource_version.clone(), uid: None }), ..Default::default() };
            self.wrote("member", "delete");
            let _ = self.api.delete(&self.member, &dp).await;
        }
        *lock(&self.own.inner.member_renewed) = None;
        self.own.metrics().shards_owned.set(0);
    }
}

#[cfg(test)]
mod tests;
