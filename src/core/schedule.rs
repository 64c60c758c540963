//! Schedule math for Ignitors: `NOW`, an RFC 3339 instant, or a cron expression evaluated in
//! an IANA time zone; which scheduled times are due (to fire, or missed); what a firing does
//! about runs still running; and the deterministic name of the run of a scheduled time.
//!
//! This module owns the rules only. It must never read a clock or talk to the API server:
//! the controller passes `now`, the creation time and the last scheduled time recorded in
//! status, and records what `due` returns.
//!
//! **Daylight saving.** A cron expression matches wall-clock times in the zone. A matching
//! wall-clock time that does not exist (02:30 on the spring-forward day in `Europe/Berlin`)
//! does not fire and is not missed: it is not a scheduled time. One that happens twice
//! (02:30 on the fall-back day) is scheduled once, at its first occurrence (02:30 CEST).
//! This holds for every expression, so `*/15 * * * *` fires four times, not eight, in the
//! repeated hour. Scheduled times are thus strictly increasing instants.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::jiff::Timestamp;
use thiserror::Error;

use crate::api::task::{ConcurrencyPolicy, IgnitorSpec};

/// A parsed `spec.scheduled`.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Fire once, as soon as the ignitor is seen.
    Now,
    /// Fire once at this instant.
    At(Timestamp),
    /// Fire at every match of the cron expression (in the zone given to the functions).
    Cron(Box<Cron>),
}

/// Why `spec.scheduled` or `spec.timeZone` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScheduleError {
    #[error("scheduled {value:?} is not NOW, an RFC 3339 time or a valid cron expression: {detail}")]
    Invalid { value: String, detail: String },
    #[error("timeZone {0:?} is not a known IANA time zone")]
    UnknownTimeZone(String),
}

impl ScheduleError {
    /// Condition reason for this error.
    pub fn reason(&self) -> &'static str {
        "InvalidSchedule"
    }
}

/// Parse `spec.scheduled`.
pub fn parse(value: &str) -> Result<Schedule, ScheduleError> {
    let v = value.trim();
    if v == "NOW" {
        return Ok(Schedule::Now);
    }
    if let Ok(t) = Timestamp::from_str(v) {
        // Status records times with microsecond precision (MicroTime); a finer time would
        // never equal its recorded copy and could be taken for a time not yet fired.
        let t = Timestamp::new(t.as_second(), t.subsec_nanosecond() / 1000 * 1000).unwrap_or(t);
        return Ok(Schedule::At(t));
    }
    // `@midnight` is the usual synonym of `@daily` (cron(8), CronJob); the parser lacks it.
    let v = if v == "@midnight" { "@daily" } else { v };
    let parser = CronParser::builder().seconds(Seconds::Optional).build();
    parser.parse(v).map(|c| Schedule::Cron(Box::new(c))).map_err(|e| ScheduleError::Invalid { value: value.to_string(), detail: e.to_string() })
}

/// Parse `spec.timeZone`: an IANA name; absent means UTC.
pub fn parse_time_zone(value: Option<&str>) -> Result<Tz, ScheduleError> {
    match value {
        None => Ok(Tz::UTC),
        Some(v) => Tz::from_str(v.trim()).map_err(|_| ScheduleError::UnknownTimeZone(v.to_string())),
    }
}

fn to_chrono(t: Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
}

fn to_jiff(t: DateTime<Utc>) -> Option<Timestamp> {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).ok()
}

/// The instant of a wall-clock time: `None` in a gap, the first occurrence in an overlap.
fn instant(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    tz.from_local_datetime(&wall).earliest().map(|d| d.with_timezone(&Utc))
}

/// The next wall-clock match after (or, if `inclusive`, at) `wall`, searched without any
/// daylight saving (the cron is evaluated on naive times; `instant` maps them).
fn wall_step(cron: &Cron, wall: NaiveDateTime, inclusive: bool, forward: bool) -> Option<NaiveDateTime> {
    let at = wall.and_utc();
    let found = if forward { cron.find_next_occurrence(&at, inclusive) } else { cron.find_previous_occurrence(&at, inclusive) };
    found.ok().map(|d| d.naive_utc())
}

/// Whole seconds of `t`, rounded down (cron times are whole seconds).
fn floor_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// First cron time strictly after `after`, in `tz`.
fn cron_next(cron: &Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // No wall time before local(after) maps after `after` (the mapping is increasing), so
    // the search starts there and skips gap times and overlap times already passed.
    let mut wall = floor_second(after).with_timezone(&tz).naive_local();
    loop {
        wall = wall_step(cron, wall, false, true)?;
        if let Some(t) = instant(tz, wall)
            && t > after
        {
            return Some(t);
        }
    }
}

/// Last cron time at or before `at`, in `tz`.
fn cron_prev(cron: &Cron, tz: Tz, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = at.with_timezone(&tz);
    // In the second pass of an overlap, wall times up to the end of the overlap map to the
    // first pass, before `at`: start that much later and skip what maps after `at`.
    let first_offset = tz.from_local_datetime(&local.naive_local()).earliest().map(|d| d.offset().fix().local_minus_utc()).unwrap_or(0);
    let shift = i64::from((first_offset - local.offset().fix().local_minus_utc()).max(0));
    let mut wall = floor_second(at).with_timezone(&tz).naive_local() + chrono::Duration::seconds(shift);
    let mut inclusive = true;
    loop {
        wall = wall_step(cron, wall, inclusive, false)?;
        inclusive = false;
        if let Some(t) = instant(tz, wall)
            && t <= at
        {
            return Some(t);
        }
    }
}

