//! The lease loop against an in-memory Lease API (`Fake`), in real time with short
//! durations. Other replicas are played by the test, writing Leases straight into the fake.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    LEADER_LEASE, LeaseError, Observations, Record, Stamp, Verdict, cleared, live_members, may_hand_over, may_take, member_lease_name, member_of, older_replica, random_draw, renewed, run,
    shard_lease_name, taken, unreachable_limit, verdict,
};
use crate::ha::{HaConfig, HaMetrics, Ownership, ReasonLabel};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A Lease of `holder` renewed at wall time `renew`, valid `lease_secs`.
fn record(holder: &str, renew: Timestamp, lease_secs: i32) -> Record {
    let mut l = held_lease("x", "shard", holder, 1);
    let spec = l.spec.as_mut().unwrap();
    spec.renew_time = Some(MicroTime(renew));
    spec.acquire_time = Some(MicroTime(renew));
    spec.lease_duration_seconds = Some(lease_secs);
    Record::of(&l)
}

#[test]
fn a_lease_expires_after_a_lease_duration_unchanged_on_the_local_clock() {
    let t0 = Instant::now();
    let w = Timestamp::now();
    let mut seen = Observations::default();
    assert!(!seen.expired("l", t0 + secs(3600), 1), "a Lease never seen has not expired");
    // First seen: counts as just renewed, however old or new its renewTime reads.
    seen.observe("l", record("a_1", w - SignedDuration::from_hours(1), 5), t0);
    assert!(!seen.expired("l", t0 + ms(4999), 1));
    seen.observe("l", record("a_1", w - SignedDuration::from_hours(1), 5), t0 + secs(3));
    assert!(seen.expired("l", t0 + secs(5), 1), "seeing the same record again is no renewal");
    // A change is a renewal, whatever it says: even a renewTime an hour ahead or behind.
    seen.observe("l", record("a_1", w + SignedDuration::from_hours(1), 5), t0 + secs(6));
    assert!(!seen.expired("l", t0 + secs(10), 1));
    assert!(seen.expired("l", t0 + secs(11), 1));
    assert_eq!(seen.expires_at("l", 4), Some(t0 + secs(26)), "four lease durations for dead-member GC");
    seen.observe("l", record("b_2", w + SignedDuration::from_hours(1), 7), t0 + secs(20));
    assert_eq!(seen.expires_at("l", 1), Some(t0 + secs(27)), "a new holder is a change; its own duration counts");
    seen.retain(|n| n != "l");
    assert_eq!(seen.expires_at("l", 1), None);
    seen.observe("l", record("b_2", w, 7), t0 + secs(30));
    seen.forget("l");
    assert!(!seen.expired("l", t0 + secs(3600), 1), "forgotten, so never seen");
}

#[test]
fn members_are_live_by_observation_not_by_their_wall_clocks() {
    let t0 = Instant::now();
    let w = Timestamp::now();
    let member = |name: &str, holder: &str, renew: Timestamp| {
        let mut l = held_lease(&member_lease_name(name), "member", holder, 1);
        l.spec.as_mut().unwrap().renew_time = Some(MicroTime(renew));
        l.spec.as_mut().unwrap().lease_duration_seconds = Some(5);
        l
    };
    let leases: std::collections::HashMap<String, Lease> = [
        member("ahead", "ahead_1", w + SignedDuration::from_mins(1)),
        member("behind", "behind_1", w - SignedDuration::from_mins(1)),
        member("dead", "dead_1", w),
        held_lease(&shard_lease_name(0), "shard", "shard_holder_1", 1),
    ]
    .into_iter()
    .map(|l| (l.metadata.name.clone().unwrap(), l))
    .collect();
    let mut seen = Observations::default();
    for (n, l) in &leases {
        seen.observe(n, Record::of(l), t0);
    }
    assert_eq!(live_members(&leases, &seen, t0, "me_1"), ["ahead_1", "behind_1", "dead_1", "me_1"]);
    // Five seconds on: only the members whose Lease changed meanwhile are live.
    for name in ["ahead", "behind"] {
        let mut l = leases[&member_lease_name(name)].clone();
        l.spec.as_mut().unwrap().renew_time = Some(MicroTime(w + SignedDuration::from_hours(2)));
        seen.observe(&member_lease_name(name), Record::of(&l), t0 + secs(4));
    }
    assert_eq!(live_members(&leases, &seen, t0 + secs(5), "me_1"), ["ahead_1", "behind_1", "me_1"]);
}

#[test]
fn writes_carry_the_stamp_read_before_they_are_sent() {
    let stamp = Stamp { at: Instant::now(), wall: Timestamp::now() };
    let (new, t) = taken(None, "shoal-shard-3", "shard", "a_1", 5, stamp);
    let spec = new.spec.clone().unwrap();
    assert_eq!((t, spec.lease_transitions, spec.holder_identity.as_deref(), spec.lease_duration_seconds), (1, Some(1), Some("a_1"), Some(5)));
    assert_eq!(spec.renew_time.map(|t| t.0), Some(stamp.wall));
    assert_eq!(spec.acquire_time.map(|t| t.0), Some(stamp.wall));
    assert_eq!(new.metadata.labels.unwrap()["shoal.dev/lease-role"], "shard");

    let later = Stamp { at: stamp.at + secs(1), wall: stamp.wall + SignedDuration::from_secs(1) };
    let (other, t) = taken(Some(held_lease("shoal-shard-3", "shard", "b_2", 6)), "shoal-shard-3", "shard", "a_1", 5, later);
    assert_eq!(t, 7, "a new holder is a new epoch");
    assert_eq!(other.spec.as_ref().unwrap().renew_time.as_ref().map(|t| t.0), Some(later.wall));
    let again = renewed(other.clone(), 5, Stamp { at: later.at + secs(1), wall: later.wall + SignedDuration::from_secs(1) });
    let spec = again.spec.unwrap();
    assert_eq!((spec.lease_transitions, spec.holder_identity.as_deref()), (Some(7), Some("a_1")), "a renewal keeps holder and epoch");
    assert_eq!(spec.renew_time.map(|t| t.0), Some(later.wall + SignedDuration::from_secs(1)));
    assert_eq!(spec.acquire_time.map(|t| t.0), Some(later.wall));
    let free = cleared(other).spec.unwrap();
    assert_eq!((free.holder_identity, free.renew_time, free.lease_transitions), (None, None, Some(7)));
}

#[test]
fn only_new_free_or_expired_leases_are_taken() {
    assert_eq!(may_take(None, false), Some("new"));
    let mut free = held_lease("l", "shard", "a_1", 1);
    free.spec.as_mut().unwrap().holder_identity = Some(String::new());
    assert_eq!(may_take(Some(&free), false), Some("free"));
    let held = held_lease("l", "shard", "a_1", 1);
    assert_eq!(may_take(Some(&held), false), None, "held and live, even by a previous life of this identity");
    assert_eq!(may_take(Some(&held), true), Some("expired"));
}

