//! The Workflow planner: `(spec, observed step states, observed Jobs, now) → plan`.
//!
//! Pure: no kube client. The reconciler observes, calls [`plan`], creates the Jobs it asks
//! for (deterministic names, AlreadyExists means done) and records `steps` in status.
//! Invariants, checked by property tests: a step never starts before all its dependencies
//! succeeded; a terminal step never gets another Job; each attempt is planned at most once
//! (replaying the same observation plans nothing new); the workflow completes exactly when
//! every step succeeded.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::workflow::{StepPhase, StepStatus, WorkflowPhase};

/// Termination messages longer than this are cut (Kubernetes itself keeps 4096 bytes).
pub const MAX_OUTPUT_BYTES: usize = 4096;
/// Failure reason of a step whose output does not fit the workflow's output budget. Not
/// retried: the same step makes the same output.
pub const OUTPUT_TOO_LARGE: &str = "OutputTooLarge";

/// What a step needs for planning.
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub name: String,
    pub deps: Vec<String>,
    pub retries: i32,
}

/// What the reconciler saw of one Job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Not in the cache, and a GET found nothing either.
    Gone,
    Active,
    Succeeded {
        output: Option<String>,
    },
    Failed {
        reason: String,
        message: String,
    },
    /// An object holds the step's Job name but is not this workflow's (its controller
    /// ownerReference is another UID, or none). It is never adopted; the step fails.
    Foreign {
        message: String,
    },
    /// Active, with news of its pod (it cannot start; disrupted pods were replaced): the step
    /// stays Running with `message` as its message (none if empty), and `event` is emitted.
    ActiveNoted {
        message: String,
        event: Option<PlannedEvent>,
    },
}

/// The workflow being planned: its name, UID and spec generation.
#[derive(Debug, Clone, Copy)]
pub struct WorkflowId<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub generation: i64,
}

/// A Job to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateJob {
    pub step: String,
    pub attempt: i32,
    pub job_name: String,
}

