//! Quiet Leases, counted from outside: an idle replica writes only its member Lease, once a
//! retry period, however many shards there are. Each run is its own `shoal run` processes at
//! the default Lease settings (lease 15 s, renew deadline 10 s, retry period 2 s), their
//! Leases in a namespace of their own; every Lease write there is one watch event.
//!
//! `SHOAL_LEASE_WINDOW` (seconds, default 24) sets how long each count lasts, and
//! `SHOAL_BIN` runs another build (e.g. an earlier version, to measure it: every number is
//! printed before anything is asserted).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};

use crate::common::{self, eventually};
use crate::ha::replica_of;
use crate::operator::{self, Operator};

/// The default retry period: an idle replica renews its member Lease this often.
const RETRY: Duration = Duration::from_secs(2);
/// The default lease duration: after it, no Lease taken at start can wake a replica.
const LEASE: Duration = Duration::from_secs(15);

fn window() -> Duration {
    Duration::from_secs(std::env::var("SHOAL_LEASE_WINDOW").ok().and_then(|s| s.parse().ok()).unwrap_or(24))
}

/// What one idle fleet wrote.
struct Count {
    what: String,
    replicas: usize,
    window: Duration,
    /// Lease writes seen by the watch, by the replica that made them (a Lease's holder
    /// after the write, or before it for a write that clears or deletes it).
    by_replica: BTreeMap<String, usize>,
    /// What the replicas' `shoal_lease_writes_total` counted over the same window.
    metric: f64,
}

impl Count {
    fn total(&self) -> usize {
        self.by_replica.values().sum()
    }

    fn per_replica_per_second(&self) -> f64 {
        self.total() as f64 / self.replicas as f64 / self.window.as_secs_f64()
    }
}

/// Every Lease write in `ns` over `window`, from a watch that starts at a list's
/// resourceVersion (so none is missed or counted twice).
async fn watch_writes(client: &Client, ns: &str, window: Duration) -> BTreeMap<String, usize> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    let mut holders: BTreeMap<String, String> = list.items.iter().filter_map(|l| Some((l.name_any(), l.spec.as_ref()?.holder_identity.clone()?))).collect();
    let rv = list.metadata.resource_version.unwrap();
    let params = WatchParams::default().timeout(window.as_secs() as u32 + 30);
    let mut stream = api.watch(&params, &rv).await.unwrap().boxed();
    let end = tokio::time::Instant::now() + window;
    let mut by_replica: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            ev = stream.try_next() => ev.expect("the Lease watch failed").expect("the Lease watch ended early"),
            _ = tokio::time::sleep_until(end) => break,
        };
        let (lease, deleted) = match ev {
            WatchEvent::Added(l) | WatchEvent::Modified(l) => (l, false),
            WatchEvent::Deleted(l) => (l, true),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("Lease watch error: {e:?}"),
        };
        let name = lease.name_any();
        let now = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
        let writer = if deleted { holders.remove(&name) } else { now.clone().or_else(|| holders.get(&name).cloned()) };
        if let Some(h) = now.filter(|_| !deleted) {
            holders.insert(name.clone(), h);
        }
        *by_replica.entry(writer.map_or_else(|| format!("? ({name})"), |w| replica_of(&w).to_string())).or_default() += 1;
    }
    by_replica
}

/// Every shard Lease of `ns` held, each by one of `members`, and the leader Lease held.
async fn settled(client: &Client, ns: &str, shards: u32, members: &[String]) -> Option<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let leases = api.list(&ListParams::default()).await.ok()?.items;
    let holder = |l: &Lease| l.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty());
    let held = leases.iter().filter(|l| l.name_any().starts_with("shoal-shard-")).filter_map(holder).filter(|h| members.iter().any(|m| m == replica_of(h))).count();
    let leader = leases.iter().any(|l| l.name_any() == "shoal-leader" && holder(l).is_some());
    let n = members.len() as u32;
    let per: Vec<u32> = members.iter().map(|m| leases.iter().filter(|l| l.name_any().starts_with("shoal-shard-")).filter_map(holder).filter(|h| replica_of(h) == m).count() as u32).collect();
    (held == shards as usize && leader && per.iter().all(|c| *c == shards / n || *c == shards.div_ceil(n))).then_some(())
}

