//! Running `shoal run` replicas as separate processes for a test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::common;

pub struct Replica {
    pub name: String,
    pub child: Child,
    pub metrics_port: u16,
}

/// Replicas of the operator, confined to one namespace of objects, with their Leases in
/// another. Killed when dropped.
pub struct Operator {
    pub ops_ns: String,
    pub work_ns: String,
    pub dir: PathBuf,
    pub replicas: Vec<Replica>,
    pub extra_args: Vec<String>,
    /// The cluster the replicas talk to; the shared test cluster if `None`.
    pub kubeconfig: Option<PathBuf>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// A port free on 127.0.0.1 now, below the kernel's ephemeral range (`shoal::dev::free_ports`):
/// a port-0 bind or an outgoing connection elsewhere never takes it before the replica binds
/// it, which one drawn from that range (as a port-0 bind draws) could lose.
pub fn free_port() -> u16 {
    shoal::dev::free_ports(1).expect("a free port")[0]
}

impl Operator {
    pub fn new(ops_ns: &str, work_ns: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shoal-test-{work_ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self { ops_ns: ops_ns.into(), work_ns: work_ns.into(), dir, replicas: vec![], extra_args: vec![], kubeconfig: None }
    }

    /// Replicas that talk to the cluster of `kubeconfig` instead of the shared one.
    pub fn on_cluster(ops_ns: &str, work_ns: &str, kubeconfig: PathBuf) -> Self {
        let mut op = Self::new(ops_ns, work_ns);
        op.kubeconfig = Some(kubeconfig);
        op
    }

    pub fn start(&mut self, name: &str) {
        self.start_with(name, name, &[]);
    }

    /// Start replica `name` running as `--identity identity`, with extra environment `env`.
    pub fn start_with(&mut self, name: &str, identity: &str, env: &[(&str, &str)]) {
        let port = free_port();
        let log = std::fs::File::create(self.dir.join(format!("{name}.stderr"))).unwrap();
        // SHOAL_BIN runs another build (e.g. target/release/shoal for CPU measurements).
        let bin = std::env::var("SHOAL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_shoal").to_string());
        let child = Command::new(bin)
            .args(["run", "--identity", identity, "--namespace", &self.ops_ns, "--watch-namespace", &self.work_ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--action-log", &self.dir.join(format!("{name}.actions")).display().to_string()])
            .args(&self.extra_args)
            .env("KUBECONFIG", self.kubeconfig.clone().unwrap_or_else(common::kubeconfig))
            .env("RUST_LOG", "info,kube=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting shoal run");
        self.replicas.push(Replica { name: name.to_string(), child, metrics_port: port });
    }

    pub fn pid(&self, name: &str) -> i32 {
        self.replicas.iter().find(|r| r.name == name).unwrap().child.id() as i32
    }

    /// CPU seconds (user + system, from /proc at 100 ticks/s) each running replica has used.
    pub fn cpu_seconds(&self) -> std::collections::HashMap<String, f64> {
        self.replicas
            .iter()
            .filter_map(|r| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", r.child.id())).ok()?;
                let after: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                let ticks = after.get(11)?.parse::<f64>().ok()? + after.get(12)?.parse::<f64>().ok()?;
                Some((r.name.clone(), ticks / 100.0))
            })
            .collect()
    }

    /// The sum of one metric over the running replicas.
    pub async fn metric_sum(&self, prefix: &str) -> f64 {
        let mut sum = 0.0;
        for r in &self.replicas {
            sum += metric(r.metrics_port, prefix).await.unwrap_or(0.0);
        }
        sum
    }

    /// The sum of every sample whose line starts with `prefix` (e.g. a metric and some of
    /// its labels, over all values of the others), over the running replicas.
    pub async fn metric_sum_all(&self, prefix: &str) -> f64 {
        let mut sum = 0.0;
        for r in &self.replicas {
            let Some(page) = metrics_page(r.metrics_port).await else { continue };
            sum += page.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).sum::<f64>();
        }
        sum
    }

    pub fn reap(&mut self, name: &str) {
        if let Some(i) = self.replicas.iter().position(|r| r.name == name) {
            let mut r = self.replicas.remove(i);
            let _ = r.child.wait();
        }
    }
}

/// Scrape one metric value (first sample whose line starts with `prefix`) from a replica.
pub async fn metric(port: u16, prefix: &str) -> Option<f64> {
    let body = metrics_page(port).await?;
    body.lines().find(|l| l.starts_with(prefix))?.split_whitespace().nth(1)?.parse().ok()
}

/// The whole metrics page of a replica.
pub async fn metrics_page(port: u16) -> Option<String> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut b = String::new();
        s.read_to_string(&mut b).ok()?;
        Some(b)
    })
    .await
    .ok()?
}

/// The upper bound of the histogram bucket holding quantile `q` (buckets summed across the
/// replicas' metrics pages): the load-test harness's own reading.
pub use shoal::loadtest::report::histogram_quantile;

/// GET `path` from a replica's HTTP server: (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
        let mut b = String::new();
        s.read_to_string(&mut b).ok()?;
        let code = b.split_whitespace().nth(1)?.parse().ok()?;
        let body = b.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
        Some((code, body))
    })
    .await
    .ok()?
}
