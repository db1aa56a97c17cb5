//! `edgedps loadgen --cut-off`: the cost of taking a whole group out of service.
//!
//! Every device of the first round connects again and stays connected; a bystander
//! group keeps registering new devices a few at a time; then the operator disables the
//! held devices' group. Reported: how long the write took to be answered and how many
//! sessions it says it closed, when each held device saw its connection closed, the
//! server CPU the cut cost, and the bystanders' register latency before and during the
//! cut (the cut must not stall other sessions).
//!
//! Watching 10,000 connections close costs the load generator itself CPU, on the same
//! two cores as the server: unwatched, the held connections are left alone (no closing
//! times), and the bystanders' figures are the server's alone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};

use edgedps_topics::admin::RecordKind;

use super::{Percentiles, SimulatedDevice};
use crate::process::ProcessStats;
use crate::provision;

/// What the cut measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CutReport {
    pub held: usize,
    pub sessions_closed: u64,
    /// From the publish of the disabling write to its result.
    pub result_ms: f64,
    /// From the publish to each held device seeing its connection closed.
    pub closed_ms: Percentiles,
    pub closed: usize,
    pub server_cpu_seconds: f64,
    /// Bystander registrations (new connection, register) in the 2 s before the cut.
    pub bystander_before_us: Percentiles,
    /// Bystander registrations that overlapped the cut (publish to last close).
    pub bystander_during_us: Percentiles,
    pub bystander_errors: usize,
}

