//! PROTOCOL A3: a device's `$dps/` requests, answered in process by the responder.
//! PUBACK first, then the response on `$dps/registrations/res/...`; the records and
//! events of the answer go to the router.

use rumqttd::protocol::{Packet, PublishProperties};
use tokio::io::{AsyncRead, AsyncWrite};

use edgedps_policies::acl::Role;
use edgedps_topics::admin::AttestationType;
use edgedps_topics::dps::{self, DeviceRequest};
use edgedps_topics::encoding::{Encoding, CBOR_CONTENT_TYPE};

use super::{Close, Identity, Session};
use crate::codec;

/// The attestation kind, for metrics.
pub(crate) fn attestation_label(kind: AttestationType) -> &'static str {
    match kind {
        AttestationType::X509 => "x509",
        AttestationType::SymmetricKey => "symmetric_key",
        AttestationType::Tpm => "tpm",
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn dps_request(
        &mut self,
        topic: &str,
        body: &[u8],
        content_type: Option<&str>,
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        let Identity::Device(device) = &self.identity else {
            return Err(self.denied("publish", topic).await);
        };
        let device = device.clone();
        let request = dps::parse_request(topic)
            .map_err(|e| Close::Violation(format!("bad DPS request: {e}")))?;
        // PUBACK before the response.
        self.puback(meta)?;
        let started = std::time::Instant::now();
        let reply = match &request {
            DeviceRequest::Register { .. } => {
                self.dps_encoding = Encoding::detect(body, content_type);
                let encoding = self.dps_encoding;
                // What the CONNECT read serves the first register only.
                let standing = self.standing.take().map(|s| *s);
                self.shared
                    .responder
                    .register(&device, standing, body, encoding)
                    .await
            }
            DeviceRequest::Poll { operation_id, .. } => {
                let encoding = match Encoding::detect(body, content_type) {
                    Encoding::Cbor => Encoding::Cbor,
                    Encoding::Json => self.dps_encoding,
                };
                self.shared.responder.poll(&device, operation_id, encoding)
            }
        };
        let (kind, took) = match &request {
            DeviceRequest::Register { .. } => ("register", Some(started.elapsed())),
            DeviceRequest::Poll { .. } => ("poll", None),
        };
        self.shared.metrics.registration(
            kind,
            attestation_label(device.kind),
            reply.status,
            reply.assigned_device_id.is_some(),
            took,
        );
        self.publish(reply.publish).await;
        if let (Some(device_id), None) = (reply.assigned_device_id, self.cut()) {
            // After `assigned`, the device may use `devices/{deviceId}/#`.
            self.role = Role::Device {
                device_id: Some(device_id),
            };
        }
        let Some(qos) = self.dps_qos else {
            tracing::warn!(client_id = %self.client_id, "DPS request before subscribing to $dps/registrations/res/#; no response sent");
            return Ok(());
        };
        let topic = dps::response_topic(reply.status, request.rid(), reply.retry_after);
        let pkid = self.pkid();
        let publish = codec::publish(
            topic.as_bytes(),
            bytes::Bytes::from(reply.body),
            qos,
            pkid,
            false,
            false,
        );
        let properties = (reply.encoding == Encoding::Cbor).then(|| PublishProperties {
            content_type: Some(CBOR_CONTENT_TYPE.into()),
            ..Default::default()
        });
        self.send(Packet::Publish(publish, self.codec.properties(properties)))
    }
}
