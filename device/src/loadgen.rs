//! `edgedps loadgen`: many simulated devices provisioning at once, with a report of
//! throughput, latency percentiles, errors and the server's CPU and memory.
//!
//! By default it starts its own `edgedps serve` (and, with `--baseline`, the bare TLS
//! server `edgedps bench-server`) as child processes on loopback, so their CPU time and
//! memory can be read from /proc, and alternates rounds between them: the ratio of the
//! two rates is measured on one machine in one run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::provision::{self, DeviceAuth, DeviceConfig, DeviceError};

/// Command-line arguments of `edgedps loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Devices per round.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Devices provisioning at the same time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// sas (individual), sas-group, x509 (individual), x509-group.
    #[arg(long, default_value = "sas")]
    pub attestation: Attestation,
    /// Rounds against edgedps (and as many against the baseline with --baseline).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Alternate every round with one against the bare TLS server.
    #[arg(long)]
    pub baseline: bool,
    /// Storm: start all devices spread evenly over this many seconds, no concurrency cap.
    #[arg(long)]
    pub arrival_secs: Option<f64>,
    /// Registrations per connection: 1 is a new TLS connection per registration; more
    /// re-register (idempotently) on the same connection, measuring the register path alone.
    #[arg(long, default_value_t = 1)]
    pub registrations_per_connection: u32,
    /// QoS of the register requests (0 or 1).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// After the first round, connect every device again and keep the sessions open to
    /// measure the server memory of an idle session.
    #[arg(long)]
    pub hold: bool,
    /// After the first round, hold every device of it connected, then disable its group
    /// while a bystander group keeps registering; report how fast the sessions close and
    /// what it costs the others (group attestations only).
    #[arg(long)]
    pub cut_off: bool,
    /// With --cut-off: do not watch the held connections close (the load generator's own
    /// work on them competes with the bystanders for the same cores).
    #[arg(long)]
    pub cut_off_unwatched: bool,
    /// Before starting the server, fill its store with this many enrollments and report
    /// how long the server takes to start.
    #[arg(long, default_value_t = 0)]
    pub preload: usize,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attestation {
    Sas,
    SasGroup,
    X509,
    X509Group,
}

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

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
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

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
}

impl ProcessStats {
    pub fn read(pid: u32) -> ProcessStats {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat: 11 and 12 after the name.
        let cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        ProcessStats {
            cpu_seconds,
            rss_kib,
        }
    }
}

