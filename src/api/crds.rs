//! Generates the CustomResourceDefinition of every shoal kind from the Rust types. The output
//! is committed under `crds/` and a test fails when it drifts.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{ActionPlugin, Activity, ActivityWorker, Ignitor, NamespaceManager, Task, Workflow};

/// Every shoal CRD, in a fixed order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        with_env_bounds(Workflow::crd()),
        with_env_bounds(Activity::crd()),
        with_env_bounds(ActivityWorker::crd()),
        without_template_descriptions(Task::crd()),
        Ignitor::crd(),
        NamespaceManager::crd(),
        ActionPlugin::crd(),
    ]
}

/// File name of a CRD under `crds/`: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as a YAML document.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    // Serialising a CRD built from our own types cannot fail: it is plain data.
    serde_yaml_ng::to_string(crd).expect("a CRD always serialises")
}

/// Every CRD as one multi-document YAML stream.
pub fn all_yaml() -> String {
    all().iter().map(|c| format!("---\n{}", to_yaml(c))).collect()
}

/// The pod template's schema carries the whole PodSpec documentation (about 0.5 MB), which
/// `kubectl explain` users can read on the Pod kind itself. Dropping it keeps the Task CRD
/// small enough for client-side `kubectl apply`, as kubebuilder's `maxDescLen=0` does.
fn without_template_descriptions(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else {
            continue;
        };
        let Some(template) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")).and_then(|s| s.properties.as_mut()).and_then(|p| p.get_mut("template")) else {
            continue;
        };
        // JSONSchemaProps round-trips through JSON losslessly; a failure here would be a bug
        // in k8s-openapi, so keep the original schema rather than lose it.
        if let Ok(mut v) = serde_json::to_value(&*template) {
            strip(&mut v);
            if let Some(obj) = v.as_object_mut() {
                obj.insert("description".into(), "Pod template (core/v1 PodTemplateSpec) run for each start of the task.".into());
            }
            if let Ok(stripped) = serde_json::from_value(v) {
                *template = stripped;
            }
        }
    }
    crd
}

/// core/v1 EnvVar's schema has no length bounds; give every `env[].name` and `env[].value`
/// one so that no object can grow towards etcd's limit through them.
fn with_env_bounds(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        let serde_json::Value::Object(m) = v else {
            return;
        };
        if let Some(env_items) = m.get_mut("properties").and_then(|p| p.get_mut("env")).and_then(|e| e.get_mut("items")).and_then(|i| i.get_mut("properties")) {
            if let Some(name) = env_items.get_mut("name").and_then(|n| n.as_object_mut()) {
                name.insert("maxLength".into(), 256.into());
            }
            if let Some(value) = env_items.get_mut("value").and_then(|n| n.as_object_mut()) {
                value.insert("maxLength".into(), 32768.into());
            }
        }
        for child in m.values_mut() {
            match child {
                serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
                other => walk(other),
            }
        }
    }
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else {
            continue;
        };
        if let Ok(mut v) = serde_json::to_value(&*schema) {
            walk(&mut v);
            if let Ok(bounded) = serde_json::from_value(v) {
                *schema = bounded;
            }
        }
    }
    crd
}