#[test]
fn a_shard_lease_is_its_holder_s_while_the_holder_s_member_lease_lives() {
    let t0 = Instant::now();
    let me = "me_1";
    let shard = shard_lease_name(3);
    let member = member_lease_name("peer");
    assert_eq!(member_of("peer_0a1b"), member);
    assert_eq!(member_of("my_pod_0a1b"), member_lease_name("my_pod"), "the instance is what follows the last underscore");
    let leases = |items: Vec<Lease>| -> std::collections::HashMap<String, Lease> { items.into_iter().map(|l| (l.metadata.name.clone().unwrap(), l)).collect() };
    let mut seen = Observations::default();
    fn look(seen: &mut Observations, ls: &std::collections::HashMap<String, Lease>, at: Instant) {
        for (n, l) in ls {
            seen.observe(n, Record::of(l), at);
        }
    }
    let mut m = held_lease(&member, "member", "peer_1", 1);
    m.metadata.resource_version = Some("7".into());
    let held = held_lease(&shard, "shard", "peer_1", 4);

    let ls = leases(vec![]);
    assert_eq!(verdict(&shard, &ls, &seen, t0, me), Verdict::Take("new"));
    let ls = leases(vec![cleared(held.clone())]);
    assert_eq!(verdict(&shard, &ls, &seen, t0, me), Verdict::Take("free"));
    let ls = leases(vec![held_lease(&shard, "shard", me, 4)]);
    assert_eq!(verdict(&shard, &ls, &seen, t0, me), Verdict::Take("free"), "left by this very process, which is not acting under it");

    // Both seen at t0. The holder renews its member Lease; the shard Lease never changes.
    let ls = leases(vec![held.clone(), m.clone()]);
    look(&mut seen, &ls, t0);
    assert_eq!(verdict(&shard, &ls, &seen, t0 + secs(1), me), Verdict::Leave, "the shard Lease changed within a lease duration");
    let mut renewed_member = m.clone();
    renewed_member.spec.as_mut().unwrap().renew_time = Some(MicroTime(Timestamp::now() + SignedDuration::from_secs(1)));
    let ls = leases(vec![held.clone(), renewed_member.clone()]);
    look(&mut seen, &ls, t0 + secs(1));
    assert_eq!(verdict(&shard, &ls, &seen, t0 + secs(2), me), Verdict::Leave, "a shard Lease unchanged for a lease duration, but its holder's member Lease lives");
    assert_eq!(
        verdict(&shard, &ls, &seen, t0 + secs(3), me),
        Verdict::Bury { member: member.clone(), version: renewed_member.metadata.resource_version.clone() },
        "the member Lease silent for a lease duration: end that membership first"
    );
    // The member Lease names another process (a restart of that identity), or no one (ended).
    let other = leases(vec![held.clone(), held_lease(&member, "member", "peer_2", 2)]);
    assert_eq!(verdict(&shard, &other, &seen, t0 + secs(2), me), Verdict::Take("expired"));
    let ended = leases(vec![held.clone(), cleared(m.clone())]);
    assert_eq!(verdict(&shard, &ended, &seen, t0 + secs(2), me), Verdict::Take("expired"));
    // Missing: counts as unchanged from when it was first seen missing.
    let gone = leases(vec![held.clone()]);
    seen.forget(&member);
    assert_eq!(verdict(&shard, &gone, &seen, t0 + secs(2), me), Verdict::Leave, "missing, but never seen missing yet");
    seen.observe(&member, Record::absent(2), t0 + secs(2));
    assert_eq!(verdict(&shard, &gone, &seen, t0 + ms(3999), me), Verdict::Leave);
    assert_eq!(verdict(&shard, &gone, &seen, t0 + secs(4), me), Verdict::Take("expired"));
    // A holder that keeps writing its shard Lease (an earlier version) is never taken from
    // while it does, whatever its member Lease says.
    let mut busy = held.clone();
    busy.spec.as_mut().unwrap().renew_time = Some(MicroTime(Timestamp::now() + SignedDuration::from_secs(9)));
    seen.observe(&shard, Record::of(&busy), t0 + secs(4));
    assert_eq!(verdict(&shard, &leases(vec![busy, cleared(m)]), &seen, t0 + secs(5), me), Verdict::Leave);
}

#[test]
fn a_member_lease_of_an_earlier_version_is_told_apart() {
    let t0 = Instant::now();
    let ls: std::collections::HashMap<String, Lease> =
        [held_lease("shoal-member-a", "member", "a_1", 1), older_lease("shoal-member-b", "member", "b_1", 1), older_lease("shoal-shard-0", "shard", "b_1", 1)]
            .into_iter()
            .map(|l| (l.metadata.name.clone().unwrap(), l))
            .collect();
    let mut seen = Observations::default();
    for (n, l) in &ls {
        seen.observe(n, Record::of(l), t0);
    }
    assert_eq!(older_replica(&ls, &seen, t0, "a_1"), Some(("shoal-member-b".into(), "b_1".into())));
    assert_eq!(older_replica(&ls, &seen, t0 + secs(2), "a_1"), None, "only while it lives");
    let (taken_over, _) = taken(Some(older_lease("shoal-member-b", "member", "b_1", 1)), "shoal-member-b", "member", "b_2", 2, Stamp { at: t0, wall: Timestamp::now() });
    assert_eq!(taken_over.metadata.labels.unwrap()["shoal.dev/lease-protocol"], "2", "a Lease taken over is marked as this version's");
}

#[test]
fn a_shard_is_handed_over_when_its_work_ends_or_its_fence_expires() {
    let t0 = Instant::now();
    let deadline = t0 + secs(3);
    assert!(may_hand_over(0, deadline, t0), "no work in flight");
    assert!(!may_hand_over(1, deadline, t0 + ms(2999)), "work in flight under a live fence");
    assert!(may_hand_over(1, deadline, deadline), "the fence has expired");
}

#[test]
fn lease_settings_are_validated_as_written() {
    let ok = config(32, 5, 3000, 1000);
    assert_eq!(ok.validate(), Ok(()));
    for (what, bad) in [
        ("fractional lease (written as 5 s)", HaConfig { lease_duration: ms(5500), renew_deadline: ms(5200), ..ok.clone() }),
        ("sub-second lease (written as 0 s or 1 s)", HaConfig { lease_duration: ms(500), renew_deadline: ms(300), retry_period: ms(100), ..ok.clone() }),
        ("zero lease", HaConfig { lease_duration: Duration::ZERO, ..ok.clone() }),
        ("renew deadline not shorter", HaConfig { renew_deadline: secs(5), ..ok.clone() }),
        ("zero retry period", HaConfig { retry_period: Duration::ZERO, ..ok.clone() }),
        ("retry not shorter than renew", HaConfig { retry_period: secs(3), ..ok.clone() }),
    ] {
        assert!(bad.validate().is_err(), "{what} accepted");
    }
}

