use super::*;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn subject(spec_changed: bool) -> Subject<'static> {
    Subject { name: "task1", uid: "task-uid", created: ts(0), spec_changed, guard: Guard::from_spec(None) }
}

fn ignitor(uid: &str, created: i64, policy: ConcurrencyPolicy, fired: &[(i64, i64)]) -> Source {
    Source::Ignitor {
        name: "ignitor1".into(),
        uid: uid.into(),
        created: ts(created),
        data: Some("hello".into()),
        policy,
        ignitions: fired.iter().map(|(t, at)| Ignition { scheduled_time: MicroTime(ts(*t)), fired_at: MicroTime(ts(*at)) }).collect(),
    }
}

fn peer(runs: Vec<TaskRun>) -> Source {
    Source::Task { name: "up".into(), uid: "up-uid".into(), created: ts(0), runs, on_success: true, on_failure: true }
}

/// Finish every active run of `status` with `end` at `now`.
fn finish_all(status: &mut TaskStatus, end: End, now: Timestamp) {
    let names: Vec<String> = status.runs.iter().filter(|r| active(r)).map(|r| r.name.clone()).collect();
    for n in names {
        assert!(finish(status, &n, end.clone(), now));
    }
}

#[test]
fn a_firing_is_recorded_once_with_the_ignitors_data() {
    let mut st = TaskStatus::default();
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])];
    let rec = record_triggers(&mut st, &subject(false), &src, ts(6));
    assert_eq!(rec.started.len(), 1);
    let run = &st.runs[0];
    assert_eq!(run.phase, RunPhase::Pending);
    assert_eq!(run.data.as_deref(), Some("hello"));
    assert_eq!(run.initiator.kind, IGNITOR);
    assert_eq!(run.initiator.scheduled_time.as_ref().map(|t| t.0), Some(ts(5)));
    assert_eq!(run.name, ignition_run_name("task1", "task-uid", "i1", ts(5)));
    // Seen again (a second replica, a restart, a stale wake-up): nothing new.
    let again = record_triggers(&mut st, &subject(false), &src, ts(7));
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(st.runs.len(), 1);
    // The next firing is a new run.
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (10, 10)])];
    assert_eq!(record_triggers(&mut st, &subject(false), &src, ts(11)).started.len(), 1);
    assert_eq!(st.runs.len(), 2);
}

#[test]
fn firings_before_the_task_existed_start_nothing() {
    let mut st = TaskStatus::default();
    let mut task = subject(false);
    task.created = ts(100);
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (50, 50)])];
    assert!(record_triggers(&mut st, &task, &src, ts(101)).is_empty());
    assert_eq!(st.triggers[0].scheduled_time.as_ref().map(|t| t.0), Some(ts(50)), "the cursor moved past them");
    // A firing after the task existed does start a run.
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (50, 50), (120, 120)])];
    assert_eq!(record_triggers(&mut st, &task, &src, ts(121)).started.len(), 1);
}

#[test]
fn a_trigger_added_by_a_spec_edit_does_not_replay_its_past() {
    let mut st = TaskStatus::default();
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (10, 10)])];
    assert!(record_triggers(&mut st, &subject(true), &src, ts(11)).is_empty());
    assert_eq!(st.triggers[0].since.0, ts(11));
}

