//! Configuration (PROTOCOL D): built-in defaults < TOML file < environment
//! (`EDGEDPS__{SECTION}__{KEY}`), read with the `config` crate. Unknown keys and bad
//! values fail at start with the key's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;
use edgedps_topics::admin::{AllocationPolicy, LinkedHub};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub id_scope: String,
    pub data_dir: PathBuf,
    pub allocation_policy: DefaultAllocation,
    /// Custom allocators and geoLatency's measurements.
    pub allocation: AllocationConfig,
    /// Answer register with 202 and the result on the poll, exactly like Azure.
    pub always_accept_then_poll: bool,
    pub retry_after_seconds: u32,
    /// SIGTERM/SIGINT: how long sessions and requests in flight get to finish before the
    /// process exits.
    pub shutdown_timeout_seconds: u64,
    pub listeners: Listeners,
    pub hubs: Vec<HubConfig>,
    /// The hub that is this gateway (PROTOCOL E), when there is one.
    pub local_hub: Option<LocalHubConfig>,
    /// Certificate authorities that issue device certificates (PROTOCOL F).
    pub certificate_authorities: Vec<CertificateAuthorityConfig>,
    /// Who may operate edgedps, and how they prove it.
    pub operators: Vec<OperatorConfig>,
    /// Metrics, health and the status page, when set.
    pub http: Option<HttpConfig>,
    /// How edgedps talks to cloud hubs' service APIs.
    pub cloud: CloudConfig,
    pub limits: Limits,
    pub log: LogConfig,
    /// The `[[hubs]]` connection strings, read at load (from `connection_string_file`
    /// or `EDGEDPS__HUBS__{n}__CONNECTION_STRING`), by host name. Secret.
    #[serde(skip)]
    pub hub_credentials:
        std::collections::BTreeMap<String, edgedps_policies::cloud::ConnectionString>,
}

/// `[cloud]`: registration at cloud hubs (their service API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// PEM certificates trusted for hubs' service APIs, besides the public roots
    /// (a private CA in front of the hub, a test hub).
    pub trust_anchors_file: Option<PathBuf>,
    /// Connect plus one request and its answer, at most.
    pub request_timeout_seconds: u64,
    /// The longest wait between two attempts at a hub that is down.
    pub max_retry_seconds: u64,
    /// How long a register waits for a `registration = "before_answer"` hub.
    pub hub_answer_timeout_seconds: u64,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            trust_anchors_file: None,
            request_timeout_seconds: 10,
            max_retry_seconds: 60,
            hub_answer_timeout_seconds: 10,
        }
    }
}

/// The service-wide allocation policy; enrollments may name their own (`custom`
/// needs an enrollment's allocator, so it is not a default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAllocation {
    Hashed,
    Static,
    #[serde(rename = "geoLatency", alias = "geolatency")]
    GeoLatency,
}

/// `[allocation]`: custom allocators' bounds and geoLatency's measurements.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocationConfig {
    /// The longest a custom allocator (webhook or MQTT) may take; then 400207.
    pub custom_timeout_ms: u64,
    /// How long a register waits for a custom allocator before answering `202` (the
    /// device polls).
    pub custom_wait_ms: u64,
    /// The largest webhook answer read; a larger one is a failed allocation.
    pub webhook_max_answer_bytes: usize,
    /// How often every linked hub is measured (and at once when hubs change).
    pub probe_interval_seconds: u64,
    /// Connections per measurement round; their median is the round's figure.
    pub probe_samples: u32,
    /// The longest one sample may take (TCP connect and the TLS ServerHello).
    pub probe_timeout_ms: u64,
}

