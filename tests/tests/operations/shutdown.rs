//! Graceful shutdown of the real binary: SIGTERM (and SIGINT) during a registration
//! storm. The process stops accepting, answers what is in flight, closes MQTT 5
//! sessions with DISCONNECT 0x8B (server shutting down), flushes and exits 0 within
//! `shutdown_timeout_seconds`; no device waits past it; every device told `assigned` is
//! in the store after a restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgedps_policies::sas::derive_device_key;
use edgedps_responder::Store;
use edgedps_tests::*;

const TIMEOUT_SECONDS: u64 = 4;

/// Sends `signal` (`TERM`, `INT`) to the process and waits for its exit: its status
/// and how long it took.
fn stop(process: &mut Process, signal: &str) -> (std::process::ExitStatus, Duration) {
    let sent = Instant::now();
    let killed = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(process.child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(killed.success());
    loop {
        if let Some(status) = process.child.try_wait().expect("wait") {
            return (status, sent.elapsed());
        }
        assert!(
            sent.elapsed() < Duration::from_secs(TIMEOUT_SECONDS + 5),
            "edgedps did not exit within {TIMEOUT_SECONDS} s of SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TLS connection to the device listener, its handshake done.
async fn tls_connect(port: u16) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// An MQTT 5 device session (SAS), its CONNACK received.
async fn mqtt5_device(
    port: u16,
    id: &str,
    key: &str,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let config = device_config(port, id, sas(key));
    let token = edgedps_policies::sas::sign(key, ID_SCOPE, id, edgedps_responder::unix_now() + 600)
        .unwrap();
    let mut options = rumqttc::v5::MqttOptions::new(id, "localhost", port);
    options.set_credentials(config.username(), token);
    let tls = edgedps_device::tls::client_config(&config.server_ca_pem, None).unwrap();
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 4);
    match eventloop.poll().await {
        Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => {}
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
    (client, eventloop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_registration_storm_answers_flushes_and_exits_0_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let https_port = edgedps_device::process::free_port().unwrap();
    let extra = format!(
        "shutdown_timeout_seconds = {TIMEOUT_SECONDS}\n[listeners.https]\nbind = \"127.0.0.1:{https_port}\"\n"
    );
    let mut process = Process::start(dir.path(), devices_port, local_port, &extra).await;
    let mut operator = Operator::connect(local_port).await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/storm",
            symmetric_group("storm", &group_key),
        )
        .await;
    let idle_key = operator.enroll("storm-idle").await;
    // An idle MQTT 5 device session: told why it closes.
    let (_idle_client, mut idle) = mqtt5_device(devices_port, "storm-idle", &idle_key).await;

    // Connections that asked nothing hold no one up: one silent TCP connection, one
    // TLS session that never sends its CONNECT.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", devices_port))
        .await
        .unwrap();
    let _mute = tls_connect(devices_port).await;
    // An idle keep-alive HTTPS connection, and a device session over WebSocket.
    let _api = edgedps_tests::dps_http::DpsHttp::connect(https_port, None).await;
    let mut over_websocket = device_config(https_port, "storm-idle", sas(&idle_key));
    over_websocket.websocket = true;
    let (_ws_client, mut ws) = edgedps_device::provision::connect(&over_websocket)
        .await
        .expect("connects over WebSocket");
    let assigned = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let finished_at = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..400 {
        let id = format!("storm-{i}");
        let key = derive_device_key(&group_key, &id).unwrap();
        let config = device_config(devices_port, &id, sas(&key));
        let (assigned, done, finished_at) = (assigned.clone(), done.clone(), finished_at.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = edgedps_device::provision::register(&config, None).await;
            if matches!(&outcome, Ok(o) if o.status_word() == Some("assigned")) {
                assigned.lock().unwrap().insert(id);
            }
            done.fetch_add(1, Ordering::SeqCst);
            finished_at.lock().unwrap().push(Instant::now());
        }));
    }
    // SIGTERM once the storm is under way.
    let started = Instant::now();
    while done.load(Ordering::SeqCst) < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the storm did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let assigned_at_signal = assigned.lock().unwrap().len();
    let signalled = Instant::now();
    let (status, took) = tokio::task::block_in_place(|| stop(&mut process, "TERM"));
    let log = std::fs::read_to_string(dir.path().join("edgedps.log")).unwrap_or_default();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(
        took < Duration::from_secs(TIMEOUT_SECONDS / 2),
        "took {took:?}: something waited for its deadline"
    );
    assert!(log.contains("shut down"), "{log}");
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("every device's registration ends")
            .expect("task");
    }
    let latest = finished_at.lock().unwrap().iter().max().copied();
    let waited = latest.map(|t| t.saturating_duration_since(signalled));
    assert!(
        waited.is_some_and(|w| w <= Duration::from_secs(TIMEOUT_SECONDS + 1)),
        "a device waited {waited:?} after SIGTERM"
    );
    let idle_closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Err(e) = idle.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the idle session is closed");
    assert!(
        matches!(
            idle_closed,
            rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::ServerShuttingDown,
                ..
            })
        ),
        "the idle MQTT 5 session: {idle_closed:?}"
    );
    let ws_closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if ws.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ws_closed.is_ok(), "the WebSocket session is closed");
    let assigned = assigned.lock().unwrap().clone();
    assert!(
        assigned.len() > assigned_at_signal,
        "registrations in flight at the SIGTERM were answered: {} then {}",
        assigned_at_signal,
        assigned.len()
    );
    assert!(
        assigned.len() < 400,
        "the SIGTERM fell outside the storm: {} assigned",
        assigned.len()
    );

    // Restarted, and stopped by SIGINT this time: every device told `assigned` is there.
    let mut process = Process::start(dir.path(), devices_port, local_port, &extra).await;
    let (status, _) = tokio::task::block_in_place(|| stop(&mut process, "INT"));
    assert!(status.success(), "exit status after SIGINT {status}");
    let store =
        edgedps_responder::SledStore::open(&dir.path().join("data/store")).expect("store opens");
    let stored: BTreeSet<String> = store
        .registrations()
        .expect("registrations readable")
        .iter()
        .filter(|r| r.status == "assigned")
        .map(|r| r.registration_id.key().into_owned())
        .collect();
    let lost: Vec<_> = assigned.difference(&stored).collect();
    assert!(lost.is_empty(), "told assigned, not stored: {lost:?}");
    eprintln!(
        "SIGTERM with {assigned_at_signal} assigned: {} assigned in all, exit in {took:?}",
        assigned.len()
    );
}

