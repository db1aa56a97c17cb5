//! Test harness for the end-to-end tests: PKI generated once per test binary, edgedps
//! started in process on port 0 (or as the real binary), an operator client on the
//! local listener, and device clients on the TLS listener.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;

pub use edgedps_device::provision::{DeviceAuth, DeviceConfig, Outcome};

pub mod live;

pub const ID_SCOPE: &str = "0ne00000001";

/// A CA that can sign certificates.
pub struct Ca {
    pub pem: String,
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate with its key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn root(name: &str) -> Ca {
        Self::make(name, None)
    }

    pub fn intermediate(&self, name: &str) -> Ca {
        Self::make(name, Some(self))
    }

    fn make(name: &str, parent: Option<&Ca>) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = match parent {
            Some(p) => params.signed_by(&key, &p.issuer),
            None => params.self_signed(&key),
        }
        .expect("sign");
        Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A device (client) certificate with subject CN `cn`.
    pub fn device(&self, cn: &str) -> Identity {
        self.leaf(cn, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })
    }

    /// A certificate with custom parameters.
    pub fn leaf(&self, cn: &str, adjust: impl FnOnce(&mut CertificateParams)) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        adjust(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A PEM revocation list of this CA that revokes `revoked` (PEM certificates).
    pub fn crl(&self, revoked: &[&Identity]) -> String {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|identity| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&identity.serial()),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .expect("CRL")
        .pem()
        .expect("CRL PEM")
    }

    /// The TLS server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Identity {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity {
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Identity {
    /// The certificate's serial number, as its DER integer bytes.
    pub fn serial(&self) -> Vec<u8> {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).expect("certificate PEM");
        let cert = pem.parse_x509().expect("certificate");
        cert.raw_serial().to_vec()
    }

    /// SHA-256 of the certificate, upper-case hex.
    pub fn thumbprint(&self) -> String {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).expect("certificate PEM");
        edgedps_policies::x509::thumbprint(&pem.contents)
    }
}

/// A self-signed device certificate (no CA at all).
pub fn self_signed(cn: &str) -> Identity {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("sign");
    Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The PKI of one test binary.
pub struct Pki {
    pub server_ca: Ca,
    pub server: Identity,
    pub device_root: Ca,
    pub device_intermediate: Ca,
    pub rogue_root: Ca,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let server_ca = Ca::root("edgedps test server CA");
        let server = server_ca.server();
        let device_root = Ca::root("edgedps test device root");
        let device_intermediate = device_root.intermediate("edgedps test device intermediate");
        let rogue_root = Ca::root("edgedps test device root");
        Pki {
            server_ca,
            server,
            device_root,
            device_intermediate,
            rogue_root,
        }
    })
}

/// An edgedps started in process with its own data directory.
pub struct Server {
    pub running: edgedps::Running,
    pub dir: tempfile::TempDir,
    pub devices_port: u16,
    pub local_port: u16,
}

/// Writes the server certificate into `dir` and returns a config using it, ports 0.
pub fn test_config(dir: &Path) -> edgedps::Config {
    let pki = pki();
    let cert = dir.join("server-fullchain.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &pki.server.cert_pem).expect("write cert");
    std::fs::write(&key, &pki.server.key_pem).expect("write key");
    let mut config = edgedps::Config {
        data_dir: dir.join("data"),
        id_scope: ID_SCOPE.into(),
        ..Default::default()
    };
    if let Some(devices) = config.listeners.devices.as_mut() {
        devices.bind = "127.0.0.1:0".parse().expect("addr");
        devices.tls_cert = Some(cert);
        devices.tls_key = Some(key);
    }
    if let Some(local) = config.listeners.local.as_mut() {
        local.bind = "127.0.0.1:0".parse().expect("addr");
    }
    config.hubs = vec![edgedps::config::HubConfig {
        host_name: "hub-a.example.net".into(),
        allocation_weight: 1,
        apply_allocation_policy: true,
        location: None,
    }];
    config
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut edgedps::Config)) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let running = edgedps::start(config).await.expect("edgedps starts");
        let devices_port = running.devices_addr.map(|a| a.port()).unwrap_or_default();
        let local_port = running.local_addr.map(|a| a.port()).unwrap_or_default();
        Server {
            running,
            dir,
            devices_port,
            local_port,
        }
    }

    pub async fn operator(&self) -> Operator {
        Operator::connect(self.local_port).await
    }

    pub fn device(&self, registration_id: &str, auth: DeviceAuth) -> DeviceConfig {
        device_config(self.devices_port, registration_id, auth)
    }
}

