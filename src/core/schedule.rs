//! Schedule math for Ignitors: `NOW`, an RFC 3339 instant, or a cron expression.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::jiff::Timestamp;
use thiserror::Error;

/// A parsed `spec.scheduled`.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Fire once, as soon as the ignitor is seen.
    Now,
    /// Fire once at this instant.
    At(Timestamp),
    /// Fire at every match of the cron expression (UTC).
    Cron(Box<Cron>),
}

/// Why `spec.scheduled` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScheduleError {
    #[error("scheduled {value:?} is not NOW, an RFC 3339 time or a valid cron expression: {detail}")]
    Invalid { value: String, detail: String },
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
        return Ok(Schedule::At(t));
    }
    let parser = CronParser::builder().seconds(Seconds::Optional).build();
    parser.parse(v).map(|c| Schedule::Cron(Box::new(c))).map_err(|e| ScheduleError::Invalid { value: value.to_string(), detail: e.to_string() })
}

impl Schedule {
    /// The first firing strictly after `after`, if there is one.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Now => None,
            Schedule::At(t) => (*t > after).then_some(*t),
            Schedule::Cron(c) => {
                let from: DateTime<Utc> = DateTime::from_timestamp(after.as_second(), after.subsec_nanosecond() as u32)?;
                let next = c.find_next_occurrence(&from, false).ok()?;
                Timestamp::from_second(next.timestamp()).ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert!(matches!(parse("NOW"), Ok(Schedule::Now)));
        assert!(matches!(parse("2020-02-03T19:34:05Z"), Ok(Schedule::At(_))));
        assert!(matches!(parse("5 * * * *"), Ok(Schedule::Cron(_))));
        assert!(matches!(parse("0 5 * * * *"), Ok(Schedule::Cron(_))));
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
}
