//! Driving the simulated devices: each connects (a new TLS connection), registers and
//! disconnects, `concurrency` at a time or spread over an arrival window, and every
//! latency and error is recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::report::{Percentiles, Report};
use crate::process::ProcessStats;
use crate::provision::{self, DeviceConfig, DeviceError};

/// One simulated device, ready to go.
#[derive(Clone)]
pub struct SimulatedDevice {
    pub config: DeviceConfig,
    pub tls: Arc<rustls::ClientConfig>,
    /// Registrations on one connection (1: a new connection each).
    pub registrations: u32,
}

#[derive(Default)]
struct Samples {
    connect: Vec<u64>,
    register: Vec<u64>,
    total: Vec<u64>,
    errors: BTreeMap<String, usize>,
    throttled: u64,
    assigned: usize,
    reregistered: usize,
}

/// Provisions every device once, `concurrency` at a time (or spread over
/// `arrival` when given), and measures. `server_pid` is read for CPU and memory.
pub async fn run_devices(
    target: &str,
    devices: Vec<SimulatedDevice>,
    concurrency: usize,
    arrival: Option<Duration>,
    server_pid: Option<u32>,
    progress: bool,
) -> Report {
    let total = devices.len();
    let devices = Arc::new(devices);
    let samples = Arc::new(Mutex::new(Samples::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let before = server_pid.map(ProcessStats::read).unwrap_or_default();
    let start = Instant::now();

    let progress_task = progress.then(|| {
        let done = done.clone();
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let finished = done.load(Ordering::Relaxed);
                let (ok, errors) = {
                    let s = samples.lock().unwrap_or_else(|p| p.into_inner());
                    (s.assigned, s.errors.values().sum::<usize>())
                };
                eprint!(
                    "\r{finished}/{total} done, {ok} assigned, {errors} errors, {:.0}/s   ",
                    finished as f64 / start.elapsed().as_secs_f64()
                );
            }
        })
    });

    let mut tasks = Vec::new();
    match arrival {
        Some(spread) => {
            let gap = spread.as_secs_f64() / total.max(1) as f64;
            for index in 0..total {
                let at = start + Duration::from_secs_f64(gap * index as f64);
                let (devices, samples, done) = (devices.clone(), samples.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    one_device(&devices[index], &samples).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }));
            }
        }
        None => {
            for _ in 0..concurrency.max(1) {
                let (devices, samples, done, next) =
                    (devices.clone(), samples.clone(), done.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(device) = devices.get(index) else {
                            return;
                        };
                        one_device(device, &samples).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
    }
    let mut peak = before.rss_kib;
    let joined = futures_join(tasks);
    tokio::pin!(joined);
    loop {
        tokio::select! {
            _ = &mut joined => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(pid) = server_pid {
                    peak = peak.max(ProcessStats::read(pid).rss_kib);
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(task) = progress_task {
        task.abort();
        eprintln!();
    }
    let after = server_pid.map(ProcessStats::read).unwrap_or_default();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let cpu = after.cpu_seconds - before.cpu_seconds;
    Report {
        target: target.to_owned(),
        devices: total,
        assigned: samples.assigned,
        reregistered: samples.reregistered,
        errors: samples.errors,
        throttled: samples.throttled,
        seconds,
        per_second: (samples.assigned + samples.reregistered) as f64 / seconds,
        connect_us: Percentiles::of(samples.connect),
        register_us: Percentiles::of(samples.register),
        total_us: Percentiles::of(samples.total),
        server_cpu_seconds: cpu,
        server_cpu_ms_per_device: if samples.assigned > 0 {
            cpu * 1000.0 / samples.assigned as f64
        } else {
            0.0
        },
        server_rss_kib_before: before.rss_kib,
        server_rss_kib_after: after.rss_kib,
        server_rss_kib_peak: peak.max(after.rss_kib),
    }
}

pub(super) async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Provisions one device, retrying a refused or dropped connection (a storm fills the
/// server's queues) up to 10 times, and records what happened.
async fn one_device(device: &SimulatedDevice, samples: &Mutex<Samples>) {
    let started = Instant::now();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let connect_start = Instant::now();
        let connected = provision::connect_with(&device.config, device.tls.clone()).await;
        let (client, mut eventloop) = match connected {
            Ok(pair) => pair,
            Err(DeviceError::Connection(e)) if attempt < 10 => {
                record_error(samples, format!("retried: {}", short(&e)));
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        let connect_us = connect_start.elapsed().as_micros() as u64;
        let register_start = Instant::now();
        let mut outcome = provision::exchange(&device.config, &client, &mut eventloop, None).await;
        let mut register_us = register_start.elapsed().as_micros() as u64;
        for _ in 1..device.registrations {
            if !matches!(&outcome, Ok(o) if o.status_word() == Some("assigned")) {
                break;
            }
            record_register(samples, register_us);
            let again = Instant::now();
            outcome = provision::register_on(&device.config, &client, &mut eventloop, None).await;
            register_us = again.elapsed().as_micros() as u64;
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(50), eventloop.poll()).await;
        break outcome.map(|o| (o, connect_us, register_us));
    };
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok((outcome, connect_us, register_us)) => {
            s.throttled += u64::from(outcome.throttled);
            if outcome.status_word() == Some("assigned") {
                s.assigned += 1;
                s.connect.push(connect_us);
                s.register.push(register_us);
                s.total.push(started.elapsed().as_micros() as u64);
            } else {
                let kind = format!(
                    "status {} {}",
                    outcome.status,
                    outcome.body.get("errorCode").unwrap_or(&json!(null))
                );
                *s.errors.entry(kind).or_default() += 1;
            }
        }
        Err(e) => *s.errors.entry(short(&e.to_string())).or_default() += 1,
    }
}

/// A register latency of a re-registration on a reused connection.
fn record_register(samples: &Mutex<Samples>, register_us: u64) {
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
    s.register.push(register_us);
    s.reregistered += 1;
}

fn record_error(samples: &Mutex<Samples>, kind: String) {
    *samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .errors
        .entry(kind)
        .or_default() += 1;
}

fn short(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Connects every device, `concurrency` at a time, and registers it (idempotent for a
/// device registered before); returns the connections that got an answer, open.
pub async fn connect_and_register(
    devices: Vec<SimulatedDevice>,
    concurrency: usize,
) -> Vec<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let devices = Arc::new(devices);
    let held = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (devices, held, next) = (devices.clone(), held.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(device) = devices.get(next.fetch_add(1, Ordering::Relaxed)) {
                if let Ok((client, mut eventloop)) =
                    provision::connect_with(&device.config, device.tls.clone()).await
                {
                    if provision::exchange(&device.config, &client, &mut eventloop, None)
                        .await
                        .is_ok()
                    {
                        held.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((client, eventloop));
                    }
                }
            }
        }));
    }
    futures_join(tasks).await;
    let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut *held)
}