pub fn device_config(port: u16, registration_id: &str, auth: DeviceAuth) -> DeviceConfig {
    DeviceConfig::new(
        "localhost",
        port,
        ID_SCOPE,
        registration_id,
        auth,
        pki().server_ca.pem.clone().into_bytes(),
    )
}

pub fn sas(key: &str) -> DeviceAuth {
    DeviceAuth::SymmetricKey { key: key.into() }
}

pub fn x509(identity: &Identity, chain: &[&Ca]) -> DeviceAuth {
    let mut chain_pem = identity.cert_pem.clone();
    for ca in chain {
        chain_pem.push_str(&ca.pem);
    }
    DeviceAuth::X509 {
        chain_pem: chain_pem.into_bytes(),
        key_pem: identity.key_pem.clone().into_bytes(),
    }
}

impl Server {
    /// Enrolls a symmetric-key group `group` and registers `count` of its devices at
    /// once; returns each device's outcome.
    pub async fn register_group_devices(
        &self,
        operator: &mut Operator,
        group: &str,
        count: usize,
    ) -> Vec<Outcome> {
        let group_key = new_key();
        operator
            .put(
                &format!("dps/enrollment-groups/{group}"),
                symmetric_group(group, &group_key),
            )
            .await;
        let mut tasks = Vec::new();
        for i in 0..count {
            let id = format!("{group}-{i}");
            let key = edgedps_policies::sas::derive_device_key(&group_key, &id).expect("key");
            let config = self.device(&id, sas(&key));
            tasks.push(tokio::spawn(async move {
                edgedps_device::provision::register(&config, None).await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("task").expect("registers"));
        }
        outcomes
    }
}

/// An MQTT client with the operator role on the local listener.
pub struct Operator {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

impl Operator {
    pub async fn connect(port: u16) -> Operator {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut options = MqttOptions::new(format!("operator-{n}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        edgedps_device::provision::wait_for(&mut eventloop, "CONNACK", |p| {
            matches!(p, Packet::ConnAck(_))
        })
        .await
        .expect("operator connects");
        client
            .subscribe("dps/admin/results/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        edgedps_device::provision::wait_for(&mut eventloop, "SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await
        .expect("suback");
        Operator { client, eventloop }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("subscribe");
        edgedps_device::provision::wait_for(&mut self.eventloop, "SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await
        .expect("suback");
    }

    /// Enrolls `registration_id` with a new symmetric key and returns the key.
    pub async fn enroll(&mut self, registration_id: &str) -> String {
        let key = new_key();
        self.put(
            &format!("dps/enrollments/{registration_id}"),
            symmetric_enrollment(registration_id, &key),
        )
        .await;
        key
    }

    /// Publishes a retained record and returns the result edgedps reports for it.
    pub async fn write(&mut self, topic: &str, body: &[u8]) -> Value {
        let result = self.write_raw(topic, body).await;
        serde_json::from_slice(&result).expect("result is JSON")
    }

    /// Publishes a retained record and returns the result's bytes as published.
    pub async fn write_raw(&mut self, topic: &str, body: &[u8]) -> Vec<u8> {
        let result_topic = topic.replacen("dps/", "dps/admin/results/", 1);
        self.publish_for_result(topic, body, &result_topic).await
    }

    /// Retires a device (`dps/admin/retire/{id}`) and returns the result.
    pub async fn retire(&mut self, registration_id: &str, body: &[u8]) -> Value {
        let result = self
            .publish_for_result(
                &format!("dps/admin/retire/{registration_id}"),
                body,
                &format!("dps/admin/results/retire/{registration_id}"),
            )
            .await;
        serde_json::from_slice(&result).expect("result is JSON")
    }

    /// Publishes (retained) and returns the first message on `result_topic`.
    pub async fn publish_for_result(
        &mut self,
        topic: &str,
        body: &[u8],
        result_topic: &str,
    ) -> Vec<u8> {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, body.to_vec())
            .await
            .expect("publish");
        let packet = edgedps_device::provision::wait_for(
            &mut self.eventloop,
            "admin result",
            |p| matches!(p, Packet::Publish(p) if p.topic == result_topic),
        )
        .await
        .expect("admin result arrives");
        match packet {
            Packet::Publish(p) => p.payload.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Writes a record and asserts it was accepted.
    pub async fn put(&mut self, topic: &str, body: Value) -> Value {
        let result = self
            .write(topic, &serde_json::to_vec(&body).expect("json"))
            .await;
        assert_eq!(result["ok"], true, "write to {topic} refused: {result}");
        result
    }

    pub async fn next_publish(&mut self, topic_prefix: &str) -> Option<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p))))
                    if p.topic.starts_with(topic_prefix) =>
                {
                    return Some((p.topic, p.payload.to_vec()))
                }
                Ok(Ok(_)) => {}
                _ => return None,
            }
        }
    }
}

