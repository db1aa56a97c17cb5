//! Devices against the device listener: their configuration and credentials, raw
//! CONNECTs, and DPS requests on an open connection.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;

use edgedps_device::provision::{DeviceAuth, DeviceConfig};
use edgedps_topics::dps;

use crate::{pki, Ca, Identity, Operator, Server, ID_SCOPE};

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

/// Connects to the device listener with raw credentials (no client certificate) and
/// returns the CONNACK refusal code, or `None` when the connection was accepted.
pub async fn connack_refusal(
    port: u16,
    client_id: &str,
    username: &str,
    password: &str,
) -> Option<rumqttc::ConnectReturnCode> {
    let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
        .expect("client TLS");
    connack_with(port, client_id, username, password, tls).await
}

/// As [`connack_refusal`], over the given client TLS (with a client certificate, say).
pub async fn connack_with(
    port: u16,
    client_id: &str,
    username: &str,
    password: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Option<rumqttc::ConnectReturnCode> {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_credentials(username, password);
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
        |p| matches!(p, Packet::Publish(p) if p.topic.starts_with(dps::RESPONSE_PREFIX)),
    )
    .await;
    let Ok(Packet::Publish(p)) = answer else {
        panic!("no answer on {topic}: {answer:?}");
    };
    let (status, retry_after) = response_status(&p.topic);
    Answer {
        status,
        retry_after,
        body: p.payload.to_vec(),
    }
}

/// (status, retry-after) of a response topic; (0, None) for any other topic.
pub fn response_status(topic: &str) -> (u16, Option<u32>) {
    dps::parse_response_topic(topic)
        .map(|r| (r.status, r.retry_after))
        .unwrap_or((0, None))
}
