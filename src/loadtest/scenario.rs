//! A load scenario (one YAML file in `loadtest/scenarios/`) and the objects it makes: pure
//! functions from the scenario to workflow specs, with no client.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What a scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Workflows,
    /// TTL NamespaceManagers that fire a webhook to a receiver in the harness.
    Namespacemanagers,
}

/// The DAG of every workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Chain,
    /// `a`, then `b` and `c` in parallel, then `d` after both; further steps chain after `d`.
    #[default]
    Diamond,
    /// One root, `fanout` leaves after it, one join after the leaves.
    Fanout,
    /// Each step depends on up to two earlier steps, chosen by a seeded generator.
    Random,
}

/// How the operator runs each step attempt (`spec.executor`): one Job, or one bare pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Executor {
    Job,
    Pod,
}

/// The ceiling run before the operator's: the same number of bare Jobs or bare pods, with no
/// operator, on the same control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareRun {
    Job,
    Pod,
    None,
}

/// Kill -9 one replica (round robin) every `every`, and start it again at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chaos {
    #[serde(with = "humantime")]
    pub every: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kind: Kind,
    #[serde(default)]
    pub shape: Shape,
    /// Steps per workflow (a fan-out has `fanout + 2`).
    #[serde(default = "five")]
    pub steps: usize,
    #[serde(default = "eight")]
    pub fanout: usize,
    /// How long each step's pod runs (the kwok delay annotation), e.g. "1s".
    #[serde(default = "one_second", with = "humantime")]
    pub step_duration: Duration,
    /// Fraction of workflows (0..1) with one step that exits 1, so the workflow fails.
    #[serde(default)]
    pub failure_fraction: f64,
    /// Workflows (or NamespaceManagers) to create.
    pub count: usize,
    /// Objects created per second; 0 creates them all at once.
    #[serde(default)]
    pub arrival_rate: f64,
    /// Operator replicas the harness starts on its own control plane.
    #[serde(default = "one")]
    pub replicas: usize,
    #[serde(default)]
    pub chaos: Option<Chaos>,
    /// Namespaces the objects are spread over.
    #[serde(default = "fifty")]
    pub namespaces: usize,
    /// `spec.executor` of every workflow; unset leaves it to the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
    /// The ceiling run: bare Jobs, bare pods or none; unset follows the executor (pods for
    /// Pod, Jobs otherwise). See [`Scenario::bare_run`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bare: Option<BareRun>,
    /// The older switch for the ceiling run: `false` is `bare: none`.
    #[serde(default = "yes")]
    pub bare_jobs: bool,
    /// Further fields merged into every workflow's spec (e.g. `podGC`, `ttlStrategy`); objects
    /// merge key by key, anything else replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_spec: Option<Value>,
    /// Environment of the replicas the harness starts (operator settings, `SHOAL_*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How long the replicas idle, holding every shard, before the load: their CPU and Lease
    /// writes then are the upkeep.
    #[serde(default = "thirty_seconds", with = "humantime")]
    pub idle: Duration,
    /// After the last workflow ends, keep sampling the objects left and the replicas' memory
    /// this long (garbage collection at work); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_opt")]
    pub settle: Option<Duration>,
    /// Give up waiting after this long.
    #[serde(default = "twenty_minutes", with = "humantime")]
    pub timeout: Duration,
    /// NamespaceManagers: TTLs are spread over this window, starting once all exist.
    #[serde(default = "one_minute", with = "humantime")]
    pub ttl_spread: Duration,
}

