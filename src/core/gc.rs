//! Garbage collection of workflows, with no kube client: given a workflow's policy (its
//! `podGC` and `ttlStrategy` over the operator's defaults), what its status has recorded, the
//! step objects that exist and the time, which step objects to delete now, whether to delete
//! the workflow itself, and when to look again.
//!
//! A step object is the Job of a step attempt, or its pod with the `Pod` executor. This module
//! never picks an object whose result is not recorded in the status it is given: the current
//! attempt of a step only once the step's terminal phase (or `Retrying`) is recorded, an
//! earlier attempt of a step (a step is retried only after its attempt failed), and anything
//! else only once the workflow's own terminal phase is recorded. Outputs live in status, so
//! nothing an object carried is lost with it.
//!
//! Semantics (docs/workflow.md states them for users):
//! - `OnPodCompletion` deletes an object `deleteDelayDuration` after its attempt ended;
//!   `OnPodSuccess` the same, for succeeded attempts only.
//! - `OnWorkflowCompletion` deletes every object `deleteDelayDuration` after the workflow
//!   finished (`status.statusChanged`); `OnWorkflowSuccess` the same, if it completed.
//! - `keepLast: N` keeps, of the objects the strategy would delete, the N whose attempts
//!   ended last (ties by name).
//! - `ttlStrategy`: the workflow is deleted `secondsAfterSuccess` (if it completed) or
//!   `secondsAfterFailure` (if it failed), else `secondsAfterCompletion`, after it finished.
//! - Each field a workflow leaves unset takes the operator's default; with neither, nothing
//!   is deleted.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::workflow::{PodGc, StepPhase, StepStatus, TtlStrategy, WorkflowPhase};
use crate::core::plan::step_key;

/// The longest `deleteDelayDuration` (also the CRD's bound): a year.
pub const MAX_DELAY: Duration = Duration::from_secs(8760 * 3600);

/// Which step objects a workflow deletes, and when they become due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Keep every step object (shoal's own value: it overrides an operator default).
    #[default]
    Never,
    OnPodCompletion,
    OnPodSuccess,
    OnWorkflowCompletion,
    OnWorkflowSuccess,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [Strategy::Never, Strategy::OnPodCompletion, Strategy::OnPodSuccess, Strategy::OnWorkflowCompletion, Strategy::OnWorkflowSuccess];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Never => "Never",
            Strategy::OnPodCompletion => "OnPodCompletion",
            Strategy::OnPodSuccess => "OnPodSuccess",
            Strategy::OnWorkflowCompletion => "OnWorkflowCompletion",
            Strategy::OnWorkflowSuccess => "OnWorkflowSuccess",
        }
    }

    /// The strategy named exactly `s`.
    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.name() == s)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `podGC`, parsed and merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodGcPolicy {
    pub strategy: Strategy,
    pub delay: Duration,
    pub keep_last: usize,
}

/// `ttlStrategy`, parsed and merged. `None`: no deletion for that outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ttl {
    pub after_completion: Option<Duration>,
    pub after_success: Option<Duration>,
    pub after_failure: Option<Duration>,
}

impl Ttl {
    /// How long after it finished a workflow that `succeeded` (or not) is deleted.
    pub fn after(&self, succeeded: bool) -> Option<Duration> {
        if succeeded { self.after_success.or(self.after_completion) } else { self.after_failure.or(self.after_completion) }
    }
}

/// A workflow's garbage collection policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub pod_gc: PodGcPolicy,
    pub ttl: Ttl,
}

/// The operator's defaults (`shoal run` flags): each applies to the field a workflow leaves
/// unset. All `None`: keep everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    pub strategy: Option<Strategy>,
    pub delay: Option<Duration>,
    pub keep_last: Option<usize>,
    pub ttl: Ttl,
}

