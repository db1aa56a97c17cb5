//! PROTOCOL E: the session of a device whose hub is this gateway, and the operator
//! writes that reach such devices.
//!
//! Device side: `$iothub/` requests are answered by the responder in process (PUBACK
//! first, then the answer on `$iothub/twin/res/...`); the four subscriptions of the
//! hub protocol (twin answers, desired patches, methods, cloud-to-device messages) are
//! held here, not in the router; what the hub state sends the session (a desired patch,
//! a method call, news of queued messages) arrives on its `HubLink`.
//!
//! Operator side: `hub/twins/{id}/desired|tags` and `hub/methods/{id}/{corr}` are
//! answered by the responder; a cloud-to-device message to a device of the local hub
//! goes to its durable queue instead of the router.

use std::collections::HashMap;

use bytes::Bytes;
use rumqttd::protocol::{DisconnectReasonCode, Packet, PubAck, PubAckReason};
use tokio::io::{AsyncRead, AsyncWrite};

use edgedps_responder::hub::{HubEvent, HubLink, QueueRefusal};
use edgedps_topics::hub::{self as hub_topics, DeviceboundFilter, HubRequest, OperatorWrite};

use super::{Close, Session};
use crate::codec::{self, Version};

/// Cloud-to-device messages a session has sent and not had acknowledged, at most.
const MESSAGES_IN_FLIGHT: usize = 8;

/// What a hub session holds besides an ordinary device session.
pub(super) struct HubSession {
    /// As the device spelled it at CONNECT.
    device_id: String,
    link: HubLink,
    /// QoS granted on each of the hub protocol's subscriptions, once subscribed.
    twin_qos: Option<u8>,
    desired_qos: Option<u8>,
    methods_qos: Option<u8>,
    /// The cloud-to-device subscription, by either spelling IoT Hub accepts (its own
    /// id, or `+`); messages go at the higher QoS of the two while either is held.
    messages_qos: Option<u8>,
    messages_any_id_qos: Option<u8>,
    credentials_qos: Option<u8>,
    /// Cloud-to-device messages sent at QoS 1: packet id -> queue sequence.
    in_flight: HashMap<u16, u64>,
    /// The last queued message sent on this connection.
    last_sent: Option<u64>,
    /// When the SAS token the device connected with expires: the session ends then, as
    /// at IoT Hub (the SDKs connect again with a new token before).
    /// One timer for the life of the session, not one per wake-up.
    token_expires: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl HubSession {
    /// `token_expires`: Unix seconds.
    pub(super) fn new(device_id: String, link: HubLink, token_expires: Option<u64>) -> HubSession {
        let token_expires = token_expires.map(|at| {
            let left = at.saturating_sub(edgedps_responder::unix_now());
            Box::pin(tokio::time::sleep(std::time::Duration::from_secs(left)))
        });
        HubSession {
            token_expires,
            device_id,
            link,
            twin_qos: None,
            desired_qos: None,
            methods_qos: None,
            messages_qos: None,
            messages_any_id_qos: None,
            credentials_qos: None,
            in_flight: HashMap::new(),
            last_sent: None,
        }
    }
}

impl HubSession {
    /// Where the QoS of `filter` is kept, if it is one of the hub protocol's filters.
    fn slot(&mut self, filter: &str) -> Option<&mut Option<u8>> {
        match filter {
            hub_topics::TWIN_RESPONSE_FILTER => Some(&mut self.twin_qos),
            hub_topics::DESIRED_FILTER => Some(&mut self.desired_qos),
            hub_topics::METHODS_FILTER => Some(&mut self.methods_qos),
            hub_topics::CREDENTIALS_FILTER => Some(&mut self.credentials_qos),
            _ => match hub_topics::devicebound_subscription(filter, &self.device_id)? {
                DeviceboundFilter::Own => Some(&mut self.messages_qos),
                DeviceboundFilter::AnyId => Some(&mut self.messages_any_id_qos),
            },
        }
    }

