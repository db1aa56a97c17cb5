//! A device that stays connected, over MQTT 3.1.1 or 5, with a SAS token or a client
//! certificate: it registers, uses its `devices/{id}/#` topics, and notices when edgedps
//! closes its connection (and, on MQTT 5, with which DISCONNECT reason).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Packet as Packet5, SubscribeReasonCode as Reason5,
};
use rumqttc::v5::{ConnectionError as Error5, Event as Event5, StateError};
use rumqttc::{ConnectionError, Event, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;
use tokio::time::{timeout_at, Instant};

use crate::{DeviceAuth, Server, ID_SCOPE};

/// The MQTT version a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

enum Client {
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// MQTT 5: the server sent DISCONNECT with this reason first.
    Disconnect(DisconnectReasonCode),
    /// The connection was closed (MQTT 3.1.1 has no server DISCONNECT).
    Connection(String),
}

pub struct LiveDevice {
    pub registration_id: String,
    client: Client,
    rid: u32,
}

impl LiveDevice {
    /// Connects as `registration_id`; `Err` carries the refusal as text.
    pub async fn connect(
        server: &Server,
        registration_id: &str,
        auth: &DeviceAuth,
        protocol: Protocol,
    ) -> Result<LiveDevice, String> {
        let config = server.device(registration_id, auth.clone());
        let tls = edgedps_device::provision::tls_config(&config).map_err(|e| e.to_string())?;
        let password = match auth {
            DeviceAuth::SymmetricKey { key } => edgedps_policies::sas::sign(
                key,
                ID_SCOPE,
                registration_id,
                edgedps_responder::unix_now() + 600,
            )
            .map_err(|e| e.to_string())?,
            // A TPM device's first CONNECT: no token.
            DeviceAuth::X509 { .. } | DeviceAuth::Tpm(_) => String::new(),
        };
        let transport = rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls));
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = match protocol {
            Protocol::V311 => {
                let mut options =
                    rumqttc::MqttOptions::new(registration_id, "localhost", server.devices_port);
                options.set_credentials(config.username(), password);
                options.set_keep_alive(Duration::from_secs(30));
                options.set_transport(transport);
                let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
                loop {
                    match timeout_at(deadline, eventloop.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                            return Err(format!("refused: {code:?}"))
                        }
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => return Err("no CONNACK".into()),
                    }
                }
                Client::V311(client, Box::new(eventloop))
            }
            Protocol::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(
                    registration_id,
                    "localhost",
                    server.devices_port,
                );
                options.set_credentials(config.username(), password);
                options.set_keep_alive(Duration::from_secs(30));
                options.set_transport(transport);
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 16);
                loop {
                    match timeout_at(deadline, eventloop.poll()).await {
                        Ok(Ok(Event5::Incoming(Packet5::ConnAck(_)))) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(Error5::ConnectionRefused(code))) => {
                            return Err(format!("refused: {code:?}"))
                        }
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => return Err("no CONNACK".into()),
                    }
                }
                Client::V5(client, Box::new(eventloop))
            }
        };
        let mut device = LiveDevice {
            registration_id: registration_id.to_owned(),
            client,
            rid: 0,
        };
        if !device.subscribe(edgedps_topics::dps::RESPONSE_FILTER).await {
            return Err("the DPS response subscription was refused".into());
        }
        Ok(device)
    }

    /// Registers on this connection: the status of the answer and its body.
    pub async fn register(&mut self) -> (u16, Value) {
        self.rid += 1;
        let topic = edgedps_topics::dps::register_topic(&self.rid.to_string());
        let body = serde_json::to_vec(&serde_json::json!({"registrationId": self.registration_id}))
            .unwrap_or_default();
        self.publish(&topic, body).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.next(deadline).await {
                Ok(Some((topic, payload)))
                    if topic.starts_with(edgedps_topics::dps::RESPONSE_PREFIX) =>
                {
                    let (status, _) = crate::response_status(&topic);
                    let body = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                    return (status, body);
                }
                Ok(_) => {}
                Err(closed) => panic!(
                    "{}: closed while registering: {closed:?}",
                    self.registration_id
                ),
            }
        }
    }

    /// Subscribes and says whether the filter was granted.
    pub async fn subscribe(&mut self, filter: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        match &mut self.client {
            Client::V311(client, eventloop) => {
                client
                    .subscribe(filter, QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
                loop {
                    match timeout_at(deadline, eventloop.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                            return ack.return_codes[0] != SubscribeReasonCode::Failure
                        }
                        Ok(Ok(_)) => {}
                        other => panic!("no SUBACK for {filter}: {other:?}"),
                    }
                }
            }
            Client::V5(client, eventloop) => {
                client
                    .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
                loop {
                    match timeout_at(deadline, eventloop.poll()).await {
                        Ok(Ok(Event5::Incoming(Packet5::SubAck(ack)))) => {
                            return matches!(ack.return_codes[0], Reason5::Success(_))
                        }
                        Ok(Ok(_)) => {}
                        other => panic!("no SUBACK for {filter}: {other:?}"),
                    }
                }
            }
        }
    }

    /// Publishes at QoS 1 (queued; see [`LiveDevice::closed_within`] and
    /// [`LiveDevice::receive`] for what follows).
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) {
        self.send(topic, payload, false).await
    }

    /// Publishes a retained message at QoS 1.
    pub async fn publish_retained(&mut self, topic: &str, payload: Vec<u8>) {
        self.send(topic, payload, true).await
    }

    async fn send(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        match &mut self.client {
            Client::V311(client, _) => client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .expect("publish"),
            Client::V5(client, _) => client
                .publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .await
                .expect("publish"),
        }
    }

    /// Publishes at QoS 1 and says whether edgedps acknowledged it and kept the session
    /// (a refused publish closes the session).
    pub async fn publish_accepted(&mut self, topic: &str) -> bool {
        self.publish(topic, b"{}".to_vec()).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let acked = match &mut self.client {
                Client::V311(_, eventloop) => match timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => Some(true),
                    Ok(Ok(_)) => None,
                    _ => Some(false),
                },
                Client::V5(_, eventloop) => match timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event5::Incoming(Packet5::PubAck(_)))) => Some(true),
                    Ok(Ok(_)) => None,
                    _ => Some(false),
                },
            };
            if let Some(acked) = acked {
                return acked;
            }
        }
    }

    /// The next publish that arrives within `wait`, if any; panics if the connection
    /// closes.
    pub async fn receive(&mut self, wait: Duration) -> Option<(String, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        match self.next(deadline).await {
            Ok(publish) => publish,
            Err(closed) => panic!("{}: closed: {closed:?}", self.registration_id),
        }
    }

    /// Waits up to `wait` for edgedps to close the connection.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Closed> {
        let deadline = Instant::now() + wait;
        loop {
            match self.next(deadline).await {
                Ok(None) => return None,
                Ok(Some(_)) => {}
                Err(closed) => return Some(closed),
            }
        }
    }

    /// The next publish before `deadline` (`Ok(None)` when none came), or how the
    /// connection closed.
    async fn next(&mut self, deadline: Instant) -> Result<Option<(String, Vec<u8>)>, Closed> {
        loop {
            match &mut self.client {
                Client::V311(_, eventloop) => match timeout_at(deadline, eventloop.poll()).await {
                    Err(_) => return Ok(None),
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        return Ok(Some((p.topic, p.payload.to_vec())))
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(Closed::Connection(e.to_string())),
                },
                Client::V5(_, eventloop) => match timeout_at(deadline, eventloop.poll()).await {
                    Err(_) => return Ok(None),
                    Ok(Ok(Event5::Incoming(Packet5::Publish(p)))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        return Ok(Some((topic, p.payload.to_vec())));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(Error5::MqttState(StateError::ServerDisconnect {
                        reason_code,
                        ..
                    }))) => return Err(Closed::Disconnect(reason_code)),
                    Ok(Err(e)) => return Err(Closed::Connection(e.to_string())),
                },
            }
        }
    }
}
