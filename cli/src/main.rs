//! The `edgedps` command: the composition root. `serve` runs the broker; `loadgen`
//! drives the device side against it; `manufacture` makes device identities. The broker crate never links the device crate;
//! only this binary holds both.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// mimalloc, without transparent huge pages: 7% less CPU per registration than glibc's
/// allocator here, the same memory per device (BENCHMARKS.md, issue 11, session 7).
/// With huge pages the server started at 78 MB of RSS instead of 16.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use edgedps::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "edgedps",
    version,
    about = "MQTT broker with an Azure-DPS-compatible provisioning service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker and the provisioning service.
    Serve {
        /// TOML configuration file; without it the embedded default runs.
        #[arg(long, env = "EDGEDPS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Exit 0 when edgedps answers `GET /healthz` on its HTTP listener (`[http] bind`),
    /// 1 otherwise: a container's or service manager's health check, without curl.
    Health {
        /// The HTTP listener's address.
        #[arg(long, default_value = "127.0.0.1:8080", env = "EDGEDPS_HEALTH_ADDR")]
        addr: std::net::SocketAddr,
    },
    /// Provision many simulated devices against a fresh edgedps and report.
    Loadgen(edgedps_device::loadgen::LoadgenArgs),
    /// Operate edgedps over its operator plane: enrollments, groups, hubs, records.
    Admin(edgedps_device::admin_cli::AdminArgs),
    /// Manufacturing: a device CA, and batches of device bundles with their manifest.
    Manufacture(edgedps_device::manufacture::ManufactureArgs),
    /// Publish and subscribe through a fresh edgedps and a mosquitto, side by side.
    LoadgenBroker(edgedps_device::loadgen::broker::BrokerLoadArgs),
    /// Fill a store with enrollments and their registrations, for start-up benchmarks.
    #[command(hide = true)]
    BenchStore {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        enrollments: usize,
    },
    /// The bare TLS server the load generator compares against.
    #[command(hide = true)]
    BenchServer {
        #[arg(long)]
        bind: std::net::SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Health { addr } => match health(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgedps health: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Loadgen(args) => loadgen(args),
        Command::Admin(args) => {
            let outcome = runtime()
                .map_err(edgedps_device::admin_cli::AdminError::Refused)
                .and_then(|rt| rt.block_on(edgedps_device::admin_cli::main(args)));
            match outcome {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgedps admin: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Manufacture(args) => {
            match runtime().and_then(|rt| {
                rt.block_on(edgedps_device::manufacture::main(args))
                    .map_err(|e| e.to_string())
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgedps manufacture: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::LoadgenBroker(args) => {
            let exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("edgedps loadgen-broker: cannot find this executable: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime()
                .and_then(|rt| rt.block_on(edgedps_device::loadgen::broker::main(args, &exe)));
            match result {
                Ok(reports) if reports.iter().all(|r| r.delivered == r.expected) => {
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("edgedps loadgen-broker: some messages were not delivered");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("edgedps loadgen-broker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::BenchStore {
            data_dir,
            enrollments,
        } => match runtime().and_then(|rt| rt.block_on(bench_store(&data_dir, enrollments))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgedps bench-store: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BenchServer { bind, cert, key } => {
            match runtime().and_then(|rt| {
                rt.block_on(edgedps::baseline::run(bind, &cert, &key))
                    .map_err(|e| e.to_string())
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgedps bench-server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Writes `count` symmetric-key enrollments straight into the store of `data_dir`, each
/// with an assigned registration record.
async fn bench_store(data_dir: &std::path::Path, count: usize) -> Result<(), String> {
    use edgedps_responder::Store;
    use edgedps_topics::admin::{
        Attestation, AttestationType, Enrollment, SymmetricKeyAttestation,
    };
    let store =
        edgedps_responder::SledStore::open(&data_dir.join("store")).map_err(|e| e.to_string())?;
    use edgedps_topics::registration::{RegistrationState, RegistrationStatus};
    for i in 0..count {
        let id = format!("bulk-{i}");
        let mut registration =
            RegistrationState::new(id.clone().into(), RegistrationStatus::Assigned);
        registration.assigned_hub = Some("hub-a.example.net".into());
        registration.device_id = Some(id.clone());
        registration.etag = Some(format!("\"{i:x}\""));
        registration.created_date_time_utc = Some("2026-12-01T00:00:00Z".into());
        registration.last_updated_date_time_utc = Some("2026-12-01T00:00:00Z".into());
        store
            .put_registration(&registration)
            .map_err(|e| e.to_string())?;
        let enrollment = Enrollment {
            registration_id: id.into(),
            device_id: None,
            attestation: Attestation {
                kind: AttestationType::SymmetricKey,
                x509: None,
                symmetric_key: Some(SymmetricKeyAttestation {
                    primary_key: Some("VGhpcyBpcyBhIHRlc3Qga2V5IGZvciBkb2NzIG9ubHkhIQ==".into()),
                    secondary_key: None,
                }),
                tpm: None,
            },
            settings: Default::default(),
        };
        store
            .put_enrollment(&enrollment)
            .map_err(|e| e.to_string())?;
    }
    store.durable().await.map_err(|e| e.to_string())
}

fn loadgen(args: edgedps_device::loadgen::LoadgenArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("edgedps loadgen: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime().and_then(|rt| rt.block_on(edgedps_device::loadgen::main(args, &exe)));
    match result {
        Ok(reports)
            if reports
                .iter()
                .all(|r| r.errors.keys().all(|k| k.starts_with("retried"))) =>
        {
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("edgedps loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit of open files to the hard one (each connection is one), and
/// warns when even that is below the connection limit.
fn open_files(max_connections: usize) {
    // Listeners, the store's files, logs: a margin over the connections.
    let wanted = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            open_files = got,
            max_connections,
            "the process may open fewer files than limits.max_connections needs: connections beyond about {} will be refused; raise LimitNOFILE (systemd) or the container's nofile ulimit, or lower limits.max_connections",
            got.saturating_sub(256)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// `GET /healthz` within 2 s: 200 is healthy.
fn health(addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let limit = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot ask {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status_line = status_line.lines().next().unwrap_or_default();
    if status_line.split(' ').nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("{addr} answered `{status_line}`"))
    }
}

fn serve(file: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(file.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("edgedps: {e}");
            return ExitCode::from(2);
        }
    };
    if file.is_none() {
        eprintln!(
            "edgedps: no --config (nor EDGEDPS_CONFIG): running on the embedded default configuration (docs/configuration.md, \"The embedded default\"), data in {}",
            config.data_dir.display()
        );
    }
    let _log = init_logging(&config);
    open_files(config.limits.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("edgedps: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match edgedps::start(config).await {
            Ok(running) => running,
            Err(e) => {
                tracing::error!(error = %e, "edgedps could not start");
                eprintln!("edgedps: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(ca) = &running.dev_ca {
            tracing::info!(ca = %ca.display(), "devices trust the development server certificate through this CA");
        }
        notify_service_manager("READY=1");
        wait_for_signal().await;
        notify_service_manager("STOPPING=1");
        tracing::info!("shutting down: no new connections; sessions finish what they are doing");
        let latency = running.responder.register_latency();
        tracing::info!(
            registrations = latency.count,
            p50_us = latency.p50_us,
            p90_us = latency.p90_us,
            p99_us = latency.p99_us,
            max_us = latency.max_us,
            "register latency (server side, request to durable answer)"
        );
        let custom = running.responder.custom_allocation_latency();
        if custom.count > 0 {
            tracing::info!(
                allocations = custom.count,
                p50_us = custom.p50_us,
                p90_us = custom.p90_us,
                p99_us = custom.p99_us,
                max_us = custom.max_us,
                "custom allocation latency (server side, request to the allocator's answer)"
            );
        }
        let stopped = running.shutdown().await;
        if stopped.left_open > 0 {
            tracing::warn!(
                connections = stopped.left_open,
                "connections still open at the shutdown timeout were dropped"
            );
        }
        match stopped.flushed {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "the store could not be flushed at shutdown");
                ExitCode::FAILURE
            }
        }
    })
}

/// Tells systemd (`Type=notify`, `$NOTIFY_SOCKET`) how the service is: `READY=1` once
/// every listener is bound, `STOPPING=1` at the shutdown. Nothing without the variable.
fn notify_service_manager(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = path.as_bytes();
        // `@name` is an abstract socket.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs go to stderr through a writer thread: the tasks that log (one audit line per
/// CONNECT) only queue the line, and the thread writes lines in batches while busy and
/// flushes whenever its queue is empty. Keep the guard: dropping it flushes the rest.
fn init_logging(config: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},rumqttd=warn", config.log.level)))
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Lossless: when the queue is full a logging task waits rather than drop a line.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
    guard
}
