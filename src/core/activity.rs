//! Activity and ActivityWorker planning (seed 000), with no kube client: worker and Job names,
//! the environment an Activity's inputs become, the default job, and what an Activity's
//! workers add up to.

use std::collections::BTreeMap;

use crate::api::activity::{ActivityJob, ActivityState, ImagePullPolicy, WorkerState};

/// Prefix of the environment variable each input becomes.
pub const INPUT_ENV_PREFIX: &str = "ACTIVITY_INPUT_";
/// The environment variable that carries every input as one JSON object.
pub const INPUTS_ENV: &str = "ACTIVITY_INPUTS";
/// The environment variable that carries a worker's index (0-based).
pub const WORKER_INDEX_ENV: &str = "ACTIVITY_WORKER_INDEX";
/// Seconds a worker's container may run once started, unless the spec says otherwise.
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 3600;

/// Seed 000's default demo job: `bash:5.0` running `echo done!`, with `TEST=FAKE`.
pub fn default_job() -> ActivityJob {
    ActivityJob {
        name: "activity-job".into(),
        image: "bash:5.0".into(),
        command: Some(vec!["bash".into(), "-c".into()]),
        args: Some(vec!["echo done!".into()]),
        env: Some(vec![k8s_openapi::api::core::v1::EnvVar { name: "TEST".into(), value: Some("FAKE".into()), ..Default::default() }]),
        image_pull_policy: Some(ImagePullPolicy::IfNotPresent),
    }
}

fn hash(parts: &str) -> u64 {
    crate::core::shard::weight(0, parts)
}

/// `head` cut so that `head` + `tail` fits in `max`, without a trailing separator.
fn fit(head: &str, tail: &str, max: usize) -> String {
    let head: String = head.chars().take(max.saturating_sub(tail.len())).collect();
    format!("{}{tail}", head.trim_end_matches(['-', '.']))
}

/// The name of worker `index` of the Activity `activity` with `uid`: `<activity>-<index>-<hash>`,
/// at most 253 characters. The hash of the UID keeps the workers of a deleted Activity and of a
/// new one of the same name apart.
pub fn worker_name(activity: &str, uid: &str, index: i32) -> String {
    let tail = format!("-{index}-{:05x}", hash(&format!("{uid}\0{index}")) & 0xf_ffff);
    fit(activity, &tail, 253)
}

/// The name of a worker's Job for `attempt`: `<worker>-<attempt>-<hash>`, at most 63
/// characters (a Job's name becomes a label value of its pods).
pub fn job_name(worker: &str, uid: &str, attempt: i32) -> String {
    let tail = format!("-{attempt}-{:08x}", hash(&format!("{uid}\0{attempt}")) & 0xffff_ffff);
    fit(worker, &tail, 63)
}

/// The environment variable name of input `key`: `ACTIVITY_INPUT_` and the key in upper case
/// with every character other than a letter or digit as `_` (`batch-size` →
/// `ACTIVITY_INPUT_BATCH_SIZE`).
pub fn input_env_name(key: &str) -> String {
    let k: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("{INPUT_ENV_PREFIX}{k}")
}

/// Two inputs whose keys become the same variable (`batch-size` and `BATCH_SIZE`), if any:
/// the Activity is refused rather than one silently shadowing the other.
pub fn colliding_inputs(inputs: &BTreeMap<String, String>) -> Option<(String, String)> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for k in inputs.keys() {
        if let Some(first) = seen.insert(input_env_name(k), k) {
            return Some((first.to_string(), k.clone()));
        }
    }
    None
}

/// The inputs as environment variables: one per input, then `ACTIVITY_INPUTS` with all of
/// them as a JSON object.
pub fn input_env(inputs: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = inputs.iter().map(|(k, v)| (input_env_name(k), v.clone())).collect();
    env.push((INPUTS_ENV.into(), serde_json::to_string(inputs).unwrap_or_else(|_| "{}".into())));
    env
}

/// What an Activity's workers add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub state: ActivityState,
    /// `completed/total`.
    pub summary: String,
    pub message: String,
}

