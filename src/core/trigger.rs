//! What starts a Task's runs, and how their outcomes are recorded (seed 004): the pure rules
//! behind `controllers::task`. No clock, no client: the controller passes `now` and what it
//! sees of the Task's triggers, and records what these functions return in the Task's status
//! with a resourceVersion precondition before it creates any Job.
//!
//! **Cursors.** For each trigger (an Ignitor or a Task, identified by UID) the Task's status
//! holds a cursor: the last scheduled time (Ignitor) or finished-run `seq` (Task) it has acted
//! on, and `since`, the time from which firings and finished runs count. Everything past the
//! cursor is acted on once and the cursor moves past it in the same write, so a run is decided
//! exactly once; its name is derived from what started it, so creating its Job twice meets
//! AlreadyExists instead of a second Job.
//!
//! **Loops.** A run started by a failed run waits an exponential backoff, and a chain of
//! failures in a row (or any chain of runs started by runs) is cut at a configurable length:
//! the seed's own retry loop, `task1 startOnFailure: [task1]`, is bounded.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::task::{ConcurrencyPolicy, Ignition, Initiator, LoopGuard, RunPhase, TaskRun, TaskState, TaskStatus, TriggerCursor};
use crate::core::plan::truncate;
use crate::core::schedule::{self, Decision};

/// Kind names of triggers, as recorded in cursors and initiators.
pub const IGNITOR: &str = "Ignitor";
pub const TASK: &str = "Task";

/// Bytes of a termination message kept (the kubelet's own limit per container).
pub const MAX_OUTPUT_BYTES: usize = 4096;
/// Runs waiting or running at once, per Task; a trigger beyond it is recorded as skipped
/// (`TooManyRuns`), so status stays within its size bound.
pub const MAX_ACTIVE_RUNS: usize = 200;
/// How long a finished run beyond its history limit stays in status, so that a dependent
/// whose owner is failing over still sees it.
pub const GRACE: Duration = Duration::from_secs(60);
/// Finished runs beyond the history limits kept during `GRACE`, at most.
pub const MAX_EXTRA_RUNS: usize = 100;

/// The loop guard with its defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub max_failures_in_a_row: i32,
    pub max_chain: i32,
}

impl Guard {
    pub fn from_spec(g: Option<&LoopGuard>) -> Self {
        let g = g.cloned().unwrap_or_default();
        let secs = |v: Option<i64>, d: i64| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
        Guard {
            backoff: secs(g.backoff_seconds, LoopGuard::DEFAULT_BACKOFF_SECONDS),
            max_backoff: secs(g.max_backoff_seconds, LoopGuard::DEFAULT_MAX_BACKOFF_SECONDS),
            max_failures_in_a_row: g.max_consecutive_failures.unwrap_or(LoopGuard::DEFAULT_MAX_CONSECUTIVE_FAILURES).max(0),
            max_chain: g.max_chain_length.unwrap_or(LoopGuard::DEFAULT_MAX_CHAIN_LENGTH).max(1),
        }
    }

    /// The wait before the run that follows the `n`th failure in a row:
    /// `backoff * 2^(n-1)`, at most `max_backoff`; none after a success.
    pub fn delay(&self, n: i32) -> Duration {
        if n <= 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl((n - 1).min(31) as u32).unwrap_or(u32::MAX);
        self.backoff.checked_mul(factor).unwrap_or(self.max_backoff).min(self.max_backoff)
    }
}

/// What a Task sees of one of its triggers.
#[derive(Debug, Clone)]
pub enum Source {
    Ignitor { name: String, uid: String, created: Timestamp, data: Option<String>, policy: ConcurrencyPolicy, ignitions: Vec<Ignition> },
    Task { name: String, uid: String, created: Timestamp, runs: Vec<TaskRun>, on_success: bool, on_failure: bool },
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Source::Ignitor { .. } => IGNITOR,
            Source::Task { .. } => TASK,
        }
    }
    fn name(&self) -> &str {
        match self {
            Source::Ignitor { name, .. } | Source::Task { name, .. } => name,
        }
    }
    fn uid(&self) -> &str {
        match self {
            Source::Ignitor { uid, .. } | Source::Task { uid, .. } => uid,
        }
    }
    fn created(&self) -> Timestamp {
        match self {
            Source::Ignitor { created, .. } | Source::Task { created, .. } => *created,
        }
    }
}

