//! One provisioning run: CONNECT, subscribe to the responses, register, poll while the
//! service says `assigning`, return the final answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
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
}

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

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("connection refused with CONNACK code {0:?}")]
    Refused(ConnectReturnCode),
    #[error("connection: {0}")]
    Connection(String),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("SAS: {0}")]
    Sas(#[from] edgedps_policies::sas::SasError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("response is not JSON: {0}")]
    BadResponse(String),
}

/// The final answer of the service.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status of the response topic (200, 401, ...).
    pub status: u16,
    pub body: Value,
    /// How many 202s came before it.
    pub polls: u32,
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

/// Opens an MQTT connection as the device and waits for the CONNACK.
pub async fn connect(config: &DeviceConfig) -> Result<(AsyncClient, EventLoop), DeviceError> {
    let mut options = MqttOptions::new(&config.registration_id, &config.host, config.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    let identity = match &config.auth {
        DeviceAuth::SymmetricKey { key } => {
            let expiry = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
                + 3600;
            let token = edgedps_policies::sas::sign(
                key,
                &config.id_scope,
                &config.registration_id,
                expiry,
            )?;
            options.set_credentials(config.username(), token);
            None
        }
        DeviceAuth::X509 { chain_pem, key_pem } => {
            options.set_credentials(config.username(), "");
            Some((chain_pem.as_slice(), key_pem.as_slice()))
        }
    };
    let tls = crate::tls::client_config(&config.server_ca_pem, identity)?;
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
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

/// Provisions the device: the whole DPS exchange on one connection.
pub async fn register(
    config: &DeviceConfig,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    let (client, mut eventloop) = connect(config).await?;
    let result = exchange(config, &client, &mut eventloop, payload).await;
    let _ = client.try_disconnect();
    result
}

/// Runs register (and polls) on an open connection.
pub async fn exchange(
    config: &DeviceConfig,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    payload: Option<Value>,
) -> Result<Outcome, DeviceError> {
    let mqtt = |e: rumqttc::ClientError| DeviceError::Connection(e.to_string());
    client
        .subscribe(dps::RESPONSE_FILTER, QoS::AtLeastOnce)
        .await
        .map_err(mqtt)?;
    wait_for(eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await?;
    let mut body = serde_json::json!({ "registrationId": config.registration_id });
    if let Some(payload) = payload {
        body["payload"] = payload;
    }
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await
        .map_err(mqtt)?;
    let mut polls = 0;
    let mut rid = 1;
    loop {
        let Packet::Publish(publish) = wait_for(
            eventloop,
            "a DPS response",
            |p| matches!(p, Packet::Publish(p) if p.topic.starts_with("$dps/registrations/res/")),
        )
        .await?
        else {
            return Err(DeviceError::BadResponse("not a publish".into()));
        };
        let (status, retry_after) = parse_response_topic(&publish.topic);
        let body: Value = serde_json::from_slice(&publish.payload)
            .map_err(|e| DeviceError::BadResponse(e.to_string()))?;
        if status != 202 {
            return Ok(Outcome {
                status,
                body,
                polls,
            });
        }
        polls += 1;
        let operation_id = body
            .get("operationId")
            .and_then(Value::as_str)
            .ok_or_else(|| DeviceError::BadResponse("202 without operationId".into()))?
            .to_owned();
        tokio::time::sleep(Duration::from_secs(u64::from(retry_after.unwrap_or(1)))).await;
        rid += 1;
        client
            .publish(
                format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"),
                QoS::AtLeastOnce,
                false,
                Vec::new(),
            )
            .await
            .map_err(mqtt)?;
    }
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

/// `$dps/registrations/res/{status}/?$rid=..&retry-after=..` -> (status, retry-after).
pub fn parse_response_topic(topic: &str) -> (u16, Option<u32>) {
    let rest = topic
        .strip_prefix("$dps/registrations/res/")
        .unwrap_or_default();
    let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
    let retry_after = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("retry-after="))
        .and_then(|v| v.parse().ok());
    (status.parse().unwrap_or(0), retry_after)
}

/// Shared client TLS configuration type, re-exported for callers that build their own.
pub type ClientConfig = Arc<rustls::ClientConfig>;
