//! The NamespaceManager reconciler (seed 003): observe (the manager, its namespace, the pods
//! a due PODS_SUCCEED check needs) → plan (`core::policy`, pure) → act → record.
//!
//! A firing is recorded before it is acted on: the status write that names the fired policy
//! and the action (state `Pending`, and for a webhook the outbox entry with its delivery id)
//! carries a resourceVersion precondition, so only the current owner, reading the current
//! version, can make it. Everything after that is carried out from what is recorded, by
//! whichever replica owns the manager then:
//! - DELETE and SCALE_DOWN are idempotent Kubernetes writes through the fenced writer;
//! - WEBHOOK is one attempt at a time through the effects outbox (`crate::outbox`), each
//!   attempt recorded, and always under the same delivery id.
//!
//! Once an action has succeeded the manager's `spec.deactivated` is set *before* the success
//! is recorded, so a recorded success always means "deactivated"; editing the manager after
//! that (setting `deactivated: false`, or any other change) arms it again. A failed or
//! dry-run firing stays recorded until the manager is edited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch};
use kube::runtime::events::EventType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;

use super::{Context, Error};
use crate::api::conditions::{self, types};
use crate::api::delivery::{Delivery, DeliveryState};
use crate::api::nsman::{ActionState, ActionStatus, NamespaceManager, NamespaceManagerStatus, Policy, PolicyActionType, WorkloadKind};
use crate::core::policy::{self, PodCheck};
use crate::ha::{Action, Fence, WriteError, Writer};
use crate::outbox::{Attempt, Outbox};

/// The annotation in which SCALE_DOWN records a workload's replica count before scaling it
/// to zero (docs/namespacemanager.md shows how to scale back).
pub const ORIGINAL_REPLICAS_ANNOTATION: &str = "shoal.dev/original-replicas";
/// Deliveries kept in a manager's status (the newest).
pub const KEPT_DELIVERIES: usize = 10;
const DEFAULT_TIMEOUT_SECONDS: i32 = 10;
const DEFAULT_MAX_ATTEMPTS: i32 = 8;
/// How soon a manager whose target is refused or missing is looked at again.
const RECHECK: Duration = Duration::from_secs(30);

/// Operator settings of the NamespaceManager controller.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NsmanConfig {
    /// Let a manager act on a namespace other than its own without that namespace's opt-in
    /// label `shoal.dev/managed-from=<manager namespace>`.
    #[arg(long, env = "SHOAL_ALLOW_CROSS_NAMESPACE", default_value_t = false)]
    pub allow_cross_namespace: bool,
    /// Namespaces never deleted or scaled down, besides kube-system, kube-public,
    /// kube-node-lease, default and the operator's own (comma-separated).
    #[arg(long, env = "SHOAL_PROTECTED_NAMESPACES", value_delimiter = ',')]
    pub protected_namespaces: Vec<String>,
    /// Tests only: abort the process right after a webhook was delivered, before the delivery
    /// is recorded (the crash window the outbox's same-id retry is for).
    #[arg(long, env = "SHOAL_TEST_ABORT_AFTER_DELIVERY", default_value_t = false, hide = true)]
    pub test_abort_after_delivery: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
    pub outcome: String,
}

/// NamespaceManager metrics.
#[derive(Clone)]
pub struct NsmanMetrics {
    /// Actions finished, by type and outcome (succeeded, failed, dry_run).
    pub actions: Family<ActionLabels, Counter>,
    /// How late a TTL policy fired after its due time.
    pub ttl_lateness: crate::metrics::ExemplarHistogram,
}

