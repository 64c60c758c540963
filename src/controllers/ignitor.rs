//! The Ignitor reconciler (seed 004): observe (the Ignitor, the clock) → plan
//! (`core::schedule`, pure) → record (one status write with a resourceVersion precondition).
//!
//! The Ignitor controller only records firings: each due scheduled time goes into
//! `status.ignitions` with the time it fired, and `status.lastScheduledTime` moves past it in
//! the same write, so no time is fired twice whichever replica looks next. It must never
//! start anything itself: the Tasks that name the Ignitor act on the recorded firings.
//!
//! It wakes at the next scheduled time (or at the resync, whichever is sooner, so a clock
//! that jumps is caught up within a resync); a timer that wakes early finds nothing due and
//! sets the next one.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{Context, Error};
use crate::api::conditions;
use crate::api::task::{Ignition, Ignitor, IgnitorSpec, IgnitorStatus};
use crate::core::schedule::{Due, Settings};
use crate::ha::{Action, Fence, WriteError, Writer};

/// Firings kept in `status.ignitions` (the newest).
pub const KEPT_IGNITIONS: usize = 100;
/// Missed times kept in `status.missed` (the newest).
pub const KEPT_MISSED: usize = 10;
/// Scheduled times listed in one Event; the rest are counted.
const LISTED_IN_EVENT: usize = 3;

/// Condition and Event reasons.
pub mod reasons {
    /// A next time is scheduled.
    pub const SCHEDULED: &str = "Scheduled";
    /// Nothing more is scheduled (`NOW` or an RFC 3339 time that is past).
    pub const COMPLETED: &str = "Completed";
    /// `spec.suspend` is true.
    pub const SUSPENDED: &str = "Suspended";
    /// Event: scheduled times fired.
    pub const FIRED: &str = "Fired";
    /// Event: scheduled times missed.
    pub const MISSED_SCHEDULE: &str = "MissedSchedule";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `fired` or `missed`.
    pub outcome: String,
}

/// Ignitor metrics.
#[derive(Clone)]
pub struct IgnitorMetrics {
    /// Scheduled times recorded, by outcome.
    pub firings: Family<OutcomeLabels, Counter>,
    /// How late each firing was recorded after its scheduled time.
    pub lateness: crate::metrics::ExemplarHistogram,
}

impl IgnitorMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self { firings: Family::default(), lateness: crate::metrics::exemplar_histogram(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]) };
        for outcome in ["fired", "missed"] {
            let _ = m.firings.get_or_create(&OutcomeLabels { outcome: outcome.into() });
        }
        registry.register("shoal_ignitor_firings", "Ignitor scheduled times recorded, by outcome (fired or missed)", m.firings.clone());
        registry.register("shoal_ignitor_firing_lateness_seconds", "From an Ignitor's scheduled time to the recorded firing", m.lateness.clone());
        m
    }

    fn count(&self, outcome: &str, n: usize) {
        if n > 0 {
            self.firings.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc_by(n as u64);
        }
    }
}

/// What the Ignitor controller keeps besides the Ignitors.
pub struct State {
    pub metrics: IgnitorMetrics,
}

pub type Ctx = Arc<Context<State>>;

/// Reconcile one Ignitor under `fence`.
pub async fn reconcile(ign: Arc<Ignitor>, fence: Fence, ctx: Ctx) -> Result<Action, Error> {
    let Some(writer) = ctx.begin(fence, ign.as_ref()) else {
        return Ok(Action::AwaitChange);
    };
    match reconcile_owned(&ign, &writer, &ctx).await {
        Err(Error::Write(WriteError::Fenced)) => Ok(Action::AwaitChange),
        r => r,
    }
}

