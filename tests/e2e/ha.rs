//! The HA core against the real control plane, each replica a separate `shoal run` process:
//! ownership by shard with an action log, memory share, graceful handover, crash failover
//! (5 trials), a paused (stale) replica, and a joining replica.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shoal::ha::ActionRecord;

use crate::common::{self, eventually};
use crate::operator::{self, Operator};

const SHARDS: u32 = 32;
const LEASE: Duration = Duration::from_secs(5);

fn signal(op: &Operator, name: &str, sig: Signal) {
    kill(Pid::from_raw(op.pid(name)), sig).unwrap();
}

fn live(op: &Operator) -> Vec<String> {
    op.replicas.iter().map(|r| r.name.clone()).collect()
}

/// shard -> holder, from the shard Leases.
async fn holders(client: &Client, ns: &str) -> BTreeMap<u32, String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let mut out = BTreeMap::new();
    for l in api.list(&ListParams::default().labels("shoal.dev/lease-role=shard")).await.unwrap().items {
        let shard: u32 = l.name_any().trim_start_matches("shoal-shard-").parse().unwrap();
        if let Some(h) = l.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty()) {
            out.insert(shard, h);
        }
    }
    out
}

/// Every shard held, only by `members`, each holding floor or ceil of S/N.
async fn balanced(client: &Client, ns: &str, members: &[String]) -> Option<BTreeMap<u32, String>> {
    let h = holders(client, ns).await;
    if h.len() != SHARDS as usize || h.values().any(|x| !members.contains(x)) {
        return None;
    }
    let n = members.len() as u32;
    let ok = members.iter().all(|m| {
        let c = h.values().filter(|x| *x == m).count() as u32;
        c == SHARDS / n || c == SHARDS.div_ceil(n)
    });
    ok.then_some(h)
}

/// The shards `name` holds.
fn held_by(h: &BTreeMap<u32, String>, name: &str) -> Vec<u32> {
    h.iter().filter(|(_, x)| *x == name).map(|(s, _)| *s).collect()
}

/// Start replica `name` and wait until the ring is balanced over every live replica.
async fn start_balanced(fleet: &mut Operator, client: &Client, ns: &str, name: &str, what: &str) -> BTreeMap<u32, String> {
    fleet.start(name);
    let members = live(fleet);
    eventually(Duration::from_secs(60), what, || balanced(client, ns, &members)).await
}

/// Wait until replicas other than `from` hold every one of `shards`; the time since `t0`.
async fn handed_over(client: &Client, ns: &str, shards: &[u32], from: &str, t0: Instant, timeout: Duration, what: &str) -> Duration {
    eventually(timeout, what, || async {
        let h = holders(client, ns).await;
        shards.iter().all(|s| h.get(s).is_some_and(|x| x != from)).then(|| t0.elapsed())
    })
    .await
}

fn read_actions(dir: &Path) -> Vec<ActionRecord> {
    let mut out: Vec<ActionRecord> = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "actions") {
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                out.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    out.sort_by_key(|r| (r.ts_ms, r.transitions));
    out
}