pub fn symmetric_enrollment(registration_id: &str, key: &str) -> Value {
    serde_json::json!({
        "registrationId": registration_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}
    })
}

pub fn x509_enrollment(registration_id: &str, cert_pem: &str) -> Value {
    serde_json::json!({
        "registrationId": registration_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert_pem}}}}
    })
}

pub fn symmetric_group(group_id: &str, key: &str) -> Value {
    serde_json::json!({
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}
    })
}

pub fn x509_group(group_id: &str, ca_pem: &str) -> Value {
    serde_json::json!({
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca_pem}}}}
    })
}

/// A fresh random base64 key of 32 bytes.
pub fn new_key() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("random bytes");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The `edgedps` binary of this workspace, built (once per test binary) if needed.
pub fn edgedps_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_edgedps).clone()
}

fn build_edgedps() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/{profile}/deps/test-binary -> target/{profile}/edgedps
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let binary = profile_dir.join("edgedps");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.args(["build", "-p", "edgedps-cli", "--bin", "edgedps"]);
    // `cargo test` sets the package's variables for the test; a build script that
    // watches one (ring watches CARGO_MANIFEST_DIR) would rebuild half the tree, and the
    // next `cargo test` would rebuild it back.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name.as_ref(),
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command.status().expect("cargo build runs");
    assert!(status.success(), "building edgedps failed");
    binary
}

/// Two ports free right now on 127.0.0.1 (for the real binary, which needs them in its
/// configuration before it starts).
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    )
}

/// The real `edgedps serve` binary, killed when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub devices_port: u16,
    pub local_port: u16,
}

impl Process {
    /// Starts `edgedps serve --config {dir}/edgedps.toml` and waits for both listeners.
    pub async fn start(dir: &Path, devices_port: u16, local_port: u16, extra: &str) -> Process {
        Process::start_env(dir, devices_port, local_port, extra, &[]).await
    }

