//! The lease loop: keeps this replica's member Lease fresh, computes the ring, acquires the
//! shard Leases it should hold, drains and releases the ones it should not, renews the
//! leader Lease, and stops acting on anything whose renew deadline has passed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Hold, Ownership, ReasonLabel, ShardEvent};

const MANAGED: &str = "app.kubernetes.io/managed-by=shoal";
const ROLE: &str = "shoal.dev/lease-role";
const LEADER_LEASE: &str = "shoal-leader";

/// Lease names must be DNS subdomains; identities (pod or host names) nearly always are.
fn member_lease_name(identity: &str) -> String {
    let clean: String = identity.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).collect();
    format!("shoal-member-{}", clean.trim_matches('-'))
}

pub fn shard_lease_name(shard: u32) -> String {
    format!("shoal-shard-{shard}")
}

fn expired(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let Some(renew) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else { return true };
    let dur = spec.lease_duration_seconds.unwrap_or(15);
    renew.0 + SignedDuration::from_secs(i64::from(dur)) < now
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// Free a Lease for the next holder without waiting for it to expire.
fn clear_holder(lease: &mut Lease) {
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
    }
}

fn role(lease: &Lease) -> Option<&str> {
    lease.metadata.labels.as_ref()?.get(ROLE).map(String::as_str)
}

struct Loop {
    api: Api<Lease>,
    own: Ownership,
    member: String,
    lease_secs: i32,
}

/// Run the lease loop until `shutdown`; then drain, release every Lease and return.
/// Returns an error if the Lease API stays unreachable for several lease durations: the
/// caller must then exit rather than go on without fencing.
pub async fn run(client: Client, own: Ownership, shutdown: CancellationToken) -> Result<()> {
    let cfg = own.config().clone();
    let ns = own.config_namespace();
    let api: Api<Lease> = Api::namespaced(client, &ns);
    let lp = Loop { api: api.clone(), member: member_lease_name(own.identity()), lease_secs: cfg.lease_duration.as_secs().max(1) as i32, own };
    let notify = Arc::new(Notify::new());
    let watch_task = tokio::spawn(watch_leases(api, notify.clone()));
    let mut last_ok = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match lp.tick().await {
            Ok(()) => last_ok = Instant::now(),
            Err(e) => {
                tracing::warn!(error = %e, "lease loop tick failed");
                if last_ok.elapsed() > cfg.lease_duration * 4 {
                    watch_task.abort();
                    bail!("lease API unreachable for {:?}: {e}", last_ok.elapsed());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry_period) => {},
            _ = notify.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            _ = shutdown.cancelled() => {},
        }
    }
    watch_task.abort();
    lp.release_all().await;
    Ok(())
}

/// Wake the loop early when membership changes or a shard Lease is freed, so handover does
/// not wait for the next retry period. Plain renewals do not wake it.
async fn watch_leases(api: Api<Lease>, notify: Arc<Notify>) {
    let mut known_members: HashSet<String> = HashSet::new();
    let mut stream = watcher(api, watcher::Config::default().labels(MANAGED)).boxed();
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        match ev {
            watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
                let name = l.metadata.name.clone().unwrap_or_default();
                match role(&l) {
                    Some("member") => {
                        if known_members.insert(name) {
                            notify.notify_one();
                        }
                    }
                    Some("shard") | Some("leader") if holder(&l).is_none() => notify.notify_one(),
                    _ => {}
                }
            }
            watcher::Event::Delete(l) => {
                known_members.remove(l.metadata.name.as_deref().unwrap_or_default());
                notify.notify_one();
            }
            _ => {}
        }
    }
}

impl Ownership {
    fn config_namespace(&self) -> String {
        self.inner.namespace.clone()
    }
}

impl Loop {
    /// The wall clock, shifted by the test-only offset.
    fn now(&self) -> Timestamp {
        Timestamp::now() + SignedDuration::from_secs(self.own.config().test_clock_offset)
    }

