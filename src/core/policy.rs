//! NamespaceManager policy evaluation (seed 003), with no kube client: which policies need a
//! look now, what a look found, which policy fires, when to look again, whether a target
//! namespace may be acted on, which workloads a SCALE_DOWN selects, and the webhook body.
//!
//! Semantics (docs/namespacemanager.md states them for users):
//! - `TTL` is true once `ttlSeconds` have passed since the managed namespace's
//!   `creationTimestamp`. Its due time is the next look, so a reconcile is scheduled for it.
//! - `PODS_SUCCEED` is checked first `initialDelaySeconds` (default 0) after the namespace's
//!   creation, then every `periodSeconds` (default 10) after the previous check. A check is
//!   positive when every pod matching `podLabels` has phase Succeeded, or when no pod
//!   matches. A negative check resets the run of positive checks to zero. The condition is
//!   true once `minChecks` (default 1) consecutive checks were positive.
//! - All policies are evaluated at each look; among those true at that look, the first in
//!   spec order fires.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::api::nsman::{Policy, PolicyConditionType, PolicyStatus, WorkloadKind, WorkloadSelector};

pub const DEFAULT_PERIOD_SECONDS: i64 = 10;
pub const DEFAULT_MIN_CHECKS: i32 = 1;

/// Namespaces no manager may delete or scale down, whatever the opt-in.
pub const BUILT_IN_PROTECTED: [&str; 4] = ["kube-system", "kube-public", "kube-node-lease", "default"];

/// The label by which a namespace lets managers in another namespace act on it.
pub const MANAGED_FROM_LABEL: &str = "shoal.dev/managed-from";

/// What one PODS_SUCCEED check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodCheck {
    /// Pods matching `podLabels`.
    pub matching: usize,
    /// Of those, how many have phase Succeeded.
    pub succeeded: usize,
}

impl PodCheck {
    pub fn positive(&self) -> bool {
        self.succeeded == self.matching
    }

    fn describe(&self) -> String {
        if self.matching == 0 { "no matching pods".to_string() } else { format!("{} of {} matching pods succeeded", self.succeeded, self.matching) }
    }
}

/// `t + secs`, or `None` when that is not a representable time (a huge TTL: never).
fn plus(t: Timestamp, secs: i64) -> Option<Timestamp> {
    t.checked_add(SignedDuration::from_secs(secs)).ok()
}

fn previous<'a>(status: &'a [PolicyStatus], name: &str) -> Option<&'a PolicyStatus> {
    status.iter().find(|p| p.name == name)
}

/// When `policy`'s condition is next due for a look: the TTL's due time, or the next
/// PODS_SUCCEED check. `None`: never (an unrepresentable time).
pub fn next_look(policy: &Policy, prev: Option<&PolicyStatus>, ns_created: Timestamp) -> Option<Timestamp> {
    let params = policy.condition.params.clone().unwrap_or_default();
    match policy.condition.type_ {
        PolicyConditionType::Ttl => plus(ns_created, params.ttl_seconds.unwrap_or(0).max(0)),
        PolicyConditionType::PodsSucceed => match prev.and_then(|p| p.last_check.as_ref()) {
            Some(last) => plus(last.0, params.period_seconds.unwrap_or(DEFAULT_PERIOD_SECONDS).max(1)),
            None => plus(ns_created, params.initial_delay_seconds.unwrap_or(0).max(0)),
        },
    }
}

/// The PODS_SUCCEED policies whose check is due at `now` (the controller lists their pods).
pub fn due_checks<'a>(policies: &'a [Policy], status: &[PolicyStatus], ns_created: Timestamp, now: Timestamp) -> Vec<&'a Policy> {
    policies.iter().filter(|p| p.condition.type_ == PolicyConditionType::PodsSucceed).filter(|p| next_look(p, previous(status, &p.name), ns_created).is_some_and(|t| t <= now)).collect()
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The new per-policy status, in spec order.
    pub policies: Vec<PolicyStatus>,
    /// The index (in spec order) of the policy that fires now, if any.
    pub fired: Option<usize>,
    /// When to look again (the earliest due time of any policy), if ever.
    pub next: Option<Timestamp>,
}