/// The Task being planned.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub created: Timestamp,
    /// The spec changed since status was last recorded (or status was never recorded): a
    /// trigger seen for the first time may have just been added to it, so its past is not
    /// acted on.
    pub spec_changed: bool,
    pub guard: Guard,
}

/// What `record_triggers` decided, for Events and for the controller's acts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    /// Runs recorded as Pending (to start once their `startAfter` has passed).
    pub started: Vec<String>,
    /// Runs recorded as Skipped: (name, reason, message).
    pub skipped: Vec<(String, String, String)>,
    /// Runs recorded as Stopped by `concurrencyPolicy: Replace`: their Jobs are to be deleted.
    pub stopped: Vec<String>,
}

impl Recorded {
    pub fn is_empty(&self) -> bool {
        self.started.is_empty() && self.skipped.is_empty() && self.stopped.is_empty()
    }
}

/// The name of the run of Task `task` (with `uid`) started by run `initiator_run` of the
/// Task with `initiator_uid`: `<task>-<hash>`, a DNS label of at most 63 characters. The
/// hash (40 bits) covers all three, so a Task created again under the same name, or the
/// same initiator run seen twice, derives the same name only when it is the same run.
pub fn chained_run_name(task: &str, uid: &str, initiator_uid: &str, initiator_run: &str) -> String {
    let id = format!("{uid}\0{initiator_uid}\0{initiator_run}");
    let tail = format!("-{:010x}", crate::core::shard::weight(0, &id) & 0xff_ffff_ffff);
    let clean: String = task.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let head: String = clean.chars().take(63 - tail.len()).collect();
    let head = head.trim_matches('-');
    format!("{}{tail}", if head.is_empty() { "run" } else { head })
}

/// The name of the run of Task `task` (with `uid`) for scheduled time `t` of the Ignitor with
/// `ignitor_uid`.
pub fn ignition_run_name(task: &str, uid: &str, ignitor_uid: &str, t: Timestamp) -> String {
    schedule::run_name(task, &format!("{uid}/{ignitor_uid}"), t)
}

fn active(r: &TaskRun) -> bool {
    matches!(r.phase, RunPhase::Pending | RunPhase::Running)
}

/// `t` rounded up to a whole second. `startAfter` is a `Time`, stored with seconds only: cut
/// down, it would let a run start up to a second before its backoff had passed.
fn ceil_second(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() > 0 { Timestamp::from_second(t.as_second().saturating_add(1)).unwrap_or(t) } else { t }
}

fn micro(t: Timestamp) -> MicroTime {
    MicroTime(t)
}

