//! What the harness sees through its own watches: when each step's Job (Job executor) or
//! bare pod (Pod executor) appeared and finished, when each workflow reached its end, and
//! every step object's UID per step attempt, which is the duplicate check. Times are seconds
//! since the run's start, on this machine's clock, so a dependency's finish and its
//! dependent's creation are read by the same observer.
//!
//! It only watches; it never writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use crate::api::Workflow;
use crate::api::workflow::WorkflowPhase;
use crate::controllers::workflow::{ATTEMPT_LABEL, GENERATION_LABEL, STEP_LABEL, WORKFLOW_LABEL, WORKFLOW_UID_LABEL};

/// Label on the bare Jobs and bare pods of the ceiling run.
pub const BARE_LABEL: &str = "loadtest.shoal.dev/bare";
/// Label on the step pods of the Pod executor (the pods of a step's Job do not carry it).
pub const EXECUTOR_LABEL: &str = "shoal.dev/executor";

/// What runs a step attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepObject {
    #[default]
    Job,
    Pod,
}

#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub added: f64,
    pub done: Option<f64>,
    pub failed: bool,
    pub kind: StepObject,
}

/// One step attempt: (namespace, workflow, workflow UID, step, generation, attempt), from the
/// labels of its Job or pod. Two objects under one key are a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepKey {
    pub namespace: String,
    pub workflow: String,
    pub workflow_uid: String,
    pub step: String,
    pub generation: String,
    pub attempt: String,
}

impl StepKey {
    pub fn from_labels(namespace: &str, labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Some(Self {
            namespace: namespace.to_string(),
            workflow: labels.get(WORKFLOW_LABEL)?.clone(),
            workflow_uid: get(WORKFLOW_UID_LABEL),
            step: get(STEP_LABEL),
            generation: get(GENERATION_LABEL),
            attempt: get(ATTEMPT_LABEL),
        })
    }
}

impl std::fmt::Display for StepKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}@{}#{}", self.namespace, self.workflow, self.step, self.generation, self.attempt)
    }
}

#[derive(Debug, Clone, Default)]
pub struct WorkflowSeen {
    pub created: Option<f64>,
    pub ended: Option<f64>,
    pub phase: Option<WorkflowPhase>,
    /// step name -> the UID its status records (its Job's, or its pod's), at the end.
    pub recorded_uids: BTreeMap<String, String>,
    /// `status.executor`, where the operator records it.
    pub executor: Option<String>,
}

#[derive(Debug, Default)]
pub struct Observed {
    /// Every step object UID (Job or pod) seen per step attempt: more than one is a duplicate.
    pub step_uids: HashMap<StepKey, BTreeSet<String>>,
    /// Step objects by UID.
    pub steps: HashMap<String, Seen>,
    /// The ceiling run's bare Jobs or pods by UID.
    pub bare: HashMap<String, Seen>,
    /// (namespace, name) -> what happened to the workflow.
    pub workflows: HashMap<(String, String), WorkflowSeen>,
}

impl Observed {
    /// Step attempts with more than one object (Job or pod): "key (n objects)", sorted.
    pub fn duplicates(&self) -> Vec<String> {
        let mut v: Vec<String> = self.step_uids.iter().filter(|(_, u)| u.len() > 1).map(|(k, u)| format!("{k} ({} objects)", u.len())).collect();
        v.sort();
        v
    }

    /// Step objects seen, Jobs and pods.
    pub fn step_objects(&self) -> (usize, usize) {
        let pods = self.steps.values().filter(|s| s.kind == StepObject::Pod).count();
        (self.steps.len() - pods, pods)
    }

    /// Record a step object (Job or pod) seen in state `done` (`Some(failed)` once finished).
    pub fn step_seen(&mut self, key: StepKey, uid: &str, kind: StepObject, t: f64, done: Option<bool>) {
        self.step_uids.entry(key).or_default().insert(uid.to_string());
        let seen = self.steps.entry(uid.to_string()).or_insert_with(|| Seen { added: t, kind, ..Default::default() });
        finish(seen, t, done);
    }
}

fn finish(seen: &mut Seen, t: f64, done: Option<bool>) {
    if let (None, Some(failed)) = (seen.done, done) {
        seen.done = Some(t);
        seen.failed = failed;
    }
}

