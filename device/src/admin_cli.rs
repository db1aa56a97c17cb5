//! `edgedps admin`: the operator plane (PROTOCOL B) from the command line. Every command
//! is an MQTT exchange any operator could make with `mosquitto_pub`: a retained record
//! written and its result awaited on `dps/admin/results/...`, or records read from their
//! retained topics. Tables for people, `--json` for scripts. The exit code is 0 on
//! success, 1 when edgedps refused (its reason printed), 2 for input that was never sent.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};

use edgedps_topics::admin::{self as topics, RecordKind};

/// Command-line arguments of `edgedps admin`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The operator listener's host.
    #[arg(
        long,
        env = "EDGEDPS_ADMIN_HOST",
        default_value = "127.0.0.1",
        global = true
    )]
    pub host: String,
    /// The operator listener's port.
    #[arg(
        long,
        env = "EDGEDPS_ADMIN_PORT",
        default_value_t = 1883,
        global = true
    )]
    pub port: u16,
    /// The operator's name (`[[operators]] name`); without it, an anonymous client,
    /// which only a `[listeners.local] anonymous = true` listener takes.
    #[arg(long, env = "EDGEDPS_ADMIN_USERNAME", global = true)]
    pub username: Option<String>,
    /// The operator's password (prefer the environment variable to the command line).
    #[arg(
        long,
        env = "EDGEDPS_ADMIN_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// Connect over TLS, trusting this CA (PEM) for the server's certificate: the
    /// `[listeners.operators]` listener.
    #[arg(long, env = "EDGEDPS_ADMIN_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) for TLS, signed by `client_ca`; with --key.
    #[arg(long, env = "EDGEDPS_ADMIN_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "EDGEDPS_ADMIN_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Enroll one device (an individual enrollment).
    ///
    /// Examples: `edgedps admin enroll dev-1 --symmetric-key auto` (prints the key once);
    /// `edgedps admin enroll dev-2 --certificate dev-2.pem`; `edgedps admin enroll dev-3
    /// --file dev-3.json`.
    Enroll {
        registration_id: String,
        /// A base64 key, or `auto` to generate one (printed once).
        #[arg(long, conflicts_with_all = ["certificate", "file"])]
        symmetric_key: Option<String>,
        /// The device's certificate (PEM).
        #[arg(long, conflicts_with = "file")]
        certificate: Option<PathBuf>,
        /// The whole enrollment as JSON.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Hubs the device may be assigned to (repeat).
        #[arg(long)]
        iot_hub: Vec<String>,
        /// The device's initial twin (JSON: `{"tags": .., "properties": {"desired": ..}}`).
        #[arg(long)]
        initial_twin: Option<String>,
    },
    /// Enroll many devices: a file of individual enrollments, a JSON array or one JSON
    /// object per line. Every entry is checked before anything is sent; a progress line
    /// goes to standard error every 100; refusals are listed at the end (exit code 1).
    ///
    /// Example: `edgedps admin import line-7.jsonl --json`
    Import { file: PathBuf },
    /// Enrollment groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List records: enrollments, groups, hubs or registrations.
    ///
    /// Example: `edgedps admin list registrations --json`
    List { kind: Kind },
    /// Show one record.
    ///
    /// Example: `edgedps admin show registration dev-1`
    Show { kind: Kind, id: String },
    /// Registrations (the same as `list registrations` and `show registration`).
    #[command(subcommand)]
    Registrations(RegistrationsCommand),
    /// Print an argon2 hash of a password read from standard input, for
    /// `[[operators]] password_hash`. Nothing is sent anywhere.
    ///
    /// Example: `printf %s 'a long passphrase' | edgedps admin hash-password`
    HashPassword,
    /// Disable an enrollment (or, with --group, a group): its devices are out of service.
    ///
    /// Example: `edgedps admin disable dev-1`
    Disable {
        id: String,
        #[arg(long)]
        group: bool,
    },
    /// Enable an enrollment (or, with --group, a group) again.
    ///
    /// Example: `edgedps admin enable fleet --group`
    Enable {
        id: String,
        #[arg(long)]
        group: bool,
    },
    /// Delete a record.
    ///
    /// Example: `edgedps admin delete enrollment dev-1`
    Delete { kind: Kind, id: String },
    /// Retire a device in one step: blocked, deregistered, sessions closed, certificates
    /// revoked.
    ///
    /// Example: `edgedps admin retire dev-1 --reason lost`
    Retire {
        registration_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// What a registration of a device would do now, and why: the enrollment that
    /// would match (and why the others do not), its hubs with weights, hash scores and
    /// latencies, the hub it would get, and its initial twin. Changes nothing.
    ///
    /// Examples: `edgedps admin explain dev-1`; `edgedps admin explain truck-7 --chain
    /// truck-7-chain.pem`; `edgedps admin explain sensor-3 --symmetric-key`
    Explain {
        registration_id: String,
        /// The device's certificate chain (PEM, leaf first): finds its X.509 group.
        #[arg(long, conflicts_with = "symmetric_key")]
        chain: Option<PathBuf>,
        /// The device presents a symmetric key (finds its symmetric-key group).
        #[arg(long)]
        symmetric_key: bool,
    },
    /// Linked hubs.
    #[command(subcommand)]
    Hubs(HubsCommand),
    /// Twins of the devices of the local hub.
    #[command(subcommand)]
    Twin(TwinCommand),
    /// Certificate revocation lists.
    #[command(subcommand)]
    Crl(CrlCommand),
    /// Follow events live, one line each.
    ///
    /// Examples: `edgedps admin watch`; `edgedps admin watch --filter
    /// 'dps/events/registrations/#' --json`
    Watch {
        /// Which events (an MQTT filter).
        #[arg(long, default_value = "dps/events/#")]
        filter: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RegistrationsCommand {
    /// List every registration.
    ///
    /// Example: `edgedps admin registrations list --json`
    List,
    /// Show one device's registration.
    ///
    /// Example: `edgedps admin registrations show dev-1`
    Show { registration_id: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TwinCommand {
    /// Show a device's twin.
    ///
    /// Example: `edgedps admin twin show dev-1`
    Show { device_id: String },
    /// Patch a device's desired properties (JSON; `null` removes a key).
    ///
    /// Example: `edgedps admin twin set-desired dev-1 '{"interval": 60}'`
    SetDesired { device_id: String, patch: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CrlCommand {
    /// Add (or replace) a revocation list from a PEM or DER file.
    ///
    /// Example: `edgedps admin crl add factory-ca ca.crl.pem`
    Add { name: String, file: PathBuf },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum GroupCommand {
    /// Create (or replace) an enrollment group.
    ///
    /// Examples: `edgedps admin group create fleet --symmetric-key auto`;
    /// `edgedps admin group create fleet --ca root.pem`
    Create {
        group_id: String,
        /// A base64 key, or `auto` to generate one (printed once).
        #[arg(long, conflicts_with = "ca")]
        symmetric_key: Option<String>,
        /// The CA certificate (PEM) that signed the group's device certificates.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Devices of the group may ask for certificates from this authority.
        #[arg(long)]
        issuance_policy: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum HubsCommand {
    /// Link a hub.
    ///
    /// Example: `edgedps admin hubs link hub-a.example.net --weight 2`
    Link {
        host_name: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// The hub is this gateway.
        #[arg(long)]
        local: bool,
        /// A file holding the hub's connection string (a shared access policy with
        /// registry write): devices assigned there are registered at the hub.
        #[arg(long)]
        connection_string_file: Option<std::path::PathBuf>,
        /// `host:port` of the hub's service API, when not `{host_name}:443`.
        #[arg(long)]
        service_address: Option<String>,
        /// Answer a device only once the hub has it (and fail it with the hub's reason).
        #[arg(long)]
        before_answer: bool,
    },
    /// Show a cloud hub's outbox: operations waiting and failed, with their reasons.
    /// `--retry` sends the failed ones again.
    ///
    /// Example: `edgedps admin hubs outbox hub-a.azure-devices.net --retry`
    Outbox {
        host_name: String,
        #[arg(long)]
        retry: bool,
    },
    /// Unlink a hub.
    ///
    /// Example: `edgedps admin hubs unlink hub-a.example.net`
    Unlink { host_name: String },
    /// List the linked hubs.
    ///
    /// Example: `edgedps admin hubs list --json`
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "enrollments")]
    Enrollment,
    #[value(alias = "groups")]
    Group,
    #[value(alias = "hubs")]
    Hub,
    #[value(alias = "registrations")]
    Registration,
}

impl Kind {
    fn record_kind(self) -> RecordKind {
        match self {
            Kind::Enrollment => RecordKind::Enrollment,
            Kind::Group => RecordKind::EnrollmentGroup,
            Kind::Hub => RecordKind::Hub,
            Kind::Registration => RecordKind::Registration,
        }
    }
}

/// How a command ended.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Input that was never sent (exit code 2).
    #[error("{0}")]
    Input(String),
    /// edgedps refused, or could not be reached (exit code 1).
    #[error("{0}")]
    Refused(String),
}

impl AdminError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::Input(_) => 2,
            AdminError::Refused(_) => 1,
        }
    }
}

/// Runs `edgedps admin`; what it prints goes to stdout.
pub async fn main(args: AdminArgs) -> Result<String, AdminError> {
    let plane = Plane::new(&args)?;
    let json_out = args.json;
    match args.command {
        AdminCommand::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .map_err(|e| AdminError::Input(format!("standard input: {e}")))?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.len() < 12 {
                return Err(AdminError::Input(
                    "the password on standard input is shorter than 12 characters".into(),
                ));
            }
            let hash =
                edgedps_policies::password::hash(password.as_bytes()).map_err(AdminError::Input)?;
            Ok(format!("{hash}\n"))
        }
        AdminCommand::Import { file } => {
            let entries = read_enrollments(&file)?;
            let report = plane.import(&entries).await?;
            import_report(&report, entries.len(), json_out)
        }
        AdminCommand::Registrations(RegistrationsCommand::List) => {
            plane.list(Kind::Registration, json_out).await
        }
        AdminCommand::Registrations(RegistrationsCommand::Show { registration_id }) => {
            let record = plane
                .one(RecordKind::Registration, &registration_id)
                .await?;
            Ok(pretty(&record))
        }
        AdminCommand::Enroll {
            registration_id,
            symmetric_key,
            certificate,
            file,
            iot_hub,
            initial_twin,
        } => {
            let (mut body, generated) = match (symmetric_key, certificate, file) {
                (Some(key), None, None) => {
                    let (key, generated) = key_or_new(&key)?;
                    let body = json!({"registrationId": registration_id,
                        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}});
                    (body, generated.then_some(key))
                }
                (None, Some(path), None) => {
                    let pem = read_certificate(&path)?;
                    let body = json!({"registrationId": registration_id,
                        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
                    (body, None)
                }
                (None, None, Some(path)) => (read_json(&path)?, None),
                _ => {
                    return Err(AdminError::Input(
                        "give one of --symmetric-key, --certificate or --file".into(),
                    ))
                }
            };
            if !iot_hub.is_empty() {
                body["iotHubs"] = json!(iot_hub);
            }
            if let Some(twin) = initial_twin {
                let twin: Value = serde_json::from_str(&twin)
                    .map_err(|e| AdminError::Input(format!("--initial-twin is not JSON: {e}")))?;
                body["initialTwin"] = twin;
            }
            let topic = RecordKind::Enrollment.record_topic(&registration_id);
            let result = plane.write(&topic, &body).await?;
            Ok(written(&result, generated, json_out))
        }
        AdminCommand::Group(GroupCommand::Create {
            group_id,
            symmetric_key,
            ca,
            issuance_policy,
        }) => {
            let (mut body, generated) = match (symmetric_key, ca) {
                (Some(key), None) => {
                    let (key, generated) = key_or_new(&key)?;
                    let body = json!({"enrollmentGroupId": group_id,
                        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}});
                    (body, generated.then_some(key))
                }
                (None, Some(path)) => {
                    let pem = read_certificate(&path)?;
                    let der = edgedps_policies::x509::pem_to_der(&pem)
                        .map_err(|e| AdminError::Input(format!("--ca {}: {e}", path.display())))?;
                    let info = edgedps_policies::x509::CertificateInfo::read(&der)
                        .map_err(|e| AdminError::Input(format!("--ca {}: {e}", path.display())))?;
                    if !info.is_ca {
                        return Err(AdminError::Input(format!(
                            "--ca {}: not a CA certificate (basic constraints CA:TRUE)",
                            path.display()
                        )));
                    }
                    let body = json!({"enrollmentGroupId": group_id,
                        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}}});
                    (body, None)
                }
                _ => {
                    return Err(AdminError::Input(
                        "give one of --symmetric-key or --ca".into(),
                    ))
                }
            };
            if let Some(name) = issuance_policy {
                body["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": name});
            }
            let topic = RecordKind::EnrollmentGroup.record_topic(&group_id);
            let result = plane.write(&topic, &body).await?;
            Ok(written(&result, generated, json_out))
        }
        AdminCommand::List { kind } => plane.list(kind, json_out).await,
        AdminCommand::Show { kind, id } => {
            let record = plane.one(kind.record_kind(), &id).await?;
            Ok(pretty(&record))
        }
        AdminCommand::Disable { id, group } => {
            plane.set_status(&id, group, "disabled", json_out).await
        }
        AdminCommand::Enable { id, group } => {
            plane.set_status(&id, group, "enabled", json_out).await
        }
        AdminCommand::Delete { kind, id } => {
            let topic = kind.record_kind().record_topic(&id);
            let result = plane.write_bytes(&topic, b"", true).await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Retire {
            registration_id,
            reason,
        } => {
            let body = match reason {
                Some(reason) => json!({"reason": reason}),
                None => json!({}),
            };
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let result = plane
                .exchange(
                    &topics::retire_topic(&registration_id),
                    &bytes,
                    false,
                    &topics::retire_result_topic(&registration_id),
                )
                .await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Explain {
            registration_id,
            chain,
            symmetric_key,
        } => {
            let body = match (chain, symmetric_key) {
                (Some(path), _) => std::fs::read(&path)
                    .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?,
                (None, true) => br#"{"attestation": "symmetricKey"}"#.to_vec(),
                (None, false) => Vec::new(),
            };
            let explanation = plane
                .exchange(
                    &topics::explain_topic(&registration_id),
                    &body,
                    false,
                    &topics::explain_result_topic(&registration_id),
                )
                .await?;
            Ok(match json_out {
                true => pretty(&explanation),
                false => explained(&explanation),
            })
        }
        AdminCommand::Hubs(HubsCommand::Link {
            host_name,
            weight,
            local,
            connection_string_file,
            service_address,
            before_answer,
        }) => {
            let mut body = json!({"allocationWeight": weight});
            if local {
                body["local"] = json!(true);
            }
            if let Some(path) = connection_string_file {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
                body["connectionString"] = json!(text.trim());
            }
            if let Some(address) = service_address {
                body["serviceAddress"] = json!(address);
            }
            if before_answer {
                body["registration"] = json!("beforeAnswer");
            }
            let result = plane
                .write(&RecordKind::Hub.record_topic(&host_name), &body)
                .await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Hubs(HubsCommand::Outbox { host_name, retry }) => {
            let body = match retry {
                true => json!({"retry": true}),
                false => json!({}),
            };
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let report = plane
                .exchange(
                    &edgedps_topics::cloud::outbox_topic(&host_name),
                    &bytes,
                    false,
                    &edgedps_topics::cloud::outbox_result_topic(&host_name),
                )
                .await?;
            if json_out {
                return Ok(format!("{report}\n"));
            }
            Ok(outbox_lines(&report))
        }
        AdminCommand::Hubs(HubsCommand::Unlink { host_name }) => {
            let topic = RecordKind::Hub.record_topic(&host_name);
            let result = plane.write_bytes(&topic, b"", true).await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Twin(TwinCommand::Show { device_id }) => {
            let topic = edgedps_topics::hub::twin_record_topic(&device_id);
            let mut twins = plane.read(&topic).await?;
            let twin = twins
                .pop()
                .ok_or_else(|| AdminError::Refused(format!("no twin for `{device_id}`")))?;
            // As the hub wrote it: `$version` after the properties.
            Ok(pretty(&edgedps_topics::twin::TwinDocument::new(twin)))
        }
        AdminCommand::Twin(TwinCommand::SetDesired { device_id, patch }) => {
            let patch: Value = serde_json::from_str(&patch)
                .map_err(|e| AdminError::Input(format!("the patch is not JSON: {e}")))?;
            if !patch.is_object() {
                return Err(AdminError::Input("the patch must be a JSON object".into()));
            }
            let bytes = serde_json::to_vec(&patch).unwrap_or_default();
            let result = plane
                .exchange(
                    &format!(
                        "{}/desired",
                        edgedps_topics::hub::twin_record_topic(&device_id)
                    ),
                    &bytes,
                    false,
                    &edgedps_topics::hub::twin_result_topic(&device_id),
                )
                .await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Crl(CrlCommand::Add { name, file }) => {
            let body = std::fs::read(&file)
                .map_err(|e| AdminError::Input(format!("{}: {e}", file.display())))?;
            let result = plane
                .write_bytes(&RecordKind::Crl.record_topic(&name), &body, true)
                .await?;
            Ok(written(&result, None, json_out))
        }
        AdminCommand::Watch { filter, count } => plane.watch(&filter, count, json_out).await,
        AdminCommand::Hubs(HubsCommand::List) => plane.list(Kind::Hub, json_out).await,
    }
}

/// The operator listener, and how to prove who we are to it.
struct Plane {
    host: String,
    port: u16,
    login: Option<(String, String)>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// How long the records of a listing may pause before it is taken as complete.
const QUIET: Duration = Duration::from_millis(400);

impl Plane {
    fn new(args: &AdminArgs) -> Result<Plane, AdminError> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| AdminError::Input(format!("{flag} {}: {e}", path.display())))
        };
        let tls = match (&args.ca_file, &args.cert, &args.key) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(AdminError::Input(
                    "--cert needs --ca-file: client certificates are for the TLS operator listener"
                        .into(),
                ))
            }
            (Some(ca), cert, key) => {
                let ca_pem = read("--ca-file", ca)?;
                let identity = match (cert, key) {
                    (Some(cert), Some(key)) => Some((read("--cert", cert)?, read("--key", key)?)),
                    _ => None,
                };
                let config = crate::tls::client_config(
                    &ca_pem,
                    identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
                )
                .map_err(|e| AdminError::Input(format!("TLS options: {e}")))?;
                Some(config)
            }
        };
        let login = match (&args.username, &args.password) {
            (Some(user), password) => Some((user.clone(), password.clone().unwrap_or_default())),
            (None, Some(_)) => return Err(AdminError::Input("--password needs --username".into())),
            (None, None) => None,
        };
        Ok(Plane {
            host: args.host.clone(),
            port: args.port,
            login,
            tls,
        })
    }

    async fn connect(&self) -> Result<(AsyncClient, EventLoop), AdminError> {
        let mut options = rumqttc::MqttOptions::new(
            format!("edgedps-admin-{}", std::process::id()),
            &self.host,
            self.port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((username, password)) = &self.login {
            options.set_credentials(username, password);
        }
        if let Some(tls) = &self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok((client, eventloop)),
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                Err(AdminError::Refused(format!(
                    "{}:{} refused the connection ({code:?}): check --username and --password (or the client certificate), and the operator's role",
                    self.host, self.port
                )))
            }
            Ok(Ok(other)) => Err(AdminError::Refused(format!("no CONNACK: {other:?}"))),
            Ok(Err(e)) => Err(AdminError::Refused(format!(
                "cannot reach the operator listener at {}:{}: {e}",
                self.host, self.port
            ))),
            Err(_) => Err(AdminError::Refused(format!(
                "no answer from {}:{} within 10 s",
                self.host, self.port
            ))),
        }
    }

    async fn write(&self, topic: &str, body: &Value) -> Result<Value, AdminError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.write_bytes(topic, &bytes, true).await
    }

    async fn write_bytes(
        &self,
        topic: &str,
        body: &[u8],
        retain: bool,
    ) -> Result<Value, AdminError> {
        let result_topic = topics::result_topic_of(topic)
            .ok_or_else(|| AdminError::Input(format!("`{topic}` is not an operator record")))?;
        self.exchange(topic, body, retain, &result_topic).await
    }

    /// Publishes and returns the result published on `result_topic`; a result that is
    /// not `ok` is the error.
    async fn exchange(
        &self,
        topic: &str,
        body: &[u8],
        retain: bool,
        result_topic: &str,
    ) -> Result<Value, AdminError> {
        let (client, mut eventloop) = self.connect().await?;
        let lost = |e: String| AdminError::Refused(format!("connection lost: {e}"));
        client
            .subscribe(result_topic, QoS::AtLeastOnce)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut published = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .map_err(|_| {
                    AdminError::Refused(format!("no result on {result_topic} within 30 s"))
                })?
                .map_err(|e| lost(e.to_string()))?;
            match event {
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    client
                        .publish(topic, QoS::AtLeastOnce, retain, body.to_vec())
                        .await
                        .map_err(|e| lost(e.to_string()))?;
                    published = true;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == result_topic => {
                    let _ = client.try_disconnect();
                    let result: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if result["ok"] == true {
                        return Ok(result);
                    }
                    let reason = result["message"]
                        .as_str()
                        .or(result["reason"].as_str())
                        .unwrap_or("no reason given");
                    return Err(AdminError::Refused(format!(
                        "refused ({}): {reason}",
                        result["errorCode"]
                    )));
                }
                _ => {}
            }
        }
    }

    /// The retained records `filter` matches, once they stop arriving.
    async fn read(&self, filter: &str) -> Result<Vec<Value>, AdminError> {
        let (client, mut eventloop) = self.connect().await?;
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .map_err(|e| AdminError::Refused(e.to_string()))?;
        let mut records = Vec::new();
        loop {
            match tokio::time::timeout(QUIET, eventloop.poll()).await {
                Err(_) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if !p.payload.is_empty() => {
                    if let Ok(record) = serde_json::from_slice::<Value>(&p.payload) {
                        records.push(record);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(AdminError::Refused(format!("connection lost: {e}"))),
            }
        }
        let _ = client.try_disconnect();
        Ok(records)
    }

    /// Prints each message on `filter` as it comes (to stdout at once), until `count`.
    async fn watch(
        &self,
        filter: &str,
        count: Option<usize>,
        json_out: bool,
    ) -> Result<String, AdminError> {
        use std::io::Write;
        let (client, mut eventloop) = self.connect().await?;
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .map_err(|e| AdminError::Refused(e.to_string()))?;
        let mut seen = 0;
        while count.is_none_or(|count| seen < count) {
            let event = eventloop
                .poll()
                .await
                .map_err(|e| AdminError::Refused(format!("connection lost: {e}")))?;
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let body: Value = serde_json::from_slice(&p.payload)
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&p.payload).into_owned()));
            let line = match json_out {
                true => json!({"topic": p.topic, "message": body}).to_string(),
                false => format!("{}  {}", p.topic, body),
            };
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
            seen += 1;
        }
        let _ = client.try_disconnect();
        Ok(String::new())
    }

    /// Writes `entries` (registration id, body) on one connection, up to
    /// [`IMPORT_WINDOW`] awaiting their results at once; the refusals, by id.
    async fn import(
        &self,
        entries: &[(String, Value)],
    ) -> Result<Vec<(String, Value)>, AdminError> {
        use std::collections::HashSet;
        use std::io::Write;
        let (client, mut eventloop) = self.connect().await?;
        let lost = |e: String| AdminError::Refused(format!("connection lost: {e}"));
        let results = RecordKind::Enrollment.result_topic("");
        client
            .subscribe(format!("{results}+"), QoS::AtLeastOnce)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let (mut subscribed, mut next, mut done) = (false, 0, 0);
        let mut waiting: HashSet<String> = HashSet::new();
        let mut refused = Vec::new();
        while done < entries.len() {
            while subscribed && waiting.len() < IMPORT_WINDOW && next < entries.len() {
                let (id, body) = &entries[next];
                let topic = RecordKind::Enrollment.record_topic(id);
                let bytes = serde_json::to_vec(body).unwrap_or_default();
                if client
                    .try_publish(topic, QoS::AtLeastOnce, true, bytes)
                    .is_err()
                {
                    break;
                }
                waiting.insert(id.to_ascii_lowercase());
                next += 1;
            }
            let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
                .await
                .map_err(|_| {
                    AdminError::Refused(format!(
                        "no result within 30 s ({done} of {} written)",
                        entries.len()
                    ))
                })?
                .map_err(|e| lost(e.to_string()))?;
            match event {
                Event::Incoming(Packet::SubAck(_)) => subscribed = true,
                Event::Incoming(Packet::Publish(p)) => {
                    let Some(id) = p.topic.strip_prefix(&results) else {
                        continue;
                    };
                    if !waiting.remove(&id.to_ascii_lowercase()) {
                        continue;
                    }
                    let result: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if result["ok"] != true {
                        refused.push((id.to_owned(), result));
                    }
                    done += 1;
                    if done % 100 == 0 || done == entries.len() {
                        let _ = writeln!(
                            std::io::stderr(),
                            "import: {done}/{} written, {} refused",
                            entries.len(),
                            refused.len()
                        );
                    }
                }
                _ => {}
            }
        }
        let _ = client.try_disconnect();
        Ok(refused)
    }

    /// Every record of a kind, as a table or JSON.
    async fn list(&self, kind: Kind, json_out: bool) -> Result<String, AdminError> {
        let filter = format!("{}+", kind.record_kind().record_topic(""));
        let records = self.read(&filter).await?;
        Ok(listing(kind, &records, json_out))
    }

    async fn one(&self, kind: RecordKind, id: &str) -> Result<Value, AdminError> {
        let mut records = self.read(&kind.record_topic(id)).await?;
        records.pop().ok_or_else(|| {
            AdminError::Refused(format!("no such record: {}", kind.record_topic(id)))
        })
    }

    async fn set_status(
        &self,
        id: &str,
        group: bool,
        status: &str,
        json_out: bool,
    ) -> Result<String, AdminError> {
        let kind = if group {
            RecordKind::EnrollmentGroup
        } else {
            RecordKind::Enrollment
        };
        // The record as published has no keys; written back, edgedps keeps the stored ones.
        let mut record = self.one(kind, id).await?;
        record["provisioningStatus"] = json!(status);
        if let Some(fields) = record.as_object_mut() {
            for derived in ["etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"] {
                fields.remove(derived);
            }
        }
        let result = self.write(&kind.record_topic(id), &record).await?;
        Ok(written(&result, None, json_out))
    }
}