/// Sum up `workers` (each worker's state, `None` when it has none yet) out of `total` wanted.
/// Failed as soon as one worker failed; Completed when all `total` completed.
pub fn summarize(workers: &[(String, Option<WorkerState>)], total: usize) -> Summary {
    let count = |s: WorkerState| workers.iter().filter(|(_, w)| *w == Some(s)).count();
    let completed = count(WorkerState::Completed);
    let summary = format!("{completed}/{total}");
    let failed: Vec<&str> = workers.iter().filter(|(_, w)| *w == Some(WorkerState::Failed)).map(|(n, _)| n.as_str()).collect();
    if !failed.is_empty() {
        return Summary { state: ActivityState::Failed, summary, message: format!("worker {} failed", failed.join(", ")) };
    }
    if workers.len() < total {
        return Summary { state: ActivityState::Initializing, summary, message: format!("{} of {total} workers created", workers.len()) };
    }
    if completed == total {
        return Summary { state: ActivityState::Completed, summary, message: format!("all {total} workers completed") };
    }
    let running = count(WorkerState::Running);
    Summary { state: ActivityState::Running, summary, message: format!("{completed} completed, {running} running, {} ready", total - completed - running) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_fit_and_stay_distinct() {
        let long = "a".repeat(253);
        let w = worker_name(&long, "uid", 7);
        assert!(w.len() <= 253 && w.ends_with(&format!("-7-{:05x}", hash("uid\u{0}7") & 0xf_ffff)), "{w}");
        assert_ne!(worker_name("act", "uid-1", 0), worker_name("act", "uid-2", 0), "a new Activity of the same name has new workers");
        assert_ne!(worker_name("act", "u", 0), worker_name("act", "u", 1));
        let j = job_name(&w, "wuid", 0);
        assert!(j.len() <= 63, "{j}");
        assert!(!j.contains("--"));
        assert_ne!(job_name("w", "u1", 0), job_name("w", "u2", 0));
        assert_eq!(worker_name("my-activity", "u", 0), worker_name("my-activity", "u", 0), "deterministic");
    }

    #[test]
    fn inputs_become_one_variable_each_and_one_json_object() {
        let inputs = BTreeMap::from([("batch-size".to_string(), "1000".to_string()), ("dataset".to_string(), "production-data".to_string())]);
        let env = input_env(&inputs);
        assert_eq!(env[0], ("ACTIVITY_INPUT_BATCH_SIZE".to_string(), "1000".to_string()));
        assert_eq!(env[1], ("ACTIVITY_INPUT_DATASET".to_string(), "production-data".to_string()));
        assert_eq!(env[2].0, "ACTIVITY_INPUTS");
        assert_eq!(serde_json::from_str::<BTreeMap<String, String>>(&env[2].1).unwrap(), inputs);
        assert_eq!(colliding_inputs(&inputs), None);
        let clash = BTreeMap::from([("batch-size".to_string(), "1".to_string()), ("BATCH_SIZE".to_string(), "2".to_string())]);
        assert_eq!(colliding_inputs(&clash), Some(("BATCH_SIZE".to_string(), "batch-size".to_string())));
        assert_eq!(input_env_name("région.x"), "ACTIVITY_INPUT_R_GION_X");
    }

    #[test]
    fn summaries() {
        let w = |v: &[Option<WorkerState>]| v.iter().enumerate().map(|(i, s)| (format!("w{i}"), *s)).collect::<Vec<_>>();
        use WorkerState::*;
        assert_eq!(summarize(&w(&[Some(Completed)]), 2).state, ActivityState::Initializing);
        let s = summarize(&w(&[Some(Completed), Some(Running), None]), 3);
        assert_eq!((s.state, s.summary.as_str()), (ActivityState::Running, "1/3"));
        assert_eq!(s.message, "1 completed, 1 running, 1 ready");
        let s = summarize(&w(&[Some(Completed), Some(Completed)]), 2);
        assert_eq!((s.state, s.summary.as_str()), (ActivityState::Completed, "2/2"));
        let s = summarize(&w(&[Some(Completed), Some(Failed), Some(Running)]), 3);
        assert_eq!(s.state, ActivityState::Failed);
        assert_eq!(s.message, "worker w1 failed");
    }

    proptest! {
        #[test]
        fn names_are_always_valid(activity in "[a-z0-9]([-a-z0-9]{0,252})", uid in "[a-f0-9-]{1,36}", index in 0i32..100) {
            let w = worker_name(&activity, &uid, index);
            prop_assert!(w.len() <= 253);
            prop_assert!(!w.starts_with('-') && !w.ends_with('-'));
            let j = job_name(&w, &uid, 0);
            prop_assert!(j.len() <= 63 && !j.starts_with('-'));
            prop_assert!(j.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
    }
}