/// Holds `held` connected, disables group `group`, measures (see the module comment).
pub async fn measure(
    held: Vec<SimulatedDevice>,
    bystanders: Vec<SimulatedDevice>,
    admin: SocketAddr,
    group: &str,
    concurrency: usize,
    pid: u32,
    watch: bool,
) -> Result<CutReport, String> {
    let closures = hold(held, concurrency, watch).await;
    let held_count = closures.lock().map(|c| c.held).unwrap_or_default();
    if held_count == 0 {
        return Err("no device session could be held".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<(Instant, Duration, bool)>::new()));
    let bystander_task = tokio::spawn(register_steadily(bystanders, stop.clone(), samples.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (client, mut eventloop) = operator(admin).await?;
    let record = retained_group(&client, &mut eventloop, group).await?;
    let mut disabled = record;
    disabled["provisioningStatus"] = json!("disabled");
    let cpu_before = ProcessStats::read(pid).cpu_seconds;
    let started = Instant::now();
    if let Ok(mut c) = closures.lock() {
        c.started = Some(started);
    }
    client
        .publish(
            RecordKind::EnrollmentGroup.record_topic(group),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&disabled).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let result_topic = RecordKind::EnrollmentGroup.result_topic(group);
    let result = next_json(&mut eventloop, &result_topic).await?;
    let result_ms = started.elapsed().as_secs_f64() * 1000.0;
    if result["ok"] != true {
        return Err(format!("disabling the group was refused: {result}"));
    }
    let deadline = if watch {
        Instant::now() + Duration::from_secs(60)
    } else {
        // Unwatched: the window is the second the cut is allowed.
        started + Duration::from_secs(1)
    };
    loop {
        let closed = closures.lock().map(|c| c.closed.len()).unwrap_or_default();
        if (watch && closed >= held_count) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ended = Instant::now();
    let cpu_seconds = ProcessStats::read(pid).cpu_seconds - cpu_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = bystander_task.await;

    let closed: Vec<u64> = closures
        .lock()
        .map(|c| c.closed.clone())
        .unwrap_or_default();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let window_before = started - Duration::from_secs(2);
    let before: Vec<u64> = samples
        .iter()
        .filter(|(at, took, ok)| *ok && *at >= window_before && *at + *took <= started)
        .map(|(_, took, _)| took.as_micros() as u64)
        .collect();
    let during: Vec<u64> = samples
        .iter()
        .filter(|(at, took, ok)| *ok && *at + *took >= started && *at <= ended)
        .map(|(_, took, _)| took.as_micros() as u64)
        .collect();
    Ok(CutReport {
        held: held_count,
        sessions_closed: result["sessionsClosed"].as_u64().unwrap_or_default(),
        result_ms,
        closed: closed.len(),
        closed_ms: Percentiles::of(closed),
        server_cpu_seconds: cpu_seconds,
        bystander_before_us: Percentiles::of(before),
        bystander_during_us: Percentiles::of(during),
        bystander_errors: samples.iter().filter(|(_, _, ok)| !ok).count(),
    })
}

pub fn print(report: &CutReport, as_json: bool) {
    if as_json {
        println!("{}", json!({ "cut_off": report }));
        return;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "cut-off  {} held sessions; the disabling write answered in {:.1} ms with sessionsClosed {}",
        report.held, report.result_ms, report.sessions_closed
    );
    if report.closed == 0 {
        println!(
            "         closing not watched (--cut-off-unwatched); server CPU over the second after the write {:.2} s",
            report.server_cpu_seconds
        );
    } else {
        println!(
        "         {} closed: p50 {:.1} ms  p99 {:.1} ms  last {:.1} ms after the write; server CPU {:.2} s",
        report.closed,
        report.closed_ms.p50 as f64 / 1000.0,
        report.closed_ms.p99 as f64 / 1000.0,
        report.closed_ms.max as f64 / 1000.0,
        report.server_cpu_seconds
    );
    }
    for (name, p) in [
        ("before", &report.bystander_before_us),
        ("during", &report.bystander_during_us),
    ] {
        println!(
            "         bystander registrations {name} the cut: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(p.p50),
            ms(p.p99),
            ms(p.max)
        );
    }
    println!("         bystander errors: {}", report.bystander_errors);
}

/// Held sessions and when each saw its connection closed.
#[derive(Default)]
struct Closures {
    held: usize,
    started: Option<Instant>,
    /// Microseconds from `started`.
    closed: Vec<u64>,
}

/// Connects and registers every device, then (`watch`) polls each connection in its
/// own task until it closes, or leaves it alone for a minute.
async fn hold(
    devices: Vec<SimulatedDevice>,
    concurrency: usize,
    watch: bool,
) -> Arc<Mutex<Closures>> {
    let held = super::connect_and_register(devices, concurrency).await;
    let closures = Arc::new(Mutex::new(Closures {
        held: held.len(),
        ..Closures::default()
    }));
    for (client, mut eventloop) in held {
        let closures = closures.clone();
        tokio::spawn(async move {
            let _client = client;
            if !watch {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            while eventloop.poll().await.is_ok() {}
            if let Ok(mut c) = closures.lock() {
                if let Some(started) = c.started {
                    c.closed.push(started.elapsed().as_micros() as u64);
                }
            }
        });
    }
    closures
}

/// Registers bystanders, four at a time, each on a new connection, until `stop`.
async fn register_steadily(
    devices: Vec<SimulatedDevice>,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>>,
) {
    let devices = Arc::new(devices);
    let next = Arc::new(AtomicUsize::new(0));
    let mut lanes = Vec::new();
    for _ in 0..4 {
        let (devices, next, stop, samples) =
            (devices.clone(), next.clone(), stop.clone(), samples.clone());
        lanes.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(device) = devices.get(n % devices.len().max(1)) else {
                    return;
                };
                let at = Instant::now();
                let ok = match provision::connect_with(&device.config, device.tls.clone()).await {
                    Ok((client, mut eventloop)) => {
                        let outcome =
                            provision::exchange(&device.config, &client, &mut eventloop, None)
                                .await;
                        let _ = client.try_disconnect();
                        outcome.is_ok_and(|o| o.status_word() == Some("assigned"))
                    }
                    Err(_) => false,
                };
                if let Ok(mut s) = samples.lock() {
                    s.push((at, at.elapsed(), ok));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
}

async fn operator(admin: SocketAddr) -> Result<(AsyncClient, rumqttc::EventLoop), String> {
    let (client, mut eventloop) = crate::admin::client(admin, "edgedps-cutoff", 16);
    client
        .subscribe(edgedps_topics::admin::RESULTS_FILTER, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    provision::wait_for(&mut eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, eventloop))
}

/// The group's retained record (without keys: a write without keys keeps them).
async fn retained_group(
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    group: &str,
) -> Result<Value, String> {
    let topic = RecordKind::EnrollmentGroup.record_topic(group);
    client
        .subscribe(&topic, QoS::AtMostOnce)
        .await
        .map_err(|e| e.to_string())?;
    next_json(eventloop, &topic).await
}

async fn next_json(eventloop: &mut rumqttc::EventLoop, topic: &str) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == topic => {
                return serde_json::from_slice(&p.payload).map_err(|e| e.to_string())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("nothing on {topic} within 60 s")),
        }
    }
}