impl Schedule {
    /// The first firing strictly after `after`, if there is one (a cron expression in UTC).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        self.next_after_in(Tz::UTC, after)
    }

    /// The first firing strictly after `after`, with a cron expression evaluated in `tz`.
    pub fn next_after_in(&self, tz: Tz, after: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Now => None,
            Schedule::At(t) => (*t > after).then_some(*t),
            Schedule::Cron(c) => to_jiff(cron_next(c, tz, to_chrono(after)?)?),
        }
    }

    /// The last cron time at or before `at` in `tz` (`None` for `NOW` and an RFC 3339 time).
    fn cron_prev_in(&self, tz: Tz, at: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Cron(c) => to_jiff(cron_prev(c, tz, to_chrono(at)?)?),
            _ => None,
        }
    }
}

/// At most this many missed times are listed by `due`; older ones are only flagged
/// (`Due::more_missed`), so that a long downtime under a per-second schedule costs a bounded
/// amount of work.
pub const MISSED_LISTED: usize = 100;

/// The most `max_catch_up` may be (the bound of `spec.maxCatchUp`).
pub const MAX_CATCH_UP: u32 = 100;

/// What `due` decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Scheduled times to fire now, oldest first.
    pub fire: Vec<Timestamp>,
    /// Scheduled times not fired: older than the starting deadline, or beyond the catch-up
    /// bound. Oldest first; at most `MISSED_LISTED`, the latest ones.
    pub missed: Vec<Timestamp>,
    /// There were missed times older than those in `missed`.
    pub more_missed: bool,
    /// The next scheduled time after `now`, if any.
    pub next: Option<Timestamp>,
}

impl Due {
    /// The time to record as the last scheduled one once `fire` and `missed` are recorded:
    /// the latest of them, or `None` when nothing was due.
    pub fn last(&self) -> Option<Timestamp> {
        self.fire.iter().chain(self.missed.iter()).max().copied()
    }
}

/// Which scheduled times are due at `now`.
///
/// - `last_scheduled`: the last scheduled time already recorded (fired or missed). No time at
///   or before it is ever returned again; the controller records `Due::last` in status, with a
///   resourceVersion precondition, before it starts any run.
/// - `NOW` is due once, at the creation time, when nothing was recorded yet.
/// - An RFC 3339 time is due once, when `now` reaches it. A time already past when the Ignitor
///   was created is due at once; for the starting deadline it counts from the creation time.
/// - A cron expression is due at every matching time (in `tz`) after the creation time and
///   after `last_scheduled`, up to and including `now`.
///
/// Of the due times, those older than `now - starting_deadline` are missed; of the rest the
/// latest `max_catch_up` fire (0 counts as 1, and more than `MAX_CATCH_UP` as
/// `MAX_CATCH_UP`), and the older ones are missed.
pub fn due(schedule: &Schedule, tz: Tz, last_scheduled: Option<Timestamp>, created: Timestamp, now: Timestamp, starting_deadline: Option<Duration>, max_catch_up: u32) -> Due {
    let cap = max_catch_up.clamp(1, MAX_CATCH_UP) as usize;
    let floor = starting_deadline.and_then(|d| now.checked_sub(d).ok());
    let in_time = |t: Timestamp| floor.is_none_or(|f| t >= f);
    let mut out = Due::default();
    match schedule {
        Schedule::Now => {
            if last_scheduled.is_none() {
                if in_time(created) { out.fire.push(created) } else { out.missed.push(created) }
            }
        }
        Schedule::At(t) => {
            let t = *t;
            if last_scheduled.is_none_or(|l| t > l) {
                if t > now {
                    out.next = Some(t);
                } else if in_time(t.max(created)) {
                    out.fire.push(t);
                } else {
                    out.missed.push(t);
                }
            }
        }
        Schedule::Cron(_) => {
            let lower = last_scheduled.map_or(created, |l| l.max(created));
            let mut cursor = schedule.cron_prev_in(tz, now);
            while let Some(t) = cursor.filter(|t| *t > lower) {
                if out.fire.len() < cap && in_time(t) {
                    out.fire.push(t);
                } else if out.missed.len() < MISSED_LISTED {
                    out.missed.push(t);
                } else {
                    out.more_missed = true;
                    break;
                }
                cursor = t.checked_sub(k8s_openapi::jiff::SignedDuration::from_nanos(1)).ok().and_then(|b| schedule.cron_prev_in(tz, b));
            }
            out.fire.reverse();
            out.missed.reverse();
            out.next = schedule.next_after_in(tz, now.max(lower));
        }
    }
    out
}

/// An Ignitor's schedule settings, read from its spec with the defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub schedule: Schedule,
    pub time_zone: Tz,
    pub starting_deadline: Option<Duration>,
    pub max_catch_up: u32,
    pub concurrency_policy: ConcurrencyPolicy,
    pub suspend: bool,
}