async fn reconcile_owned(ign: &Ignitor, writer: &Writer, ctx: &Ctx) -> Result<Action, Error> {
    let now = Timestamp::now();
    let Some(created) = ign.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return Ok(Action::AwaitChange);
    };
    let old = ign.status.clone().unwrap_or_default();
    let plan = plan(&ign.spec, &old, created, ign.metadata.generation, now);
    let next = match plan.wake {
        // 1 ms past it, so that the time is due when the timer fires.
        Some(t) => Action::Requeue((Duration::try_from(t.duration_since(now)).unwrap_or_default() + Duration::from_millis(1)).min(ctx.resync)),
        None => Action::AwaitChange,
    };
    if ign.status.as_ref() == Some(&plan.status) {
        return Ok(next);
    }
    match ctx.patch_status(writer, ign, ign.status.as_ref(), &plan.status).await {
        Ok(Some(_)) => {}
        // Changed since it was read: nothing was recorded; the watch brings the new copy.
        Ok(None) => return Ok(Action::AwaitChange),
        Err(e) if e.code() == Some(404) => return Ok(Action::AwaitChange),
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.count("fired", plan.due.fire.len());
    ctx.metrics.count("missed", plan.due.missed.len());
    for t in &plan.due.fire {
        ctx.metrics.lateness.observe(now.duration_since(*t).as_secs_f64().max(0.0), crate::metrics::current_exemplar(), None);
    }
    for (type_, reason, note) in events(&plan.due) {
        writer.event(type_, reason, note, None).await;
    }
    Ok(next)
}

/// What one reconcile decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The status to record (equal to the old one when nothing changed).
    pub status: IgnitorStatus,
    /// The scheduled times this status records as fired and missed.
    pub due: Due,
    /// When to look again: the next scheduled time, if any.
    pub wake: Option<Timestamp>,
}

/// The plan for an Ignitor with `spec`, recorded status `old`, created at `created`, at
/// `now`. Times go into status at the precision they are stored with (Time: seconds,
/// MicroTime: microseconds), so a recorded status read back plans to itself.
pub fn plan(spec: &IgnitorSpec, old: &IgnitorStatus, created: Timestamp, generation: Option<i64>, now: Timestamp) -> Plan {
    let mut status = old.clone();
    status.observed_generation = generation;
    let stamp = Time(seconds(now));
    let settings = match Settings::from_spec(spec) {
        Ok(s) => s,
        Err(e) => {
            status.next_ignition = None;
            conditions::set_state(&mut status.conditions, (false, false, true), e.reason(), &e.to_string(), generation, stamp);
            return Plan { status, due: Due::default(), wake: None };
        }
    };
    let due = settings.due(old.last_scheduled_time.as_ref().map(|t| t.0), created, now);
    record(&mut status, &due, now);
    let (ready, reason, message) = match due.next {
        _ if settings.suspend => (false, reasons::SUSPENDED, "suspended: nothing fires until spec.suspend is false".to_string()),
        Some(n) => (true, reasons::SCHEDULED, format!("next ignition at {n}")),
        None => match &status.last_scheduled_time {
            Some(t) => (true, reasons::COMPLETED, format!("nothing more is scheduled; the last scheduled time was {}", t.0)),
            None => (true, reasons::COMPLETED, "nothing is scheduled".to_string()),
        },
    };
    conditions::set_state(&mut status.conditions, (ready, false, false), reason, &message, generation, stamp);
    Plan { wake: due.next, status, due }
}

/// Record `due` in `status` at `now`: the fired times (newest `KEPT_IGNITIONS` kept), the
/// missed ones (newest `KEPT_MISSED`), the counts, the last scheduled time and the next one.
pub fn record(status: &mut IgnitorStatus, due: &Due, now: Timestamp) {
    if !due.fire.is_empty() {
        let fired_at = MicroTime(micros(now));
        status.ignitions.extend(due.fire.iter().map(|t| Ignition { scheduled_time: MicroTime(micros(*t)), fired_at: fired_at.clone() }));
        let drop = status.ignitions.len().saturating_sub(KEPT_IGNITIONS);
        status.ignitions.drain(..drop);
        status.ignitions_count += due.fire.len() as i64;
        status.last_ignition = Some(Time(seconds(now)));
    }
    if !due.missed.is_empty() {
        status.missed.extend(due.missed.iter().map(|t| MicroTime(micros(*t))));
        let drop = status.missed.len().saturating_sub(KEPT_MISSED);
        status.missed.drain(..drop);
        // With `more_missed` the older times were not listed: the count is a lower bound.
        status.missed_count += due.missed.len() as i64;
    }
    if let Some(last) = due.last() {
        status.last_scheduled_time = Some(MicroTime(micros(last)));
    }
    status.next_ignition = due.next.map(|t| Time(seconds(t)));
}

