//! Render a workflow's DAG as Graphviz DOT, coloured by step state.

use std::collections::HashMap;
use std::fmt::Write;

use crate::api::workflow::{StepPhase, Workflow};

fn colour(p: Option<StepPhase>) -> (&'static str, &'static str) {
    match p {
        Some(StepPhase::Succeeded) => ("#2e7d32", "white"),
        Some(StepPhase::Failed) => ("#c62828", "white"),
        Some(StepPhase::Running) => ("#1565c0", "white"),
        Some(StepPhase::Retrying) => ("#ef6c00", "white"),
        Some(StepPhase::Skipped) => ("#9e9e9e", "white"),
        Some(StepPhase::Cancelled) => ("#6d4c41", "white"),
        Some(StepPhase::Pending) | None => ("#eeeeee", "black"),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// DOT for `wf`: one node per step (label: name, phase, attempt), one edge per dependency.
pub fn dot(wf: &Workflow) -> String {
    let name = wf.metadata.name.clone().unwrap_or_default();
    let states: HashMap<&str, (StepPhase, i32)> = wf.status.iter().flat_map(|s| s.steps.iter()).map(|s| (s.step_name.as_str(), (s.phase, s.attempt))).collect();
    let mut out = String::new();
    let phase = wf.status.as_ref().and_then(|s| s.workflow_status).map(|p| format!("{p:?}")).unwrap_or_else(|| "Created".into());
    let _ = writeln!(out, "digraph {} {{", quote(&name));
    let _ = writeln!(out, "  label={}; labelloc=t; rankdir=LR;", quote(&format!("{name} ({phase})")));
    let _ = writeln!(out, "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];");
    for c in &wf.spec.containers {
        let st = states.get(c.step_name.as_str());
        let (fill, font) = colour(st.map(|s| s.0));
        let mut label = c.step_name.clone();
        if let Some((p, attempt)) = st {
            let _ = write!(label, "\n{p:?}");
            if *attempt > 0 {
                let _ = write!(label, " (attempt {})", attempt + 1);
            }
        }
        let _ = writeln!(out, "  {} [label={}, fillcolor={}, fontcolor={}];", quote(&c.step_name), quote(&label), quote(fill), quote(font));
    }
    for c in &wf.spec.containers {
        for d in c.depends_on.iter().flatten() {
            let _ = writeln!(out, "  {} -> {};", quote(d), quote(&c.step_name));
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nodes_edges_and_colours() {
        let wf: Workflow = serde_json::from_value(serde_json::json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "d"},
            "spec": {"containers": [{"stepName": "a", "image": "x"}, {"stepName": "b\"q", "image": "x", "dependsOn": ["a"]}]},
            "status": {"workflowStatus": "Started", "steps": [{"stepName": "a", "phase": "Succeeded", "attempt": 0}, {"stepName": "b\"q", "phase": "Retrying", "attempt": 1}]}
        }))
        .unwrap();
        let d = dot(&wf);
        assert!(d.starts_with("digraph \"d\" {"), "{d}");
        assert!(d.contains("\"a\" -> \"b\\\"q\";"), "{d}");
        assert!(d.contains("fillcolor=\"#2e7d32\""), "{d}");
        assert!(d.contains("Retrying (attempt 2)"), "{d}");
        assert!(d.contains("label=\"d (Started)\""), "{d}");
    }
}
