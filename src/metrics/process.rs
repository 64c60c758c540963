//! The process metrics client_golang's process collector exports (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_start_time_seconds`, `process_open_fds`, `process_max_fds`), read from
//! `/proc/self` at scrape time. On a system without `/proc` they are left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (USER_HZ: 100 on every Linux
/// architecture shoal runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// What one scrape reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub start_time_seconds: f64,
    pub open_fds: f64,
    pub max_fds: f64,
}

/// Parse `/proc/self/stat` (`stat`) and the `btime` line of `/proc/stat` (`proc_stat`) into
/// a sample; the resident set and the fd counts are filled in from other files.
pub fn parse(stat: &str, proc_stat: &str) -> Option<Sample> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { after.get(n - 3)?.parse().ok() };
    let boot: f64 = proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(Sample { cpu_seconds: (field(14)? + field(15)?) / TICKS_PER_SECOND, start_time_seconds: boot + field(22)? / TICKS_PER_SECOND, virtual_bytes: field(23)?, ..Default::default() })
}

/// This process, now.
pub fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut s = parse(&stat, &proc_stat)?;
    s.resident_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|st| resident_bytes(&st)).unwrap_or(0.0);
    s.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).unwrap_or(0.0);
    s.max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| max_open_files(&l)).unwrap_or(0.0);
    Some(s)
}

/// `VmRSS` of `/proc/<pid>/status` (in kB there), in bytes.
fn resident_bytes(status: &str) -> Option<f64> {
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// Registered with the registry; reads `/proc/self` at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor("process_cpu_seconds", "Total user and system CPU time spent in seconds.", None, MetricType::Counter)?)?;
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory size in bytes.", s.resident_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes.", s.virtual_bytes),
            ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", s.start_time_seconds),
            ("process_open_fds", "Number of open file descriptors.", s.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors.", s.max_fds),
        ];
        for (name, help, v) in gauges {
            ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a parenthesis; utime 250, stime 150 ticks; start at
        // 12345 ticks after boot; 8 MiB virtual.
        let mut fields = vec!["0"; 50];
        fields[0] = "S";
        (fields[11], fields[12], fields[19], fields[20]) = ("250", "150", "12345", "8388608");
        let stat = format!("4242 (sho al) x) {}", fields.join(" "));
        let s = parse(&stat, "cpu 1 2 3\nbtime 1700000000\nprocesses 9\n").unwrap();
        assert_eq!(s.cpu_seconds, 4.0);
        assert!((s.start_time_seconds - 1_700_000_123.45).abs() < 1e-6, "{s:?}");
        assert_eq!(s.virtual_bytes, 8_388_608.0);
        assert_eq!(resident_bytes("Name:\tshoal\nVmRSS:\t   2048 kB\n"), Some(2_097_152.0));
        assert_eq!(max_open_files("Limit Soft Hard Units\nMax open files            1024                 524288               files\n"), Some(1024.0));
    }

    #[test]
    fn this_process_is_measured() {
        let s = sample().expect("/proc is there");
        assert!(s.resident_bytes > 1e6 && s.open_fds >= 3.0 && s.max_fds >= s.open_fds, "{s:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86400.0 * 365.0, "{s:?}");
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_start_time_seconds ", "process_open_fds ", "process_max_fds "] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name} not in\n{text}");
        }
    }
}