#[test]
fn an_ignitor_created_again_under_its_name_starts_afresh() {
    let mut st = TaskStatus::default();
    record_triggers(&mut st, &subject(false), &[ignitor("old", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    let rec = record_triggers(&mut st, &subject(false), &[ignitor("new", 20, ConcurrencyPolicy::Allow, &[(20, 20)])], ts(21));
    assert_eq!(rec.started.len(), 1);
    assert_eq!(st.triggers.len(), 1, "the old UID's cursor is dropped");
    assert_eq!(st.triggers[0].uid, "new");
    assert_ne!(st.runs[0].name, st.runs[1].name);
}

#[test]
fn concurrency_policy_applies_to_the_ignitors_active_runs() {
    // Forbid: the second firing is skipped while the first run is active.
    let mut st = TaskStatus::default();
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Forbid, &[(5, 5), (10, 10)])];
    let rec = record_triggers(&mut st, &subject(false), &src, ts(11));
    assert_eq!(rec.started.len(), 1);
    assert_eq!(rec.skipped.len(), 1);
    assert_eq!(rec.skipped[0].1, "ConcurrencyForbid");
    assert_eq!(st.runs[1].phase, RunPhase::Skipped);
    assert_eq!(st.runs[1].seq, None, "a skipped run starts no dependents");
    // Replace: the running one is stopped, the new one starts.
    let mut st = TaskStatus::default();
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Replace, &[(5, 5), (10, 10)])];
    let rec = record_triggers(&mut st, &subject(false), &src, ts(11));
    assert_eq!(rec.started.len(), 2);
    assert_eq!(rec.stopped, vec![st.runs[0].name.clone()]);
    assert_eq!(st.runs[0].phase, RunPhase::Stopped);
    assert_eq!(st.runs[1].phase, RunPhase::Pending);
    // Allow: both run.
    let mut st = TaskStatus::default();
    let src = [ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (10, 10)])];
    assert_eq!(record_triggers(&mut st, &subject(false), &src, ts(11)).started.len(), 2);
}

#[test]
fn a_success_starts_each_dependent_once_with_the_output_as_data() {
    let mut up = TaskStatus::default();
    record_triggers(&mut up, &Subject { name: "up", uid: "up-uid", ..subject(false) }, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    finish_all(&mut up, End::Succeeded { output: Some("42".into()) }, ts(8));
    assert_eq!(up.runs[0].seq, Some(1));
    let mut st = TaskStatus::default();
    let rec = record_triggers(&mut st, &subject(false), &[peer(up.runs.clone())], ts(9));
    assert_eq!(rec.started.len(), 1);
    let run = &st.runs[0];
    assert_eq!(run.data.as_deref(), Some("42"));
    assert_eq!((run.chain, run.failures_in_a_row, run.start_after.clone()), (2, 0, None));
    assert_eq!(run.initiator.run.as_deref(), Some(up.runs[0].name.as_str()));
    assert_eq!(run.name, chained_run_name("task1", "task-uid", "up-uid", &up.runs[0].name));
    assert!(record_triggers(&mut st, &subject(false), &[peer(up.runs.clone())], ts(10)).is_empty());
}

#[test]
fn only_the_outcomes_the_task_names_start_it() {
    let mut up = TaskStatus::default();
    record_triggers(&mut up, &Subject { name: "up", uid: "up-uid", ..subject(false) }, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    finish_all(&mut up, End::Failed { reason: "Error".into(), message: "exit 1".into(), output: None }, ts(8));
    let only_success = Source::Task { name: "up".into(), uid: "up-uid".into(), created: ts(0), runs: up.runs.clone(), on_success: true, on_failure: false };
    let mut st = TaskStatus::default();
    assert!(record_triggers(&mut st, &subject(false), &[only_success], ts(9)).is_empty());
    assert_eq!(st.triggers[0].seq, Some(1), "seen, and passed over");
}

#[test]
fn the_seeds_self_retry_loop_stops_at_the_limit_with_backoff() {
    // task1 startOnIgnition [ignitor1], startOnFailure [task1]; every run fails.
    let task = subject(false);
    let mut st = TaskStatus::default();
    record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    let mut now = ts(10);
    let mut delays = Vec::new();
    for _ in 0..20 {
        finish_all(&mut st, End::Failed { reason: "Error".into(), message: "exit 1".into(), output: None }, now);
        let me = Source::Task { name: "task1".into(), uid: "task-uid".into(), created: ts(0), runs: st.runs.clone(), on_success: false, on_failure: true };
        let rec = record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)]), me], now);
        if rec.started.is_empty() {
            assert_eq!(rec.skipped.len(), 1);
            assert_eq!(rec.skipped[0].1, "LoopLimit");
            break;
        }
        let waiting = st.runs.iter().find(|r| r.phase == RunPhase::Pending).unwrap();
        let after = waiting.start_after.as_ref().unwrap().0;
        delays.push(after.duration_since(now).as_secs());
        now = after;
    }
    let failed = st.runs.iter().filter(|r| r.phase == RunPhase::Failed).count();
    assert_eq!(failed, LoopGuard::DEFAULT_MAX_CONSECUTIVE_FAILURES as usize, "the default limit: 5 runs in all");
    assert_eq!(delays, vec![10, 20, 40, 80]);
    assert_eq!(st.consecutive_failures, 5);
    assert_eq!(st.failures_count, 5);
    assert_eq!(state(&st), TaskState::Failed);
}