impl NsmanMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self { actions: Family::default(), ttl_lateness: crate::metrics::exemplar_histogram(&[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]) };
        // Every series from the start, so that a rate sees the first action too.
        for action in [PolicyActionType::Delete, PolicyActionType::ScaleDown, PolicyActionType::Webhook] {
            for outcome in ["succeeded", "failed", "dry_run"] {
                let _ = m.actions.get_or_create(&ActionLabels { action: verb(action).into(), outcome: outcome.into() });
            }
        }
        registry.register("shoal_namespacemanager_actions", "NamespaceManager actions finished, by action and outcome", m.actions.clone());
        registry.register("shoal_namespacemanager_ttl_lateness_seconds", "From a TTL policy's due time to its firing", m.ttl_lateness.clone());
        m
    }
}

/// What the NamespaceManager controller keeps besides the managers.
pub struct State {
    pub config: NsmanConfig,
    /// Protected namespaces besides the built-in ones: the configured list and the operator's own.
    pub protected: Vec<String>,
    pub outbox: Arc<Outbox>,
    pub metrics: NsmanMetrics,
}

impl State {
    pub fn new(config: NsmanConfig, operator_namespace: &str, outbox: Arc<Outbox>, metrics: NsmanMetrics) -> Self {
        let mut protected = config.protected_namespaces.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>();
        protected.push(operator_namespace.to_string());
        Self { config, protected, outbox, metrics }
    }
}

pub type Ctx = Arc<Context<State>>;

/// The namespace a manager manages: `spec.namespace`, or its own when that is empty.
pub fn managed_namespace(m: &NamespaceManager) -> String {
    m.spec.namespace.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| m.namespace().unwrap_or_default())
}

fn destructive(t: PolicyActionType) -> bool {
    matches!(t, PolicyActionType::Delete | PolicyActionType::ScaleDown)
}

fn verb(t: PolicyActionType) -> &'static str {
    match t {
        PolicyActionType::Delete => "DELETE",
        PolicyActionType::ScaleDown => "SCALE_DOWN",
        PolicyActionType::Webhook => "WEBHOOK",
    }
}

/// A status under construction, with the Events to publish once it is recorded.
struct Record {
    status: NamespaceManagerStatus,
    events: Vec<(EventType, &'static str, String)>,
    /// The manager's generation, for the conditions' observedGeneration.
    generation: i64,
    /// The action this record finishes, counted once the record is written.
    finished: Option<ActionLabels>,
    now: Timestamp,
}

impl Record {
    /// Ready / Progressing / Failed in one go.
    fn state(&mut self, ready: bool, progressing: bool, failed: bool, reason: &str, message: &str) {
        conditions::set_state(&mut self.status.conditions, (ready, progressing, failed), reason, message, Some(self.generation), Time(self.now));
    }

