//! API writes: the API server's own counter (`apiserver_request_total`, all clients, by verb
//! and resource) and, where the harness runs the control plane, its audit log, which names
//! the client (user agent) of every write and so splits the operator's writes from the rest.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kube::Client;
use serde::{Deserialize, Serialize};

const WRITE_VERBS: [&str; 5] = ["POST", "PUT", "PATCH", "DELETE", "APPLY"];

/// `apiserver_request_total` summed over codes, for write verbs: "VERB resource[/sub]" -> n.
pub async fn request_totals(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(parse_request_totals(&text))
}

pub fn parse_request_totals(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let get = |k: &str| labels.split("\",").find_map(|kv| kv.strip_prefix(&format!("{k}=\"")).map(|v| v.trim_end_matches('"').to_string())).unwrap_or_default();
        let verb = get("verb");
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let (res, sub) = (get("resource"), get("subresource"));
        let key = if sub.is_empty() { format!("{verb} {res}") } else { format!("{verb} {res}/{sub}") };
        *out.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// `after - before`, dropping zeros.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0))).filter(|(_, v)| *v > 0.0).collect()
}

/// Writes from the audit log within a time window, by client and "verb resource[/sub]".
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AuditWrites {
    /// client -> "verb resource" -> count.
    pub by_client: BTreeMap<String, BTreeMap<String, u64>>,
    /// Job names the operator created (201) more than once.
    pub jobs_created_twice: Vec<String>,
    /// Jobs the operator created (201).
    pub operator_job_creates: u64,
    /// Pod names the operator created (201) more than once (the Pod executor's steps).
    #[serde(default)]
    pub pods_created_twice: Vec<String>,
    /// Pods the operator created (201).
    #[serde(default)]
    pub operator_pod_creates: u64,
    /// Operator writes refused with 409 (conflict or AlreadyExists).
    pub operator_conflicts: u64,
}

impl AuditWrites {
    /// A client's writes: Events only, or everything but Events and Leases (Lease upkeep is
    /// a cost per replica and second, not per step; see [`Self::lease_writes`]).
    pub fn client_total(&self, client: &str, events: bool) -> u64 {
        self.by_client.get(client).map(|m| m.iter().filter(|(k, _)| is_event(k) == events && !is_lease(k)).map(|(_, v)| *v).sum()).unwrap_or(0)
    }

    pub fn lease_writes(&self, client: &str) -> u64 {
        self.by_client.get(client).map(|m| m.iter().filter(|(k, _)| is_lease(k)).map(|(_, v)| *v).sum()).unwrap_or(0)
    }

    /// Every write of each client, whatever it wrote.
    pub fn per_client(&self) -> BTreeMap<String, u64> {
        self.by_client.iter().map(|(c, m)| (c.clone(), m.values().sum())).collect()
    }

    pub fn total(&self) -> u64 {
        self.by_client.values().flat_map(|m| m.values()).sum()
    }
}

/// The resource (with its subresource) of a "verb resource[/sub]" key.
pub fn resource_of(key: &str) -> &str {
    key.split_whitespace().nth(1).unwrap_or("")
}

/// Writes summed over verbs, per resource[/sub], from ("verb resource[/sub]", n).
pub fn per_resource<'a>(by_key: impl IntoIterator<Item = (&'a String, f64)>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in by_key {
        *out.entry(resource_of(k).to_string()).or_insert(0.0) += v;
    }
    out
}

/// Lease writes (every verb) in "VERB resource" -> n.
pub fn lease_total(by_key: &BTreeMap<String, f64>) -> f64 {
    by_key.iter().filter(|(k, _)| is_lease(k)).map(|(_, v)| v).sum()
}

pub fn is_event(key: &str) -> bool {
    key.split_whitespace().nth(1).is_some_and(|r| r == "events" || r.starts_with("events/"))
}

pub fn is_lease(key: &str) -> bool {
    key.split_whitespace().nth(1).is_some_and(|r| r == "leases")
}

