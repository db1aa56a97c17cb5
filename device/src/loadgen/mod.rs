//! `edgedps loadgen`: many simulated devices provisioning at once, with a report of
//! throughput, latency percentiles, errors and the server's CPU and memory.
//!
//! By default it starts its own `edgedps serve` (and, with `--baseline`, the bare TLS
//! server `edgedps bench-server`) as child processes on loopback, so their CPU time and
//! memory can be read from /proc, and alternates rounds between them: the ratio of the
//! two rates is measured on one machine in one run.
//!
//! `args.rs` the command line, `enroll.rs` the devices and their enrollments,
//! `servers.rs` the child processes, `run.rs` the devices at work, `report.rs` the
//! figures; `cutoff.rs` the `--cut-off` measurement. Here: the rounds.

mod allocator;
mod args;
pub mod broker;
pub mod cutoff;
mod enroll;
mod report;
mod run;
mod servers;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::process::ProcessStats;

pub use args::{Attestation, LoadgenArgs};
pub use enroll::{prepare, Extras};
pub use report::{Percentiles, Report};
pub use run::{connect_and_register, run_devices, SimulatedDevice};
pub use servers::{spawn_baseline, spawn_server};

use report::{print_ratio, print_report};

/// Applies the per-device options of the command line.
fn tune(mut devices: Vec<SimulatedDevice>, args: &LoadgenArgs) -> Vec<SimulatedDevice> {
    let qos = if args.qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    };
    for device in &mut devices {
        device.registrations = args.registrations_per_connection.max(1);
        device.config.tcp_nodelay = device.registrations > 1;
        device.config.request_qos = qos;
    }
    devices
}

/// `edgedps loadgen`.
pub async fn main(args: LoadgenArgs, exe: &Path) -> Result<Vec<Report>, String> {
    let dir = std::env::temp_dir().join(format!("edgedps-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if args.preload > 0 {
        let filled = Instant::now();
        let status = Command::new(exe)
            .args([
                "bench-store",
                "--enrollments",
                &args.preload.to_string(),
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("bench-store failed".into());
        }
        eprintln!(
            "preloaded {} enrollments and their registrations in {:.1} s",
            args.preload,
            filled.elapsed().as_secs_f64()
        );
    }
    if args.websocket && args.cut_off {
        return Err(
            "--websocket does not go with --cut-off (its bystanders speak MQTT over TLS)".into(),
        );
    }
    let started = Instant::now();
    let (server, devices_port, local_port, ca_path) =
        spawn_server(exe, &dir, args.websocket).await?;
    let startup = started.elapsed().as_secs_f64();
    let stats = ProcessStats::read(server.0.id());
    if args.json {
        println!(
            "{}",
            json!({"startup_seconds": startup, "preloaded": args.preload, "rss_kib": stats.rss_kib})
        );
    } else {
        println!(
            "start-up with {} stored enrollments and registrations: {startup:.2} s to listening, RSS {} KiB",
            args.preload, stats.rss_kib
        );
    }
    let server_ca = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let baseline = if args.baseline {
        Some(spawn_baseline(exe, &dir).await?)
    } else {
        None
    };
    let admin: SocketAddr = ([127, 0, 0, 1], local_port).into();
    // The custom allocator every enrollment names, answering at once.
    let custom = match args.custom_allocator {
        Some(kind) => Some(allocator::start(kind, local_port).await?),
        None => None,
    };
    let mut reports = Vec::new();
    for round in 0..args.rounds {
        let devices = prepare(
            args.attestation,
            args.devices,
            round,
            devices_port,
            Some(admin),
            &server_ca,
            Extras {
                csr: args.csr,
                cloud_hub: args.cloud_hub,
                custom: custom.as_ref().map(|c| c.definition.clone()),
            },
        )
        .await?;
        let mut devices = tune(devices, &args);
        for device in &mut devices {
            device.config.websocket = args.websocket;
        }
        let again = (args.hold && round == 0).then(|| devices.clone());
        let devices_for_cut = if args.cut_off && round == 0 {
            devices.clone()
        } else {
            Vec::new()
        };
        let report = run_devices(
            "edgedps",
            devices,
            args.concurrency,
            args.arrival_secs.map(Duration::from_secs_f64),
            Some(server.0.id()),
            !args.json,
        )
        .await;
        print_report(&report, args.json);
        reports.push(report);
        if let Some(devices) = again {
            hold_sessions(devices, args.concurrency, server.0.id(), args.json).await;
        }
        if args.cut_off && round == 0 {
            cut_off(
                &args,
                &devices_for_cut,
                devices_port,
                admin,
                &server_ca,
                server.0.id(),
            )
            .await?;
        }
        if let Some((child, port)) = &baseline {
            let devices = prepare(
                args.attestation,
                args.devices,
                round,
                *port,
                None,
                &server_ca,
                Extras {
                    csr: args.csr,
                    cloud_hub: false,
                    custom: None,
                },
            )
            .await?;
            let devices = tune(devices, &args);
            let report = run_devices(
                "baseline",
                devices,
                args.concurrency,
                args.arrival_secs.map(Duration::from_secs_f64),
                Some(child.0.id()),
                !args.json,
            )
            .await;
            print_report(&report, args.json);
            reports.push(report);
        }
    }
    if args.baseline {
        print_ratio(&reports, args.json);
    }
    drop(server);
    // The server logs its own register latency when it stops.
    let log = std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default();
    for line in log
        .lines()
        .filter(|l| l.contains("register latency") || l.contains("custom allocation latency"))
    {
        println!("server   {}", line.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reports)
}

/// `--cut-off`: see [`cutoff`]. The bystanders are 200 devices of another group.
async fn cut_off(
    args: &LoadgenArgs,
    held: &[SimulatedDevice],
    port: u16,
    admin: SocketAddr,
    server_ca: &[u8],
    pid: u32,
) -> Result<(), String> {
    let bystander_kind = match args.attestation {
        Attestation::SasGroup | Attestation::X509Group => Attestation::SasGroup,
        other => {
            return Err(format!(
                "--cut-off needs a group attestation, not {other:?}"
            ))
        }
    };
    // Round numbers name the groups: the held devices are round 0's, `load-r0`.
    let bystanders = prepare(
        bystander_kind,
        200,
        9999,
        port,
        Some(admin),
        server_ca,
        Extras::default(),
    )
    .await?;
    let report = cutoff::measure(
        held.to_vec(),
        bystanders,
        admin,
        "load-r0",
        args.concurrency,
        pid,
        !args.cut_off_unwatched,
    )
    .await?;
    cutoff::print(&report, args.json);
    Ok(())
}

/// Connects every (already registered) device again, registers (idempotent: no new
/// records), and keeps the sessions open; the server's RSS growth over the count is the
/// memory of one idle session.
async fn hold_sessions(devices: Vec<SimulatedDevice>, concurrency: usize, pid: u32, as_json: bool) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ProcessStats::read(pid).rss_kib;
    let held = connect_and_register(devices, concurrency).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ProcessStats::read(pid).rss_kib;
    let count = held.len();
    let per_session = (after.saturating_sub(before)) as f64 / count.max(1) as f64;
    if as_json {
        println!(
            "{}",
            json!({"idle_sessions": count, "rss_kib_before": before, "rss_kib_after": after, "kib_per_session": per_session})
        );
    } else {
        println!("idle     {count} sessions held: server RSS {before} -> {after} KiB = {per_session:.1} KiB per idle session");
    }
}