fn five() -> usize {
    5
}
fn eight() -> usize {
    8
}
fn one() -> usize {
    1
}
fn fifty() -> usize {
    50
}
fn yes() -> bool {
    true
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn twenty_minutes() -> Duration {
    Duration::from_secs(1200)
}

/// Durations as Go-style strings ("500ms", "2s", "1m", "1m30s").
mod humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::go_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::ha::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod humantime_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::go_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        crate::ha::parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// A duration as the kwok delay annotation reads it.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

impl Scenario {
    pub fn from_yaml(s: &str) -> anyhow::Result<Self> {
        let sc: Scenario = serde_yaml_ng::from_str(s)?;
        sc.validate()?;
        Ok(sc)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.count > 0, "count must be positive");
        anyhow::ensure!(self.replicas > 0, "replicas must be positive");
        anyhow::ensure!(self.namespaces > 0, "namespaces must be positive");
        anyhow::ensure!((0.0..=1.0).contains(&self.failure_fraction), "failureFraction is a fraction");
        anyhow::ensure!(self.steps > 0 || self.shape == Shape::Fanout, "steps must be positive");
        if let Some(extra) = &self.workflow_spec {
            let obj = extra.as_object().ok_or_else(|| anyhow::anyhow!("workflowSpec must be a map of spec fields"))?;
            for owned in ["containers", "maxStepTimeout", "executor"] {
                anyhow::ensure!(!obj.contains_key(owned), "workflowSpec must not set {owned}: the scenario's own fields make it");
            }
        }
        Ok(())
    }

    /// Which ceiling run precedes the operator's: `bare` if set; none if `bareJobs: false`;
    /// otherwise bare pods for the Pod executor and bare Jobs for the rest.
    pub fn bare_run(&self) -> BareRun {
        match (self.bare, self.bare_jobs, self.executor) {
            (Some(b), _, _) => b,
            (None, false, _) => BareRun::None,
            (None, true, Some(Executor::Pod)) => BareRun::Pod,
            (None, true, _) => BareRun::Job,
        }
    }

    /// The steps of every workflow, as (name, dependencies).
    pub fn dag(&self) -> Vec<(String, Vec<String>)> {
        dag(self.shape, self.steps, self.fanout)
    }

    pub fn steps_per_workflow(&self) -> usize {
        self.dag().len()
    }

    /// Whether workflow `i` carries the failing step: spread evenly over the run.
    pub fn fails(&self, i: usize) -> bool {
        let f = self.failure_fraction;
        f > 0.0 && ((i as f64 + 1.0) * f).floor() > (i as f64 * f).floor()
    }

    /// The spec of workflow `i`. A failing workflow fails at its last step, so it still runs
    /// every other step.
    pub fn workflow_spec(&self, i: usize) -> Value {
        let dag = self.dag();
        let delay = go_duration(self.step_duration);
        let last = dag.len() - 1;
        let containers: Vec<Value> = dag
            .iter()
            .enumerate()
            .map(|(k, (name, deps))| {
                let mut meta = json!({"annotations": {crate::dev::DELAY_ANNOTATION: delay}});
                if k == last && self.fails(i) {
                    meta["labels"] = json!({crate::dev::EXIT_CODE_LABEL: "1"});
                }
                json!({"stepName": name, "image": "busybox", "command": ["true"], "dependsOn": deps, "metadata": meta})
            })
            .collect();
        // A step may run twice its duration plus a minute before it times out, so a long
        // step (a scenario that keeps workflows live) is not cut by the 60 s default.
        let timeout = (self.step_duration.as_secs() * 2 + 60).max(60);
        let mut spec = json!({"containers": containers, "maxStepTimeout": timeout});
        if let Some(e) = self.executor {
            spec["executor"] = json!(e);
        }
        if let Some(extra) = &self.workflow_spec {
            merge(&mut spec, extra);
        }
        spec
    }
}

/// Merge `extra` into `base`: maps key by key, recursively; any other value replaces.
pub fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