    /// The QoS cloud-to-device messages go at; `None` while not subscribed.
    fn messages_granted(&self) -> Option<u8> {
        self.messages_qos.max(self.messages_any_id_qos)
    }
}

/// What wakes a hub session besides its socket and its router link.
pub(super) enum HubWake {
    Event(HubEvent),
    TokenExpired,
}

/// The next wake-up of a hub session; never, for other sessions.
pub(super) async fn next_wake(hub: &mut Option<Box<HubSession>>) -> HubWake {
    let Some(hub) = hub else {
        return std::future::pending().await;
    };
    let expiry = async {
        match hub.token_expires.as_mut() {
            Some(timer) => timer.as_mut().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = expiry => HubWake::TokenExpired,
        event = hub.link.next() => match event {
            Some(event) => HubWake::Event(event),
            None => std::future::pending().await,
        },
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A device's `$iothub/` publish.
    pub(super) async fn hub_request(
        &mut self,
        topic: &str,
        body: &[u8],
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        let Some(device_id) = self.hub.as_ref().map(|h| h.device_id.clone()) else {
            return Err(self.denied("publish", topic).await);
        };
        let request = match hub_topics::parse_request(topic) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, %topic, reason = %e, "IoT Hub request refused");
                return Err(self.denied("publish", topic).await);
            }
        };
        self.puback(meta)?;
        let answer = match &request {
            HubRequest::TwinGet { .. } => self.shared.responder.twin_get(&device_id),
            HubRequest::TwinReported { .. } => {
                self.shared.responder.twin_reported(&device_id, body).await
            }
            HubRequest::IssueCertificate { rid } => {
                let answers = self
                    .shared
                    .responder
                    .renew_certificate(&device_id, rid, body)
                    .await;
                let Some(qos) = self.hub.as_ref().and_then(|h| h.credentials_qos) else {
                    tracing::warn!(client_id = %self.client_id, "certificate renewal before subscribing to $iothub/credentials/res/#; no answer sent");
                    return Ok(());
                };
                for answer in answers {
                    let topic = hub_topics::credentials_response_topic(answer.status, rid);
                    self.send_to_device(&topic, answer.body.into(), qos)?;
                }
                return Ok(());
            }
            HubRequest::MethodResponse { status, rid } => {
                let answered = self
                    .shared
                    .responder
                    .method_answered(&device_id, rid, *status, body);
                self.publish(answered.into_iter().collect()).await;
                return Ok(());
            }
        };
        if answer.status == 429 {
            self.shared.metrics.throttled("twin");
        }
        self.publish(answer.publish).await;
        let Some(qos) = self.hub.as_ref().and_then(|h| h.twin_qos) else {
            tracing::warn!(client_id = %self.client_id, "twin request before subscribing to $iothub/twin/res/#; no answer sent");
            return Ok(());
        };
        let topic = hub_topics::twin_response_topic(
            answer.status,
            request.rid(),
            answer.version,
            answer.retry_after,
        );
        self.send_to_device(&topic, answer.body.into(), qos)
    }

    /// A filter of the hub protocol: held here, with the QoS granted. `None` for any
    /// other filter (or any other session).
    pub(super) fn hub_subscribe(&mut self, filter: &str, requested: u8) -> Option<u8> {
        let hub = self.hub.as_mut()?;
        let granted = requested.min(1);
        *hub.slot(filter)? = Some(granted);
        hub.link.take_methods(hub.methods_qos.is_some());
        Some(granted)
    }

    /// Gives up a filter of the hub protocol; false for any other filter.
    pub(super) fn hub_unsubscribe(&mut self, filter: &str) -> bool {
        let Some(hub) = self.hub.as_mut() else {
            return false;
        };
        let Some(slot) = hub.slot(filter) else {
            return false;
        };
        *slot = None;
        hub.link.take_methods(hub.methods_qos.is_some());
        true
    }

    /// A hub session woke: an event of the hub state, or its token ran out.
    pub(super) async fn on_hub_wake(&mut self, wake: HubWake) -> Result<(), Close> {
        match wake {
            HubWake::Event(event) => self.on_hub_event(event),
            HubWake::TokenExpired => {
                let why = "the SAS token the device connected with has expired";
                self.say_disconnect(DisconnectReasonCode::NotAuthorized, why.to_owned())
                    .await;
                Err(Close::Denied(why.to_owned()))
            }
        }
    }

    /// What the hub state sent this session.
    fn on_hub_event(&mut self, event: HubEvent) -> Result<(), Close> {
        let Some(hub) = self.hub.as_ref() else {
            return Ok(());
        };
        match event {
            HubEvent::Desired { version, body } => match hub.desired_qos {
                Some(qos) => {
                    self.send_to_device(&hub_topics::desired_topic(version), body.into(), qos)
                }
                None => Ok(()),
            },
            HubEvent::Method {
                method,
                rid,
                payload,
            } => match hub.methods_qos {
                Some(qos) => self.send_to_device(
                    &hub_topics::method_request_topic(&method, &rid),
                    payload.into(),
                    qos,
                ),
                // Unsubscribed since: the call times out.
                None => Ok(()),
            },
            HubEvent::Messages => self.deliver_messages(),
        }
    }

