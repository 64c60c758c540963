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
    Succeeded { output: Option<String> },
    Failed { reason: String, message: String },
    /// Active, with news of its pod (it cannot start; disrupted pods were replaced): the step
    /// stays Running with `message` as its message (none if empty), and `event` is emitted.
    ActiveNoted { message: String, event: Option<PlannedEvent> },
}

/// A Job to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateJob {
    pub step: String,
    pub attempt: i32,
    pub job_name: String,
}

/// An Event to emit: (reason, message).
pub type PlannedEvent = (&'static str, String);

#[derive(Debug, Clone)]
pub struct Plan {
    /// New state of every step, in spec order.
    pub steps: Vec<StepStatus>,
    pub creates: Vec<CreateJob>,
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

/// Deterministic Job name for an attempt of a step under a spec generation. Names longer
/// than 63 characters (the Job name label limit) are cut and suffixed with a hash.
pub fn job_name(workflow: &str, generation: i64, step: &str, attempt: i32) -> String {
    let step: String = step.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let full = format!("{workflow}-{step}-g{generation}-{attempt}");
    if full.len() <= 63 {
        return full;
    }
    let h = crate::core::shard::weight(0, &full);
    let tail = format!("-{:010x}", h & 0xff_ffff_ffff);
    let head: String = full.chars().take(63 - tail.len()).collect();
    format!("{}{tail}", head.trim_end_matches('-'))
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
    matches!(p, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped)
}

/// Plan one reconcile. `steps` must be a DAG (check with `core::dag::validate` first) and in
/// any order; `jobs` maps Job names to what was observed of them.
pub fn plan(workflow: &str, generation: i64, steps: &[StepSpec], previous: &[StepStatus], jobs: &HashMap<String, JobState>, fail_fast: bool, now: Timestamp) -> Plan {
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
        let Some(job) = st.job_name.as_ref().and_then(|j| jobs.get(j)) else { continue };
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
                events.push(("StepSucceeded", format!("step {} succeeded (attempt {})", s.name, st.attempt)));
            }
            // A Job that vanished after its creation was confirmed (UID recorded) failed.
            JobState::Gone if st.job_uid.is_none() => {}
            JobState::Failed { .. } | JobState::Gone => {
                let (reason, message) = match job {
                    JobState::Failed { reason, message } => (reason.clone(), message.clone()),
                    _ => ("JobDeleted".to_string(), "the step's Job was deleted".to_string()),
                };
                let timed_out = reason == "DeadlineExceeded";
                let what = if timed_out { "timed out".to_string() } else if message.is_empty() { format!("failed ({reason})") } else { format!("failed: {message}") };
                st.finished_at = Some(t.clone());
                if st.attempt < s.retries && reason != OUTPUT_TOO_LARGE {
                    st.phase = StepPhase::Retrying;
                    st.message = Some(format!("attempt {} {what}; retrying", st.attempt));
                    events.push(("StepRetried", format!("step {} attempt {} {what}; retrying in {:?}", s.name, st.attempt, retry_backoff(st.attempt))));
                } else {
                    st.phase = StepPhase::Failed;
                    st.message = Some(format!("attempt {} {what}", st.attempt));
                    events.push((if timed_out { "StepTimedOut" } else { "StepFailed" }, format!("step {} {what}", s.name)));
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
                    start(workflow, generation, st, 0, &t, &mut creates);
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
                    start(workflow, generation, st, next, &t, &mut creates);
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
    let list: Vec<StepStatus> = steps.iter().map(|s| state[&s.name].clone()).collect();
    let all_ok = list.iter().all(|s| s.phase == StepPhase::Succeeded);
    let failed: Vec<&str> = list.iter().filter(|s| s.phase == StepPhase::Failed).map(|s| s.step_name.as_str()).collect();
    let all_terminal = list.iter().all(|s| terminal(s.phase));
    let (phase, message) = if all_ok {
        (WorkflowPhase::Completed, format!("all {} steps succeeded", list.len()))
    } else if !failed.is_empty() && (fail_fast || all_terminal) {
        (WorkflowPhase::Failed, format!("step {} failed", failed.join(", ")))
    } else {
        let done = list.iter().filter(|s| s.phase == StepPhase::Succeeded).count();
        (WorkflowPhase::Started, format!("{done}/{} steps succeeded", list.len()))
    };
    Plan { steps: list, creates, events, phase, message, requeue_after: requeue }
}

fn start(workflow: &str, generation: i64, st: &mut StepStatus, attempt: i32, now: &Time, creates: &mut Vec<CreateJob>) {
    let name = job_name(workflow, generation, &st.step_name, attempt);
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
            let p = plan("wf", 1, steps, &status, &jobs, fail_fast, ts(clock));
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
        let p0 = plan("wf", 1, &s, &[], &HashMap::new(), true, ts(0));
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
        let outcome = |step: &str, _| if step == "bad" { JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "exit 3".into() } } else { JobState::Succeeded { output: None } };
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
        let (end, created) = run(&s, true, |_, attempt| if attempt == 0 { JobState::Failed { reason: "BackoffLimitExceeded".into(), message: String::new() } } else { JobState::Succeeded { output: None } });
        assert_eq!(end.phase, WorkflowPhase::Completed);
        assert_eq!(created.len(), 2);
        assert_ne!(created[0].job_name, created[1].job_name);
        assert_eq!(end.steps[0].attempt, 1);
    }

    /// Step `name` of workflow "wf" (generation 1) in `phase`, with its attempt-0 Job recorded.
    fn first_attempt(name: &str, phase: StepPhase) -> StepStatus {
        StepStatus { phase, job_name: Some(job_name("wf", 1, name, 0)), job_uid: Some("u".into()), ..fresh(name) }
    }

    #[test]
    fn retry_waits_for_backoff() {
        let s = spec(&[("a", &[], 1)]);
        let st = first_attempt("a", StepPhase::Running);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Failed { reason: "X".into(), message: String::new() })].into();
        let p = plan("wf", 1, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Retrying);
        assert!(p.creates.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(1)));
        let p2 = plan("wf", 1, &s, &p.steps, &HashMap::new(), true, ts(1));
        assert_eq!(p2.creates.len(), 1);
        assert_eq!(p2.creates[0].attempt, 1);
    }

    #[test]
    fn timeout_is_reported_as_such() {
        let s = spec(&[("a", &[], 0)]);
        let p = plan("wf", 1, &s, &[], &HashMap::new(), true, ts(0));
        let mut steps = p.steps;
        steps[0].job_uid = Some("u".into());
        let jobs: HashMap<_, _> = [(p.creates[0].job_name.clone(), JobState::Failed { reason: "DeadlineExceeded".into(), message: "Job was active longer than specified deadline".into() })].into();
        let p = plan("wf", 1, &s, &steps, &jobs, true, ts(5));
        assert_eq!(p.phase, WorkflowPhase::Failed);
        assert_eq!(p.events[0].0, "StepTimedOut");
    }

    #[test]
    fn terminal_step_never_gets_a_job_again_even_if_its_job_is_gone() {
        let s = spec(&[("a", &[], 3)]);
        let st = first_attempt("a", StepPhase::Succeeded);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Gone)].into();
        let p = plan("wf", 1, &s, &[st], &jobs, true, ts(0));
        assert!(p.creates.is_empty());
        assert_eq!(p.phase, WorkflowPhase::Completed);
    }

    #[test]
    fn pod_news_sets_the_message_of_a_running_step_and_its_event() {
        let s = spec(&[("a", &[], 1)]);
        let st = first_attempt("a", StepPhase::Running);
        let noted = JobState::ActiveNoted { message: "pod cannot start: Unschedulable".into(), event: Some(("StepCannotStart", "step a: pod cannot start".into())) };
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), noted)].into();
        let p = plan("wf", 1, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Running);
        assert_eq!(p.steps[0].message.as_deref(), Some("pod cannot start: Unschedulable"));
        assert_eq!(p.events, vec![("StepCannotStart", "step a: pod cannot start".to_string())]);
        assert!(p.creates.is_empty());
        let cleared: HashMap<_, _> = [(p.steps[0].job_name.clone().unwrap(), JobState::ActiveNoted { message: String::new(), event: None })].into();
        let p = plan("wf", 1, &s, &p.steps, &cleared, true, ts(1));
        assert_eq!(p.steps[0].message, None);
        assert!(p.events.is_empty());
    }

    #[test]
    fn an_output_over_the_budget_is_not_retried() {
        let s = spec(&[("a", &[], 3)]);
        let st = first_attempt("a", StepPhase::Running);
        let jobs: HashMap<_, _> = [(st.job_name.clone().unwrap(), JobState::Failed { reason: OUTPUT_TOO_LARGE.into(), message: "too big".into() })].into();
        let p = plan("wf", 1, &s, &[st], &jobs, true, ts(0));
        assert_eq!(p.steps[0].phase, StepPhase::Failed);
        assert_eq!(p.steps[0].message.as_deref(), Some("attempt 0 failed: too big"));
        assert_eq!(p.phase, WorkflowPhase::Failed);
    }

    #[test]
    fn long_names_are_cut_deterministically() {
        let n = job_name(&"w".repeat(60), 12, "Step_With.Odd", 3);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, job_name(&"w".repeat(60), 12, "Step_With.Odd", 3));
        assert_ne!(n, job_name(&"w".repeat(60), 12, "Step_With.Odd", 4));
        assert_eq!(job_name("wf", 1, "Fetch_Data", 0), "wf-fetch-data-g1-0");
    }

    fn arb_dag() -> impl Strategy<Value = Vec<StepSpec>> {
        (2usize..15).prop_flat_map(|n| {
            proptest::collection::vec((proptest::collection::vec(any::<u16>(), 0..4), 0i32..3), n).prop_map(move |v| {
                v.into_iter().enumerate().map(|(i, (deps, retries))| {
                    let mut d: Vec<String> = if i == 0 { vec![] } else { deps.iter().map(|x| format!("s{}", *x as usize % i)).collect() };
                    d.sort();
                    d.dedup();
                    StepSpec { name: format!("s{i}"), deps: d, retries }
                }).collect()
            })
        })
    }

    proptest! {
        #[test]
        fn planner_invariants(steps in arb_dag(), fail_fast in any::<bool>(), fail_seed in any::<u64>()) {
            let fails = |step: &str, attempt: i32| (crate::core::shard::weight(attempt as u32, step) ^ fail_seed) % 4 == 0;
            let mut status: Vec<StepStatus> = vec![];
            let mut jobs: HashMap<String, JobState> = HashMap::new();
            let mut planned: HashSet<(String, i32)> = HashSet::new();
            let mut clock = 0;
            let mut last = None;
            for _ in 0..2000 {
                clock += 400;
                let p = plan("wf", 1, &steps, &status, &jobs, fail_fast, ts(clock));
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
                let replay = plan("wf", 1, &steps, &status, &jobs, fail_fast, ts(clock));
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
