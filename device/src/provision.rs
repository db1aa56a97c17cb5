//! One provisioning run: CONNECT, subscribe to the responses, register, poll while the
//! service says `assigning`, return the final answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde_json::Value;

use edgedps_topics::dps;

/// How the device proves who it is.
#[derive(Clone)]
pub enum DeviceAuth {
    /// A SAS token signed with this base64 key (individual or group-derived).
    SymmetricKey { key: String },
    /// A certificate chain and key in the TLS handshake.
    X509 {
        chain_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
    /// A TPM (PROTOCOL C): a challenge first, then SAS tokens signed in the TPM with
    /// the key it was sent; after the assignment, with its hub key.
    Tpm(Arc<dyn crate::tpm::TpmDevice>),
}

/// The path of MQTT over WebSocket, as Azure serves it.
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";

#[derive(Clone)]
pub struct DeviceConfig {
    pub host: String,
    pub port: u16,
    pub id_scope: String,
    pub registration_id: String,
    pub auth: DeviceAuth,
    /// The CA the server certificate chains to.
    pub server_ca_pem: Vec<u8>,
    pub api_version: String,
    /// QoS of the register and poll requests (the SDKs use 1).
    pub request_qos: QoS,
    /// TCP_NODELAY: off by default, as in rumqttc; a device that registers again on
    /// the same connection wants it on, or its request waits behind its last PUBACK.
    pub tcp_nodelay: bool,
    /// A certificate signing request to send with the register (PROTOCOL F): base64 of
    /// the DER request (`credentials::CertificateRequest`).
    pub csr: Option<String>,
    /// MQTT over WebSocket at `wss://{host}:{port}/$iothub/websocket` (port 443 for a
    /// device that may only leave its network there) instead of MQTT over TLS.
    pub websocket: bool,
}

impl DeviceConfig {
    pub fn new(
        host: &str,
        port: u16,
        id_scope: &str,
        registration_id: &str,
        auth: DeviceAuth,
        server_ca_pem: Vec<u8>,
    ) -> DeviceConfig {
        DeviceConfig {
            host: host.into(),
            port,
            id_scope: id_scope.into(),
            registration_id: registration_id.into(),
            auth,
            server_ca_pem,
            api_version: "2019-03-31".into(),
            request_qos: QoS::AtLeastOnce,
            tcp_nodelay: false,
            csr: None,
            websocket: false,
        }
    }

    pub fn username(&self) -> String {
        format!(
            "{}/registrations/{}/api-version={}&ClientVersion=edgedps-device%2F{}",
            self.id_scope,
            self.registration_id,
            self.api_version,
            env!("CARGO_PKG_VERSION")
        )
    }
}

pub use crate::error::DeviceError;

/// The final answer of the service.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status of the response topic (200, 401, ...).
    pub status: u16,
    pub body: Value,
    /// How many 202s came before it.
    pub polls: u32,
    /// How many 429s (throttled, retried after `retry-after`) came before it.
    pub throttled: u32,
}

impl Outcome {
    pub fn status_word(&self) -> Option<&str> {
        self.body.get("status").and_then(Value::as_str)
    }
    pub fn assigned_hub(&self) -> Option<&str> {
        self.body
            .pointer("/registrationState/assignedHub")
            .and_then(Value::as_str)
    }
}

/// The TLS client configuration a device needs: the server CA, and its certificate
/// for X.509 attestation.
pub fn tls_config(config: &DeviceConfig) -> Result<Arc<rustls::ClientConfig>, DeviceError> {
    let identity = match &config.auth {
        DeviceAuth::SymmetricKey { .. } | DeviceAuth::Tpm(_) => None,
        DeviceAuth::X509 { chain_pem, key_pem } => Some((chain_pem.as_slice(), key_pem.as_slice())),
    };
    crate::tls::client_config(&config.server_ca_pem, identity)
}