    /// As [`Process::start`], with environment variables for the process. The log goes
    /// to `{dir}/edgedps.log`, overwritten at each start.
    pub async fn start_env(
        dir: &Path,
        devices_port: u16,
        local_port: u16,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Process {
        let pki = pki();
        std::fs::write(dir.join("server-fullchain.pem"), &pki.server.cert_pem).expect("cert");
        std::fs::write(dir.join("server.key"), &pki.server.key_pem).expect("key");
        let config = format!(
            r#"id_scope = "{ID_SCOPE}"
data_dir = "{data}"
{extra}
[listeners.devices]
bind = "127.0.0.1:{devices_port}"
tls_cert = "{dir}/server-fullchain.pem"
tls_key = "{dir}/server.key"
[listeners.local]
bind = "127.0.0.1:{local_port}"
[[hubs]]
host_name = "hub-a.example.net"
"#,
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        let path = dir.join("edgedps.toml");
        std::fs::write(&path, config).expect("config");
        let log = std::fs::File::create(dir.join("edgedps.log")).expect("log");
        let child = std::process::Command::new(edgedps_binary())
            .args(["serve", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("edgedps starts");
        let mut process = Process {
            child,
            devices_port,
            local_port,
        };
        for port in [devices_port, local_port] {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "edgedps did not listen on {port}: {}",
                    std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Another process may hold the port; make sure the listener is ours.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!(
                "edgedps exited ({status}): {}",
                std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default()
            );
        }
        process
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to the device listener with raw credentials (no client certificate) and
/// returns the CONNACK refusal code, or `None` when the connection was accepted.
pub async fn connack_refusal(
    port: u16,
    client_id: &str,
    username: &str,
    password: &str,
) -> Option<rumqttc::ConnectReturnCode> {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_credentials(username, password);
    let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
        .expect("client TLS");
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
        Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => Some(code),
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => None,
        other => panic!("{client_id}: neither accepted nor refused: {other:?}"),
    }
}

/// `value` as CBOR (PROTOCOL C).
pub fn cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("CBOR");
    out
}

/// A CBOR body read back as a JSON document; panics when it is not CBOR.
pub fn from_cbor(bytes: &[u8]) -> Value {
    ciborium::from_reader(bytes).expect("a CBOR body")
}

/// A device that was never involved provisions normally: the check that follows every
/// refused attempt in the attack matrix.
pub async fn bystander_provisions(server: &Server, operator: &mut Operator) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("bystander-{}-{n}", server.local_port);
    let key = operator.enroll(&id).await;
    let outcome = edgedps_device::provision::register(&server.device(&id, sas(&key)), None)
        .await
        .expect("the bystander registers");
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
}

/// A device's answer on `$dps/registrations/res/...`.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u32>,
    pub body: Vec<u8>,
}

impl Server {
    /// A device connected (MQTT 3.1.1, SAS with `key`) and subscribed to its responses.
    pub async fn listening(&self, registration_id: &str, key: &str) -> (AsyncClient, EventLoop) {
        let (client, eventloop) =
            edgedps_device::provision::connect(&self.device(registration_id, sas(key)))
                .await
                .expect("the device connects");
        client
            .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        (client, eventloop)
    }

    /// MQTT 5 options for a device with a SAS token of `key`, over TLS to the device
    /// listener.
    pub fn mqtt5_options(&self, registration_id: &str, key: &str) -> rumqttc::v5::MqttOptions {
        let config = self.device(registration_id, sas(key));
        let token = edgedps_policies::sas::sign(
            key,
            ID_SCOPE,
            registration_id,
            edgedps_responder::unix_now() + 600,
        )
        .expect("token");
        let mut options =
            rumqttc::v5::MqttOptions::new(registration_id, "localhost", self.devices_port);
        options.set_credentials(config.username(), token);
        let tls =
            edgedps_device::tls::client_config(&config.server_ca_pem, None).expect("client TLS");
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        options
    }
}

/// Publishes a DPS request on an open device connection and waits for its answer.
pub async fn ask(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    body: Vec<u8>,
) -> Answer {
    client
        .publish(topic, QoS::AtLeastOnce, false, body)
        .await
        .expect("publish");
    let answer = edgedps_device::provision::wait_for(
        eventloop,
        "answer",
        |p| matches!(p, Packet::Publish(p) if p.topic.starts_with("$dps/registrations/res/")),
    )
    .await;
    let Ok(Packet::Publish(p)) = answer else {
        panic!("no answer on {topic}: {answer:?}");
    };
    let (status, retry_after) = edgedps_device::provision::parse_response_topic(&p.topic);
    Answer {
        status,
        retry_after,
        body: p.payload.to_vec(),
    }
}
