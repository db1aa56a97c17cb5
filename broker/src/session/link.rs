//! This session's rumqttd link (DESIGN: everything else goes through rumqttd's router):
//! created on first use, fed packet by packet, read for deliveries, released when the
//! session ends.

use rumqttd::local::LinkRx;
use rumqttd::protocol::Packet;
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncWrite};

use super::settling::{Delivery, Message};
use super::subscriptions::FilterOptions;
use super::{Close, Filters, Session};
use crate::codec;

/// What the router told the session.
pub(super) enum RouterEvent {
    /// A message for the client.
    Deliver(Box<rumqttd::Forward>),
    /// The router paused the link until it is woken.
    Unscheduled,
    /// The router closed the link (another connection took the client id over).
    Disconnected,
    /// An acknowledgement for the client (full MQTT sessions): SUBACK, UNSUBACK,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack(Box<Packet>),
    /// The link failed.
    Failed(String),
    /// Nothing for the client (acknowledgements the session does not wait for).
    Nothing,
}

impl From<Notification> for RouterEvent {
    fn from(notification: Notification) -> RouterEvent {
        match notification {
            Notification::Forward(forward) => RouterEvent::Deliver(Box::new(forward)),
            Notification::Unschedule => RouterEvent::Unscheduled,
            Notification::Disconnect(..) => RouterEvent::Disconnected,
            ack @ Notification::DeviceAck(_) => match Option::<Packet>::from(ack) {
                Some(packet) => RouterEvent::Ack(Box::new(packet)),
                None => RouterEvent::Nothing,
            },
            _ => RouterEvent::Nothing,
        }
    }
}

/// The next event of the link; never resolves while the session has none.
pub(super) async fn next_event(rx: &mut Option<LinkRx>) -> RouterEvent {
    match rx {
        Some(rx) => next_event_of(rx).await,
        None => std::future::pending().await,
    }
}

/// The next event of `rx`.
pub(super) async fn next_event_of(rx: &mut LinkRx) -> RouterEvent {
    match rx.next().await {
        Ok(Some(notification)) => notification.into(),
        Ok(None) => RouterEvent::Nothing,
        Err(e) => RouterEvent::Failed(e.to_string()),
    }
}

