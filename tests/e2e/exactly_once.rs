//! Exactly once, against the real control plane: a Job belongs to one (workflow UID, step)
//! and is never adopted by name alone; a spec change deletes every Job of the old spec; a
//! workflow that fails fast cancels its running steps; Events follow recorded transitions
//! only.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Client, ResourceExt};
use serde_json::json;
use shoal::api::workflow::{StepPhase, Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::workflow::{T, setup, step, step_of, step_phase, wait_phase, wf};

fn slow(name: &str, deps: &[&str], delay: &str) -> serde_json::Value {
    json!({"stepName": name, "image": "busybox", "dependsOn": deps, "metadata": {"annotations": {"kwok.shoal.dev/delay": delay}}})
}

/// The Jobs whose controller ownerReference is `uid`.
async fn jobs_owned_by(client: &Client, ns: &str, uid: &str) -> Vec<Job> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    jobs.list(&ListParams::default()).await.unwrap().items.into_iter().filter(|j| j.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == uid)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_belongs_to_one_workflow_uid_and_step() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "eo-ident").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);

    // `etl` step `load-daily` and `etl-load` step `daily` used to share a Job name.
    api.create(&PostParams::default(), &wf("etl", json!({"containers": [step("load-daily", &[])]}))).await.unwrap();
    api.create(&PostParams::default(), &wf("etl-load", json!({"containers": [step("daily", &[])]}))).await.unwrap();
    // A workflow name of 253 characters: no label may carry it raw.
    let long = format!("{}.x", "l".repeat(251));
    api.create(&PostParams::default(), &wf(&long, json!({"containers": [step("a", &[])]}))).await.unwrap();
    for name in ["etl", "etl-load", long.as_str()] {
        let w = wait_phase(&api, name, WorkflowPhase::Completed).await;
        let uid = w.uid().unwrap();
        let owned = jobs_owned_by(&client, &ns, &uid).await;
        assert_eq!(owned.len(), 1, "{name}: exactly one Job, its own");
        let st = &w.status.as_ref().unwrap().steps[0];
        assert_eq!(st.job_uid, owned[0].uid(), "{name}: the recorded Job is the one it owns");
        assert_eq!(st.job_name.as_deref(), Some(owned[0].name_any().as_str()));
    }

    // A name taken by a foreign object fails the step and is never adopted. `b` waits on a
    // slow `a`; its Job name is known once the workflow has a UID, and a Job nobody owns is
    // put there first.
    api.create(&PostParams::default(), &wf("squat", json!({"containers": [slow("a", &[], "4s"), step("b", &["a"])]}))).await.unwrap();
    let uid = eventually(T, "squat has a UID", || async { api.get("squat").await.ok()?.uid() }).await;
    let taken = shoal::core::plan::job_name("squat", &uid, 1, "b", 0);
    let squatter: Job = serde_json::from_value(json!({
        "metadata": {"name": taken, "labels": {"squatter": "yes"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap();
    let squatter = jobs.create(&PostParams::default(), &squatter).await.unwrap();
    let w = wait_phase(&api, "squat", WorkflowPhase::Failed).await;
    let b = step_of(&w, "b");
    assert_eq!(b.phase, StepPhase::Failed);
    let msg = b.message.unwrap_or_default();
    assert!(msg.contains("taken by an object this workflow does not own"), "{msg}");
    assert_ne!(b.job_uid, squatter.uid(), "the foreign Job was not adopted");
    let still = jobs.get(&taken).await.unwrap();
    assert_eq!(still.uid(), squatter.uid(), "the foreign Job is left alone");
    assert!(still.owner_references().is_empty(), "and not taken over");

    // Deleted with --cascade=orphan and created again under the same name: the old Job is
    // not the new workflow's.
    api.create(&PostParams::default(), &wf("again", json!({"containers": [slow("a", &[], "120s")]}))).await.unwrap();
    let first = eventually(T, "the first incarnation's Job", || async {
        let w = api.get("again").await.ok()?;
        w.status?.steps.first()?.job_uid.clone()
    })
    .await;
    api.delete("again", &DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..Default::default() }).await.unwrap();
    eventually(T, "the first incarnation gone", || async { api.get_opt("again").await.ok()?.is_none().then_some(()) }).await;
    api.create(&PostParams::default(), &wf("again", json!({"containers": [step("a", &[])]}))).await.unwrap();
    let w = wait_phase(&api, "again", WorkflowPhase::Completed).await;
    let a = step_of(&w, "a");
    assert_ne!(a.job_uid.as_deref(), Some(first.as_str()), "the orphaned Job was adopted");
    assert_eq!(jobs_owned_by(&client, &ns, &w.uid().unwrap()).await.len(), 1);
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_differing_only_in_case_or_separators_are_refused() {
    let client = common::client().await;
    let ns = common::namespace(&client, "eo-names").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    for (a, b) in [("A", "a"), ("load-data", "load_data"), ("V1_2", "v1-2")] {
        let err = api.create(&PostParams::default(), &wf("w", json!({"containers": [step(a, &[]), step(b, &[])]}))).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("step names must differ in more than case"), "{a}/{b}: {msg}");
    }
    api.create(&PostParams::default(), &wf("w", json!({"containers": [step("ab", &[]), step("a-b", &[])]}))).await.unwrap();
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_fast_cancels_running_steps() {
    let client = common::client().await;
    let (ns, _op) = setup(&client, "eo-cancel").await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let bad = json!({"stepName": "bad", "image": "busybox", "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}, "annotations": {"kwok.shoal.dev/delay": "1s"}}});
    api.create(&PostParams::default(), &wf("ff", json!({"containers": [bad, slow("long", &[], "300s"), step("after", &["long"])]}))).await.unwrap();
    let w = wait_phase(&api, "ff", WorkflowPhase::Failed).await;
    let long = step_of(&w, "long");
    assert_eq!(long.phase, StepPhase::Cancelled, "{long:?}");
    assert!(long.message.unwrap_or_default().contains("cancelled"));
    assert!(long.finished_at.is_some());
    assert_eq!(step_phase(&w, "after"), StepPhase::Pending);
    let job = long.job_name.unwrap();
    eventually(T, "the cancelled step's Job deleted", || async { jobs.get_opt(&job).await.ok()?.is_none().then_some(()) }).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually(T, "a StepCancelled Event", || async {
        let l = events.list(&ListParams::default()).await.ok()?;
        l.items.iter().any(|e| e.reason.as_deref() == Some("StepCancelled")).then_some(())
    })
    .await;
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_follow_recorded_transitions_only() {
    let client = common::client().await;
    let ops = common::namespace(&client, "eo-events-ops").await;
    let ns = common::namespace(&client, "eo-events").await;
    let mut op = crate::operator::Operator::new(&ops, &ns);
    op.extra_args = vec!["--step-success-events".into(), "true".into()];
    op.start("r1");
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let steps: Vec<_> = (0..6).map(|i| if i == 0 { slow("s0", &[], "1s") } else { slow(&format!("s{i}"), &[&format!("s{}", i - 1)], "1s") }).collect();
    api.create(&PostParams::default(), &wf("churn", json!({"containers": steps}))).await.unwrap();
    // Meanwhile, change the workflow's metadata every 50 ms, so status patches often meet a
    // newer resourceVersion (409) and the reconcile plans the same transitions again.
    let stop = tokio_util::sync::CancellationToken::new();
    let churn = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let _ = api.patch("churn", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"churn": i.to_string()}}}))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i
        })
    };
    wait_phase(&api, "churn", WorkflowPhase::Completed).await;
    stop.cancel();
    let patches = churn.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let mut per_step: HashMap<String, i32> = HashMap::new();
    for e in events.list(&ListParams::default()).await.unwrap().items {
        if e.reason.as_deref() != Some("StepSucceeded") {
            continue;
        }
        let note = e.note.clone().unwrap_or_default();
        let step = note.split_whitespace().nth(1).unwrap_or_default().to_string();
        *per_step.entry(step).or_default() += e.series.as_ref().map(|s| s.count).unwrap_or(1);
    }
    eprintln!("{patches} metadata patches during the run; StepSucceeded Events per step: {per_step:?}");
    assert_eq!(per_step.len(), 6, "{per_step:?}");
    assert!(per_step.values().all(|&n| n == 1), "one StepSucceeded Event per step: {per_step:?}");
    common::cleanup(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_change_under_a_shard_move_leaves_no_old_job() {
    let client = common::client().await;
    let ops = common::namespace(&client, "eo-spec-ops").await;
    let ns = common::namespace(&client, "eo-spec").await;
    let mut op = crate::operator::Operator::new(&ops, &ns);
    op.extra_args = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"].map(String::from).to_vec();
    op.start("r1");
    op.start("r2");
    // A settled ring first: every shard held, by both replicas, so the owner found below is
    // not in the middle of a rebalance.
    eventually(T, "r1 and r2 sharing the 32 shards", || async {
        let h = crate::ha::holders(&client, &ops).await;
        (h.len() == 32 && ["r1", "r2"].iter().all(|r| h.values().filter(|x| x == r).count() == 16)).then_some(())
    })
    .await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let wide: Vec<_> = (0..6).map(|i| slow(&format!("p{i}"), &[], "300s")).collect();
    api.create(&PostParams::default(), &wf("moving", json!({"containers": wide}))).await.unwrap();
    let uid = eventually(T, "the first Jobs recorded", || async {
        let w = api.get("moving").await.ok()?;
        (w.status.as_ref()?.started_steps.len() == 6).then(|| w.uid())?
    })
    .await;
    // The replica that owns it hands its shards over, and the spec changes at once: the next
    // owner meets the change while its Job cache for the shard may still be filling.
    let shard = shoal::core::shard::shard_of(&uid, 32);
    let holder = eventually(T, "the shard's holder", || async { crate::ha::holders(&client, &ops).await.remove(&shard) }).await;
    let owner = ["r1", "r2"].into_iter().find(|r| holder == *r).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(op.pid(owner)), nix::sys::signal::Signal::SIGTERM).unwrap();
    api.patch("moving", &PatchParams::default(), &Patch::Merge(json!({"spec": {"containers": [step("x", &[])]}}))).await.unwrap();
    let w = wait_phase(&api, "moving", WorkflowPhase::Completed).await;
    assert_eq!(w.status.as_ref().unwrap().executed_steps, vec!["x".to_string()]);
    let old = ListParams::default().labels(&format!("shoal.dev/workflow-uid={uid},shoal.dev/generation=1"));
    eventually(T, "every Job of the old spec deleted", || async {
        let left: Vec<String> = jobs.list(&old).await.ok()?.items.iter().filter(|j| j.metadata.deletion_timestamp.is_none()).map(|j| j.name_any()).collect();
        left.is_empty().then_some(())
    })
    .await;
    let owned = jobs_owned_by(&client, &ns, &uid).await;
    assert!(owned.iter().all(|j| j.labels().get("shoal.dev/generation").map(String::as_str) == Some("2") || j.metadata.deletion_timestamp.is_some()), "only the new spec's Jobs are left");
    drop(op);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}
