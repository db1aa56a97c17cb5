//! Will messages (MQTT 3.1.1 3.1.2.5, MQTT 5 3.1.3.2): kept from the CONNECT of a session
//! that is not a DPS session, published when the session ends in any way but a normal
//! DISCONNECT (keep-alive expiry, network loss, a protocol error, a takeover), or after a
//! DISCONNECT with reason 0x04. MQTT 5's Will Delay Interval (at most the Session Expiry
//! Interval) defers it; a new connection with the same client id within the delay
//! cancels it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{LastWill, LastWillProperties, PublishProperties};

use super::lock;
use crate::router::Publisher;

/// The will of one session.
#[derive(Debug, Clone)]
pub(super) struct Will {
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    retain: bool,
    properties: Option<PublishProperties>,
    delay: Duration,
}

impl Will {
    /// The will of a CONNECT, if it has one. `session_expiry` is MQTT 5's, in seconds.
    pub fn from_connect(
        will: Option<LastWill>,
        properties: Option<LastWillProperties>,
        session_expiry: u32,
    ) -> Option<Will> {
        let will = will?;
        let delay = properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0)
            .min(session_expiry);
        let properties = properties.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        });
        Some(Will {
            topic: will.topic,
            payload: will.message,
            qos: will.qos as u8,
            retain: will.retain,
            properties,
            delay: Duration::from_secs(u64::from(delay)),
        })
    }
}

/// Which connection holds each client id now, so that a will whose delay runs out
/// after the client came back is not sent.
#[derive(Default)]
pub struct Owners {
    current: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl Owners {
    /// A new connection of `client_id`; returns its token.
    pub fn claim(&self, client_id: &str) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.current).insert(client_id.to_owned(), token);
        token
    }

    /// The connection `token` of `client_id` ended.
    pub fn release(&self, client_id: &str, token: u64) {
        let mut current = lock(&self.current);
        if current.get(client_id) == Some(&token) {
            current.remove(client_id);
        }
    }

    /// No other connection of `client_id` came since `token`'s.
    pub(super) fn unclaimed_since(&self, client_id: &str, token: u64) -> bool {
        lock(&self.current)
            .get(client_id)
            .is_none_or(|current| *current <= token)
    }
}

/// Publishes `will` for the connection `token` of `client_id`, now or after its delay.
pub(super) async fn publish(
    will: Will,
    client_id: String,
    token: u64,
    owners: Arc<Owners>,
    publisher: Publisher,
) {
    let send = async move {
        if !will.delay.is_zero() {
            tokio::time::sleep(will.delay).await;
            if !owners.unclaimed_since(&client_id, token) {
                tracing::debug!(%client_id, "will not published: the client came back within its delay");
                return;
            }
        }
        tracing::debug!(%client_id, topic = %String::from_utf8_lossy(&will.topic), "will published");
        publisher
            .will(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
                will.properties,
            )
            .await;
    };
    tokio::spawn(send);
}
