//! The operator plane's records for a new subscription (DESIGN: operator plane).
//!
//! The router keeps none of them: a subscription that matches records (`dps/#`,
//! `dps/registrations/+`, `#`, ...) reads them from the store after its SUBACK, a page
//! at a time between the session's other work, and gets each as a retained message at
//! QoS 0, as the records are published. A record that changes meanwhile also arrives
//! live; as the store is read after the subscription is in place, the last message of
//! each record the client gets is its current state.

use std::collections::VecDeque;

use rumqttd::protocol::{Packet, PublishProperties};
use tokio::io::{AsyncRead, AsyncWrite};

use edgedps_responder::RecordReading;

use super::subscriptions::FilterOptions;
use super::{Close, Session};
use crate::codec;

/// Records read from the store at a time.
const PAGE: usize = 256;

/// One subscription's reading of the records.
#[derive(Debug)]
pub(super) struct Reading {
    filter: String,
    /// MQTT 5 Subscription Identifier of the SUBSCRIBE.
    subscription_id: Option<usize>,
    reading: RecordReading,
}

impl Reading {
    /// The reading a new subscription to `filter` needs: `None` when it does not want
    /// retained messages, is shared (MQTT 5 4.8.2: no retained messages) or matches no
    /// record.
    pub(super) fn of(
        filter: &str,
        options: &FilterOptions,
        subscription_id: Option<usize>,
    ) -> Option<Reading> {
        if !options.retained_on_subscribe || crate::dollar::shared(filter).is_some() {
            return None;
        }
        Some(Reading {
            filter: filter.to_owned(),
            subscription_id,
            reading: RecordReading::of(filter)?,
        })
    }
}

/// Starts `reading`, in place of one of the same filter still going.
pub(super) fn start(readings: &mut VecDeque<Reading>, reading: Reading) {
    stop(readings, &reading.filter);
    readings.push_back(reading);
}

/// Stops the reading for `filter` (unsubscribed).
pub(super) fn stop(readings: &mut VecDeque<Reading>, filter: &str) {
    readings.retain(|r| r.filter != filter);
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends the next page of the first reading.
    pub(super) async fn send_records(&mut self) -> Result<(), Close> {
        let Some(mut current) = self.readings.pop_front() else {
            return Ok(());
        };
        let responder = self.shared.responder.clone();
        // The store may read from disk: off the async workers.
        let read = tokio::task::spawn_blocking(move || {
            let page = responder.read_records(&mut current.reading, PAGE);
            (current, page)
        })
        .await;
        let (current, page) = match read {
            Ok(read) => read,
            Err(e) => return Err(Close::Router(format!("reading records: {e}"))),
        };
        let records = match page {
            Ok(records) => records,
            Err(e) => {
                // The subscription stays; what could not be read is not sent, and the
                // operator is told why.
                tracing::error!(client_id = %self.client_id, filter = %current.filter, error = %e, "records not sent to a new subscription: the store could not be read");
                return Ok(());
            }
        };
        // MQTT 5 only: the subscription's identifier.
        let properties =
            self.codec
                .properties(current.subscription_id.map(|id| PublishProperties {
                    subscription_identifiers: vec![id],
                    ..Default::default()
                }));
        for record in records {
            let publish = codec::publish(
                record.topic.as_bytes(),
                record.payload.into(),
                0,
                0,
                true,
                false,
            );
            self.send(Packet::Publish(publish, properties.clone()))?;
        }
        if !current.reading.is_done() {
            // Back to the front: the first subscription's records come first.
            self.readings.push_front(current);
        }
        Ok(())
    }
}