/// The client a user agent names: "shoal" (the operator), "loadtest" (this harness), or the
/// component ("kube-controller-manager", "kwok", …).
pub fn client_of(user_agent: &str) -> String {
    if user_agent.starts_with("shoal/") {
        return "shoal".into();
    }
    if user_agent.starts_with(super::USER_AGENT) {
        return "loadtest".into();
    }
    let head = user_agent.split('/').next().unwrap_or("");
    if head.is_empty() { "unknown".into() } else { head.to_string() }
}

/// `path` and the files it was rotated into (`audit-<time>.log` beside it).
fn audit_files(path: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("audit");
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{stem}-")) && n.ends_with(".log")))
        .collect();
    files.sort();
    files.push(path.to_path_buf());
    Ok(files)
}

/// Read the audit log, counting the writes whose request arrived in `[from, to]` (RFC 3339,
/// compared as text: the API server writes them all in UTC with the same precision).
pub fn read_audit(path: &Path, from: &str, to: &str) -> anyhow::Result<AuditWrites> {
    use std::io::BufRead;
    let mut out = AuditWrites::default();
    let mut creates: HashMap<String, u32> = HashMap::new();
    let mut pod_creates: HashMap<String, u32> = HashMap::new();
    let lines = audit_files(path)?.into_iter().map(std::fs::File::open).collect::<Result<Vec<_>, _>>()?.into_iter().flat_map(|f| std::io::BufReader::new(f).lines());
    for line in lines {
        let Ok(line) = line else { continue };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let ts = ev["requestReceivedTimestamp"].as_str().unwrap_or("");
        if ts < from || ts > to || ev["stage"] != "ResponseComplete" {
            continue;
        }
        let verb = ev["verb"].as_str().unwrap_or("");
        let obj = &ev["objectRef"];
        let res = obj["resource"].as_str().unwrap_or("");
        let key = match obj["subresource"].as_str() {
            Some(sub) => format!("{verb} {res}/{sub}"),
            None => format!("{verb} {res}"),
        };
        let client = client_of(ev["userAgent"].as_str().unwrap_or(""));
        let code = ev["responseStatus"]["code"].as_u64().unwrap_or(0);
        if client == "shoal" {
            if code == 409 {
                out.operator_conflicts += 1;
            }
            if verb == "create" && res == "jobs" && code == 201 {
                out.operator_job_creates += 1;
                *creates.entry(format!("{}/{}", obj["namespace"].as_str().unwrap_or(""), obj["name"].as_str().unwrap_or(""))).or_default() += 1;
            }
            if verb == "create" && res == "pods" && obj["subresource"].is_null() && code == 201 {
                out.operator_pod_creates += 1;
                *pod_creates.entry(format!("{}/{}", obj["namespace"].as_str().unwrap_or(""), obj["name"].as_str().unwrap_or(""))).or_default() += 1;
            }
        }
        *out.by_client.entry(client).or_default().entry(key).or_default() += 1;
    }
    out.jobs_created_twice = creates.into_iter().filter(|(_, n)| *n > 1).map(|(k, _)| k).collect();
    out.jobs_created_twice.sort();
    out.pods_created_twice = pod_creates.into_iter().filter(|(_, n)| *n > 1).map(|(k, _)| k).collect();
    out.pods_created_twice.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_totals_sum_codes_and_skip_reads() {
        let text = "# HELP x\napiserver_request_total{code=\"201\",component=\"apiserver\",dry_run=\"\",group=\"batch\",resource=\"jobs\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 10\n\
apiserver_request_total{code=\"409\",component=\"apiserver\",dry_run=\"\",group=\"batch\",resource=\"jobs\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 2\n\
apiserver_request_total{code=\"200\",component=\"apiserver\",dry_run=\"\",group=\"shoal.dev\",resource=\"workflows\",scope=\"resource\",subresource=\"status\",verb=\"PATCH\",version=\"v1alpha1\"} 7\n\
apiserver_request_total{code=\"200\",component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"resource\",subresource=\"\",verb=\"GET\",version=\"v1\"} 99\n";
        let t = parse_request_totals(text);
        assert_eq!(t.get("POST jobs"), Some(&12.0));
        assert_eq!(t.get("PATCH workflows/status"), Some(&7.0));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn writes_per_resource_sum_verbs() {
        let t = BTreeMap::from([
            ("POST pods".to_string(), 10.0),
            ("PATCH pods/status".to_string(), 20.0),
            ("DELETE pods".to_string(), 5.0),
            ("PUT leases".to_string(), 7.0),
            ("PATCH leases".to_string(), 1.0),
        ]);
        assert_eq!(per_resource(t.iter().map(|(k, v)| (k, *v))), BTreeMap::from([("leases".to_string(), 8.0), ("pods".to_string(), 15.0), ("pods/status".to_string(), 20.0)]));
        assert_eq!(lease_total(&t), 8.0);
        let a = BTreeMap::from([("create pods/binding".to_string(), 3u64)]);
        assert_eq!(per_resource(a.iter().map(|(k, v)| (k, *v as f64)))["pods/binding"], 3.0);
    }

    #[test]
    fn clients_from_user_agents() {
        assert_eq!(client_of("shoal/0.1.0"), "shoal");
        assert_eq!(client_of(&format!("{}/0.1.0", super::super::USER_AGENT)), "loadtest");
        assert_eq!(client_of("kube-controller-manager/v1.35.4 (linux/amd64) kubernetes/abc/job-controller"), "kube-controller-manager");
        assert_eq!(client_of(""), "unknown");
    }

    #[test]
    fn audit_counts_creates_per_job() {
        let dir = std::env::temp_dir().join(format!("shoal-audit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("audit.log");
        let ev = |ts: &str, ua: &str, verb: &str, res: &str, name: &str, code: u32| {
            serde_json::json!({"stage": "ResponseComplete", "requestReceivedTimestamp": ts, "userAgent": ua, "verb": verb,
                "objectRef": {"resource": res, "namespace": "n", "name": name}, "responseStatus": {"code": code}})
            .to_string()
        };
        let lines = [
            ev("2026-01-01T00:00:01.000000Z", "shoal/0.1.0", "create", "jobs", "a", 201),
            ev("2026-01-01T00:00:02.000000Z", "shoal/0.1.0", "create", "jobs", "a", 409),
            ev("2026-01-01T00:00:03.000000Z", "shoal/0.1.0", "create", "jobs", "b", 201),
            ev("2026-01-01T00:00:04.000000Z", "shoal/0.1.0", "create", "jobs", "b", 201),
            ev("2026-01-01T00:00:05.000000Z", "kwok/v0", "patch", "pods", "p", 200),
            ev("2026-01-01T00:00:05.100000Z", "shoal/0.1.0", "create", "pods", "q", 201),
            ev("2026-01-01T00:00:05.200000Z", "shoal/0.1.0", "create", "pods", "q", 201),
            ev("2026-01-01T00:00:05.300000Z", "shoal/0.1.0", "create", "pods", "r", 201),
            ev("2026-01-01T00:00:05.400000Z", "kube-controller-manager/v1", "create", "pods", "r", 201),
            ev("2026-01-01T00:00:09.000000Z", "shoal/0.1.0", "create", "jobs", "c", 201),
        ];
        std::fs::write(&p, lines.join("\n")).unwrap();
        let a = read_audit(&p, "2026-01-01T00:00:00Z", "2026-01-01T00:00:06Z").unwrap();
        assert_eq!(a.operator_job_creates, 3);
        assert_eq!(a.jobs_created_twice, vec!["n/b".to_string()]);
        assert_eq!(a.operator_conflicts, 1);
        assert_eq!(a.by_client["kwok"]["patch pods"], 1);
        assert_eq!(a.operator_pod_creates, 3);
        assert_eq!(a.pods_created_twice, vec!["n/q".to_string()], "another client's create of the same name is not the operator's");
        assert_eq!(a.per_client(), BTreeMap::from([("kube-controller-manager".into(), 1), ("kwok".into(), 1), ("shoal".into(), 7)]));
        assert_eq!(a.total(), 9);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