#[test]
fn two_processes_with_one_identity_are_two_holders() {
    let a = Ownership::new(HaConfig::default(), "r1".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None);
    let b = Ownership::new(HaConfig::default(), "r1".into(), "ns".into(), HaMetrics::new(&mut Registry::default()), None);
    assert_eq!((a.identity(), b.identity()), ("r1", "r1"));
    assert_ne!(a.holder(), b.holder());
    assert!(a.holder().starts_with("r1_") && b.holder().starts_with("r1_"));
}

/// One Lease write the fake API server received.
#[derive(Clone, Debug)]
struct Write {
    name: String,
    lease: Lease,
    arrived: Instant,
    ok: bool,
}

impl Write {
    fn holder(&self) -> Option<&str> {
        self.lease.spec.as_ref()?.holder_identity.as_deref()
    }
}

/// An in-memory Lease API: list, get, create, replace (with resourceVersion
/// preconditions), delete. Watches never answer.
#[derive(Default)]
struct Fake {
    leases: Mutex<BTreeMap<String, Lease>>,
    rv: AtomicU64,
    writes: Mutex<Vec<Write>>,
    fail_put: Mutex<HashSet<String>>,
    list_delay: Mutex<Duration>,
    /// Answer every request with 503, as an API server that is away would.
    down: std::sync::atomic::AtomicBool,
    /// Answer every write with 503.
    writes_down: std::sync::atomic::AtomicBool,
    /// Hold every replace of a member Lease this long before applying it, as a hung API
    /// server would.
    put_delay: Mutex<Duration>,
    /// Leases to store (as their holder would) just before the next replace of that name is
    /// applied: a renewal that lands first.
    before_put: Mutex<BTreeMap<String, Lease>>,
}

fn reply(code: u16, body: serde_json::Value) -> Response<Body> {
    Response::builder().status(code).header("content-type", "application/json").body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    reply(code, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": reason, "code": code}))
}

impl Fake {
    /// Store `lease` as the server would, with a new resourceVersion.
    fn store(&self, leases: &mut BTreeMap<String, Lease>, mut lease: Lease) -> Lease {
        let rv = self.rv.fetch_add(1, Ordering::SeqCst) + 1;
        lease.metadata.resource_version = Some(rv.to_string());
        lease.metadata.namespace = Some("ns".into());
        leases.insert(lease.metadata.name.clone().unwrap(), lease.clone());
        lease
    }

    /// Write a Lease as another replica would (unconditionally).
    fn put(&self, lease: Lease) {
        let mut leases = self.leases.lock().unwrap();
        self.store(&mut leases, lease);
    }

    fn get(&self, name: &str) -> Option<Lease> {
        self.leases.lock().unwrap().get(name).cloned()
    }

    fn writes(&self) -> Vec<Write> {
        self.writes.lock().unwrap().clone()
    }

    fn record(&self, name: &str, lease: &Lease, arrived: Instant, ok: bool) {
        self.writes.lock().unwrap().push(Write { name: name.into(), lease: lease.clone(), arrived, ok });
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let arrived = Instant::now();
        let (parts, body) = req.into_parts();
        let query = parts.uri.query().unwrap_or("").to_string();
        let name = parts.uri.path().split_once("/leases/").map(|(_, n)| n.to_string());
        let body = body.collect_bytes().await.unwrap_or_default();
        if self.down.load(Ordering::SeqCst) || (parts.method != Method::GET && self.writes_down.load(Ordering::SeqCst)) {
            return status(503, "ServiceUnavailable");
        }
        match (parts.method, name) {
            (Method::GET, None) if query.contains("watch=true") => std::future::pending().await,
            (Method::GET, None) => {
                let items: Vec<Lease> = self.leases.lock().unwrap().values().cloned().collect();
                let rv = self.rv.load(Ordering::SeqCst);
                let delay = *self.list_delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                reply(200, json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {"resourceVersion": rv.to_string()}, "items": items}))
            }
            (Method::GET, Some(n)) => match self.get(&n) {
                Some(l) => reply(200, serde_json::to_value(l).unwrap()),
                None => status(404, "NotFound"),
            },
            (Method::POST, None) => {
                let lease: Lease = serde_json::from_slice(&body).unwrap();
                let name = lease.metadata.name.clone().unwrap();
                let mut leases = self.leases.lock().unwrap();
                let exists = leases.contains_key(&name);
                self.record(&name, &lease, arrived, !exists);
                if exists {
                    return status(409, "AlreadyExists");
                }
                reply(201, serde_json::to_value(self.store(&mut leases, lease)).unwrap())
            }
            (Method::PUT, Some(n)) => {
                if n.starts_with("shoal-member-") {
                    let delay = *self.put_delay.lock().unwrap();
                    tokio::time::sleep(delay).await;
                }
                let lease: Lease = serde_json::from_slice(&body).unwrap();
                let mut leases = self.leases.lock().unwrap();
                if let Some(first) = self.before_put.lock().unwrap().remove(&n) {
                    self.store(&mut leases, first);
                }
                let failing = self.fail_put.lock().unwrap().contains(&n);
                let current = leases.get(&n).and_then(|c| c.metadata.resource_version.clone());
                let fresh = current.is_some() && (lease.metadata.resource_version.is_none() || lease.metadata.resource_version == current);
                self.record(&n, &lease, arrived, fresh && !failing);
                if failing {
                    status(500, "InternalError")
                } else if current.is_none() {
                    status(404, "NotFound")
                } else if !fresh {
                    status(409, "Conflict")
                } else {
                    reply(200, serde_json::to_value(self.store(&mut leases, lease)).unwrap())
                }
            }
            (Method::DELETE, Some(n)) => {
                let want: Option<String> = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.pointer("/preconditions/resourceVersion").and_then(|r| r.as_str().map(String::from)));
                let mut leases = self.leases.lock().unwrap();
                match leases.get(&n) {
                    None => status(404, "NotFound"),
                    Some(l) if want.is_some() && l.metadata.resource_version != want => status(409, "Conflict"),
                    Some(_) => reply(200, serde_json::to_value(leases.remove(&n)).unwrap()),
                }
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config(shards: u32, lease_secs: u64, renew_ms: u64, retry_ms: u64) -> HaConfig {
    HaConfig { shards, lease_duration: Duration::from_secs(lease_secs), renew_deadline: ms(renew_ms), retry_period: ms(retry_ms), ..Default::default() }
}

struct Replica {
    own: Ownership,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

fn start(fake: &Arc<Fake>, identity: &str, cfg: HaConfig) -> Replica {
    let f = fake.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let f = f.clone();
        async move { Ok::<_, Infallible>(f.handle(req).await) }
    });
    let client = Client::new(svc, "ns");
    let metrics = HaMetrics::new(&mut Registry::default());
    let own = Ownership::new(cfg, identity.into(), "ns".into(), metrics, None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(client, own.clone(), stop.clone()));
    Replica { own, stop, task }
}

/// A Lease as another replica of this version writes it: held by `holder`, renewed now.
fn held_lease(name: &str, role: &str, holder: &str, transitions: i32) -> Lease {
    let mut l = older_lease(name, role, holder, transitions);
    l.metadata.labels.as_mut().unwrap().insert("shoal.dev/lease-protocol".into(), "2".into());
    l
}

/// A Lease as a replica of an earlier version (which renews every Lease) writes it.
fn older_lease(name: &str, role: &str, holder: &str, transitions: i32) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "shoal".to_string()), ("shoal.dev/lease-role".to_string(), role.to_string())].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(2),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }),
    }
}

