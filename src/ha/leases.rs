//! The lease loop: keeps this replica's member Lease fresh, computes the ring, acquires the
//! shard Leases it should hold, drains and releases (in the background) the ones it should
//! not, renews the leader Lease, and stops acting on anything whose renew deadline has
//! passed.
//!
//! Expiry is judged as client-go judges it, by observation on the local monotonic clock: a
//! Lease has expired when its record has not changed for its `leaseDurationSeconds` since
//! this replica first saw it so. The wall-clock times in a Lease are written for people and
//! other tools, and never compared with the local wall clock, so only the *rate* of the
//! replicas' clocks matters. A fence counts from the local instant read immediately before
//! the write that renewed it was sent, once that write is confirmed.

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

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

fn transitions(lease: &Lease) -> i32 {
    lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0)
}

fn role(lease: &Lease) -> Option<&str> {
    lease.metadata.labels.as_ref()?.get(ROLE).map(String::as_str)
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
    ObjectMeta { name: Some(name.to_string()), labels: Some([("app.kubernetes.io/managed-by".to_string(), "shoal".to_string()), (ROLE.to_string(), role.to_string())].into()), ..Default::default() }
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
    let spec = lease.spec.get_or_insert_with(Default::default);
    let transitions = spec.lease_transitions.unwrap_or(0) + 1;
    spec.holder_identity = Some(holder.to_string());
    spec.lease_duration_seconds = Some(lease_secs);
    spec.acquire_time = Some(MicroTime(stamp.wall));
    spec.renew_time = Some(MicroTime(stamp.wall));
    spec.lease_transitions = Some(transitions);
    (lease, transitions)
}

/// `lease` freed for the next holder, who need not wait for it to expire.
pub(super) fn cleared(mut lease: Lease) -> Lease {
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
    }
    lease
}

/// Why this replica may take a Lease now; `None` while someone (a previous life of this
/// replica included) holds it and it has not expired.
pub(super) fn may_take(lease: Option<&Lease>, expired: bool) -> Option<&'static str> {
    match lease {
        None => Some("new"),
        Some(l) if holder(l).is_none() => Some("free"),
        Some(_) if expired => Some("expired"),
        Some(_) => None,
    }
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
}

/// What one tick learned.
struct Tick {
    member_renewed: bool,
    /// The next instant a Lease held by someone else expires, if nothing changes.
    next_expiry: Option<Instant>,
}

