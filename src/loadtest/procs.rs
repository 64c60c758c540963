//! Operator replicas the harness starts as `shoal run` processes, and what /proc says about
//! them and about the control plane's processes: CPU seconds and resident memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// CPU seconds (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_mb: f64,
    pub hwm_mb: f64,
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command; 100 ticks a second.
    let ticks = after.get(11)?.parse::<f64>().ok()? + after.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0);
    Some(ProcSample { cpu_s: ticks / 100.0, rss_mb: kb("VmRSS:") / 1024.0, hwm_mb: kb("VmHWM:") / 1024.0 })
}

/// One replica: its process now, and the CPU its killed predecessors used.
pub struct Replica {
    pub name: String,
    pub child: Child,
    pub metrics_port: u16,
    /// CPU seconds of earlier processes of this replica (killed by the chaos), measured just
    /// before each kill.
    pub cpu_before: f64,
    pub peak_rss_mb: f64,
    pub kills: usize,
}

impl Replica {
    /// CPU seconds of this replica over all its processes.
    pub fn cpu_s(&self) -> f64 {
        self.cpu_before + sample(self.child.id()).map(|s| s.cpu_s).unwrap_or(0.0)
    }
}

/// The replicas of one run. Killed when dropped.
pub struct Replicas {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub ops_ns: String,
    /// Confine the replicas to one namespace (on a shared cluster).
    pub watch_namespace: Option<String>,
    pub dir: PathBuf,
    /// Environment every replica gets on top of the harness's (the scenario's `env`).
    pub env: BTreeMap<String, String>,
    pub list: Vec<Replica>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for r in &mut self.list {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// Below the ephemeral range, so nothing else takes it before the replica binds it.
fn free_port() -> Result<u16> {
    Ok(crate::dev::free_ports(1)?[0])
}

impl Replicas {
    /// Each replica's CPU, peak memory and kills, read once more now.
    pub fn figures(&mut self) -> Vec<crate::loadtest::report::ReplicaFigures> {
        self.poll();
        self.list.iter().map(|x| crate::loadtest::report::ReplicaFigures { name: x.name.clone(), cpu_s: x.cpu_s(), peak_rss_mb: x.peak_rss_mb, kills: x.kills }).collect()
    }

    pub fn new(bin: PathBuf, kubeconfig: PathBuf, ops_ns: String, watch_namespace: Option<String>, dir: PathBuf) -> Self {
        Self { bin, kubeconfig, ops_ns, watch_namespace, dir, env: BTreeMap::new(), list: vec![] }
    }

    fn spawn(&self, name: &str, port: u16) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "--identity", name, "--namespace", &self.ops_ns]).args(["--metrics-addr", &format!("127.0.0.1:{port}")]).arg("--action-log").arg(self.dir.join(format!("{name}.actions")));
        if let Some(ns) = &self.watch_namespace {
            cmd.args(["--watch-namespace", ns]);
        }
        cmd.envs(&self.env)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} run", self.bin.display()))
    }

    pub fn start(&mut self, name: &str) -> Result<()> {
        let port = free_port()?;
        let child = self.spawn(name, port)?;
        self.list.push(Replica { name: name.into(), child, metrics_port: port, cpu_before: 0.0, peak_rss_mb: 0.0, kills: 0 });
        Ok(())
    }

    /// kill -9 replica `i` and start it again at once, under the same identity.
    pub fn kill_and_restart(&mut self, i: usize) -> Result<()> {
        let name = self.list[i].name.clone();
        let port = free_port()?;
        let r = &mut self.list[i];
        if let Some(s) = sample(r.child.id()) {
            r.cpu_before += s.cpu_s;
            r.peak_rss_mb = r.peak_rss_mb.max(s.hwm_mb);
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
        r.kills += 1;
        let child = self.spawn(&name, port)?;
        let r = &mut self.list[i];
        r.child = child;
        r.metrics_port = port;
        Ok(())
    }

    /// Update every replica's peak memory; returns (name, cpu seconds, rss MB) now.
    pub fn poll(&mut self) -> Vec<(String, f64, f64)> {
        self.list
            .iter_mut()
            .map(|r| {
                let s = sample(r.child.id()).unwrap_or_default();
                r.peak_rss_mb = r.peak_rss_mb.max(s.hwm_mb);
                (r.name.clone(), r.cpu_before + s.cpu_s, s.rss_mb)
            })
            .collect()
    }

    pub fn total_cpu(&self) -> f64 {
        self.list.iter().map(Replica::cpu_s).sum()
    }

    /// The sum over replicas of the first sample of metric `prefix`.
    pub async fn metric_sum(&self, prefix: &str) -> f64 {
        let mut sum = 0.0;
        for r in &self.list {
            if let Some(page) = metrics_page(r.metrics_port).await {
                sum += page.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0);
            }
        }
        sum
    }

    /// Every replica's metrics page.
    pub async fn pages(&self) -> Vec<String> {
        let mut v = vec![];
        for r in &self.list {
            v.extend(metrics_page(r.metrics_port).await);
        }
        v
    }

    /// The action log lines of every replica (all its processes append to one file).
    pub fn action_logs(&self) -> Vec<String> {
        self.list.iter().filter_map(|r| std::fs::read_to_string(self.dir.join(format!("{}.actions", r.name))).ok()).flat_map(|s| s.lines().map(String::from).collect::<Vec<_>>()).collect()
    }
}

/// GET /metrics from a replica.
pub async fn metrics_page(port: u16) -> Option<String> {
    let fetch = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut b = String::new();
        s.read_to_string(&mut b).ok()?;
        Some(b)
    });
    fetch.await.ok()?
}

/// The control plane's processes (etcd, kube-apiserver, …) by name, from `dev up`'s state.
pub fn control_plane_pids(dir: &Path) -> BTreeMap<String, u32> {
    crate::dev::DevCluster::load(dir).map(|c| c.processes.iter().map(|p| (p.name.clone(), p.pid as u32)).collect()).unwrap_or_default()
}

/// CPU seconds so far of each process in `pids` (by name); exited ones are left out.
pub fn cpu_by_name(pids: &BTreeMap<String, u32>) -> BTreeMap<String, f64> {
    pids.iter().filter_map(|(n, p)| Some((n.clone(), sample(*p)?.cpu_s))).collect()
}

/// `after - before`, per name (a name missing before counts from 0).
pub fn cpu_delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(n, v)| (n.clone(), v - before.get(n).copied().unwrap_or(0.0))).collect()
}

/// The load average (1, 5, 15 minutes).
pub fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    [v.first().copied().unwrap_or(0.0), v.get(1).copied().unwrap_or(0.0), v.get(2).copied().unwrap_or(0.0)]
}

/// Total CPU seconds the whole machine spent busy (all processes, from /proc/stat).
pub fn machine_busy_s() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = s.lines().next() else { return 0.0 };
    let v: Vec<f64> = cpu.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: f64 = v.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / 100.0
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn cpu_delta_is_per_name_and_counts_new_names_from_zero() {
        let before = BTreeMap::from([("etcd".to_string(), 1.5)]);
        let after = BTreeMap::from([("etcd".to_string(), 4.0), ("kwok".to_string(), 2.0)]);
        assert_eq!(super::cpu_delta(&after, &before), BTreeMap::from([("etcd".to_string(), 2.5), ("kwok".to_string(), 2.0)]));
    }
}