impl Default for AllocationConfig {
    fn default() -> Self {
        AllocationConfig {
            custom_timeout_ms: 5000,
            custom_wait_ms: 50,
            webhook_max_answer_bytes: 64 * 1024,
            probe_interval_seconds: 30,
            probe_samples: 3,
            probe_timeout_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    pub devices: Option<DeviceListener>,
    pub local: Option<LocalListener>,
    /// Operators from elsewhere, over TLS.
    pub operators: Option<OperatorListener>,
    /// The DPS device API over HTTPS (TPM devices, HTTP-only clients), and MQTT over
    /// WebSocket at `/$iothub/websocket`.
    pub https: Option<HttpsListener>,
    /// MQTT over WebSocket only, on a port of its own (the same keys as `https`).
    pub websocket: Option<HttpsListener>,
}

/// `[listeners.https]`: the DPS device API over HTTPS (Azure's REST device API), the
/// same registrations as the device listener's, and MQTT over WebSocket; also
/// `[listeners.websocket]`, MQTT over WebSocket alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsListener {
    #[serde(default = "default_https_bind")]
    pub bind: SocketAddr,
    /// PEM chain of the server certificate; without it and `tls_key`, the device
    /// listener's (or the development certificate).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

fn default_https_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceListener {
    pub bind: SocketAddr,
    /// PEM chain of the server certificate; with neither this nor `tls_key`, a
    /// development certificate is generated in `data_dir` on first start.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalListener {
    #[serde(default = "default_local_bind")]
    pub bind: SocketAddr,
    /// A client that gives no username is an operator with the admin role. Anyone who
    /// can open a connection to `bind` can then change every enrollment: only for a
    /// listener that no one but the gateway's own processes can reach.
    #[serde(default)]
    pub anonymous: bool,
}

fn default_local_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

/// `[listeners.operators]`: operators from other machines, over TLS; every client
/// authenticates as one of `[[operators]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorListener {
    pub bind: SocketAddr,
    /// PEM chain of the server certificate; with neither this nor `tls_key`, the
    /// development certificate (as for the device listener).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM: the CA that signs operators' client certificates. Without it, operators
    /// authenticate with passwords only.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `[[operators]]`: one operator, by password (an argon2 hash) or by the CN of a client
/// certificate from `[listeners.operators] client_ca`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// The MQTT username (and the HTTP basic-auth user).
    pub name: String,
    pub role: OperatorRole,
    /// A PHC string as `edgedps admin hash-password` prints it.
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub certificate_cn: Option<String>,
}

/// `admin` writes the operator plane; `reader` reads and watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    Admin,
    Reader,
}

/// `[http]`: `/metrics`, `/healthz`, `/readyz` and the status page.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub host_name: String,
    #[serde(default = "LinkedHub::default_allocation_weight")]
    pub allocation_weight: u32,
    #[serde(default = "LinkedHub::default_apply_allocation_policy")]
    pub apply_allocation_policy: bool,
    #[serde(default)]
    pub location: Option<String>,
    /// A file holding the hub's connection string (a shared access policy with
    /// registry write): devices assigned here are registered at the hub.
    #[serde(default)]
    pub connection_string_file: Option<PathBuf>,
    /// `host:port` of the hub's service API, when not `{host_name}:443`.
    #[serde(default)]
    pub service_address: Option<String>,
    /// `host:port` geoLatency measures, when not `{host_name}:8883`.
    #[serde(default)]
    pub probe_address: Option<String>,
    /// `after_answer` (default) or `before_answer`.
    #[serde(default)]
    pub registration: edgedps_topics::cloud::HubRegistrationMode,
}

/// What the embedded default (no file) adds to the built-in defaults: the gateway is
/// its own hub, under the name the development certificate carries, so that `edgedps
/// serve` alone provisions devices to itself; it can issue device certificates, from
/// an authority called `gateway` generated in the data directory on first start; the
/// loopback listener takes anonymous operators; the status page is on loopback.
pub const EMBEDDED_DEFAULT: &str = r#"
[listeners.local]
bind = "127.0.0.1:1883"
anonymous = true

[http]
bind = "127.0.0.1:8080"

[local_hub]
host_name = "localhost"

[[certificate_authorities]]
name = "gateway"
"#;

/// `[[certificate_authorities]]`: a CA that signs the certificates devices ask for at
/// registration. Without `cert` and `key` it is generated in `{data_dir}/ca/{name}/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateAuthorityConfig {
    pub name: String,
    /// PEM: the CA certificate, then the certificates above it (at most one).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM, PKCS#8: the CA's key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// How long issued certificates are valid.
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
}

fn default_validity_days() -> u32 {
    30
}