/// A child process killed on drop.
pub struct ChildProcess(pub Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // SIGTERM first, so a profiler wrapping the server can write its output.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {port} after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Starts `edgedps serve` with a scratch data directory; returns it, its device and
/// local ports, and the CA of its development certificate.
pub async fn spawn_server(
    exe: &Path,
    dir: &Path,
) -> Result<(ChildProcess, u16, u16, PathBuf), String> {
    let (devices, local) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let config = format!(
        "id_scope = \"0ne00000001\"\ndata_dir = \"{}\"\n[listeners.devices]\nbind = \"127.0.0.1:{devices}\"\n[listeners.local]\nbind = \"127.0.0.1:{local}\"\n[log]\nlevel = \"info\"\n",
        dir.join("data").display()
    );
    let path = dir.join("edgedps.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("edgedps.log")).map_err(|e| e.to_string())?;
    // EDGEDPS_LOADGEN_WRAPPER runs the server under a profiler, e.g.
    // "valgrind --tool=massif --massif-out-file=/tmp/massif.out".
    let wrapper = std::env::var("EDGEDPS_LOADGEN_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    let child = command
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let child = ChildProcess(child);
    wait_for_port(devices).await?;
    wait_for_port(local).await?;
    Ok((child, devices, local, dir.join("data/tls/dev-ca.pem")))
}

/// Starts `edgedps bench-server` with the same certificate as the server in `dir`.
pub async fn spawn_baseline(exe: &Path, dir: &Path) -> Result<(ChildProcess, u16), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let tls = dir.join("data/tls");
    let child = Command::new(exe)
        .args([
            "bench-server",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--cert",
        ])
        .arg(tls.join("server-fullchain.pem"))
        .arg("--key")
        .arg(tls.join("server.key"))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the baseline: {e}"))?;
    let child = ChildProcess(child);
    wait_for_port(port).await?;
    Ok((child, port))
}

/// Makes the devices of a round and enrolls them over the operator topics.
pub async fn prepare(
    attestation: Attestation,
    count: usize,
    round: usize,
    port: u16,
    admin: Option<SocketAddr>,
    server_ca: &[u8],
) -> Result<Vec<SimulatedDevice>, String> {
    let scope = "0ne00000001";
    let mut enrollments: Vec<(String, serde_json::Value)> = Vec::new();
    let mut devices = Vec::with_capacity(count);
    let id = |i: usize| format!("load-r{round}-{i}");
    let shared_sas_tls = crate::tls::client_config(server_ca, None).map_err(|e| e.to_string())?;
    match attestation {
        Attestation::Sas | Attestation::SasGroup => {
            let group_key = random_key();
            if attestation == Attestation::SasGroup {
                enrollments.push((
                    format!("dps/enrollment-groups/load-r{round}"),
                    json!({"enrollmentGroupId": format!("load-r{round}"),
                        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key}}}),
                ));
            }
            for i in 0..count {
                let key = if attestation == Attestation::SasGroup {
                    edgedps_policies::sas::derive_device_key(&group_key, &id(i))
                        .map_err(|e| e.to_string())?
                } else {
                    let key = random_key();
                    enrollments.push((
                        format!("dps/enrollments/{}", id(i)),
                        json!({"registrationId": id(i),
                            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}}),
                    ));
                    key
                };
                let config = DeviceConfig::new(
                    "localhost",
                    port,
                    scope,
                    &id(i),
                    DeviceAuth::SymmetricKey { key },
                    server_ca.to_vec(),
                );
                devices.push(SimulatedDevice {
                    config,
                    tls: shared_sas_tls.clone(),
                    registrations: 1,
                });
            }
        }
        Attestation::X509 | Attestation::X509Group => {
            let ca = crate::manufacture::SigningCa::new(&format!("load CA r{round}"))
                .map_err(|e| e.to_string())?;
            if attestation == Attestation::X509Group {
                enrollments.push((
                    format!("dps/enrollment-groups/load-r{round}"),
                    json!({"enrollmentGroupId": format!("load-r{round}"),
                        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca.pem()}}}}}),
                ));
            }
            for i in 0..count {
                let leaf = ca.device(&id(i)).map_err(|e| e.to_string())?;
                if attestation == Attestation::X509 {
                    enrollments.push((
                        format!("dps/enrollments/{}", id(i)),
                        json!({"registrationId": id(i), "attestation": {"type": "x509",
                            "x509": {"clientCertificates": {"primary": {"sha256Thumbprint": leaf.thumbprint}}}}}),
                    ));
                }
                let auth = DeviceAuth::X509 {
                    chain_pem: leaf.cert_pem.into_bytes(),
                    key_pem: leaf.key_pem.into_bytes(),
                };
                let config =
                    DeviceConfig::new("localhost", port, scope, &id(i), auth, server_ca.to_vec());
                let tls = provision::tls_config(&config).map_err(|e| e.to_string())?;
                devices.push(SimulatedDevice {
                    config,
                    tls,
                    registrations: 1,
                });
            }
        }
    }
    if let Some(admin) = admin {
        crate::admin::write_all(admin, &enrollments)
            .await
            .map_err(|e| e.to_string())?;
        crate::admin::write_all(
            admin,
            &[(
                "dps/hubs/hub-a.example.net".to_string(),
                json!({"allocationWeight": 1}),
            )],
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(devices)
}

fn random_key() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

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
            "preloaded {} enrollments in {:.1} s",
            args.preload,
            filled.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let (server, devices_port, local_port, ca_path) = spawn_server(exe, &dir).await?;
    let startup = started.elapsed().as_secs_f64();
    let stats = ProcessStats::read(server.0.id());
    if args.json {
        println!(
            "{}",
            json!({"startup_seconds": startup, "preloaded": args.preload, "rss_kib": stats.rss_kib})
        );
    } else {
        println!(
            "start-up with {} stored enrollments: {startup:.2} s to listening, RSS {} KiB",
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
    let mut reports = Vec::new();
    for round in 0..args.rounds {
        let devices = prepare(
            args.attestation,
            args.devices,
            round,
            devices_port,
            Some(admin),
            &server_ca,
        )
        .await?;
        let devices = tune(devices, &args);
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
    for line in log.lines().filter(|l| l.contains("register latency")) {
        println!("server   {}", line.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reports)
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

/// `--cut-off`: see [`crate::cutoff`]. The bystanders are 200 devices of another group.
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
    let bystanders = prepare(bystander_kind, 200, 9999, port, Some(admin), server_ca).await?;
    let report = crate::cutoff::measure(
        held.to_vec(),
        bystanders,
        admin,
        "load-r0",
        args.concurrency,
        pid,
        !args.cut_off_unwatched,
    )
    .await?;
    crate::cutoff::print(&report, args.json);
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

fn print_report(r: &Report, as_json: bool) {
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
fn print_ratio(reports: &[Report], as_json: bool) {
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