fn key_or_new(key: &str) -> Result<(String, bool), AdminError> {
    use base64::Engine;
    if key == "auto" {
        let key = crate::credentials::new_symmetric_key().map_err(AdminError::Input)?;
        return Ok((key, true));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| AdminError::Input("--symmetric-key: not base64".into()))?;
    if !(16..=64).contains(&decoded.len()) {
        return Err(AdminError::Input(format!(
            "--symmetric-key: {} bytes; keys are 16 to 64 bytes",
            decoded.len()
        )));
    }
    Ok((key.to_owned(), false))
}

fn read_certificate(path: &PathBuf) -> Result<String, AdminError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
    edgedps_policies::x509::pem_to_der(&pem)
        .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
    Ok(pem)
}

/// Results awaited at once by `import`.
const IMPORT_WINDOW: usize = 64;

/// The enrollments of an import file: a JSON array, or JSON lines. Each must be an object
/// with a valid, unique `registrationId`; the first that is not is the error.
fn read_enrollments(path: &PathBuf) -> Result<Vec<(String, Value)>, AdminError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
    let at = |what: String| AdminError::Input(format!("{}: {what}", path.display()));
    let values: Vec<(String, Value)> = if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| at(format!("not a JSON array: {e}")))?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("entry {}", i + 1), v))
            .collect()
    } else {
        let mut values = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value = serde_json::from_str(line)
                .map_err(|e| at(format!("line {}: not JSON: {e}", i + 1)))?;
            values.push((format!("line {}", i + 1), value));
        }
        values
    };
    if values.is_empty() {
        return Err(at("no enrollment in the file".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(values.len());
    for (place, value) in values {
        if !value.is_object() {
            return Err(at(format!("{place}: not a JSON object")));
        }
        let Some(id) = value["registrationId"].as_str() else {
            return Err(at(format!("{place}: no `registrationId`")));
        };
        if !edgedps_topics::identity::valid_registration_id(id) {
            return Err(at(format!(
                "{place}: `registrationId` is not a registration id (letters, digits, `-`, `.`, `_`, `:`; at most 128)"
            )));
        }
        if !seen.insert(id.to_ascii_lowercase()) {
            return Err(at(format!("{place}: `{id}` is in the file twice")));
        }
        entries.push((id.to_owned(), value));
    }
    Ok(entries)
}

/// What `import` prints: the refusals (exit code 1 when there are any).
fn import_report(
    refused: &[(String, Value)],
    total: usize,
    json_out: bool,
) -> Result<String, AdminError> {
    let out = if json_out {
        let refused: Vec<Value> = refused
            .iter()
            .map(|(id, r)| json!({"registrationId": id, "errorCode": r["errorCode"], "message": r["message"]}))
            .collect();
        format!(
            "{}\n",
            json!({"written": total - refused.len(), "refused": refused})
        )
    } else {
        let mut out = format!("{} of {total} enrolled\n", total - refused.len());
        for (id, result) in refused {
            out.push_str(&format!(
                "refused  {id}  {}  {}\n",
                result["errorCode"],
                result["message"].as_str().unwrap_or("no reason given")
            ));
        }
        out
    };
    if refused.is_empty() {
        Ok(out)
    } else {
        print!("{out}");
        Err(AdminError::Refused(format!(
            "{} of {total} enrollments refused",
            refused.len()
        )))
    }
}

fn read_json(path: &PathBuf) -> Result<Value, AdminError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| AdminError::Input(format!("{}: not JSON: {e}", path.display())))?;
    if !value.is_object() {
        return Err(AdminError::Input(format!(
            "{}: not a JSON object",
            path.display()
        )));
    }
    Ok(value)
}