/// `[local_hub]`: devices assigned to `host_name` connect to this gateway's device
/// listener as IoT Hub devices. The name must be one the device listener's certificate
/// carries: devices check it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalHubConfig {
    pub host_name: String,
    #[serde(default = "LinkedHub::default_allocation_weight")]
    pub allocation_weight: u32,
    #[serde(default = "LinkedHub::default_apply_allocation_policy")]
    pub apply_allocation_policy: bool,
    /// Cloud-to-device messages kept per device at most; more are refused.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// How long a cloud-to-device message waits for its device, in seconds.
    #[serde(default = "default_message_ttl_seconds")]
    pub message_ttl_seconds: u64,
    /// `host:port` geoLatency measures, when not `{host_name}:8883`.
    #[serde(default)]
    pub probe_address: Option<String>,
}

impl HubConfig {
    /// A hub named `host_name`, everything else as by default.
    pub fn named(host_name: &str) -> HubConfig {
        HubConfig {
            host_name: host_name.to_owned(),
            allocation_weight: LinkedHub::default_allocation_weight(),
            apply_allocation_policy: LinkedHub::default_apply_allocation_policy(),
            location: None,
            connection_string_file: None,
            service_address: None,
            probe_address: None,
            registration: Default::default(),
        }
    }
}

impl LocalHubConfig {
    /// A local hub named `host_name`, everything else as by default.
    pub fn named(host_name: &str) -> LocalHubConfig {
        LocalHubConfig {
            host_name: host_name.to_owned(),
            allocation_weight: LinkedHub::default_allocation_weight(),
            apply_allocation_policy: LinkedHub::default_apply_allocation_policy(),
            max_queued_messages: default_max_queued_messages(),
            message_ttl_seconds: default_message_ttl_seconds(),
            probe_address: None,
        }
    }
}

fn default_max_queued_messages() -> usize {
    edgedps_responder::hub::HubSettings::default().max_queued_messages
}