    /// Sends queued cloud-to-device messages while there is room in flight.
    pub(super) fn deliver_messages(&mut self) -> Result<(), Close> {
        let Some(hub) = self.hub.as_ref() else {
            return Ok(());
        };
        let Some(qos) = hub.messages_granted() else {
            return Ok(());
        };
        let room = MESSAGES_IN_FLIGHT.saturating_sub(hub.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        let device_id = hub.device_id.clone();
        let messages = match self
            .shared
            .responder
            .queued_messages(&device_id, hub.last_sent, room)
        {
            Ok(messages) => messages,
            Err(e) => {
                tracing::error!(%device_id, error = %e, "cannot read the cloud-to-device queue; the messages stay queued");
                return Ok(());
            }
        };
        for (sequence, message) in messages {
            let topic = hub_topics::devicebound_topic(&device_id, &message.property_bag);
            let pkid = self.send_to_device_with_id(&topic, message.payload.into(), qos)?;
            let Some(hub) = self.hub.as_mut() else {
                return Ok(());
            };
            hub.last_sent = Some(sequence);
            if qos == 0 {
                self.delivered(&device_id, sequence);
            } else {
                hub.in_flight.insert(pkid, sequence);
            }
        }
        Ok(())
    }

    /// A device's PUBACK: a cloud-to-device message leaves its queue.
    pub(super) fn hub_acknowledged(&mut self, pkid: u16) -> Result<(), Close> {
        let Some(hub) = self.hub.as_mut() else {
            return Ok(());
        };
        let Some(sequence) = hub.in_flight.remove(&pkid) else {
            return Ok(());
        };
        let device_id = hub.device_id.clone();
        self.delivered(&device_id, sequence);
        self.deliver_messages()
    }

    fn delivered(&self, device_id: &str, sequence: u64) {
        if let Err(e) = self.shared.responder.message_delivered(device_id, sequence) {
            tracing::warn!(%device_id, sequence, error = %e, "a delivered cloud-to-device message could not be removed; it will be delivered again");
        }
    }

    fn send_to_device(&mut self, topic: &str, payload: Bytes, qos: u8) -> Result<(), Close> {
        self.send_to_device_with_id(topic, payload, qos).map(|_| ())
    }

    fn send_to_device_with_id(
        &mut self,
        topic: &str,
        payload: Bytes,
        qos: u8,
    ) -> Result<u16, Close> {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        let publish = codec::publish(topic.as_bytes(), payload, qos, pkid, false, false);
        self.send(Packet::Publish(publish, None))?;
        Ok(pkid)
    }

    /// An operator's publish under `hub/`.
    pub(super) async fn hub_operator_write(
        &mut self,
        topic: &str,
        write: Result<OperatorWrite, hub_topics::HubTopicError>,
        body: &[u8],
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        let responder = self.shared.responder.clone();
        let publications = match write {
            Ok(OperatorWrite::Desired { device_id }) => {
                responder.twin_desired(&device_id, body).await
            }
            Ok(OperatorWrite::Tags { device_id }) => responder.twin_tags(&device_id, body).await,
            Ok(OperatorWrite::Invoke {
                device_id,
                correlation_id,
            }) => {
                let invoked = responder.invoke_method(&device_id, &correlation_id, body);
                if let Some((rid, timeout)) = invoked.waiting {
                    let publisher = self.shared.publisher.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(timeout).await;
                        if let Some(timed_out) = responder.method_timed_out(&rid) {
                            publisher.publish(vec![timed_out]).await;
                        }
                    });
                }
                invoked.publish
            }
            Ok(OperatorWrite::Record { .. }) | Err(_) => {
                let reason = match write {
                    Err(e) => e.to_string(),
                    Ok(_) => "the twin record is written by edgedps; patch `/desired` or `/tags`"
                        .to_owned(),
                };
                tracing::warn!(client_id = %self.client_id, %topic, %reason, "operator publish under hub/ refused");
                let event =
                    self.shared
                        .responder
                        .topic_refused(&self.client_id, "publish", topic, &reason);
                self.publish(vec![event]).await;
                return self.refuse_publish(meta);
            }
        };
        self.publish(publications).await;
        self.puback(meta)
    }

    /// An operator's cloud-to-device message: queued if the local hub serves the
    /// device (then acknowledged once on disk); `false` if it is the router's.
    pub(super) async fn queue_message(
        &mut self,
        device_id: &str,
        property_bag: &str,
        payload: &[u8],
        meta: codec::PublishMeta,
    ) -> Result<bool, Close> {
        let outcome = self
            .shared
            .responder
            .queue_message(device_id, property_bag, payload)
            .await;
        let reason = match outcome {
            Ok(queued) => {
                tracing::debug!(%device_id, sequence = queued.sequence, queued = queued.queued, "cloud-to-device message queued");
                self.puback(meta)?;
                return Ok(true);
            }
            Err(QueueRefusal::NotLocal) => return Ok(false),
            Err(QueueRefusal::Full(_)) => PubAckReason::QuotaExceeded,
            Err(QueueRefusal::Store(_)) => PubAckReason::UnspecifiedError,
        };
        let why = outcome.err().map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(client_id = %self.client_id, %device_id, reason = %why, "cloud-to-device message refused");
        let event = self.shared.responder.topic_refused(
            &self.client_id,
            "publish",
            &hub_topics::devicebound_topic(device_id, property_bag),
            &why,
        );
        self.publish(vec![event]).await;
        // MQTT 5 says why; MQTT 3.1.1 has no way to, beyond the event.
        match (self.codec.version, meta.qos) {
            (Version::V5, 1) => self.send(Packet::PubAck(
                PubAck {
                    pkid: meta.pkid,
                    reason,
                },
                None,
            ))?,
            _ => self.puback(meta)?,
        }
        Ok(true)
    }
}