/// A field of a workflow's policy that cannot be used. The admission rules refuse all of
/// these; an object stored before them (or under other rules) gets a condition instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("spec.podGC.strategy {0:?} is not one of Never, OnPodCompletion, OnPodSuccess, OnWorkflowCompletion, OnWorkflowSuccess")]
    Strategy(String),
    #[error("spec.podGC.deleteDelayDuration {0:?}: {1}")]
    Delay(String, String),
    #[error("spec.podGC.keepLast {0} is negative")]
    KeepLast(i32),
    #[error("spec.ttlStrategy.{0} {1} is negative")]
    Ttl(&'static str, i64),
}

/// The policy of a workflow with `pod_gc` and `ttl` (its spec's), over the operator's
/// `defaults`, field by field.
pub fn policy(pod_gc: Option<&PodGc>, ttl: Option<&TtlStrategy>, defaults: &Defaults) -> Result<Policy, PolicyError> {
    let g = pod_gc.cloned().unwrap_or_default();
    let strategy = match g.strategy.as_deref() {
        Some(s) => Strategy::parse(s).ok_or_else(|| PolicyError::Strategy(s.to_string()))?,
        None => defaults.strategy.unwrap_or_default(),
    };
    let delay = match g.delete_delay_duration.as_deref() {
        Some(s) => {
            let d = parse_go_duration(s).map_err(|e| PolicyError::Delay(s.to_string(), e))?;
            if d > MAX_DELAY {
                return Err(PolicyError::Delay(s.to_string(), "longer than 8760h".into()));
            }
            d
        }
        None => defaults.delay.unwrap_or_default(),
    };
    let keep_last = match g.keep_last {
        Some(n) if n < 0 => return Err(PolicyError::KeepLast(n)),
        Some(n) => n as usize,
        None => defaults.keep_last.unwrap_or(0),
    };
    let t = ttl.cloned().unwrap_or_default();
    let secs = |field: &'static str, v: Option<i64>, default: Option<Duration>| match v {
        Some(s) if s < 0 => Err(PolicyError::Ttl(field, s)),
        Some(s) => Ok(Some(Duration::from_secs(s as u64))),
        None => Ok(default),
    };
    let ttl = Ttl {
        after_completion: secs("secondsAfterCompletion", t.seconds_after_completion, defaults.ttl.after_completion)?,
        after_success: secs("secondsAfterSuccess", t.seconds_after_success, defaults.ttl.after_success)?,
        after_failure: secs("secondsAfterFailure", t.seconds_after_failure, defaults.ttl.after_failure)?,
    };
    Ok(Policy { pod_gc: PodGcPolicy { strategy, delay, keep_last }, ttl })
}

/// A Go duration without a sign, as Argo's `deleteDelayDuration` and CEL's `duration()` read
/// it: `0`, or numbers (with an optional fraction) each followed by a unit among `ns`, `us`
/// (`µs`), `ms`, `s`, `m`, `h`: `30s`, `1.5h`, `1h30m`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = s;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(format!("expected a number at {rest:?}"));
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in {s:?} (use ns, us, ms, s, m or h)")),
            u => return Err(format!("unknown unit {u:?} in {s:?} (use ns, us, ms, s, m or h)")),
        };
        let too_long = || format!("{s:?} is too long");
        let whole: u128 = if int.is_empty() { 0 } else { int.parse::<u128>().map_err(|_| too_long())? };
        let mut part = whole.checked_mul(per).ok_or_else(too_long)?;
        // The fraction, to the nanosecond (further digits are dropped, as Go does).
        let mut scale = per;
        for d in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            part = part.checked_add(u128::from(d - b'0') * scale).ok_or_else(too_long)?;
        }
        nanos = nanos.checked_add(part).ok_or_else(too_long)?;
        rest = next;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| format!("{s:?} is too long"))?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// A duration flag of `shoal run`: a Go duration (`30s`, `24h`, `1h30m`) or a bare number
/// of seconds.
pub fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    parse_go_duration(s)
}

