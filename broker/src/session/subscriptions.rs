//! SUBSCRIBE and UNSUBSCRIBE. A device's `$dps/registrations/res/#` is held here (the
//! router refuses `$` filters); every other filter passes the topic ACL and the
//! per-session limit and goes to the router, and the SUBACK waits until the router has
//! applied it.

use std::time::Duration;

use rumqttd::protocol::{
    Filter, Packet, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{timeout_at, Instant};

use edgedps_policies::acl;
use edgedps_topics::dps;

use super::{Close, Identity, Session};

/// What a full MQTT session asked of one of its subscriptions, beyond its QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterOptions {
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// Whether the subscribe that made it wanted the retained messages (MQTT 5 Retain
    /// Handling 0, or 1 for a new subscription).
    pub retained_on_subscribe: bool,
    /// Later subscribes have larger numbers: the router reads retained messages for the
    /// latest one.
    pub sequence: u64,
}

/// A SUBSCRIBE of a full MQTT session the router has not acknowledged yet.
#[derive(Debug)]
pub(super) struct Pending {
    /// The codes decided here (refused filters), `None` where the router's code goes.
    codes: Vec<Option<SubscribeReasonCode>>,
    /// The records each filter at a position in `codes` reads once granted.
    readings: Vec<(usize, super::records::Reading)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn subscribe(
        &mut self,
        subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
    ) -> Result<(), Close> {
        if self.passthrough {
            // MQTT 5 properties (the subscription identifier) go to the router.
            return self.subscribe_through(subscribe, properties).await;
        }
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut forward = Vec::new();
        let mut refused = Vec::new();
        for filter in subscribe.filters {
            let requested = filter.qos as u8;
            if filter.path == dps::RESPONSE_FILTER && matches!(self.identity, Identity::Device(_)) {
                let granted = requested.min(1);
                self.dps_qos = Some(granted);
                codes.push(self.codec.subscribe_granted(granted));
            } else if let Some(granted) = self.hub_subscribe(&filter.path, requested) {
                codes.push(self.codec.subscribe_granted(granted));
            } else if !self.admissible(&filter.path, &mut refused) {
                codes.push(self.codec.subscribe_refused());
            } else {
                // Router deliveries go out at QoS 0 (see docs/protocol.md).
                self.sequence += 1;
                let options = FilterOptions {
                    retain_as_published: false,
                    retained_on_subscribe: true,
                    sequence: self.sequence,
                };
                self.hold_filter(filter.path.clone(), options);
                codes.push(self.codec.subscribe_granted(0));
                forward.push(Filter {
                    path: filter.path,
                    qos: QoS::AtMostOnce,
                    nolocal: filter.nolocal,
                    preserve_retain: filter.preserve_retain,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                });
            }
        }
        if !refused.is_empty() {
            self.publish(refused).await;
        }
        let mut early = Vec::new();
        if !forward.is_empty() {
            self.router_send(Packet::Subscribe(
                Subscribe {
                    pkid: subscribe.pkid,
                    filters: forward,
                },
                None,
            ))
            .await?;
            early = self.await_router_ack().await?;
        }
        self.send(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes: codes,
            },
            None,
        ))?;
        // Retained messages the router sent with its acknowledgement follow the SUBACK,
        // and a hub session's queued cloud-to-device messages.
        for notification in early {
            self.on_router(notification.into()).await?;
        }
        self.deliver_messages()
    }

    /// Holds `filter` with `options` (counted in `Shared::interest` while held).
    fn hold_filter(&mut self, filter: String, options: FilterOptions) {
        if !self.subscriptions.contains_key(&filter) {
            self.shared.interest.add(&filter);
        }
        self.subscriptions.insert(filter, options);
    }

    /// Gives up `filter`.
    fn drop_filter(&mut self, filter: &str) {
        if self.subscriptions.remove(filter).is_some() {
            self.shared.interest.remove(filter);
        }
    }

    /// Whether this session may hold `filter`: a valid filter, allowed by the topic ACL,
    /// within `limits.max_subscriptions_per_session`. A filter the ACL refuses adds an
    /// event to `refused`.
    fn admissible(&self, filter: &str, refused: &mut Vec<edgedps_responder::Publication>) -> bool {
        if !rumqttd::protocol::valid_filter(filter)
            || crate::dollar::forbidden(filter)
            || !acl::may_subscribe(&self.role, filter)
        {
            tracing::warn!(client_id = %self.client_id, %filter, "subscription refused");
            refused.push(self.shared.responder.topic_refused(
                &self.client_id,
                "subscribe",
                filter,
                "not allowed for this session",
            ));
            return false;
        }
        if !self.subscriptions.contains_key(filter)
            && self.subscriptions.len() >= self.shared.limits.max_subscriptions_per_session
        {
            tracing::warn!(client_id = %self.client_id, %filter, "subscription refused: limits.max_subscriptions_per_session reached");
            return false;
        }
        true
    }

    /// A full MQTT session's SUBSCRIBE: refused filters are answered here, the others go
    /// to the router with the QoS asked for; the SUBACK goes out when the router has
    /// acknowledged them (`link.rs`), with the router's codes in their places.
    async fn subscribe_through(
        &mut self,
        subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
    ) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut forward = Vec::new();
        let mut refused = Vec::new();
        let mut readings = Vec::new();
        let subscription_id = properties.as_ref().and_then(|p| p.id);
        for mut filter in subscribe.filters {
            if !self.admissible(&filter.path, &mut refused) {
                codes.push(Some(self.codec.subscribe_refused()));
            } else {
                let existed = self.subscriptions.contains_key(&filter.path);
                self.sequence += 1;
                let options = FilterOptions {
                    retain_as_published: filter.preserve_retain,
                    retained_on_subscribe: match filter.retain_forward_rule {
                        RetainForwardRule::OnEverySubscribe => true,
                        RetainForwardRule::OnNewSubscribe => !existed,
                        RetainForwardRule::Never => false,
                    },
                    sequence: self.sequence,
                };
                if let Some(reading) =
                    super::records::Reading::of(&filter.path, &options, subscription_id)
                {
                    readings.push((codes.len(), reading));
                }
                self.hold_filter(filter.path.clone(), options);
                codes.push(None);
                if let std::borrow::Cow::Owned(routed) =
                    crate::dollar::to_router_filter(&filter.path)
                {
                    filter.path = routed;
                }
                forward.push(filter);
            }
        }
        if !refused.is_empty() {
            self.publish(refused).await;
        }
        if forward.is_empty() {
            let return_codes = codes.into_iter().flatten().collect();
            return self.send(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                },
                None,
            ));
        }
        self.pending_subacks
            .insert(subscribe.pkid, Pending { codes, readings });
        self.router_send(Packet::Subscribe(
            Subscribe {
                pkid: subscribe.pkid,
                filters: forward,
            },
            properties,
        ))
        .await
    }

    /// The router acknowledged a SUBSCRIBE of a full MQTT session: its codes go where
    /// this session left room for them.
    pub(super) fn subscribed(&mut self, ack: SubAck) -> Result<(), Close> {
        let Some(pending) = self.pending_subacks.remove(&ack.pkid) else {
            return self.send(Packet::SubAck(ack, None));
        };
        let mut routed = ack.return_codes.into_iter();
        let return_codes: Vec<_> = pending
            .codes
            .into_iter()
            .map(|code| {
                code.or_else(|| routed.next())
                    .unwrap_or(SubscribeReasonCode::Unspecified)
            })
            .collect();
        // The records of the granted filters follow the SUBACK.
        for (position, reading) in pending.readings {
            if return_codes.get(position).is_some_and(granted) {
                super::records::start(&mut self.readings, reading);
            }
        }
        self.send(Packet::SubAck(
            SubAck {
                pkid: ack.pkid,
                return_codes,
            },
            None,
        ))
    }

    /// Waits until the router has applied what this session sent it: only then is the
    /// subscription live, and only then may the client be told so (otherwise a publish
    /// right after the SUBACK could miss it). Returns what arrived meanwhile.
    async fn await_router_ack(&mut self) -> Result<Vec<Notification>, Close> {
        let mut early = Vec::new();
        let Some(rx) = self.link_rx.as_mut() else {
            return Ok(early);
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match timeout_at(deadline, rx.next()).await {
                Err(_) => return Err(Close::Router("no acknowledgement within 10 s".into())),
                Ok(Err(e)) => return Err(Close::Router(e.to_string())),
                Ok(Ok(Some(Notification::DeviceAck(_)))) => return Ok(early),
                Ok(Ok(Some(Notification::Unschedule))) => {
                    rx.wake().await.map_err(|e| Close::Router(e.to_string()))?
                }
                Ok(Ok(Some(other))) => early.push(other),
                Ok(Ok(None)) => {}
            }
        }
    }

    pub(super) async fn unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
    ) -> Result<(), Close> {
        if self.passthrough {
            // The router answers (its UNSUBACK passes through, `link.rs`).
            let mut unsubscribe = unsubscribe;
            for filter in &mut unsubscribe.filters {
                self.drop_filter(filter);
                super::records::stop(&mut self.readings, filter);
                if let std::borrow::Cow::Owned(routed) = crate::dollar::to_router_filter(filter) {
                    *filter = routed;
                }
            }
            return self
                .router_send(Packet::Unsubscribe(unsubscribe, properties))
                .await;
        }
        let reasons = vec![UnsubAckReason::Success; unsubscribe.filters.len()];
        let forward: Vec<String> = unsubscribe
            .filters
            .into_iter()
            .filter(|f| !dps::is_dps_topic(f) && !self.hub_unsubscribe(f))
            .collect();
        for filter in &forward {
            self.drop_filter(filter);
        }
        if !forward.is_empty() && self.link_tx.is_some() {
            self.router_send(Packet::Unsubscribe(
                Unsubscribe {
                    pkid: unsubscribe.pkid,
                    filters: forward,
                },
                None,
            ))
            .await?;
        }
        self.send(Packet::UnsubAck(
            UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
            },
            None,
        ))
    }
}

/// Whether a SUBACK code grants the subscription.
fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(
        code,
        SubscribeReasonCode::QoS0
            | SubscribeReasonCode::QoS1
            | SubscribeReasonCode::QoS2
            | SubscribeReasonCode::Success(_)
    )
}