/// Opens an MQTT connection as the device and waits for the CONNACK.
pub async fn connect(config: &DeviceConfig) -> Result<(AsyncClient, EventLoop), DeviceError> {
    connect_with(config, tls_config(config)?).await
}

/// As [`connect`], with a TLS configuration built once by the caller.
pub async fn connect_with(
    config: &DeviceConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(AsyncClient, EventLoop), DeviceError> {
    let password = match &config.auth {
        DeviceAuth::SymmetricKey { key } => edgedps_policies::sas::sign(
            key,
            &config.id_scope,
            &config.registration_id,
            unix_now() + 3600,
        )?,
        // A TPM device's first CONNECT has no token: it asks for its challenge.
        DeviceAuth::X509 { .. } | DeviceAuth::Tpm(_) => String::new(),
    };
    connect_as(config, tls, password).await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// MQTT options for `client_id` at `host:port`: over TLS, or over WebSocket over TLS at
/// `websocket_path` (`wss://{host}:{port}{path}`).
pub fn mqtt_options(
    client_id: &str,
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    websocket_path: Option<&str>,
) -> MqttOptions {
    let tls = TlsConfiguration::Rustls(tls);
    match websocket_path {
        Some(path) => {
            let url = format!("wss://{host}:{port}{path}");
            let mut options = MqttOptions::new(client_id, url, port);
            options.set_transport(Transport::wss_with_config(tls));
            options
        }
        None => {
            let mut options = MqttOptions::new(client_id, host, port);
            options.set_transport(Transport::tls_with_config(tls));
            options
        }
    }
}

/// Connects with `password` as the CONNECT's.
async fn connect_as(
    config: &DeviceConfig,
    tls: Arc<rustls::ClientConfig>,
    password: String,
) -> Result<(AsyncClient, EventLoop), DeviceError> {
    let mut options = mqtt_options(
        &config.registration_id,
        &config.host,
        config.port,
        tls,
        config.websocket.then_some(WEBSOCKET_PATH),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_credentials(config.username(), password);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    eventloop
        .network_options
        .set_tcp_nodelay(config.tcp_nodelay);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Err(_) => return Err(DeviceError::Timeout("CONNACK")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, eventloop)),
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(DeviceError::Refused(code))
            }
            Ok(Err(e)) => return Err(DeviceError::Connection(e.to_string())),
        }
    }
}

/// Provisions the device: the whole DPS exchange on one connection (a TPM device's
/// on two: the challenge, then the registration it signs).
pub async fn register(
    config: &DeviceConfig,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    if let DeviceAuth::Tpm(tpm) = &config.auth {
        return register_tpm(config, tpm, payload).await;
    }
    let (client, mut eventloop) = connect(config).await?;
    let result = exchange(config, &client, &mut eventloop, payload).await;
    let _ = client.try_disconnect();
    result
}

/// PROTOCOL C: register without a token and get a 401 challenge; activate it in the
/// TPM; connect again with a token the TPM signs and register; activate the hub key of
/// the answer. An answer that is not a challenge (a refusal) is the outcome.
async fn register_tpm(
    config: &DeviceConfig,
    tpm: &Arc<dyn crate::tpm::TpmDevice>,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    let tls = tls_config(config)?;
    let (client, mut eventloop) = connect_as(config, tls.clone(), String::new()).await?;
    let challenge = exchange(config, &client, &mut eventloop, payload.clone()).await;
    let _ = client.try_disconnect();
    let challenge = challenge?;
    if challenge.status != 401 {
        return Ok(challenge);
    }
    let Some(key) = challenge
        .body
        .get("authenticationKey")
        .and_then(Value::as_str)
    else {
        return Ok(challenge);
    };
    crate::tpm::activate(tpm, key).await?;
    let sr =
        edgedps_policies::sas::registration_resource(&config.id_scope, &config.registration_id);
    let token = crate::tpm::token(tpm, sr, unix_now() + 3600, Some("registration")).await?;
    let (client, mut eventloop) = connect_as(config, tls, token).await?;
    let outcome = exchange(config, &client, &mut eventloop, payload).await;
    let _ = client.try_disconnect();
    let outcome = outcome?;
    if outcome.status_word() == Some("assigned") {
        let hub_key = outcome
            .body
            .pointer("/registrationState/tpm/authenticationKey")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                DeviceError::BadResponse("assigned without registrationState.tpm".into())
            })?;
        crate::tpm::activate(tpm, hub_key).await?;
    }
    Ok(outcome)
}

