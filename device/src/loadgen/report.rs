//! What a round measured, and how it is printed: one block per round, then the median
//! ratio of edgedps to the baseline over the round pairs.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<u64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What one round measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub devices: usize,
    pub assigned: usize,
    /// Registrations beyond the first on reused connections.
    pub reregistered: usize,
    pub errors: BTreeMap<String, usize>,
    pub throttled: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub connect_us: Percentiles,
    pub register_us: Percentiles,
    pub total_us: Percentiles,
    pub server_cpu_seconds: f64,
    pub server_cpu_ms_per_device: f64,
    pub server_rss_kib_before: u64,
    pub server_rss_kib_after: u64,
    pub server_rss_kib_peak: u64,
}

pub(super) fn print_report(r: &Report, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    println!(
        "{:<8} {} devices: {} assigned in {:.2} s = {:.0}/s; throttled {}; errors {:?}",
        r.target, r.devices, r.assigned, r.seconds, r.per_second, r.throttled, r.errors
    );
    for (name, p) in [
        ("connect", &r.connect_us),
        ("register", &r.register_us),
        ("total", &r.total_us),
    ] {
        println!(
            "         {name:<8} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            p.p50 as f64 / 1000.0,
            p.p90 as f64 / 1000.0,
            p.p99 as f64 / 1000.0,
            p.max as f64 / 1000.0
        );
    }
    println!(
        "         server CPU {:.2} s ({:.3} ms/device), RSS {} -> {} KiB (peak {} KiB)",
        r.server_cpu_seconds,
        r.server_cpu_ms_per_device,
        r.server_rss_kib_before,
        r.server_rss_kib_after,
        r.server_rss_kib_peak
    );
}

/// Median over rounds of edgedps/baseline for rate and CPU per device.
pub(super) fn print_ratio(reports: &[Report], as_json: bool) {
    let mut rate = Vec::new();
    let mut cpu = Vec::new();
    for pair in reports.chunks(2) {
        if let [e, b] = pair {
            if b.per_second > 0.0 {
                rate.push(e.per_second / b.per_second);
            }
            if b.server_cpu_ms_per_device > 0.0 {
                cpu.push(e.server_cpu_ms_per_device / b.server_cpu_ms_per_device);
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (rate, cpu) = (median(rate.clone()), median(cpu.clone()));
    if as_json {
        println!(
            "{}",
            json!({"ratio": {"rate_edgedps_over_baseline": rate, "cpu_per_device_edgedps_over_baseline": cpu, "rounds": reports.len() / 2}})
        );
    } else {
        println!("median over {} round pairs: rate edgedps/baseline = {rate:.2}, CPU per device edgedps/baseline = {cpu:.2}", reports.len() / 2);
    }
}
