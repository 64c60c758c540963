//! The Helm chart renders (with the CRDs from crds/), the API server accepts every object it
//! renders, and the operator's pod passes Pod Security "restricted".

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::common;

/// `helm template RELEASE helm/shoal --namespace NS --include-crds --set …`, as YAML.
pub(crate) fn helm_template(release: &str, ns: &str, set: &[&str]) -> String {
    let args: Vec<&str> = set.iter().flat_map(|s| ["--set", s]).collect();
    try_helm_template(release, ns, &args).unwrap_or_else(|e| panic!("helm template failed: {e}"))
}

/// `helm template RELEASE helm/shoal --namespace NS --include-crds ARGS…`: the YAML, or
/// helm's error output.
pub(crate) fn try_helm_template(release: &str, ns: &str, args: &[&str]) -> Result<String, String> {
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("helm/shoal");
    let out = Command::new(common::bin_dir().join("helm"))
        .args(["template", release])
        .arg(&chart)
        .args(["--namespace", ns, "--include-crds"])
        .args(args)
        .output()
        .expect("running helm (built by tests/cluster/build.sh)");
    if out.status.success() { Ok(String::from_utf8(out.stdout).unwrap()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// The rendered documents, as JSON.
pub(crate) fn render(release: &str, ns: &str, set: &[&str]) -> Vec<Value> {
    parse_yaml(&helm_template(release, ns, set))
}

pub(crate) fn parse_yaml(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

/// `kubectl apply` of `docs` (each names its namespace, or is cluster-scoped).
pub(crate) fn kubectl_apply(docs: &[&Value], extra: &[&str]) -> String {
    let objects: String = docs.iter().map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap())).collect();
    let mut kubectl = Command::new(common::bin_dir().join("kubectl"))
        .arg("apply")
        .args(extra)
        .args(["-f", "-"])
        .env("KUBECONFIG", common::kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kubectl.stdin.take().unwrap().write_all(objects.as_bytes()).unwrap();
    let out = kubectl.wait_with_output().unwrap();
    assert!(out.status.success(), "API server rejected the chart: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().map(|d| d["kind"].as_str().unwrap()).collect()
}

/// Every (kind, name) whose rules mention `resource`.
fn granting<'a>(docs: &'a [Value], resource: &str) -> Vec<(&'a str, &'a str)> {
    docs.iter()
        .filter(|d| d["rules"].as_array().is_some_and(|rules| rules.iter().any(|r| r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == resource)))))
        .map(|d| (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_renders_and_the_api_server_accepts_it() {
    let client = common::client().await;
    let ns = common::namespace(&client, "helm").await;
    let docs = render("shoal", &ns, &["replicaCount=3", "shards=64"]);
    let kinds = kinds(&docs);
    assert_eq!(kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(), shoal::api::crds::all().len(), "the chart carries every CRD: {kinds:?}");
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["spec"]["replicas"], 3);
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    let get = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
    assert_eq!(get("SHOAL_SHARDS").unwrap()["value"], "64");
    assert_eq!(get("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");

    // The chart's CRDs are crds/ exactly.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut committed: Vec<Value> = std::fs::read_dir(&dir).unwrap().flat_map(|e| parse_yaml(&std::fs::read_to_string(e.unwrap().path()).unwrap())).collect();
    let mut rendered: Vec<Value> = docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").cloned().collect();
    let by_name = |v: &Value| v["metadata"]["name"].as_str().unwrap().to_string();
    committed.sort_by_key(by_name);
    rendered.sort_by_key(by_name);
    assert!(committed == rendered, "the chart's CRDs differ from crds/");

    // Cluster-wide: one ClusterRole for the watched objects, the namespaces and the CRD
    // check; the Leases in a Role of the release namespace; nothing the code does not call.
    assert_eq!(granting(&docs, "jobs"), vec![("ClusterRole", "shoal")]);
    assert_eq!(granting(&docs, "leases"), vec![("Role", "shoal-leases")]);
    assert_crd_rule(&docs);
    assert_namespace_manager_rules(&docs, "ClusterRole shoal", ("ClusterRole shoal", &[]));
    assert_activity_rules(&docs, "ClusterRole shoal");
    assert_workflow_rules(&docs, "ClusterRole shoal");
    assert_task_rules(&docs, "ClusterRole shoal", "ClusterRole shoal");
    assert_secrets(&docs, &["ClusterRole shoal"]);
    // People: ActionPlugins are read through view only (only cluster admins write them).
    assert_eq!(granting(&docs, "actionplugins"), vec![("ClusterRole", "shoal-view"), ("ClusterRole", "shoal")]);
    let view = docs.iter().find(|d| d["metadata"]["name"] == "shoal-view").unwrap();
    let plugin_rules: Vec<&Value> = view["rules"].as_array().unwrap().iter().filter(|r| r["resources"] == json!(["actionplugins"])).collect();
    assert_eq!(plugin_rules.len(), 1);
    assert_eq!(plugin_rules[0]["verbs"], json!(["get", "list", "watch"]));
    for absent in ["deployments/scale", "statefulsets/scale", "namespaces/finalize", "configmaps"] {
        assert!(granting(&docs, absent).is_empty(), "{absent}: granted before any controller uses it");
    }

    // Every non-CRD object passes the real API server's validation (server-side dry run).
    let objects: Vec<&Value> = docs.iter().filter(|d| d["kind"] != "CustomResourceDefinition").collect();
    let out = kubectl_apply(&objects, &["--dry-run=server"]);
    assert!(out.contains("deployment.apps/shoal created (server dry run)"), "{out}");

    // watchNamespace: the watched objects' rules in a Role there; the operator's only
    // ClusterRoles are `get` on the shoal CRDs by name, `get` and `delete` on that one
    // namespace, and reading ActionPlugins (cluster-scoped); an ActionPlugin's Secret in the
    // release namespace needs a Role of its own there.
    let work = common::namespace(&client, "helm-work").await;
    let docs = render("shoal", &ns, &[&format!("watchNamespace={work}"), "rbac.aggregateToDefaultRoles=false"]);
    assert_eq!(granting(&docs, "jobs"), vec![("Role", "shoal")]);
    let role = docs.iter().find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "shoal").unwrap();
    assert_eq!(role["metadata"]["namespace"], work.as_str());
    let cluster_roles: Vec<(&str, usize)> = docs.iter().filter(|d| d["kind"] == "ClusterRole").map(|d| (d["metadata"]["name"].as_str().unwrap(), d["rules"].as_array().unwrap().len())).collect();
    assert_eq!(cluster_roles, vec![("shoal-crds", 1), ("shoal-namespace", 1), ("shoal-actionplugins", 1)]);
    assert_crd_rule(&docs);
    assert_namespace_manager_rules(&docs, &format!("Role {work}/shoal"), ("ClusterRole shoal-namespace", &[&work]));
    assert_activity_rules(&docs, &format!("Role {work}/shoal"));
    assert_workflow_rules(&docs, &format!("Role {work}/shoal"));
    assert_task_rules(&docs, &format!("Role {work}/shoal"), "ClusterRole shoal-actionplugins");
    assert_secrets(&docs, &[&format!("Role {ns}/shoal-secrets"), &format!("Role {work}/shoal")]);
    let objects: Vec<&Value> = docs.iter().filter(|d| d["kind"] != "CustomResourceDefinition").collect();
    kubectl_apply(&objects, &["--dry-run=server"]);
    // Watching the release namespace itself: its Role already grants the Secrets there.
    let docs = render("shoal", &ns, &[&format!("watchNamespace={ns}")]);
    assert!(!docs.iter().any(|d| d["metadata"]["name"] == "shoal-secrets"), "a second Role for the Secrets of the watched namespace");
    assert_secrets(&docs, &[&format!("Role {ns}/shoal")]);

    // One replica: no PodDisruptionBudget (it would block every eviction).
    assert!(!helm_template("shoal", &ns, &["replicaCount=1"]).contains("kind: PodDisruptionBudget"));
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &work).await;
}

/// What the operator's ServiceAccount (`shoal`) is granted on `group`/`resource`: for each
/// role bound to it whose rules mention it ("ClusterRole NAME" or "Role NAMESPACE/NAME"),
/// the resourceNames (empty: all) and the verbs, sorted.
fn operator_grants(docs: &[Value], group: &str, resource: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
    let strings = |v: &Value| -> Vec<String> { v.as_array().map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default() };
    // The roles bound to the ServiceAccount, as (kind, namespace of a Role, name).
    let bound: BTreeSet<(String, String, String)> = docs
        .iter()
        .filter(|d| (d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") && d["subjects"].as_array().unwrap().iter().any(|s| s["kind"] == "ServiceAccount" && s["name"] == "shoal"))
        .map(|b| {
            let kind = b["roleRef"]["kind"].as_str().unwrap().to_string();
            let ns = if kind == "Role" { b["metadata"]["namespace"].as_str().unwrap().to_string() } else { String::new() };
            (kind, ns, b["roleRef"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    let mut out: BTreeMap<(String, Vec<String>), BTreeSet<String>> = BTreeMap::new();
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        let kind = d["kind"].as_str().unwrap().to_string();
        let ns = if kind == "Role" { d["metadata"]["namespace"].as_str().unwrap().to_string() } else { String::new() };
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        let role = if kind == "Role" { format!("Role {ns}/{name}") } else { format!("ClusterRole {name}") };
        if !bound.contains(&(kind, ns, name)) {
            continue;
        }
        for r in d["rules"].as_array().unwrap() {
            if strings(&r["apiGroups"]).iter().any(|g| g == group) && strings(&r["resources"]).iter().any(|x| x == resource) {
                let mut names = strings(&r["resourceNames"]);
                names.sort();
                out.entry((role.clone(), names)).or_default().extend(strings(&r["verbs"]));
            }
        }
    }
    out.into_iter().map(|((role, names), verbs)| (role, names, verbs.into_iter().collect())).collect()
}

/// The NamespaceManager controller's rules, exactly: in `role` for the namespaced
/// resources; on namespaces in the ClusterRole and with the resourceNames of `namespaces`.
/// (Its Secrets rule is shared with ActionPlugins: `assert_secrets`.)
fn assert_namespace_manager_rules(docs: &[Value], role: &str, namespaces: (&str, &[&str])) {
    let grant = |role: &str, names: &[&str], verbs: &[&str]| vec![(role.to_string(), names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), verbs.iter().map(|v| v.to_string()).collect::<Vec<_>>())];
    let want = [
        ("shoal.dev", "namespacemanagers", grant(role, &[], &["get", "list", "patch", "watch"])),
        ("shoal.dev", "namespacemanagers/status", grant(role, &[], &["get", "patch"])),
        ("", "pods", grant(role, &[], &["create", "delete", "deletecollection", "get", "list", "patch", "watch"])),
        ("apps", "deployments", grant(role, &[], &["list", "patch"])),
        ("apps", "statefulsets", grant(role, &[], &["list", "patch"])),
        ("events.k8s.io", "events", grant(role, &[], &["create", "patch"])),
        ("", "namespaces", grant(namespaces.0, namespaces.1, &["delete", "get"])),
    ];
    for (group, resource, want) in want {
        assert_eq!(operator_grants(docs, group, resource), want, "the operator's grants on {group}/{resource}");
    }
}

/// The Activity and ActivityWorker controllers' rules, exactly, in `role`: their objects read
/// (and, from the shared rule, listed, watched and shard-labelled), workers created (never
/// deleted: the garbage collector removes them with their Activity), status read and
/// patched, and the workers' Jobs (the rule the Workflow controller's steps use).
fn assert_activity_rules(docs: &[Value], role: &str) {
    let grant = |verbs: &[&str]| vec![(role.to_string(), Vec::<String>::new(), verbs.iter().map(|v| v.to_string()).collect::<Vec<_>>())];
    let want = [
        ("shoal.dev", "activities", grant(&["get", "list", "patch", "watch"])),
        ("shoal.dev", "activityworkers", grant(&["create", "get", "list", "patch", "watch"])),
        ("shoal.dev", "activities/status", grant(&["get", "patch"])),
        ("shoal.dev", "activityworkers/status", grant(&["get", "patch"])),
        ("batch", "jobs", grant(&["create", "delete", "deletecollection", "get", "list", "patch", "watch"])),
    ];
    for (group, resource, want) in want {
        assert_eq!(operator_grants(docs, group, resource), want, "the operator's grants on {group}/{resource}");
    }
    for absent in ["activities/finalizers", "activityworkers/finalizers"] {
        assert!(operator_grants(docs, "shoal.dev", absent).is_empty(), "{absent}: granted, but no ownerReference needs it");
    }
}

/// The Workflow controller's rules on its own kind, exactly, in `role`: workflows listed,
/// watched and shard-labelled, status patched, and a workflow deleted when its ttlStrategy
/// runs out (garbage collection). Its Jobs, pods and Events use the rules checked elsewhere.
fn assert_workflow_rules(docs: &[Value], role: &str) {
    let grant = |verbs: &[&str]| vec![(role.to_string(), Vec::<String>::new(), verbs.iter().map(|v| v.to_string()).collect::<Vec<_>>())];
    assert_eq!(operator_grants(docs, "shoal.dev", "workflows"), grant(&["delete", "list", "patch", "watch"]), "the operator's grants on shoal.dev/workflows");
    assert_eq!(operator_grants(docs, "shoal.dev", "workflows/status"), grant(&["patch"]), "the operator's grants on shoal.dev/workflows/status");
    assert!(operator_grants(docs, "shoal.dev", "workflows/finalizers").is_empty(), "workflows/finalizers: granted, but no ownerReference needs it");
}

/// The Task and Ignitor controllers' rules, exactly: their objects read (and, from the shared
/// rule, listed, watched and shard-labelled) and their status patched, in `role`;
/// ActionPlugins (cluster-scoped) read in the ClusterRole `plugins`. Their runs' Jobs, pods
/// and Events use the rules checked above.
fn assert_task_rules(docs: &[Value], role: &str, plugins: &str) {
    let grant = |role: &str, verbs: &[&str]| vec![(role.to_string(), Vec::<String>::new(), verbs.iter().map(|v| v.to_string()).collect::<Vec<_>>())];
    let want = [
        ("tasks", grant(role, &["get", "list", "patch", "watch"])),
        ("ignitors", grant(role, &["get", "list", "patch", "watch"])),
        ("tasks/status", grant(role, &["patch"])),
        ("ignitors/status", grant(role, &["patch"])),
        ("actionplugins", grant(plugins, &["get", "list", "watch"])),
    ];
    for (resource, want) in want {
        assert_eq!(operator_grants(docs, "shoal.dev", resource), want, "the operator's grants on shoal.dev/{resource}");
    }
    for absent in ["tasks/finalizers", "ignitors/finalizers", "actionplugins/status"] {
        assert!(operator_grants(docs, "shoal.dev", absent).is_empty(), "{absent}: granted, but nothing calls it");
    }
}

/// `get` on Secrets, and nothing else on them, in exactly `roles`: a NamespaceManager's
/// webhook secret in the watched namespaces, an ActionPlugin's in the release namespace.
fn assert_secrets(docs: &[Value], roles: &[&str]) {
    let mut want: Vec<(String, Vec<String>, Vec<String>)> = roles.iter().map(|r| (r.to_string(), vec![], vec!["get".to_string()])).collect();
    want.sort();
    assert_eq!(operator_grants(docs, "", "secrets"), want, "the operator's grants on secrets");
}

/// `get` on exactly the CRDs the code checks at start, by name.
fn assert_crd_rule(docs: &[Value]) {
    let want: BTreeSet<String> = shoal::api::crds::all().into_iter().map(|c| c.metadata.name.unwrap()).collect();
    let rules: Vec<&Value> = docs.iter().filter_map(|d| d["rules"].as_array()).flatten().filter(|r| r["resources"] == json!(["customresourcedefinitions"])).collect();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["verbs"], json!(["get"]));
    let names: BTreeSet<String> = rules[0]["resourceNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    assert_eq!(names, want);
}

/// A Pod made from the Deployment's pod template, as the ReplicaSet controller would.
fn pod_of(deploy: &Value) -> Pod {
    let t = &deploy["spec"]["template"];
    serde_json::from_value(json!({"metadata": {"name": "shoal-psa", "labels": t["metadata"]["labels"]}, "spec": t["spec"]})).unwrap()
}

/// Pod Security admission enforces on Pods (it only warns on Deployments), so the check
/// creates the Pod itself, as a server-side dry run, in a namespace that enforces
/// "restricted".
#[tokio::test(flavor = "multi_thread")]
async fn the_pod_passes_pod_security_restricted() {
    let client = common::client().await;
    let ns = common::namespace(&client, "helm-psa").await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let label = json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}});
    nss.patch(&ns, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let docs = render("shoal", &ns, &["actionLog.enabled=true"]);
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    // The ServiceAccount admission plugin wants the Pod's ServiceAccount to exist.
    let sa: ServiceAccount = serde_json::from_value(docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap().clone()).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns).create(&PostParams::default(), &sa).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dry = PostParams { dry_run: true, ..Default::default() };
    pods.create(&dry, &pod_of(deploy)).await.unwrap_or_else(|e| panic!("the chart's pod is refused under Pod Security restricted: {e}"));

    // The check can fail: the same pod without seccompProfile, or allowing privilege
    // escalation, is refused.
    let mut no_seccomp = deploy.clone();
    no_seccomp["spec"]["template"]["spec"]["securityContext"].as_object_mut().unwrap().remove("seccompProfile");
    let mut escalating = deploy.clone();
    escalating["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true);
    for (what, bad) in [("seccompProfile", no_seccomp), ("allowPrivilegeEscalation", escalating)] {
        match pods.create(&dry, &pod_of(&bad)).await {
            Err(kube::Error::Api(e)) => assert!(e.code == 403 && e.message.contains("restricted") && e.message.contains(what), "{e:?}"),
            other => panic!("a pod without {what} was not refused: {other:?}"),
        }
    }

    // The action log: on an emptyDir, since the root filesystem is read-only.
    let spec = &deploy["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let path = container["env"].as_array().unwrap().iter().find(|e| e["name"] == "SHOAL_ACTION_LOG").expect("SHOAL_ACTION_LOG")["value"].as_str().unwrap().to_string();
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap()))).expect("the action log's directory is mounted");
    let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert!(volume["emptyDir"].is_object(), "{volume}");
    assert_ne!(mount["readOnly"], true);

    // Off by default: no variable, no volume.
    let docs = render("shoal", &ns, &[]);
    let spec = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    assert!(spec["volumes"].is_null() && !spec["containers"][0]["env"].as_array().unwrap().iter().any(|e| e["name"] == "SHOAL_ACTION_LOG"));
    common::cleanup(&client, &ns).await;
}

/// The NamespaceManager safety settings' variables, which the chart sets only when a value
/// differs from its default.
const NSMAN_ENV: [&str; 3] = ["SHOAL_ALLOW_CROSS_NAMESPACE", "SHOAL_PROTECTED_NAMESPACES", "SHOAL_WEBHOOK_ALLOW"];

/// The Deployment's environment variables with a plain value, rendered with `args`.
fn deployment_env(args: &[&str]) -> BTreeMap<String, String> {
    let docs = parse_yaml(&try_helm_template("shoal", "shoal-system", args).unwrap_or_else(|e| panic!("helm template {args:?} failed: {e}")));
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    env.iter().filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string()))).collect()
}