/// The output of a write: the result, and a generated key (shown once).
/// A hub's outbox for people: a summary line, then one line per operation.
fn outbox_lines(report: &Value) -> String {
    let mut out = format!(
        "{}: credentials {}, pending {}, failed {}",
        report["hostName"].as_str().unwrap_or_default(),
        if report["credentials"] == true {
            "set"
        } else {
            "none"
        },
        report["pending"],
        report["failed"],
    );
    for field in ["retried", "superseded"] {
        if let Some(n) = report[field].as_u64() {
            out.push_str(&format!(", {field} {n}"));
        }
    }
    out.push('\n');
    for op in report["operations"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  #{} {} {} {} (device {}) attempts {}{}\n",
            op["sequence"],
            op["state"].as_str().unwrap_or_default(),
            op["action"].as_str().unwrap_or_default(),
            op["registrationId"].as_str().unwrap_or_default(),
            op["deviceId"].as_str().unwrap_or_default(),
            op["attempts"],
            op["lastError"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
        ));
    }
    out
}

fn written(result: &Value, generated_key: Option<String>, json_out: bool) -> String {
    if json_out {
        let mut out = result.clone();
        if let Some(key) = generated_key {
            out["symmetricKey"] = json!(key);
        }
        return format!("{out}\n");
    }
    let mut out = String::from("ok");
    if let Some(etag) = result["etag"].as_str() {
        out.push_str(&format!("  etag {etag}"));
    }
    for (field, value) in result.as_object().into_iter().flatten() {
        if !matches!(field.as_str(), "ok" | "etag") {
            out.push_str(&format!("  {field} {value}"));
        }
    }
    out.push('\n');
    if let Some(key) = generated_key {
        out.push_str(&format!("symmetric key (shown once, keep it): {key}\n"));
    }
    out
}