#[test]
fn a_backoff_is_not_cut_short_by_the_seconds_of_start_after() {
    // `startAfter` goes through the API server as a Time, with seconds only.
    let task = subject(false);
    let mut st = TaskStatus::default();
    record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    let finished = ts(10).checked_add(SignedDuration::from_millis(400)).unwrap();
    finish_all(&mut st, End::Failed { reason: "Error".into(), message: "exit 1".into(), output: None }, finished);
    let me = Source::Task { name: "task1".into(), uid: "task-uid".into(), created: ts(0), runs: st.runs.clone(), on_success: false, on_failure: true };
    record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)]), me], finished);
    let read_back: TaskStatus = serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
    let waiting = read_back.runs.iter().find(|r| r.phase == RunPhase::Pending).unwrap();
    let after = waiting.start_after.as_ref().unwrap().0;
    // 10.4 s + 10 s of backoff: not startable before 20.4 s, so recorded as 21 s.
    assert_eq!(after, ts(21));
    assert!(startable(&read_back, ts(20).checked_add(SignedDuration::from_millis(500)).unwrap()).is_empty(), "not before the backoff has passed");
    assert_eq!(startable(&read_back, ts(21)).len(), 1);
}

#[test]
fn a_success_resets_the_failure_count_of_the_chain() {
    let guard = Guard::from_spec(Some(&LoopGuard { max_consecutive_failures: Some(2), ..Default::default() }));
    let task = Subject { guard, ..subject(false) };
    let mut failed_twice = TaskRun {
        name: "up-1".into(),
        phase: RunPhase::Succeeded,
        initiator: Initiator { kind: TASK.into(), name: "x".into(), run: None, scheduled_time: None },
        data: None,
        chain: 3,
        failures_in_a_row: 1,
        start_after: None,
        created_at: None,
        started_at: None,
        finished_at: Some(MicroTime(ts(5))),
        seq: Some(1),
        output: None,
        reason: None,
        message: None,
    };
    let mut st = TaskStatus::default();
    assert_eq!(record_triggers(&mut st, &task, &[peer(vec![failed_twice.clone()])], ts(6)).started.len(), 1);
    assert_eq!(st.runs[0].failures_in_a_row, 0);
    // The same run had it failed: a second failure in a row reaches the limit of 2.
    failed_twice.phase = RunPhase::Failed;
    let mut st = TaskStatus::default();
    let rec = record_triggers(&mut st, &task, &[peer(vec![failed_twice])], ts(6));
    assert_eq!(rec.skipped[0].1, "LoopLimit");
}

#[test]
fn any_chain_of_runs_is_cut_at_its_length() {
    let guard = Guard::from_spec(Some(&LoopGuard { max_chain_length: Some(3), ..Default::default() }));
    let task = Subject { guard, ..subject(false) };
    let mut st = TaskStatus::default();
    record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)])], ts(6));
    // A success loop: task1 startOnSuccess [task1].
    let mut runs = 0;
    for n in 0..10 {
        finish_all(&mut st, End::Succeeded { output: None }, ts(10 + n));
        runs += 1;
        let me = Source::Task { name: "task1".into(), uid: "task-uid".into(), created: ts(0), runs: st.runs.clone(), on_success: true, on_failure: false };
        let rec = record_triggers(&mut st, &task, &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5)]), me], ts(10 + n));
        if rec.started.is_empty() {
            assert_eq!(rec.skipped[0].1, "ChainLimit");
            break;
        }
    }
    assert_eq!(runs, 3);
}