    fn event(&mut self, type_: EventType, reason: &'static str, note: String) {
        self.events.push((type_, reason, note));
    }
}

/// Reconcile one manager under `fence`.
pub async fn reconcile(m: Arc<NamespaceManager>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    let Some(w) = ctx.begin(fence, m.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    match reconcile_owned(&m, &w, &ctx).await {
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

async fn reconcile_owned(m: &NamespaceManager, w: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let generation = m.metadata.generation.unwrap_or(0);
    let deactivated = m.spec.deactivated == Some(true);
    let now = Timestamp::now();
    let status = m.status.clone().unwrap_or_default();
    let mut rec = Record { status: status.clone(), events: vec![], generation, finished: None, now };

    // An action that was recorded is carried through, whatever changed since: it may already
    // have had its effect, so it is never dropped or decided again.
    if let Some(a) = status.action.as_ref().filter(|a| a.state == ActionState::Pending) {
        return carry_out(m, a.clone(), rec, w, ctx, now, &mut None).await;
    }
    if let Some(a) = &status.action {
        if a.generation >= generation || deactivated {
            // Finished at this generation (or deactivated since): stay as recorded until the
            // manager is edited. A success is only recorded once deactivated is set.
            rec.status.observed_generation = Some(generation);
            return record(m, rec, w, ctx, Action::AwaitChange).await;
        }
        // Edited since the action finished, and active: armed again, from scratch.
        rec.status.action = None;
        rec.status.fired_policy = None;
        rec.status.fired_at = None;
        rec.status.policies.clear();
        rec.event(EventType::Normal, "Rearmed", format!("armed again at generation {generation}"));
    }
    rec.status.observed_generation = Some(generation);
    if deactivated {
        rec.state(false, false, false, "Deactivated", "deactivated: policies are not evaluated until spec.deactivated is false");
        return record(m, rec, w, ctx, Action::AwaitChange).await;
    }

    // Observe the managed namespace.
    let target = managed_namespace(m);
    let Some(ns) = ctx.read_cluster::<Namespace>().get_opt(&target).await? else {
        rec.state(false, false, false, "NamespaceNotFound", &format!("namespace {target} does not exist"));
        return record(m, rec, w, ctx, Action::Requeue(RECHECK)).await;
    };
    if ns.metadata.deletion_timestamp.is_some() {
        rec.state(false, false, false, "NamespaceTerminating", &format!("namespace {target} is being deleted"));
        return record(m, rec, w, ctx, Action::Requeue(RECHECK)).await;
    }
    let any_destructive = m.spec.policies.iter().any(|p| destructive(p.action.type_));
    if let Err(r) = policy::target_allowed(&m.namespace().unwrap_or_default(), &target, ns.labels(), any_destructive, ctx.config.allow_cross_namespace, &ctx.protected) {
        if conditions::find(&status.conditions, types::READY).is_none_or(|c| c.reason != r.reason) {
            rec.event(EventType::Warning, r.reason, r.message.clone());
        }
        rec.state(false, false, true, r.reason, &r.message);
        return record(m, rec, w, ctx, Action::Requeue(RECHECK)).await;
    }
    let Some(created) = ns.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return Ok(Action::Requeue(RECHECK));
    };

    // The checks that are due.
    let mut checks = HashMap::new();
    for p in policy::due_checks(&m.spec.policies, &rec.status.policies, created, now) {
        let labels = p.condition.params.as_ref().and_then(|x| x.pod_labels.clone()).unwrap_or_default();
        let selector = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        match ctx.read::<Pod>(&target).list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                let succeeded = list.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")).count();
                checks.insert(p.name.clone(), PodCheck { matching: list.items.len(), succeeded });
            }
            Err(kube::Error::Api(e)) if e.code == 400 => {
                let msg = format!("policy {}: podLabels are not a valid label selector: {}", p.name, e.message);
                rec.state(false, false, true, "InvalidSpec", &msg);
                rec.event(EventType::Warning, "InvalidSpec", msg);
                return record(m, rec, w, ctx, Action::AwaitChange).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let eval = policy::evaluate(&m.spec.policies, &rec.status.policies, created, now, &checks);
    rec.status.policies = eval.policies;
    let Some(i) = eval.fired else {
        rec.state(true, false, false, "Armed", "evaluating policies");
        // At the earliest due time (a TTL's, a check's), never later than the resync, and never
        // sooner than 20 ms (no busy loop, whatever the clock does).
        let next = eval.next.map(|t| Duration::from_millis(t.duration_since(now).as_millis().clamp(20, u64::MAX as i128) as u64)).map(|d| d.min(ctx.resync)).unwrap_or(ctx.resync);
        return record(m, rec, w, ctx, Action::Requeue(next)).await;
    };

    // A policy fired: record the intent first.
    let p = &m.spec.policies[i];
    let dry = m.spec.dry_run == Some(true);
    let mut action = ActionStatus {
        policy: p.name.clone(),
        type_: p.action.type_,
        state: if dry { ActionState::DryRun } else { ActionState::Pending },
        generation,
        namespace: target.clone(),
        message: None,
        workloads: vec![],
        delivery_id: None,
        finished_at: None,
    };
    rec.status.fired_policy = Some(p.name.clone());
    rec.status.fired_at = Some(MicroTime(now));
    let what = describe(p, &target);
    if p.action.type_ == PolicyActionType::Webhook {
        let url = p.action.params.as_ref().and_then(|a| a.url.clone()).unwrap_or_default();
        let id = Outbox::delivery_id(&[m.uid().unwrap_or_default().as_str(), &p.name, &generation.to_string()]);
        action.delivery_id = Some(id.clone());
        if let Err(why) = ctx.outbox.check_url(&url) {
            // Refused before any call: recorded as a failed firing, with the reason.
            action.state = if dry { ActionState::DryRun } else { ActionState::Failed };
            action.message = Some(format!("webhook target refused: {why}"));
            action.finished_at = Some(Time(now));
        } else if !dry {
            let payload = serde_json::to_string(&policy::webhook_body(&m.namespace().unwrap_or_default(), &m.name_any(), p, &target))?;
            rec.status.deliveries.push(Delivery::pending(id, url, payload, now));
            let drop = rec.status.deliveries.len().saturating_sub(KEPT_DELIVERIES);
            rec.status.deliveries.drain(..drop);
        }
    }
    if dry {
        if p.action.type_ == PolicyActionType::ScaleDown {
            action.workloads = scale_down(p, &target, None, ctx).await?;
        }
        action.message = Some(match &action.message {
            Some(refused) => format!("dry run: policy {} fired; {refused}", p.name),
            None if action.workloads.is_empty() => format!("dry run: policy {} fired; would {what}", p.name),
            None => format!("dry run: policy {} fired; would {what}: {}", p.name, action.workloads.join(", ")),
        });
        action.finished_at = Some(Time(now));
        let msg = action.message.clone().unwrap_or_default();
        rec.state(true, false, false, "DryRun", &msg);
        rec.event(EventType::Normal, "DryRun", msg);
        rec.finished = Some(ActionLabels { action: verb(p.action.type_).into(), outcome: "dry_run".into() });
        rec.status.action = Some(action);
        return record(m, rec, w, ctx, Action::AwaitChange).await;
    }
    if action.state == ActionState::Failed {
        let msg = action.message.clone().unwrap_or_default();
        rec.state(false, false, true, "WebhookRefused", &msg);
        rec.event(EventType::Warning, "WebhookRefused", msg);
        rec.finished = Some(ActionLabels { action: verb(p.action.type_).into(), outcome: "failed".into() });
        rec.status.action = Some(action);
        return record(m, rec, w, ctx, Action::AwaitChange).await;
    }
    rec.state(true, true, false, "PolicyFired", &format!("policy {} fired: {what}", p.name));
    rec.status.action = Some(action.clone());
    let Some(m) = write(m, &rec.status, w, ctx).await? else {
        // Refused (the object changed since it was read): nothing was decided; plan again.
        return Ok(Action::AwaitChange);
    };
    publish(w, std::mem::take(&mut rec.events)).await;
    if p.condition.type_ == crate::api::nsman::PolicyConditionType::Ttl
        && let Some(due) = policy::next_look(p, None, created)
    {
        ctx.metrics.ttl_lateness.observe(now.duration_since(due).as_secs_f64().max(0.0), crate::metrics::current_exemplar(), None);
    }
    // One Event per firing when the action finishes right here: its outcome Event says why it
    // fired. `PolicyFired` only when the action goes on in a later reconcile (a retry, a
    // backoff, an error), so that the firing is reported when it happens.
    let mut fired = Some(format!("policy {} fired ({}): {what}", p.name, fired_because(p)));
    let r = carry_out(&m, action, rec, w, ctx, now, &mut fired).await;
    if let Some(note) = fired {
        w.event(EventType::Normal, "PolicyFired", note, None).await;
    }
    r
}

fn describe(p: &Policy, target: &str) -> String {
    match p.action.type_ {
        PolicyActionType::Delete => format!("delete namespace {target}"),
        PolicyActionType::ScaleDown => format!("scale down the selected Deployments and StatefulSets in {target}"),
        PolicyActionType::Webhook => format!("call {}", p.action.params.as_ref().and_then(|a| a.url.as_deref()).unwrap_or("")),
    }
}

fn fired_because(p: &Policy) -> String {
    let c = p.condition.params.clone().unwrap_or_default();
    match p.condition.type_ {
        crate::api::nsman::PolicyConditionType::Ttl => format!("TTL of {}s elapsed", c.ttl_seconds.unwrap_or(0)),
        crate::api::nsman::PolicyConditionType::PodsSucceed => format!("pods succeeded on {} consecutive checks", c.min_checks.unwrap_or(policy::DEFAULT_MIN_CHECKS)),
    }
}

/// Carry out the recorded (Pending) action `a` of `m`, then record how it went. `fired` is
/// the `PolicyFired` note when this reconcile fired the policy: taken when the action
/// finishes here (its outcome Event then says why it fired), left for the caller to publish
/// when the action goes on later.
#[allow(clippy::too_many_arguments)]
async fn carry_out(m: &NamespaceManager, mut a: ActionStatus, mut rec: Record, w: &Writer, ctx: &Ctx, now: Timestamp, fired: &mut Option<String>) -> Result<Action, Error> {
    // The fired policy, as the spec has it now. A policy removed while its action was under
    // way: a DELETE or a webhook (its payload is recorded) is finished anyway; a SCALE_DOWN,
    // whose selectors went with it, stops there.
    let p = m.spec.policies.iter().find(|p| p.name == a.policy).cloned();
    let outcome: Result<String, String> = match a.type_ {
        PolicyActionType::Delete => match w.cluster_api::<Namespace>().delete(&a.namespace, &DeleteParams::default()).await {
            Ok(()) => Ok(format!("namespace {} deleted", a.namespace)),
            Err(e @ (WriteError::Fenced | WriteError::Deadline)) => return Err(e.into()),
            Err(e) if e.code() == Some(403) || e.code() == Some(422) => Err(format!("deleting namespace {} was refused: {e}", a.namespace)),
            Err(e) => return Err(e.into()),
        },
        PolicyActionType::ScaleDown => match &p {
            None => Err(format!("policy {} was removed from the spec before its scale-down finished", a.policy)),
            Some(p) => {
                a.workloads = scale_down(p, &a.namespace, Some(w), ctx).await?;
                Ok(if a.workloads.is_empty() { format!("no Deployment or StatefulSet in {} matched", a.namespace) } else { format!("scaled down in {}: {}", a.namespace, a.workloads.join(", ")) })
            }
        },
        PolicyActionType::Webhook => match deliver(m, p.as_ref(), &a, &mut rec, w, ctx, now).await? {
            Delivered::Done(r) => r,
            Delivered::Later(after) => {
                // The attempt (or the wait for the secret) is recorded; the action stays Pending.
                return record(m, rec, w, ctx, Action::Requeue(after)).await;
            }
        },
    };
    let label = |outcome: &str| ActionLabels { action: verb(a.type_).into(), outcome: outcome.into() };
    a.finished_at = Some(Time(now));
    // The version the outcome is written on: the deactivated one when this reconcile
    // deactivates the manager.
    let mut base = std::borrow::Cow::Borrowed(m);
    // The outcome Event's subject: why the policy fired, when it fired in this reconcile.
    let mut subject = || fired.take().unwrap_or_else(|| format!("policy {}", a.policy));
    match outcome {
        Ok(msg) => {
            // Deactivate first: a recorded success then always means "deactivated".
            if m.spec.deactivated != Some(true) {
                let patch = json!({"spec": {"deactivated": true}});
                match ctx.patch(w, m, &Patch::Merge(&patch)).await {
                    // The patch changed no status, so the status on top of the version it made
                    // is still the one this was planned from: the outcome is written there (no
                    // 409), and names the new generation, so that the reconcile our own change
                    // wakes has nothing left to write.
                    Ok(deactivated) if deactivated.status == m.status && deactivated.metadata.uid == m.metadata.uid => base = std::borrow::Cow::Owned(deactivated),
                    Ok(_) => {}
                    // Gone with its namespace (a DELETE of its own namespace): nothing to record.
                    Err(e) if e.code() == Some(404) => return Ok(Action::AwaitChange),
                    Err(e) => return Err(e.into()),
                }
            }
            rec.generation = base.metadata.generation.unwrap_or(rec.generation);
            rec.status.observed_generation = Some(rec.generation);
            a.state = ActionState::Succeeded;
            a.message = Some(msg.clone());
            rec.state(false, false, false, "ActionSucceeded", &format!("{msg}; deactivated"));
            rec.event(EventType::Normal, "ActionSucceeded", format!("{}: {msg}; the manager is deactivated", subject()));
            rec.finished = Some(label("succeeded"));
        }
        Err(msg) => {
            a.state = ActionState::Failed;
            a.message = Some(msg.clone());
            rec.state(false, false, true, "ActionFailed", &msg);
            rec.event(EventType::Warning, "ActionFailed", format!("{}: {msg}", subject()));
            rec.finished = Some(label("failed"));
        }
    }
    rec.status.action = Some(a);
    record(&base, rec, w, ctx, Action::AwaitChange).await
}

enum Delivered {
    /// Finished: Ok(message) delivered, Err(message) given up.
    Done(Result<String, String>),
    /// Not yet: look again after this long.
    Later(Duration),
}

/// One step of the webhook delivery recorded for action `a`: wait for its backoff, or make
/// one attempt through the outbox and put the updated entry into `rec`.
#[allow(clippy::too_many_arguments)]
async fn deliver(m: &NamespaceManager, p: Option<&Policy>, a: &ActionStatus, rec: &mut Record, w: &Writer, ctx: &Ctx, now: Timestamp) -> Result<Delivered, Error> {
    let Some(id) = a.delivery_id.clone() else {
        return Ok(Delivered::Done(Err("no delivery was recorded for this firing".into())));
    };
    let Some(idx) = rec.status.deliveries.iter().position(|d| d.id == id) else {
        return Ok(Delivered::Done(Err(format!("delivery {id} is no longer in status"))));
    };
    let d = rec.status.deliveries[idx].clone();
    match d.state {
        DeliveryState::Delivered => return Ok(Delivered::Done(Ok(format!("webhook delivered ({id})")))),
        DeliveryState::Failed => return Ok(Delivered::Done(Err(d.last_error.unwrap_or_else(|| "webhook delivery failed".into())))),
        DeliveryState::Pending => {}
    }
    if let Some(t) = &d.next_attempt_at
        && t.0 > now
    {
        return Ok(Delivered::Later(Duration::from_millis(t.0.duration_since(now).as_millis().clamp(1, 3_600_000) as u64)));
    }
    // The policy's settings as the spec has them now (the defaults if it was removed); the
    // payload is the one recorded with the delivery, identical on every attempt.
    let params = p.and_then(|p| p.action.params.clone()).unwrap_or_default();
    let secret = match &params.secret_ref {
        None => None,
        Some(r) => {
            let manager_ns = m.namespace().unwrap_or_default();
            let value = ctx.read::<Secret>(&manager_ns).get_opt(&r.name).await?.and_then(|s| s.data).and_then(|data| data.get(r.key()).cloned());
            let checked = match value.map(|b| String::from_utf8(b.0)) {
                None => Err("is missing".to_string()),
                Some(Err(_)) => Err("is not UTF-8".to_string()),
                // The check's message never quotes the secret.
                Some(Ok(s)) => Outbox::check_secret(&s).map(|()| s.trim().to_string()).map_err(|e| format!("is not usable: {e}")),
            };
            match checked {
                Ok(s) => Some(s),
                Err(why) => {
                    // Fixing the Secret is enough: the delivery waits for it, looked at again every 30 s.
                    let msg = format!("signing secret {}/{} key {} {why}; the delivery waits for it", manager_ns, r.name, r.key());
                    if conditions::find(&rec.status.conditions, types::READY).is_none_or(|c| c.reason != "SecretNotFound") {
                        rec.event(EventType::Warning, "SecretNotFound", msg.clone());
                    }
                    rec.state(false, true, false, "SecretNotFound", &msg);
                    return Ok(Delivered::Later(RECHECK));
                }
            }
        }
    };
    let body = d.payload.clone().into_bytes();
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS).clamp(1, 60) as u64);
    let max_attempts = params.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1);
    let mut entry = d;
    let attempt = ctx.outbox.attempt(w, &mut entry, &body, secret.as_deref(), timeout, max_attempts, now).await;
    rec.status.deliveries[idx] = entry.clone();
    if ctx.config.test_abort_after_delivery && matches!(attempt, Ok(Attempt::Delivered)) {
        tracing::error!(delivery = %id, "SHOAL_TEST_ABORT_AFTER_DELIVERY: aborting before the delivery is recorded");
        std::process::abort();
    }
    match attempt {
        Ok(Attempt::Delivered) => Ok(Delivered::Done(Ok(format!("webhook delivered ({id}, HTTP {})", entry.last_status.unwrap_or(0))))),
        Ok(Attempt::Failed) => Ok(Delivered::Done(Err(format!("webhook delivery {id} failed after {} attempts: {}", entry.attempts, entry.last_error.unwrap_or_default())))),
        Ok(Attempt::Retry(after)) => {
            let msg = format!("webhook attempt {} of {max_attempts} failed ({}); retrying", entry.attempts, entry.last_error.unwrap_or_default());
            rec.state(true, true, false, "WebhookRetrying", &msg);
            Ok(Delivered::Later(after))
        }
        Err(WriteError::Deadline) => Ok(Delivered::Later(Duration::from_millis(100))),
        Err(e) => Err(e.into()),
    }
}

/// SCALE_DOWN in `ns`: with a writer, scale every selected workload to zero, recording its
/// replica count first in the same write; without one (dry run), only list what would be.
/// Returns `Kind/name=replicas` for each workload scaled (or already scaled by an earlier try).
async fn scale_down(p: &Policy, ns: &str, w: Option<&Writer>, ctx: &Ctx) -> Result<Vec<String>, Error> {
    let selectors = p.action.params.as_ref().and_then(|a| a.selectors.clone());
    let mut done = Vec::new();
    let deployments = ctx.read::<Deployment>(ns).list(&ListParams::default()).await?.items;
    let statefulsets = ctx.read::<StatefulSet>(ns).list(&ListParams::default()).await?.items;
    let mut found: Vec<(WorkloadKind, ObjectMeta, i32)> = Vec::new();
    for d in deployments {
        found.push((WorkloadKind::Deployment, d.metadata, d.spec.and_then(|s| s.replicas).unwrap_or(1)));
    }
    for s in statefulsets {
        found.push((WorkloadKind::StatefulSet, s.metadata, s.spec.and_then(|s| s.replicas).unwrap_or(1)));
    }
    for (kind, meta, replicas) in found {
        let (name, rv) = (meta.name.clone().unwrap_or_default(), meta.resource_version.clone());
        let annotations = meta.annotations.unwrap_or_default();
        if !policy::selects(selectors.as_deref(), kind, &meta.labels.unwrap_or_default()) {
            continue;
        }
        let kind_name = match kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        };
        if replicas == 0 {
            // Already at zero: by an earlier try of this action (its count is recorded), or by someone else.
            if let Some(orig) = annotations.get(ORIGINAL_REPLICAS_ANNOTATION) {
                done.push(format!("{kind_name}/{name}={orig}"));
            }
            continue;
        }
        done.push(format!("{kind_name}/{name}={replicas}"));
        let Some(w) = w else { continue };
        // One write records the count and scales to zero; the resourceVersion precondition
        // makes sure the recorded count is the one replaced.
        let patch = json!({"metadata": {"resourceVersion": rv, "annotations": {ORIGINAL_REPLICAS_ANNOTATION: replicas.to_string()}}, "spec": {"replicas": 0}});
        let r = match kind {
            WorkloadKind::Deployment => w.api::<Deployment>(ns).patch(&name, &Patch::Merge(&patch)).await.map(|_| ()),
            WorkloadKind::StatefulSet => w.api::<StatefulSet>(ns).patch(&name, &Patch::Merge(&patch)).await.map(|_| ()),
        };
        match r {
            Ok(()) => {}
            // Deleted since it was listed: nothing to scale.
            Err(e) if e.code() == Some(404) => {
                done.pop();
            }
            // Changed since it was listed (409): the reconcile is retried and lists again.
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Write `status` with a resourceVersion precondition. Returns the updated object, or `None`
/// when the status changed since it was read, or the object is gone.
///
/// Only this controller writes a manager's status, and only the shard's owner runs it; so
/// when the precondition fails but the server's status is still the one this write was
/// planned from (the spec or metadata changed: a user's edit), the write is still the right
/// successor and is made again on the new version. That keeps an outbox attempt's result
/// from being lost to an unrelated edit. (Our own deactivation patch causes no such retry:
/// the outcome is written on the version that patch returned.)
async fn write(m: &NamespaceManager, status: &NamespaceManagerStatus, w: &Writer, ctx: &Ctx) -> Result<Option<NamespaceManager>, Error> {
    let ns = m.namespace().unwrap_or_default();
    let mut base = std::borrow::Cow::Borrowed(m);
    for _ in 0..2 {
        match ctx.patch_status(w, base.as_ref(), base.status.as_ref(), status).await {
            Ok(Some(updated)) => return Ok(Some(updated)),
            Ok(None) => match ctx.read::<NamespaceManager>(&ns).get_opt(&m.name_any()).await? {
                Some(fresh) if fresh.status == m.status && fresh.metadata.uid == m.metadata.uid => base = std::borrow::Cow::Owned(fresh),
                _ => return Ok(None),
            },
            Err(e) if e.code() == Some(404) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Record `rec` if it changed anything, then publish its Events; `next` on success.
async fn record(m: &NamespaceManager, rec: Record, w: &Writer, ctx: &Ctx, next: Action) -> Result<Action, Error> {
    if m.status.as_ref() == Some(&rec.status) {
        return Ok(next);
    }
    match write(m, &rec.status, w, ctx).await? {
        Some(_) => {
            if let Some(l) = &rec.finished {
                ctx.metrics.actions.get_or_create(l).inc();
            }
            publish(w, rec.events).await;
            Ok(next)
        }
        // Changed since read: the watch brings the new version, planned again from it (an
        // outbox attempt made in this reconcile is repeated under the same delivery id).
        None => Ok(Action::AwaitChange),
    }
}

async fn publish(w: &Writer, events: Vec<(EventType, &'static str, String)>) {
    for (t, reason, note) in events {
        w.event(t, reason, note, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_managed_namespace_is_the_spec_s_or_the_manager_s_own() {
        let mut m: NamespaceManager = serde_json::from_value(json!({"metadata": {"name": "m", "namespace": "own"}, "spec": {"policies": []}})).unwrap();
        assert_eq!(managed_namespace(&m), "own");
        m.spec.namespace = Some(String::new());
        assert_eq!(managed_namespace(&m), "own");
        m.spec.namespace = Some("other".into());
        assert_eq!(managed_namespace(&m), "other");
    }
}