#[derive(Clone)]
pub struct Observer {
    pub t0: Instant,
    /// Only objects in namespaces with this prefix are this run's.
    pub ns_prefix: String,
    pub state: Arc<Mutex<Observed>>,
}

/// `Some(failed)` once a Job has finished.
fn job_done(j: &Job) -> Option<bool> {
    let conds = j.status.as_ref()?.conditions.as_ref()?;
    conds.iter().filter(|c| c.status == "True").find_map(|c| match c.type_.as_str() {
        "Complete" => Some(false),
        "Failed" => Some(true),
        _ => None,
    })
}

/// `Some(failed)` once a pod has finished.
pub fn pod_done(p: &Pod) -> Option<bool> {
    match p.status.as_ref()?.phase.as_deref()? {
        "Succeeded" => Some(false),
        "Failed" => Some(true),
        _ => None,
    }
}

/// The parts of a workflow's status the harness reads, read leniently: the operator's API
/// may grow fields (`status.executor`) before this branch's types do.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    #[serde(default)]
    pub workflow_status: Option<WorkflowPhase>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    #[serde(default)]
    pub executor: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    pub step_name: String,
    #[serde(default)]
    pub job_uid: Option<String>,
    #[serde(default)]
    pub pod_uid: Option<String>,
}

impl Observer {
    pub fn new(ns_prefix: String) -> Self {
        Self { t0: Instant::now(), ns_prefix, state: Arc::default() }
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn created(&self, ns: &str, name: &str) {
        let t = self.now();
        self.lock().workflows.entry((ns.into(), name.into())).or_default().created = Some(t);
    }

    fn ours(&self, ns: &str) -> bool {
        ns.starts_with(&self.ns_prefix)
    }

    fn on_object(&self, ns: String, uid: String, labels: &BTreeMap<String, String>, kind: StepObject, done: Option<bool>) {
        if !self.ours(&ns) {
            return;
        }
        let t = self.now();
        let mut st = self.lock();
        if labels.contains_key(BARE_LABEL) {
            let seen = st.bare.entry(uid).or_insert_with(|| Seen { added: t, kind, ..Default::default() });
            finish(seen, t, done);
        } else if let Some(key) = StepKey::from_labels(&ns, labels) {
            st.step_seen(key, &uid, kind, t, done);
        }
    }

    fn on_job(&self, j: &Job) {
        self.on_object(j.namespace().unwrap_or_default(), j.uid().unwrap_or_default(), j.labels(), StepObject::Job, job_done(j));
    }

    fn on_pod(&self, p: &Pod) {
        self.on_object(p.namespace().unwrap_or_default(), p.uid().unwrap_or_default(), p.labels(), StepObject::Pod, pod_done(p));
    }

    fn on_workflow(&self, w: &DynamicObject) {
        let ns = w.namespace().unwrap_or_default();
        if !self.ours(&ns) {
            return;
        }
        let Some(status) = w.data.get("status").and_then(|s| serde_json::from_value::<StatusView>(s.clone()).ok()) else { return };
        let Some(phase) = status.workflow_status.filter(|p| matches!(p, WorkflowPhase::Completed | WorkflowPhase::Failed)) else { return };
        let t = self.now();
        let mut st = self.lock();
        let seen = st.workflows.entry((ns, w.name_any())).or_default();
        if seen.ended.is_none() {
            seen.ended = Some(t);
        }
        seen.phase = Some(phase);
        seen.executor = status.executor;
        seen.recorded_uids = status.steps.into_iter().filter_map(|s| Some((s.step_name, s.pod_uid.or(s.job_uid)?))).collect();
    }

    /// Watch every step Job, step pod (Pod executor), bare Job, bare pod and workflow until
    /// the tasks are aborted. The pods of a step's Job are not watched: the Job stands for
    /// them, and watching them would add to what the Job executor's runs cost.
    pub fn spawn(&self, client: &Client) -> Vec<tokio::task::JoinHandle<()>> {
        let (a, b, c, d, e) = (self.clone(), self.clone(), self.clone(), self.clone(), self.clone());
        let step_jobs = watch(Api::<Job>::all(client.clone()), WORKFLOW_LABEL.into(), move |j| a.on_job(&j));
        let step_pods = watch(Api::<Pod>::all(client.clone()), format!("{EXECUTOR_LABEL}=pod"), move |p| b.on_pod(&p));
        let bare_jobs = watch(Api::<Job>::all(client.clone()), BARE_LABEL.into(), move |j| c.on_job(&j));
        let bare_pods = watch(Api::<Pod>::all(client.clone()), BARE_LABEL.into(), move |p| d.on_pod(&p));
        let workflows = watch(Api::<DynamicObject>::all_with(client.clone(), &workflow_resource()), String::new(), move |w| e.on_workflow(&w));
        vec![tokio::spawn(step_jobs), tokio::spawn(step_pods), tokio::spawn(bare_jobs), tokio::spawn(bare_pods), tokio::spawn(workflows)]
    }
}

/// The Workflow resource, for untyped reads and writes (fields this branch's types lack are
/// kept).
pub fn workflow_resource() -> ApiResource {
    ApiResource::erase::<Workflow>(&())
}

/// Apply and delete events alike: an object deleted soon after it finished (garbage
/// collection) still shows its last state.
async fn watch<K, F>(api: Api<K>, labels: String, mut f: F)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: FnMut(K),
{
    use kube::runtime::WatchStreamExt;
    let cfg = watcher::Config::default().labels(&labels).any_semantic();
    let mut s = std::pin::pin!(watcher(api, cfg).default_backoff());
    while let Some(ev) = s.next().await {
        if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) = ev {
            f(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(wf: &str, step: &str, attempt: &str) -> BTreeMap<String, String> {
        [(WORKFLOW_LABEL, wf), (WORKFLOW_UID_LABEL, "u1"), (STEP_LABEL, step), (GENERATION_LABEL, "1"), (ATTEMPT_LABEL, attempt)].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": phase}})).unwrap()
    }

    #[test]
    fn two_objects_for_one_step_attempt_are_a_duplicate_whatever_their_kind() {
        let mut st = Observed::default();
        let key = |attempt: &str| StepKey::from_labels("n", &labels("w", "s0", attempt)).unwrap();
        st.step_seen(key("0"), "pod-a", StepObject::Pod, 1.0, None);
        st.step_seen(key("0"), "pod-a", StepObject::Pod, 2.0, Some(false));
        st.step_seen(key("1"), "pod-b", StepObject::Pod, 3.0, None);
        assert!(st.duplicates().is_empty(), "one pod per attempt, seen twice, is no duplicate");
        st.step_seen(key("1"), "pod-c", StepObject::Pod, 4.0, None);
        assert_eq!(st.duplicates(), vec!["n/w/s0@1#1 (2 objects)".to_string()]);
        st.step_seen(key("0"), "job-a", StepObject::Job, 5.0, None);
        assert_eq!(st.duplicates().len(), 2, "a Job beside the attempt's pod is a duplicate too");
        assert_eq!(st.step_objects(), (1, 3));
        assert_eq!(st.steps["pod-a"].done, Some(2.0), "done when first seen finished");
    }

    #[test]
    fn another_generation_is_another_attempt() {
        let mut l = labels("w", "s0", "0");
        let a = StepKey::from_labels("n", &l).unwrap();
        l.insert(GENERATION_LABEL.into(), "2".into());
        let b = StepKey::from_labels("n", &l).unwrap();
        assert_ne!(a, b);
        assert!(StepKey::from_labels("n", &BTreeMap::new()).is_none(), "not a step object");
    }

    #[test]
    fn pods_finish_in_a_terminal_phase() {
        assert_eq!(pod_done(&pod("Succeeded")), Some(false));
        assert_eq!(pod_done(&pod("Failed")), Some(true));
        assert_eq!(pod_done(&pod("Running")), None);
    }

    #[test]
    fn status_read_leniently() {
        let v: StatusView = serde_json::from_value(serde_json::json!({"workflowStatus": "Completed", "executor": "Pod", "future": 1,
            "steps": [{"stepName": "a", "phase": "Succeeded", "jobUid": "j"}, {"stepName": "b", "podUid": "p"}]}))
        .unwrap();
        assert_eq!((v.workflow_status, v.executor.as_deref(), v.steps.len()), (Some(WorkflowPhase::Completed), Some("Pod"), 2));
    }
}
