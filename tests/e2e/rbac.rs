//! The chart's RBAC is enough, against the real API server: three `shoal run` replicas
//! authenticated as the chart's ServiceAccount (a token from `kubectl create token`, and
//! nothing else) run workflows
//! through every write the Workflow controller makes, with no 403 in its log. And it is no
//! more than that: SubjectAccessReviews show what the ServiceAccount may not do, and what
//! the aggregated view/edit/admin roles give people. The NamespaceManager controller's rules
//! are checked with SubjectAccessReviews only: the replica does not run that controller. The
//! Activity and ActivityWorker controllers' rules, and the Task and Ignitor controllers'
//! (ActionPlugins and their Secrets included), are checked with SubjectAccessReviews too.
//!
//! The replica always watches only its test namespace, even for the cluster-wide install: a
//! replica watching every namespace of the shared test cluster would act on other tests'
//! objects. The cluster-wide grant itself (list and watch in all namespaces) is checked with
//! SubjectAccessReviews.
//!
//! To see the test fail when a rule is missing, set `SHOAL_TEST_RBAC_DROP=<resource>:<verb>`
//! (say `jobs:deletecollection`): that verb is taken out of the rendered rules before they are
//! applied.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal::api::workflow::{StepPhase, Workflow, WorkflowPhase};

use crate::common::{self, eventually};
use crate::helm::{kubectl_apply, render};
use crate::operator::Operator;
use crate::workflow::{T, step, step_phase, wait_phase, wf};

const RBAC_KINDS: [&str; 5] = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// Deletes the release's cluster-scoped objects (a namespace's deletion does not).
struct ClusterScoped(String);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let _ = Command::new(common::bin_dir().join("kubectl"))
            .args(["delete", "clusterrole,clusterrolebinding", "-l", &format!("app.kubernetes.io/instance={}", self.0), "--wait=false"])
            .env("KUBECONFIG", common::kubeconfig())
            .output();
    }
}

/// The replicas the test runs with the chart's rights.
const REPLICAS: [&str; 3] = ["r1", "r2", "r3"];

/// The lines of a replica's log where the API server refused it.
fn refusals(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // A refusal carries reason Forbidden (code 403); matching a bare "403" also matched
    // log timestamps such as 18:23:38.403218Z.
    text.lines().filter(|l| l.contains("code: 403") || l.to_lowercase().contains("forbidden")).map(String::from).collect()
}

/// If the test fails before its own check of the log, say what the API server refused.
struct ShowRefusals(PathBuf);

impl Drop for ShowRefusals {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("refused requests in {}:\n{}", self.0.display(), refusals(&self.0).join("\n"));
        }
    }
}

/// Take `resource:verb` out of every rule, for the negative check.
fn drop_verb(docs: &mut [Value], spec: &str) {
    let (resource, verb) = spec.split_once(':').expect("SHOAL_TEST_RBAC_DROP=<resource>:<verb>");
    for d in docs.iter_mut() {
        let Some(rules) = d["rules"].as_array_mut() else { continue };
        for r in rules.iter_mut() {
            if r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == resource)) {
                r["verbs"].as_array_mut().unwrap().retain(|v| v != verb);
            }
        }
        // A rule needs a verb.
        rules.retain(|r| r["verbs"].as_array().is_some_and(|v| !v.is_empty()));
    }
    eprintln!("rbac: {verb} on {resource} removed from the chart's rules");
}

/// The test cluster's kubeconfig, authenticated as ServiceAccount `sa` of `ns` with a token
/// from `kubectl create token` (and nothing else: the client certificate is dropped).
fn as_service_account(dir: &Path, ns: &str, sa: &str) -> PathBuf {
    let out = Command::new(common::bin_dir().join("kubectl"))
        .args(["create", "token", sa, "-n", ns, "--duration", "1h"])
        .env("KUBECONFIG", common::kubeconfig())
        .output()
        .expect("running kubectl create token");
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut kc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(common::kubeconfig()).unwrap()).unwrap();
    for u in kc["users"].as_array_mut().unwrap() {
        u["user"] = json!({ "token": token });
    }
    let path = dir.join("kubeconfig-service-account");
    std::fs::write(&path, serde_yaml_ng::to_string(&kc).unwrap()).unwrap();
    path
}

