//! Every sample in examples/ is accepted by the API server as it is, and `kubectl get shoal`
//! lists every kind. ActionPlugin is cluster-scoped: its sample is created under a name of
//! this test's own (the cluster is shared) and deleted at the end.

use std::path::PathBuf;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use serde::Deserialize;

use crate::common;

#[tokio::test(flavor = "multi_thread")]
async fn every_example_is_accepted_and_kubectl_get_shoal_lists_every_kind() {
    let client = common::client().await;
    let ns = common::namespace(&client, "examples").await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    let mut kinds = std::collections::BTreeSet::new();
    let mut created = 0;
    let mut cluster_scoped = DeleteOnDrop(vec![]);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            let api_version = value["apiVersion"].as_str().unwrap_or_default();
            if api_version != "shoal.dev/v1alpha1" {
                // Namespaces and workloads that the samples set up around the shoal objects.
                continue;
            }
            let kind = value["kind"].as_str().unwrap().to_string();
            let mut obj: DynamicObject = serde_json::from_value(value).unwrap();
            obj.metadata.namespace = None;
            let api = if kind == "ActionPlugin" {
                let name = format!("{}-{ns}", obj.metadata.name.as_deref().unwrap());
                obj.metadata.name = Some(name.clone());
                cluster_scoped.0.push(name);
                action_plugins(&client)
            } else {
                common::shoal_api(&client, &ns, &kind)
            };
            api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("{} ({kind}) rejected: {e}", file.display()));
            kinds.insert(kind);
            created += 1;
        }
    }
    let all: std::collections::BTreeSet<String> = ["ActionPlugin", "Activity", "ActivityWorker", "Ignitor", "NamespaceManager", "Task", "Workflow"].iter().map(|s| s.to_string()).collect();
    assert_eq!(kinds, all, "examples/ must hold at least one sample per kind");
    assert!(created >= all.len());
    // The `shoal` category covers every kind. With `-n`, kubectl lists the namespaced kinds of
    // that namespace and the cluster-scoped ones (ActionPlugins) of the whole cluster.
    let out = std::process::Command::new(common::bin_dir().join("kubectl")).args(["get", "shoal", "-n", &ns, "-o", "name"]).env("KUBECONFIG", common::kubeconfig()).output().expect("running kubectl");
    assert!(out.status.success(), "kubectl get shoal failed: {}", String::from_utf8_lossy(&out.stderr));
    let listed: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_once('/')).map(|(kind, _)| kind.to_string()).collect();
    let want: std::collections::BTreeSet<String> = all.iter().map(|k| format!("{}.shoal.dev", k.to_lowercase())).collect();
    assert_eq!(listed, want, "kubectl get shoal lists every kind");
    for name in &cluster_scoped.0 {
        assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l == format!("actionplugin.shoal.dev/{name}")), "{name} not listed");
        action_plugins(&client).delete(name, &DeleteParams::default()).await.unwrap();
    }
    common::cleanup(&client, &ns).await;
}

/// ActionPlugins, cluster-scoped.
fn action_plugins(client: &kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("shoal.dev", "v1alpha1", "ActionPlugin"), "actionplugins");
    Api::all_with(client.clone(), &ar)
}

/// Deletes the ActionPlugins created, also when the test fails (a namespace's deletion does
/// not reach them).
struct DeleteOnDrop(Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::process::Command::new(common::bin_dir().join("kubectl"))
                .args(["delete", "actionplugin", name, "--ignore-not-found", "--wait=false"])
                .env("KUBECONFIG", common::kubeconfig())
                .output();
        }
    }
}
