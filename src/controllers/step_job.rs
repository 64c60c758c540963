//! The part of a step's Job that the workflow controller reads from its watch.
//!
//! Every Job event a replica receives is decoded. Most of a Job's bytes are its pod template
//! and its managedFields, neither of which the controller reads once the Job exists, and
//! decoding them into k8s-openapi's types costs allocations for every field. `StepJob`
//! names only what the controller uses, so serde skips the rest without building it.
//! Creating, patching and deleting Jobs still goes through k8s-openapi's `Job`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::JobStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::{Deserialize, Deserializer};

/// A Job as the workflow controller caches it: identity, labels, annotations, owners, the
/// deadline and the status.
#[derive(Clone, Debug, Deserialize)]
pub struct StepJob {
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<StepJobSpec>,
    #[serde(default)]
    pub status: Option<JobStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepJobSpec {
    pub active_deadline_seconds: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SlimMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
}

pub(crate) fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = SlimMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        labels: m.labels,
        annotations: m.annotations,
        owner_references: m.owner_references,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

impl kube::Resource for StepJob {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Job".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "batch".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "jobs".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::Job;
    use kube::ResourceExt;
    use serde_json::json;

    #[test]
    fn decodes_what_the_controller_reads_from_a_full_job() {
        let full = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "w-a-g1-0", "namespace": "ns", "uid": "u1", "resourceVersion": "7", "generation": 1,
                "labels": {"shoal.dev/workflow": "w", "shoal.dev/shard": "3"},
                "annotations": {"shoal.dev/cascaded-labels": "team"},
                "ownerReferences": [{"apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "name": "w", "uid": "wu", "controller": true}],
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "shoal", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}],
            },
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 60, "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox", "env": [{"name": "A", "value": "b"}]}]}}},
            "status": {"startTime": "2026-01-01T00:00:01Z", "succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:02Z"}]},
        });
        let slim: StepJob = serde_json::from_value(full.clone()).unwrap();
        let job: Job = serde_json::from_value(full).unwrap();
        assert_eq!(slim.name_any(), job.name_any());
        assert_eq!(slim.namespace(), job.namespace());
        assert_eq!(slim.uid(), job.uid());
        assert_eq!(slim.resource_version(), job.resource_version());
        assert_eq!(slim.labels(), job.labels());
        assert_eq!(slim.annotations(), job.annotations());
        assert_eq!(slim.owner_references(), job.owner_references());
        assert!(slim.metadata.managed_fields.is_none());
        assert_eq!(slim.spec.unwrap().active_deadline_seconds, Some(60));
        assert_eq!(slim.status, job.status);
    }

    #[test]
    fn a_job_without_spec_or_status_still_decodes() {
        let slim: StepJob = serde_json::from_value(json!({"metadata": {"name": "j"}})).unwrap();
        assert_eq!(slim.name_any(), "j");
        assert!(slim.spec.is_none() && slim.status.is_none());
    }
}
