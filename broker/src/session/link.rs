//! This session's rumqttd link (DESIGN: everything else goes through rumqttd's router):
//! created on first use, fed packet by packet, read for deliveries, released when the
//! session ends.

use rumqttd::local::LinkRx;
use rumqttd::protocol::Packet;
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Close, Session};
use crate::codec;

/// What the router told the session.
pub(super) enum RouterEvent {
    /// A message for the client.
    Deliver(Box<rumqttd::Forward>),
    /// The router paused the link until it is woken.
    Unscheduled,
    /// The router closed the link.
    Disconnected,
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
            _ => RouterEvent::Nothing,
        }
    }
}

/// The next event of the link; never resolves while the session has none.
pub(super) async fn next_event(rx: &mut Option<LinkRx>) -> RouterEvent {
    match rx {
        Some(rx) => match rx.next().await {
            Ok(Some(notification)) => notification.into(),
            Ok(None) => RouterEvent::Nothing,
            Err(e) => RouterEvent::Failed(e.to_string()),
        },
        None => std::future::pending().await,
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
            let disconnect = rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            };
            let _ = tx.send(Packet::Disconnect(disconnect, None)).await;
        }
        self.link_rx = None;
    }

    /// Acts on what the router said: deliver publishes, wake it when it asks.
    pub(super) async fn on_router(&mut self, event: RouterEvent) -> Result<(), Close> {
        match event {
            RouterEvent::Nothing => Ok(()),
            RouterEvent::Failed(e) => Err(Close::Router(e)),
            RouterEvent::Deliver(forward) => {
                // Nothing more reaches a device taken out of service.
                if let Some(cut) = self.cut() {
                    return Err(Close::OutOfService(cut));
                }
                let properties = self.codec.properties(forward.properties);
                let publish = codec::publish(
                    &forward.publish.topic,
                    &forward.publish.payload,
                    0,
                    0,
                    forward.publish.retain,
                );
                self.send(Packet::Publish(publish, properties))
            }
            RouterEvent::Unscheduled => {
                if let Some(rx) = self.link_rx.as_ref() {
                    rx.wake().await.map_err(|e| Close::Router(e.to_string()))?;
                }
                Ok(())
            }
            RouterEvent::Disconnected => Err(Close::Router("router disconnected the link".into())),
        }
    }
}
