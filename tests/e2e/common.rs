//! Shared fixtures: one local control plane for the whole test binary, and a fresh,
//! labelled namespace per test.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::core::GroupVersionKind;

/// Kubeconfig of the shared cluster: `SHOAL_TEST_KUBECONFIG` (set by `make test`), or a
/// cluster this binary starts once in `target/shoal-test-cluster` and leaves running for the
/// next run (stop it with `shoal dev down --dir target/shoal-test-cluster`).
pub fn kubeconfig() -> PathBuf {
    static KC: OnceLock<PathBuf> = OnceLock::new();
    KC.get_or_init(|| {
        if let Some(kc) = std::env::var_os("SHOAL_TEST_KUBECONFIG") {
            return PathBuf::from(kc);
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/shoal-test-cluster");
        // The cluster outlives any one test's runtime, so start it on a runtime of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(shoal::dev::up(&shoal::dev::UpOptions::new(dir))).expect("starting the local control plane")
        })
        .join()
        .expect("cluster start thread")
        .kubeconfig
    })
    .clone()
}

/// Directory of the control-plane binaries (for kubectl).
pub fn bin_dir() -> PathBuf {
    shoal::dev::bin_dir()
}

pub async fn client() -> Client {
    shoal::dev::client_from(&kubeconfig()).await.expect("client for the test cluster")
}

/// Create a fresh namespace `<prefix>-<random>` labelled `shoal.dev/test=true`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let suffix: u32 = rand_u32();
    let name = format!("{prefix}-{suffix:08x}");
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"shoal.dev/test": "true"}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &ns).await.expect("creating test namespace");
    name
}

/// Delete a test namespace (best effort; the cluster is thrown away after the run anyway).
pub async fn cleanup(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::background()).await;
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish() as u32
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tests that load the whole machine (many replicas, a thousand Jobs) take turns, so that
/// their timing bounds measure shoal and not each other.
pub static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// An untyped API for a shoal kind in `ns`, for objects the typed structs cannot hold
/// (invalid ones, or samples read from YAML).
pub fn shoal_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let plural = match kind {
        "Activity" => "activities".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("shoal.dev", "v1alpha1", kind), &plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Each test fn named, once with each executor: `mod job { async fn t() { super::t("Job") } }`
/// and `mod pod { … super::t("Pod") … }`, so that the same assertions run with the step
/// attempts as Jobs and as bare pods.
macro_rules! in_both_executors {
    ($($test:ident),* $(,)?) => {
        mod job {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test("Job").await
                }
            )*
        }
        mod pod {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test("Pod").await
                }
            )*
        }
    };
}
