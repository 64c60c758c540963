//! Structural checks of a workflow's step graph that admission cannot express: dependency
//! cycles (and, defensively, the rules CEL already enforces, so objects stored before a CRD
//! upgrade are still caught).

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

/// Why a step graph is not a valid DAG.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GraphError {
    #[error("step names must be unique; {0:?} appears more than once")]
    DuplicateStep(String),
    #[error("steps {0:?} and {1:?} differ only in case or in '-', '_' and '.'; the names derived from them would collide")]
    AmbiguousSteps(String, String),
    #[error("step {step:?} depends on {missing:?}, which is not a step of this workflow")]
    UnknownDependency { step: String, missing: String },
    #[error("step {0:?} depends on itself")]
    SelfDependency(String),
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

impl GraphError {
    /// Condition reason for this error.
    pub fn reason(&self) -> &'static str {
        crate::api::conditions::reasons::INVALID_SPEC
    }
}

/// A step's name and the names it depends on.
pub type Edges<'a> = (&'a str, &'a [String]);

/// Check that `steps` form a DAG. On a cycle, the error names every step on it in order,
/// starting and ending with the same step.
///
/// Written by hand rather than with petgraph: its `toposort` reports one node of a cycle,
/// and users need the whole cycle to fix their spec.
pub fn validate(steps: &[Edges<'_>]) -> Result<(), GraphError> {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, (name, _)) in steps.iter().enumerate() {
        if index.insert(name, i).is_some() {
            return Err(GraphError::DuplicateStep(name.to_string()));
        }
    }
    let mut keys: BTreeMap<String, &str> = BTreeMap::new();
    for (name, _) in steps {
        if let Some(other) = keys.insert(crate::core::plan::step_key(name), name) {
            return Err(GraphError::AmbiguousSteps(other.to_string(), name.to_string()));
        }
    }
    for (name, deps) in steps {
        for d in deps.iter() {
            if d == name {
                return Err(GraphError::SelfDependency(name.to_string()));
            }
            if !index.contains_key(d.as_str()) {
                return Err(GraphError::UnknownDependency { step: name.to_string(), missing: d.clone() });
            }
        }
    }
    // Iterative three-colour DFS over "depends on" edges, keeping the path to report a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; steps.len()];
    for start in 0..steps.len() {
        if colour[start] != Colour::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        colour[start] = Colour::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let deps = steps[node].1;
            if *next < deps.len() {
                let dep = index[deps[*next].as_str()];
                *next += 1;
                match colour[dep] {
                    Colour::White => {
                        colour[dep] = Colour::Grey;
                        stack.push((dep, 0));
                    }
                    Colour::Grey => {
                        let pos = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        // The stack runs dependant -> dependency; print it in execution order.
                        let mut cycle: Vec<String> = stack[pos..].iter().map(|(n, _)| steps[*n].0.to_string()).collect();
                        cycle.reverse();
                        cycle.push(cycle[0].clone());
                        return Err(GraphError::Cycle(cycle));
                    }
                    Colour::Black => {}
                }
            } else {
                colour[node] = Colour::Black;
                stack.pop();
            }
        }
    }
    Ok(())
}