impl Settings {
    /// The settings of `spec`, or why `scheduled` or `timeZone` cannot be used.
    pub fn from_spec(spec: &IgnitorSpec) -> Result<Self, ScheduleError> {
        Ok(Settings {
            schedule: parse(&spec.scheduled)?,
            time_zone: parse_time_zone(spec.time_zone.as_deref())?,
            starting_deadline: spec.starting_deadline_seconds.map(|s| Duration::from_secs(s.max(0) as u64)),
            max_catch_up: spec.max_catch_up.unwrap_or(IgnitorSpec::DEFAULT_MAX_CATCH_UP),
            concurrency_policy: spec.concurrency_policy.unwrap_or_default(),
            suspend: spec.suspend.unwrap_or(false),
        })
    }

    /// `due` with these settings. While suspended nothing is due and there is no next time;
    /// the times that pass meanwhile are due once the Ignitor is resumed, under the catch-up
    /// bound and the starting deadline.
    pub fn due(&self, last_scheduled: Option<Timestamp>, created: Timestamp, now: Timestamp) -> Due {
        if self.suspend {
            return Due::default();
        }
        due(&self.schedule, self.time_zone, last_scheduled, created, now, self.starting_deadline, self.max_catch_up)
    }
}

/// What a firing does about the runs of earlier firings that are still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the new run.
    Start,
    /// Do not start it; record the scheduled time as missed (`Forbid`).
    Skip,
    /// Stop these runs, then start the new run (`Replace`).
    ReplaceThenStart(Vec<String>),
}

/// The decision for one firing, given the names of the runs still running (as a CronJob's
/// `concurrencyPolicy`). When `due` returns several times, the controller decides them in
/// order, counting the runs it has just started as running.
pub fn concurrency(policy: ConcurrencyPolicy, active_runs: &[String]) -> Decision {
    if active_runs.is_empty() {
        return Decision::Start;
    }
    match policy {
        ConcurrencyPolicy::Allow => Decision::Start,
        ConcurrencyPolicy::Forbid => Decision::Skip,
        ConcurrencyPolicy::Replace => Decision::ReplaceThenStart(active_runs.to_vec()),
    }
}

