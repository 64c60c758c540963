//! The shard label is only a watch selector: ownership comes from the UID. Against the real
//! control plane, each replica a separate `shoal run` process: labels edited by hand, copied
//! in at creation, and left out of range or wrong by a change of `--shards` are corrected to
//! the shard of the UID, every object is reconciled, and every action on an object was taken
//! under the shard of its UID, each shard epoch by one replica.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shoal::api::workflow::{Workflow, WorkflowPhase};
use shoal::core::shard::shard_of;
use shoal::ha::ActionRecord;

use crate::common::{self, eventually};
use crate::operator::Operator;

const LABEL: &str = "shoal.dev/shard";
const T: Duration = Duration::from_secs(120);

fn args(shards: u32, resync: &str) -> Vec<String> {
    ["--shards", &shards.to_string(), "--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s", "--resync", resync].map(String::from).to_vec()
}

/// A one-step workflow whose pod runs for `delay`, labelled `label` at creation if given.
fn workflow(name: &str, label: Option<&str>, delay: &str) -> Workflow {
    let labels: BTreeMap<&str, &str> = label.map(|l| (LABEL, l)).into_iter().collect();
    serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"stepName": "a", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": delay}}}]}
    }))
    .unwrap()
}

async fn create_all(api: &Api<Workflow>, wfs: Vec<Workflow>) {
    let pp = PostParams::default();
    for r in futures::future::join_all(wfs.iter().map(|w| api.create(&pp, w))).await {
        r.unwrap();
    }
}

fn label(w: &Workflow) -> Option<&str> {
    w.labels().get(LABEL).map(String::as_str)
}

fn phase(w: &Workflow) -> Option<WorkflowPhase> {
    w.status.as_ref()?.workflow_status
}

fn home(w: &Workflow, shards: u32) -> u32 {
    shard_of(&w.uid().unwrap(), shards)
}

async fn set_label(api: &Api<Workflow>, name: &str, value: &str) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {LABEL: value}}}))).await.unwrap();
}

/// shard -> holder, for the shards below `shards`.
async fn holders(client: &Client, ns: &str, shards: u32) -> BTreeMap<u32, String> {
    crate::ha::holders(client, ns).await.into_iter().filter(|(s, _)| *s < shards).collect()
}

/// Every shard held, each of `members` holding some.
async fn spread(client: &Client, ns: &str, shards: u32, members: &[&str]) -> Option<BTreeMap<u32, String>> {
    let h = holders(client, ns, shards).await;
    let full = h.len() == shards as usize && h.values().all(|x| members.contains(&x.as_str()));
    (full && members.iter().all(|m| h.values().any(|x| x == m))).then_some(h)
}

/// Wait until every workflow is labelled with the shard of its UID and is in `done` (or
/// later, for a phase predicate); returns them.
async fn settled(api: &Api<Workflow>, shards: u32, n: usize, what: &str, done: impl Fn(&Workflow) -> bool) -> Vec<Workflow> {
    eventually(T, what, || async {
        let l = api.list(&ListParams::default()).await.ok()?.items;
        (l.len() == n && l.iter().all(|w| label(w) == Some(&home(w, shards).to_string()) && done(w))).then_some(l)
    })
    .await
}

/// Every action was taken under the shard of its object's UID (out of `shards`), and every
/// (shard, transitions) epoch by one replica. Returns the number of epochs.
fn check_actions(actions: &[&ActionRecord], shards: u32) -> usize {
    let mut epoch_owner: HashMap<(u32, i32), &str> = HashMap::new();
    for a in actions {
        assert_eq!(a.shard, shard_of(&a.uid, shards), "acted under a shard that is not the one of the UID: {a:?}");
        let owner = epoch_owner.entry((a.shard, a.transitions)).or_insert(&a.replica);
        assert_eq!(*owner, a.replica, "two replicas acted under the same shard epoch: {a:?}");
    }
    epoch_owner.len()
}

/// The shard label of each Job of the workflows in `ns`, by workflow name.
async fn job_labels(client: &Client, ns: &str) -> Vec<(String, String)> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.list(&ListParams::default()).await.unwrap().items.iter().map(|j| (j.labels()["shoal.dev/workflow"].clone(), j.labels().get(LABEL).cloned().unwrap_or_default())).collect()
}

