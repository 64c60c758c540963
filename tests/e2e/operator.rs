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
}

impl Drop for Operator {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Operator {
    pub fn new(ops_ns: &str, work_ns: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shoal-test-{work_ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self { ops_ns: ops_ns.into(), work_ns: work_ns.into(), dir, replicas: vec![], extra_args: vec![] }
    }

    pub fn start(&mut self, name: &str) {
        let port = free_port();
        let log = std::fs::File::create(self.dir.join(format!("{name}.stderr"))).unwrap();
        // SHOAL_BIN runs another build (e.g. target/release/shoal for CPU measurements).
        let bin = std::env::var("SHOAL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_shoal").to_string());
        let child = Command::new(bin)
            .args(["run", "--identity", name, "--namespace", &self.ops_ns, "--watch-namespace", &self.work_ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--action-log", &self.dir.join(format!("{name}.actions")).display().to_string()])
            .args(&self.extra_args)
            .env("KUBECONFIG", common::kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
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