async fn cache_size(port: u16) -> Option<i64> {
    operator::metric(port, "shoal_cache_objects{kind=\"Workflow\"}").await.map(|v| v as i64)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_shards_with_fencing() {
    let _turn = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let ops_ns = common::namespace(&client, "ha-ops").await;
    let work_ns = common::namespace(&client, "ha-work").await;
    let mut fleet = Operator::new(&ops_ns, &work_ns);
    fleet.extra_args = ["--shards", "32", "--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s", "--resync", "1s"].map(String::from).to_vec();
    let dir = fleet.dir.clone();

    // 300 workflows, created before any replica runs.
    let wfs: Api<shoal::api::Workflow> = Api::namespaced(client.clone(), &work_ns);
    let creates = (0..300).map(|i| {
        let wfs = wfs.clone();
        async move {
            let wf: shoal::api::Workflow = serde_json::from_value(json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": format!("wf-{i:03}")},
                "spec": {"containers": [{"stepName": "a", "image": "busybox"}]}
            }))
            .unwrap();
            wfs.create(&PostParams::default(), &wf).await.unwrap();
        }
    });
    futures::future::join_all(creates).await;

    for r in ["r1", "r2", "r3"] {
        fleet.start(r);
    }
    let members = live(&fleet);
    eventually(Duration::from_secs(60), "3 replicas holding 10 or 11 shards each", || balanced(&client, &ops_ns, &members)).await;
    eventually(Duration::from_secs(60), "all 300 workflows labelled and Started", || async {
        let l = wfs.list(&ListParams::default()).await.ok()?;
        let done = l.items.iter().filter(|w| w.labels().contains_key("shoal.dev/shard") && w.status.as_ref().and_then(|s| s.workflow_status).is_some()).count();
        (done == 300).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Memory share: each replica caches only its shards' objects.
    let mut sizes = Vec::new();
    for r in &fleet.replicas {
        sizes.push(eventually(Duration::from_secs(10), "cache metric", || cache_size(r.metrics_port)).await);
    }
    eprintln!("cache sizes with 3 replicas: {sizes:?} (of 300)");
    assert_eq!(sizes.iter().sum::<i64>(), 300, "the caches partition the objects: {sizes:?}");
    assert!(sizes.iter().all(|&s| (50..=150).contains(&s)), "each replica caches about 1/3: {sizes:?}");

    // Graceful: SIGTERM hands every shard over in under 2 s.
    let victim = "r3";
    let its = held_by(&holders(&client, &ops_ns).await, victim);
    let t0 = Instant::now();
    signal(&fleet, victim, Signal::SIGTERM);
    let took = handed_over(&client, &ops_ns, &its, victim, t0, Duration::from_secs(10), "graceful handover").await;
    fleet.reap(victim);
    eprintln!("graceful handover of {} shards: {:.2}s", its.len(), took.as_secs_f64());
    assert!(took < Duration::from_secs(2), "graceful handover took {took:?}");

    // Crash: kill -9, five trials; the others hold every shard within lease + 2 s.
    let mut next = 4;
    let mut trials = Vec::new();
    for _ in 0..5 {
        let name = format!("r{next}");
        next += 1;
        let h = start_balanced(&mut fleet, &client, &ops_ns, &name, "balanced ring before the crash").await;
        let its = held_by(&h, &name);
        let t0 = Instant::now();
        signal(&fleet, &name, Signal::SIGKILL);
        fleet.reap(&name);
        let took = handed_over(&client, &ops_ns, &its, &name, t0, Duration::from_secs(30), "crash failover").await;
        trials.push(took.as_secs_f64());
        assert!(took <= LEASE + Duration::from_secs(2), "crash failover took {took:?}");
    }
    let p50 = percentile(&mut trials.clone(), 0.5);
    let max = trials.iter().cloned().fold(0.0, f64::max);
    eprintln!("crash failover over {} trials (lease 5s): p50 {p50:.2}s, max {max:.2}s, all {trials:?}", trials.len());

    // Pause: SIGSTOP past the lease, let the others take over, SIGCONT. The stale replica
    // must not act on what it no longer owns.
    let name = format!("r{next}");
    next += 1;
    let h = start_balanced(&mut fleet, &client, &ops_ns, &name, "balanced ring before the pause").await;
    let its = held_by(&h, &name);
    signal(&fleet, &name, Signal::SIGSTOP);
    handed_over(&client, &ops_ns, &its, &name, Instant::now(), Duration::from_secs(30), "others hold the paused replica's shards").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    signal(&fleet, &name, Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Join: a new replica takes its share and nothing is acted on twice at once.
    let joiner = format!("r{next}");
    start_balanced(&mut fleet, &client, &ops_ns, &joiner, "balanced ring after the join").await;
    assert!(holders(&client, &ops_ns).await.values().any(|h| *h == joiner), "the joiner holds shards");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The action log.
    let actions = read_actions(&dir);
    assert!(actions.len() > 1000, "expected a busy action log, got {}", actions.len());
    let uid_shard: HashMap<String, u32> = wfs.list(&ListParams::default()).await.unwrap().items.iter().map(|w| (w.uid().unwrap(), w.labels()["shoal.dev/shard"].parse().unwrap())).collect();
    let mut epoch_owner: HashMap<(u32, i32), String> = HashMap::new();
    let mut last_epoch: HashMap<u32, (i32, String, i64)> = HashMap::new();
    let mut reconciled: HashSet<String> = HashSet::new();
    for a in &actions {
        let label = uid_shard[&a.uid];
        assert_eq!(a.shard, label, "{a:?} acted under a shard that is not the object's");
        assert_eq!(a.shard, shoal::core::shard::shard_of(&a.uid, SHARDS), "label is FNV-1a of the UID");
        let owner = epoch_owner.entry((a.shard, a.transitions)).or_insert_with(|| a.replica.clone());
        assert_eq!(owner, &a.replica, "two replicas acted under the same shard epoch: {a:?}");
        if let Some((e, who, ts)) = last_epoch.get(&a.shard) {
            assert!(a.transitions >= *e, "stale action: {a:?} after {who} acted under epoch {e} at {ts}");
        }
        last_epoch.insert(a.shard, (a.transitions, a.replica.clone(), a.ts_ms));
        reconciled.insert(a.uid.clone());
    }
    assert_eq!(reconciled.len(), 300, "every object was reconciled");
    let stale: Vec<_> = actions.iter().filter(|a| a.replica == name && a.ts_ms >= resumed_ms && its.contains(&a.shard)).collect();
    let lost_epochs: Vec<_> = stale.iter().filter(|a| h.get(&a.shard) == Some(&name)).collect();
    assert!(lost_epochs.iter().all(|a| actions.iter().any(|b| b.replica == name && b.shard == a.shard && b.transitions == a.transitions && b.ts_ms >= resumed_ms)), "sanity");
    for a in &stale {
        let before_pause = actions.iter().filter(|b| b.replica == name && b.shard == a.shard && b.ts_ms < resumed_ms).map(|b| b.transitions).max();
        assert!(before_pause.is_none_or(|e| a.transitions > e), "paused replica acted under its old epoch after resuming: {a:?}");
    }
    eprintln!("action log: {} actions by {} replicas, {} shard epochs, no overlap", actions.len(), actions.iter().map(|a| &a.replica).collect::<HashSet<_>>().len(), epoch_owner.len());
    drop(fleet);
    common::cleanup(&client, &work_ns).await;
    common::cleanup(&client, &ops_ns).await;
}