/// An Event to emit about a step: (reason, step, message).
pub type PlannedEvent = (&'static str, String, String);

#[derive(Debug, Clone)]
pub struct Plan {
    /// New state of every step, in spec order.
    pub steps: Vec<StepStatus>,
    pub creates: Vec<CreateJob>,
    /// Jobs of steps cancelled because the workflow failed fast: delete them.
    pub cancels: Vec<String>,
    pub events: Vec<PlannedEvent>,
    pub phase: WorkflowPhase,
    pub message: String,
    /// Wake up again after this long (a retry backoff), if nothing else happens first.
    pub requeue_after: Option<Duration>,
}

/// Retry backoff after attempt `attempt` failed: 1 s, 2 s, 4 s … capped at 5 min.
pub fn retry_backoff(attempt: i32) -> Duration {
    Duration::from_secs(1u64 << attempt.clamp(0, 8) as u32).min(Duration::from_secs(300))
}

/// Deterministic Job name for an attempt of a step of the workflow with UID `uid` under a
/// spec generation: `<workflow>-<step>-g<generation>-<attempt>-<hash>`, where the hash is of
/// the workflow UID, the exact step name, the generation and the attempt. The readable head is
/// lower-cased and cut so the name fits 63 characters (the Job name label limit); the hash
/// keeps names of different (workflow, step) pairs apart even when their heads are equal
/// (workflow `etl` step `load-daily` and workflow `etl-load` step `daily`, steps `A` and `a`,
/// or a workflow recreated under its old name).
pub fn job_name(workflow: &str, uid: &str, generation: i64, step: &str, attempt: i32) -> String {
    let clean: String = step.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let id = format!("{uid}\0{step}\0{generation}\0{attempt}");
    let tail = format!("-g{generation}-{attempt}-{:08x}", crate::core::shard::weight(0, &id) & 0xffff_ffff);
    let head = format!("{workflow}-{clean}");
    let head: String = head.chars().take(63usize.saturating_sub(tail.len())).collect();
    format!("{}{tail}", head.trim_end_matches(['-', '.']))
}

/// A label value (at most 63 characters) that stands for `value`: the value itself when it
/// fits, else its head and a hash, so that two long names never share a label value by
/// accident.
pub fn label_value(value: &str) -> String {
    if value.len() <= 63 {
        return value.to_string();
    }
    let tail = format!("-{:010x}", crate::core::shard::weight(0, value) & 0xff_ffff_ffff);
    let head: String = value.chars().take(63 - tail.len()).collect();
    format!("{}{tail}", head.trim_end_matches(['-', '.', '_']))
}

/// The form of a step name in everything derived from it (Job names, labels, environment
/// variable names): lower case, with `_` and `.` as `-`. Two steps of one workflow must not
/// share it (admission refuses them, and `core::dag::validate` checks again).
pub fn step_key(step: &str) -> String {
    step.to_lowercase().replace(['_', '.'], "-")
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn fresh(name: &str) -> StepStatus {
    StepStatus { step_name: name.to_string(), phase: StepPhase::Pending, attempt: 0, job_name: None, job_uid: None, started_at: None, finished_at: None, output: None, message: None }
}

fn terminal(p: StepPhase) -> bool {
    matches!(p, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped | StepPhase::Cancelled)
}

/// Plan one reconcile. `steps` must be a DAG (check with `core::dag::validate` first) and in
/// any order; `jobs` maps Job names to what was observed of them.
pub fn plan(wf: WorkflowId<'_>, steps: &[StepSpec], previous: &[StepStatus], jobs: &HashMap<String, JobState>, fail_fast: bool, now: Timestamp) -> Plan {
    let prev: HashMap<&str, &StepStatus> = previous.iter().map(|s| (s.step_name.as_str(), s)).collect();
    let mut state: BTreeMap<String, StepStatus> = steps.iter().map(|s| (s.name.clone(), prev.get(s.name.as_str()).map(|p| (*p).clone()).unwrap_or_else(|| fresh(&s.name)))).collect();
    let mut events = Vec::new();
    let mut requeue: Option<Duration> = None;
    let t = Time(now);

    // 1. Fold in what the Jobs say.
    for s in steps {
        let st = state.get_mut(&s.name).expect("every step has a state");
        if st.phase != StepPhase::Running {
            continue;
        }
        let Some(job) = st.job_name.as_ref().and_then(|j| jobs.get(j)) else {
            continue;
        };
        match job {
            JobState::Active => {}
            JobState::ActiveNoted { message, event } => {
                st.message = (!message.is_empty()).then(|| message.clone());
                events.extend(event.clone());
            }
            JobState::Succeeded { output } => {
                st.phase = StepPhase::Succeeded;
                st.finished_at = Some(t.clone());
                st.output = output.as_deref().map(|o| truncate(o, MAX_OUTPUT_BYTES));
                st.message = None;
                events.push(("StepSucceeded", s.name.clone(), format!("step {} succeeded (attempt {})", s.name, st.attempt)));
            }
            // A Job that vanished after its creation was confirmed (UID recorded) failed.
            JobState::Gone if st.job_uid.is_none() => {}
            JobState::Foreign { message } => {
                fail(st, &s.name, message, &t, &mut events);
            }
            JobState::Failed { .. } | JobState::Gone => {
                let (reason, message) = match job {
                    JobState::Failed { reason, message } => (reason.clone(), message.clone()),
                    _ => ("JobDeleted".to_string(), "the step's Job was deleted".to_string()),
                };
                let timed_out = reason == "DeadlineExceeded";
                let what = if timed_out {
                    "timed out".to_string()
                } else if message.is_empty() {
                    format!("failed ({reason})")
                } else {
                    format!("failed: {message}")
                };
                st.finished_at = Some(t.clone());
                if st.attempt < s.retries && reason != OUTPUT_TOO_LARGE {
                    st.phase = StepPhase::Retrying;
                    st.message = Some(format!("attempt {} {what}; retrying", st.attempt));
                    events.push(("StepRetried", s.name.clone(), format!("step {} attempt {} {what}; retrying in {:?}", s.name, st.attempt, retry_backoff(st.attempt))));
                } else {
                    st.phase = StepPhase::Failed;
                    st.message = Some(format!("attempt {} {what}", st.attempt));
                    events.push((if timed_out { "StepTimedOut" } else { "StepFailed" }, s.name.clone(), format!("step {} {what}", s.name)));
                }
            }
        }
    }

    // 2. Decide what may start.
    let any_failed = state.values().any(|s| s.phase == StepPhase::Failed);
    let mut creates = Vec::new();
    let order = topo(steps);
    for name in order {
        let s = steps.iter().find(|x| x.name == name).expect("topo order holds spec steps");
        let dep_phases: Vec<StepPhase> = s.deps.iter().filter_map(|d| state.get(d).map(|x| x.phase)).collect();
        let st = state.get_mut(&s.name).expect("every step has a state");
        match st.phase {
            StepPhase::Pending => {
                if dep_phases.iter().any(|p| matches!(p, StepPhase::Failed | StepPhase::Skipped)) {
                    st.phase = StepPhase::Skipped;
                    st.message = Some("an upstream step failed".into());
                } else if dep_phases.iter().all(|p| *p == StepPhase::Succeeded) && !(fail_fast && any_failed) {
                    start(wf, st, 0, &t, &mut creates);
                }
            }
            StepPhase::Retrying => {
                if fail_fast && any_failed {
                    continue;
                }
                let failed_at = st.finished_at.as_ref().map(|f| f.0).unwrap_or(now);
                let due = failed_at + SignedDuration::try_from(retry_backoff(st.attempt)).unwrap_or(SignedDuration::ZERO);
                if now >= due {
                    let next = st.attempt + 1;
                    start(wf, st, next, &t, &mut creates);
                } else {
                    let wait = Duration::try_from(due.duration_since(now)).unwrap_or_default();
                    requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
                }
            }
            StepPhase::Running if st.job_uid.is_none() && matches!(st.job_name.as_ref().and_then(|j| jobs.get(j)), Some(JobState::Gone) | None) => {
                // Recorded as started but the Job's creation was never confirmed (a crash
                // between create and record): create it again under the same name; if it
                // does exist, the API server answers AlreadyExists.
                if let Some(j) = st.job_name.clone() {
                    creates.push(CreateJob { step: s.name.clone(), attempt: st.attempt, job_name: j });
                }
            }
            _ => {}
        }
    }

    // 3. The workflow's phase.
    let mut p =
        Plan { steps: steps.iter().map(|s| state[&s.name].clone()).collect(), creates, cancels: Vec::new(), events, phase: WorkflowPhase::Started, message: String::new(), requeue_after: requeue };
    p.conclude(fail_fast, now);
    p
}

impl Plan {
    /// Fail `step` outright (no retry) with `message`: for a Job the API server refused, or a
    /// name taken by an object this workflow does not own. Then conclude again, so fail-fast
    /// cancels what is still running.
    pub fn fail_step(&mut self, step: &str, message: String, fail_fast: bool, now: Timestamp) {
        let Some(st) = self.steps.iter_mut().find(|s| s.step_name == step) else {
            return;
        };
        fail(st, step, &message, &Time(now), &mut self.events);
        self.creates.retain(|c| c.step != step);
        self.conclude(fail_fast, now);
    }

    /// Set the workflow's phase from its steps. A workflow that failed fast cancels the steps
    /// still running or waiting to retry: their Jobs go in `cancels`, the steps become
    /// `Cancelled`, so status never shows a step running for ever.
    fn conclude(&mut self, fail_fast: bool, now: Timestamp) {
        let all_ok = self.steps.iter().all(|s| s.phase == StepPhase::Succeeded);
        let failed: Vec<String> = self.steps.iter().filter(|s| s.phase == StepPhase::Failed).map(|s| s.step_name.clone()).collect();
        let all_terminal = self.steps.iter().all(|s| terminal(s.phase));
        let (phase, message) = if all_ok {
            (WorkflowPhase::Completed, format!("all {} steps succeeded", self.steps.len()))
        } else if !failed.is_empty() && (fail_fast || all_terminal) {
            (WorkflowPhase::Failed, format!("step {} failed", failed.join(", ")))
        } else {
            let done = self.steps.iter().filter(|s| s.phase == StepPhase::Succeeded).count();
            (WorkflowPhase::Started, format!("{done}/{} steps succeeded", self.steps.len()))
        };
        if phase == WorkflowPhase::Failed && fail_fast {
            for st in self.steps.iter_mut().filter(|s| matches!(s.phase, StepPhase::Running | StepPhase::Retrying)) {
                if st.phase == StepPhase::Running
                    && let Some(j) = &st.job_name
                {
                    self.cancels.push(j.clone());
                }
                st.phase = StepPhase::Cancelled;
                st.finished_at = Some(Time(now));
                st.message = Some(format!("cancelled: step {} failed and failFast is on", failed.join(", ")));
                self.events.push(("StepCancelled", st.step_name.clone(), format!("step {} cancelled: step {} failed", st.step_name, failed.join(", "))));
            }
            self.creates.retain(|c| self.steps.iter().any(|s| s.step_name == c.step && s.phase == StepPhase::Running));
        }
        self.phase = phase;
        self.message = message;
    }
}

fn fail(st: &mut StepStatus, name: &str, message: &str, now: &Time, events: &mut Vec<PlannedEvent>) {
    st.phase = StepPhase::Failed;
    st.finished_at = Some(now.clone());
    st.message = Some(message.to_string());
    events.push(("StepFailed", name.to_string(), format!("step {name}: {message}")));
}

fn start(wf: WorkflowId<'_>, st: &mut StepStatus, attempt: i32, now: &Time, creates: &mut Vec<CreateJob>) {
    let name = job_name(wf.name, wf.uid, wf.generation, &st.step_name, attempt);
    st.phase = StepPhase::Running;
    st.attempt = attempt;
    st.job_name = Some(name.clone());
    st.job_uid = None;
    st.started_at = Some(now.clone());
    st.finished_at = None;
    creates.push(CreateJob { step: st.step_name.clone(), attempt, job_name: name });
}

/// Spec steps in dependency order (a DAG is assumed; steps in a cycle are left out).
fn topo(steps: &[StepSpec]) -> Vec<String> {
    let edges: Vec<crate::core::dag::Edges<'_>> = steps.iter().map(|s| (s.name.as_str(), s.deps.as_slice())).collect();
    crate::core::dag::topo_order(&edges).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn spec(v: &[(&str, &[&str], i32)]) -> Vec<StepSpec> {
        v.iter().map(|(n, d, r)| StepSpec { name: n.to_string(), deps: d.iter().map(|s| s.to_string()).collect(), retries: *r }).collect()
    }

    const WF: WorkflowId<'static> = WorkflowId { name: "wf", uid: "uid-1", generation: 1 };

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// Drive a workflow to the end: every Job the plan creates finishes as `outcome` says.
    fn run(steps: &[StepSpec], fail_fast: bool, outcome: impl Fn(&str, i32) -> JobState) -> (Plan, Vec<CreateJob>) {
        let mut status: Vec<StepStatus> = vec![];
        let mut jobs: HashMap<String, JobState> = HashMap::new();
        let mut created: Vec<CreateJob> = vec![];
        let mut clock = 0;
        for _ in 0..1000 {
            clock += 400;
            let p = plan(WF, steps, &status, &jobs, fail_fast, ts(clock));
            for c in &p.creates {
                // Record the Job as created (UID recorded) and let it finish.
                jobs.insert(c.job_name.clone(), outcome(&c.step, c.attempt));
            }
            created.extend(p.creates.iter().cloned());
            status = p.steps.clone();
            for s in status.iter_mut() {
                if s.phase == StepPhase::Running {
                    s.job_uid = Some("uid".into());
                }
            }
            if p.phase != WorkflowPhase::Started && p.creates.is_empty() {
                return (p, created);
            }
        }
        panic!("did not finish");
    }

    #[test]
    fn diamond_runs_in_order_and_completes() {
        let s = spec(&[("a", &[], 0), ("b", &["a"], 0), ("c", &["a"], 0), ("d", &["b", "c"], 0)]);
        let p0 = plan(WF, &s, &[], &HashMap::new(), true, ts(0));
        assert_eq!(p0.creates.iter().map(|c| c.step.as_str()).collect::<Vec<_>>(), vec!["a"]);
        let (end, created) = run(&s, true, |_, _| JobState::Succeeded { output: Some("x".into()) });
        assert_eq!(end.phase, WorkflowPhase::Completed);
        assert_eq!(created.len(), 4);
        let pos = |n: &str| created.iter().position(|c| c.step == n).unwrap();
        assert!(pos("a") < pos("b") && pos("a") < pos("c") && pos("b") < pos("d") && pos("c") < pos("d"));
    }

    #[test]
    fn fail_fast_stops_and_fail_slow_finishes_other_branches() {
        let s = spec(&[("a", &[], 0), ("bad", &["a"], 0), ("after-bad", &["bad"], 0), ("ok", &["a"], 0), ("after-ok", &["ok"], 0)]);
        let outcome = |step: &str, _| {
            if step == "bad" { JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "exit 3".into() } } else { JobState::Succeeded { output: None } }
        };
        let (end, _) = run(&s, false, outcome);
        assert_eq!(end.phase, WorkflowPhase::Failed);
        let ph: HashMap<_, _> = end.steps.iter().map(|s| (s.step_name.as_str(), s.phase)).collect();
        assert_eq!(ph["after-ok"], StepPhase::Succeeded);
        assert_eq!(ph["after-bad"], StepPhase::Skipped);
        assert_eq!(ph["bad"], StepPhase::Failed);
    }

    #[test]
    fn retry_then_success_uses_a_new_job_name() {
        let s = spec(&[("a", &[], 2)]);
        let (end, created) =
            run(&s, true, |_, attempt| if attempt == 0 { JobState::Failed { reason: "BackoffLimitExceeded".into(), message: String::new() } } else { JobState::Succeeded { output: None } });
        assert_eq!(end.phase, WorkflowPhase::Completed);
        assert_eq!(created.len(), 2);
        assert_ne!(created[0].job_name, created[1].job_name);
        assert_eq!(end.steps[0].attempt, 1);
    }

    /// Step `name` of workflow "wf" (generation 1) in `phase`, with its attempt-0 Job recorded.
    fn first_attempt(name: &str, phase: StepPhase) -> StepStatus {
        StepStatus { phase, job_name: Some(job_name("wf", "uid-1", 1, name, 0)), job_uid: Some("u".into()), ..fresh(name) }
    }

    #[test]
    fn retry_waits_for_backoff() {
        let s = spec(&[("a", &[], 1)]);
        let st = first_attempt("a", StepPhase::Running);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Failed { reason: "X".into(), message: String::new() })].into();
        let p = plan(WF, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Retrying);
        assert!(p.creates.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(1)));
        let p2 = plan(WF, &s, &p.steps, &HashMap::new(), true, ts(1));
        assert_eq!(p2.creates.len(), 1);
        assert_eq!(p2.creates[0].attempt, 1);
    }

    #[test]
    fn timeout_is_reported_as_such() {
        let s = spec(&[("a", &[], 0)]);
        let p = plan(WF, &s, &[], &HashMap::new(), true, ts(0));
        let mut steps = p.steps;
        steps[0].job_uid = Some("u".into());
        let jobs: HashMap<_, _> = [(p.creates[0].job_name.clone(), JobState::Failed { reason: "DeadlineExceeded".into(), message: "Job was active longer than specified deadline".into() })].into();
        let p = plan(WF, &s, &steps, &jobs, true, ts(5));
        assert_eq!(p.phase, WorkflowPhase::Failed);
        assert_eq!(p.events[0].0, "StepTimedOut");
    }

    #[test]
    fn terminal_step_never_gets_a_job_again_even_if_its_job_is_gone() {
        let s = spec(&[("a", &[], 3)]);
        let st = first_attempt("a", StepPhase::Succeeded);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Gone)].into();
        let p = plan(WF, &s, &[st], &jobs, true, ts(0));
        assert!(p.creates.is_empty());
        assert_eq!(p.phase, WorkflowPhase::Completed);
    }

    #[test]
    fn pod_news_sets_the_message_of_a_running_step_and_its_event() {
        let s = spec(&[("a", &[], 1)]);
        let st = first_attempt("a", StepPhase::Running);
        let noted = JobState::ActiveNoted { message: "pod cannot start: Unschedulable".into(), event: Some(("StepCannotStart", "a".into(), "step a: pod cannot start".into())) };
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), noted)].into();
        let p = plan(WF, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Running);
        assert_eq!(p.steps[0].message.as_deref(), Some("pod cannot start: Unschedulable"));
        assert_eq!(p.events, vec![("StepCannotStart", "a".to_string(), "step a: pod cannot start".to_string())]);
        assert!(p.creates.is_empty());
        let cleared: HashMap<_, _> = [(p.steps[0].job_name.clone().unwrap(), JobState::ActiveNoted { message: String::new(), event: None })].into();
        let p = plan(WF, &s, &p.steps, &cleared, true, ts(1));
        assert_eq!(p.steps[0].message, None);
        assert!(p.events.is_empty());
    }

    #[test]
    fn an_output_over_the_budget_is_not_retried() {
        let s = spec(&[("a", &[], 3)]);
        let st = first_attempt("a", StepPhase::Running);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Failed { reason: OUTPUT_TOO_LARGE.into(), message: "too big".into() })].into();
        let p = plan(WF, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Failed);
        assert_eq!(p.steps[0].message.as_deref(), Some("attempt 0 failed: too big"));
        assert_eq!(p.phase, WorkflowPhase::Failed);
    }

    #[test]
    fn job_names_are_unambiguous_and_fit() {
        let n = job_name(&"w".repeat(60), "u", 12, "Step_With.Odd", 3);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, job_name(&"w".repeat(60), "u", 12, "Step_With.Odd", 3));
        assert_ne!(n, job_name(&"w".repeat(60), "u", 12, "Step_With.Odd", 4));
        assert!(job_name("wf", "u", 1, "Fetch_Data", 0).starts_with("wf-fetch-data-g1-0-"));
        // Equal readable heads, different (workflow, step) pairs: different names.
        assert_ne!(job_name("etl", "u1", 1, "load-daily", 0), job_name("etl-load", "u2", 1, "daily", 0));
        assert_ne!(job_name("etl", "u1", 1, "load-daily", 0), job_name("etl-load", "u1", 1, "daily", 0));
        assert_ne!(job_name("wf", "u", 1, "A", 0), job_name("wf", "u", 1, "a", 0));
        // The same workflow name recreated (a new UID) never reuses an old Job's name.
        assert_ne!(job_name("wf", "old-uid", 1, "a", 0), job_name("wf", "new-uid", 1, "a", 0));
        // A 253-character workflow name still makes a valid Job name.
        let long = job_name(&format!("{}.x", "a".repeat(251)), "u", 1, "s", 0);
        assert!(long.len() <= 63 && !long.contains(".-"), "{long}");
    }

    #[test]
    fn label_values_fit_and_stay_distinct() {
        assert_eq!(label_value("short"), "short");
        let a = label_value(&"a".repeat(253));
        let b = label_value(&format!("{}b", "a".repeat(252)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    #[test]
    fn step_keys_fold_case_and_separators() {
        assert_eq!(step_key("Load_Data.v2"), step_key("load-data-v2"));
        assert_ne!(step_key("a-b"), step_key("ab"));
    }

    #[test]
    fn a_foreign_job_fails_its_step_without_retry() {
        let s = spec(&[("a", &[], 3)]);
        let st = first_attempt("a", StepPhase::Running);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Foreign { message: "taken".into() })].into();
        let p = plan(WF, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Failed);
        assert!(p.creates.is_empty());
        assert_eq!(p.phase, WorkflowPhase::Failed);
    }

    #[test]
    fn fail_fast_cancels_running_steps_and_deletes_their_jobs() {
        let s = spec(&[("a", &[], 0), ("b", &[], 0), ("c", &[], 2)]);
        let p0 = plan(WF, &s, &[], &HashMap::new(), true, ts(0));
        let mut steps = p0.steps.clone();
        for st in steps.iter_mut() {
            st.job_uid = Some("u".into());
        }
        let name = |n: &str| steps.iter().find(|x| x.step_name == n).unwrap().job_name.clone().unwrap();
        let jobs: HashMap<_, _> = [
            (name("a"), JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "exit 1".into() }),
            (name("b"), JobState::Active),
            (name("c"), JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "exit 1".into() }),
        ]
        .into();
        let p = plan(WF, &s, &steps, &jobs, true, ts(1));
        assert_eq!(p.phase, WorkflowPhase::Failed);
        let ph: HashMap<_, _> = p.steps.iter().map(|s| (s.step_name.as_str(), s.phase)).collect();
        assert_eq!(ph["a"], StepPhase::Failed);
        assert_eq!(ph["b"], StepPhase::Cancelled);
        assert_eq!(ph["c"], StepPhase::Cancelled, "a step waiting to retry is cancelled too");
        assert_eq!(p.cancels, vec![name("b")]);
        assert!(p.creates.is_empty());
        // Without failFast the running step is followed to its end.
        let p = plan(WF, &s, &steps, &jobs, false, ts(1));
        assert!(p.cancels.is_empty());
        assert_eq!(p.phase, WorkflowPhase::Started);
    }

    #[test]
    fn a_step_failed_after_planning_concludes_the_workflow() {
        let s = spec(&[("a", &[], 0), ("b", &[], 0)]);
        let mut p = plan(WF, &s, &[], &HashMap::new(), true, ts(0));
        assert_eq!(p.creates.len(), 2);
        p.fail_step("a", "Job rejected by the API server: bad env".into(), true, ts(0));
        assert_eq!(p.phase, WorkflowPhase::Failed);
        let b = p.steps.iter().find(|x| x.step_name == "b").unwrap();
        assert_eq!(b.phase, StepPhase::Cancelled);
        assert_eq!(p.cancels, vec![b.job_name.clone().unwrap()]);
    }

    fn arb_dag() -> impl Strategy<Value = Vec<StepSpec>> {
        (2usize..15).prop_flat_map(|n| {
            proptest::collection::vec((proptest::collection::vec(any::<u16>(), 0..4), 0i32..3), n).prop_map(move |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (deps, retries))| {
                        let mut d: Vec<String> = if i == 0 { vec![] } else { deps.iter().map(|x| format!("s{}", *x as usize % i)).collect() };
                        d.sort();
                        d.dedup();
                        StepSpec { name: format!("s{i}"), deps: d, retries }
                    })
                    .collect()
            })
        })
    }

    proptest! {
        #[test]
        fn planner_invariants(steps in arb_dag(), fail_fast in any::<bool>(), fail_seed in any::<u64>()) {
            let fails = |step: &str, attempt: i32| (crate::core::shard::weight(attempt as u32, step) ^ fail_seed).is_multiple_of(4);
            let mut status: Vec<StepStatus> = vec![];
            let mut jobs: HashMap<String, JobState> = HashMap::new();
            let mut planned: HashSet<(String, i32)> = HashSet::new();
            let mut clock = 0;
            let mut last = None;
            for _ in 0..2000 {
                clock += 400;
                let p = plan(WF, &steps, &status, &jobs, fail_fast, ts(clock));
                let succeeded: HashSet<&str> = status.iter().filter(|s| s.phase == StepPhase::Succeeded).map(|s| s.step_name.as_str()).collect();
                let newly_ok: HashSet<&str> = p.steps.iter().filter(|s| s.phase == StepPhase::Succeeded).map(|s| s.step_name.as_str()).collect();
                for c in &p.creates {
                    let spec = steps.iter().find(|s| s.name == c.step).unwrap();
                    for d in &spec.deps {
                        prop_assert!(succeeded.contains(d.as_str()) || newly_ok.contains(d.as_str()), "{} started before {} succeeded", c.step, d);
                    }
                    prop_assert!(planned.insert((c.step.clone(), c.attempt)), "attempt {} of {} planned twice", c.attempt, c.step);
                    prop_assert!(c.attempt <= spec.retries);
                    jobs.insert(c.job_name.clone(), JobState::Active);
                }
                status = p.steps.clone();
                for s in status.iter_mut() { if s.phase == StepPhase::Running { s.job_uid = Some("u".into()); } }
                // Replaying the same observation (the Jobs now exist, status recorded) plans
                // nothing new.
                let replay = plan(WF, &steps, &status, &jobs, fail_fast, ts(clock));
                prop_assert!(replay.creates.is_empty(), "replay planned {:?}", replay.creates);
                for c in &p.creates {
                    jobs.insert(c.job_name.clone(), if fails(&c.step, c.attempt) { JobState::Failed { reason: "X".into(), message: String::new() } } else { JobState::Succeeded { output: None } });
                }
                let all_ok = status.iter().all(|s| s.phase == StepPhase::Succeeded);
                prop_assert_eq!(p.phase == WorkflowPhase::Completed, all_ok);
                if p.phase != WorkflowPhase::Started && p.creates.is_empty() { last = Some(p); break; }
            }
            prop_assert!(last.is_some(), "workflow finished");
        }
    }
}
