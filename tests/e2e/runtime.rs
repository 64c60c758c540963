//! The controller runtime against the real control plane: idle finished workflows are
//! looked at once per resync period, however many reconciles they had.

use std::time::Duration;

use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use shoal::api::workflow::{Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::operator::Operator;
use crate::workflow::{T, wf};

#[tokio::test(flavor = "multi_thread")]
async fn idle_finished_workflows_are_resynced_once_per_period() {
    let client = common::client().await;
    let ops = common::namespace(&client, "rt-ops").await;
    let ns = common::namespace(&client, "rt-idle").await;
    let mut op = Operator::new(&ops, &ns);
    op.extra_args = ["--resync", "2s"].map(String::from).to_vec();
    op.start("r1");
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    // Chains of 4 steps: each workflow is reconciled many times on its way to Completed.
    let n = 10;
    for i in 0..n {
        let steps: Vec<_> = (0..4).map(|s| json!({"stepName": format!("s{s}"), "image": "busybox", "dependsOn": if s == 0 { vec![] } else { vec![format!("s{}", s - 1)] }})).collect();
        api.create(&PostParams::default(), &wf(&format!("w{i}"), json!({"containers": steps}))).await.unwrap();
    }
    eventually(T, "all Completed", || async {
        let l = api.list(&ListParams::default()).await.ok()?;
        l.items.iter().all(|w| w.status.as_ref().and_then(|s| s.workflow_status) == Some(WorkflowPhase::Completed)).then_some(())
    })
    .await;
    // Every result: a finished workflow asks to be looked at again after the resync period
    // (`requeue_after`).
    let reconciles = || async { op.metric_sum_all("controller_runtime_reconcile_total{controller=\"workflow\",").await };
    let busy = reconciles().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let from = reconciles().await;
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let idle = reconciles().await - from;
    eprintln!("{n} finished workflows: {busy} reconciles to get there, {idle} in {window:?} idle with a 2 s resync");
    assert!(busy >= (n * 4) as f64, "each workflow was reconciled several times on the way ({busy})");
    // One per workflow per period, plus one period of slack for timers straddling the window.
    let bound = n as f64 * (window.as_secs_f64() / 2.0 + 1.0);
    assert!(idle <= bound, "{idle} reconciles of {n} idle workflows in {window:?}: more than one per resync period (bound {bound})");
    assert!(idle >= n as f64, "idle workflows are still resynced ({idle})");
    drop(op);
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &ops).await;
}
