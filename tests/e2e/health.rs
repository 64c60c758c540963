//! `/readyz` means ready: the member Lease is held and the caches of the shards held have
//! synced.

use std::time::Duration;

use crate::common::{self, eventually};
use crate::operator::{self, Operator};

#[tokio::test(flavor = "multi_thread")]
async fn readyz_waits_for_the_member_lease_and_synced_caches() {
    let client = common::client().await;
    let ops = common::namespace(&client, "ready-ops").await;
    let work = common::namespace(&client, "ready").await;
    let mut op = Operator::new(&ops, &work);
    op.extra_args = ["--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"].map(String::from).to_vec();
    op.start("a");
    let a = op.replicas[0].metrics_port;
    eventually(Duration::from_secs(60), "a ready", || async { (operator::http_get(a, "/readyz").await?.0 == 200).then_some(()) }).await;
    assert!(op.metric_sum("shoal_shards_owned").await > 0.0, "ready with its shards");

    // A second process with the same identity cannot take the member Lease while `a` renews
    // it: it is alive (/healthz) but never ready, and then it gives up.
    op.start_with("twin", "a", &[]);
    let twin = op.replicas[1].metrics_port;
    let (code, body) = eventually(Duration::from_secs(30), "the twin serving HTTP", || operator::http_get(twin, "/readyz")).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not registered"), "{body}");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some((code, body)) = operator::http_get(twin, "/readyz").await {
            assert_eq!(code, 503, "the twin never becomes ready: {body}");
        }
    }
    assert_eq!(operator::http_get(twin, "/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(operator::http_get(a, "/readyz").await.map(|r| r.0), Some(200));
    drop(op);
    common::cleanup(&client, &work).await;
    common::cleanup(&client, &ops).await;
}