/// allowCrossNamespace, protectedNamespaces and webhookAllow reach the operator's
/// environment, and values.schema.json refuses a value of the wrong shape. Renders only:
/// no cluster needed.
#[test]
fn namespace_manager_settings_reach_the_deployment() {
    // Defaults (and defaults given explicitly): no variable, so the binary's defaults apply
    // (the opt-in label is required, only the built-in namespaces are protected, webhooks
    // may call any host).
    for args in [&[][..], &["--set", "allowCrossNamespace=false", "--set", "protectedNamespaces=null", "--set-json", "webhookAllow=[]"]] {
        let env = deployment_env(args);
        for n in NSMAN_ENV {
            assert!(!env.contains_key(n), "{n} set with {args:?}: {env:?}");
        }
    }

    let env = deployment_env(&["--set", "allowCrossNamespace=true", "--set", "protectedNamespaces={team-a,billing}", "--set-json", r#"webhookAllow=["hooks.example.com","10.20.0.0/16"]"#]);
    assert_eq!(env.get("SHOAL_ALLOW_CROSS_NAMESPACE").map(String::as_str), Some("true"), "{env:?}");
    assert_eq!(env.get("SHOAL_PROTECTED_NAMESPACES").map(String::as_str), Some("team-a,billing"), "{env:?}");
    assert_eq!(env.get("SHOAL_WEBHOOK_ALLOW").map(String::as_str), Some("hooks.example.com,10.20.0.0/16"), "{env:?}");
    // One entry each, and the others left alone.
    let env = deployment_env(&["--set", "protectedNamespaces[0]=team-a", "--set", "webhookAllow[0]=192.0.2.7"]);
    assert_eq!(env.get("SHOAL_PROTECTED_NAMESPACES").map(String::as_str), Some("team-a"), "{env:?}");
    assert_eq!(env.get("SHOAL_WEBHOOK_ALLOW").map(String::as_str), Some("192.0.2.7"), "{env:?}");
    assert!(!env.contains_key("SHOAL_ALLOW_CROSS_NAMESPACE"), "{env:?}");

    // values.schema.json: a value of the wrong type or shape fails `helm template` rather
    // than reaching the operator (the string "maybe" would be true to the template, one
    // namespace given as a string is not a list, a comma would split an entry in two).
    let bad: [(&[&str], &str); 6] = [
        (&["--set", "allowCrossNamespace=maybe"], "/allowCrossNamespace"),
        (&["--set-string", "allowCrossNamespace=true"], "/allowCrossNamespace"),
        (&["--set", "protectedNamespaces=team-a"], "/protectedNamespaces"),
        (&["--set", "protectedNamespaces={Team_A}"], "/protectedNamespaces/0"),
        (&["--set", "webhookAllow=hooks.example.com"], "/webhookAllow"),
        (&["--set-json", r#"webhookAllow=["a.example.com,b.example.com"]"#], "/webhookAllow/0"),
    ];
    for (args, at) in bad {
        match try_helm_template("shoal", "shoal-system", args) {
            Ok(_) => panic!("helm template accepted {args:?}"),
            Err(e) => assert!(e.contains("schema") && e.contains(&format!("at '{at}'")), "{args:?}: {e}"),
        }
    }
}

/// Every `SHOAL_*` variable the chart can set is one `shoal run` reads (a misspelt name
/// would be ignored without a word).
#[test]
fn every_variable_the_chart_sets_is_a_setting_of_shoal_run() {
    use clap::Args;
    // `shoal run`'s own flags, and the global ones every command takes.
    let run = shoal::telemetry::LogArgs::augment_args(shoal::operator::RunConfig::augment_args(clap::Command::new("run")));
    let read: BTreeSet<String> = run.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    // Every optional variable switched on.
    let set = [
        "watchNamespace=work",
        "actionLog.enabled=true",
        "allowCrossNamespace=true",
        "protectedNamespaces={team-a}",
        "webhookAllow={hooks.example.com}",
        "podGC.strategy=OnPodSuccess",
        "podGC.deleteDelay=1m",
        "podGC.keepLast=2",
        "workflowTTL.afterCompletion=24h",
        "workflowTTL.afterSuccess=1h",
        "workflowTTL.afterFailure=168h",
    ];
    let env = deployment_env(&set.iter().flat_map(|s| ["--set", s]).collect::<Vec<_>>());
    for n in env.keys().filter(|n| n.starts_with("SHOAL_")) {
        assert!(read.contains(n), "the chart sets {n}, which shoal run does not read (it reads {read:?})");
    }
    for n in NSMAN_ENV.iter().chain(&GC_ENV) {
        assert!(env.contains_key(*n), "{n} not rendered");
    }
}

/// The garbage collection variables (`podGC.*`, `workflowTTL.*`).
const GC_ENV: [&str; 6] =
    ["SHOAL_POD_GC_STRATEGY", "SHOAL_POD_GC_DELAY", "SHOAL_POD_GC_KEEP_LAST", "SHOAL_WORKFLOW_TTL_AFTER_COMPLETION", "SHOAL_WORKFLOW_TTL_AFTER_SUCCESS", "SHOAL_WORKFLOW_TTL_AFTER_FAILURE"];