    fn new_lease(&self, name: &str, role: &str, now: Timestamp, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([("app.kubernetes.io/managed-by".to_string(), "shoal".to_string()), (ROLE.to_string(), role.to_string())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.own.identity().to_string()),
                lease_duration_seconds: Some(self.lease_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Make `l` ours from `now`: a new holder is a new fencing epoch, so the transition
    /// count goes up. Returns that count.
    fn take_over(&self, l: &mut Lease, now: Timestamp) -> i32 {
        let spec = l.spec.get_or_insert_with(Default::default);
        let transitions = spec.lease_transitions.unwrap_or(0) + 1;
        spec.holder_identity = Some(self.own.identity().to_string());
        spec.lease_duration_seconds = Some(self.lease_secs);
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        spec.lease_transitions = Some(transitions);
        transitions
    }

    async fn tick(&self) -> Result<()> {
        let cfg = self.own.config().clone();
        let now = self.now();
        self.renew_member(now).await?;
        let list = self.api.list(&ListParams::default().labels(MANAGED)).await?;
        let mut by_name: HashMap<String, Lease> = HashMap::new();
        let mut members: BTreeSet<String> = BTreeSet::new();
        members.insert(self.own.identity().to_string());
        for l in list.items {
            if role(&l) == Some("member") && !expired(&l, now) {
                if let Some(h) = holder(&l) {
                    members.insert(h.to_string());
                }
            }
            if let Some(n) = l.metadata.name.clone() {
                by_name.insert(n, l);
            }
        }
        let members: Vec<String> = members.into_iter().collect();
        self.own.metrics().members.set(members.len() as i64);
        let desired: HashSet<u32> = crate::core::shard::preferred_shards(cfg.shards, &members, self.own.identity()).into_iter().collect();

        // Renewals and acquisitions go out concurrently, so a tick stays short under load
        // and no held shard's renewal waits behind the others.
        let mut renewals = Vec::new();
        let mut acquisitions = Vec::new();
        let mut releases = Vec::new();
        for s in 0..cfg.shards {
            let name = shard_lease_name(s);
            let lease = by_name.get(&name);
            let held = self.own.inner.held.lock().map(|h| h.contains_key(&s)).unwrap_or(false);
            if held {
                if lease.is_some_and(|l| holder(l) != Some(self.own.identity())) {
                    self.lose(s, "taken");
                } else if desired.contains(&s) {
                    if let Some(l) = lease {
                        renewals.push(self.renew_shard(s, l.clone()));
                    }
                } else {
                    releases.push(self.release(s, lease.cloned(), "rebalance"));
                }
            } else if desired.contains(&s) {
                acquisitions.push(self.try_acquire(s, name, lease.cloned(), now));
            }
        }
        futures::future::join_all(renewals).await;
        futures::future::join3(futures::future::join_all(acquisitions), futures::future::join_all(releases), async {}).await;
        // Fencing sweep: a shard not renewed within the deadline is no longer ours to act on.
        let stale: Vec<u32> = self.own.inner.held.lock().map(|h| h.iter().filter(|(_, h)| h.renewed.elapsed() >= cfg.renew_deadline).map(|(s, _)| *s).collect()).unwrap_or_default();
        for s in stale {
            self.lose(s, "renew_deadline");
        }
        self.leader(by_name.get(LEADER_LEASE).cloned(), now).await;
        if self.own.leader_fence().is_some() {
            self.collect_dead_members(&by_name, now).await;
        }
        let owned = self.own.inner.held.lock().map(|h| h.len()).unwrap_or(0);
        self.own.metrics().shards_owned.set(owned as i64);
        Ok(())
    }

    async fn renew_member(&self, now: Timestamp) -> Result<()> {
        match self.api.get_opt(&self.member).await? {
            None => {
                let l = self.new_lease(&self.member, "member", now, 0);
                match self.api.create(&PostParams::default(), &l).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(mut l) => {
                let spec = l.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(self.own.identity().to_string());
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.lease_secs);
                self.api.replace(&self.member, &PostParams::default(), &l).await?;
            }
        }
        Ok(())
    }

    async fn renew_shard(&self, s: u32, mut lease: Lease) {
        let due = self.own.inner.held.lock().map(|h| h.get(&s).is_some_and(|h| h.renewed.elapsed() >= self.own.config().retry_period / 2)).unwrap_or(false);
        if !due {
            return;
        }
        let sent = Instant::now();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(self.now()));
        }
        match self.api.replace(&shard_lease_name(s), &PostParams::default(), &lease).await {
            Ok(_) => {
                if let Ok(mut h) = self.own.inner.held.lock() {
                    if let Some(h) = h.get_mut(&s) {
                        h.renewed = sent;
                    }
                }
            }
            Err(e) => tracing::debug!(shard = s, error = %e, "renew failed; retrying next tick"),
        }
    }

    async fn try_acquire(&self, s: u32, name: String, lease: Option<Lease>, now: Timestamp) {
        let name = name.as_str();
        let sent = Instant::now();
        let (result, reason, transitions) = match lease {
            None => {
                let l = self.new_lease(name, "shard", now, 1);
                (self.api.create(&PostParams::default(), &l).await, "new", 1)
            }
            Some(mut l) => {
                let free = holder(&l).is_none();
                let mine = holder(&l) == Some(self.own.identity());
                if !(free || mine || expired(&l, now)) {
                    return;
                }
                let reason = if free { "free" } else if mine { "restart" } else { "expired" };
                let transitions = self.take_over(&mut l, now);
                (self.api.replace(name, &PostParams::default(), &l).await, reason, transitions)
            }
        };
        match result {
            Ok(_) => {
                if let Ok(mut h) = self.own.inner.held.lock() {
                    h.insert(s, Hold { transitions, renewed: sent, acquired: sent, draining: false, first_reconcile_seen: false });
                }
                self.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
                tracing::info!(shard = s, transitions, reason, "acquired shard");
                let _ = self.own.inner.events.send(ShardEvent::Acquired(s));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => tracing::debug!(shard = s, error = %e, "acquire failed"),
        }
    }

    /// Stop new work, let in-flight reconciles finish (bounded), then free the Lease so the
    /// next owner need not wait for it to expire.
    async fn release(&self, s: u32, lease: Option<Lease>, reason: &str) {
        if let Ok(mut h) = self.own.inner.held.lock() {
            if let Some(h) = h.get_mut(&s) {
                h.draining = true;
            }
        }
        let _ = self.own.inner.events.send(ShardEvent::Released(s));
        let drain_deadline = Instant::now() + self.own.config().renew_deadline / 2;
        while self.own.in_flight(s) > 0 && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(mut l) = lease {
            if holder(&l) == Some(self.own.identity()) {
                clear_holder(&mut l);
                if let Err(e) = self.api.replace(&shard_lease_name(s), &PostParams::default(), &l).await {
                    tracing::debug!(shard = s, error = %e, "release write failed; the Lease will expire");
                }
            }
        }
        if let Ok(mut h) = self.own.inner.held.lock() {
            h.remove(&s);
        }
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::info!(shard = s, reason, "released shard");
    }

    fn lose(&self, s: u32, reason: &str) {
        if let Ok(mut h) = self.own.inner.held.lock() {
            h.remove(&s);
        }
        let _ = self.own.inner.events.send(ShardEvent::Released(s));
        self.own.metrics().releases.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
        tracing::warn!(shard = s, reason, "lost shard");
    }

    async fn leader(&self, lease: Option<Lease>, now: Timestamp) {
        let me = self.own.identity();
        let sent = Instant::now();
        let was_leader = self.own.inner.leader_renewed.lock().map(|r| r.is_some()).unwrap_or(false);
        let outcome = match lease {
            None => {
                let l = self.new_lease(LEADER_LEASE, "leader", now, 1);
                self.api.create(&PostParams::default(), &l).await.map(|_| Some(1))
            }
            Some(mut l) => {
                let mine = holder(&l) == Some(me);
                if mine && was_leader {
                    if let Some(spec) = l.spec.as_mut() {
                        spec.renew_time = Some(MicroTime(now));
                    }
                    let t = l.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                    self.api.replace(LEADER_LEASE, &PostParams::default(), &l).await.map(|_| Some(t))
                } else if holder(&l).is_none() || expired(&l, now) || mine {
                    let t = self.take_over(&mut l, now);
                    self.api.replace(LEADER_LEASE, &PostParams::default(), &l).await.map(|_| Some(t))
                } else {
                    Ok(None)
                }
            }
        };
        let label = super::NameLabel { name: LEADER_LEASE.into() };
        match outcome {
            Ok(Some(t)) => {
                self.own.inner.leader_epoch.store(i64::from(t), Ordering::SeqCst);
                if let Ok(mut r) = self.own.inner.leader_renewed.lock() {
                    *r = Some(sent);
                }
                if !was_leader {
                    tracing::info!(epoch = t, "became leader");
                }
            }
            Ok(None) => self.own.step_down(),
            Err(e) => tracing::debug!(error = %e, "leader lease write failed"),
        }
        self.own.metrics().leader.get_or_create(&label).set(i64::from(self.own.leader_fence().is_some()));
    }

    async fn collect_dead_members(&self, by_name: &HashMap<String, Lease>, now: Timestamp) {
        for (name, l) in by_name {
            if role(l) != Some("member") {
                continue;
            }
            let long_dead = l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).is_none_or(|r| r.0 + SignedDuration::from_secs(i64::from(self.lease_secs) * 4) < now);
            if long_dead {
                let _ = self.api.delete(name, &DeleteParams::default()).await;
            }
        }
    }

    /// Graceful shutdown: stop all work, drain, free every Lease and leave the ring.
    async fn release_all(&self) {
        let shards = self.own.held_shards();
        let list = self.api.list(&ListParams::default().labels(MANAGED)).await.ok();
        let by_name: HashMap<String, Lease> = list.map(|l| l.items.into_iter().filter_map(|x| Some((x.metadata.name.clone()?, x))).collect()).unwrap_or_default();
        futures::future::join_all(shards.iter().map(|s| self.release(*s, by_name.get(&shard_lease_name(*s)).cloned(), "shutdown"))).await;
        if let Some(mut l) = by_name.get(LEADER_LEASE).cloned() {
            if holder(&l) == Some(self.own.identity()) {
                self.own.step_down();
                clear_holder(&mut l);
                let _ = self.api.replace(LEADER_LEASE, &PostParams::default(), &l).await;
            }
        }
        let _ = self.api.delete(&self.member, &DeleteParams::default()).await;
        self.own.metrics().shards_owned.set(0);
    }
}

#[cfg(test)]
mod tests;
