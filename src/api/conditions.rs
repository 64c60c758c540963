//! Shared status helpers: `metav1.Condition` merging that keeps `lastTransitionTime` when a
//! condition's status does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types shared by every kind.
pub mod types {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const FAILED: &str = "Failed";
}

/// Condition reasons shared by every kind (PascalCase, as Kubernetes requires).
pub mod reasons {
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Insert or update `new` in `conditions`. `lastTransitionTime` is kept when the status is
/// unchanged, so repeated reconciles do not churn the object.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    if let Some(old) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time.clone();
        }
        *old = new;
    } else {
        conditions.push(new);
    }
}

/// Build a condition stamped with `now`.
pub fn condition(type_: &str, status: bool, reason: &str, message: impl Into<String>, generation: Option<i64>, now: Time) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}

/// Ready / Progressing / Failed, the three conditions every kind keeps, set together from
/// `(ready, progressing, failed)`: each with `reason` and `message` (Failed's message only
/// when it is true).
pub fn set_state(conditions: &mut Vec<Condition>, (ready, progressing, failed): (bool, bool, bool), reason: &str, message: &str, generation: Option<i64>, now: Time) {
    set_condition(conditions, condition(types::READY, ready, reason, message, generation, now.clone()));
    set_condition(conditions, condition(types::PROGRESSING, progressing, reason, message, generation, now.clone()));
    set_condition(conditions, condition(types::FAILED, failed, reason, if failed { message } else { "" }, generation, now));
}

/// Find a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let mut cs = vec![condition("Ready", false, "Starting", "a", Some(1), t(10))];
        set_condition(&mut cs, condition("Ready", false, "Waiting", "b", Some(2), t(20)));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].reason, "Waiting");
        assert_eq!(cs[0].observed_generation, Some(2));
        set_condition(&mut cs, condition("Ready", true, "Done", "c", Some(2), t(30)));
        assert_eq!(cs[0].last_transition_time, t(30));
        set_condition(&mut cs, condition("Failed", false, "Ok", "", Some(2), t(40)));
        assert_eq!(cs.len(), 2);
        assert_eq!(find(&cs, "Failed").unwrap().reason, "Ok");
    }

    #[test]
    fn set_state_sets_the_three_and_fails_with_a_message_only_when_failed() {
        let mut cs = vec![];
        set_state(&mut cs, (false, true, false), "Running", "working", Some(1), t(10));
        assert_eq!(
            cs.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.message.as_str())).collect::<Vec<_>>(),
            [("Ready", "False", "working"), ("Progressing", "True", "working"), ("Failed", "False", "")]
        );
        set_state(&mut cs, (false, false, true), "StepFailed", "boom", Some(1), t(20));
        assert_eq!(find(&cs, "Failed").unwrap().message, "boom");
        assert_eq!(find(&cs, "Failed").unwrap().last_transition_time, t(20));
        assert_eq!(find(&cs, "Ready").unwrap().last_transition_time, t(10), "unchanged status keeps its time");
    }
}
