//! An operator on the local listener: writes records under `dps/` and waits for their
//! results; the bodies of enrollments and groups.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;

use edgedps_topics::admin::RecordKind;

/// An MQTT client with the operator role on the local listener.
pub struct Operator {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

impl Operator {
    pub async fn connect(port: u16) -> Operator {
        Self::connect_with(port, |_| {})
            .await
            .expect("operator connects")
    }

    /// An operator of `[[operators]]`, by name and password.
    pub async fn connect_as(port: u16, name: &str, password: &str) -> Result<Operator, String> {
        Self::connect_with(port, |options| {
            options.set_credentials(name, password);
        })
        .await
    }

    /// Connects with options adjusted, and subscribes to the results; the error says
    /// why the connection was refused.
    pub async fn connect_with(
        port: u16,
        adjust: impl FnOnce(&mut MqttOptions),
    ) -> Result<Operator, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut options = MqttOptions::new(format!("operator-{n}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        adjust(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        edgedps_device::provision::wait_for(&mut eventloop, "CONNACK", |p| {
            matches!(p, Packet::ConnAck(_))
        })
        .await
        .map_err(|e| e.to_string())?;
        client
            .subscribe(edgedps_topics::admin::RESULTS_FILTER, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        edgedps_device::provision::wait_for(&mut eventloop, "SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await
        .expect("suback");
        Ok(Operator { client, eventloop })
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
            &RecordKind::Enrollment.record_topic(registration_id),
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
        let result_topic = edgedps_topics::admin::result_topic_of(topic)
            .unwrap_or_else(|| panic!("`{topic}` is not an operator record"));
        self.publish_for_result(topic, body, &result_topic).await
    }

    /// Retires a device (`dps/admin/retire/{id}`) and returns the result.
    pub async fn retire(&mut self, registration_id: &str, body: &[u8]) -> Value {
        let result = self
            .publish_for_result(
                &edgedps_topics::admin::retire_topic(registration_id),
                body,
                &edgedps_topics::admin::retire_result_topic(registration_id),
            )
            .await;
        serde_json::from_slice(&result).expect("result is JSON")
    }

    /// Asks `dps/admin/explain/{id}` (not retained) and returns the explanation.
    pub async fn explain(&mut self, registration_id: &str, body: &[u8]) -> Value {
        let result_topic = edgedps_topics::admin::explain_result_topic(registration_id);
        self.client
            .publish(
                edgedps_topics::admin::explain_topic(registration_id),
                QoS::AtLeastOnce,
                false,
                body.to_vec(),
            )
            .await
            .expect("publish");
        let packet = edgedps_device::provision::wait_for(
            &mut self.eventloop,
            "explanation",
            |p| matches!(p, Packet::Publish(p) if p.topic == result_topic),
        )
        .await
        .expect("the explanation arrives");
        match packet {
            Packet::Publish(p) => serde_json::from_slice(&p.payload).expect("explanation is JSON"),
            _ => Value::Null,
        }
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

    /// Publishes at QoS 1, not retained, and waits for its PUBACK.
    pub async fn send(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish");
        edgedps_device::provision::wait_for(&mut self.eventloop, "PUBACK", |p| {
            matches!(p, Packet::PubAck(_))
        })
        .await
        .expect("PUBACK");
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
    edgedps_device::credentials::new_symmetric_key().expect("randomness")
}

/// A client with `options` subscribed to `filter`, once its SUBACK is in.
pub async fn subscribed(
    options: rumqttc::MqttOptions,
    filter: &str,
    qos: rumqttc::QoS,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    client
        .subscribe(filter, qos)
        .await
        .expect("subscribe queued");
    edgedps_device::provision::wait_for(&mut eventloop, "SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_))
    })
    .await
    .expect("SUBACK");
    (client, eventloop)
}