/// Record, in `status`, a run for every firing and finished run of the Task's triggers past
/// their cursors, and move the cursors past them. Cursors of triggers no longer named are
/// dropped. Call only with a complete view of the triggers that exist (a trigger missing
/// from `sources` is treated as not existing: its cursor is dropped).
pub fn record_triggers(status: &mut TaskStatus, task: &Subject<'_>, sources: &[Source], now: Timestamp) -> Recorded {
    let mut out = Recorded::default();
    let mut cursors = Vec::with_capacity(sources.len());
    for src in sources {
        let existing = status.triggers.iter().find(|c| c.kind == src.kind() && c.name == src.name() && c.uid == src.uid()).cloned();
        let mut cursor = existing.unwrap_or_else(|| TriggerCursor {
            kind: src.kind().to_string(),
            name: src.name().to_string(),
            uid: src.uid().to_string(),
            since: micro(if task.spec_changed { now } else { task.created.max(src.created()) }),
            scheduled_time: None,
            seq: None,
        });
        let since = cursor.since.0;
        match src {
            Source::Ignitor { name, uid, data, policy, ignitions, .. } => {
                let mut ordered: Vec<&Ignition> = ignitions.iter().filter(|i| cursor.scheduled_time.as_ref().is_none_or(|c| i.scheduled_time.0 > c.0)).collect();
                ordered.sort_by_key(|i| i.scheduled_time.0);
                for i in ordered {
                    let t = i.scheduled_time.0;
                    cursor.scheduled_time = Some(micro(t));
                    if i.fired_at.0 < since {
                        continue;
                    }
                    let initiator = Initiator { kind: IGNITOR.into(), name: name.clone(), run: None, scheduled_time: Some(micro(t)) };
                    let run = pending(ignition_run_name(task.name, task.uid, uid, t), initiator, data.clone(), (1, 0), None, now);
                    let running: Vec<String> = status.runs.iter().filter(|r| active(r) && r.initiator.kind == IGNITOR && &r.initiator.name == name).map(|r| r.name.clone()).collect();
                    match schedule::concurrency(*policy, &running) {
                        Decision::Start => add(status, run, now, &mut out),
                        Decision::Skip => {
                            skip(status, run, "ConcurrencyForbid", format!("runs started by Ignitor {name} are still running ({}); concurrencyPolicy is Forbid", running.join(", ")), now, &mut out)
                        }
                        Decision::ReplaceThenStart(names) => {
                            for r in status.runs.iter_mut().filter(|r| names.contains(&r.name)) {
                                r.phase = RunPhase::Stopped;
                                r.reason = Some("Replaced".into());
                                r.message = Some(format!("replaced by the run of {} (concurrencyPolicy Replace)", schedule_label(t)));
                                r.finished_at = Some(micro(now));
                                r.data = None;
                                out.stopped.push(r.name.clone());
                            }
                            add(status, run, now, &mut out);
                        }
                    }
                }
            }
            Source::Task { name, uid, runs, on_success, on_failure, .. } => {
                let mut ordered: Vec<&TaskRun> = runs.iter().filter(|r| r.seq.is_some_and(|s| cursor.seq.is_none_or(|c| s > c))).collect();
                ordered.sort_by_key(|r| r.seq);
                for r in ordered {
                    cursor.seq = r.seq;
                    let failed = match r.phase {
                        RunPhase::Succeeded if *on_success => false,
                        RunPhase::Failed if *on_failure => true,
                        _ => continue,
                    };
                    if r.finished_at.as_ref().is_none_or(|f| f.0 < since) {
                        continue;
                    }
                    let failures_in_a_row = if failed { r.failures_in_a_row.saturating_add(1) } else { 0 };
                    let chain = r.chain.max(1).saturating_add(1);
                    let start_after =
                        r.finished_at.as_ref().map(|f| f.0).unwrap_or(now).checked_add(SignedDuration::try_from(task.guard.delay(failures_in_a_row)).unwrap_or(SignedDuration::ZERO)).ok();
                    let initiator = Initiator { kind: TASK.into(), name: name.clone(), run: Some(r.name.clone()), scheduled_time: None };
                    let start_after = start_after.filter(|t| *t > now).map(|t| Time(ceil_second(t)));
                    let run = pending(chained_run_name(task.name, task.uid, uid, &r.name), initiator, r.output.clone(), (chain, failures_in_a_row), start_after, now);
                    if failed && failures_in_a_row >= task.guard.max_failures_in_a_row {
                        let msg = format!("{failures_in_a_row} failures in a row (the last: run {} of Task {name}); loopGuard.maxConsecutiveFailures is {}", r.name, task.guard.max_failures_in_a_row);
                        skip(status, run, "LoopLimit", msg, now, &mut out);
                    } else if chain > task.guard.max_chain {
                        let msg = format!("this run would be run {chain} of a chain of runs started by runs; loopGuard.maxChainLength is {}", task.guard.max_chain);
                        skip(status, run, "ChainLimit", msg, now, &mut out);
                    } else {
                        add(status, run, now, &mut out);
                    }
                }
            }
        }
        cursors.push(cursor);
    }
    status.triggers = cursors;
    out
}

