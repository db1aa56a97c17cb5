//! A device of the local hub (PROTOCOL E): a server whose hub is itself, a device
//! provisioned to it, and an IoT Hub session of that device over rumqttc.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, QoS};
use serde_json::Value;

use crate::live::{LiveDevice, Protocol};
use crate::{pki, sas, Operator, Server};

/// The local hub's name in the tests: the name the test server certificate carries.
pub const LOCAL: &str = "localhost";

pub fn hub_username(host: &str, device_id: &str) -> String {
    format!("{host}/{device_id}/?api-version=2021-04-12&DeviceClientType=tests")
}

pub fn hub_token(key: &str, host: &str, device_id: &str) -> String {
    edgedps_policies::sas::sign_hub(key, host, device_id, edgedps_responder::unix_now() + 600)
        .expect("token")
}

/// A server whose hubs are the local one and, if `cloud`, `hub-a.example.net`;
/// `adjust` may change the local hub's settings.
pub async fn local_hub_server(
    cloud: bool,
    adjust: impl FnOnce(&mut edgedps::config::LocalHubConfig),
) -> Server {
    Server::start_with(|config| {
        if !cloud {
            config.hubs.clear();
        }
        let mut local = edgedps::config::LocalHubConfig::named(LOCAL);
        adjust(&mut local);
        config.local_hub = Some(local);
    })
    .await
}

/// An operator's patch of `device_id`'s twin (`section`: `desired` or `tags`): the
/// result edgedps publishes.
pub async fn patch_twin(
    operator: &mut Operator,
    device_id: &str,
    section: &str,
    body: &[u8],
) -> Value {
    let result = operator
        .publish_for_result(
            &format!("hub/twins/{device_id}/{section}"),
            body,
            &format!("dps/admin/results/twins/{device_id}"),
        )
        .await;
    serde_json::from_slice(&result).expect("the result is JSON")
}

/// Publishes `body` to `topic` and returns the JSON published on `answer_topic`.
pub async fn ask_json(
    operator: &mut Operator,
    topic: &str,
    body: &[u8],
    answer_topic: &str,
) -> Value {
    let answer = operator.publish_for_result(topic, body, answer_topic).await;
    serde_json::from_slice(&answer).expect("the answer is JSON")
}

/// A hub CONNECT of `device_id` with a client certificate: the refusal, or `None` when
/// accepted.
pub async fn hub_connect_with_certificate(
    server: &Server,
    device_id: &str,
    auth: crate::DeviceAuth,
) -> Option<ConnectReturnCode> {
    let config = server.device(device_id, auth);
    let tls = edgedps_device::provision::tls_config(&config).expect("client TLS");
    let username = hub_username(LOCAL, device_id);
    crate::connack_with(server.devices_port, device_id, &username, "", tls).await
}

/// Provisions `id` (symmetric key) and returns its assigned hub.
pub async fn provision(server: &Server, id: &str, key: &str) -> String {
    let mut device = LiveDevice::connect(server, id, &sas(key), Protocol::V311)
        .await
        .expect("DPS connect");
    let (status, body) = device.register().await;
    assert_eq!(status, 200, "{body}");
    body["registrationState"]["assignedHub"]
        .as_str()
        .expect("assigned hub")
        .to_owned()
}

/// A hub session of a device over rumqttc, acknowledging what it receives unless made
/// with `manual_acks`.
pub struct HubDevice {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
    rid: u32,
}

impl HubDevice {
    /// An open hub session of `device_id` (symmetric key), its CONNACK received.
    pub async fn connect(server: &Server, device_id: &str, key: &str) -> HubDevice {
        Self::connect_with(server.devices_port, device_id, key, false).await
    }

    pub async fn connect_with(
        port: u16,
        device_id: &str,
        key: &str,
        manual_acks: bool,
    ) -> HubDevice {
        let token = hub_token(key, LOCAL, device_id);
        Self::connect_token(port, device_id, &token, manual_acks).await
    }

    /// An open hub session of `device_id` with the SAS token `token`.
    pub async fn connect_token(
        port: u16,
        device_id: &str,
        token: &str,
        manual_acks: bool,
    ) -> HubDevice {
        Self::connect_over(false, port, device_id, token, manual_acks).await
    }