/// An explanation, for a person: the outcome and its reason, the enrollments looked
/// at, the candidate hubs, the twin.
fn explained(e: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut out = format!(
        "{}: {}{}\n  {}\n",
        text(&e["registrationId"]),
        text(&e["outcome"]),
        e["enrollment"]
            .as_str()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        text(&e["reason"]),
    );
    if let Some(hub) = e["currentHub"].as_str() {
        out.push_str(&format!("  assigned now to {hub}\n"));
    }
    let considered = e["considered"].as_array().cloned().unwrap_or_default();
    if !considered.is_empty() {
        out.push_str("  enrollments considered:\n");
        for c in &considered {
            out.push_str(&format!(
                "    {} {} {} ({}): {}\n",
                if c["matches"] == true { "*" } else { "-" },
                text(&c["kind"]),
                text(&c["id"]),
                text(&c["provisioningStatus"]),
                text(&c["reason"]),
            ));
        }
    }
    let candidates = e["allocation"]["candidates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !candidates.is_empty() {
        out.push_str(&format!(
            "  candidate hubs ({}):\n",
            text(&e["allocation"]["policy"])
        ));
        for c in &candidates {
            let latency = match (c["latencyMicroseconds"].as_u64(), c["reachable"].as_bool()) {
                (_, Some(false)) => "  unreachable".to_owned(),
                (Some(us), _) => format!("  {:.1} ms", us as f64 / 1000.0),
                _ => String::new(),
            };
            out.push_str(&format!(
                "    {} {}  weight {}  score {:.2}{latency}\n",
                if c["chosen"] == true { "*" } else { "-" },
                text(&c["hostName"]),
                c["weight"],
                c["hashScore"].as_f64().unwrap_or_default(),
            ));
        }
    }
    if let Some(twin) = e.get("initialTwin").filter(|t| !t.is_null()) {
        out.push_str(&format!("  initial twin: {twin}\n"));
    }
    out
}