/// A run recorded at `now`, not started yet; `(chain, failures_in_a_row)` as its initiator
/// left them.
fn pending(name: String, initiator: Initiator, data: Option<String>, (chain, failures_in_a_row): (i32, i32), start_after: Option<Time>, now: Timestamp) -> TaskRun {
    TaskRun {
        name,
        phase: RunPhase::Pending,
        initiator,
        data,
        chain,
        failures_in_a_row,
        start_after,
        created_at: Some(micro(now)),
        started_at: None,
        finished_at: None,
        seq: None,
        output: None,
        reason: None,
        message: None,
    }
}

fn schedule_label(t: Timestamp) -> String {
    t.to_string()
}

/// Record `run` as Pending, unless a run of its name is already recorded (it was decided
/// before) or too many runs are active.
fn add(status: &mut TaskStatus, run: TaskRun, now: Timestamp, out: &mut Recorded) {
    if status.runs.iter().any(|r| r.name == run.name) {
        return;
    }
    if status.runs.iter().filter(|r| active(r)).count() >= MAX_ACTIVE_RUNS {
        let msg = format!("{MAX_ACTIVE_RUNS} runs of this Task are already waiting or running");
        return skip(status, run, "TooManyRuns", msg, now, out);
    }
    out.started.push(run.name.clone());
    status.runs.push(run);
}

fn skip(status: &mut TaskStatus, mut run: TaskRun, reason: &str, message: String, now: Timestamp, out: &mut Recorded) {
    if status.runs.iter().any(|r| r.name == run.name) {
        return;
    }
    run.phase = RunPhase::Skipped;
    run.data = None;
    run.start_after = None;
    run.finished_at = Some(micro(now));
    run.reason = Some(reason.to_string());
    run.message = Some(message.clone());
    out.skipped.push((run.name.clone(), reason.to_string(), message));
    status.runs.push(run);
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Succeeded {
        output: Option<String>,
    },
    Failed {
        reason: String,
        message: String,
        output: Option<String>,
    },
    /// Stopped from outside (its Job deleted by someone): dependents are not started.
    Stopped {
        reason: String,
        message: String,
    },
}

/// Record that run `name` ended. A success or failure gets the next `seq` (dependents act on
/// it); the Task's counters follow. Returns false if the run is not active (already ended).
pub fn finish(status: &mut TaskStatus, name: &str, end: End, now: Timestamp) -> bool {
    let Some(i) = status.runs.iter().position(|r| r.name == name && active(r)) else {
        return false;
    };
    let seq = status.finished_runs + 1;
    let r = &mut status.runs[i];
    r.finished_at = Some(micro(now));
    r.data = None;
    r.start_after = None;
    match end {
        End::Succeeded { output } => {
            r.phase = RunPhase::Succeeded;
            r.output = output.map(|o| truncate(&o, MAX_OUTPUT_BYTES));
            r.reason = Some("Succeeded".into());
            r.seq = Some(seq);
            status.finished_runs = seq;
            status.last_success = Some(Time(now));
            status.consecutive_failures = 0;
        }
        End::Failed { reason, message, output } => {
            r.phase = RunPhase::Failed;
            r.output = output.map(|o| truncate(&o, MAX_OUTPUT_BYTES));
            r.reason = Some(reason);
            r.message = Some(truncate(&message, 1024));
            r.seq = Some(seq);
            status.finished_runs = seq;
            status.last_failure = Some(Time(now));
            status.failures_count += 1;
            status.consecutive_failures += 1;
        }
        End::Stopped { reason, message } => {
            r.phase = RunPhase::Stopped;
            r.reason = Some(reason);
            r.message = Some(truncate(&message, 1024));
        }
    }
    true
}