/// A user and its groups, as the authorizer sees them.
struct Who {
    user: String,
    groups: Vec<String>,
}

impl Who {
    fn new(user: &str, groups: &[&str]) -> Self {
        Self { user: user.into(), groups: groups.iter().map(|g| g.to_string()).collect() }
    }
}

/// May `who` do `verb` on `resource` (`resource[=name][/subresource]`) of API group
/// `group` in `ns` ("" = every namespace)?
async fn may(client: &Client, who: &Who, verb: &str, group: &str, resource: &str, ns: &str) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let (resource, name) = match resource.split_once('=') {
        Some((r, n)) => (r, Some(n.to_string())),
        None => (resource, None),
    };
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(who.user.clone()),
            groups: Some(who.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                name,
                namespace: (!ns.is_empty()).then(|| ns.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    api.create(&PostParams::default(), &sar).await.unwrap().status.unwrap().allowed
}

/// Wait until `may(...)` is `want` (RBAC changes reach the authorizer's cache in a moment).
async fn expect(client: &Client, who: &Who, verb: &str, group: &str, resource: &str, ns: &str, want: bool) {
    let ns_shown = if ns.is_empty() { "every namespace" } else { ns };
    eventually(Duration::from_secs(20), &format!("{} {} {verb} {group}/{resource} in {ns_shown}", who.user, if want { "may" } else { "may not" }), || async {
        (may(client, who, verb, group, resource, ns).await == want).then_some(())
    })
    .await;
}

/// A sample of each kind the Workflow controller does not run yet, from examples/.
fn other_kinds() -> Vec<DynamicObject> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out = vec![];
    for f in ["activity.yaml", "activityworker.yaml", "task-ignitor.yaml", "nsman-ttl.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            if v["apiVersion"] == "shoal.dev/v1alpha1" {
                let mut o: DynamicObject = serde_json::from_value(v).unwrap();
                o.metadata.namespace = None;
                // The TTL sample deletes its own namespace (here, the test's) after 40 s once
                // the NamespaceManager controller runs: a dry run only records what it would do.
                if o.types.as_ref().is_some_and(|t| t.kind == "NamespaceManager") {
                    o.data["spec"]["dryRun"] = json!(true);
                }
                out.push(o);
            }
        }
    }
    out
}