/// Run the lease loop until `shutdown`; then drain, release every Lease and return.
///
/// First it takes this identity's member Lease; if another process keeps it renewed for two
/// lease durations, it returns [`LeaseError::IdentityInUse`]. It also returns an error if
/// the Lease API stays unreachable for several lease durations: the caller must then exit
/// rather than go on without fencing.
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
        own,
    };
    tracing::info!(limit = ?lp.unreachable_limit, "the process exits if the Lease API stays unreachable this long");
    let notify = Arc::new(Notify::new());
    let watch_task = tokio::spawn(watch_leases(api, notify.clone(), lp.seen.clone()));
    let result = lp.run(&notify, &shutdown).await;
    watch_task.abort();
    if result.is_ok() {
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
    /// that another process keeps renewing means that process runs with this identity.
    async fn join(&self) -> Result<()> {
        let cfg = self.own.config().clone();
        let started = Instant::now();
        loop {
            match self.api.get_opt(&self.member).await {
                Ok(current) => {
                    let now = Instant::now();
                    let expired = current.as_ref().is_some_and(|l| {
                        let mut seen = lock(&self.seen);
                        seen.observe(&self.member, Record::of(l), now);
                        seen.expired(&self.member, now, 1)
                    });
                    if may_take(current.as_ref(), expired).is_some() {
                        match self.write_member(current).await {
                            Ok(()) => return Ok(()),
                            Err(e) if is_conflict(&e) => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, lease = %self.member, "taking the member Lease failed")
                            }
                        }
                    } else {
                        let other = current.as_ref().and_then(holder).unwrap_or_default().to_string();
                        if started.elapsed() >= cfg.lease_duration * 2 {
                            let (identity, lease) = (self.own.identity().to_string(), self.member.clone());
                            return Err(LeaseError::IdentityInUse { identity, lease, holder: other, waited: started.elapsed() }.into());
                        }
                        tracing::warn!(lease = %self.member, holder = %other, "member Lease held by another process; waiting for it to expire or be released");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the member Lease failed");
                    if started.elapsed() > self.unreachable_limit {
                        return Err(LeaseError::Unreachable { what: "the Lease API", waited: started.elapsed(), last: e.to_string() }.into());
                    }
                }
            }
            tokio::time::sleep(cfg.retry_period).await;
        }
    }

    /// Renew the member Lease if it is ours, take it if there is none.
    async fn write_member(&self, current: Option<Lease>) -> kube::Result<()> {
        let pp = PostParams::default();
        let stamp = self.clock.stamp();
        match current {
            Some(l) if holder(&l) == Some(self.me()) => self.api.replace(&self.member, &pp, &renewed(l, self.lease_secs, stamp)).await.map(drop),
            Some(l) => self.api.replace(&self.member, &pp, &taken(Some(l), &self.member, "member", self.me(), self.lease_secs, stamp).0).await.map(drop),
            None => self.api.create(&pp, &taken(None, &self.member, "member", self.me(), self.lease_secs, stamp).0).await.map(drop),
        }
    }

    /// Renew the member Lease. A failure is logged and the tick goes on (shard renewals must
    /// not wait on it); only another holder on it stops the loop.
    async fn renew_member(&self) -> Result<bool> {
        let current = match self.api.get_opt(&self.member).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the member Lease failed; renewing the shards anyway");
                return Ok(false);
            }
        };
        if let Some(h) = current.as_ref().and_then(holder).filter(|h| *h != self.me()) {
            return Err(LeaseError::MemberTaken { lease: self.member.clone(), holder: h.to_string() }.into());
        }
        match self.write_member(current).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(error = %e, "renewing the member Lease failed; renewing the shards anyway");
                Ok(false)
            }
        }
    }

    async fn tick(&self) -> Result<Tick> {
        let cfg = self.own.config().clone();
        let me = self.me().to_string();
        let member_renewed = self.renew_member().await?;
        let list = self.api.list(&ListParams::default().labels(MANAGED)).await?;
        let now = Instant::now();
        // No list answered for longer than the renew deadline (the API server was away or
        // hung): that nothing changed meanwhile says nothing about the holders, who most
        // likely could not reach it either.
        let blind = now.duration_since(std::mem::replace(&mut *lock(&self.last_list), now)) > cfg.renew_deadline;
        let by_name: HashMap<String, Lease> = list.items.into_iter().filter_map(|l| Some((l.metadata.name.clone()?, l))).collect();
        let members = {
            let mut seen = lock(&self.seen);
            if blind {
                // Every Lease counts as renewed now, as for a replica that just started: a
                // holder gets a whole lease duration to renew before anyone takes its shards,
                // instead of all of them changing hands the moment the API server is back.
                tracing::info!("the Lease API is back after more than the renew deadline; every Lease counts as renewed now");
                seen.retain(|_| false);
                API_BACK.notify_waiters();
            }
            seen.retain(|n| by_name.contains_key(n));
            for (name, l) in &by_name {
                seen.observe(name, Record::of(l), now);
            }
            live_members(&by_name, &seen, now, &me)
        };
        self.own.metrics().members.set(members.len() as i64);
        let desired: HashSet<u32> = crate::core::shard::preferred_shards(cfg.shards, &members, &me).into_iter().collect();

        // Renewals, acquisitions and the leader go out concurrently, so no held shard's
        // renewal waits behind the others; releases drain in the background.
        let mut renewals = Vec::new();
        let mut acquisitions = Vec::new();
        for s in 0..cfg.shards {
            let name = shard_lease_name(s);
            let lease = by_name.get(&name);
            let draining = lock(&self.own.inner.held).get(&s).map(|h| h.draining);
            match draining {
                Some(true) => {}
                Some(false) if lease.is_some_and(|l| holder(l) != Some(me.as_str())) => self.lose(s, "taken"),
                Some(false) if desired.contains(&s) => renewals.extend(lease.map(|l| self.renew_shard(s, l.clone()))),
                Some(false) => self.start_release(s, "rebalance"),
                None if desired.contains(&s) => {
                    let expired = lock(&self.seen).expired(&name, now, 1);
                    if let Some(reason) = may_take(lease, expired) {
                        acquisitions.push(self.acquire(s, lease.cloned(), reason));
                    }
                }
                None => {}
            }
        }
        let leader = self.leader(by_name.get(LEADER_LEASE).cloned(), now);
        let (renewed, acquired, ()) = futures::future::join3(futures::future::join_all(renewals), futures::future::join_all(acquisitions), leader).await;
        let confirmed: HashSet<u32> = renewed.into_iter().chain(acquired).flatten().collect();

        // Fencing sweep: a shard not renewed within the deadline is no longer ours to act on.
        // Except one whose write this tick went through, only too slowly to keep the fence
        // (the API server hung while it was in flight): the Lease is still ours, under the
        // same epoch, and the next renewal restores the fence; dropping it would leave the
        // shard to nobody until it expired.
        let stale: Vec<u32> = lock(&self.own.inner.held).iter().filter(|(s, h)| !h.draining && h.renewed.elapsed() >= cfg.renew_deadline && !confirmed.contains(s)).map(|(s, _)| *s).collect();
        for s in stale {
            self.lose(s, "renew_deadline");
        }
        if self.own.leader_fence().is_some() {
            self.collect_dead_members(&by_name, now).await;
        }
        self.own.metrics().shards_owned.set(lock(&self.own.inner.held).len() as i64);
        let now = Instant::now();
        let next_expiry = {
            let seen = lock(&self.seen);
            by_name.iter().filter(|(_, l)| holder(l).is_some()).filter_map(|(n, _)| seen.expires_at(n, 1)).filter(|t| *t > now).min()
        };
        Ok(Tick { member_renewed, next_expiry })
    }

    /// Renew shard `s`; `Some(s)` if the write went through under the epoch still held.
    async fn renew_shard(&self, s: u32, lease: Lease) -> Option<u32> {
        let held = lock(&self.own.inner.held).get(&s).map(|h| (h.transitions, h.renewed.elapsed()));
        let (epoch, since) = held?;
        if since < self.own.config().retry_period / 2 {
            return None;
        }
        let stamp = self.clock.stamp();
        match self.api.replace(&shard_lease_name(s), &PostParams::default(), &renewed(lease, self.lease_secs, stamp)).await {
            Ok(_) => {
                let mut held = lock(&self.own.inner.held);
                let h = held.get_mut(&s).filter(|h| h.transitions == epoch && !h.draining)?;
                h.renewed = h.renewed.max(stamp.at);
                Some(s)
            }
            Err(e) => {
                tracing::debug!(shard = s, error = %e, "renew failed; retrying next tick");
                None
            }
        }
    }

    /// Take shard `s`; `Some(s)` if the write went through.
    async fn acquire(&self, s: u32, lease: Option<Lease>, reason: &'static str) -> Option<u32> {
        let name = shard_lease_name(s);
        let exists = lease.is_some();
        let stamp = self.clock.stamp();
        let (l, transitions) = taken(lease, &name, "shard", self.me(), self.lease_secs, stamp);
        let result = if exists { self.api.replace(&name, &PostParams::default(), &l).await } else { self.api.create(&PostParams::default(), &l).await };
        match result {
            Ok(_) => {
                let hold = Hold { transitions, renewed: stamp.at, acquired: stamp.at, draining: false, first_reconcile_seen: false };
                lock(&self.own.inner.held).insert(s, hold);
                self.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
                tracing::info!(shard = s, transitions, reason, "acquired shard");
                let _ = self.own.inner.events.send(ShardEvent::Acquired(s));
                Some(s)
            }
            Err(e) if is_conflict(&e) => None,
            Err(e) => {
                tracing::debug!(shard = s, error = %e, "acquire failed");
                None
            }
        }
    }

    /// Stop new work on `s` at once and release it in the background (once per shard).
    fn start_release(&self, s: u32, reason: &'static str) {
        let mut releasing = lock(&self.releasing);
        if releasing.contains_key(&s) {
            return;
        }
        let epoch = lock(&self.own.inner.held).get_mut(&s).map(|h| {
            h.draining = true;
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

    /// Wait until the shard's in-flight work has ended or its fence has expired, then free its
    /// Lease (if it is still ours, same epoch) so the next owner need not wait for expiry.
    async fn release(&self, s: u32, epoch: i32, reason: &str) {
        let renew_deadline = self.own.config().renew_deadline;
        loop {
            let Some(renewed) = lock(&self.own.inner.held).get(&s).map(|h| h.renewed) else {
                return;
            };
            if may_hand_over(self.own.in_flight(s), renewed + renew_deadline, Instant::now()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let name = shard_lease_name(s);
        match self.api.get_opt(&name).await {
            Ok(Some(l)) if holder(&l) == Some(self.me()) && transitions(&l) == epoch => {
                if let Err(e) = self.api.replace(&name, &PostParams::default(), &cleared(l)).await {
                    tracing::debug!(shard = s, error = %e, "release write failed; the Lease will expire");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(shard = s, error = %e, "release read failed; the Lease will expire")
            }
        }
        lock(&self.own.inner.held).remove(&s);
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::info!(shard = s, reason, "released shard");
    }

    fn lose(&self, s: u32, reason: &str) {
        lock(&self.own.inner.held).remove(&s);
        let _ = self.own.inner.events.send(ShardEvent::Released(s));
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::warn!(shard = s, reason, "lost shard");
    }

    async fn leader(&self, lease: Option<Lease>, now: Instant) {
        let me = self.me();
        let was_leader = lock(&self.own.inner.leader_renewed).is_some();
        let expired = lease.is_some() && lock(&self.seen).expired(LEADER_LEASE, now, 1);
        let pp = PostParams::default();
        let outcome = match lease {
            Some(l) if holder(&l) == Some(me) && was_leader => {
                let t = transitions(&l);
                let stamp = self.clock.stamp();
                self.api.replace(LEADER_LEASE, &pp, &renewed(l, self.lease_secs, stamp)).await.map(|_| Some((t, stamp)))
            }
            lease => match may_take(lease.as_ref(), expired) {
                None => Ok(None),
                Some(_) => {
                    let exists = lease.is_some();
                    let stamp = self.clock.stamp();
                    let (l, t) = taken(lease, LEADER_LEASE, "leader", me, self.lease_secs, stamp);
                    let r = if exists { self.api.replace(LEADER_LEASE, &pp, &l).await } else { self.api.create(&pp, &l).await };
                    r.map(|_| Some((t, stamp)))
                }
            },
        };
        match outcome {
            Ok(Some((t, stamp))) => {
                self.own.inner.leader_epoch.store(i64::from(t), Ordering::SeqCst);
                let mut renewed = lock(&self.own.inner.leader_renewed);
                *renewed = Some(renewed.map_or(stamp.at, |r| r.max(stamp.at)));
                if !was_leader {
                    tracing::info!(epoch = t, "became leader");
                }
            }
            Ok(None) => self.own.step_down(),
            Err(e) => tracing::debug!(error = %e, "leader lease write failed"),
        }
        let label = super::NameLabel { name: LEADER_LEASE.into() };
        self.own.metrics().leader.get_or_create(&label).set(i64::from(self.own.leader_fence().is_some()));
    }

    /// Delete member Leases unchanged for several lease durations, as observed here; the
    /// delete is conditional on the version seen, so a member that just renewed stays.
    async fn collect_dead_members(&self, by_name: &HashMap<String, Lease>, now: Instant) {
        let dead: Vec<(String, Option<String>)> = {
            let seen = lock(&self.seen);
            by_name
                .iter()
                .filter(|(n, l)| role(l) == Some("member") && holder(l) != Some(self.me()) && seen.expired(n, now, DEAD_MEMBER_LEASES))
                .map(|(n, l)| (n.clone(), l.metadata.resource_version.clone()))
                .collect()
        };
        for (name, rv) in dead {
            let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: rv, uid: None }), ..Default::default() };
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
            let _ = self.api.replace(LEADER_LEASE, &PostParams::default(), &cleared(l)).await;
        }
        if let Ok(Some(l)) = self.api.get_opt(&self.member).await
            && holder(&l) == Some(self.me())
        {
            let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: l.metadata.resource_version.clone(), uid: None }), ..Default::default() };
            let _ = self.api.delete(&self.member, &dp).await;
        }
        self.own.metrics().shards_owned.set(0);
    }
}

#[cfg(test)]
mod tests;
