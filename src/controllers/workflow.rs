//! The Workflow reconciler. Today it validates the step graph and moves a new workflow to
//! `Started` (seed 001's first transition) or to `Failed` with reason `InvalidSpec`;
//! running the steps as Jobs is the Workflow controller issue.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

use super::{Ctx, Error};
use crate::api::conditions::{self, reasons, types};
use crate::api::workflow::{Workflow, WorkflowPhase};
use crate::core::dag;
use crate::ha::{Action, Fence};

/// Reconcile one workflow under `fence`.
pub async fn reconcile(wf: Arc<Workflow>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    if !ctx.own.record(fence, wf.as_ref(), "reconcile") {
        return Ok(Action::AwaitChange);
    }
    let generation = wf.metadata.generation;
    let status = wf.status.clone().unwrap_or_default();
    let up_to_date = status.workflow_status.is_some() && status.observed_generation == generation;
    if up_to_date {
        return Ok(Action::Requeue(ctx.resync));
    }
    // Plan (pure): is the graph a DAG?
    let edges: Vec<dag::Edges<'_>> = wf.spec.containers.iter().map(|c| (c.step_name.as_str(), c.depends_on.as_deref().unwrap_or(&[]))).collect();
    let now = Time(Timestamp::now());
    let mut conds = status.conditions.clone();
    let (phase, message) = match dag::validate(&edges) {
        Ok(()) => {
            conditions::set_condition(&mut conds, conditions::condition(types::PROGRESSING, true, "Started", "workflow started", generation, now.clone()));
            (WorkflowPhase::Started, "workflow started".to_string())
        }
        Err(e) => {
            conditions::set_condition(&mut conds, conditions::condition(types::FAILED, true, e.reason(), e.to_string(), generation, now.clone()));
            conditions::set_condition(&mut conds, conditions::condition(types::READY, false, reasons::INVALID_SPEC, e.to_string(), generation, now.clone()));
            (WorkflowPhase::Failed, e.to_string())
        }
    };
    // Act: one status patch, guarded by the object's resourceVersion.
    let patch = json!({
        "metadata": {"resourceVersion": wf.resource_version()},
        "status": {
            "workflowStatus": phase,
            "statusChanged": now,
            "message": message,
            "startedSteps": [],
            "executedSteps": [],
            "progress": format!("0/{}", wf.spec.containers.len()),
            "observedGeneration": generation,
            "conditions": conds,
        }
    });
    if !ctx.own.record(fence, wf.as_ref(), &format!("status:{phase:?}")) {
        return Ok(Action::AwaitChange);
    }
    let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &wf.namespace().unwrap_or_default());
    match api.patch_status(&wf.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(Action::Requeue(ctx.resync)),
        // Someone changed the object since we read it; the watch brings the new version.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::AwaitChange),
        Err(e) => Err(e.into()),
    }
}