/// Steps in a dependency-respecting order (for display); `None` if the graph is not a DAG.
pub fn topo_order(steps: &[Edges<'_>]) -> Option<Vec<String>> {
    validate(steps).ok()?;
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(steps.len());
    while order.len() < steps.len() {
        let before = order.len();
        for (name, deps) in steps {
            if !done.contains(name) && deps.iter().all(|d| done.contains(d.as_str())) {
                order.push(name.to_string());
            }
        }
        for n in &order[before..] {
            done.insert(steps.iter().find(|(s, _)| s == n).map(|(s, _)| *s)?);
        }
        if order.len() == before {
            return None;
        }
    }
    Some(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(spec: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        spec.iter().map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect())).collect()
    }
    fn edges(o: &[(String, Vec<String>)]) -> Vec<Edges<'_>> {
        o.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect()
    }

    #[test]
    fn diamond_is_valid_and_ordered() {
        let o = owned(&[("d", &["b", "c"]), ("b", &["a"]), ("c", &["a"]), ("a", &[])]);
        assert_eq!(validate(&edges(&o)), Ok(()));
        let order = topo_order(&edges(&o)).unwrap();
        assert_eq!(order.first().map(String::as_str), Some("a"));
        assert_eq!(order.last().map(String::as_str), Some("d"));
    }

    #[test]
    fn names_the_whole_cycle() {
        let o = owned(&[("a", &[]), ("b", &["a", "d"]), ("c", &["b"]), ("d", &["c"])]);
        match validate(&edges(&o)) {
            Err(GraphError::Cycle(c)) => {
                assert_eq!(c.first(), c.last());
                let set: BTreeSet<_> = c.iter().cloned().collect();
                assert_eq!(set, ["b", "c", "d"].iter().map(|s| s.to_string()).collect());
                assert_eq!(c.len(), 4);
                let msg = GraphError::Cycle(c).to_string();
                assert!(msg.starts_with("dependency cycle: "), "{msg}");
            }
            other => panic!("expected a cycle, got {other:?}"),
        }
    }

    #[test]
    fn rejects_self_unknown_and_duplicate() {
        let o = owned(&[("a", &["a"])]);
        assert_eq!(validate(&edges(&o)), Err(GraphError::SelfDependency("a".into())));
        let o = owned(&[("a", &["zz"])]);
        assert!(matches!(validate(&edges(&o)), Err(GraphError::UnknownDependency { .. })));
        let o = owned(&[("a", &[]), ("a", &[])]);
        assert_eq!(validate(&edges(&o)), Err(GraphError::DuplicateStep("a".into())));
    }

    #[test]
    fn rejects_steps_that_differ_only_in_case_or_separators() {
        for (a, b) in [("A", "a"), ("load-data", "load_data"), ("v1.2", "V1-2")] {
            let o = owned(&[(a, &[]), (b, &[])]);
            assert_eq!(validate(&edges(&o)), Err(GraphError::AmbiguousSteps(a.into(), b.into())));
        }
        let o = owned(&[("ab", &[]), ("a-b", &[])]);
        assert_eq!(validate(&edges(&o)), Ok(()));
    }

    proptest! {
        /// Edges only to lower indices make a DAG; adding one back edge along a path makes a cycle.
        #[test]
        fn dags_pass_and_back_edges_fail(n in 2usize..40, seed in proptest::collection::vec(any::<u32>(), 0..200)) {
            let mut o: Vec<(String, Vec<String>)> = (0..n).map(|i| (format!("s{i}"), vec![])).collect();
            for (k, r) in seed.iter().enumerate() {
                let i = 1 + (k % (n - 1));
                let j = (*r as usize) % i;
                let dep = format!("s{j}");
                if !o[i].1.contains(&dep) { o[i].1.push(dep); }
            }
            prop_assert_eq!(validate(&edges(&o)), Ok(()));
            let order = topo_order(&edges(&o)).unwrap();
            let pos: BTreeMap<_, _> = order.iter().enumerate().map(|(p, s)| (s.clone(), p)).collect();
            for (s, deps) in &o { for d in deps { prop_assert!(pos[d] < pos[s]); } }
            // Close a cycle: make s0 depend on the last step, which (transitively or not)
            // depends on s0 only if there is a path; force one with a chain.
            for (i, step) in o.iter_mut().enumerate().skip(1) { let d = format!("s{}", i - 1); if !step.1.contains(&d) { step.1.push(d); } }
            o[0].1.push(format!("s{}", n - 1));
            let is_cycle = matches!(validate(&edges(&o)), Err(GraphError::Cycle(_)));
            prop_assert!(is_cycle);
        }
    }
}