    /// As [`HubDevice::connect_token`], over MQTT over WebSocket if `websocket`.
    pub async fn connect_over(
        websocket: bool,
        port: u16,
        device_id: &str,
        token: &str,
        manual_acks: bool,
    ) -> HubDevice {
        let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
            .expect("client TLS");
        let path = websocket.then_some(edgedps_device::provision::WEBSOCKET_PATH);
        let mut options =
            edgedps_device::provision::mqtt_options(device_id, LOCAL, port, tls, path);
        options.set_credentials(hub_username(LOCAL, device_id), token);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_manual_acks(manual_acks);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                assert_eq!(ack.code, ConnectReturnCode::Success)
            }
            other => panic!("no CONNACK: {other:?}"),
        }
        HubDevice {
            client,
            eventloop,
            rid: 0,
        }
    }

    /// Publishes at QoS 1 and waits for its PUBACK.
    pub async fn send(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish");
        assert!(
            self.wait("PUBACK", |p| matches!(p, Packet::PubAck(_)))
                .await
                .is_some(),
            "no PUBACK for {topic}"
        );
    }

    /// Subscribes at QoS 1 and returns the QoS granted.
    pub async fn subscribe(&mut self, filter: &str) -> rumqttc::SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        match self
            .wait("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await
        {
            Some(Packet::SubAck(ack)) => ack.return_codes[0],
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }

    /// The next packet `wanted` takes within 5 s (others are passed over).
    pub async fn wait(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Option<Packet> {
        self.wait_for(Duration::from_secs(5), what, wanted).await
    }

    /// Whether a publish whose topic starts with `prefix` arrives within `limit`: for
    /// checking that nothing comes.
    pub async fn publish_within(&mut self, limit: Duration, prefix: &str) -> bool {
        self.wait_for(
            limit,
            prefix,
            |p| matches!(p, Packet::Publish(p) if p.topic.starts_with(prefix)),
        )
        .await
        .is_some()
    }

    async fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        wanted: impl Fn(&Packet) -> bool,
    ) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Incoming(packet))) if wanted(&packet) => return Some(packet),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{what}: connection lost: {e}"),
                Err(_) => return None,
            }
        }
    }

    /// The next publish whose topic starts with `prefix`, within 5 s.
    pub async fn next_publish(&mut self, prefix: &str) -> Option<rumqttc::Publish> {
        match self
            .wait(
                prefix,
                |p| matches!(p, Packet::Publish(p) if p.topic.starts_with(prefix)),
            )
            .await
        {
            Some(Packet::Publish(publish)) => Some(publish),
            _ => None,
        }
    }

    /// A twin request on `path` (`GET` or `PATCH/properties/reported`): the answer's
    /// status, its topic's `$version`, and its body (JSON, or null when empty).
    pub async fn twin(&mut self, path: &str, body: &[u8]) -> (u16, Option<u64>, Value) {
        let (status, version, raw) = self.twin_raw(path, body).await;
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).expect("JSON answer")
        };
        (status, version, body)
    }

    /// [`HubDevice::twin`] with the answer's body as the bytes sent.
    pub async fn twin_raw(&mut self, path: &str, body: &[u8]) -> (u16, Option<u64>, Vec<u8>) {
        self.rid += 1;
        let rid = self.rid;
        self.client
            .publish(
                format!("$iothub/twin/{path}/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                body.to_vec(),
            )
            .await
            .expect("publish");
        let answer = self
            .next_publish("$iothub/twin/res/")
            .await
            .unwrap_or_else(|| panic!("no answer to the twin request {path}"));
        let rest = answer.topic.trim_start_matches("$iothub/twin/res/");
        let (status, query) = rest.split_once("/?").expect("answer topic");
        let mut version = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("$rid", got)) => assert_eq!(got, rid.to_string(), "{}", answer.topic),
                Some(("$version", v)) => version = v.parse().ok(),
                _ => {}
            }
        }
        (
            status.parse().expect("status"),
            version,
            answer.payload.to_vec(),
        )
    }

    /// Whether the session is closed within 5 s.
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}