/// `edgedps serve` with `config` (a file's text, or none) and `env`: its exit status and
/// stderr, for a start that must fail.
fn serve_failing(config: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(edgedps_binary());
    command.arg("serve");
    if let Some(text) = config {
        let path = dir.path().join("edgedps.toml");
        std::fs::write(&path, text).unwrap();
        command.arg("--config").arg(path);
    }
    command
        .env("EDGEDPS__DATA_DIR", dir.path().join("data"))
        .envs(env.iter().copied());
    let output = command.output().expect("edgedps runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A start that must fail: its name, the file's text, the variables, the key named.
type BadStart<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_stops_the_start_naming_the_key_and_none_runs_the_default() {
    let cases: [BadStart; 5] = [
        (
            "an unknown key",
            Some("id_scope = \"0ne00000001\"\nshutdown_timeout = 5\n"),
            &[],
            "shutdown_timeout",
        ),
        (
            "a value out of range",
            Some("shutdown_timeout_seconds = 0\n"),
            &[],
            "shutdown_timeout_seconds",
        ),
        (
            "a variable out of range",
            None,
            &[("EDGEDPS__LIMITS__MAX_PACKET_SIZE", "10")],
            "limits.max_packet_size",
        ),
        (
            "a WebSocket listener with a certificate but no key",
            Some("[listeners.websocket]\nbind = \"127.0.0.1:0\"\ntls_cert = \"/x.pem\"\n"),
            &[],
            "listeners.websocket.tls_cert",
        ),
        (
            "a missing file",
            None,
            &[("EDGEDPS_CONFIG", "/nonexistent/edgedps.toml")],
            "/nonexistent/edgedps.toml",
        ),
    ];
    for (name, config, env, key) in cases {
        let (code, stderr) = tokio::task::block_in_place(|| serve_failing(config, env));
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(stderr.contains(key), "{name}: no `{key}` in: {stderr}");
    }

    // No configuration at all: the embedded default runs, says so, answers its health
    // check, and stops on SIGTERM. Its listeners moved to free ports by variables.
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let http_port = edgedps_device::process::free_port().unwrap();
    let bind = |port: u16| format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("edgedps.log")).unwrap();
    let child = std::process::Command::new(edgedps_binary())
        .arg("serve")
        .env_remove("EDGEDPS_CONFIG")
        .env("EDGEDPS__DATA_DIR", dir.path().join("data"))
        .env("EDGEDPS__LISTENERS__DEVICES__BIND", bind(devices_port))
        .env("EDGEDPS__LISTENERS__LOCAL__BIND", bind(local_port))
        .env("EDGEDPS__HTTP__BIND", bind(http_port))
        .stderr(log)
        .spawn()
        .expect("edgedps starts");
    let mut process = Process {
        child: edgedps_device::process::ChildProcess(child),
        devices_port,
        local_port,
    };
    edgedps_device::process::wait_for_port(http_port)
        .await
        .expect("the HTTP listener");
    edgedps_device::process::wait_for_port(devices_port)
        .await
        .expect("the device listener");
    let health = |port: u16| {
        std::process::Command::new(edgedps_binary())
            .args(["health", "--addr", &bind(port)])
            .output()
            .expect("edgedps health runs")
    };
    let healthy = tokio::task::block_in_place(|| health(http_port));
    assert!(healthy.status.success(), "{healthy:?}");
    let nobody =
        tokio::task::block_in_place(|| health(edgedps_device::process::free_port().unwrap()));
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("cannot connect"),
        "{nobody:?}"
    );
    let (status, _) = tokio::task::block_in_place(|| stop(&mut process, "TERM"));
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(dir.path().join("edgedps.log")).unwrap_or_default();
    assert!(log.contains("running on the embedded default"), "{log}");
}

/// Under systemd (`Type=notify`): `READY=1` on `$NOTIFY_SOCKET` once the listeners are
/// bound, `STOPPING=1` at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_manager_is_told_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (devices_port, local_port) = free_ports();
    let socket_env = socket_path.display().to_string();
    let mut process = Process::start_env(
        dir.path(),
        devices_port,
        local_port,
        "",
        &[("NOTIFY_SOCKET", &socket_env)],
    )
    .await;
    let mut message = [0u8; 64];
    let n = tokio::task::block_in_place(|| socket.recv(&mut message)).expect("READY=1 sent");
    assert_eq!(&message[..n], b"READY=1");
    tokio::net::TcpStream::connect(("127.0.0.1", devices_port))
        .await
        .expect("ready means listening");
    let (status, _) = tokio::task::block_in_place(|| stop(&mut process, "TERM"));
    assert!(status.success());
    let n = socket.recv(&mut message).expect("STOPPING=1 sent");
    assert_eq!(&message[..n], b"STOPPING=1");
}