fn pretty(record: &impl serde::Serialize) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(record).unwrap_or_default()
    )
}

/// A table of records, or a JSON array.
fn listing(kind: Kind, records: &[Value], json_out: bool) -> String {
    if json_out {
        return format!("{}\n", Value::from(records.to_vec()));
    }
    let columns: &[(&str, &str)] = match kind {
        Kind::Enrollment => &[
            ("REGISTRATION ID", "/registrationId"),
            ("ATTESTATION", "/attestation/type"),
            ("STATUS", "/provisioningStatus"),
        ],
        Kind::Group => &[
            ("GROUP ID", "/enrollmentGroupId"),
            ("ATTESTATION", "/attestation/type"),
            ("STATUS", "/provisioningStatus"),
        ],
        Kind::Hub => &[
            ("HOST NAME", "/hostName"),
            ("WEIGHT", "/allocationWeight"),
            ("LOCAL", "/local"),
        ],
        Kind::Registration => &[
            ("REGISTRATION ID", "/registrationId"),
            ("STATUS", "/status"),
            ("HUB", "/assignedHub"),
            ("DEVICE ID", "/deviceId"),
        ],
    };
    let cell = |record: &Value, pointer: &str| match record.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    let mut rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| columns.iter().map(|(_, p)| cell(r, p)).collect())
        .collect();
    rows.sort();
    let header: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(row));
    }
    out.push_str(&format!(
        "({} {})\n",
        rows.len(),
        if rows.len() == 1 { "record" } else { "records" }
    ));
    out
}