/// A router delivery to a full MQTT session, as its client is to get it: with the
/// published QoS, RETAIN as MQTT says, the `$` of a `$`-topic back, and not wanted if
/// the client's subscriptions (`filters`) do not want it.
pub(super) fn delivery(forward: rumqttd::Forward, filters: &Filters) -> Delivery {
    let mut properties = forward.properties;
    let (routed, router_pkid) = codec::qos_and_pkid(&forward.publish);
    let carried = crate::qos::take(&mut properties);
    let (topic, dollar) = crate::dollar::from_router_topic(&forward.publish.topic);
    // The router reads retained messages only for a new subscription, with no log
    // position.
    let retained_read = forward.cursor.is_none();
    // Which of the client's subscriptions match matters only for a `$`-topic, a
    // retained read (the latest matching subscription says whether it wanted them) and
    // a message published retained (Retain As Published): not for the plain live
    // message, which the router routed by its subscriptions.
    let matching: Vec<FilterOptions> = if dollar || retained_read || carried.retained {
        let client_topic = String::from_utf8_lossy(topic);
        filters
            .iter()
            .filter(|(filter, _)| crate::dollar::matches(&client_topic, filter))
            .map(|(_, options)| *options)
            .collect()
    } else {
        Vec::new()
    };
    let wanted_retained = matching
        .iter()
        .max_by_key(|o| o.sequence)
        .is_none_or(|o| o.retained_on_subscribe);
    let wanted = !carried.expired
        && (!dollar || !matching.is_empty())
        && (!retained_read || wanted_retained);
    let retain = if retained_read {
        forward.publish.retain
    } else {
        carried.retained && matching.iter().any(|o| o.retain_as_published)
    };
    let topic = if dollar {
        forward.publish.topic.slice(1..)
    } else {
        forward.publish.topic.clone()
    };
    Delivery {
        message: Message {
            topic,
            payload: forward.publish.payload,
            retain,
            properties,
            deadline: carried.deadline,
        },
        routed,
        router_pkid,
        published: carried.qos,
        cursor: forward.cursor,
        wanted,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends into this session's router link, creating it on first use.
    pub(super) async fn router_send(&mut self, packet: Packet) -> Result<(), Close> {
        if self.link_tx.is_none() {
            let (tx, rx) = self
                .shared
                .router
                .link(&self.client_id)
                .await
                .map_err(|e| Close::Router(e.to_string()))?;
            self.link_tx = Some(tx);
            self.link_rx = Some(rx);
        }
        if let Some(tx) = self.link_tx.as_mut() {
            tx.send(packet)
                .await
                .map_err(|e| Close::Router(e.to_string()))?;
        }
        Ok(())
    }

    /// Tells the router this session is gone, so it drops its subscriptions.
    pub(super) async fn release_link(&mut self) {
        if let Some(mut tx) = self.link_tx.take() {
            crate::router::release(&mut tx).await;
        }
        self.link_rx = None;
    }

    /// Acts on what the router said: deliver publishes, wake it when it asks.
    pub(super) async fn on_router(&mut self, event: RouterEvent) -> Result<(), Close> {
        match event {
            RouterEvent::Nothing => Ok(()),
            // The router drops a full session's link when another connection takes its
            // client id.
            RouterEvent::Failed(_) | RouterEvent::Disconnected if self.passthrough => {
                self.taken_over().await
            }
            RouterEvent::Failed(e) => Err(Close::Router(e)),
            RouterEvent::Disconnected => Err(Close::Router("router disconnected the link".into())),
            RouterEvent::Deliver(forward) if self.passthrough => self.deliver(*forward).await,
            RouterEvent::Deliver(forward) => self.deliver_to_device(*forward),
            RouterEvent::Ack(packet) if self.passthrough => match *packet {
                Packet::SubAck(ack, _) => self.subscribed(ack),
                Packet::ConnAck(..) => Ok(()),
                Packet::PubRel(pubrel, properties) => {
                    let actions = self.settling_mut().router_released(pubrel, properties);
                    self.act(actions).await
                }
                packet => self.send(packet),
            },
            // DPS sessions wait for their acknowledgements where they need them.
            RouterEvent::Ack(_) => Ok(()),
            RouterEvent::Unscheduled => {
                if let Some(rx) = self.link_rx.as_ref() {
                    rx.wake().await.map_err(|e| Close::Router(e.to_string()))?;
                }
                Ok(())
            }
        }
    }

    /// Another connection took this session's client id: MQTT 5 says so first.
    async fn taken_over(&mut self) -> Result<(), Close> {
        self.say_disconnect(
            rumqttd::protocol::DisconnectReasonCode::SessionTakenOver,
            "another connection took the client id".into(),
        )
        .await;
        Err(Close::TakenOver)
    }

    /// A router delivery to a DPS session: at QoS 0.
    fn deliver_to_device(&mut self, forward: rumqttd::Forward) -> Result<(), Close> {
        // Nothing more reaches a device taken out of service.
        if let Some(cut) = self.cut() {
            return Err(Close::OutOfService(cut));
        }
        let mut properties = forward.properties;
        if crate::qos::take(&mut properties).expired {
            return Ok(());
        }
        let properties = self.codec.properties(properties);
        let publish = codec::publish(
            &forward.publish.topic,
            forward.publish.payload,
            0,
            0,
            forward.publish.retain,
            false,
        );
        self.send(Packet::Publish(publish, properties))
    }

    /// A router delivery to a full MQTT session, at the lower of the published QoS and
    /// the router's (the subscription's), under this session's packet id
    /// (`settling.rs`).
    async fn deliver(&mut self, forward: rumqttd::Forward) -> Result<(), Close> {
        let delivery = delivery(forward, &self.subscriptions);
        let actions = self.settling_mut().deliver(delivery);
        self.act(actions).await
    }

    /// The client's PUBACK or PUBREC of a router delivery.
    pub(super) async fn acknowledged(&mut self, pkid: u16) -> Result<(), Close> {
        let actions = self.settling_mut().client_acknowledged(pkid);
        self.act(actions).await
    }

    /// The client's PUBCOMP of a router delivery.
    pub(super) async fn completed(&mut self, pkid: u16) -> Result<(), Close> {
        let actions = self.settling_mut().client_completed(pkid);
        self.act(actions).await
    }

    pub(super) async fn act(&mut self, actions: Vec<super::settling::Action>) -> Result<(), Close> {
        for action in actions {
            match action {
                super::settling::Action::ToClient(packet) => self.send(packet)?,
                super::settling::Action::ToRouter(packet) => self.router_send(packet).await?,
            }
        }
        Ok(())
    }
}