fn default_message_ttl_seconds() -> u64 {
    edgedps_responder::hub::HubSettings::default().message_ttl_seconds
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout_ms: u64,
    /// A connection that sends no CONNECT in this time is dropped.
    pub connect_timeout_ms: u64,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: usize,
    /// Open connections on all listeners; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// TLS handshakes running at once; more wait (within the handshake deadline).
    pub max_handshakes: usize,
    /// Polls per device in 10 s (DPS: 5); beyond them 429.
    pub polls_per_device: usize,
    /// Registrations per device per minute; beyond them 429.
    pub registrations_per_device_per_minute: usize,
    /// Registrations per second over all devices; beyond them 429.
    pub registrations_per_second: u32,
    /// Subscriptions one session may hold (besides `$dps/registrations/res/#`).
    pub max_subscriptions_per_session: usize,
    /// Largest body of an operator write (enrollment, group, hub), in bytes.
    pub max_enrollment_body_size: usize,
    /// QoS 1 and 2 messages kept for one persistent session while its client is away;
    /// beyond it the oldest is dropped (counted and logged).
    pub max_queued_messages: usize,
    /// Persistent sessions kept while their client is away; beyond it the one away the
    /// longest ends.
    pub max_offline_sessions: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `edgedps=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id_scope: "0ne00000001".into(),
            data_dir: PathBuf::from("./edgedps-data"),
            allocation_policy: DefaultAllocation::Hashed,
            allocation: AllocationConfig::default(),
            always_accept_then_poll: false,
            retry_after_seconds: 1,
            shutdown_timeout_seconds: 10,
            listeners: Listeners::default(),
            hubs: Vec::new(),
            local_hub: None,
            certificate_authorities: Vec::new(),
            operators: Vec::new(),
            http: None,
            cloud: CloudConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            hub_credentials: Default::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            devices: Some(DeviceListener {
                bind: SocketAddr::from(([0, 0, 0, 0], 8883)),
                tls_cert: None,
                tls_key: None,
            }),
            local: Some(LocalListener {
                bind: default_local_bind(),
                anonymous: false,
            }),
            operators: None,
            https: None,
            websocket: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        // The rate limits' defaults are the responder's (DPS's).
        let rates = edgedps_responder::RateLimits::default();
        Limits {
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            max_packet_size: 256 * 1024,
            max_connections: 50_000,
            max_handshakes: 512,
            polls_per_device: rates.polls_per_device,
            registrations_per_device_per_minute: rates.registrations_per_device,
            registrations_per_second: rates.registrations_per_second,
            max_subscriptions_per_session: 64,
            max_enrollment_body_size: 64 * 1024,
            max_queued_messages: 1000,
            max_offline_sessions: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads the file (if any) and the environment over the defaults.
    pub fn load(file: Option<&Path>) -> Result<Config, Error> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Error> {
        let mut builder = config::Config::builder();
        builder = match file {
            Some(path) => {
                builder.add_source(config::File::from(path).format(config::FileFormat::Toml))
            }
            None => builder.add_source(config::File::from_str(
                EMBEDDED_DEFAULT,
                config::FileFormat::Toml,
            )),
        };
        // Hub connection strings are secrets read apart: not through the `config` crate,
        // which would also take them as an array index.
        let (secrets, env): (Vec<_>, Vec<_>) = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("EDGEDPS__"))
            .partition(|(k, _)| hub_secret_variable(k).is_some());
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("EDGEDPS")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let mut config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        config.read_hub_credentials(secrets)?;
        Ok(config)
    }

    /// Reads each `[[hubs]]` connection string, from its file or its variable, and checks
    /// it is the hub's. Messages name the key, never the secret.
    fn read_hub_credentials(&mut self, variables: Vec<(String, String)>) -> Result<(), Error> {
        use edgedps_policies::cloud::ConnectionString;
        let mut texts: Vec<Option<(String, String)>> = vec![None; self.hubs.len()];
        for (i, hub) in self.hubs.iter().enumerate() {
            if let Some(path) = &hub.connection_string_file {
                let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
                    key: "hubs.connection_string_file",
                    message: format!("{}: {e}", path.display()),
                })?;
                texts[i] = Some((
                    format!("hubs.connection_string_file ({})", path.display()),
                    text,
                ));
            }
        }
        for (name, value) in variables {
            let index = hub_secret_variable(&name).unwrap_or_default();
            let Some(slot) = texts.get_mut(index) else {
                return Err(Error::InvalidConfig {
                    key: "hubs.connection_string",
                    message: format!("{name}: there is no [[hubs]] entry {index} (the first is 0)"),
                });
            };
            *slot = Some((name, value));
        }
        for (hub, text) in self.hubs.iter().zip(texts) {
            let Some((source, text)) = text else { continue };
            let parsed = ConnectionString::parse_for(&text, &hub.host_name).map_err(|e| {
                Error::InvalidConfig {
                    key: "hubs.connection_string",
                    message: format!("{source} of hub `{}`: {e}", hub.host_name),
                }
            })?;
            self.hub_credentials.insert(hub.host_name.clone(), parsed);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), Error> {
        if self.id_scope.is_empty() || self.id_scope.contains('/') {
            return Err(Error::InvalidConfig {
                key: "id_scope",
                message: "must be a non-empty id without `/`".into(),
            });
        }
        if let Some(devices) = &self.listeners.devices {
            if devices.tls_cert.is_some() != devices.tls_key.is_some() {
                return Err(Error::InvalidConfig {
                    key: "listeners.devices.tls_cert",
                    message: "tls_cert and tls_key go together".into(),
                });
            }
        }
        for (key, listener) in [
            ("listeners.https.tls_cert", &self.listeners.https),
            ("listeners.websocket.tls_cert", &self.listeners.websocket),
        ] {
            if listener
                .as_ref()
                .is_some_and(|l| l.tls_cert.is_some() != l.tls_key.is_some())
            {
                return Err(Error::InvalidConfig {
                    key,
                    message: "tls_cert and tls_key go together".into(),
                });
            }
        }
        if self.shutdown_timeout_seconds == 0 {
            return Err(Error::InvalidConfig {
                key: "shutdown_timeout_seconds",
                message: "must be at least 1".into(),
            });
        }
        self.validate_operators()?;
        if self.limits.max_packet_size < 1024 {
            return Err(Error::InvalidConfig {
                key: "limits.max_packet_size",
                message: "must be at least 1024".into(),
            });
        }
        for (key, value) in [
            ("limits.max_connections", self.limits.max_connections),
            ("limits.max_handshakes", self.limits.max_handshakes),
            ("limits.polls_per_device", self.limits.polls_per_device),
            (
                "limits.registrations_per_device_per_minute",
                self.limits.registrations_per_device_per_minute,
            ),
            (
                "limits.registrations_per_second",
                self.limits.registrations_per_second as usize,
            ),
            (
                "limits.max_subscriptions_per_session",
                self.limits.max_subscriptions_per_session,
            ),
            (
                "limits.max_enrollment_body_size",
                self.limits.max_enrollment_body_size,
            ),
            (
                "limits.max_queued_messages",
                self.limits.max_queued_messages,
            ),
            (
                "limits.max_offline_sessions",
                self.limits.max_offline_sessions,
            ),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        for hub in &self.hubs {
            if hub.host_name.is_empty() {
                return Err(Error::InvalidConfig {
                    key: "hubs.host_name",
                    message: "must not be empty".into(),
                });
            }
        }
        let probes = self
            .hubs
            .iter()
            .map(|h| ("hubs.probe_address", &h.probe_address))
            .chain(
                self.local_hub
                    .iter()
                    .map(|h| ("local_hub.probe_address", &h.probe_address)),
            );
        for (key, address) in probes {
            if let Some(address) = address {
                if !edgedps_policies::validation::host_and_port(address) {
                    return Err(Error::InvalidConfig {
                        key,
                        message: format!("`{address}` is not host:port"),
                    });
                }
            }
        }
        self.validate_allocation()?;
        let mut names = std::collections::HashSet::new();
        for ca in &self.certificate_authorities {
            let key = "certificate_authorities";
            let valid_name = !ca.name.is_empty()
                && ca.name.len() <= 64
                && ca
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!("name `{}`: 1 to 64 letters, digits, `-` or `_`", ca.name),
                });
            }
            if !names.insert(ca.name.as_str()) {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!("`{}` is configured twice", ca.name),
                });
            }
            if ca.cert.is_some() != ca.key.is_some() {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!(
                        "`{}`: cert and key go together (neither: generated in the data directory)",
                        ca.name
                    ),
                });
            }
            if !(1..=3650).contains(&ca.validity_days) {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!("`{}`: validity_days must be 1 to 3650", ca.name),
                });
            }
        }
        if let Some(local) = &self.local_hub {
            let name = &local.host_name;
            if name.is_empty() || name.contains(['/', ' ', '?', '#', '+']) {
                return Err(Error::InvalidConfig {
                    key: "local_hub.host_name",
                    message: format!("`{name}` is not a host name"),
                });
            }
            if local.max_queued_messages == 0 || local.max_queued_messages > 10_000 {
                return Err(Error::InvalidConfig {
                    key: "local_hub.max_queued_messages",
                    message: "must be 1 to 10000".into(),
                });
            }
            if local.message_ttl_seconds == 0 {
                return Err(Error::InvalidConfig {
                    key: "local_hub.message_ttl_seconds",
                    message: "must be at least 1".into(),
                });
            }
            if self
                .hubs
                .iter()
                .any(|h| h.host_name.eq_ignore_ascii_case(name))
            {
                return Err(Error::InvalidConfig {
                    key: "local_hub.host_name",
                    message: format!("`{name}` is also a `[[hubs]]` entry: a hub is local or not"),
                });
            }
        }
        Ok(())
    }

    fn validate_allocation(&self) -> Result<(), Error> {
        let a = &self.allocation;
        let checks = [
            (
                "allocation.custom_timeout_ms",
                (1..=600_000).contains(&a.custom_timeout_ms),
                "must be 1 to 600000",
            ),
            (
                "allocation.custom_wait_ms",
                a.custom_wait_ms <= a.custom_timeout_ms,
                "must not be more than allocation.custom_timeout_ms",
            ),
            (
                "allocation.webhook_max_answer_bytes",
                (1024..=16 * 1024 * 1024).contains(&a.webhook_max_answer_bytes),
                "must be 1024 to 16777216",
            ),
            (
                "allocation.probe_interval_seconds",
                a.probe_interval_seconds >= 1,
                "must be at least 1",
            ),
            (
                "allocation.probe_samples",
                (1..=20).contains(&a.probe_samples),
                "must be 1 to 20",
            ),
            (
                "allocation.probe_timeout_ms",
                (1..=60_000).contains(&a.probe_timeout_ms),
                "must be 1 to 60000",
            ),
        ];
        for (key, ok, message) in checks {
            if !ok {
                return Err(Error::InvalidConfig {
                    key,
                    message: message.into(),
                });
            }
        }
        Ok(())
    }

    fn validate_operators(&self) -> Result<(), Error> {
        if let Some(listener) = &self.listeners.operators {
            if listener.tls_cert.is_some() != listener.tls_key.is_some() {
                return Err(Error::InvalidConfig {
                    key: "listeners.operators.tls_cert",
                    message: "tls_cert and tls_key go together".into(),
                });
            }
        }
        let key = "operators";
        let mut names = std::collections::HashSet::new();
        for operator in &self.operators {
            let name = &operator.name;
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!("name `{name}`: 1 to 64 printable characters"),
                });
            }
            if !names.insert(name.as_str()) {
                return Err(Error::InvalidConfig {
                    key,
                    message: format!("`{name}` is configured twice"),
                });
            }
            match (&operator.password_hash, &operator.certificate_cn) {
                (Some(hash), None) => {
                    if let Err(e) = edgedps_policies::password::check_hash(hash) {
                        return Err(Error::InvalidConfig {
                            key,
                            message: format!(
                                "`{name}`: password_hash is not an argon2 PHC string ({e}); `edgedps admin hash-password` prints one"
                            ),
                        });
                    }
                }
                (None, Some(cn)) => {
                    if cn.is_empty() {
                        return Err(Error::InvalidConfig {
                            key,
                            message: format!("`{name}`: certificate_cn is empty"),
                        });
                    }
                    let client_ca = self
                        .listeners
                        .operators
                        .as_ref()
                        .and_then(|l| l.client_ca.as_ref());
                    if client_ca.is_none() {
                        return Err(Error::InvalidConfig {
                            key,
                            message: format!(
                                "`{name}`: certificate_cn needs [listeners.operators] client_ca, the CA that signs operator certificates"
                            ),
                        });
                    }
                }
                _ => {
                    return Err(Error::InvalidConfig {
                        key,
                        message: format!(
                            "`{name}`: give exactly one of password_hash and certificate_cn"
                        ),
                    })
                }
            }
        }
        if self.listeners.operators.is_some() && self.operators.is_empty() {
            return Err(Error::InvalidConfig {
                key: "listeners.operators",
                message: "no [[operators]] to accept: add one, or remove the listener".into(),
            });
        }
        Ok(())
    }

    pub fn linked_hubs(&self) -> Vec<LinkedHub> {
        self.hubs
            .iter()
            .map(|h| LinkedHub {
                allocation_weight: h.allocation_weight,
                apply_allocation_policy: h.apply_allocation_policy,
                location: h.location.clone(),
                service_address: h.service_address.clone(),
                probe_address: h.probe_address.clone(),
                registration: h.registration,
                ..LinkedHub::named(&h.host_name)
            })
            .chain(self.local_hub.iter().map(|h| LinkedHub {
                allocation_weight: h.allocation_weight,
                apply_allocation_policy: h.apply_allocation_policy,
                probe_address: h.probe_address.clone(),
                local: true,
                ..LinkedHub::named(&h.host_name)
            }))
            .collect()
    }

    /// The local hub's queue bounds.
    pub fn hub_settings(&self) -> edgedps_responder::hub::HubSettings {
        let mut settings = edgedps_responder::hub::HubSettings::default();
        if let Some(local) = &self.local_hub {
            settings.max_queued_messages = local.max_queued_messages;
            settings.message_ttl_seconds = local.message_ttl_seconds;
        }
        settings
    }

    pub fn rate_limits(&self) -> edgedps_responder::RateLimits {
        edgedps_responder::RateLimits {
            polls_per_device: self.limits.polls_per_device,
            registrations_per_device: self.limits.registrations_per_device_per_minute,
            registrations_per_second: self.limits.registrations_per_second,
            ..edgedps_responder::RateLimits::default()
        }
    }

    pub fn default_allocation(&self) -> AllocationPolicy {
        match self.allocation_policy {
            DefaultAllocation::Hashed => AllocationPolicy::Hashed,
            DefaultAllocation::Static => AllocationPolicy::Static,
            DefaultAllocation::GeoLatency => AllocationPolicy::GeoLatency,
        }
    }
}

/// `EDGEDPS__HUBS__{n}__CONNECTION_STRING`: the connection string of the `n`th
/// `[[hubs]]` entry (from 0). Its index.
fn hub_secret_variable(name: &str) -> Option<usize> {
    name.strip_prefix("EDGEDPS__HUBS__")?
        .strip_suffix("__CONNECTION_STRING")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn minimal_file_of_the_docs_loads() {
        let f = file(
            r#"
id_scope = "0ne00000001"
data_dir = "./edgedps-data"
allocation_policy = "hashed"
[listeners.devices]
bind = "0.0.0.0:8883"
tls_cert = "server-fullchain.pem"
tls_key = "server.key"
[listeners.local]
bind = "127.0.0.1:1883"
[[hubs]]
host_name = "hub-a.example.net"
allocation_weight = 1
apply_allocation_policy = true
"#,
        );
        let config = Config::load_with_env(Some(f.path()), []).unwrap();
        assert_eq!(config.hubs[0].host_name, "hub-a.example.net");
        assert_eq!(
            config.listeners.devices.unwrap().tls_key,
            Some(PathBuf::from("server.key"))
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = file("id_scope = \"0ne00000001\"\n");
        let config = Config::load_with_env(
            Some(f.path()),
            [
                ("EDGEDPS__ID_SCOPE".to_string(), "0ne0000000A".to_string()),
                (
                    "EDGEDPS__LISTENERS__DEVICES__BIND".to_string(),
                    "127.0.0.1:9999".to_string(),
                ),
                (
                    "EDGEDPS__ALWAYS_ACCEPT_THEN_POLL".to_string(),
                    "true".to_string(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(config.id_scope, "0ne0000000A");
        assert_eq!(config.listeners.devices.unwrap().bind.port(), 9999);
        assert!(config.always_accept_then_poll);
    }

    #[test]
    fn unknown_keys_fail_with_their_name() {
        let f = file("id_scope = \"x\"\n[listeners.devices]\nbind = \"0.0.0.0:1\"\nbindd = 1\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bindd"), "{err}");
        let f = file("idscope = \"x\"\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("idscope"), "{err}");
    }

    #[test]
    fn bad_values_fail_with_their_key() {
        let f = file("allocation_policy = \"random\"\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("random"), "{err}");
        let f = file("[limits]\nmax_packet_size = 10\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_packet_size"), "{err}");
        let f = file("[listeners.local]\nbind = \"not an address\"\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listeners.local.bind"), "{err}");
    }

    #[test]
    fn a_local_hub_is_linked_as_local_and_must_be_a_host_name_of_its_own() {
        let f =
            file("[local_hub]\nhost_name = \"gateway.local\"\n[[hubs]]\nhost_name = \"hub-a\"\n");
        let config = Config::load_with_env(Some(f.path()), []).unwrap();
        let hubs = config.linked_hubs();
        let local: Vec<_> = hubs
            .iter()
            .filter(|h| h.local)
            .map(|h| &h.host_name)
            .collect();
        assert_eq!(local, ["gateway.local"]);
        assert_eq!(hubs.len(), 2);
        for bad in ["", "a/b", "two words"] {
            let f = file(&format!("[local_hub]\nhost_name = \"{bad}\"\n"));
            let err = Config::load_with_env(Some(f.path()), [])
                .unwrap_err()
                .to_string();
            assert!(err.contains("local_hub.host_name"), "{bad}: {err}");
        }
        let f = file("[local_hub]\nhost_name = \"HUB-A\"\n[[hubs]]\nhost_name = \"hub-a\"\n");
        let err = Config::load_with_env(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("local_hub.host_name"), "{err}");
        let env = [(
            "EDGEDPS__LOCAL_HUB__HOST_NAME".to_string(),
            "from-env.local".to_string(),
        )];
        let config = Config::load_with_env(None, env).unwrap();
        assert_eq!(config.local_hub.unwrap().host_name, "from-env.local");
    }

    #[test]
    fn no_file_gives_the_embedded_default() {
        let config = Config::load_with_env(None, []).unwrap();
        let listeners = config.listeners.clone();
        assert_eq!(listeners.devices.unwrap().bind.port(), 8883);
        assert_eq!(listeners.local.unwrap().bind.port(), 1883);
        assert_eq!(config.data_dir, PathBuf::from("./edgedps-data"));
        // The gateway is its own hub, under the development certificate's name.
        let local: Vec<_> = config
            .linked_hubs()
            .into_iter()
            .filter(|h| h.local)
            .map(|h| h.host_name)
            .collect();
        assert_eq!(local, [crate::devcert::ALWAYS_NAMED]);
        // A file says what it wants: no local hub unless it has one.
        let f = file("id_scope = \"0ne00000001\"\n");
        assert!(Config::load_with_env(Some(f.path()), [])
            .unwrap()
            .local_hub
            .is_none());
        // The environment renames it.
        let env = [(
            "EDGEDPS__LOCAL_HUB__HOST_NAME".to_string(),
            "gw.lan".to_string(),
        )];
        let config = Config::load_with_env(None, env).unwrap();
        assert_eq!(config.local_hub.unwrap().host_name, "gw.lan");
    }

    #[test]
    fn the_embedded_default_takes_anonymous_operators_and_a_file_does_not() {
        let config = Config::load_with_env(None, []).unwrap();
        assert!(config.listeners.local.unwrap().anonymous);
        assert_eq!(
            config.http.unwrap().bind,
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        for text in [
            "id_scope = \"0ne00000001\"\n",
            "[listeners.local]\nbind = \"127.0.0.1:1\"\n",
        ] {
            let f = file(text);
            let config = Config::load_with_env(Some(f.path()), []).unwrap();
            assert!(!config.listeners.local.unwrap().anonymous, "{text}");
            assert!(config.http.is_none());
        }
    }

    #[test]
    fn operators_are_checked_at_start() {
        let hash = edgedps_policies::password::hash(b"a long passphrase").unwrap();
        let good = format!(
            "[[operators]]\nname = \"alice\"\nrole = \"admin\"\npassword_hash = \"{hash}\"\n"
        );
        let config = Config::load_with_env(Some(file(&good).path()), []).unwrap();
        assert_eq!(config.operators[0].role, OperatorRole::Admin);
        let listener = "[listeners.operators]\nbind = \"127.0.0.1:0\"\nclient_ca = \"ca.pem\"\n";
        for (text, says) in [
            (
                "[[operators]]\nname = \"a\"\nrole = \"admin\"\npassword_hash = \"secret\"\n".to_string(),
                "not an argon2 PHC string",
            ),
            (
                "[[operators]]\nname = \"a\"\nrole = \"admin\"\n".to_string(),
                "exactly one of password_hash and certificate_cn",
            ),
            (
                format!("[[operators]]\nname = \"a\"\nrole = \"reader\"\npassword_hash = \"{hash}\"\ncertificate_cn = \"a\"\n"),
                "exactly one of",
            ),
            (
                "[[operators]]\nname = \"a\"\nrole = \"reader\"\ncertificate_cn = \"a\"\n".to_string(),
                "needs [listeners.operators] client_ca",
            ),
            (format!("{good}{good}"), "configured twice"),
            (
                "[listeners.operators]\nbind = \"127.0.0.1:0\"\n".to_string(),
                "no [[operators]]",
            ),
            (
                format!("{good}[listeners.operators]\nbind = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n"),
                "tls_cert and tls_key go together",
            ),
            (
                "[[operators]]\nname = \"a\"\nrole = \"owner\"\ncertificate_cn = \"a\"\n".to_string(),
                "owner",
            ),
        ] {
            let err = Config::load_with_env(Some(file(&text).path()), [])
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        let by_certificate = format!(
            "{listener}[[operators]]\nname = \"robot\"\nrole = \"reader\"\ncertificate_cn = \"ops-robot\"\n"
        );
        let config = Config::load_with_env(Some(file(&by_certificate).path()), []).unwrap();
        assert_eq!(
            config.operators[0].certificate_cn.as_deref(),
            Some("ops-robot")
        );
    }
}