/// Runs register (and polls) on an open connection.
pub async fn exchange(
    config: &DeviceConfig,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    client
        .subscribe(dps::RESPONSE_FILTER, QoS::AtLeastOnce)
        .await
        .map_err(client_error)?;
    wait_for(eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await?;
    register_on(config, client, eventloop, payload).await
}

/// Registers (and polls, and retries after 429) on a connection already subscribed to
/// the responses.
pub async fn register_on(
    config: &DeviceConfig,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    let mut body = serde_json::json!({ "registrationId": config.registration_id });
    if let Some(payload) = payload {
        body["payload"] = payload;
    }
    if let Some(csr) = &config.csr {
        body["csr"] = Value::from(csr.as_str());
    }
    if let DeviceAuth::Tpm(tpm) = &config.auth {
        body["tpm"] = crate::tpm::register_member(tpm.as_ref());
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let (mut polls, mut throttled, mut rid) = (0, 0, 1u32);
    // The operation being polled, once a 202 named one.
    let mut polling: Option<String> = None;
    let mut request = dps::register_topic(&rid.to_string());
    let mut request_body = body.clone();
    loop {
        client
            .publish(
                request.as_str(),
                config.request_qos,
                false,
                request_body.clone(),
            )
            .await
            .map_err(client_error)?;
        let Packet::Publish(publish) = wait_for(
            eventloop,
            "a DPS response",
            |p| matches!(p, Packet::Publish(p) if p.topic.starts_with(dps::RESPONSE_PREFIX)),
        )
        .await?
        else {
            return Err(DeviceError::BadResponse("not a publish".into()));
        };
        let response = dps::parse_response_topic(&publish.topic).ok_or_else(|| {
            DeviceError::BadResponse(format!("`{}` is not a response topic", publish.topic))
        })?;
        let (status, retry_after) = (response.status, response.retry_after);
        let answer: Value = serde_json::from_slice(&publish.payload)
            .map_err(|e| DeviceError::BadResponse(e.to_string()))?;
        let wait = Duration::from_secs(u64::from(retry_after.unwrap_or(1)));
        rid += 1;
        match status {
            202 => {
                polls += 1;
                let operation_id = answer
                    .get("operationId")
                    .and_then(Value::as_str)
                    .ok_or_else(|| DeviceError::BadResponse("202 without operationId".into()))?;
                request = dps::poll_topic(&rid.to_string(), operation_id);
                polling = Some(operation_id.to_owned());
                request_body = Vec::new();
            }
            429 => {
                // Throttled: the same request again after `retry-after`, as the SDKs do.
                throttled += 1;
                request = match &polling {
                    None => dps::register_topic(&rid.to_string()),
                    Some(operation_id) => dps::poll_topic(&rid.to_string(), operation_id),
                };
            }
            _ => {
                return Ok(Outcome {
                    status,
                    body: answer,
                    polls,
                    throttled,
                })
            }
        }
        tokio::time::sleep(wait).await;
    }
}

fn client_error(e: rumqttc::ClientError) -> DeviceError {
    DeviceError::Connection(e.to_string())
}

/// Polls the event loop until a packet matches, for at most 10 s.
pub async fn wait_for(
    eventloop: &mut EventLoop,
    what: &'static str,
    wanted: impl Fn(&Packet) -> bool,
) -> Result<Packet, DeviceError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return Err(DeviceError::Timeout(what)),
            Ok(Ok(Event::Incoming(packet))) if wanted(&packet) => return Ok(packet),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(DeviceError::Connection(e.to_string())),
        }
    }
}