/// The Task's `state`: Running while a run waits or runs, else the outcome of the last run
/// that finished, else Pending.
pub fn state(status: &TaskStatus) -> TaskState {
    if status.runs.iter().any(active) {
        return TaskState::Running;
    }
    match status.runs.iter().filter(|r| r.seq.is_some()).max_by_key(|r| r.seq).map(|r| r.phase) {
        Some(RunPhase::Succeeded) => TaskState::Succeeded,
        Some(RunPhase::Failed) => TaskState::Failed,
        _ => match (&status.last_success, &status.last_failure) {
            (Some(s), Some(f)) => {
                if s.0 >= f.0 {
                    TaskState::Succeeded
                } else {
                    TaskState::Failed
                }
            }
            (Some(_), None) => TaskState::Succeeded,
            (None, Some(_)) => TaskState::Failed,
            (None, None) => TaskState::Pending,
        },
    }
}

/// Drop finished runs beyond the history limits (succeeded: `keep_succeeded` newest; failed,
/// skipped and stopped: `keep_failed` newest), once they finished more than `GRACE` ago or
/// when more than `MAX_EXTRA_RUNS` are waiting to go. Returns the dropped runs (their Jobs are
/// to be deleted) and when the next one is due to go.
pub fn trim(status: &mut TaskStatus, keep_succeeded: usize, keep_failed: usize, now: Timestamp) -> (Vec<TaskRun>, Option<Timestamp>) {
    let finished_at = |r: &TaskRun| r.finished_at.as_ref().map(|t| t.0).unwrap_or(now);
    let mut beyond: Vec<usize> = Vec::new();
    for (succeeded, keep) in [(true, keep_succeeded), (false, keep_failed)] {
        let mut group: Vec<usize> = (0..status.runs.len()).filter(|&i| !active(&status.runs[i]) && (status.runs[i].phase == RunPhase::Succeeded) == succeeded).collect();
        // Newest first.
        group.sort_by_key(|&i| std::cmp::Reverse((finished_at(&status.runs[i]), status.runs[i].seq)));
        beyond.extend(group.into_iter().skip(keep));
    }
    // Oldest first: the ones to go first.
    beyond.sort_by_key(|&i| finished_at(&status.runs[i]));
    let grace = SignedDuration::try_from(GRACE).unwrap_or(SignedDuration::ZERO);
    let over = beyond.len().saturating_sub(MAX_EXTRA_RUNS);
    let mut drop = vec![false; status.runs.len()];
    let mut next: Option<Timestamp> = None;
    for (n, &i) in beyond.iter().enumerate() {
        let until = finished_at(&status.runs[i]).checked_add(grace).unwrap_or(now);
        if n < over || until <= now {
            drop[i] = true;
        } else {
            next = Some(next.map_or(until, |x| x.min(until)));
        }
    }
    let mut dropped = Vec::new();
    let mut kept = Vec::with_capacity(status.runs.len());
    for (i, r) in std::mem::take(&mut status.runs).into_iter().enumerate() {
        if drop[i] { dropped.push(r) } else { kept.push(r) }
    }
    status.runs = kept;
    (dropped, next)
}

/// Pending runs whose start time has come.
pub fn startable(status: &TaskStatus, now: Timestamp) -> Vec<String> {
    status.runs.iter().filter(|r| r.phase == RunPhase::Pending && r.start_after.as_ref().is_none_or(|t| t.0 <= now)).map(|r| r.name.clone()).collect()
}

/// The earliest `startAfter` of a Pending run still waiting.
pub fn next_start(status: &TaskStatus, now: Timestamp) -> Option<Timestamp> {
    status.runs.iter().filter(|r| r.phase == RunPhase::Pending).filter_map(|r| r.start_after.as_ref().map(|t| t.0)).filter(|t| *t > now).min()
}

/// The JSON body of the action `action` for finished run `run` of Task `task` in `ns`.
pub fn action_payload(task: &str, ns: &str, run: &TaskRun, action: &str) -> String {
    serde_json::json!({
        "type": "shoal.task.run.finished",
        "action": action,
        "task": task,
        "namespace": ns,
        "run": run.name,
        "outcome": match run.phase { RunPhase::Succeeded => "Succeeded", _ => "Failed" },
        "initiator": run.initiator,
        "output": run.output,
        "reason": run.reason,
        "message": run.message,
        "finishedAt": run.finished_at,
        "seq": run.seq,
    })
    .to_string()
}

#[cfg(test)]
mod tests;
