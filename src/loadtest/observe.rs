//! What the harness sees through its own watches: when each Job appeared and finished, when
//! each workflow reached its end, and every Job UID per (workflow, step, attempt), which is
//! the duplicate check. Times are seconds since the run's start, on this machine's clock, so
//! a dependency's finish and its dependent's creation are read by the same observer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::api::Workflow;
use crate::api::workflow::WorkflowPhase;
use crate::controllers::workflow::{ATTEMPT_LABEL, STEP_LABEL, WORKFLOW_LABEL};

/// Label on the bare Jobs of the ceiling run.
pub const BARE_LABEL: &str = "loadtest.shoal.dev/bare";

#[derive(Debug, Clone, Default)]
pub struct JobSeen {
    pub added: f64,
    pub done: Option<f64>,
    pub failed: bool,
}

/// (namespace, workflow, step, attempt) of a step Job.
pub type StepKey = (String, String, String, String);

#[derive(Debug, Clone, Default)]
pub struct WorkflowSeen {
    pub created: Option<f64>,
    pub ended: Option<f64>,
    pub phase: Option<WorkflowPhase>,
    /// step name -> the Job UID its status records, at the end.
    pub recorded_uids: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub struct Observed {
    /// Every Job UID seen per step attempt: more than one is a duplicate.
    pub step_uids: HashMap<StepKey, BTreeSet<String>>,
    pub jobs: HashMap<String, JobSeen>,
    pub bare: HashMap<String, JobSeen>,
    /// (namespace, name) -> what happened to the workflow.
    pub workflows: HashMap<(String, String), WorkflowSeen>,
}

#[derive(Clone)]
pub struct Observer {
    pub t0: Instant,
    /// Only objects in namespaces with this prefix are this run's.
    pub ns_prefix: String,
    pub state: Arc<Mutex<Observed>>,
}

fn job_done(j: &Job) -> Option<bool> {
    let conds = j.status.as_ref()?.conditions.as_ref()?;
    conds.iter().filter(|c| c.status == "True").find_map(|c| match c.type_.as_str() {
        "Complete" => Some(false),
        "Failed" => Some(true),
        _ => None,
    })
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

    fn on_job(&self, j: &Job) {
        let ns = j.namespace().unwrap_or_default();
        if !ns.starts_with(&self.ns_prefix) {
            return;
        }
        let t = self.now();
        let uid = j.uid().unwrap_or_default();
        let labels = j.labels();
        let done = job_done(j);
        let mut st = self.lock();
        let seen = if labels.contains_key(BARE_LABEL) {
            st.bare.entry(uid.clone()).or_insert_with(|| JobSeen { added: t, ..Default::default() })
        } else if let Some(wf) = labels.get(WORKFLOW_LABEL) {
            let key = (ns, wf.clone(), labels.get(STEP_LABEL).cloned().unwrap_or_default(), labels.get(ATTEMPT_LABEL).cloned().unwrap_or_default());
            st.step_uids.entry(key).or_default().insert(uid.clone());
            st.jobs.entry(uid.clone()).or_insert_with(|| JobSeen { added: t, ..Default::default() })
        } else {
            return;
        };
        if let (None, Some(failed)) = (seen.done, done) {
            seen.done = Some(t);
            seen.failed = failed;
        }
    }

    fn on_workflow(&self, w: &Workflow) {
        let ns = w.namespace().unwrap_or_default();
        if !ns.starts_with(&self.ns_prefix) {
            return;
        }
        let Some(status) = &w.status else { return };
        let Some(phase) = status.workflow_status.filter(|p| matches!(p, WorkflowPhase::Completed | WorkflowPhase::Failed)) else { return };
        let t = self.now();
        let mut st = self.lock();
        let seen = st.workflows.entry((ns, w.name_any())).or_default();
        if seen.ended.is_none() {
            seen.ended = Some(t);
        }
        seen.phase = Some(phase);
        seen.recorded_uids = status.steps.iter().filter_map(|s| Some((s.step_name.clone(), s.job_uid.clone()?))).collect();
    }

    /// Watch every step Job, bare Job and workflow until the tasks are aborted.
    pub fn spawn(&self, client: &Client) -> Vec<tokio::task::JoinHandle<()>> {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        let step_jobs = watch(Api::<Job>::all(client.clone()), WORKFLOW_LABEL, move |j| a.on_job(&j));
        let bare_jobs = watch(Api::<Job>::all(client.clone()), BARE_LABEL, move |j| b.on_job(&j));
        let workflows = watch(Api::<Workflow>::all(client.clone()), "", move |w| c.on_workflow(&w));
        vec![tokio::spawn(step_jobs), tokio::spawn(bare_jobs), tokio::spawn(workflows)]
    }
}

async fn watch<K, F>(api: Api<K>, labels: &str, mut f: F)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: FnMut(K),
{
    use kube::runtime::WatchStreamExt;
    let cfg = watcher::Config::default().labels(labels).any_semantic();
    let mut s = std::pin::pin!(watcher(api, cfg).default_backoff());
    while let Some(ev) = s.next().await {
        if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
            f(o);
        }
    }
}
