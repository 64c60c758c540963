//! The Helm chart renders (with the CRDs from crds/) and the API server accepts every object
//! it renders.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::common;

fn helm_template(ns: &str, set: &[&str]) -> String {
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("helm/shoal");
    let mut cmd = Command::new(common::bin_dir().join("helm"));
    cmd.args(["template", "shoal"]).arg(&chart).args(["--namespace", ns, "--include-crds"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm (built by tests/cluster/build.sh)");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_renders_and_the_api_server_accepts_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "helm").await;
    let rendered = helm_template(&ns, &["replicaCount=3", "shards=64"]);
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&rendered).map(|d| serde_json::Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(), 6, "the chart carries every CRD: {kinds:?}");
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["spec"]["replicas"], 3);
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    let get = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
    assert_eq!(get("SHOAL_SHARDS").unwrap()["value"], "64");
    assert_eq!(get("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert!(rendered.contains("coordination.k8s.io"), "Lease permissions");

    // Every non-CRD object passes the real API server's validation (server-side dry run).
    let objects: String = docs.iter().filter(|d| d["kind"] != "CustomResourceDefinition").map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap())).collect();
    let mut kubectl = Command::new(common::bin_dir().join("kubectl"))
        .args(["apply", "--dry-run=server", "-n", &ns, "-f", "-"])
        .env("KUBECONFIG", common::kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kubectl.stdin.take().unwrap().write_all(objects.as_bytes()).unwrap();
    let out = kubectl.wait_with_output().unwrap();
    assert!(out.status.success(), "API server rejected the chart: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployment.apps/shoal-shoal created (server dry run)"), "{}", String::from_utf8_lossy(&out.stdout));

    // One replica: no PodDisruptionBudget (it would block every eviction).
    assert!(!helm_template(&ns, &["replicaCount=1"]).contains("kind: PodDisruptionBudget"));
    common::cleanup(&client, &ns).await;
}
