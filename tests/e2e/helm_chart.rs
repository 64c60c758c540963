//! The chart as users run it, checked by the real tools: `helm lint --strict` and
//! `helm template` with the defaults and with every value changed, values.schema.json
//! refusing bad values at `helm template` and `helm install`, `helm install` into the local
//! control plane (kwok runs the replicas as fake pods), `helm upgrade` to scale and
//! `helm uninstall`; the alert rules through `promtool` and against the metrics a running
//! replica serves; NOTES.txt's commands against a running replica; the log format value.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use shoal::api::workflow::Workflow;

use crate::common::{self, eventually};
use crate::helm::{kubectl_apply, parse_yaml, try_helm_template};
use crate::operator::{Operator, http_get, metrics_page};
use crate::workflow::{step, wf};

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("helm/shoal")
}

/// Run helm (built by tests/cluster/build.sh) against the test cluster: stdout, or stderr.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(common::bin_dir().join("helm")).args(args).env("KUBECONFIG", common::kubeconfig()).output().expect("running helm (built by tests/cluster/build.sh)");
    if out.status.success() { Ok(String::from_utf8_lossy(&out.stdout).into_owned()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// A values file that changes every value the chart has (but the ones other tests of
/// helm.rs cover: watchNamespace, actionLog, rbac and the NamespaceManager settings).
const EVERY_VALUE: &str = r#"
replicaCount: 5
image: {repository: registry.example.com/team/shoal, tag: "1.2.3", pullPolicy: Always}
imagePullSecrets: [{name: pull-secret}]
shards: 64
leaseDuration: 20s
renewDeadline: 12s
retryPeriod: 3s
workers: 8
defaultExecutor: Pod
stepSuccessEvents: true
podGC: {strategy: OnWorkflowSuccess, deleteDelay: 90s, keepLast: 3}
workflowTTL: {afterCompletion: 168h, afterSuccess: 24h, afterFailure: 72h}
resync: 10m
logLevel: "info,kube=warn"
logFormat: json
extraEnv:
- {name: EXTRA_PLAIN, value: "plain"}
- name: EXTRA_FROM
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
metrics:
  port: 9191
  serviceMonitor: {enabled: true, interval: 15s, scrapeTimeout: 5s, labels: {release: prom}}
  prometheusRule: {enabled: true, labels: {release: prom}, selector: 'cluster="blue",job="shoal"'}
grafanaDashboard: {enabled: true, label: dashboards, labelValue: "shoal", namespace: NS_DASHBOARDS, annotations: {grafana_folder: shoal}}
tracing: {enabled: true, endpoint: "http://jaeger-collector.tracing:4317", serviceName: shoal-prod}
resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {cpu: "2", memory: 1Gi}}
terminationGracePeriodSeconds: 60
podDisruptionBudget: {enabled: true, minAvailable: 2}
topologySpread: {enabled: true, maxSkew: 2, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}
priorityClassName: system-cluster-critical
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: ops, effect: NoSchedule}]
affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [amd64]}]}]}}}
"#;