async fn metric_writes(fleet: &Operator) -> f64 {
    fleet.metric_sum_all("shoal_lease_writes_total{").await
}

/// Start `replicas` replicas with `--shards shards` (every other setting the default), wait
/// until the ring has settled and a lease duration more, then count their Lease writes.
async fn idle_fleet(client: &Client, what: &str, shards: u32, replicas: usize) -> Count {
    let ops_ns = common::namespace(client, &format!("lw-{what}")).await;
    let work_ns = common::namespace(client, &format!("lw-{what}-work")).await;
    let mut fleet = Operator::new(&ops_ns, &work_ns);
    fleet.extra_args = vec!["--shards".into(), shards.to_string()];
    let names: Vec<String> = (1..=replicas).map(|i| format!("r{i}")).collect();
    for n in &names {
        fleet.start(n);
    }
    eventually(Duration::from_secs(120), &format!("{what}: every shard held, balanced, and a leader"), || settled(client, &ops_ns, shards, &names)).await;
    // Every Lease taken at start has been unchanged for a lease duration by now, so nothing
    // is left that could wake a replica early; and the metrics endpoints are up.
    tokio::time::sleep(LEASE + RETRY).await;
    for r in &fleet.replicas {
        eventually(Duration::from_secs(10), "metrics", || operator::metrics_page(r.metrics_port)).await;
    }
    let window = window();
    let before = metric_writes(&fleet).await;
    let t0 = Instant::now();
    let by_replica = watch_writes(client, &ops_ns, window).await;
    let metric = metric_writes(&fleet).await - before;
    let window = window.max(t0.elapsed().min(window + Duration::from_millis(500)));
    assert!(settled(client, &ops_ns, shards, &names).await.is_some(), "{what}: the ring moved while idle");
    drop(fleet);
    common::cleanup(client, &work_ns).await;
    common::cleanup(client, &ops_ns).await;
    Count { what: what.into(), replicas, window, by_replica, metric }
}

/// At the default Lease settings an idle replica writes at most one Lease a second (its
/// member Lease every retry period: 0.5 a second), whatever `--shards` says, and its
/// `shoal_lease_writes_total` counts exactly what the API server saw.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_replica_writes_at_most_one_lease_a_second_whatever_the_shard_count() {
    // Not heavy itself, but a tick that an overloaded API server stretches past the retry
    // period writes less often: counted while no heavy test runs, the counts compare.
    let _turn = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let (few, many, three) = tokio::join!(idle_fleet(&client, "s8", 8, 1), idle_fleet(&client, "s64", 64, 1), idle_fleet(&client, "r3", 32, 3));
    for c in [&few, &many, &three] {
        eprintln!(
            "idle Lease writes, {}: {} in {:.1}s by {} replica(s) = {:.2} per second per replica; by replica {:?}; shoal_lease_writes_total +{}",
            c.what,
            c.total(),
            c.window.as_secs_f64(),
            c.replicas,
            c.per_replica_per_second(),
            c.by_replica,
            c.metric
        );
    }
    for c in [&few, &many, &three] {
        assert!(c.per_replica_per_second() <= 1.0, "{}: {:.2} Lease writes a second per replica", c.what, c.per_replica_per_second());
        assert_eq!(c.by_replica.len(), c.replicas, "{}: every replica writes (its member Lease), and nothing else does: {:?}", c.what, c.by_replica);
        // The scrapes and the watch start and end a few milliseconds apart.
        assert!((c.metric - c.total() as f64).abs() <= c.replicas as f64, "{}: the metric counted {} writes, the API server {}", c.what, c.metric, c.total());
    }
    assert!(few.total().abs_diff(many.total()) <= 2, "8 shards: {} writes, 64 shards: {}", few.total(), many.total());
    // By construction at most one member renewal a retry period (fewer only if a tick takes
    // longer than that), and nothing else.
    let most = (window().as_secs_f64() / RETRY.as_secs_f64()).round() as usize + 1;
    for c in [&few, &many, &three] {
        for (r, n) in &c.by_replica {
            assert!(*n <= most, "{}: {r} wrote {n} times in {:.1}s, more than one a retry period", c.what, c.window.as_secs_f64());
        }
    }
}
