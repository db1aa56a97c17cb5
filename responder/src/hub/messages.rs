//! Cloud-to-device messages (PROTOCOL E): each device of the local hub has a durable
//! queue. An operator's message is on disk before its publish is acknowledged; a live
//! session subscribed to its messages is told at once, and a device that is away gets
//! them when it next subscribes. A message leaves the queue when the device
//! acknowledges it (QoS 1) or when it is sent (QoS 0): at least once. A queue holds
//! at most `max_queued_messages`; beyond that new messages are refused, and a message
//! older than `message_ttl_seconds` is dropped undelivered.

use edgedps_topics::hub::{self as hub_topics, QueuedMessage};
use edgedps_topics::identity::RegistrationId;

use super::HubEvent;
use crate::{unix_now, Error, Responder};

/// A message in its device's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub sequence: u64,
    /// Messages in the queue, this one included.
    pub queued: usize,
}

/// Why an operator's message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueRefusal {
    /// The local hub does not serve the device: the message is the router's.
    #[error("not a device of the local hub")]
    NotLocal,
    #[error("the device's queue holds {0} messages, the most it keeps")]
    Full(usize),
    #[error("store: {0}")]
    Store(String),
}

impl From<Error> for QueueRefusal {
    fn from(e: Error) -> QueueRefusal {
        QueueRefusal::Store(e.to_string())
    }
}

impl From<crate::StoreError> for QueueRefusal {
    fn from(e: crate::StoreError) -> QueueRefusal {
        QueueRefusal::Store(e.to_string())
    }
}

impl Responder {
    /// Queues an operator's message for `device_id` and tells its live sessions.
    pub async fn queue_message(
        &self,
        device_id: &str,
        property_bag: &str,
        payload: &[u8],
    ) -> Result<Enqueued, QueueRefusal> {
        if self.local_registration(device_id)?.is_none() {
            return Err(QueueRefusal::NotLocal);
        }
        let id = RegistrationId::from(device_id);
        let now = unix_now();
        let enqueued = {
            let _one_at_a_time = self.queue_writes.lock().await;
            let waiting = self.live_messages(&id, None, usize::MAX, now)?.len();
            let limit = self.settings.hub.max_queued_messages;
            if waiting >= limit {
                return Err(QueueRefusal::Full(limit));
            }
            let message_id = self.random_token(12);
            let message = QueuedMessage {
                property_bag: hub_topics::devicebound_bag(property_bag, device_id, &message_id),
                payload: payload.to_vec(),
                enqueued: now,
                expires: now.saturating_add(self.settings.hub.message_ttl_seconds),
            };
            let sequence = self.store.hub().push_message(&id, &message)?;
            Enqueued {
                sequence,
                queued: waiting + 1,
            }
        };
        self.store.durable().await?;
        self.hub_links.tell(&id, &HubEvent::Messages);
        Ok(enqueued)
    }

    /// The device's queued messages after `after`, oldest first, at most `limit`;
    /// expired ones are dropped on the way.
    pub fn queued_messages(
        &self,
        device_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, QueuedMessage)>, Error> {
        self.live_messages(&RegistrationId::from(device_id), after, limit, unix_now())
    }

    fn live_messages(
        &self,
        id: &RegistrationId,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<(u64, QueuedMessage)>, Error> {
        let mut out = Vec::new();
        let mut after = after;
        loop {
            let page = self.store.hub().messages(id, after, limit.min(64))?;
            let Some((last, _)) = page.last() else {
                return Ok(out);
            };
            after = Some(*last);
            for (sequence, message) in page {
                if message.expires <= now {
                    tracing::info!(device_id = %id.as_str(), sequence, enqueued = message.enqueued, "cloud-to-device message expired undelivered; dropped");
                    self.store.hub().remove_message(id, sequence)?;
                    continue;
                }
                out.push((sequence, message));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }

    /// The device took message `sequence` (its PUBACK, or a QoS 0 send): it leaves the
    /// queue. Not waited on disk: if that is lost, the device gets it again.
    pub fn message_delivered(&self, device_id: &str, sequence: u64) -> Result<(), Error> {
        self.store
            .hub()
            .remove_message(&RegistrationId::from(device_id), sequence)?;
        Ok(())
    }
}
