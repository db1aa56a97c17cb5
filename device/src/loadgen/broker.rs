//! `edgedps loadgen-broker`: the gateway's MQTT broker under load, against Debian's
//! mosquitto on the same machine, with the same client (rumqttc), side by side.
//!
//! Fan-in: many publishers, one subscriber. Fan-out: one publisher, many subscribers.
//! Every message carries its send time; each subscriber records the latency of every
//! message it gets. Reported per broker: messages delivered per second, latency
//! percentiles, and the server's CPU time per thousand deliveries (from /proc).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;

use super::Percentiles;
use crate::process::{free_port, wait_for_port, ChildProcess, ProcessStats};

/// Command-line arguments of `edgedps loadgen-broker`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerLoadArgs {
    /// QoS of the publishes and the subscriptions (0, 1 or 2).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Publishers (fan-in when more than one).
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// Subscribers (fan-out when more than one).
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Payload size in bytes (at least 16: the send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Rounds (edgedps and mosquitto alternate).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Messages per second per publisher; 0: as fast as the in-flight window allows
    /// (the latency of a full queue). A rate the broker keeps up with gives the
    /// latency of a broker at work but not saturated.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// The mosquitto executable.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: String,
}

/// What one round measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerReport {
    pub broker: String,
    pub delivered: usize,
    pub expected: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency_us: Percentiles,
    pub server_cpu_ms_per_1000: f64,
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn client(port: u16, name: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(name, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(100);
    AsyncClient::new(options, 1000)
}

async fn connected(eventloop: &mut EventLoop) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no CONNACK".into()),
        }
    }
}

/// One round against the broker on `port` (its process `pid`).
async fn round(
    args: &BrokerLoadArgs,
    broker: &str,
    port: u16,
    pid: u32,
) -> Result<BrokerReport, String> {
    let level = qos(args.qos);
    let expected = args.publishers * args.messages * args.subscribers;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(expected)));
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut subscribers = Vec::new();
    for s in 0..args.subscribers {
        let (sub, mut eventloop) = client(port, &format!("bench-sub-{s}-{}", std::process::id()));
        connected(&mut eventloop).await?;
        sub.subscribe("bench/#", level)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => return Err(format!("no SUBACK: {other:?}")),
            }
        }
        let (latencies, delivered) = (latencies.clone(), delivered.clone());
        let per_subscriber = args.publishers * args.messages;
        subscribers.push(tokio::spawn(async move {
            let mut got = 0;
            let mut own = Vec::with_capacity(per_subscriber);
            while got < per_subscriber {
                match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        if let Some(sent) = p.payload.get(..8) {
                            let mut raw = [0u8; 8];
                            raw.copy_from_slice(sent);
                            let sent = u64::from_be_bytes(raw);
                            own.push(now_ns().saturating_sub(sent) / 1000);
                        }
                        got += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
            latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(own);
            drop(sub);
        }));
    }
    let before = ProcessStats::read(pid);
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let (publisher, mut eventloop) =
            client(port, &format!("bench-pub-{p}-{}", std::process::id()));
        connected(&mut eventloop).await?;
        let (messages, size) = (args.messages, args.payload.max(16));
        let mut pace = (args.rate > 0).then(|| {
            let mut pace =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            pace
        });
        publishers.push(tokio::spawn(async move {
            let driving = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            for n in 0..messages {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&now_ns().to_be_bytes());
                payload[8..16].copy_from_slice(&(n as u64).to_be_bytes());
                if publisher
                    .publish(format!("bench/{p}"), level, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            driving.abort();
        }));
    }
    for task in subscribers {
        let _ = task.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for task in publishers {
        task.abort();
    }
    let after = ProcessStats::read(pid);
    let count = delivered.load(Ordering::Relaxed);
    let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(BrokerReport {
        broker: broker.into(),
        delivered: count,
        expected,
        seconds,
        per_second: count as f64 / seconds,
        latency_us: Percentiles::of(latencies),
        server_cpu_ms_per_1000: (after.cpu_seconds - before.cpu_seconds) * 1_000_000.0
            / count.max(1) as f64,
    })
}

/// `edgedps loadgen-broker`.
pub async fn main(args: BrokerLoadArgs, exe: &Path) -> Result<Vec<BrokerReport>, String> {
    let dir = std::env::temp_dir().join(format!("edgedps-brokerload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (edgedps, _devices, local, _ca) = crate::loadgen::spawn_server(exe, &dir, false).await?;
    let port = free_port().map_err(|e| e.to_string())?;
    let config = dir.join("mosquitto.conf");
    std::fs::write(&config, format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\nmax_queued_messages 100000\n"))
        .map_err(|e| e.to_string())?;
    let mosquitto = Command::new(&args.mosquitto)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.mosquitto))?;
    let mosquitto = ChildProcess(mosquitto);
    wait_for_port(port).await?;
    let mut reports = Vec::new();
    for _ in 0..args.rounds {
        for (name, port, pid) in [
            ("edgedps", local, edgedps.id()),
            ("mosquitto", port, mosquitto.id()),
        ] {
            let report = round(&args, name, port, pid).await?;
            println!(
                "{:<9} qos {} {}x{}: {}/{} delivered in {:.2} s = {:.0}/s; latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms; server CPU {:.3} ms per 1000",
                report.broker,
                args.qos,
                args.publishers,
                args.subscribers,
                report.delivered,
                report.expected,
                report.seconds,
                report.per_second,
                report.latency_us.p50 as f64 / 1000.0,
                report.latency_us.p99 as f64 / 1000.0,
                report.latency_us.max as f64 / 1000.0,
                report.server_cpu_ms_per_1000
            );
            reports.push(report);
        }
    }
    let ratio = |f: fn(&BrokerReport) -> f64| {
        let mut ratios: Vec<f64> = reports
            .chunks(2)
            .filter_map(|pair| match pair {
                [e, m] if f(m) > 0.0 => Some(f(e) / f(m)),
                _ => None,
            })
            .collect();
        ratios.sort_by(|a, b| a.total_cmp(b));
        ratios.get(ratios.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "{}",
        json!({"median_rate_edgedps_over_mosquitto": ratio(|r| r.per_second),
               "median_cpu_edgedps_over_mosquitto": ratio(|r| r.server_cpu_ms_per_1000)})
    );
    drop(edgedps);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reports)
}
