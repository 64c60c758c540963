//! The NamespaceManager scenario: TTL managers that each fire one webhook at a receiver in
//! the harness, due over a window once all exist. It measures how late they fire, the
//! replicas' CPU and memory, and that no manager's webhook arrived under two ids.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::procs::{self, Replicas};
use super::report::{Correctness, Cpu, ReplicaFigures, Results, Sample, Writes};
use super::run::{RUN_LABEL, Target, create_namespace, create_retrying, namespace_names, now_rfc3339, progress, rand32, start_replicas};
use super::stats::quantiles;
use super::{Args, Scenario, writes};
use crate::api::NamespaceManager;
use crate::dev::receiver::Receiver;

pub async fn run(args: &Args, sc: &Scenario, target: &Target) -> Result<Results> {
    let run = format!("{:06x}", rand32() & 0xff_ffff);
    let client = target.client.clone();
    let nss = namespace_names(&format!("lt-{run}-m"), sc.namespaces);
    for ns in &nss {
        create_namespace(&client, ns, &run).await?;
    }
    let rx = Receiver::start(None).await;
    let watch_ns = (args.existing && sc.namespaces == 1).then(|| nss[0].clone());
    let mut reps = start_replicas(args, sc, target, &run, watch_ns).await?;
    let cp_pids = target.local.as_deref().map(procs::control_plane_pids).unwrap_or_default();
    let cpu_at_start = reps.as_ref().map(Replicas::total_cpu).unwrap_or(0.0);
    let totals_before = writes::request_totals(&client).await.unwrap_or_default();
    let audit_from = now_rfc3339();
    let busy_before = procs::machine_busy_s();
    let cp_before = procs::cpu_by_name(&cp_pids);
    let t0 = Instant::now();
    // Due times start once all exist (creating them takes a while), spread over the window.
    let base = 60 + (sc.count / 100) as i64;
    let spread = sc.ttl_spread.as_secs().max(1) as i64;
    let creator = {
        let (client, nss, url, run, n) = (client.clone(), nss.clone(), rx.url("/m"), run.clone(), sc.count);
        tokio::spawn(async move {
            futures::stream::iter(0..n)
                .map(|i| {
                    let ns = nss[i % nss.len()].clone();
                    let api: Api<NamespaceManager> = Api::namespaced(client.clone(), &ns);
                    let m: NamespaceManager = serde_json::from_value(json!({
                        "apiVersion": "shoal.dev/v1alpha1", "kind": "NamespaceManager",
                        "metadata": {"name": format!("m{i:05}"), "labels": {RUN_LABEL: run}},
                        "spec": {"policies": [{"name": "ttl", "condition": {"type": "TTL", "params": {"ttlSeconds": base + (i as i64 % spread)}},
                                  "action": {"type": "WEBHOOK", "params": {"url": format!("{url}/{ns}/m{i:05}")}}}]}
                    }))
                    .expect("a NamespaceManager");
                    async move { create_retrying(&api, &m).await }
                })
                .buffer_unordered(32)
                .filter(|ok| futures::future::ready(*ok))
                .count()
                .await
        })
    };
    let pb = progress(args, sc.count, "managers fired");
    let deadline = Instant::now() + sc.timeout;
    let (mut interrupted, mut timed_out, mut created_in) = (false, false, None);
    let mut series = Vec::new();
    let mut next_kill = sc.chaos.as_ref().map(|c| Instant::now() + c.every);
    let mut victim = 0;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => { interrupted = true; }
        }
        if created_in.is_none() && creator.is_finished() {
            created_in = Some(t0.elapsed().as_secs_f64());
        }
        let fired: BTreeSet<String> = rx.requests().into_iter().map(|r| r.path).collect();
        let replicas = reps.as_mut().map(|r| r.poll()).unwrap_or_default();
        let cp = procs::cpu_by_name(&cp_pids);
        series.push(Sample {
            t: t0.elapsed().as_secs_f64(),
            created: 0,
            ended: fired.len(),
            jobs_done: 0,
            replicas: replicas.iter().map(|(n, c, m)| (n.clone(), (*c, *m))).collect(),
            control_plane_cpu: cp,
        });
        pb.set_position(fired.len() as u64);
        if interrupted || fired.len() >= sc.count {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        if let (Some(at), Some(r), Some(chaos)) = (next_kill, reps.as_mut(), sc.chaos.as_ref())
            && Instant::now() >= at
        {
            r.kill_and_restart(victim % r.list.len())?;
            victim += 1;
            next_kill = Some(at + chaos.every);
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    // Repeats under the same id may still be on their way; give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_total = reps.as_ref().map(Replicas::total_cpu).unwrap_or(0.0);
    let busy = procs::machine_busy_s() - busy_before;
    let cp_after = procs::cpu_by_name(&cp_pids);
    let totals_after = writes::request_totals(&client).await.unwrap_or_default();
    let audit_to = now_rfc3339();
    let pages = match &reps {
        Some(r) => r.pages().await,
        None => vec![],
    };
    let figs: Vec<ReplicaFigures> = reps.as_mut().map(Replicas::figures).unwrap_or_default();
    let replica_dir = reps.as_ref().map(|r| r.dir.clone());
    drop(reps);
    if !creator.is_finished() {
        creator.abort();
    }

    // Lateness: fired_at (µs) minus the namespace's creation (s) plus the TTL.
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut ns_created = BTreeMap::new();
    for ns in &nss {
        if let Some(t) = ns_api.get(ns).await.ok().and_then(|n| n.metadata.creation_timestamp) {
            ns_created.insert(ns.clone(), t.0);
        }
    }
    let mut late = Vec::new();
    let mut recorded_ids: BTreeMap<String, String> = BTreeMap::new();
    for ns in &nss {
        let api: Api<NamespaceManager> = Api::namespaced(client.clone(), ns);
        for m in api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let Some(st) = &m.status else { continue };
            if let (Some(at), Some(created), Some(ttl)) = (st.fired_at.as_ref(), ns_created.get(ns), m.spec.policies[0].condition.params.as_ref().and_then(|p| p.ttl_seconds)) {
                late.push(at.0.duration_since(*created).as_secs_f64() - ttl as f64);
            }
            if let Some(id) = st.action.as_ref().and_then(|a| a.delivery_id.clone()) {
                recorded_ids.insert(format!("/m/{ns}/{}", m.name_any()), id);
            }
        }
    }
    let got = rx.requests();
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &got {
        ids.entry(r.path.clone()).or_default().insert(r.id.clone());
    }
    let mut c = Correctness { created: sc.count, ended: ids.len(), ..Default::default() };
    c.webhook_two_ids = ids.iter().filter(|(_, s)| s.len() > 1).map(|(p, s)| format!("{p}: {s:?}")).collect();
    c.webhook_missing = (0..sc.count).map(|i| format!("/m/{}/m{i:05}", nss[i % nss.len()])).filter(|p| !ids.contains_key(p)).take(50).collect();
    c.webhook_repeats_same_id = got.len() - ids.values().map(BTreeSet::len).sum::<usize>();
    c.ok = c.webhook_two_ids.is_empty() && c.webhook_missing.is_empty() && !interrupted && !timed_out;
    for (p, id) in &recorded_ids {
        if ids.get(p).is_some_and(|s| !s.contains(id)) {
            c.webhook_two_ids.push(format!("{p}: recorded {id}, arrived under {:?}", ids[p]));
            c.ok = false;
        }
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let audit = target.audit_log().and_then(|p| writes::read_audit(&p, &audit_from, &audit_to).ok());
    if let Some(d) = replica_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    let fired = ids.len() as f64;
    let mut r = Results::empty(sc);
    r.interrupted = interrupted;
    r.timed_out = timed_out;
    r.duration_s = elapsed;
    r.workflows_ended = ids.len();
    r.steps_done = ids.len();
    r.lateness_s = Some(quantiles(&late));
    r.completion_latencies = late;
    r.cpu = Some(Cpu {
        replicas: figs,
        total_s: cpu_total - cpu_at_start,
        idle_rate_s_per_s: 0.0,
        per_step_ms: (cpu_total - cpu_at_start) / fired.max(1.0) * 1000.0,
        per_step_ms_net_of_idle: f64::NAN,
        control_plane_s: procs::cpu_delta(&cp_after, &cp_before),
        machine_busy_s: busy,
        window_s: elapsed,
        operator_dispatch_p50_le: None,
        operator_breakdown: crate::loadtest::report::dispatch_breakdown(&pages, "namespacemanager"),
        operator_dispatch_p99_le: None,
    });
    r.writes = Some(Writes::new(writes::delta(&totals_before, &totals_after), audit, fired));
    r.correctness = c;
    r.series = series;
    super::run::cleanup_namespaces(target, &run).await;
    if let Some(t) = created_in {
        eprintln!("created {} managers in {t:.1} s; the first was due {base} s after its namespace", sc.count);
    }
    Ok(r)
}