/// `--pod-gc-strategy`: a strategy name, in any case.
pub fn parse_strategy_flag(s: &str) -> Result<Strategy, String> {
    Strategy::ALL
        .into_iter()
        .find(|x| x.name().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| format!("{s:?} is not one of Never, OnPodCompletion, OnPodSuccess, OnWorkflowCompletion, OnWorkflowSuccess"))
}

/// A step object of the workflow (of its current spec generation), from its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child<'a> {
    pub name: &'a str,
    /// The `shoal.dev/step` label: the step's name as `core::plan::step_key` spells it.
    pub step: &'a str,
    /// The `shoal.dev/attempt` label, if it is a number.
    pub attempt: Option<i32>,
}

/// What the workflow's status has recorded, and what exists.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub phase: Option<WorkflowPhase>,
    /// `status.statusChanged`: when it finished, once `phase` is terminal.
    pub status_changed: Option<Timestamp>,
    pub steps: &'a [StepStatus],
    pub children: &'a [Child<'a>],
}

impl Observed<'_> {
    /// When the workflow finished, and whether it completed; `None` while it runs (or if the
    /// time is not recorded).
    pub fn finished(&self) -> Option<(Timestamp, bool)> {
        let completed = match self.phase? {
            WorkflowPhase::Completed => true,
            WorkflowPhase::Failed => false,
            _ => return None,
        };
        Some((self.status_changed?, completed))
    }
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Indices into `Observed::children` of the objects to delete now, in order.
    pub delete: Vec<usize>,
    /// Delete the workflow itself (its step objects go with it).
    pub delete_workflow: bool,
    /// The next time something becomes due, if anything will.
    pub next: Option<Timestamp>,
}

/// A step object whose end is recorded: when, and whether its attempt succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ended {
    at: Timestamp,
    succeeded: bool,
}

/// When `child` ended, by the status: `None` if its result is not recorded. Once the
/// workflow has finished (at `workflow_end`), every object has ended by then at the latest.
fn ended(child: &Child<'_>, steps: &[StepStatus], workflow_end: Option<Timestamp>) -> Option<Ended> {
    let step = steps.iter().find(|s| step_key(&s.step_name) == child.step);
    let recorded = step.zip(child.attempt).and_then(|(s, attempt)| {
        if attempt < s.attempt {
            // An earlier attempt: it failed (a step is retried only after a failure), before
            // the attempt recorded now started.
            let at = s.started_at.as_ref().or(s.finished_at.as_ref())?.0;
            return Some(Ended { at, succeeded: false });
        }
        if attempt > s.attempt {
            return None;
        }
        let at = s.finished_at.as_ref()?.0;
        match s.phase {
            StepPhase::Succeeded => Some(Ended { at, succeeded: true }),
            StepPhase::Failed | StepPhase::Retrying | StepPhase::Cancelled => Some(Ended { at, succeeded: false }),
            StepPhase::Pending | StepPhase::Running | StepPhase::Skipped => None,
        }
    });
    recorded.or_else(|| workflow_end.map(|at| Ended { at, succeeded: false }))
}