/// The name of the run of `owner` (an Ignitor or a Task) with `uid` for the scheduled time
/// `scheduled`: `<owner>-<unix seconds>-<hash>`, a DNS label of at most 63 characters. The
/// hash (40 bits) is of the UID and the exact time, so two objects of one name (one deleted,
/// one new) or two times within one second get different names; the seconds keep two times
/// of one object apart outright. A second replica, or a restart, derives the same name, so a
/// repeated create meets AlreadyExists instead of starting a second run.
pub fn run_name(owner: &str, uid: &str, scheduled: Timestamp) -> String {
    let id = format!("{uid}\0{}\0{}", scheduled.as_second(), scheduled.subsec_nanosecond());
    let tail = format!("-{}-{:010x}", scheduled.as_second(), crate::core::shard::weight(0, &id) & 0xff_ffff_ffff);
    let clean: String = owner.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let head: String = clean.chars().take(63usize.saturating_sub(tail.len())).collect();
    let head = head.trim_matches('-');
    let head = if head.is_empty() { "run" } else { head };
    format!("{head}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_three_forms() {
        assert!(matches!(parse("NOW"), Ok(Schedule::Now)));
        assert!(matches!(parse("2020-02-03T19:34:05Z"), Ok(Schedule::At(_))));
        assert!(matches!(parse("5 * * * *"), Ok(Schedule::Cron(_))));
        assert!(matches!(parse("0 5 * * * *"), Ok(Schedule::Cron(_))));
    }

    #[test]
    fn every_macro_admission_accepts_parses() {
        for m in ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"] {
            assert!(matches!(parse(m), Ok(Schedule::Cron(_))), "{m}");
        }
        let (Ok(a), Ok(b)) = (parse("@midnight"), parse("@daily")) else { panic!() };
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(a.next_after(t), b.next_after(t));
    }

    #[test]
    fn an_rfc3339_time_is_kept_to_the_microsecond_status_records() {
        let Ok(Schedule::At(t)) = parse("2020-02-03T19:34:05.123456789Z") else { panic!() };
        assert_eq!(t.subsec_nanosecond(), 123_456_000);
    }

    #[test]
    fn bad_cron_has_a_clear_message() {
        let e = parse("61 * * * *").unwrap_err();
        assert_eq!(e.reason(), "InvalidSchedule");
        assert!(e.to_string().contains("61 * * * *"), "{e}");
        assert!(parse("every tuesday").is_err());
    }

    #[test]
    fn next_after_cron_and_at() {
        let t0 = Timestamp::from_str("2026-01-01T10:07:00Z").unwrap();
        let s = parse("5 * * * *").unwrap();
        assert_eq!(s.next_after(t0), Some(Timestamp::from_str("2026-01-01T11:05:00Z").unwrap()));
        let at = parse("2026-01-01T10:08:00Z").unwrap();
        assert_eq!(at.next_after(t0), Some(Timestamp::from_str("2026-01-01T10:08:00Z").unwrap()));
        assert_eq!(at.next_after(Timestamp::from_str("2026-01-01T10:09:00Z").unwrap()), None);
        assert_eq!(parse("NOW").unwrap().next_after(t0), None);
    }

    fn ts(s: &str) -> Timestamp {
        Timestamp::from_str(s).unwrap()
    }

    fn ts_all(v: &[&str]) -> Vec<Timestamp> {
        v.iter().map(|s| ts(s)).collect()
    }

    fn berlin() -> Tz {
        parse_time_zone(Some("Europe/Berlin")).unwrap()
    }

    /// Every cron time in (after, until], by stepping `next_after_in`.
    fn all_between(s: &Schedule, tz: Tz, after: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let mut out = vec![];
        let mut t = after;
        while let Some(n) = s.next_after_in(tz, t).filter(|n| *n <= until) {
            out.push(n);
            t = n;
        }
        out
    }

    #[test]
    fn time_zones() {
        assert_eq!(parse_time_zone(None), Ok(Tz::UTC));
        assert_eq!(parse_time_zone(Some("Europe/Berlin")), Ok(Tz::Europe__Berlin));
        let e = parse_time_zone(Some("Mars/Olympus")).unwrap_err();
        assert_eq!(e.reason(), "InvalidSchedule");
        assert!(e.to_string().contains("Mars/Olympus"), "{e}");
    }

    /// Every zone chrono-tz knows has the shape that admission allows for `timeZone`
    /// (`^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$`, at most 64 characters), so admission
    /// never refuses a zone the core would accept.
    #[test]
    fn every_known_zone_passes_the_admission_shape() {
        let part = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b));
        for tz in chrono_tz::TZ_VARIANTS {
            let name = tz.name();
            assert!(name.len() <= 64 && name.as_bytes()[0].is_ascii_alphabetic() && name.split('/').all(part), "{name}");
            assert_eq!(parse_time_zone(Some(name)), Ok(tz));
        }
    }

    #[test]
    fn cron_in_a_zone() {
        let s = parse("0 9 * * *").unwrap();
        // 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
        assert_eq!(s.next_after_in(berlin(), ts("2026-01-10T12:00:00Z")), Some(ts("2026-01-11T08:00:00Z")));
        assert_eq!(s.next_after_in(berlin(), ts("2026-07-10T12:00:00Z")), Some(ts("2026-07-11T07:00:00Z")));
        assert_eq!(s.next_after_in(Tz::UTC, ts("2026-07-10T12:00:00Z")), Some(ts("2026-07-11T09:00:00Z")));
        // Strictly after, also with a fraction of a second.
        assert_eq!(s.next_after_in(berlin(), ts("2026-07-11T07:00:00Z")), Some(ts("2026-07-12T07:00:00Z")));
        assert_eq!(s.next_after_in(berlin(), ts("2026-07-11T06:59:59.5Z")), Some(ts("2026-07-11T07:00:00Z")));
    }

    /// DST, spring forward (Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST): 02:30 does not
    /// exist that day and is neither fired nor missed; the days around it fire as usual.
    #[test]
    fn dst_spring_forward_skips_the_missing_time() {
        let s = parse("30 2 * * *").unwrap();
        let got = all_between(&s, berlin(), ts("2026-03-27T00:00:00Z"), ts("2026-03-31T00:00:00Z"));
        assert_eq!(got, ts_all(&["2026-03-27T01:30:00Z", "2026-03-28T01:30:00Z", "2026-03-30T00:30:00Z"]));
        // due over the whole window: nothing for the 29th, fired or missed.
        let d = due(&s, berlin(), Some(ts("2026-03-28T01:30:00Z")), ts("2026-01-01T00:00:00Z"), ts("2026-03-29T23:00:00Z"), None, 5);
        assert_eq!(d, Due { next: Some(ts("2026-03-30T00:30:00Z")), ..Due::default() });
        // An every-15-minutes schedule skips the missing hour only.
        let q = parse("*/15 * * * *").unwrap();
        let got = all_between(&q, berlin(), ts("2026-03-29T00:30:00Z"), ts("2026-03-29T01:15:00Z"));
        assert_eq!(got, ts_all(&["2026-03-29T00:45:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:15:00Z"]));
    }

    /// DST, fall back (Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET): 02:30 happens twice
    /// and fires once, at the first (02:30 CEST = 00:30 UTC), also when asked from inside the
    /// repeated hour.
    #[test]
    fn dst_fall_back_fires_once() {
        let s = parse("30 2 * * *").unwrap();
        let got = all_between(&s, berlin(), ts("2026-10-23T00:00:00Z"), ts("2026-10-27T00:00:00Z"));
        assert_eq!(got, ts_all(&["2026-10-23T00:30:00Z", "2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]));
        // Asked during the second 02:30 (01:30 UTC): the next is the next day's.
        assert_eq!(s.next_after_in(berlin(), ts("2026-10-25T01:10:00Z")), Some(ts("2026-10-26T01:30:00Z")));
        // due in the second pass after the first was fired: nothing.
        let d = due(&s, berlin(), Some(ts("2026-10-25T00:30:00Z")), ts("2026-01-01T00:00:00Z"), ts("2026-10-25T01:45:00Z"), None, 5);
        assert_eq!(d, Due { next: Some(ts("2026-10-26T01:30:00Z")), ..Due::default() });
        // due in the second pass when the controller was down through the first: fires it.
        let d = due(&s, berlin(), Some(ts("2026-10-24T00:30:00Z")), ts("2026-01-01T00:00:00Z"), ts("2026-10-25T01:45:00Z"), None, 5);
        assert_eq!(d.fire, ts_all(&["2026-10-25T00:30:00Z"]));
        // Every 15 minutes: the repeated hour's wall times fire once each (four, not eight).
        let q = parse("*/15 * * * *").unwrap();
        let got = all_between(&q, berlin(), ts("2026-10-24T23:50:00Z"), ts("2026-10-25T02:00:00Z"));
        assert_eq!(got, ts_all(&["2026-10-25T00:00:00Z", "2026-10-25T00:15:00Z", "2026-10-25T00:30:00Z", "2026-10-25T00:45:00Z", "2026-10-25T02:00:00Z"]), "02:00..02:45 CEST, then 03:00 CET");
        // due at the end of the second pass, from before the change, lists the same times.
        let d = due(&q, berlin(), Some(ts("2026-10-24T23:45:00Z")), ts("2026-01-01T00:00:00Z"), ts("2026-10-25T01:59:00Z"), None, 100);
        assert_eq!(d.fire, ts_all(&["2026-10-25T00:00:00Z", "2026-10-25T00:15:00Z", "2026-10-25T00:30:00Z", "2026-10-25T00:45:00Z"]));
        assert_eq!(d.next, Some(ts("2026-10-25T02:00:00Z")));
        // At 02:10 CET (01:10 UTC) all of the first pass is past.
        let d = due(&q, berlin(), Some(ts("2026-10-24T23:45:00Z")), ts("2026-01-01T00:00:00Z"), ts("2026-10-25T01:10:00Z"), None, 100);
        assert_eq!(d.fire, ts_all(&["2026-10-25T00:00:00Z", "2026-10-25T00:15:00Z", "2026-10-25T00:30:00Z", "2026-10-25T00:45:00Z"]));
        assert_eq!(d.next, Some(ts("2026-10-25T02:00:00Z")));
    }

    #[test]
    fn now_fires_once_at_creation() {
        let created = ts("2026-01-01T10:00:00Z");
        let s = parse("NOW").unwrap();
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T10:00:03Z"), None, 1);
        assert_eq!(d, Due { fire: vec![created], ..Due::default() });
        assert_eq!(d.last(), Some(created));
        assert_eq!(due(&s, Tz::UTC, Some(created), created, ts("2026-01-02T10:00:00Z"), None, 1), Due::default());
        // Seen only after the deadline: missed.
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T10:05:00Z"), Some(Duration::from_secs(60)), 1);
        assert_eq!(d, Due { missed: vec![created], ..Due::default() });
    }

    #[test]
    fn an_rfc3339_time_fires_once_at_that_time() {
        let created = ts("2026-01-01T10:00:00Z");
        let s = parse("2026-01-01T12:00:00Z").unwrap();
        let at = ts("2026-01-01T12:00:00Z");
        assert_eq!(due(&s, Tz::UTC, None, created, ts("2026-01-01T11:59:59Z"), None, 1), Due { next: Some(at), ..Due::default() });
        assert_eq!(due(&s, Tz::UTC, None, created, at, None, 1), Due { fire: vec![at], ..Due::default() });
        assert_eq!(due(&s, Tz::UTC, Some(at), created, ts("2026-01-01T12:00:01Z"), None, 1), Due::default());
        // Late beyond the deadline: missed.
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T12:10:00Z"), Some(Duration::from_secs(60)), 1);
        assert_eq!(d, Due { missed: vec![at], ..Due::default() });
    }

    #[test]
    fn an_rfc3339_time_past_at_creation_fires_at_once() {
        let s = parse("2020-02-03T19:34:05Z").unwrap();
        let created = ts("2026-01-01T10:00:00Z");
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T10:00:02Z"), Some(Duration::from_secs(60)), 1);
        assert_eq!(d.fire, ts_all(&["2020-02-03T19:34:05Z"]), "the deadline counts from creation");
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T10:02:00Z"), Some(Duration::from_secs(60)), 1);
        assert_eq!(d.missed, ts_all(&["2020-02-03T19:34:05Z"]));
    }

    #[test]
    fn cron_fires_each_time_after_creation() {
        let s = parse("*/10 * * * * *").unwrap();
        let created = ts("2026-01-01T10:00:00Z");
        // A time equal to the creation time is not due (as a CronJob's).
        assert_eq!(due(&s, Tz::UTC, None, created, created, None, 1), Due { next: Some(ts("2026-01-01T10:00:10Z")), ..Due::default() });
        let d = due(&s, Tz::UTC, None, created, ts("2026-01-01T10:00:10Z"), None, 1);
        assert_eq!(d, Due { fire: ts_all(&["2026-01-01T10:00:10Z"]), next: Some(ts("2026-01-01T10:00:20Z")), ..Due::default() });
        let d = due(&s, Tz::UTC, Some(ts("2026-01-01T10:00:10Z")), created, ts("2026-01-01T10:00:19Z"), None, 1);
        assert_eq!(d, Due { next: Some(ts("2026-01-01T10:00:20Z")), ..Due::default() });
    }

    fn spec(scheduled: &str) -> IgnitorSpec {
        serde_json::from_value(serde_json::json!({ "scheduled": scheduled })).unwrap()
    }

    #[test]
    fn settings_from_a_spec() {
        let s = Settings::from_spec(&spec("0 * * * *")).unwrap();
        assert_eq!((s.time_zone, s.starting_deadline, s.max_catch_up, s.concurrency_policy, s.suspend), (Tz::UTC, None, 1, ConcurrencyPolicy::Allow, false));
        let mut full = spec("30 2 * * *");
        full.time_zone = Some("Europe/Berlin".into());
        full.starting_deadline_seconds = Some(120);
        full.max_catch_up = Some(4);
        full.concurrency_policy = Some(ConcurrencyPolicy::Forbid);
        let s = Settings::from_spec(&full).unwrap();
        assert_eq!((s.time_zone, s.starting_deadline, s.max_catch_up, s.concurrency_policy), (berlin(), Some(Duration::from_secs(120)), 4, ConcurrencyPolicy::Forbid));
        full.time_zone = Some("Europe/Berlln".into());
        assert_eq!(Settings::from_spec(&full).unwrap_err(), ScheduleError::UnknownTimeZone("Europe/Berlln".into()));
        assert!(matches!(Settings::from_spec(&spec("every day")), Err(ScheduleError::Invalid { .. })));
    }

    #[test]
    fn suspended_nothing_is_due_and_on_resume_the_latest_fires() {
        let mut sp = spec("0 * * * *");
        sp.suspend = Some(true);
        let created = ts("2026-01-01T00:30:00Z");
        let now = ts("2026-01-01T05:10:00Z");
        assert_eq!(Settings::from_spec(&sp).unwrap().due(None, created, now), Due::default());
        sp.suspend = Some(false);
        let d = Settings::from_spec(&sp).unwrap().due(None, created, now);
        assert_eq!(d.fire, ts_all(&["2026-01-01T05:00:00Z"]));
        assert_eq!(d.missed.len(), 4);
    }

    #[test]
    fn rare_and_impossible_dates() {
        let leap = parse("0 0 29 2 *").unwrap();
        let after = ts("2026-03-01T00:00:00Z");
        let t0 = std::time::Instant::now();
        assert_eq!(leap.next_after_in(berlin(), after), Some(ts("2028-02-28T23:00:00Z")));
        let d = due(&leap, Tz::UTC, None, ts("2023-01-01T00:00:00Z"), ts("2026-03-01T00:00:00Z"), None, 1);
        assert_eq!(d.fire, ts_all(&["2024-02-29T00:00:00Z"]));
        assert_eq!(d.next, Some(ts("2028-02-29T00:00:00Z")));
        let never = parse("0 0 30 2 *").unwrap();
        assert_eq!(never.next_after_in(berlin(), after), None);
        assert_eq!(due(&never, berlin(), None, ts("2023-01-01T00:00:00Z"), after, None, 1), Due::default());
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_last_time_ahead_of_now_is_never_repeated() {
        // Another replica's clock ran ahead and recorded 10:00:30: nothing is due before it,
        // and the next time is after it.
        let s = parse("*/10 * * * * *").unwrap();
        let d = due(&s, Tz::UTC, Some(ts("2026-01-01T10:00:30Z")), ts("2026-01-01T10:00:00Z"), ts("2026-01-01T10:00:25Z"), None, 5);
        assert_eq!(d, Due { next: Some(ts("2026-01-01T10:00:40Z")), ..Due::default() });
        let a = parse("2026-01-01T10:00:20Z").unwrap();
        assert_eq!(due(&a, Tz::UTC, Some(ts("2026-01-01T10:00:30Z")), ts("2026-01-01T10:00:00Z"), ts("2026-01-01T10:00:25Z"), None, 5), Due::default());
    }

    #[test]
    fn catch_up_fires_the_latest_and_misses_the_rest() {
        let s = parse("0 * * * *").unwrap();
        let created = ts("2026-01-01T00:30:00Z");
        let now = ts("2026-01-01T05:10:00Z");
        let d = due(&s, Tz::UTC, None, created, now, None, 1);
        assert_eq!(d.fire, ts_all(&["2026-01-01T05:00:00Z"]));
        assert_eq!(d.missed, ts_all(&["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z", "2026-01-01T03:00:00Z", "2026-01-01T04:00:00Z"]));
        assert!(!d.more_missed);
        assert_eq!(d.next, Some(ts("2026-01-01T06:00:00Z")));
        assert_eq!(d.last(), Some(ts("2026-01-01T05:00:00Z")));
        let d = due(&s, Tz::UTC, None, created, now, None, 3);
        assert_eq!(d.fire, ts_all(&["2026-01-01T03:00:00Z", "2026-01-01T04:00:00Z", "2026-01-01T05:00:00Z"]));
        assert_eq!(d.missed.len(), 2);
        // 0 counts as 1; above the bound counts as the bound.
        assert_eq!(due(&s, Tz::UTC, None, created, now, None, 0).fire.len(), 1);
        let d = due(&s, Tz::UTC, None, ts("2025-01-01T00:00:00Z"), now, None, 1000);
        assert_eq!(d.fire.len(), MAX_CATCH_UP as usize);
    }

    #[test]
    fn the_starting_deadline_misses_old_times() {
        let s = parse("0 * * * *").unwrap();
        let created = ts("2026-01-01T00:30:00Z");
        // 05:00 is 10 minutes old: within 15 minutes, beyond 5.
        let now = ts("2026-01-01T05:10:00Z");
        let d = due(&s, Tz::UTC, None, created, now, Some(Duration::from_secs(900)), 3);
        assert_eq!(d.fire, ts_all(&["2026-01-01T05:00:00Z"]));
        assert_eq!(d.missed.len(), 4);
        let d = due(&s, Tz::UTC, None, created, now, Some(Duration::from_secs(300)), 3);
        assert!(d.fire.is_empty());
        assert_eq!(d.missed.len(), 5);
        assert_eq!(d.last(), Some(ts("2026-01-01T05:00:00Z")));
        // Exactly at the deadline still fires.
        let d = due(&s, Tz::UTC, None, created, now, Some(Duration::from_secs(600)), 1);
        assert_eq!(d.fire, ts_all(&["2026-01-01T05:00:00Z"]));
    }

    #[test]
    fn a_long_downtime_lists_a_bounded_number_of_missed_times() {
        let s = parse("* * * * * *").unwrap();
        let created = ts("2026-01-01T00:00:00Z");
        let now = ts("2026-01-02T00:00:00Z");
        let d = due(&s, Tz::UTC, None, created, now, None, 2);
        assert_eq!(d.fire, ts_all(&["2026-01-01T23:59:59Z", "2026-01-02T00:00:00Z"]));
        assert_eq!(d.missed.len(), MISSED_LISTED);
        assert_eq!(d.missed.last(), Some(&ts("2026-01-01T23:59:58Z")));
        assert!(d.more_missed);
        assert_eq!(d.last(), Some(now));
    }

    #[test]
    fn concurrency_policies() {
        let none: Vec<String> = vec![];
        let active = vec!["a-1".to_string(), "a-2".to_string()];
        for p in [ConcurrencyPolicy::Allow, ConcurrencyPolicy::Forbid, ConcurrencyPolicy::Replace] {
            assert_eq!(concurrency(p, &none), Decision::Start, "{p:?}");
        }
        assert_eq!(concurrency(ConcurrencyPolicy::Allow, &active), Decision::Start);
        assert_eq!(concurrency(ConcurrencyPolicy::Forbid, &active), Decision::Skip);
        assert_eq!(concurrency(ConcurrencyPolicy::Replace, &active), Decision::ReplaceThenStart(active.clone()));
    }

    fn is_dns_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    }

    #[test]
    fn run_names() {
        let t = ts("2026-01-01T10:00:00Z");
        let n = run_name("ignitor1", "uid-1", t);
        assert!(n.starts_with("ignitor1-1767261600-"), "{n}");
        assert_eq!(n, run_name("ignitor1", "uid-1", t), "deterministic");
        assert_ne!(n, run_name("ignitor1", "uid-2", t), "another object of the same name");
        assert_ne!(n, run_name("ignitor1", "uid-1", ts("2026-01-01T10:00:00.5Z")), "another time in the same second");
        assert_ne!(n, run_name("ignitor1", "uid-1", ts("2026-01-01T10:00:01Z")));
        let long = "a.".repeat(120);
        let n = run_name(&long, "uid", t);
        assert!(is_dns_label(&n) && !n.contains("--"), "{n}");
        assert!(is_dns_label(&run_name("Upper.Case_x", "u", t)));
        assert!(is_dns_label(&run_name("...", "u", t)));
        let n = run_name(&"-a".repeat(100), "u", t);
        assert!(is_dns_label(&n) && !n.contains("--"), "{n}");
    }

    /// A start time in 2026..2028; two thirds of them within two days (one third within two
    /// hours) of a daylight-saving change of one of the zones the properties use.
    fn start_time() -> impl Strategy<Value = i64> {
        let changes = ["2026-03-08T07:00:00Z", "2026-03-29T01:00:00Z", "2026-04-04T15:00:00Z", "2026-10-03T15:30:00Z", "2026-10-25T01:00:00Z", "2026-11-01T06:00:00Z"];
        let near: Vec<i64> = changes.iter().map(|c| ts(c).as_second()).collect();
        prop_oneof![
            1_767_225_600i64..1_830_297_600,
            (prop::sample::select(near.clone()), -3600i64..2 * 86_400).prop_map(|(c, d)| c + d),
            (prop::sample::select(near), -3600i64..2 * 3600).prop_map(|(c, d)| c + d),
        ]
    }

    proptest! {
        /// `due` over (last, now]: fire is strictly increasing, after `last`, at most `now`,
        /// at most the catch-up bound; fire ∪ missed is every time in the window, fire the
        /// latest ones within the deadline; and again with last = due.last() nothing is new.
        #[test]
        fn due_properties(
            expr in prop::sample::select(vec!["* * * * *", "*/7 * * * *", "0 * * * *", "30 2 * * *", "*/15 * * * *", "*/20 * * * * *", "0 0 * * 1"]),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
            start in start_time(),
            created_ago in 0i64..4 * 86_400,
            last_ago in prop::option::of(0i64..4 * 86_400),
            deadline in prop::option::of(0u64..3 * 86_400),
            cap in 1u32..8,
        ) {
            let s = parse(expr).unwrap();
            let tz = parse_time_zone(Some(zone)).unwrap();
            let now = Timestamp::from_second(start).unwrap();
            let created = Timestamp::from_second(start - created_ago).unwrap();
            let last = last_ago.map(|a| Timestamp::from_second(start - a.min(created_ago)).unwrap());
            let d = due(&s, tz, last, created, now, deadline.map(Duration::from_secs), cap);
            let lower = last.unwrap_or(created);
            prop_assert!(d.fire.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(d.missed.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(d.fire.iter().chain(&d.missed).all(|t| *t > lower && *t <= now));
            prop_assert!(d.fire.len() <= cap as usize);
            if let (Some(f), Some(m)) = (d.fire.first(), d.missed.last()) { prop_assert!(m < f, "missed are older than fired"); }
            if let Some(dl) = deadline {
                let floor = now.checked_sub(Duration::from_secs(dl)).unwrap();
                prop_assert!(d.fire.iter().all(|t| *t >= floor));
            }
            let every = all_between(&s, tz, lower, now);
            if !d.more_missed {
                let mut union: Vec<Timestamp> = d.missed.iter().chain(&d.fire).copied().collect();
                union.sort();
                prop_assert_eq!(&union, &every);
                let in_time = every.iter().filter(|t| deadline.is_none_or(|dl| **t >= now.checked_sub(Duration::from_secs(dl)).unwrap())).count();
                prop_assert_eq!(d.fire.len(), in_time.min(cap as usize));
            } else {
                prop_assert_eq!(d.missed.len(), MISSED_LISTED);
                prop_assert!(every.len() > d.fire.len() + d.missed.len());
                prop_assert!(every.ends_with(&[d.missed.clone(), d.fire.clone()].concat()));
            }
            prop_assert_eq!(d.next, s.next_after_in(tz, now.max(lower)));
            prop_assert!(d.next.is_none_or(|n| n > now));
            if let Some(l) = d.last() {
                let again = due(&s, tz, Some(l), created, now, deadline.map(Duration::from_secs), cap);
                prop_assert_eq!(&again, &Due { next: d.next, ..Due::default() });
                // At the next time, exactly that time is due.
                if let Some(n) = d.next {
                    let later = due(&s, tz, Some(l), created, n, None, cap);
                    prop_assert_eq!(later.fire, vec![n]);
                    prop_assert!(later.missed.is_empty());
                }
            }
        }

        /// Cron times in a zone are strictly increasing, each a match of the expression on
        /// the wall clock, and no existing wall-clock time is skipped: between two
        /// consecutive times there is no instant whose wall time matches and is the first
        /// occurrence of that wall time.
        #[test]
        fn cron_times_increase_and_match(
            expr in prop::sample::select(vec!["*/5 * * * *", "30 2 * * *", "0 */2 * * *", "15 1-3 * * *"]),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
            start in start_time(),
        ) {
            let Schedule::Cron(c) = parse(expr).unwrap() else { unreachable!() };
            let s = Schedule::Cron(c.clone());
            let tz = parse_time_zone(Some(zone)).unwrap();
            let mut t = Timestamp::from_second(start).unwrap();
            let mut prev = None;
            for _ in 0..20 {
                let n = s.next_after_in(tz, t).unwrap();
                prop_assert!(n > t);
                let wall = to_chrono(n).unwrap().with_timezone(&tz);
                prop_assert!(c.is_time_matching(&wall.naive_local().and_utc()).unwrap());
                prop_assert_eq!(tz.from_local_datetime(&wall.naive_local()).earliest(), Some(wall), "the first occurrence of its wall time");
                // Minute by minute in between: nothing matching and first.
                let mut m = (t.as_second() / 60 + 1) * 60;
                while m < n.as_second() {
                    let u = DateTime::from_timestamp(m, 0).unwrap();
                    let w = u.with_timezone(&tz).naive_local();
                    let first = tz.from_local_datetime(&w).earliest().map(|d| d.with_timezone(&Utc));
                    prop_assert!(!(c.is_time_matching(&w.and_utc()).unwrap() && first == Some(u)), "skipped {}", u);
                    m += 60;
                }
                // Backwards agrees: the last time at or before n is n, and just before n it
                // is the previous time.
                prop_assert_eq!(s.cron_prev_in(tz, n), Some(n));
                if let Some(p) = prev {
                    prop_assert_eq!(s.cron_prev_in(tz, n.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1)).unwrap()), Some(p));
                }
                prev = Some(n);
                t = n;
            }
        }

        /// The last time at or before any instant has no scheduled time between it and the
        /// instant (also from inside a repeated hour).
        #[test]
        fn cron_prev_is_the_last_time_before(
            expr in prop::sample::select(vec!["*/5 * * * *", "30 2 * * *", "*/20 * * * * *", "15 1-3 * * *"]),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
            at in start_time(),
        ) {
            let s = parse(expr).unwrap();
            let tz = parse_time_zone(Some(zone)).unwrap();
            let at = Timestamp::from_second(at).unwrap();
            let p = s.cron_prev_in(tz, at).unwrap();
            prop_assert!(p <= at);
            prop_assert!(s.next_after_in(tz, p).unwrap() > at, "a time between {} and {}", p, at);
        }

        #[test]
        fn run_names_are_dns_labels(owner in "[a-z0-9.-]{1,253}", uid in "[a-f0-9-]{1,36}", secs in 0i64..4_000_000_000, ns in 0i32..1_000_000_000) {
            let n = run_name(&owner, &uid, Timestamp::new(secs, ns).unwrap());
            prop_assert!(is_dns_label(&n), "{}", n);
        }
    }
}