/// Evaluate every policy at `now`. `checks` holds the result of each due PODS_SUCCEED check,
/// by policy name (a due policy without a result is not counted: its look is retried).
pub fn evaluate(policies: &[Policy], status: &[PolicyStatus], ns_created: Timestamp, now: Timestamp, checks: &HashMap<String, PodCheck>) -> Evaluation {
    let mut out = Vec::with_capacity(policies.len());
    let mut fired = None;
    let mut next: Option<Timestamp> = None;
    for (i, policy) in policies.iter().enumerate() {
        let prev = previous(status, &policy.name);
        let mut st = prev.cloned().unwrap_or_else(|| PolicyStatus { name: policy.name.clone(), ..Default::default() });
        let params = policy.condition.params.clone().unwrap_or_default();
        let holds = match policy.condition.type_ {
            PolicyConditionType::Ttl => next_look(policy, prev, ns_created).is_some_and(|due| due <= now),
            PolicyConditionType::PodsSucceed => {
                let due = next_look(policy, prev, ns_created).is_some_and(|t| t <= now);
                if let (true, Some(check)) = (due, checks.get(&policy.name)) {
                    st.checks = st.checks.saturating_add(1);
                    st.successful_checks = if check.positive() { st.successful_checks.saturating_add(1) } else { 0 };
                    st.last_check = Some(Time(now));
                    st.last_result = Some(check.describe());
                }
                st.successful_checks >= params.min_checks.unwrap_or(DEFAULT_MIN_CHECKS).max(1)
            }
        };
        let due = next_look(policy, Some(&st), ns_created);
        st.next_check = due.map(Time);
        if !holds && let Some(t) = due {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if holds && fired.is_none() {
            fired = Some(i);
        }
        out.push(st);
    }
    Evaluation { policies: out, fired, next }
}

/// Why a manager may not act on its target namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// Whether a manager in `manager_ns` may act on `target` (whose labels are `target_labels`):
/// - a protected namespace (built-in, the operator's own, or configured) is never deleted or
///   scaled down; a webhook about it is allowed (it changes nothing in the cluster);
/// - another namespace only when it opts in with `shoal.dev/managed-from=<manager_ns>`, or
///   when the operator allows cross-namespace managers.
pub fn target_allowed(manager_ns: &str, target: &str, target_labels: &BTreeMap<String, String>, destructive: bool, allow_cross_namespace: bool, protected: &[String]) -> Result<(), Refusal> {
    if destructive && (BUILT_IN_PROTECTED.contains(&target) || protected.iter().any(|p| p == target)) {
        return Err(Refusal { reason: "ProtectedNamespace", message: format!("namespace {target} is protected: shoal never deletes or scales it down") });
    }
    if target != manager_ns && !allow_cross_namespace && target_labels.get(MANAGED_FROM_LABEL).map(String::as_str) != Some(manager_ns) {
        return Err(Refusal {
            reason: "CrossNamespaceRefused",
            message: format!("namespace {target} has not opted in to be managed from {manager_ns} (label it {MANAGED_FROM_LABEL}={manager_ns}, or run the operator with --allow-cross-namespace)"),
        });
    }
    Ok(())
}

/// Whether a SCALE_DOWN with `selectors` selects a workload of `kind` with `labels`. No
/// selectors (absent or empty): every Deployment and StatefulSet. A selector without labels:
/// every workload of its kind. Otherwise every label of a selector must match.
pub fn selects(selectors: Option<&[WorkloadSelector]>, kind: WorkloadKind, labels: &BTreeMap<String, String>) -> bool {
    match selectors {
        None | Some([]) => true,
        Some(sels) => sels.iter().any(|s| s.kind == kind && s.labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))),
    }
}