/// Play a live replica `holder`: renew `leases` (name, role) every 200 ms until `stop`.
fn renew_as(fake: &Arc<Fake>, leases: Vec<(String, &'static str)>, holder: &str, stop: CancellationToken) {
    let (fake, holder) = (fake.clone(), holder.to_string());
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            for (name, role) in &leases {
                fake.put(held_lease(name, role, &holder, 1));
            }
            tokio::time::sleep(ms(200)).await;
        }
    });
}

async fn until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(ms(20)).await;
    }
}

fn wall_at(base: (Instant, Timestamp), at: Instant) -> Timestamp {
    base.1 + SignedDuration::try_from(at - base.0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lease_write_is_stamped_right_before_it_is_sent() {
    let fake = Arc::new(Fake::default());
    *fake.list_delay.lock().unwrap() = ms(300);
    let base = (Instant::now(), Timestamp::now());
    // A retry period longer than the list takes, so that the next member write does not
    // follow right after the list is answered.
    let cfg = config(4, 2, 1500, 1000);
    let r = start(&fake, "a", cfg.clone());
    until(ms(10_000), "all 4 shards held", || (r.own.held_shards().len() == 4).then_some(())).await;
    until(ms(10_000), "the leader Lease held", || r.own.leader_fence()).await;
    tokio::time::sleep(ms(1000)).await;
    let writes = fake.writes();
    // Every fence starts at the instant taken right before one of the member Lease's writes
    // (not when the list that follows it, 300 ms later, was answered).
    let member = member_lease_name("a");
    for s in 0..4 {
        let fence = r.own.owns_shard(s).expect("shard held");
        let start = r.own.fence_deadline(fence).expect("fence holds") - cfg.renew_deadline;
        let sent = writes.iter().filter(|w| w.name == member && w.ok).any(|w| w.arrived >= start && w.arrived - start < ms(50));
        assert!(sent, "the fence of shard {s} does not start right before one of the member Lease's writes");
    }
    // The renewTime written is the wall time of that instant, not of an earlier one.
    let ours: Vec<&Write> = writes.iter().filter(|w| w.ok && w.holder() == Some(r.own.holder())).collect();
    assert!(ours.iter().any(|w| w.name == LEADER_LEASE) && ours.iter().any(|w| w.name == shard_lease_name(0)));
    for w in ours {
        let renew = w.lease.spec.as_ref().and_then(|s| s.renew_time.as_ref()).expect("renewTime").0;
        let sent = wall_at(base, w.arrived);
        let early = sent.duration_since(renew);
        assert!(early >= SignedDuration::from_millis(-5) && early < SignedDuration::from_millis(50), "{} written with a renewTime {early:?} before it was sent", w.name);
    }
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_write_ends_the_fence_of_every_shard_and_the_leadership_at_the_renew_deadline() {
    let fake = Arc::new(Fake::default());
    let cfg = config(4, 2, 1500, 200);
    let r = start(&fake, "a", cfg.clone());
    until(ms(10_000), "all 4 shards held", || (r.own.held_shards().len() == 4).then_some(())).await;
    until(ms(10_000), "the leader Lease held", || r.own.leader_fence()).await;
    let before = epochs(&r.own);
    let member = member_lease_name("a");
    fake.fail_put.lock().unwrap().insert(member.clone());
    let cut = Instant::now();
    let ended = until(ms(5000), "the fence of shard 0 ends", || r.own.owns_shard(0).is_none().then(Instant::now)).await;
    let last = fake.writes().iter().filter(|w| w.name == member && w.ok).map(|w| w.arrived).max().unwrap();
    assert!(last < cut, "no member write went through after the cut");
    // The fence counts from the stamp read just before the last confirmed member write.
    assert!(ended + ms(60) >= last + cfg.renew_deadline, "fence ended {:?} before the renew deadline of the last member write", (last + cfg.renew_deadline).duration_since(ended));
    assert!(ended <= last + cfg.renew_deadline + ms(100), "fence ended {:?} after the renew deadline", ended.duration_since(last + cfg.renew_deadline));
    // Every shard and the leadership end at that same instant.
    for s in 0..4 {
        assert!(r.own.owns_shard(s).is_none(), "shard {s} still fenced in after shard 0's fence ended");
    }
    assert!(r.own.leader_fence().is_none(), "still leader after the member fence ended");
    // The shards are still held (nobody can have taken them while the member Lease is this
    // replica's), and come back under the same epochs once the member Lease is renewed.
    fake.fail_put.lock().unwrap().clear();
    until(ms(5000), "the fences back", || (0..4).all(|s| r.own.owns_shard(s).is_some()).then_some(())).await;
    assert_eq!(epochs(&r.own), before, "the same shards, under the same epochs");
    assert!(fake.writes().iter().filter(|w| w.arrived > cut).all(|w| w.name == member), "only the member Lease was written meanwhile");
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_shard_neither_stops_the_others_nor_is_handed_over_with_live_work() {
    let fake = Arc::new(Fake::default());
    let cfg = config(8, 4, 3000, 200);
    let r = start(&fake, "a", cfg.clone());
    until(ms(10_000), "all 8 shards held", || (r.own.held_shards().len() == 8).then_some(())).await;
    let me = r.own.holder().to_string();
    let mut members = vec![me.clone(), "peer_1".to_string()];
    members.sort();
    let keep: HashSet<u32> = crate::core::shard::preferred_shards(8, &members, &me).into_iter().collect();
    let gone: Vec<u32> = (0..8).filter(|s| !keep.contains(s)).collect();
    assert_eq!(gone.len(), 4);
    // x stays in flight throughout; z is in flight for 500 ms of the drain; the rest are idle.
    let (x, z) = (gone[0], gone[1]);
    let (_, x_work) = r.own.begin(x).unwrap();
    let (_, z_work) = r.own.begin(z).unwrap();
    let peer = CancellationToken::new();
    renew_as(&fake, vec![(member_lease_name("peer"), "member")], "peer_1", peer.clone());
    let t0 = Instant::now();
    tokio::time::sleep(ms(500)).await;
    drop(z_work);
    let z_done = Instant::now();
    tokio::time::sleep(ms(4000)).await;
    let writes = fake.writes();
    let cleared = |s: u32| writes.iter().find(|w| w.name == shard_lease_name(s) && w.ok && w.holder().is_none()).map(|w| w.arrived);

    // The member Lease, which fences the kept shards, went on being renewed every retry
    // period; the kept shards' Leases were not written at all, and their fences held.
    let member = member_lease_name("a");
    let times: Vec<Instant> = writes.iter().filter(|w| w.name == member && w.ok && w.arrived + ms(500) >= t0).map(|w| w.arrived).collect();
    let gap = times.windows(2).map(|p| p[1] - p[0]).max().unwrap_or_default();
    assert!(times.len() > 10 && gap < ms(800), "the member Lease went {gap:?} without a renew while shards drained ({} renews)", times.len());
    for s in &keep {
        assert!(writes.iter().all(|w| w.name != shard_lease_name(*s) || w.arrived < t0), "kept shard {s} was written");
        assert!(r.own.owns_shard(*s).is_some(), "kept shard {s} not fenced in");
    }
    for s in &gone[2..] {
        let c = cleared(*s).unwrap_or_else(|| panic!("idle shard {s} handed over"));
        assert!(c < t0 + ms(1000), "idle shard {s} handed over {:?} after the ring changed", c - t0);
    }
    let zc = cleared(z).expect("shard z handed over once its work ended");
    assert!(zc >= z_done && zc < z_done + ms(700), "shard z handed over {:?} after its work ended", zc.checked_duration_since(z_done));
    let xc = cleared(x).expect("shard x handed over once its fence expired");
    // Work in flight on x was sent under the member fence as it stood when the drain began,
    // which counts from a member write no earlier than the last one before the ring changed.
    let last_renew = writes.iter().filter(|w| w.name == member && w.ok && w.arrived < t0).map(|w| w.arrived).max().unwrap();
    assert!(xc + ms(20) >= last_renew + cfg.renew_deadline, "shard x handed over {:?} after the member write before the drain, with work in flight under a live fence", xc - last_renew);
    assert!(xc < t0 + cfg.renew_deadline + ms(1000), "shard x handed over {:?} after the ring changed: later member renewals must not extend a draining shard's fence", xc - t0);
    assert!(r.own.owns_shard(x).is_none());
    drop(x_work);
    peer.cancel();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_identity_refuses_to_start() {
    let fake = Arc::new(Fake::default());
    let member = member_lease_name("twin");
    let other = CancellationToken::new();
    fake.put(held_lease(&member, "member", "twin_0001", 1));
    renew_as(&fake, vec![(member.clone(), "member")], "twin_0001", other.clone());
    let t0 = Instant::now();
    let r = start(&fake, "twin", config(4, 2, 1500, 200));
    let result = tokio::time::timeout(ms(8000), r.task).await.expect("the second process gives up within two lease durations").unwrap();
    let err = result.expect_err("the second process refuses to start");
    assert!(t0.elapsed() >= ms(2000), "it waited a lease duration before refusing");
    assert!(format!("{err:#}").contains("twin_0001"), "the error names the other holder: {err:#}");
    assert!(fake.writes().iter().all(|w| w.name == member || w.holder() != Some(r.own.holder())), "it wrote no shard or leader Lease");
    assert!(r.own.held_shards().is_empty());
    let holder = fake.get(&member).and_then(|l| l.spec?.holder_identity);
    assert_eq!(holder.as_deref(), Some("twin_0001"), "the member Lease was not stolen");
    other.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_previous_life_with_the_same_identity_are_waited_out() {
    let fake = Arc::new(Fake::default());
    // A crashed earlier process named "me" left its Leases, renewed just now.
    fake.put(held_lease(&member_lease_name("me"), "member", "me", 1));
    fake.put(held_lease(LEADER_LEASE, "leader", "me", 1));
    for s in 0..4 {
        fake.put(held_lease(&shard_lease_name(s), "shard", "me", 1));
    }
    let t0 = Instant::now();
    let r = start(&fake, "me", config(4, 2, 1500, 200));
    until(ms(10_000), "all 4 shards held", || (r.own.held_shards().len() == 4).then_some(())).await;
    let first = fake.writes().iter().filter(|w| w.ok && w.name.starts_with("shoal-shard-")).map(|w| w.arrived).min().unwrap();
    assert!(first >= t0 + ms(2000), "took a shard {:?} after starting, before the previous life's Lease expired", first - t0);
    let expired = r.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: "expired".into() }).get();
    assert_eq!(expired, 4);
    // Not inherited: taken under the next epoch, by the new holder.
    for (s, holder, t) in lease_epochs(&fake, 4) {
        assert_eq!((holder.as_deref(), t), (Some(r.own.holder()), 2), "shard {s}");
    }
    until(ms(5000), "the leadership", || r.own.leader_fence()).await;
    assert_eq!(fake.get(LEADER_LEASE).unwrap().spec.unwrap().lease_transitions, Some(2));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_running_ahead_takes_nothing_from_a_live_owner() {
    let fake = Arc::new(Fake::default());
    let peer = CancellationToken::new();
    let mut leases = vec![(member_lease_name("peer"), "member"), (LEADER_LEASE.to_string(), "leader")];
    leases.extend((0..4).map(|s| (shard_lease_name(s), "shard")));
    renew_as(&fake, leases, "peer_1", peer.clone());
    tokio::time::sleep(ms(100)).await;
    let cfg = HaConfig { test_clock_offset: 60, ..config(4, 2, 1500, 200) };
    let r = start(&fake, "ahead", cfg);
    let t0 = Instant::now();
    while t0.elapsed() < ms(6000) {
        assert!(r.own.held_shards().is_empty(), "took {:?} from a live owner", r.own.held_shards());
        assert!(r.own.leader_fence().is_none(), "took the leader Lease from a live leader");
        tokio::time::sleep(ms(50)).await;
    }
    let me = r.own.holder().to_string();
    assert!(fake.writes().iter().all(|w| w.name.starts_with("shoal-member-") || w.holder() != Some(&me)));
    peer.cancel();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_members_are_collected_by_observation_not_by_their_wall_clocks() {
    let fake = Arc::new(Fake::default());
    let skewed = |name: &str, holder: &str, by: SignedDuration| {
        let mut l = held_lease(&member_lease_name(name), "member", holder, 1);
        let spec = l.spec.as_mut().unwrap();
        spec.renew_time = Some(MicroTime(Timestamp::now() + by));
        l
    };
    // A dead member whose clock ran an hour ahead, and a live one whose clock runs an hour
    // behind (it keeps renewing).
    fake.put(skewed("dead", "dead_1", SignedDuration::from_hours(1)));
    let live = CancellationToken::new();
    {
        let (fake, live) = (fake.clone(), live.clone());
        tokio::spawn(async move {
            while !live.is_cancelled() {
                fake.put(skewed("behind", "behind_1", SignedDuration::from_hours(-1)));
                tokio::time::sleep(ms(200)).await;
            }
        });
    }
    let t0 = Instant::now();
    let r = start(&fake, "gc", config(4, 1, 700, 100));
    // Four lease durations (2 s as written) after the dead member was first seen.
    let gone = until(ms(15_000), "the dead member's Lease deleted", || fake.get(&member_lease_name("dead")).is_none().then(Instant::now)).await;
    assert!(gone >= t0 + ms(8000), "deleted {:?} after it was first seen, before four lease durations", gone - t0);
    assert!(fake.get(&member_lease_name("behind")).is_some(), "a live member whose clock runs behind was deleted");
    assert!(r.own.leader_fence().is_some());
    live.cancel();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[test]
fn the_exit_bound_is_four_lease_durations_and_up_to_half_as_much_again_drawn_per_process() {
    assert_eq!(unreachable_limit(secs(5), 0.0), secs(20));
    assert_eq!(unreachable_limit(secs(5), 0.5), secs(25));
    assert_eq!(unreachable_limit(secs(5), 1.0), secs(30));
    let draws: Vec<f64> = (0..200).map(|_| random_draw()).collect();
    assert!(draws.iter().all(|d| (0.0..1.0).contains(d)), "{draws:?}");
    let (lo, hi) = draws.iter().fold((1.0f64, 0.0f64), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
    assert!(lo < 0.2 && hi > 0.8, "draws spread over 0..1: {lo:.3}..{hi:.3}");
}

#[tokio::test]
async fn a_replica_cut_off_from_the_lease_api_exits_within_its_jittered_bound() {
    let fake = Arc::new(Fake::default());
    let r = start(&fake, "a", config(2, 1, 600, 100));
    until(secs(5), "a shard held", || (!r.own.held_shards().is_empty()).then_some(())).await;
    let cut = Instant::now();
    fake.down.store(true, Ordering::SeqCst);
    let result = tokio::time::timeout(secs(10), r.task).await.expect("the loop gives up").unwrap();
    let waited = cut.elapsed();
    let e = result.expect_err("an unreachable Lease API stops the loop");
    assert!(e.to_string().contains("the Lease API failed"), "{e}");
    // Four lease durations (4 s) to six, counted from the last tick that went through (up to
    // one retry period before the cut); the upper bound leaves room for a loaded machine.
    assert!(waited >= ms(3900) && waited <= secs(8), "exited {waited:?} after the cut");
    assert!(r.own.owns_shard(0).is_none() && r.own.owns_shard(1).is_none(), "fenced long before");
    r.stop.cancel();
}

/// Shards and their transition counts, as `own` holds them.
fn epochs(own: &Ownership) -> Vec<(u32, Option<crate::ha::Fence>)> {
    own.held_shards().into_iter().map(|s| (s, own.owns_shard(s))).collect()
}

#[tokio::test]
async fn a_renewal_that_goes_through_too_late_for_the_fence_keeps_the_shard() {
    let fake = Arc::new(Fake::default());
    let r = start(&fake, "a", config(4, 2, 600, 100));
    until(secs(5), "every shard held", || (r.own.held_shards().len() == 4).then_some(())).await;
    let before = epochs(&r.own);
    // The API server hangs for 1.5 s with shard renewals in flight: they land after the
    // fence has ended.
    *fake.put_delay.lock().unwrap() = ms(1500);
    until(secs(5), "the fences lapse", || r.own.owns_shard(0).is_none().then_some(())).await;
    tokio::time::sleep(ms(1500)).await;
    *fake.put_delay.lock().unwrap() = Duration::ZERO;
    until(secs(5), "the fences back", || (0..4).all(|s| r.own.owns_shard(s).is_some()).then_some(())).await;
    assert_eq!(epochs(&r.own), before, "the same shards, under the same epochs");
    let lost = r.own.metrics().releases.get_or_create(&ReasonLabel { reason: "renew_deadline".into() }).get();
    assert_eq!(lost, 0, "no shard dropped for a renewal that went through");
    r.stop.cancel();
    let _ = r.task.await;
}

#[tokio::test]
async fn after_an_outage_no_replica_takes_the_shards_of_another_that_was_cut_off_too() {
    let fake = Arc::new(Fake::default());
    let cfg = config(8, 2, 600, 100);
    let a = start(&fake, "a", cfg.clone());
    // Out of step with a, as replicas are: after the outage one of them lists first.
    tokio::time::sleep(ms(50)).await;
    let b = start(&fake, "b", cfg);
    until(secs(10), "the shards split 4/4", || (a.own.held_shards().len() == 4 && b.own.held_shards().len() == 4).then_some(())).await;
    let before = (epochs(&a.own), epochs(&b.own));
    // The API server is away for longer than the lease: nobody renews anything. (Writes
    // stop a moment before reads, so that each has seen the other's last renewal.)
    fake.writes_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(ms(300)).await;
    fake.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(secs(3)).await;
    fake.down.store(false, Ordering::SeqCst);
    fake.writes_down.store(false, Ordering::SeqCst);
    until(secs(5), "every fence back", || (a.own.held_shards().iter().chain(&b.own.held_shards()).filter_map(|s| a.own.owns_shard(*s).or(b.own.owns_shard(*s))).count() == 8).then_some(())).await;
    // Give any mistaken takeover (one lease duration after the return) the time to happen.
    tokio::time::sleep(secs(3)).await;
    assert_eq!((epochs(&a.own), epochs(&b.own)), before, "each kept its shards, under the same epochs");
    for r in [&a, &b] {
        let expired = r.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: "expired".into() }).get();
        assert_eq!(expired, 0, "{}: took a Lease as expired", r.own.holder());
    }
    for r in [a, b] {
        r.stop.cancel();
        let _ = r.task.await;
    }
}

/// Shard -> transition count, as the shard Leases in `fake` read.
fn lease_epochs(fake: &Fake, shards: u32) -> Vec<(u32, Option<String>, i32)> {
    (0..shards).map(|s| fake.get(&shard_lease_name(s)).map(|l| (s, l.spec.clone().and_then(|x| x.holder_identity), l.spec.and_then(|x| x.lease_transitions).unwrap_or(0))).unwrap()).collect()
}

fn acquired(r: &Replica, reason: &str) -> u64 {
    r.own.metrics().acquisitions.get_or_create(&ReasonLabel { reason: reason.into() }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stays_its_holder_s_while_its_member_lease_is_renewed_and_is_taken_under_a_new_epoch_once_it_stops() {
    let fake = Arc::new(Fake::default());
    // A peer took every shard and the leadership long ago and since renews only its member
    // Lease, as this version does.
    for s in 0..4 {
        fake.put(held_lease(&shard_lease_name(s), "shard", "peer_1", 1));
    }
    fake.put(held_lease(LEADER_LEASE, "leader", "peer_1", 1));
    let peer = CancellationToken::new();
    let member = member_lease_name("peer");
    let last = Arc::new(Mutex::new(Instant::now()));
    {
        let (fake, peer, member, last) = (fake.clone(), peer.clone(), member.clone(), last.clone());
        tokio::spawn(async move {
            while !peer.is_cancelled() {
                fake.put(held_lease(&member, "member", "peer_1", 1));
                *last.lock().unwrap() = Instant::now();
                tokio::time::sleep(ms(200)).await;
            }
        });
    }
    let r = start(&fake, "a", config(4, 2, 1500, 200));
    let me = r.own.holder().to_string();
    // Three lease durations: the shard Leases have not changed for all of it, and the ring
    // gives half of them to this replica; none is taken while the member Lease lives.
    let t0 = Instant::now();
    while t0.elapsed() < secs(6) {
        assert!(r.own.held_shards().is_empty(), "took {:?} from a live holder", r.own.held_shards());
        assert!(r.own.leader_fence().is_none(), "took the leader Lease from a live leader");
        tokio::time::sleep(ms(50)).await;
    }
    assert!(fake.writes().iter().all(|w| w.name.starts_with("shoal-member-a") || w.holder() != Some(&me)), "wrote a Lease it may not take");
    assert!(fake.writes().iter().all(|w| w.name == member_lease_name("a") || w.name == member), "wrote another Lease than the two member Leases");

    // The peer stops. Its member Lease is silent from its last renewal on.
    peer.cancel();
    tokio::time::sleep(ms(250)).await;
    let last = *last.lock().unwrap();
    until(secs(10), "every shard taken", || (r.own.held_shards().len() == 4).then_some(())).await;
    until(secs(5), "the leadership taken", || r.own.leader_fence()).await;
    let writes = fake.writes();
    let ended = writes.iter().find(|w| w.name == member && w.ok && w.holder().is_none()).expect("the silent member's Lease cleared").arrived;
    let first_take = writes.iter().filter(|w| w.ok && w.holder() == Some(&me) && (w.name.starts_with("shoal-shard-") || w.name == LEADER_LEASE)).map(|w| w.arrived).min().unwrap();
    assert!(ended >= last + secs(2), "the member Lease was cleared {:?} after its last renewal, before a lease duration", ended - last);
    assert!(first_take >= ended, "a shard or the leadership was taken before the silent membership was ended");
    for (s, holder, t) in lease_epochs(&fake, 4) {
        assert_eq!((holder.as_deref(), t), (Some(me.as_str()), 2), "shard {s} taken under the next epoch");
    }
    assert_eq!(fake.get(LEADER_LEASE).unwrap().spec.unwrap().lease_transitions, Some(2));
    assert_eq!(acquired(&r, "expired"), 4);
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_lands_before_the_membership_is_ended_keeps_the_holder_s_shards() {
    let fake = Arc::new(Fake::default());
    for s in 0..4 {
        fake.put(held_lease(&shard_lease_name(s), "shard", "peer_1", 1));
    }
    let member = member_lease_name("peer");
    fake.put(held_lease(&member, "member", "peer_1", 1));
    // The peer's next renewal reaches the API server just before this replica's write that
    // would end its membership (it had been silent for a lease duration until then).
    fake.before_put.lock().unwrap().insert(member.clone(), held_lease(&member, "member", "peer_1", 1));
    let t0 = Instant::now();
    let r = start(&fake, "a", config(4, 2, 1500, 200));
    let me = r.own.holder().to_string();
    let raced = until(secs(10), "the race", || fake.before_put.lock().unwrap().is_empty().then(Instant::now)).await;
    assert!(raced >= t0 + secs(2), "tried to end a membership {:?} after first seeing it", raced - t0);
    let refused = fake.writes().iter().any(|w| w.name == member && !w.ok && w.holder().is_none());
    assert!(refused, "the write that would end the membership was refused");
    // That renewal counts: a lease duration of silence again before anything is taken.
    until(secs(10), "every shard taken", || (r.own.held_shards().len() == 4).then_some(())).await;
    let first_take = fake.writes().iter().filter(|w| w.ok && w.name.starts_with("shoal-shard-") && w.holder() == Some(&me)).map(|w| w.arrived).min().unwrap();
    assert!(first_take >= raced + secs(2) - ms(50), "took a shard {:?} after the holder's renewal landed, before a lease duration", first_take - raced);
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_membership_was_ended_stops_acting_on_everything_at_once_and_comes_back_under_new_epochs() {
    let fake = Arc::new(Fake::default());
    let cfg = config(4, 2, 1500, 200);
    let r = start(&fake, "a", cfg.clone());
    until(secs(10), "every shard held", || (r.own.held_shards().len() == 4).then_some(())).await;
    until(secs(10), "the leadership held", || r.own.leader_fence()).await;
    let before = lease_epochs(&fake, 4);
    // Another replica saw this one silent for a lease duration and ended its membership.
    let member = member_lease_name("a");
    fake.put(cleared(fake.get(&member).unwrap()));
    let t_end = Instant::now();
    let old: Vec<Option<crate::ha::Fence>> = (0..4).map(|s| r.own.owns_shard(s)).collect();
    let old_leader = r.own.leader_fence();
    let gone = |s: u32| r.own.owns_shard(s) != old[s as usize];
    let stopped = until(secs(2), "no fence under an old epoch", || ((0..4).all(gone) && r.own.leader_fence() != old_leader).then(Instant::now)).await;
    assert!(stopped < t_end + cfg.retry_period + ms(150), "acted on for {:?} after its membership ended", stopped - t_end);
    let watch = Instant::now();
    while watch.elapsed() < ms(1000) {
        assert!((0..4).all(gone) && r.own.leader_fence() != old_leader, "a fence of the ended membership came back");
        tokio::time::sleep(ms(10)).await;
    }
    let lost = r.own.metrics().releases.get_or_create(&ReasonLabel { reason: "renew_deadline".into() }).get();
    assert_eq!(lost, 4, "every shard dropped at once");
    // It takes its member Lease back and its shards under new epochs, never the old ones.
    until(secs(10), "every shard held again", || (r.own.held_shards().len() == 4 && (0..4).all(|s| r.own.owns_shard(s).is_some())).then_some(())).await;
    for ((s, _, was), (_, holder, now)) in before.iter().zip(lease_epochs(&fake, 4)) {
        assert_eq!((holder.as_deref(), now), (Some(r.own.holder()), was + 1), "shard {s}");
        assert_eq!(r.own.owns_shard(*s).map(|f| f.transitions), Some(was + 1));
    }
    assert_eq!(fake.get(&member).unwrap().spec.unwrap().holder_identity.as_deref(), Some(r.own.holder()));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_writes_its_member_lease_once_a_retry_period_however_many_shards() {
    let count = |shards: u32| async move {
        let fake = Arc::new(Fake::default());
        let r = start(&fake, "a", config(shards, 2, 1500, 200));
        until(secs(20), "every shard held", || (r.own.held_shards().len() == shards as usize).then_some(())).await;
        until(secs(5), "the leadership held", || r.own.leader_fence()).await;
        // Past the lease duration after the last acquisition, then ten retry periods.
        tokio::time::sleep(secs(3)).await;
        let (from, window) = (Instant::now(), secs(2));
        tokio::time::sleep(window).await;
        let writes: Vec<Write> = fake.writes().into_iter().filter(|w| w.arrived >= from && w.arrived < from + window).collect();
        let member = member_lease_name("a");
        assert!(writes.iter().all(|w| w.name == member), "{shards} shards: idle writes to {:?}", writes.iter().map(|w| &w.name).collect::<Vec<_>>());
        let sent = r.own.metrics().lease_writes.get_or_create(&crate::ha::LeaseWriteLabels { role: "member".into(), verb: "update".into() }).get();
        r.stop.cancel();
        r.task.await.unwrap().unwrap();
        (writes.len(), sent)
    };
    let ((few, few_sent), (many, many_sent)) = tokio::join!(count(4), count(64));
    assert!((9..=11).contains(&few) && (9..=11).contains(&many), "member writes in ten retry periods: {few} with 4 shards, {many} with 64");
    assert!(few.abs_diff(many) <= 1, "{few} with 4 shards, {many} with 64");
    assert!(few_sent > 0 && many_sent > 0, "the write metric counts member renewals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_lease_whose_release_write_failed_is_freed_later() {
    let fake = Arc::new(Fake::default());
    let r = start(&fake, "a", config(8, 2, 1500, 200));
    until(secs(10), "all 8 shards held", || (r.own.held_shards().len() == 8).then_some(())).await;
    let me = r.own.holder().to_string();
    let mut members = vec![me.clone(), "peer_1".to_string()];
    members.sort();
    let keep: HashSet<u32> = crate::core::shard::preferred_shards(8, &members, &me).into_iter().collect();
    let gone: Vec<u32> = (0..8).filter(|s| !keep.contains(s)).collect();
    for s in &gone {
        fake.fail_put.lock().unwrap().insert(shard_lease_name(*s));
    }
    let peer = CancellationToken::new();
    renew_as(&fake, vec![(member_lease_name("peer"), "member")], "peer_1", peer.clone());
    until(secs(5), "the moved shards dropped", || gone.iter().all(|s| !r.own.held_shards().contains(s)).then_some(())).await;
    // Their Leases still name this replica, which no longer acts under them; while its
    // member Lease lives nobody else may take them, so it frees them itself.
    for s in &gone {
        assert_eq!(fake.get(&shard_lease_name(*s)).unwrap().spec.unwrap().holder_identity.as_deref(), Some(me.as_str()));
        assert!(r.own.owns_shard(*s).is_none());
    }
    fake.fail_put.lock().unwrap().clear();
    until(secs(5), "the moved shards freed", || gone.iter().all(|s| fake.get(&shard_lease_name(*s)).unwrap().spec.unwrap().holder_identity.is_none()).then_some(())).await;
    assert!(gone.iter().all(|s| !r.own.held_shards().contains(s)), "took a shard the ring gives the peer");
    peer.cancel();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_an_earlier_version_keeps_this_one_out() {
    let fake = Arc::new(Fake::default());
    let old = member_lease_name("old");
    let stop_old = CancellationToken::new();
    {
        let (fake, stop_old, old) = (fake.clone(), stop_old.clone(), old.clone());
        tokio::spawn(async move {
            while !stop_old.is_cancelled() {
                fake.put(older_lease(&old, "member", "old_1", 1));
                tokio::time::sleep(ms(200)).await;
            }
        });
    }
    let t0 = Instant::now();
    let r = start(&fake, "a", config(4, 2, 1500, 200));
    let result = tokio::time::timeout(secs(8), r.task).await.expect("gives up within two lease durations").unwrap();
    let err = result.expect_err("refuses to run alongside it");
    assert!(matches!(err.downcast_ref::<LeaseError>(), Some(LeaseError::OlderVersion { .. })), "{err:#}");
    assert!(t0.elapsed() >= secs(4), "waited two lease durations for it to stop");
    assert!(fake.writes().iter().all(|w| w.name == old), "wrote a Lease: {:?}", fake.writes().iter().map(|w| &w.name).collect::<Vec<_>>());
    stop_old.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_hands_everything_over_and_exits_when_one_of_an_earlier_version_starts() {
    let fake = Arc::new(Fake::default());
    let r = start(&fake, "a", config(4, 2, 1500, 200));
    until(secs(10), "every shard held", || (r.own.held_shards().len() == 4).then_some(())).await;
    let own = r.own.clone();
    fake.put(older_lease(&member_lease_name("old"), "member", "old_1", 1));
    let appeared = Instant::now();
    let result = tokio::time::timeout(secs(5), r.task).await.expect("exits").unwrap();
    assert!(matches!(result.as_ref().err().and_then(|e| e.downcast_ref::<LeaseError>()), Some(LeaseError::OlderVersion { .. })), "{result:?}");
    assert!(appeared.elapsed() < secs(2), "exited {:?} after it appeared", appeared.elapsed());
    assert!((0..4).all(|s| own.owns_shard(s).is_none()) && own.held_shards().is_empty());
    for (s, holder, _) in lease_epochs(&fake, 4) {
        assert_eq!(holder, None, "shard {s} handed over");
    }
    assert!(fake.get(&member_lease_name("a")).is_none(), "left the ring");
}