/// The Events of a recorded `due`: `Fired` listing the fired times, `MissedSchedule` the
/// missed ones.
pub fn events(due: &Due) -> Vec<(EventType, &'static str, String)> {
    let mut out = vec![];
    if !due.fire.is_empty() {
        out.push((EventType::Normal, reasons::FIRED, format!("fired {}", list(&due.fire, false))));
    }
    if !due.missed.is_empty() {
        out.push((EventType::Warning, reasons::MISSED_SCHEDULE, format!("missed {} (past startingDeadlineSeconds or beyond maxCatchUp)", list(&due.missed, due.more_missed))));
    }
    out
}

/// "scheduled time T" / "2 scheduled times: T1, T2" / "5 scheduled times: T1, T2, T3 and 2
/// more" / "more than 100 scheduled times, the last T" (older ones not listed by `due`).
fn list(times: &[Timestamp], more: bool) -> String {
    let shown: Vec<String> = times.iter().take(LISTED_IN_EVENT).map(|t| t.to_string()).collect();
    match (times.len(), times.last()) {
        (_, Some(last)) if more => format!("more than {} scheduled times, the last {last}", times.len()),
        (1, _) => format!("scheduled time {}", shown[0]),
        (n, _) if n <= LISTED_IN_EVENT => format!("{n} scheduled times: {}", shown.join(", ")),
        (n, _) => format!("{n} scheduled times: {} and {} more", shown.join(", "), n - LISTED_IN_EVENT),
    }
}