/// The WEBHOOK body, in seed 003's format: the manager (where it lives), the policy with
/// every parameter of the seed (absent ones as null), and the managed namespace.
pub fn webhook_body(manager_ns: &str, manager_name: &str, policy: &Policy, managed_ns: &str) -> Value {
    let c = policy.condition.params.clone().unwrap_or_default();
    let a = policy.action.params.clone().unwrap_or_default();
    json!({
        "namespaceManager": {"namespace": manager_ns, "name": manager_name},
        "policy": {
            "name": policy.name,
            "condition": {
                "type": policy.condition.type_,
                "params": {
                    "ttlSeconds": c.ttl_seconds,
                    "podLabels": c.pod_labels,
                    "initialDelaySeconds": c.initial_delay_seconds,
                    "periodSeconds": c.period_seconds,
                    "minChecks": c.min_checks,
                },
            },
            "action": {"type": policy.action.type_, "params": {"selectors": a.selectors, "url": a.url}},
        },
        "namespace": managed_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn ttl(name: &str, secs: i64) -> Policy {
        serde_json::from_value(json!({"name": name, "condition": {"type": "TTL", "params": {"ttlSeconds": secs}}, "action": {"type": "DELETE"}})).unwrap()
    }

    fn pods(name: &str, delay: Option<i64>, period: Option<i64>, min: Option<i32>) -> Policy {
        serde_json::from_value(json!({"name": name, "condition": {"type": "PODS_SUCCEED", "params": {"podLabels": {"a": "b"}, "initialDelaySeconds": delay, "periodSeconds": period, "minChecks": min}}, "action": {"type": "DELETE"}}))
            .unwrap()
    }

    fn check(matching: usize, succeeded: usize) -> PodCheck {
        PodCheck { matching, succeeded }
    }

    #[test]
    fn ttl_fires_at_its_due_time_and_not_before() {
        let p = [ttl("t", 40)];
        let e = evaluate(&p, &[], ts(0), ts(39), &HashMap::new());
        assert_eq!(e.fired, None);
        assert_eq!(e.next, Some(ts(40)), "the due time is the next look");
        assert_eq!(e.policies[0].next_check, Some(Time(ts(40))));
        let e = evaluate(&p, &[], ts(0), ts(40), &HashMap::new());
        assert_eq!(e.fired, Some(0));
        assert_eq!(evaluate(&p, &[], ts(0), ts(1000), &HashMap::new()).fired, Some(0), "late is still true");
    }

    #[test]
    fn a_huge_ttl_never_fires_and_never_panics() {
        let p = [ttl("t", i64::MAX)];
        let e = evaluate(&p, &[], ts(0), ts(10_000_000), &HashMap::new());
        assert_eq!((e.fired, e.next), (None, None));
    }

    #[test]
    fn pods_succeed_waits_for_the_initial_delay_then_checks_every_period() {
        let p = [pods("p", Some(60), Some(10), None)];
        assert!(due_checks(&p, &[], ts(0), ts(59)).is_empty());
        assert_eq!(evaluate(&p, &[], ts(0), ts(59), &HashMap::new()).next, Some(ts(60)));
        assert_eq!(due_checks(&p, &[], ts(0), ts(60)).len(), 1);
        // A negative check: counted, not true, next look a period later.
        let r = HashMap::from([("p".to_string(), check(3, 2))]);
        let e = evaluate(&p, &[], ts(0), ts(61), &r);
        assert_eq!(e.fired, None);
        assert_eq!((e.policies[0].checks, e.policies[0].successful_checks), (1, 0));
        assert_eq!(e.policies[0].last_result.as_deref(), Some("2 of 3 matching pods succeeded"));
        assert_eq!(e.next, Some(ts(71)));
        assert!(due_checks(&p, &e.policies, ts(0), ts(70)).is_empty());
        assert_eq!(due_checks(&p, &e.policies, ts(0), ts(71)).len(), 1);
        // All succeeded: true at once with minChecks 1.
        let r = HashMap::from([("p".to_string(), check(3, 3))]);
        let e = evaluate(&p, &e.policies, ts(0), ts(71), &r);
        assert_eq!(e.fired, Some(0));
    }

    #[test]
    fn no_matching_pods_is_a_positive_check() {
        let p = [pods("p", None, None, None)];
        let r = HashMap::from([("p".to_string(), check(0, 0))]);
        let e = evaluate(&p, &[], ts(0), ts(0), &r);
        assert_eq!(e.fired, Some(0));
        assert_eq!(e.policies[0].last_result.as_deref(), Some("no matching pods"));
    }

    #[test]
    fn min_checks_counts_consecutive_positive_checks_and_a_negative_one_resets() {
        let p = [pods("p", Some(0), Some(5), Some(3))];
        let mut st = vec![];
        let mut t = 0;
        for (found, want_run, fires) in [(check(1, 1), 1, false), (check(1, 1), 2, false), (check(2, 1), 0, false), (check(2, 2), 1, false), (check(0, 0), 2, false), (check(2, 2), 3, true)] {
            let r = HashMap::from([("p".to_string(), found)]);
            let e = evaluate(&p, &st, ts(0), ts(t), &r);
            assert_eq!(e.policies[0].successful_checks, want_run, "at {t}");
            assert_eq!(e.fired.is_some(), fires, "at {t}");
            st = e.policies;
            t += 5;
        }
        assert_eq!(st[0].checks, 6);
    }

    #[test]
    fn a_check_that_is_not_due_is_not_counted_even_with_a_result() {
        let p = [pods("p", Some(0), Some(10), Some(2))];
        let r = HashMap::from([("p".to_string(), check(1, 1))]);
        let e = evaluate(&p, &[], ts(0), ts(0), &r);
        let again = evaluate(&p, &e.policies, ts(0), ts(3), &r);
        assert_eq!(again.policies[0].checks, 1, "a second look inside the period counts nothing");
        assert_eq!(again.fired, None);
    }

    #[test]
    fn the_first_policy_in_spec_order_that_holds_wins() {
        let p = [ttl("late", 100), pods("pods", None, None, None), ttl("early", 10)];
        let r = HashMap::from([("pods".to_string(), check(1, 0))]);
        let e = evaluate(&p, &[], ts(0), ts(20), &r);
        assert_eq!(e.fired, Some(2), "only 'early' holds at 20 s");
        let r = HashMap::from([("pods".to_string(), check(1, 1))]);
        let e = evaluate(&p, &[], ts(0), ts(20), &r);
        assert_eq!(e.fired, Some(1), "both hold; 'pods' comes first");
        assert_eq!(e.policies.len(), 3, "every policy is evaluated");
    }

    #[test]
    fn removed_policies_drop_out_of_status() {
        let old = vec![PolicyStatus { name: "gone".into(), checks: 4, ..Default::default() }];
        let e = evaluate(&[ttl("t", 5)], &old, ts(0), ts(0), &HashMap::new());
        assert_eq!(e.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn targets_protected_and_cross_namespace() {
        let none = BTreeMap::new();
        let opted = BTreeMap::from([(MANAGED_FROM_LABEL.to_string(), "a".to_string())]);
        let other = BTreeMap::from([(MANAGED_FROM_LABEL.to_string(), "z".to_string())]);
        assert!(target_allowed("a", "a", &none, true, false, &[]).is_ok());
        assert_eq!(target_allowed("a", "b", &none, true, false, &[]).unwrap_err().reason, "CrossNamespaceRefused");
        assert_eq!(target_allowed("a", "b", &other, true, false, &[]).unwrap_err().reason, "CrossNamespaceRefused");
        assert!(target_allowed("a", "b", &opted, true, false, &[]).is_ok());
        assert!(target_allowed("a", "b", &none, true, true, &[]).is_ok());
        assert_eq!(target_allowed("a", "b", &none, false, false, &[]).unwrap_err().reason, "CrossNamespaceRefused", "webhooks too");
        for p in BUILT_IN_PROTECTED {
            assert_eq!(target_allowed(p, p, &opted, true, true, &[]).unwrap_err().reason, "ProtectedNamespace", "{p}");
        }
        assert_eq!(target_allowed("a", "shoal-system", &opted, true, true, &["shoal-system".into()]).unwrap_err().reason, "ProtectedNamespace");
        assert!(target_allowed("kube-system", "kube-system", &none, false, false, &[]).is_ok(), "a webhook changes nothing");
    }

    #[test]
    fn selectors() {
        let l = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        let sel = |kind: WorkloadKind, labels: Option<&[(&str, &str)]>| WorkloadSelector { kind, labels: labels.map(l) };
        assert!(selects(None, WorkloadKind::Deployment, &l(&[])));
        assert!(selects(Some(&[]), WorkloadKind::StatefulSet, &l(&[("x", "y")])));
        let s = [sel(WorkloadKind::Deployment, Some(&[("app", "web")])), sel(WorkloadKind::StatefulSet, None)];
        assert!(selects(Some(&s), WorkloadKind::Deployment, &l(&[("app", "web"), ("t", "1")])));
        assert!(!selects(Some(&s), WorkloadKind::Deployment, &l(&[("app", "db")])));
        assert!(selects(Some(&s), WorkloadKind::StatefulSet, &l(&[])), "no labels: every workload of the kind");
        let only_deploy = [sel(WorkloadKind::Deployment, Some(&[]))];
        assert!(!selects(Some(&only_deploy), WorkloadKind::StatefulSet, &l(&[])));
    }

    #[test]
    fn the_webhook_body_is_the_seeds() {
        let p: Policy = serde_json::from_value(json!({
            "name": "call webhook when specific pods succeed",
            "condition": {"type": "PODS_SUCCEED", "params": {"podLabels": {"component": "main"}, "initialDelaySeconds": 60, "periodSeconds": 10}},
            "action": {"type": "WEBHOOK", "params": {"url": "http://webhooky.example-04.svc.cluster.local/api/webhook/my-super-awesome-webhook", "secretRef": {"name": "s"}}},
        }))
        .unwrap();
        let seed = r#"{"namespaceManager":{"namespace":"example-04","name":"example-04"},"policy":{"name":"call webhook when specific pods succeed","condition":{"type":"PODS_SUCCEED","params":{"ttlSeconds":null,"podLabels":{"component":"main"},"initialDelaySeconds":60,"periodSeconds":10,"minChecks":null}},"action":{"type":"WEBHOOK","params":{"selectors":null,"url":"http://webhooky.example-04.svc.cluster.local/api/webhook/my-super-awesome-webhook"}}},"namespace":"example-04"}"#;
        assert_eq!(webhook_body("example-04", "example-04", &p, "example-04"), serde_json::from_str::<Value>(seed).unwrap());
    }

    proptest! {
        /// Whatever the checks, the policy that fires is the first in spec order that holds, a
        /// PODS_SUCCEED run never exceeds the checks made, and the next look is never in the past
        /// for a policy that does not hold.
        #[test]
        fn evaluation_invariants(ttls in proptest::collection::vec(0i64..100, 0..4), mins in proptest::collection::vec(1i32..4, 0..4), rounds in proptest::collection::vec(proptest::collection::vec((0usize..3, 0usize..3), 4), 1..12)) {
            let mut policies: Vec<Policy> = ttls.iter().enumerate().map(|(i, t)| ttl(&format!("t{i}"), *t)).collect();
            policies.extend(mins.iter().enumerate().map(|(i, m)| pods(&format!("p{i}"), Some(5), Some(7), Some(*m))));
            let mut st: Vec<PolicyStatus> = vec![];
            for (r, round) in rounds.iter().enumerate() {
                let now = ts(r as i64 * 9);
                let due: Vec<String> = due_checks(&policies, &st, ts(0), now).iter().map(|p| p.name.clone()).collect();
                let checks: HashMap<String, PodCheck> = due.iter().zip(round.iter()).map(|(n, (m, s))| (n.clone(), check(*m.max(s), *s))).collect();
                let e = evaluate(&policies, &st, ts(0), now, &checks);
                let holds: Vec<bool> = policies.iter().zip(&e.policies).map(|(p, s)| match p.condition.type_ {
                    PolicyConditionType::Ttl => next_look(p, Some(s), ts(0)).is_some_and(|d| d <= now),
                    PolicyConditionType::PodsSucceed => s.successful_checks >= p.condition.params.as_ref().and_then(|x| x.min_checks).unwrap_or(1),
                }).collect();
                prop_assert_eq!(e.fired, holds.iter().position(|h| *h));
                for s in &e.policies {
                    prop_assert!(s.successful_checks <= s.checks);
                }
                if let Some(n) = e.next { prop_assert!(n > now || e.fired.is_some()); }
                st = e.policies;
            }
        }
    }
}