pub fn dag(shape: Shape, steps: usize, fanout: usize) -> Vec<(String, Vec<String>)> {
    let name = |i: usize| format!("s{i}");
    match shape {
        Shape::Chain => (0..steps).map(|i| (name(i), if i == 0 { vec![] } else { vec![name(i - 1)] })).collect(),
        Shape::Diamond if steps >= 4 => {
            let mut d = vec![(name(0), vec![]), (name(1), vec![name(0)]), (name(2), vec![name(0)]), (name(3), vec![name(1), name(2)])];
            d.extend((4..steps).map(|i| (name(i), vec![name(i - 1)])));
            d
        }
        Shape::Diamond => dag(Shape::Chain, steps, fanout),
        Shape::Fanout => {
            let mut d = vec![(name(0), vec![])];
            d.extend((1..=fanout).map(|i| (name(i), vec![name(0)])));
            d.push((name(fanout + 1), (1..=fanout).map(name).collect()));
            d
        }
        Shape::Random => {
            // A fixed seed: every workflow has the same DAG, so runs compare.
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            (0..steps)
                .map(|i| {
                    let mut deps: Vec<String> = if i == 0 { vec![] } else { (0..2).map(|_| name((next() % i as u64) as usize)).collect() };
                    deps.sort();
                    deps.dedup();
                    (name(i), deps)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(dag(Shape::Diamond, 5, 0).iter().map(|(_, d)| d.len()).collect::<Vec<_>>(), vec![0, 1, 1, 2, 1]);
        assert_eq!(dag(Shape::Chain, 3, 0)[2].1, vec!["s1".to_string()]);
        let f = dag(Shape::Fanout, 0, 4);
        assert_eq!((f.len(), f[5].1.len()), (6, 4));
        let r = dag(Shape::Random, 20, 0);
        for (i, (_, deps)) in r.iter().enumerate() {
            assert!(deps.iter().all(|d| d[1..].parse::<usize>().unwrap() < i), "only earlier steps: acyclic");
        }
    }

    #[test]
    fn failure_fraction_spreads_evenly() {
        let sc = Scenario::from_yaml("name: x\ncount: 1000\nfailureFraction: 0.1\n").unwrap();
        assert_eq!((0..1000).filter(|&i| sc.fails(i)).count(), 100);
        let none = Scenario::from_yaml("name: x\ncount: 10\n").unwrap();
        assert!(!(0..10).any(|i| none.fails(i)));
    }

    #[test]
    fn every_scenario_file_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("loadtest/scenarios");
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let sc = Scenario::from_yaml(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(Some(sc.name.as_str()), p.file_stem().and_then(|s| s.to_str()), "the name is the file's");
        }
    }

    #[test]
    fn a_step_outlives_its_duration_before_it_times_out() {
        let long = Scenario::from_yaml("name: x\ncount: 1\nstepDuration: 2m\nshape: chain\nsteps: 1\n").unwrap();
        assert_eq!(long.workflow_spec(0)["maxStepTimeout"], 300);
        let short = Scenario::from_yaml("name: x\ncount: 1\n").unwrap();
        assert_eq!(short.workflow_spec(0)["maxStepTimeout"], 62);
        let spec: crate::api::workflow::WorkflowSpec = serde_json::from_value(long.workflow_spec(0)).unwrap();
        assert_eq!(spec.max_step_timeout, 300);
    }

    #[test]
    fn executor_extra_spec_fields_and_env() {
        let sc = Scenario::from_yaml(
            "name: x\ncount: 2\nexecutor: Pod\nworkflowSpec: {podGC: {strategy: OnWorkflowSuccess}, ttlStrategy: {secondsAfterSuccess: 30}, stepDefaults: {x: {y: 1}}}\nenv: {SHOAL_WORKERS: \"8\"}\nsettle: 1m\nidle: 10s\n",
        )
        .unwrap();
        let spec = sc.workflow_spec(0);
        assert_eq!(spec["executor"], "Pod");
        assert_eq!(spec["podGC"]["strategy"], "OnWorkflowSuccess");
        assert_eq!(spec["ttlStrategy"]["secondsAfterSuccess"], 30);
        assert_eq!(spec["containers"].as_array().unwrap().len(), 5, "the scenario's own fields stay");
        assert_eq!(sc.env["SHOAL_WORKERS"], "8");
        assert_eq!((sc.settle, sc.idle), (Some(Duration::from_secs(60)), Duration::from_secs(10)));
        let plain = Scenario::from_yaml("name: x\ncount: 1\n").unwrap();
        assert!(plain.workflow_spec(0).get("executor").is_none(), "no executor: the operator's default");
        assert_eq!((plain.settle, plain.idle), (None, Duration::from_secs(30)));
        assert!(Scenario::from_yaml("name: x\ncount: 1\nexecutor: pod\n").is_err(), "Job or Pod, as the API spells them");
        assert!(Scenario::from_yaml("name: x\ncount: 1\nworkflowSpec: {executor: Pod}\n").is_err(), "the executor has its own field");
        assert!(Scenario::from_yaml("name: x\ncount: 1\nworkflowSpec: [1]\n").is_err());
    }

    #[test]
    fn merge_is_key_by_key_for_maps_only() {
        let mut base = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        merge(&mut base, &json!({"a": {"c": [3], "e": null}, "f": {"g": 1}}));
        assert_eq!(base, json!({"a": {"b": 1, "c": [3], "e": null}, "d": 1, "f": {"g": 1}}));
    }

    #[test]
    fn the_ceiling_run_follows_the_executor_unless_set() {
        let bare = |y: &str| Scenario::from_yaml(&format!("name: x\ncount: 1\n{y}")).unwrap().bare_run();
        assert_eq!(bare(""), BareRun::Job);
        assert_eq!(bare("executor: Job\n"), BareRun::Job);
        assert_eq!(bare("executor: Pod\n"), BareRun::Pod);
        assert_eq!(bare("executor: Pod\nbareJobs: false\n"), BareRun::None);
        assert_eq!(bare("executor: Pod\nbare: job\n"), BareRun::Job);
        assert_eq!(bare("bareJobs: false\nbare: pod\n"), BareRun::Pod);
        assert_eq!(bare("bare: none\n"), BareRun::None);
    }

    #[test]
    fn durations_read_as_kwok_writes_them() {
        let sc = Scenario::from_yaml("name: x\ncount: 1\nstepDuration: 500ms\nchaos: {every: 10s}\n").unwrap();
        assert_eq!(go_duration(sc.step_duration), "500ms");
        assert_eq!(sc.chaos.unwrap().every, Duration::from_secs(10));
    }
}