/// `t` to the second (the precision of `Time`).
fn seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// `t` to the microsecond (the precision of `MicroTime`).
fn micros(t: Timestamp) -> Timestamp {
    Timestamp::new(t.as_second(), t.subsec_nanosecond() / 1000 * 1000).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::{find, types};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn spec(scheduled: &str) -> IgnitorSpec {
        serde_json::from_value(serde_json::json!({ "scheduled": scheduled })).unwrap()
    }

    /// The status as the API server gives it back.
    fn round_trip(s: &IgnitorStatus) -> IgnitorStatus {
        serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap()
    }

    fn ready(s: &IgnitorStatus) -> (String, String) {
        let c = find(&s.conditions, types::READY).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn now_fires_once_at_the_creation_time() {
        let created = ts("2026-01-01T10:00:00Z");
        let now = ts("2026-01-01T10:00:00.250123456Z");
        let p = plan(&spec("NOW"), &IgnitorStatus::default(), created, Some(1), now);
        assert_eq!(p.due.fire, vec![created]);
        let s = &p.status;
        assert_eq!((s.ignitions_count, s.ignitions.len()), (1, 1));
        assert_eq!(s.ignitions[0].scheduled_time, MicroTime(created));
        assert_eq!(s.ignitions[0].fired_at, MicroTime(ts("2026-01-01T10:00:00.250123Z")));
        assert_eq!(s.last_ignition, Some(Time(created)));
        assert_eq!(s.last_scheduled_time, Some(MicroTime(created)));
        assert_eq!((s.next_ignition.clone(), p.wake), (None, None));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(ready(s), ("True".into(), "Completed".into()));
        let again = plan(&spec("NOW"), &round_trip(s), created, Some(1), ts("2026-01-01T10:05:00Z"));
        assert_eq!(again.due, Due::default());
        assert_eq!(&again.status, s, "nothing changes");
    }

    #[test]
    fn a_time_fires_when_it_comes() {
        let created = ts("2026-01-01T10:00:00Z");
        let at = spec("2026-01-01T10:00:04.5Z");
        let early = plan(&at, &IgnitorStatus::default(), created, Some(1), ts("2026-01-01T10:00:01Z"));
        assert!(early.due.fire.is_empty());
        assert_eq!(early.wake, Some(ts("2026-01-01T10:00:04.5Z")));
        assert_eq!(early.status.next_ignition, Some(Time(ts("2026-01-01T10:00:04Z"))), "Time keeps seconds");
        assert_eq!(ready(&early.status), ("True".into(), "Scheduled".into()));
        // Read back, the status plans to itself (no write per reconcile).
        let s = round_trip(&early.status);
        assert_eq!(plan(&at, &s, created, Some(1), ts("2026-01-01T10:00:02Z")).status, s);
        let fired = plan(&at, &s, created, Some(1), ts("2026-01-01T10:00:04.6Z"));
        assert_eq!(fired.due.fire, vec![ts("2026-01-01T10:00:04.5Z")]);
        assert_eq!(fired.status.ignitions_count, 1);
        assert_eq!(fired.status.next_ignition, None);
        assert_eq!(fired.wake, None);
        assert_eq!(ready(&fired.status), ("True".into(), "Completed".into()));
    }

    #[test]
    fn cron_firings_are_appended_and_capped() {
        let sp = spec("* * * * * *");
        let created = ts("2026-01-01T10:00:00Z");
        let mut s = IgnitorStatus::default();
        for i in 1..=130i64 {
            let now = Timestamp::from_second(created.as_second() + i).unwrap();
            let p = plan(&sp, &s, created, Some(1), now);
            assert_eq!(p.due.fire, vec![now], "exactly the time that came");
            assert_eq!(p.wake, Some(Timestamp::from_second(now.as_second() + 1).unwrap()));
            s = round_trip(&p.status);
        }
        assert_eq!(s.ignitions_count, 130);
        assert_eq!(s.ignitions.len(), KEPT_IGNITIONS);
        let secs: Vec<i64> = s.ignitions.iter().map(|i| i.scheduled_time.0.as_second() - created.as_second()).collect();
        assert_eq!(secs, (31..=130).collect::<Vec<_>>(), "the newest, oldest first");
        assert_eq!(s.last_scheduled_time, Some(MicroTime(Timestamp::from_second(created.as_second() + 130).unwrap())));
        assert_eq!((s.missed_count, s.missed.len()), (0, 0));
    }

    #[test]
    fn missed_times_are_counted_and_the_newest_kept() {
        let mut sp = spec("0 * * * *");
        sp.max_catch_up = Some(2);
        let created = ts("2026-01-01T00:30:00Z");
        let now = ts("2026-01-01T20:10:00Z");
        let p = plan(&sp, &IgnitorStatus::default(), created, Some(1), now);
        // 01:00 … 20:00: 19 and 20 fire, 1..=18 are missed.
        assert_eq!(p.due.fire, vec![ts("2026-01-01T19:00:00Z"), ts("2026-01-01T20:00:00Z")]);
        let s = &p.status;
        assert_eq!((s.ignitions_count, s.missed_count), (2, 18));
        assert_eq!(s.missed.len(), KEPT_MISSED);
        assert_eq!(s.missed.first(), Some(&MicroTime(ts("2026-01-01T09:00:00Z"))));
        assert_eq!(s.missed.last(), Some(&MicroTime(ts("2026-01-01T18:00:00Z"))));
        assert_eq!(s.last_scheduled_time, p.due.last().map(MicroTime));
        assert_eq!(s.next_ignition, Some(Time(ts("2026-01-01T21:00:00Z"))));
        let ev = events(&p.due);
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].1, ev[0].2.as_str()), ("Fired", "fired 2 scheduled times: 2026-01-01T19:00:00Z, 2026-01-01T20:00:00Z"));
        assert_eq!(ev[1].1, "MissedSchedule");
        assert!(ev[1].2.starts_with("missed 18 scheduled times: 2026-01-01T01:00:00Z, 2026-01-01T02:00:00Z, 2026-01-01T03:00:00Z and 15 more"), "{}", ev[1].2);
        // The same now again, from the recorded status: nothing fires, nothing changes.
        let s = round_trip(s);
        let again = plan(&sp, &s, created, Some(1), now);
        assert_eq!(again.due, Due { next: p.due.next, ..Due::default() });
        assert_eq!(again.status, s);
        assert!(events(&again.due).is_empty());
        // More missed later: appended to the count, still the newest ten kept.
        let later = plan(&sp, &s, created, Some(1), ts("2026-01-01T23:59:00Z"));
        assert_eq!((later.status.ignitions_count, later.status.missed_count), (4, 19));
        assert_eq!(later.status.missed.last(), Some(&MicroTime(ts("2026-01-01T21:00:00Z"))));
        assert_eq!(later.status.missed.len(), KEPT_MISSED);
    }

    #[test]
    fn suspended_nothing_fires_and_resuming_catches_up() {
        let mut sp = spec("*/2 * * * * *");
        sp.suspend = Some(true);
        let created = ts("2026-01-01T10:00:00Z");
        let p = plan(&sp, &IgnitorStatus::default(), created, Some(1), ts("2026-01-01T10:00:09Z"));
        assert_eq!((p.due.clone(), p.wake), (Due::default(), None));
        assert_eq!(p.status.next_ignition, None);
        assert_eq!(ready(&p.status), ("False".into(), "Suspended".into()));
        sp.suspend = Some(false);
        let r = plan(&sp, &round_trip(&p.status), created, Some(2), ts("2026-01-01T10:00:09.5Z"));
        assert_eq!(r.due.fire, vec![ts("2026-01-01T10:00:08Z")]);
        assert_eq!(r.due.missed, vec![ts("2026-01-01T10:00:02Z"), ts("2026-01-01T10:00:04Z"), ts("2026-01-01T10:00:06Z")]);
        assert_eq!((r.status.ignitions_count, r.status.missed_count), (1, 3));
        assert_eq!(r.status.next_ignition, Some(Time(ts("2026-01-01T10:00:10Z"))));
        assert_eq!(ready(&r.status), ("True".into(), "Scheduled".into()));
        assert_eq!(r.status.observed_generation, Some(2));
    }

    #[test]
    fn an_invalid_schedule_or_zone_fires_nothing() {
        let created = ts("2026-01-01T10:00:00Z");
        let mut sp = spec("*/2 * * * * *");
        sp.time_zone = Some("Mars/Olympus".into());
        let old = IgnitorStatus { next_ignition: Some(Time(created)), ..IgnitorStatus::default() };
        let p = plan(&sp, &old, created, Some(3), ts("2026-01-01T10:00:09Z"));
        assert_eq!((p.due.clone(), p.wake), (Due::default(), None));
        assert_eq!(p.status.next_ignition, None);
        assert_eq!(p.status.observed_generation, Some(3));
        assert_eq!(ready(&p.status), ("False".into(), "InvalidSchedule".into()));
        let failed = find(&p.status.conditions, types::FAILED).unwrap();
        assert_eq!((failed.status.as_str(), failed.message.as_str()), ("True", "timeZone \"Mars/Olympus\" is not a known IANA time zone"));
        let p = plan(&spec("61 * * * *"), &IgnitorStatus::default(), created, Some(1), created);
        assert_eq!(ready(&p.status), ("False".into(), "InvalidSchedule".into()));
    }

    #[test]
    fn event_lists_are_short() {
        let t: Vec<Timestamp> = (0..5).map(|i| Timestamp::from_second(1_767_261_600 + i).unwrap()).collect();
        assert_eq!(list(&t[..1], false), "scheduled time 2026-01-01T10:00:00Z");
        assert_eq!(list(&t[..2], false), "2 scheduled times: 2026-01-01T10:00:00Z, 2026-01-01T10:00:01Z");
        assert_eq!(list(&t[..3], false), "3 scheduled times: 2026-01-01T10:00:00Z, 2026-01-01T10:00:01Z, 2026-01-01T10:00:02Z");
        assert_eq!(list(&t, false), "5 scheduled times: 2026-01-01T10:00:00Z, 2026-01-01T10:00:01Z, 2026-01-01T10:00:02Z and 2 more");
        assert_eq!(list(&t, true), "more than 5 scheduled times, the last 2026-01-01T10:00:04Z");
    }
}