fn write_values(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("values.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

/// The container's environment: plain values as strings, the others as their JSON.
fn env_of(deploy: &Value) -> BTreeMap<String, Value> {
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    env.iter().map(|e| (e["name"].as_str().unwrap().to_string(), if e["value"].is_string() { e["value"].clone() } else { e["valueFrom"].clone() })).collect()
}

/// `helm lint --strict` and `helm template` pass with the defaults and with every value
/// changed; each value lands where it should; the API server accepts what renders (a
/// server-side dry run; the ServiceMonitor and PrometheusRule need the Prometheus Operator's
/// CRDs, which the test cluster does not have: `alert_rules_*` checks the rules).
#[tokio::test(flavor = "multi_thread")]
async fn lint_and_template_with_the_defaults_and_every_value_changed() {
    let client = common::client().await;
    let ns = common::namespace(&client, "helm-values").await;
    let dashboards_ns = common::namespace(&client, "helm-dash").await;
    let dir = std::env::temp_dir().join(format!("shoal-test-{ns}"));
    let values = write_values(&dir, &EVERY_VALUE.replace("NS_DASHBOARDS", &dashboards_ns));
    let values = values.to_str().unwrap();
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for args in [vec!["lint", "--strict", chart], vec!["lint", "--strict", chart, "-f", values]] {
        let out = helm(&args).unwrap_or_else(|e| panic!("helm {args:?}: {e}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }

    // The defaults.
    let docs = parse_yaml(&try_helm_template("shoal", &ns, &[]).unwrap());
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for absent in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!kinds.contains(absent), "{absent} rendered by default");
    }
    let deploy = find(&docs, "Deployment").unwrap();
    assert_eq!(deploy["spec"]["replicas"], 3);
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "shoal:0.1.0");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    let env = env_of(deploy);
    assert_eq!(env["POD_NAME"], json!({"fieldRef": {"fieldPath": "metadata.name"}}));
    assert_eq!(env["POD_NAMESPACE"], json!({"fieldRef": {"fieldPath": "metadata.namespace"}}));
    assert_eq!(env["RUST_LOG"], "info");
    assert_eq!(env["SHOAL_LOG_FORMAT"], "text");
    assert!(!env.keys().any(|k| k.starts_with("OTEL_")), "tracing is off by default: {env:?}");
    assert!(!env.keys().any(|k| k.starts_with("SHOAL_POD_GC_") || k.starts_with("SHOAL_WORKFLOW_TTL_")), "no garbage collection by default: {env:?}");
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    let selector = deploy["spec"]["selector"]["matchLabels"].clone();
    assert_eq!(
        pod["topologySpreadConstraints"],
        json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector}, "matchLabelKeys": ["pod-template-hash"]}])
    );
    for absent in ["priorityClassName", "imagePullSecrets", "nodeSelector", "tolerations", "affinity"] {
        assert!(pod[absent].is_null(), "{absent} set by default: {}", pod[absent]);
    }
    assert_eq!(find(&docs, "PodDisruptionBudget").unwrap()["spec"]["minAvailable"], 1);

    // Every value changed.
    let docs = parse_yaml(&try_helm_template("shoal", &ns, &["-f", values]).unwrap_or_else(|e| panic!("helm template -f {values}: {e}")));
    let deploy = find(&docs, "Deployment").unwrap();
    assert_eq!(deploy["spec"]["replicas"], 5);
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example.com/team/shoal:1.2.3");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "pull-secret"}]));
    let env = env_of(deploy);
    let want = [
        ("SHOAL_SHARDS", "64"),
        ("SHOAL_LEASE_DURATION", "20s"),
        ("SHOAL_RENEW_DEADLINE", "12s"),
        ("SHOAL_RETRY_PERIOD", "3s"),
        ("SHOAL_WORKERS", "8"),
        ("SHOAL_DEFAULT_EXECUTOR", "Pod"),
        ("SHOAL_STEP_SUCCESS_EVENTS", "true"),
        ("SHOAL_POD_GC_STRATEGY", "OnWorkflowSuccess"),
        ("SHOAL_POD_GC_DELAY", "90s"),
        ("SHOAL_POD_GC_KEEP_LAST", "3"),
        ("SHOAL_WORKFLOW_TTL_AFTER_COMPLETION", "168h"),
        ("SHOAL_WORKFLOW_TTL_AFTER_SUCCESS", "24h"),
        ("SHOAL_WORKFLOW_TTL_AFTER_FAILURE", "72h"),
        ("SHOAL_RESYNC", "10m"),
        ("SHOAL_METRICS_ADDR", "0.0.0.0:9191"),
        ("RUST_LOG", "info,kube=warn"),
        ("SHOAL_LOG_FORMAT", "json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger-collector.tracing:4317"),
        ("OTEL_SERVICE_NAME", "shoal-prod"),
        ("EXTRA_PLAIN", "plain"),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k), Some(&json!(v)), "{k} in {env:?}");
    }
    assert_eq!(env["EXTRA_FROM"], json!({"fieldRef": {"fieldPath": "spec.nodeName"}}));
    let names: Vec<&String> = env.keys().collect();
    let order: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(&order[order.len() - 2..], ["EXTRA_PLAIN", "EXTRA_FROM"], "extraEnv comes last, so it can override: {names:?}");
    assert_eq!(c["ports"][0]["containerPort"], 9191);
    assert_eq!(deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"], "9191");
    assert_eq!(c["resources"], json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}));
    assert_eq!(pod["terminationGracePeriodSeconds"], 60);
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"], json!([{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}]));
    assert_eq!(pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"], "kubernetes.io/arch");
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!((&spread["maxSkew"], &spread["topologyKey"], &spread["whenUnsatisfiable"]), (&json!(2), &json!("topology.kubernetes.io/zone"), &json!("DoNotSchedule")));
    assert_eq!(find(&docs, "PodDisruptionBudget").unwrap()["spec"]["minAvailable"], 2);

    // The metrics Service, and a ServiceMonitor that selects it and scrapes its port.
    let svc = find(&docs, "Service").unwrap();
    assert_eq!(svc["spec"]["ports"][0]["port"], 9191);
    let sm = find(&docs, "ServiceMonitor").unwrap();
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "the ServiceMonitor selects {k}={v}, the Service has {}", svc["metadata"]["labels"]);
    }
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"], json!([ns]));
    assert_eq!(sm["spec"]["endpoints"], json!([{"port": svc["spec"]["ports"][0]["name"], "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}]));
    // The PrometheusRule, with the selector given.
    let rule = find(&docs, "PrometheusRule").unwrap();
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        assert!(r["expr"].as_str().unwrap().contains(r#"{cluster="blue",job="shoal""#), "{r}");
    }
    // The dashboards, for the Grafana sidecar.
    let cm = find(&docs, "ConfigMap").unwrap();
    assert_eq!(cm["metadata"]["namespace"], dashboards_ns.as_str());
    assert_eq!(cm["metadata"]["labels"]["dashboards"], "shoal");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "shoal");

    // The API server accepts it all (but the Prometheus Operator's kinds).
    let objects: Vec<&Value> = docs.iter().filter(|d| !["CustomResourceDefinition", "ServiceMonitor", "PrometheusRule"].contains(&d["kind"].as_str().unwrap())).collect();
    let out = kubectl_apply(&objects, &["--dry-run=server"]);
    assert!(out.contains("configmap/shoal-dashboards created (server dry run)") && out.contains("deployment.apps/shoal created (server dry run)"), "{out}");

    // Switched off: no spread constraint, no PodDisruptionBudget.
    let docs = parse_yaml(&try_helm_template("shoal", &ns, &["--set", "topologySpread.enabled=false", "--set", "podDisruptionBudget.enabled=false"]).unwrap());
    assert!(find(&docs, "Deployment").unwrap()["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null());
    assert!(find(&docs, "PodDisruptionBudget").is_none());
    common::cleanup(&client, &ns).await;
    common::cleanup(&client, &dashboards_ns).await;
}

/// Bad values that `helm template` (and so `helm install`) refuses: the schema's, with the
/// path of the value; and the chart's own checks of values that depend on each other.
const BAD_VALUES: [(&[&str], &str); 27] = [
    (&["--set", "replicaCount=-1"], "at '/replicaCount'"),
    (&["--set", "replicaCount=three"], "at '/replicaCount'"),
    (&["--set", "logFormat=xml"], "at '/logFormat'"),
    (&["--set", "logLevel=verbose"], "at '/logLevel'"),
    (&["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
    (&["--set", "image.tag=1.0 beta"], "at '/image/tag'"),
    (&["--set", "shards=0"], "at '/shards'"),
    (&["--set", "shards=5000"], "at '/shards'"),
    (&["--set", "leaseDuration=15 seconds"], "at '/leaseDuration'"),
    (&["--set", "workers=0"], "at '/workers'"),
    (&["--set", "defaultExecutor=Pods"], "at '/defaultExecutor'"),
    (&["--set-string", "stepSuccessEvents=yes"], "at '/stepSuccessEvents'"),
    (&["--set", "podGC.strategy=Always"], "at '/podGC/strategy'"),
    (&["--set", "podGC.keepLast=-1"], "at '/podGC/keepLast'"),
    (&["--set", "workflowTTL.afterSuccess=1d"], "at '/workflowTTL/afterSuccess'"),
    (&["--set", "metrics.port=70000"], "at '/metrics/port'"),
    (&["--set", "tracing.enabled=true"], "at '/tracing"),
    (&["--set", "tracing.enabled=true", "--set", "tracing.endpoint=jaeger:4317"], "at '/tracing/endpoint'"),
    (&["--set", "topologySpread.whenUnsatisfiable=Never"], "at '/topologySpread/whenUnsatisfiable'"),
    (&["--set", "extraEnv[0].value=x"], "at '/extraEnv/0'"),
    (&["--set", "tolerations[0].operator=Maybe"], "at '/tolerations/0/operator'"),
    // A misspelt value is refused rather than ignored.
    (&["--set", "replicas=3"], "additional properties 'replicas' not allowed"),
    (&["--set", "metrics.serviceMonitor.enable=true"], "additional properties 'enable' not allowed"),
    // What `shoal run` would refuse at start, and a grace period too short for a handover.
    (&["--set", "renewDeadline=15s"], "renewDeadline 15s must be shorter than leaseDuration 15s"),
    (&["--set", "retryPeriod=10s"], "retryPeriod 10s must be above zero and shorter than renewDeadline"),
    (&["--set", "leaseDuration=1500ms"], "leaseDuration 1500ms: a Lease holds whole seconds"),
    (&["--set", "terminationGracePeriodSeconds=12"], "leaves no time for a graceful handover"),
];

/// Renders only: no cluster needed.
#[test]
fn bad_values_fail_helm_template() {
    for (args, want) in BAD_VALUES {
        match try_helm_template("shoal", "shoal-system", args) {
            Ok(_) => panic!("helm template accepted {args:?}"),
            Err(e) => assert!(e.contains(want), "{args:?}: expected {want:?} in:\n{e}"),
        }
    }
    // Just inside the limits: accepted.
    for args in [
        &["--set", "replicaCount=0"][..],
        &["--set", "terminationGracePeriodSeconds=15", "--set", "renewDeadline=10s"],
        &["--set", "leaseDuration=1m", "--set", "renewDeadline=59s", "--set", "terminationGracePeriodSeconds=64"],
    ] {
        try_helm_template("shoal", "shoal-system", args).unwrap_or_else(|e| panic!("{args:?} refused: {e}"));
    }
}

/// Deletes the release's cluster-scoped objects if the test stops before `helm uninstall`.
struct Uninstall {
    release: String,
    ns: String,
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", &self.release, "-n", &self.ns, "--wait=false"]);
        let _ = Command::new(common::bin_dir().join("kubectl"))
            .args(["delete", "clusterrole,clusterrolebinding", "-l", &format!("app.kubernetes.io/instance={}", self.release), "--wait=false"])
            .env("KUBECONFIG", common::kubeconfig())
            .output();
    }
}

/// `helm install --set replicaCount=3` into a fresh namespace: the Deployment runs 3
/// replicas (kwok's fake pods, Running and Ready on kwok nodes, one per node), its Service
/// has their endpoints, the PodDisruptionBudget covers them, the RBAC objects exist; NOTES.txt
/// is printed; `helm upgrade` scales to 4; `helm uninstall` removes it all, the cluster-scoped
/// roles included. A bad value fails `helm install` and creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_three_replicas_and_uninstalls() {
    let client = common::client().await;
    let ns = common::namespace(&client, "helm-install").await;
    let release = format!("inst-{}", ns.rsplit('-').next().unwrap());
    let name = format!("{release}-shoal");
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let _guard = Uninstall { release: release.clone(), ns: ns.clone() };

    for (bad, at) in [("replicaCount=-1", "at '/replicaCount'"), ("logFormat=xml", "at '/logFormat'")] {
        let e = helm(&["install", &release, chart, "-n", &ns, "--set", bad]).expect_err(bad);
        assert!(e.contains("INSTALLATION FAILED") && e.contains(at), "{bad}: {e}");
    }
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(deploys.list(&ListParams::default()).await.unwrap().items.is_empty(), "a refused install created a Deployment");

    let out = helm(&["install", &release, chart, "-n", &ns, "--set", "replicaCount=3"]).unwrap_or_else(|e| panic!("helm install: {e}"));
    assert!(out.contains("STATUS: deployed"), "{out}");
    // NOTES.txt: how to see the replicas' shard ownership, the metrics and the dashboard.
    for line in [
        format!("kubectl -n {ns} get leases -l app.kubernetes.io/managed-by=shoal -L shoal.dev/lease-role"),
        format!("port-forward svc/{name}-metrics 8080"),
        "grafanaDashboard.enabled=true".to_string(),
    ] {
        assert!(out.contains(&line), "NOTES.txt does not say {line:?}:\n{out}");
    }

    let d = deploys.get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = |n: usize| {
        let pods = pods.clone();
        let release = release.clone();
        async move {
            let l = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"))).await.ok()?;
            let nodes: Vec<String> = l.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
            (nodes.len() == n && l.items.len() == n).then_some(nodes)
        }
    };
    let nodes = eventually(Duration::from_secs(60), "3 replicas Running", || running(3)).await;
    assert!(nodes.iter().all(|n| n.starts_with("kwok-node-")), "{nodes:?}");
    let distinct: BTreeSet<&String> = nodes.iter().collect();
    assert_eq!(distinct.len(), 3, "the replicas are not spread across the nodes: {nodes:?}");
    eventually(Duration::from_secs(60), "3 ready replicas", || async { (deploys.get(&name).await.ok()?.status?.ready_replicas == Some(3)).then_some(()) }).await;
    // The metrics Service selects them.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "3 ready endpoints behind the metrics Service", || async {
        let l = slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}-metrics"))).await.ok()?;
        let ready = l.items.iter().flat_map(|s| s.endpoints.iter()).filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)).count();
        (ready == 3).then_some(())
    })
    .await;
    // The PodDisruptionBudget covers them: one may go at a time.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "the PodDisruptionBudget counting 3 pods", || async {
        let s = pdbs.get(&name).await.ok()?.status?;
        (s.expected_pods == 3 && s.current_healthy == 3 && s.disruptions_allowed == 2).then_some(())
    })
    .await;
    // The RBAC objects.
    let get = |kind: &str, obj: &str, namespaced: bool| {
        let mut args = vec!["get".to_string(), kind.to_string(), obj.to_string(), "-o".into(), "name".into()];
        if namespaced {
            args.extend(["-n".to_string(), ns.clone()]);
        }
        Command::new(common::bin_dir().join("kubectl")).args(&args).env("KUBECONFIG", common::kubeconfig()).output().unwrap().status.success()
    };
    let rbac = [
        ("serviceaccount", name.clone(), true),
        ("clusterrole", name.clone(), false),
        ("clusterrolebinding", name.clone(), false),
        ("role", format!("{name}-leases"), true),
        ("rolebinding", format!("{name}-leases"), true),
        ("clusterrole", format!("{name}-view"), false),
        ("clusterrole", format!("{name}-edit"), false),
        ("clusterrole", format!("{name}-admin"), false),
    ];
    for (kind, obj, namespaced) in &rbac {
        assert!(get(kind, obj, *namespaced), "{kind} {obj} missing after helm install");
    }

    // Scaling is a value: helm upgrade.
    let out = helm(&["upgrade", &release, chart, "-n", &ns, "--reuse-values", "--set", "replicaCount=4"]).unwrap_or_else(|e| panic!("helm upgrade: {e}"));
    assert!(out.contains("STATUS: deployed"), "{out}");
    eventually(Duration::from_secs(60), "4 replicas Running", || running(4)).await;

    let out = helm(&["uninstall", &release, "-n", &ns, "--wait"]).unwrap_or_else(|e| panic!("helm uninstall: {e}"));
    assert!(out.contains("uninstalled"), "{out}");
    assert!(deploys.get_opt(&name).await.unwrap().is_none(), "the Deployment outlived helm uninstall");
    for (kind, obj, namespaced) in &rbac {
        assert!(!get(kind, obj, *namespaced), "{kind} {obj} outlived helm uninstall");
    }
    common::cleanup(&client, &ns).await;
}