async fn run_with_the_charts_rbac(watch_namespace: bool) {
    let client = common::client().await;
    let ops = common::namespace(&client, "rbac-ops").await;
    let work = common::namespace(&client, "rbac").await;
    let release = format!("rbac-{}", ops.rsplit('-').next().unwrap());
    let _cleanup = ClusterScoped(release.clone());
    let watch = format!("watchNamespace={work}");
    let set: &[&str] = if watch_namespace { &[&watch] } else { &[] };
    let mut docs = render(&release, &ops, set);
    docs.retain(|d| RBAC_KINDS.contains(&d["kind"].as_str().unwrap()));
    if let Ok(spec) = std::env::var("SHOAL_TEST_RBAC_DROP") {
        drop_verb(&mut docs, &spec);
    }
    kubectl_apply(&docs.iter().collect::<Vec<_>>(), &[]);
    let sa = docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap()["metadata"]["name"].as_str().unwrap().to_string();
    let user = format!("system:serviceaccount:{ops}:{sa}");
    let me = Who::new(&user, &["system:serviceaccounts", &format!("system:serviceaccounts:{ops}"), "system:authenticated"]);

    // What the ServiceAccount may do, and may not.
    expect(&client, &me, "list", "batch", "jobs", &work, true).await;
    for (verb, group, resource) in [("list", "batch", "jobs"), ("watch", "shoal.dev", "workflows"), ("watch", "shoal.dev", "namespacemanagers")] {
        expect(&client, &me, verb, group, resource, "", !watch_namespace).await;
        expect(&client, &me, verb, group, resource, "default", !watch_namespace).await;
    }
    expect(&client, &me, "get", "apiextensions.k8s.io", "customresourcedefinitions=workflows.shoal.dev", "", true).await;
    // Bare step pods (`executor: Pod`): the Workflow controller's pod rule.
    for verb in ["get", "list", "watch", "create", "patch", "delete", "deletecollection"] {
        expect(&client, &me, verb, "", "pods", &work, true).await;
        expect(&client, &me, verb, "", "pods", "default", !watch_namespace).await;
    }
    // Garbage collection deletes a workflow whose ttlStrategy ran out.
    expect(&client, &me, "delete", "shoal.dev", "workflows", &work, true).await;
    expect(&client, &me, "delete", "shoal.dev", "workflows", "default", !watch_namespace).await;
    // The NamespaceManager controller's rules (it does not run here: granted, not exercised).
    let nsman = [
        ("get", "shoal.dev", "namespacemanagers"),
        ("patch", "shoal.dev", "namespacemanagers"),
        ("get", "shoal.dev", "namespacemanagers/status"),
        ("patch", "shoal.dev", "namespacemanagers/status"),
        ("list", "apps", "deployments"),
        ("patch", "apps", "deployments"),
        ("list", "apps", "statefulsets"),
        ("patch", "apps", "statefulsets"),
        ("get", "", "secrets"),
    ];
    for (verb, group, resource) in nsman {
        expect(&client, &me, verb, group, resource, &work, true).await;
        expect(&client, &me, verb, group, resource, "default", !watch_namespace).await;
    }
    // The Activity and ActivityWorker controllers' rules: read their objects, create workers,
    // record status. (The replica below also gets the Activity and ActivityWorker samples, so
    // these are exercised wherever those controllers run.)
    let activity = [
        ("get", "shoal.dev", "activities"),
        ("get", "shoal.dev", "activityworkers"),
        ("create", "shoal.dev", "activityworkers"),
        ("get", "shoal.dev", "activities/status"),
        ("patch", "shoal.dev", "activities/status"),
        ("get", "shoal.dev", "activityworkers/status"),
        ("patch", "shoal.dev", "activityworkers/status"),
    ];
    for (verb, group, resource) in activity {
        expect(&client, &me, verb, group, resource, &work, true).await;
        expect(&client, &me, verb, group, resource, "default", !watch_namespace).await;
    }
    // The Task and Ignitor controllers' rules: read their objects, record status; read the
    // ActionPlugins (cluster-scoped, in either mode) and an ActionPlugin's signing Secret in
    // the release namespace (in either mode).
    let task = [("get", "shoal.dev", "tasks"), ("get", "shoal.dev", "ignitors"), ("patch", "shoal.dev", "tasks/status"), ("patch", "shoal.dev", "ignitors/status")];
    for (verb, group, resource) in task {
        expect(&client, &me, verb, group, resource, &work, true).await;
        expect(&client, &me, verb, group, resource, "default", !watch_namespace).await;
    }
    for verb in ["get", "list", "watch"] {
        expect(&client, &me, verb, "shoal.dev", "actionplugins", "", true).await;
    }
    expect(&client, &me, "get", "", "secrets", &ops, true).await;
    // Namespaces are cluster-scoped: with watchNamespace, the watched one only.
    for verb in ["get", "delete"] {
        expect(&client, &me, verb, "", &format!("namespaces={work}"), "", true).await;
        expect(&client, &me, verb, "", &format!("namespaces={ops}"), "", !watch_namespace).await;
        expect(&client, &me, verb, "", "namespaces", "", !watch_namespace).await;
    }
    let denied = [
        ("get", "apiextensions.k8s.io", "customresourcedefinitions=widgets.example.com", ""),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions", ""),
        ("update", "", "pods", work.as_str()),
        ("create", "", "pods/exec", work.as_str()),
        ("create", "", "pods/eviction", work.as_str()),
        ("list", "", "namespaces", ""),
        ("watch", "", "namespaces", ""),
        ("create", "", "namespaces", ""),
        ("patch", "", "namespaces", ""),
        ("update", "", "namespaces/finalize", ""),
        ("get", "apps", "deployments", work.as_str()),
        ("update", "apps", "deployments", work.as_str()),
        ("delete", "apps", "statefulsets", work.as_str()),
        ("patch", "apps", "deployments/scale", work.as_str()),
        ("update", "apps", "statefulsets/scale", work.as_str()),
        ("patch", "apps", "replicasets", work.as_str()),
        ("list", "", "secrets", work.as_str()),
        ("watch", "", "secrets", work.as_str()),
        ("create", "", "secrets", work.as_str()),
        ("get", "", "configmaps", work.as_str()),
        ("update", "shoal.dev", "namespacemanagers", work.as_str()),
        ("delete", "shoal.dev", "namespacemanagers", work.as_str()),
        ("update", "shoal.dev", "namespacemanagers/status", work.as_str()),
        ("create", "shoal.dev", "activities", work.as_str()),
        ("delete", "shoal.dev", "activityworkers", work.as_str()),
        ("update", "shoal.dev", "activityworkers", work.as_str()),
        ("update", "shoal.dev", "activities/status", work.as_str()),
        ("update", "shoal.dev", "activities/finalizers", work.as_str()),
        ("update", "shoal.dev", "workflows", work.as_str()),
        ("update", "shoal.dev", "tasks/status", work.as_str()),
        ("get", "shoal.dev", "tasks/status", work.as_str()),
        ("create", "shoal.dev", "tasks", work.as_str()),
        ("delete", "shoal.dev", "ignitors", work.as_str()),
        ("update", "shoal.dev", "ignitors", work.as_str()),
        ("update", "shoal.dev", "tasks/finalizers", work.as_str()),
        ("create", "shoal.dev", "actionplugins", ""),
        ("patch", "shoal.dev", "actionplugins", ""),
        ("delete", "shoal.dev", "actionplugins", ""),
        ("list", "", "secrets", ops.as_str()),
        ("watch", "", "secrets", ops.as_str()),
        ("update", "shoal.dev", "workflows/finalizers", work.as_str()),
        ("patch", "coordination.k8s.io", "leases", ops.as_str()),
        ("list", "coordination.k8s.io", "leases", work.as_str()),
    ];
    for (verb, group, resource, ns) in denied {
        assert!(!may(&client, &me, verb, group, resource, ns).await, "{sa} may {verb} {group}/{resource} in {ns:?}");
    }

    // A replica with the ServiceAccount's rights and nothing else.
    let mut op = Operator::new(&ops, &work);
    op.extra_args = ["--shards", "8", "--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"].iter().map(|s| s.to_string()).collect();
    let kubeconfig = as_service_account(&op.dir, &ops, &sa);
    let kc = kubeconfig.display().to_string();
    // Three replicas, as `helm install` runs them (the shards, and so the writes, are spread
    // over them). Event publishing failures are logged at debug level only.
    for r in REPLICAS {
        op.start_with(r, r, &[("KUBECONFIG", kc.as_str()), ("RUST_LOG", "info,kube=warn,shoal::ha::writer=debug")]);
    }
    let logs: Vec<PathBuf> = REPLICAS.iter().map(|r| op.dir.join(format!("{r}.stderr"))).collect();
    let _show: Vec<ShowRefusals> = logs.iter().cloned().map(ShowRefusals).collect();

    let api: Api<Workflow> = Api::namespaced(client.clone(), &work);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &work);
    let pp = PostParams::default();
    // Two steps, one after the other; the second gets the first's output (pods: list).
    let produce = json!({"stepName": "produce", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/termination-message": "42"}}});
    api.create(&pp, &wf("pipe", json!({"containers": [produce, step("consume", &["produce"])]}))).await.unwrap();
    // Fail-fast: `bad` fails while `long` runs, so long's Job is deleted.
    let bad = json!({"stepName": "bad", "image": "busybox", "metadata": {"labels": {"kwok.shoal.dev/exit-code": "3"}, "annotations": {"kwok.shoal.dev/delay": "2s"}}});
    let long = json!({"stepName": "long", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": "120s"}}});
    api.create(&pp, &wf("fast", json!({"containers": [bad, long]}))).await.unwrap();
    // Relabelled, then re-specced: labels cascade to the Job (patch), the old spec's Jobs
    // are deleted by label (deletecollection).
    let slow = json!({"stepName": "a", "image": "busybox", "metadata": {"annotations": {"kwok.shoal.dev/delay": "120s"}}});
    api.create(&pp, &wf("respec", json!({"containers": [slow]}))).await.unwrap();
    // Garbage collection: each step's Job once its result is recorded (jobs: delete), then the
    // workflow itself once its TTL runs out (workflows: delete).
    let gc = json!({"podGC": {"strategy": "OnPodCompletion"}, "ttlStrategy": {"secondsAfterSuccess": 2}, "containers": [step("a", &[]), step("b", &["a"])]});
    api.create(&pp, &wf("collected", gc)).await.unwrap();
    // The other kinds get their shard label from the leader (list, watch, patch).
    let others = other_kinds();
    for o in &others {
        let kind = o.types.as_ref().unwrap().kind.clone();
        common::shoal_api(&client, &work, &kind).create(&pp, o).await.unwrap_or_else(|e| panic!("{kind}: {e}"));
    }

    let p = wait_phase(&api, "pipe", WorkflowPhase::Completed).await;
    assert_eq!(p.status.as_ref().unwrap().steps[0].output.as_deref(), Some("42"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &work);
    let consumer = pods.list(&ListParams::default().labels("shoal.dev/workflow=pipe,shoal.dev/step=consume")).await.unwrap().items.remove(0);
    assert!(consumer.spec.unwrap().containers[0].env.as_ref().unwrap().iter().any(|e| e.name == "SHOAL_OUTPUT_PRODUCE" && e.value.as_deref() == Some("42")));

    let f = wait_phase(&api, "fast", WorkflowPhase::Failed).await;
    assert_eq!(step_phase(&f, "bad"), StepPhase::Failed);
    assert_eq!(step_phase(&f, "long"), StepPhase::Cancelled);
    let long_job = f.status.as_ref().unwrap().steps.iter().find(|s| s.step_name == "long").unwrap().job_name.clone().unwrap();
    eventually(T, "the cancelled step's Job deleted", || async {
        let j = jobs.get_opt(&long_job).await.ok()?;
        j.is_none_or(|j| j.metadata.deletion_timestamp.is_some()).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &work);
    eventually(T, "a StepFailed Event from shoal", || async {
        let l = events.list(&ListParams::default()).await.ok()?;
        l.items.iter().any(|e| e.reason.as_deref() == Some("StepFailed") && e.reporting_controller.as_deref() == Some("shoal")).then_some(())
    })
    .await;

    let lp = ListParams::default().labels("shoal.dev/workflow=respec");
    let old: Vec<Job> = eventually(T, "respec's Job", || async { Some(jobs.list(&lp).await.ok()?.items).filter(|l| !l.is_empty()) }).await;
    api.patch("respec", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "blue"}}}))).await.unwrap();
    eventually(T, "the label cascaded to the Job", || async { jobs.list(&lp).await.ok()?.items.iter().all(|j| j.labels().get("team").is_some_and(|t| t == "blue")).then_some(()) }).await;
    // A Job that lost its shard label gets it back from the leader (Jobs: list, watch, patch).
    let shard = old[0].labels()["shoal.dev/shard"].clone();
    jobs.patch(&old[0].name_any(), &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"shoal.dev/shard": null}}}))).await.unwrap();
    eventually(T, "the Job's shard label restored", || async { (jobs.get(&old[0].name_any()).await.ok()?.labels().get("shoal.dev/shard") == Some(&shard)).then_some(()) }).await;
    api.patch("respec", &PatchParams::default(), &Patch::Merge(json!({"spec": {"containers": [step("x", &[]), step("y", &["x"])]}}))).await.unwrap();
    let done = wait_phase(&api, "respec", WorkflowPhase::Completed).await;
    assert_eq!(done.status.unwrap().executed_steps, vec!["x".to_string(), "y".to_string()]);
    eventually(T, "the old spec's Job deleted", || async {
        let j = jobs.get_opt(&old[0].name_any()).await.ok()?;
        j.is_none_or(|j| j.metadata.deletion_timestamp.is_some()).then_some(())
    })
    .await;

    eventually(T, "the collected workflow deleted by its TTL", || async { api.get_opt("collected").await.ok()?.is_none().then_some(()) }).await;

    for o in &others {
        let kind = o.types.as_ref().unwrap().kind.clone();
        let api = common::shoal_api(&client, &work, &kind);
        eventually(T, &format!("{kind} {} labelled with its shard", o.name_any()), || async { api.get(&o.name_any()).await.ok()?.labels().contains_key("shoal.dev/shard").then_some(()) }).await;
    }

    // A graceful stop releases every Lease and deletes its member Lease (update, delete).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ops);
    for (r, log) in REPLICAS.iter().zip(&logs) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(op.pid(r)), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = eventually(Duration::from_secs(30), &format!("{r} to exit"), || {
            let done = op.replicas.iter_mut().find(|x| x.name == *r).unwrap().child.try_wait().unwrap();
            async move { done }
        })
        .await;
        let text = std::fs::read_to_string(log).unwrap();
        assert!(status.success(), "{r} exited with {status}:\n{text}");
        assert!(leases.get_opt(&format!("shoal-member-{r}")).await.unwrap().is_none(), "{r}'s member Lease was not deleted");
        assert!(refusals(log).is_empty(), "the API server refused {r} (its refused requests are printed below)");
        assert!(text.contains("shoal started"), "{text}");
    }

    // People: view reads, edit and admin write, nobody writes status.
    if !watch_namespace {
        let rb = |user: &str, role: &str| {
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": format!("{user}-{role}"), "namespace": work},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}, "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]})
        };
        let (viewer, editor, admin) = (format!("{release}-viewer"), format!("{release}-editor"), format!("{release}-admin"));
        kubectl_apply(&[&rb(&viewer, "view"), &rb(&editor, "edit"), &rb(&admin, "admin")], &[]);
        let [viewer, editor, admin] = [viewer, editor, admin].map(|u| Who::new(&u, &["system:authenticated"]));
        for kind in ["workflows", "activities", "activityworkers", "tasks", "ignitors", "namespacemanagers"] {
            expect(&client, &viewer, "list", "shoal.dev", kind, &work, true).await;
            expect(&client, &viewer, "create", "shoal.dev", kind, &work, false).await;
            expect(&client, &editor, "create", "shoal.dev", kind, &work, true).await;
            expect(&client, &admin, "delete", "shoal.dev", kind, &work, true).await;
            for u in [&viewer, &editor, &admin] {
                expect(&client, u, "patch", "shoal.dev", &format!("{kind}/status"), &work, false).await;
            }
        }
        // ActionPlugins are cluster-scoped: reached through a ClusterRoleBinding, read through
        // view, written by no aggregated role (only cluster admins make them).
        let crb = |user: &str, role: &str| {
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": format!("{user}-{role}"), "labels": {"app.kubernetes.io/instance": release}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}, "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]})
        };
        let (viewer, editor, admin) = (format!("{release}-cluster-viewer"), format!("{release}-cluster-editor"), format!("{release}-cluster-admin"));
        kubectl_apply(&[&crb(&viewer, "view"), &crb(&editor, "edit"), &crb(&admin, "admin")], &[]);
        let [viewer, editor, admin] = [viewer, editor, admin].map(|u| Who::new(&u, &["system:authenticated"]));
        for verb in ["get", "list", "watch"] {
            expect(&client, &viewer, verb, "shoal.dev", "actionplugins", "", true).await;
        }
        for u in [&viewer, &editor, &admin] {
            for verb in ["create", "update", "patch", "delete"] {
                expect(&client, u, verb, "shoal.dev", "actionplugins", "", false).await;
            }
        }
    }
    drop(op);
    common::cleanup(&client, &work).await;
    common::cleanup(&client, &ops).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_runs_with_only_the_cluster_wide_rbac() {
    run_with_the_charts_rbac(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_runs_with_only_the_watch_namespace_rbac() {
    run_with_the_charts_rbac(true).await;
}