#[test]
fn finishing_assigns_the_next_seq_and_keeps_the_counters() {
    let mut st = TaskStatus::default();
    record_triggers(&mut st, &subject(false), &[ignitor("i1", 1, ConcurrencyPolicy::Allow, &[(5, 5), (6, 6)])], ts(7));
    assert_eq!(state(&st), TaskState::Running);
    let (a, b) = (st.runs[0].name.clone(), st.runs[1].name.clone());
    assert!(finish(&mut st, &b, End::Failed { reason: "Error".into(), message: "m".into(), output: Some("x".repeat(5000)) }, ts(8)));
    assert!(!finish(&mut st, &b, End::Succeeded { output: None }, ts(9)), "an ended run is not ended again");
    assert!(finish(&mut st, &a, End::Succeeded { output: None }, ts(9)));
    assert_eq!((st.runs[1].seq, st.runs[0].seq, st.finished_runs), (Some(1), Some(2), 2));
    assert_eq!(st.runs[1].output.as_ref().unwrap().len(), MAX_OUTPUT_BYTES);
    assert_eq!((st.failures_count, st.consecutive_failures), (1, 0));
    assert_eq!(state(&st), TaskState::Succeeded);
    assert_eq!(st.last_success.as_ref().unwrap().0, ts(9));
    assert_eq!(st.last_failure.as_ref().unwrap().0, ts(8));
}

#[test]
fn history_keeps_the_limits_and_a_grace_for_dependents() {
    let mut st = TaskStatus::default();
    let fired: Vec<(i64, i64)> = (1..=6).map(|i| (i, i)).collect();
    record_triggers(&mut st, &subject(false), &[ignitor("i1", 0, ConcurrencyPolicy::Allow, &fired)], ts(7));
    let names: Vec<String> = st.runs.iter().map(|r| r.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        let end = if i % 2 == 0 { End::Succeeded { output: None } } else { End::Failed { reason: "E".into(), message: String::new(), output: None } };
        finish(&mut st, n, end, ts(10 + i as i64));
    }
    // Within the grace nothing goes; the next drop is due when the oldest extra one's grace ends.
    let (dropped, next) = trim(&mut st, 2, 1, ts(20));
    assert!(dropped.is_empty());
    assert_eq!(next, Some(ts(10 + 60)));
    // After it: the 2 newest successes and the newest failure stay.
    let (dropped, next) = trim(&mut st, 2, 1, ts(200));
    assert_eq!(dropped.len(), 3);
    assert_eq!(next, None);
    let kept: Vec<&str> = st.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(kept, vec![names[2].as_str(), names[4].as_str(), names[5].as_str()]);
}

#[test]
fn active_runs_are_bounded() {
    let mut st = TaskStatus::default();
    let fired: Vec<(i64, i64)> = (1..=(MAX_ACTIVE_RUNS as i64 + 5)).map(|i| (i, i)).collect();
    let rec = record_triggers(&mut st, &subject(false), &[ignitor("i1", 0, ConcurrencyPolicy::Allow, &fired)], ts(1000));
    assert_eq!(rec.started.len(), MAX_ACTIVE_RUNS);
    assert_eq!(rec.skipped.len(), 5);
    assert!(rec.skipped.iter().all(|s| s.1 == "TooManyRuns"));
}

#[test]
fn run_names_are_dns_labels_and_distinct() {
    let long = "t".repeat(300);
    for n in [chained_run_name(&long, "u", "v", "r"), ignition_run_name(&long, "u", "v", ts(1)), chained_run_name("A_B.c", "u", "v", "r")] {
        assert!(n.len() <= 63, "{n}");
        assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{n}");
        assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
    }
    assert_ne!(chained_run_name("t", "u", "v", "r1"), chained_run_name("t", "u", "v", "r2"));
    assert_ne!(chained_run_name("t", "u1", "v", "r"), chained_run_name("t", "u2", "v", "r"));
    assert_ne!(ignition_run_name("t", "u", "v1", ts(1)), ignition_run_name("t", "u", "v2", ts(1)));
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let g = Guard::from_spec(None);
    let d: Vec<u64> = (0..=8).map(|n| g.delay(n).as_secs()).collect();
    assert_eq!(d, vec![0, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(g.delay(1000).as_secs(), 300);
}