/// The alert rules the chart renders (release `shoal` in `shoal-system`), as a Prometheus
/// rules file.
fn rules_file(dir: &Path) -> (PathBuf, Vec<Value>) {
    let docs = parse_yaml(&try_helm_template("shoal", "shoal-system", &["--set", "metrics.prometheusRule.enabled=true"]).unwrap());
    let groups = find(&docs, "PrometheusRule").expect("a PrometheusRule")["spec"]["groups"].clone();
    let path = dir.join("rules.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&json!({"groups": groups})).unwrap()).unwrap();
    let rules = groups.as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect();
    (path, rules)
}

fn promtool(args: &[&str]) -> Result<String, String> {
    let out = Command::new("promtool").args(args).output().expect("promtool (Debian's prometheus package; .ci/run installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(text) }
}

/// The selector the default alerts use, on a replica's series.
const SERIES: &str = r#"job="shoal-metrics",namespace="shoal-system""#;

/// Input series for promtool: (series, values).
type Series = Vec<(String, &'static str)>;
/// An alert, series under which it fires, the sample its expression then gives (labels,
/// value), and series under which it is quiet.
type Scenario = (&'static str, Series, (&'static str, f64), Series);

/// For each alert: series under which it fires (and the sample its expression then gives),
/// and series under which it stays quiet. Every quiet case also has the firing series of
/// another release (another job), which the alert must not look at.
fn scenarios() -> Vec<Scenario> {
    let s = |name: &str, labels: &str| format!("{name}{{{SERIES},{labels}}}");
    vec![
        // 31 of 32 shards held; and no replica at all.
        (
            "ShoalShardWithoutOwner",
            vec![(s("shoal_shards_owned", r#"pod="a""#), "16x30"), (s("shoal_shards_owned", r#"pod="b""#), "15x30")],
            ("{}", 31.0),
            vec![(s("shoal_shards_owned", r#"pod="a""#), "16x30"), (s("shoal_shards_owned", r#"pod="b""#), "16x30")],
        ),
        ("ShoalShardWithoutOwner", vec![], ("{}", 0.0), vec![(s("shoal_shards_owned", r#"pod="a""#), "32x30")]),
        (
            "ShoalShardsUnbalanced",
            vec![(s("shoal_shards_owned", r#"pod="a""#), "20x30"), (s("shoal_shards_owned", r#"pod="b""#), "12x30")],
            ("{}", 8.0),
            vec![(s("shoal_shards_owned", r#"pod="a""#), "11x30"), (s("shoal_shards_owned", r#"pod="b""#), "11x30"), (s("shoal_shards_owned", r#"pod="c""#), "10x30")],
        ),
        (
            "ShoalReconcileErrors",
            vec![
                (s("controller_runtime_reconcile_total", r#"pod="a",controller="workflow",result="success""#), "0+3x30"),
                (s("controller_runtime_reconcile_total", r#"pod="a",controller="workflow",result="error""#), "0+1x30"),
            ],
            (r#"{controller="workflow"}"#, 0.25),
            vec![
                (s("controller_runtime_reconcile_total", r#"pod="a",controller="workflow",result="success""#), "0+30x30"),
                (s("controller_runtime_reconcile_total", r#"pod="a",controller="workflow",result="error""#), "0+1x30"),
            ],
        ),
        (
            "ShoalWebhookDeliveryFailures",
            vec![(s("shoal_webhook_deliveries_total", r#"pod="a",outcome="failed""#), "0+1x30")],
            ("{}", 15.0),
            vec![
                (s("shoal_webhook_deliveries_total", r#"pod="a",outcome="delivered""#), "0+9x30"),
                (s("shoal_webhook_deliveries_total", r#"pod="a",outcome="gone""#), "0+1x30"),
                (s("shoal_webhook_deliveries_total", r#"pod="a",outcome="failed""#), "0x30"),
            ],
        ),
        (
            "ShoalLeaseFlapping",
            vec![(s("shoal_shard_releases_total", r#"pod="a",reason="renew_deadline""#), "0+1x30")],
            ("{}", 15.0),
            vec![(s("shoal_shard_releases_total", r#"pod="a",reason="rebalance""#), "0+5x30"), (s("shoal_shard_releases_total", r#"pod="a",reason="shutdown""#), "0+5x30")],
        ),
    ]
}

/// The rules are valid (`promtool check rules`), and each alert's expression, as rendered,
/// fires on the series of its trouble and stays quiet on healthy series and on another
/// release's (`promtool test rules`).
#[test]
fn alert_rules_pass_promtool_and_fire_when_they_should() {
    let dir = std::env::temp_dir().join(format!("shoal-test-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (path, rules) = rules_file(&dir);
    let out = promtool(&["check", "rules", path.to_str().unwrap()]).unwrap_or_else(|e| panic!("promtool check rules: {e}"));
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    let expr = |alert: &str| rules.iter().find(|r| r["alert"] == alert).unwrap_or_else(|| panic!("no alert {alert}"))["expr"].as_str().unwrap().to_string();
    let names: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["ShoalShardWithoutOwner", "ShoalShardsUnbalanced", "ShoalReconcileErrors", "ShoalWebhookDeliveryFailures", "ShoalLeaseFlapping"]));

    let mut tests = vec![];
    for (alert, firing, sample, quiet) in scenarios() {
        let series = |list: &[(String, &str)]| list.iter().map(|(s, v)| json!({"series": s, "values": v})).collect::<Vec<_>>();
        let (labels, value) = sample;
        tests.push(json!({"interval": "1m", "input_series": series(&firing), "promql_expr_test": [{"expr": expr(alert), "eval_time": "20m", "exp_samples": [{"labels": labels, "value": value}]}]}));
        // Another release's trouble does not count.
        let mut quiet = series(&quiet);
        quiet.extend(firing.iter().map(|(s, v)| json!({"series": s.replace(r#"job="shoal-metrics""#, r#"job="other-shoal-metrics""#), "values": v})));
        tests.push(json!({"interval": "1m", "input_series": quiet, "promql_expr_test": [{"expr": expr(alert), "eval_time": "20m", "exp_samples": []}]}));
    }
    let test_file = dir.join("tests.yaml");
    std::fs::write(&test_file, serde_yaml_ng::to_string(&json!({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})).unwrap()).unwrap();
    let out = promtool(&["test", "rules", test_file.to_str().unwrap()]).unwrap_or_else(|e| panic!("promtool test rules:\n{e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    // Stopped on purpose (replicaCount 0): no shard has an owner, and that is no alert.
    let docs = parse_yaml(&try_helm_template("shoal", "shoal-system", &["--set", "metrics.prometheusRule.enabled=true", "--set", "replicaCount=0"]).unwrap());
    let alerts: Vec<&str> = find(&docs, "PrometheusRule").unwrap()["spec"]["groups"][0]["rules"].as_array().unwrap().iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert!(!alerts.contains(&"ShoalShardWithoutOwner") && alerts.len() == 4, "{alerts:?}");
}

/// The metric names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            // A series selector: a name followed by `{`.
            if bytes.get(i) == Some(&b'{') {
                out.insert(expr[start..i].to_string());
            }
        } else if bytes[i] == b'"' {
            // Skip a label value.
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += 1;
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// A replica configured as the chart configures it (its RUST_LOG and SHOAL_LOG_FORMAT with
/// `logFormat=json`) writes JSON log lines; it serves every metric the alerts and NOTES.txt
/// use; and the commands NOTES.txt gives show its Leases and its readiness.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_set_up_like_the_chart_matches_its_alerts_notes_and_log_format() {
    let client = common::client().await;
    let ops = common::namespace(&client, "helm-notes").await;
    let work = common::namespace(&client, "helm-notes-work").await;
    let docs = parse_yaml(&try_helm_template("shoal", &ops, &["--set", "logFormat=json", "--set", r"logLevel=info\,kube=warn"]).unwrap());
    let env = env_of(find(&docs, "Deployment").unwrap());
    let (rust_log, format) = (env["RUST_LOG"].as_str().unwrap().to_string(), env["SHOAL_LOG_FORMAT"].as_str().unwrap().to_string());
    let mut op = Operator::new(&ops, &work);
    op.extra_args = ["--shards", "4"].iter().map(|s| s.to_string()).collect();
    op.start_with("r1", "notes-r1", &[("RUST_LOG", rust_log.as_str()), ("SHOAL_LOG_FORMAT", format.as_str())]);
    let port = op.replicas[0].metrics_port;
    eventually(Duration::from_secs(60), "the replica ready", || async { (http_get(port, "/readyz").await?.0 == 200).then_some(()) }).await;

    // JSON logs: every line one object, "shoal started" among them.
    let log = std::fs::read_to_string(op.dir.join("r1.stderr")).unwrap();
    let lines: Vec<Value> = log.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "shoal started" && l["level"] == "INFO"), "{log}");

    // NOTES.txt, as `helm install` prints it for this namespace.
    let notes = helm(&["install", "shoal", chart().to_str().unwrap(), "-n", &ops, "--dry-run=client"]).unwrap_or_else(|e| panic!("helm install --dry-run: {e}"));
    let notes = notes.split_once("NOTES:").unwrap_or_else(|| panic!("no NOTES in:\n{notes}")).1.to_string();
    // Its Lease command shows the shard Leases and their holder.
    let cmd = notes.lines().map(str::trim).find(|l| l.starts_with("kubectl") && l.contains("get leases")).expect("a get leases command in NOTES.txt");
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let leases = eventually(Duration::from_secs(30), "the shard Leases in NOTES.txt's command", || {
        let out = Command::new(common::bin_dir().join("kubectl")).args(&args).env("KUBECONFIG", common::kubeconfig()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        async move { (text.lines().filter(|l| l.starts_with("shoal-shard-") && l.contains("notes-r1") && l.trim_end().ends_with(" shard")).count() == 4).then_some(text) }
    })
    .await;
    assert!(leases.lines().next().is_some_and(|h| h.contains("HOLDER") && h.contains("LEASE-ROLE")), "{leases}");

    // Every metric the alerts and NOTES.txt use is one the replica serves. A labelled family
    // shows only once it has a sample: a reconcile (a workflow), and a shard handed over (a
    // second replica joins) make the ones the alerts use appear.
    let api: Api<Workflow> = Api::namespaced(client.clone(), &work);
    api.create(&PostParams::default(), &wf("notes", json!({"containers": [step("a", &[])]}))).await.unwrap();
    eventually(Duration::from_secs(60), "a reconcile counted", || async { metrics_page(port).await?.contains("controller_runtime_reconcile_total{").then_some(()) }).await;
    op.start_with("r2", "notes-r2", &[("RUST_LOG", rust_log.as_str()), ("SHOAL_LOG_FORMAT", format.as_str())]);
    let page = eventually(Duration::from_secs(60), "r1 handing shards over to r2", || async { metrics_page(port).await.filter(|p| p.contains("shoal_shard_releases_total{")) }).await;
    let served: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut it = l.split_whitespace();
            let (name, kind) = (it.next().unwrap_or_default().to_string(), it.next().unwrap_or_default());
            // Counters' samples carry _total.
            let total = (kind == "counter").then(|| format!("{name}_total"));
            std::iter::once(name).chain(total)
        })
        .collect();
    let (_, rules) = rules_file(&op.dir);
    let mut used: BTreeSet<String> = rules.iter().flat_map(|r| metric_names(r["expr"].as_str().unwrap())).collect();
    assert!(used.len() >= 4, "{used:?}");
    for l in notes.lines().filter(|l| l.contains("grep -E")) {
        let names = l.split_once("'^(").unwrap().1.split_once(")'").unwrap().0;
        used.extend(names.split('|').map(String::from));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "the alerts or NOTES.txt use {missing:?}, which shoal run does not serve");
    assert!(notes.contains("/readyz"), "{notes}");
    drop(op);
    common::cleanup(&client, &work).await;
    common::cleanup(&client, &ops).await;
}

/// Every dashboard in helm/shoal/dashboards/ is in the ConfigMap, as it is in the file, and
/// is valid JSON with a title and a uid.
#[test]
fn the_dashboard_configmap_carries_every_dashboard() {
    let docs = parse_yaml(&try_helm_template("shoal", "shoal-system", &["--set", "grafanaDashboard.enabled=true"]).unwrap());
    let cm = find(&docs, "ConfigMap").expect("the dashboards ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let data = cm["data"].as_object().unwrap();
    let dir = chart().join("dashboards");
    let files: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    assert!(files.contains_key("shoal.json"), "{files:?}");
    assert_eq!(data.keys().cloned().collect::<BTreeSet<_>>(), files.keys().cloned().collect::<BTreeSet<_>>());
    for (name, text) in &files {
        assert_eq!(data[name].as_str().unwrap().trim_end(), text.trim_end(), "{name} differs in the ConfigMap");
        let d: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(d["title"].is_string() && d["uid"].is_string(), "{name}: a dashboard needs a title and a uid");
    }
}