fn plus(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_add(SignedDuration::try_from(d).ok()?).ok()
}

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// What `policy` asks for at `now`, given `o`.
pub fn decide(policy: &Policy, o: &Observed<'_>, now: Timestamp) -> Decision {
    let mut d = Decision::default();
    let finished = o.finished();
    if let Some((at, completed)) = finished
        && let Some(due) = policy.ttl.after(completed).and_then(|ttl| plus(at, ttl))
    {
        if due <= now {
            // Its step objects go with it (ownerReferences): nothing else to delete.
            return Decision { delete_workflow: true, ..Decision::default() };
        }
        d.next = Some(due);
    }

    let g = policy.pod_gc;
    // (child, when it ended, when it becomes due before the delay)
    let mut candidates: Vec<(usize, Timestamp, Timestamp)> = Vec::new();
    for (i, c) in o.children.iter().enumerate() {
        let Some(e) = ended(c, o.steps, finished.map(|f| f.0)) else { continue };
        let from = match (g.strategy, finished) {
            (Strategy::Never, _) => continue,
            (Strategy::OnPodCompletion, _) => e.at,
            (Strategy::OnPodSuccess, _) if e.succeeded => e.at,
            (Strategy::OnWorkflowCompletion, Some((at, _))) => at,
            (Strategy::OnWorkflowSuccess, Some((at, true))) => at,
            _ => continue,
        };
        candidates.push((i, e.at, from));
    }
    // The N that ended last stay.
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| o.children[a.0].name.cmp(o.children[b.0].name)));
    for (i, _, from) in candidates.into_iter().skip(g.keep_last) {
        match plus(from, g.delay) {
            Some(due) if due <= now => d.delete.push(i),
            Some(due) => d.next = earliest(d.next, due),
            None => {}
        }
    }
    d.delete.sort_unstable();
    d
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn step(name: &str, phase: StepPhase, attempt: i32, started: Option<i64>, finished: Option<i64>) -> StepStatus {
        StepStatus {
            step_name: name.into(),
            phase,
            attempt,
            job_name: Some(format!("{name}-{attempt}")),
            job_uid: Some("u".into()),
            started_at: started.map(|s| Time(ts(s))),
            finished_at: finished.map(|s| Time(ts(s))),
            output: None,
            message: None,
        }
    }

    fn child<'a>(name: &'a str, step: &'a str, attempt: i32) -> Child<'a> {
        Child { name, step, attempt: Some(attempt) }
    }

    fn strategy(s: Strategy, delay: u64, keep_last: usize) -> Policy {
        Policy { pod_gc: PodGcPolicy { strategy: s, delay: Duration::from_secs(delay), keep_last }, ttl: Ttl::default() }
    }

    fn names<'a>(d: &Decision, children: &[Child<'a>]) -> Vec<&'a str> {
        d.delete.iter().map(|i| children[*i].name).collect()
    }

    #[test]
    fn go_durations_parse_as_go_does() {
        let ok = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("30s", Duration::from_secs(30)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("2us", Duration::from_micros(2)),
            ("2µs", Duration::from_micros(2)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", Duration::from_millis(500)),
            ("1m0.25s", Duration::from_millis(60_250)),
            ("8760h", MAX_DELAY),
        ];
        for (s, want) in ok {
            assert_eq!(parse_go_duration(s), Ok(want), "{s}");
        }
        for bad in ["", "s", "10", "-1s", "+1s", "1d", "1h 30m", "1..5s", ".s", "99999999999999999999999999999999999999999h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse_duration_flag("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration_flag("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_strategy_flag("onworkflowsuccess"), Ok(Strategy::OnWorkflowSuccess));
        assert!(parse_strategy_flag("Always").is_err());
    }

    #[test]
    fn the_workflows_fields_win_over_the_defaults_field_by_field() {
        let defaults = Defaults {
            strategy: Some(Strategy::OnWorkflowCompletion),
            delay: Some(Duration::from_secs(60)),
            keep_last: Some(2),
            ttl: Ttl { after_success: Some(Duration::from_secs(3600)), ..Ttl::default() },
        };
        assert_eq!(policy(None, None, &Defaults::default()), Ok(Policy::default()), "nothing set: keep everything");
        let p = policy(None, None, &defaults).unwrap();
        assert_eq!(p.pod_gc, PodGcPolicy { strategy: Strategy::OnWorkflowCompletion, delay: Duration::from_secs(60), keep_last: 2 });
        let g = PodGc { strategy: Some("OnPodSuccess".into()), ..PodGc::default() };
        let t = TtlStrategy { seconds_after_failure: Some(10), ..TtlStrategy::default() };
        let p = policy(Some(&g), Some(&t), &defaults).unwrap();
        assert_eq!(p.pod_gc, PodGcPolicy { strategy: Strategy::OnPodSuccess, delay: Duration::from_secs(60), keep_last: 2 });
        assert_eq!(p.ttl, Ttl { after_completion: None, after_success: Some(Duration::from_secs(3600)), after_failure: Some(Duration::from_secs(10)) });
        let never = PodGc { strategy: Some("Never".into()), ..PodGc::default() };
        assert_eq!(policy(Some(&never), None, &defaults).unwrap().pod_gc.strategy, Strategy::Never, "a workflow opts out of the default");
    }

    #[test]
    fn bad_fields_are_errors_that_name_the_field() {
        let d = Defaults::default();
        let g = |s: Option<&str>, delay: Option<&str>, keep: Option<i32>| PodGc { strategy: s.map(String::from), delete_delay_duration: delay.map(String::from), keep_last: keep };
        let e = policy(Some(&g(Some("Sometimes"), None, None)), None, &d).unwrap_err();
        assert!(e.to_string().contains("spec.podGC.strategy \"Sometimes\""), "{e}");
        let e = policy(Some(&g(None, Some("ten minutes"), None)), None, &d).unwrap_err();
        assert!(e.to_string().contains("spec.podGC.deleteDelayDuration \"ten minutes\""), "{e}");
        let e = policy(Some(&g(None, Some("8761h"), None)), None, &d).unwrap_err();
        assert!(e.to_string().contains("longer than 8760h"), "{e}");
        assert_eq!(policy(Some(&g(None, None, Some(-1))), None, &d), Err(PolicyError::KeepLast(-1)));
        let t = TtlStrategy { seconds_after_success: Some(-5), ..TtlStrategy::default() };
        let e = policy(None, Some(&t), &d).unwrap_err();
        assert_eq!(e.to_string(), "spec.ttlStrategy.secondsAfterSuccess -5 is negative");
    }

    #[test]
    fn the_crds_strategies_are_the_ones_parsed() {
        let schema = serde_json::to_value(schemars::schema_for!(PodGc)).unwrap();
        let listed: Vec<String> = serde_json::from_value(schema["properties"]["strategy"]["enum"].clone()).unwrap();
        let known: Vec<String> = Strategy::ALL.iter().map(|s| s.name().to_string()).collect();
        assert_eq!(listed, known);
    }

    /// A running workflow: `a` succeeded at 10, `b` failed attempt 0 and runs attempt 1
    /// (started at 20), `c` failed for good at 15, `d` runs attempt 0.
    fn running() -> (Vec<StepStatus>, Vec<Child<'static>>) {
        let steps = vec![
            step("a", StepPhase::Succeeded, 0, Some(0), Some(10)),
            step("b", StepPhase::Running, 1, Some(20), None),
            step("c", StepPhase::Failed, 0, Some(0), Some(15)),
            step("d", StepPhase::Running, 0, Some(12), None),
        ];
        let children = vec![child("a-0", "a", 0), child("b-0", "b", 0), child("b-1", "b", 1), child("c-0", "c", 0), child("d-0", "d", 0)];
        (steps, children)
    }

    #[test]
    fn per_pod_strategies_delete_what_is_recorded_as_ended_while_the_workflow_runs() {
        let (steps, children) = running();
        let o = Observed { phase: Some(WorkflowPhase::Started), status_changed: Some(ts(0)), steps: &steps, children: &children };
        let d = decide(&strategy(Strategy::OnPodCompletion, 0, 0), &o, ts(100));
        assert_eq!(names(&d, &children), ["a-0", "b-0", "c-0"], "never a running attempt");
        assert_eq!(d.next, None);
        let d = decide(&strategy(Strategy::OnPodSuccess, 0, 0), &o, ts(100));
        assert_eq!(names(&d, &children), ["a-0"], "failed attempts stay for inspection");
        for s in [Strategy::OnWorkflowCompletion, Strategy::OnWorkflowSuccess, Strategy::Never] {
            assert_eq!(decide(&strategy(s, 0, 0), &o, ts(100)), Decision::default(), "{s}: nothing while the workflow runs");
        }
    }

    #[test]
    fn the_delay_holds_an_object_back_and_says_when_to_look_again() {
        let (steps, children) = running();
        let o = Observed { phase: Some(WorkflowPhase::Started), status_changed: None, steps: &steps, children: &children };
        let p = strategy(Strategy::OnPodCompletion, 30, 0);
        // a ended at 10, c at 15, b's attempt 0 by 20 (when attempt 1 started).
        let d = decide(&p, &o, ts(39));
        assert!(d.delete.is_empty());
        assert_eq!(d.next, Some(ts(40)));
        let d = decide(&p, &o, ts(40));
        assert_eq!(names(&d, &children), ["a-0"]);
        assert_eq!(d.next, Some(ts(45)));
        assert_eq!(names(&decide(&p, &o, ts(50)), &children), ["a-0", "b-0", "c-0"]);
    }

    #[test]
    fn keep_last_keeps_the_objects_of_the_attempts_that_ended_last() {
        let (steps, children) = running();
        let o = Observed { phase: Some(WorkflowPhase::Started), status_changed: None, steps: &steps, children: &children };
        // Ended: a at 10, c at 15, b-0 by 20.
        assert_eq!(names(&decide(&strategy(Strategy::OnPodCompletion, 0, 1), &o, ts(100)), &children), ["a-0", "c-0"]);
        assert_eq!(names(&decide(&strategy(Strategy::OnPodCompletion, 0, 2), &o, ts(100)), &children), ["a-0"]);
        assert!(decide(&strategy(Strategy::OnPodCompletion, 0, 3), &o, ts(100)).delete.is_empty());
    }

    #[test]
    fn workflow_strategies_wait_for_the_workflow_and_the_success_ones_keep_a_failed_ones_objects() {
        let steps = vec![step("a", StepPhase::Succeeded, 0, Some(0), Some(10)), step("b", StepPhase::Succeeded, 1, Some(20), Some(30))];
        let children = vec![child("a-0", "a", 0), child("b-0", "b", 0), child("b-1", "b", 1)];
        let completed = Observed { phase: Some(WorkflowPhase::Completed), status_changed: Some(ts(30)), steps: &steps, children: &children };
        let failed = Observed { phase: Some(WorkflowPhase::Failed), ..completed };
        for s in [Strategy::OnWorkflowCompletion, Strategy::OnWorkflowSuccess] {
            let d = decide(&strategy(s, 60, 0), &completed, ts(89));
            assert_eq!((d.delete.len(), d.next), (0, Some(ts(90))), "{s}: the delay counts from the workflow's end");
            assert_eq!(names(&decide(&strategy(s, 60, 0), &completed, ts(90)), &children), ["a-0", "b-0", "b-1"]);
        }
        assert_eq!(names(&decide(&strategy(Strategy::OnWorkflowCompletion, 0, 0), &failed, ts(90)), &children), ["a-0", "b-0", "b-1"]);
        assert_eq!(decide(&strategy(Strategy::OnWorkflowSuccess, 0, 0), &failed, ts(90)), Decision::default());
        // A per-pod strategy in a finished workflow: what was recorded, and anything left.
        let steps = vec![step("a", StepPhase::Cancelled, 0, Some(0), Some(10)), step("b", StepPhase::Pending, 0, None, None)];
        let children = vec![child("a-0", "a", 0), child("b-0", "b", 0), Child { name: "odd", step: "b", attempt: None }];
        let failed = Observed { phase: Some(WorkflowPhase::Failed), status_changed: Some(ts(30)), steps: &steps, children: &children };
        assert_eq!(names(&decide(&strategy(Strategy::OnPodCompletion, 0, 0), &failed, ts(30)), &children), ["a-0", "b-0", "odd"]);
        assert!(decide(&strategy(Strategy::OnPodSuccess, 0, 0), &failed, ts(30)).delete.is_empty());
        // The finish time is not recorded: nothing at the workflow's level.
        let unknown = Observed { status_changed: None, ..failed };
        assert!(decide(&strategy(Strategy::OnWorkflowCompletion, 0, 0), &unknown, ts(30)).delete.is_empty());
    }

    #[test]
    fn the_ttl_deletes_the_workflow_after_its_outcomes_delay() {
        let steps = vec![step("a", StepPhase::Succeeded, 0, Some(0), Some(10))];
        let children = vec![child("a-0", "a", 0)];
        let ttl = |c: Option<u64>, s: Option<u64>, f: Option<u64>| Policy {
            pod_gc: PodGcPolicy { strategy: Strategy::OnPodCompletion, delay: Duration::from_secs(1000), keep_last: 0 },
            ttl: Ttl { after_completion: c.map(Duration::from_secs), after_success: s.map(Duration::from_secs), after_failure: f.map(Duration::from_secs) },
        };
        let completed = Observed { phase: Some(WorkflowPhase::Completed), status_changed: Some(ts(10)), steps: &steps, children: &children };
        let failed = Observed { phase: Some(WorkflowPhase::Failed), ..completed };
        let p = ttl(Some(100), Some(20), None);
        assert_eq!(decide(&p, &completed, ts(29)).next, Some(ts(30)));
        assert_eq!(decide(&p, &completed, ts(30)), Decision { delete_workflow: true, ..Decision::default() });
        assert_eq!(decide(&p, &failed, ts(30)).next, Some(ts(110)), "secondsAfterCompletion for a failure");
        assert!(decide(&p, &failed, ts(110)).delete_workflow);
        let p = ttl(None, Some(20), None);
        assert!(!decide(&p, &failed, ts(10_000)).delete_workflow, "no TTL for a failure");
        let running = Observed { phase: Some(WorkflowPhase::Started), ..completed };
        assert!(!decide(&p, &running, ts(10_000)).delete_workflow);
    }

    #[derive(Debug, Clone)]
    struct World {
        phase: WorkflowPhase,
        steps: Vec<StepStatus>,
        /// (step index, attempt)
        children: Vec<(usize, i32)>,
        policy: Policy,
    }

    const PHASES: [StepPhase; 7] = [StepPhase::Pending, StepPhase::Running, StepPhase::Retrying, StepPhase::Succeeded, StepPhase::Failed, StepPhase::Skipped, StepPhase::Cancelled];

    fn world() -> impl Strategy2<Value = World> {
        let one_step = (0usize..7, 0i32..3, 0i64..100, 0i64..100).prop_map(|(p, attempt, s, f)| (PHASES[p], attempt, s, s + f));
        let steps = prop::collection::vec(one_step, 1..6);
        let wf_phase = prop::sample::select(vec![WorkflowPhase::Started, WorkflowPhase::Completed, WorkflowPhase::Failed]);
        let pol = (0usize..5, 0u64..50, 0usize..4, prop::option::of(0u64..300), prop::option::of(0u64..300), prop::option::of(0u64..300));
        (steps, wf_phase, pol, prop::collection::vec((0usize..6, 0i32..4), 0..12)).prop_map(|(steps, phase, (s, delay, keep, c, su, f), children)| {
            let n = steps.len();
            let steps: Vec<StepStatus> = steps
                .into_iter()
                .enumerate()
                .map(|(i, (p, attempt, s, f))| {
                    let finished = matches!(p, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Retrying | StepPhase::Cancelled).then_some(f);
                    step(&format!("s{i}"), p, attempt, Some(s), finished)
                })
                .collect();
            let children = children.into_iter().map(|(i, a)| (i % n, a)).collect();
            let policy = Policy {
                pod_gc: PodGcPolicy { strategy: Strategy::ALL[s], delay: Duration::from_secs(delay), keep_last: keep },
                ttl: Ttl { after_completion: c.map(Duration::from_secs), after_success: su.map(Duration::from_secs), after_failure: f.map(Duration::from_secs) },
            };
            World { phase, steps, children, policy }
        })
    }

    use proptest::strategy::Strategy as Strategy2;

    impl World {
        fn decide(&self, now: i64) -> (Decision, Vec<String>) {
            let names: Vec<String> = self.children.iter().enumerate().map(|(k, (i, a))| format!("s{i}-{a}-{k}")).collect();
            let keys: Vec<String> = self.children.iter().map(|(i, _)| format!("s{i}")).collect();
            let children: Vec<Child<'_>> = self.children.iter().enumerate().map(|(k, (_, a))| Child { name: &names[k], step: &keys[k], attempt: Some(*a) }).collect();
            let o = Observed { phase: Some(self.phase), status_changed: Some(ts(200)), steps: &self.steps, children: &children };
            let d = decide(&self.policy, &o, ts(now));
            let deleted = d.delete.iter().map(|i| names[*i].clone()).collect();
            (d, deleted)
        }
    }

    proptest! {
        /// While the workflow runs, an object is deleted only if status records its attempt
        /// as ended (an earlier attempt, or the current one in a terminal phase or Retrying),
        /// never before the delay, and the success strategies never delete a failed one.
        #[test]
        fn only_recorded_ends_are_collected(w in world(), now in 0i64..600) {
            let (d, _) = w.decide(now);
            for &k in &d.delete {
                let (i, attempt) = w.children[k];
                let s = &w.steps[i];
                let succeeded = attempt == s.attempt && s.phase == StepPhase::Succeeded;
                if w.phase == WorkflowPhase::Started {
                    let recorded = attempt < s.attempt || (attempt == s.attempt && matches!(s.phase, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Retrying | StepPhase::Cancelled));
                    prop_assert!(recorded, "deleted {k} of a running step: {s:?}");
                    prop_assert!(matches!(w.policy.pod_gc.strategy, Strategy::OnPodCompletion | Strategy::OnPodSuccess));
                }
                if w.policy.pod_gc.strategy == Strategy::OnPodSuccess {
                    prop_assert!(succeeded, "OnPodSuccess deleted a failed attempt's object");
                }
                if w.policy.pod_gc.strategy == Strategy::OnWorkflowSuccess {
                    prop_assert_eq!(w.phase, WorkflowPhase::Completed);
                }
                prop_assert!(w.policy.pod_gc.strategy != Strategy::Never);
            }
            prop_assert!(d.delete.len() + w.policy.pod_gc.keep_last.min(w.children.len()) <= w.children.len());
        }

        /// Time only adds: what is deleted at t is deleted later too; `next` is exactly when
        /// something new happens, and nothing new happens before it.
        #[test]
        fn decisions_grow_with_time_and_next_is_when_they_do(w in world(), now in 0i64..600) {
            let (d, deleted) = w.decide(now);
            let (later, later_deleted) = w.decide(now + 37);
            if !later.delete_workflow {
                prop_assert!(!d.delete_workflow);
                prop_assert!(deleted.iter().all(|n| later_deleted.contains(n)));
            }
            if d.delete_workflow {
                prop_assert!(later.delete_workflow);
                prop_assert!(d.delete.is_empty());
            }
            match d.next {
                Some(next) => {
                    prop_assert!(next > ts(now));
                    let secs = next.as_second() - 1_800_000_000;
                    let (just_before, before) = w.decide(secs - 1);
                    let (at, at_deleted) = w.decide(secs);
                    prop_assert!(at.delete_workflow || at_deleted.len() > before.len(), "nothing new at next");
                    // Nothing new from now to just before `next` (times are whole seconds here).
                    prop_assert!(!just_before.delete_workflow);
                    prop_assert_eq!(before, deleted);
                }
                None => prop_assert_eq!((later.delete_workflow, later_deleted), (d.delete_workflow, deleted)),
            }
        }
    }
}
