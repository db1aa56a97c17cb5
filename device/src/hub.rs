//! Our device client on the hub connection (PROTOCOL E, F): connect to the assigned hub
//! as an IoT Hub device, and renew the operational certificate before it expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{json, Value};

use crate::credentials::CertificateRequest;
use crate::provision::DeviceAuth;
use crate::DeviceError;

/// An open hub session.
pub struct HubConnection {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
    pub device_id: String,
    rid: u32,
}

/// Connects to hub `host:port` as `device_id` with `auth` (X.509, or a SAS token made
/// from the key), trusting `server_ca_pem`.
pub async fn connect(
    host: &str,
    port: u16,
    device_id: &str,
    auth: &DeviceAuth,
    server_ca_pem: &[u8],
) -> Result<HubConnection, DeviceError> {
    let mut options = MqttOptions::new(device_id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let username = format!("{host}/{device_id}/?api-version=2021-04-12");
    let tls: Arc<rustls::ClientConfig> = match auth {
        DeviceAuth::SymmetricKey { key } => {
            let token = edgedps_policies::sas::sign_hub(key, host, device_id, unix_now() + 3600)?;
            options.set_credentials(username, token);
            crate::tls::client_config(server_ca_pem, None)?
        }
        DeviceAuth::X509 { chain_pem, key_pem } => {
            options.set_credentials(username, "");
            crate::tls::client_config(server_ca_pem, Some((chain_pem, key_pem)))?
        }
        DeviceAuth::Tpm(tpm) => {
            let sr = edgedps_policies::sas::hub_resource(host, device_id);
            let token = crate::tpm::token(tpm, sr, unix_now() + 3600, None).await?;
            options.set_credentials(username, token);
            crate::tls::client_config(server_ca_pem, None)?
        }
    };
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Err(_) => return Err(DeviceError::Timeout("CONNACK")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(DeviceError::Refused(code))
            }
            Ok(Err(e)) => return Err(DeviceError::Connection(e.to_string())),
        }
    }
    Ok(HubConnection {
        client,
        eventloop,
        device_id: device_id.to_owned(),
        rid: 0,
    })
}

/// A renewed certificate: the chain (DER, leaf first) and its key (PEM).
pub struct Renewed {
    pub chain: Vec<Vec<u8>>,
    pub key_pem: String,
    /// The renewal's request id (what a later `replace` names).
    pub request_id: String,
}

impl HubConnection {
    /// Renews the operational certificate: a new key and request, `202` then `200`.
    /// `replace`: `*`, a request id, or none.
    pub async fn renew(&mut self, replace: Option<&str>) -> Result<Renewed, DeviceError> {
        let request = CertificateRequest::new(&self.device_id)
            .map_err(|e| DeviceError::Bundle(format!("certificate request: {e}")))?;
        self.client
            .subscribe("$iothub/credentials/res/#", QoS::AtLeastOnce)
            .await
            .map_err(|e| DeviceError::Connection(e.to_string()))?;
        self.rid += 1;
        let rid = format!("renew-{}-{}", unix_now(), self.rid);
        let mut body = json!({"id": self.device_id, "csr": request.csr});
        if let Some(replace) = replace {
            body["replace"] = Value::from(replace);
        }
        self.client
            .publish(
                format!("$iothub/credentials/POST/issueCertificate/?$rid={rid}"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&body).unwrap_or_default(),
            )
            .await
            .map_err(|e| DeviceError::Connection(e.to_string()))?;
        let answer_prefix = "$iothub/credentials/res/";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(deadline, self.eventloop.poll())
                .await
                .map_err(|_| DeviceError::Timeout("certificate renewal"))?
                .map_err(|e| DeviceError::Connection(e.to_string()))?;
            let Event::Incoming(Packet::Publish(publish)) = event else {
                continue;
            };
            let Some(rest) = publish.topic.strip_prefix(answer_prefix) else {
                continue;
            };
            if !rest.ends_with(&format!("$rid={rid}")) {
                continue;
            }
            let status = rest.split('/').next().unwrap_or_default();
            match status {
                "202" => continue,
                "200" => {
                    let chain: Vec<String> = serde_json::from_slice(&publish.payload)
                        .map_err(|e| DeviceError::BadResponse(e.to_string()))?;
                    let chain = chain
                        .iter()
                        .map(|b| {
                            use base64::Engine;
                            base64::engine::general_purpose::STANDARD
                                .decode(b)
                                .map_err(|e| DeviceError::BadResponse(e.to_string()))
                        })
                        .collect::<Result<_, _>>()?;
                    return Ok(Renewed {
                        chain,
                        key_pem: request.key_pem,
                        request_id: rid,
                    });
                }
                other => {
                    return Err(DeviceError::Renewal(format!(
                        "{other}: {}",
                        String::from_utf8_lossy(&publish.payload)
                    )))
                }
            }
        }
    }
}

/// Whether a certificate (DER) should be renewed now: less than `fraction` of its
/// lifetime is left, or it cannot be read.
pub fn due_for_renewal(leaf: &[u8], fraction: f64) -> bool {
    let Ok(info) = edgedps_policies::x509::CertificateInfo::read(leaf) else {
        return true;
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    let lifetime = (info.not_after - info.not_before).max(1) as f64;
    let left = (info.not_after - now) as f64;
    left < lifetime * fraction
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