/// The Jobs whose shard label is not `homes[their workflow]`.
async fn misplaced_jobs(client: &Client, ns: &str, homes: &HashMap<String, u32>) -> usize {
    job_labels(client, ns).await.iter().filter(|(wf, l)| *l != homes[wf].to_string()).count()
}

/// Wait until every Job carries the shard of its workflow's UID.
async fn jobs_settled(client: &Client, ns: &str, homes: &HashMap<String, u32>, what: &str) {
    eventually(T, what, || async { (misplaced_jobs(client, ns, homes).await == 0).then_some(()) }).await
}

/// (workflow, generation) of each Job in `ns`.
async fn job_generations(client: &Client, ns: &str) -> Vec<(String, String)> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.list(&ListParams::default()).await.unwrap().items.iter().map(|j| (j.labels()["shoal.dev/workflow"].clone(), j.labels()["shoal.dev/generation"].clone())).collect()
}

async fn relabelled(fleet: &Operator, reason: &str) -> f64 {
    fleet.metric_sum(&format!("shoal_objects_relabelled_total{{reason=\"{reason}\"}}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_and_copied_labels_are_corrected_and_never_obeyed() {
    const S: u32 = 8;
    let _turn = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let ops_ns = common::namespace(&client, "shard-ops").await;
    let work_ns = common::namespace(&client, "shard-edit").await;
    let mut fleet = Operator::new(&ops_ns, &work_ns);
    fleet.extra_args = args(S, "1s");
    fleet.start("r1");
    fleet.start("r2");
    let held = eventually(Duration::from_secs(60), "r1 and r2 sharing the 8 shards", || spread(&client, &ops_ns, S, &["r1", "r2"])).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &work_ns);

    // 40 plain workflows whose step runs 8 s, so that the edits below land while they run;
    // and 9 whose label was copied in at creation: in range (wrong unless by chance), out of
    // range, and not a shard number as the watches spell it.
    let mut wfs: Vec<Workflow> = (0..40).map(|i| workflow(&format!("wf-{i:02}"), None, "8s")).collect();
    let copied = ["0", "1", "2", "3", "5", "7", "8", "1000", "03"];
    wfs.extend(copied.iter().enumerate().map(|(i, l)| workflow(&format!("copied-{i}"), Some(l), "500ms")));
    create_all(&api, wfs).await;
    let n = 40 + copied.len();
    let all = settled(&api, S, n, "every workflow labelled with the shard of its UID and started", |w| phase(w).is_some()).await;
    let uid_home: HashMap<String, u32> = all.iter().map(|w| (w.uid().unwrap(), home(w, S))).collect();
    let copied_wrong = all
        .iter()
        .filter(|w| w.name_any().starts_with("copied-"))
        .filter(|w| {
            let i: usize = w.name_any()["copied-".len()..].parse().unwrap();
            copied[i] != home(w, S).to_string()
        })
        .count();

    // Edit: 12 labels to an in-range shard held by the other replica than the one holding the
    // shard of the UID, 6 out of range or not a shard number.
    let mut edited: HashMap<String, String> = HashMap::new();
    for w in all.iter().filter(|w| w.name_any().starts_with("wf-")).take(12) {
        let h = home(w, S);
        let other = (0..S).find(|s| held[s] != held[&h]).unwrap();
        set_label(&api, &w.name_any(), &other.to_string()).await;
        edited.insert(w.uid().unwrap(), other.to_string());
    }
    for (w, bad) in all.iter().filter(|w| w.name_any().starts_with("wf-")).skip(12).zip(["8", "9", "4096", "x", "007", "shard3"]) {
        set_label(&api, &w.name_any(), bad).await;
        edited.insert(w.uid().unwrap(), bad.to_string());
    }
    let still_running = all.iter().filter(|w| edited.contains_key(&w.uid().unwrap()) && phase(w) != Some(WorkflowPhase::Completed)).count();

    let done = settled(&api, S, n, "every label corrected and every workflow Completed", |w| phase(w) == Some(WorkflowPhase::Completed)).await;
    for w in &done {
        assert_eq!(w.uid().map(|u| uid_home[&u]), Some(home(w, S)));
    }
    // Jobs carry the shard of their workflow's UID; one edited by hand is put back.
    let homes: HashMap<String, u32> = done.iter().map(|w| (w.name_any(), home(w, S))).collect();
    jobs_settled(&client, &work_ns, &homes, "every Job labelled with its workflow's shard").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &work_ns);
    let some_jobs = jobs.list(&ListParams::default()).await.unwrap().items;
    for (j, bad) in some_jobs.iter().zip(["wrong", "wrong", "wrong", "99"]) {
        let h = homes[&j.labels()["shoal.dev/workflow"]];
        let value = if bad == "wrong" { (0..S).find(|s| held[s] != held[&h]).unwrap().to_string() } else { bad.to_string() };
        jobs.patch(&j.name_any(), &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {LABEL: value}}}))).await.unwrap();
    }
    jobs_settled(&client, &work_ns, &homes, "edited Job labels put back").await;
    // Let the 1 s resync reconcile every workflow a few more times before reading the log.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let actions = crate::ha::read_actions(&fleet.dir);
    let all_actions: Vec<&ActionRecord> = actions.iter().collect();
    let epochs = check_actions(&all_actions, S);
    let acted: HashSet<&str> = actions.iter().map(|a| a.uid.as_str()).collect();
    assert!(uid_home.keys().all(|u| acted.contains(u.as_str())), "every workflow was reconciled");
    let on_edited = actions.iter().filter(|a| edited.contains_key(&a.uid)).count();
    let (wrong, out) = (relabelled(&fleet, "wrong").await, relabelled(&fleet, "out_of_range").await);
    let mislabelled = fleet.metric_sum("shoal_objects_mislabelled_total").await;
    eprintln!(
        "{n} workflows, {} labels edited ({still_running} while running), {copied_wrong} of {} copied labels wrong; relabelled: wrong {wrong}, out_of_range {out}; \
         mislabelled seen {mislabelled}; {} actions ({on_edited} on edited objects) over {epochs} shard epochs, each under the shard of the UID and one replica",
        edited.len(),
        copied.len(),
        actions.len()
    );
    assert!(wrong >= 12.0, "the holders of the edited shards relabelled: {wrong}");
    assert!(out >= 6.0 + 3.0, "the leader relabelled the out-of-range labels: {out}");
    drop(fleet);
    common::cleanup(&client, &work_ns).await;
    common::cleanup(&client, &ops_ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_shards_relabels_everything() {
    const OLD: u32 = 16;
    // Not 8: with a divisor of 16, a label below 8 is always still right (h mod 16 < 8 means
    // h mod 8 = h mod 16), so only the out-of-range path would be exercised.
    const NEW: u32 = 12;
    let _turn = common::HEAVY.acquire().await.unwrap();
    let client = common::client().await;
    let ops_ns = common::namespace(&client, "shard-ops").await;
    let work_ns = common::namespace(&client, "shard-change").await;
    let mut fleet = Operator::new(&ops_ns, &work_ns);
    fleet.extra_args = args(OLD, "1s");
    fleet.start("old-1");
    fleet.start("old-2");
    eventually(Duration::from_secs(60), "two replicas holding the 16 shards", || spread(&client, &ops_ns, OLD, &["old-1", "old-2"])).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &work_ns);

    // 32 that finish before the change, 8 still running across it.
    let mut wfs: Vec<Workflow> = (0..32).map(|i| workflow(&format!("done-{i:02}"), None, "500ms")).collect();
    wfs.extend((0..8).map(|i| workflow(&format!("long-{i}"), None, "30s")));
    create_all(&api, wfs).await;
    let before = settled(&api, OLD, 40, "40 workflows labelled for 16 shards, the short ones Completed", |w| {
        phase(w) == Some(if w.name_any().starts_with("long-") { WorkflowPhase::Started } else { WorkflowPhase::Completed })
    })
    .await;
    let changed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    for r in ["old-1", "old-2"] {
        kill(Pid::from_raw(fleet.pid(r)), Signal::SIGTERM).unwrap();
    }
    fleet.reap("old-1");
    fleet.reap("old-2");

    let homes: HashMap<String, u32> = before.iter().map(|w| (w.name_any(), home(w, NEW))).collect();
    let stale_jobs = misplaced_jobs(&client, &work_ns, &homes).await;
    let out_of_range = before.iter().filter(|w| home(w, OLD) >= NEW).count();
    let wrong = before.iter().filter(|w| home(w, OLD) < NEW && home(w, OLD) != home(w, NEW)).count();
    eprintln!("after 16 -> 12 shards: {out_of_range} of 40 labels out of range, {wrong} in range but wrong; {stale_jobs} Jobs not in their workflow's new shard");
    assert!(out_of_range > 0 && wrong > 0 && stale_jobs > 0, "both kinds of stale label are exercised");

    // The default resync (5 min): a workflow running across the change finishes only if its
    // Job's events reach it, that is, if its Job was moved to the workflow's new shard.
    fleet.extra_args = args(NEW, "5m");
    fleet.start("new-1");
    fleet.start("new-2");
    eventually(Duration::from_secs(60), "two replicas holding the 12 shards", || spread(&client, &ops_ns, NEW, &["new-1", "new-2"])).await;
    settled(&api, NEW, 40, "every label moved to the shard of the UID out of 12", |_| true).await;

    jobs_settled(&client, &work_ns, &homes, "every Job moved to the shard of its workflow out of 12").await;

    // After the change: new workflows, and a new spec (generation) for 6 finished ones.
    create_all(&api, (0..10).map(|i| workflow(&format!("new-{i}"), None, "500ms")).collect()).await;
    let bumped: Vec<String> = before.iter().filter(|w| w.name_any().starts_with("done-")).take(6).map(|w| w.name_any()).collect();
    for name in &bumped {
        let spec = json!({"spec": {"containers": [{"stepName": "a", "image": "busybox"}, {"stepName": "b", "image": "busybox", "dependsOn": ["a"]}]}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(spec)).await.unwrap();
    }
    let done = settled(&api, NEW, 50, "every workflow Completed under 12 shards, the new specs observed", |w| {
        let st = w.status.as_ref();
        phase(w) == Some(WorkflowPhase::Completed) && st.and_then(|s| s.observed_generation) == w.metadata.generation
    })
    .await;
    for name in &bumped {
        let w = done.iter().find(|w| &w.name_any() == name).unwrap();
        assert_eq!(w.status.as_ref().unwrap().executed_steps.len(), 2, "{name} ran its new spec");
    }
    eventually(T, "the Jobs of the old specs deleted", || async {
        let jobs = job_generations(&client, &work_ns).await;
        let old = jobs.iter().filter(|(wf, generation)| bumped.contains(wf) && *generation != "2").count();
        (old == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let actions = crate::ha::read_actions(&fleet.dir);
    let (old, new): (Vec<&ActionRecord>, Vec<&ActionRecord>) = actions.iter().partition(|a| a.replica.starts_with("old-"));
    let (last_old, first_new) = (old.iter().map(|a| a.ts_ms).max().unwrap(), new.iter().map(|a| a.ts_ms).min().unwrap());
    assert!(last_old <= changed_at + 5000 && last_old < first_new, "the two fleets never acted at once: {last_old} vs {first_new}");
    let (e_old, e_new) = (check_actions(&old, OLD), check_actions(&new, NEW));
    let acted: HashSet<&str> = new.iter().map(|a| a.uid.as_str()).collect();
    assert!(done.iter().all(|w| acted.contains(w.uid().unwrap().as_str())), "the new replicas reconciled every workflow");
    eprintln!(
        "relabelled by the new replicas: out_of_range {}, wrong {}; actions: {} under 16 shards ({e_old} epochs), {} under 12 ({e_new} epochs); \
         all Jobs moved to their workflow's new shard",
        relabelled(&fleet, "out_of_range").await,
        relabelled(&fleet, "wrong").await,
        old.len(),
        new.len()
    );
    drop(fleet);
    common::cleanup(&client, &work_ns).await;
    common::cleanup(&client, &ops_ns).await;
}
