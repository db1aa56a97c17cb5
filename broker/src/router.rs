//! The embedded rumqttd router (DESIGN: everything else goes through rumqttd's router).
//!
//! Sessions get a local link each, created when they first publish or subscribe outside
//! `$dps/`; the responder's records, results and events enter through one more link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Filter, Packet, PingReq, Publish, QoS, RetainForwardRule, Subscribe};
use rumqttd::{Notification, RouterConfig};
use tokio::sync::mpsc;

use crate::Error;
use edgedps_responder::{Publication, RetainedMessages};

/// Where sessions hand the responder's publications; one task publishes them into the
/// router, in order, on a link of its own.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Publication>,
}

impl Publisher {
    /// Queues `publications` in order; waits while the queue is full.
    pub async fn publish(&self, publications: Vec<Publication>) {
        for publication in publications {
            if self.tx.send(publication).await.is_err() {
                tracing::warn!("the router's publisher stopped; record not published");
                return;
            }
        }
    }
}

/// Retained messages a new subscription receives at most (a rumqttd limit).
pub const RETAINED_PER_SUBSCRIPTION: u64 = 100_000;

#[derive(Clone)]
pub struct Router {
    broker: Arc<rumqttd::Broker>,
    links: Arc<AtomicU64>,
}

impl Router {
    /// Starts the router thread (no rumqttd listeners: the front end is ours) with room
    /// for `max_links` links; rumqttd reserves its tables for them up front.
    pub fn start(max_links: usize) -> Router {
        let config = rumqttd::Config {
            id: 0,
            router: RouterConfig {
                max_connections: max_links,
                // rumqttd delivers at most this many retained messages on a new
                // subscription (it reads them all and drops the excess): high enough
                // for the operator plane's retained records (docs/operators.md).
                max_outgoing_packet_count: RETAINED_PER_SUBSCRIPTION,
                max_segment_size: 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            ..Default::default()
        };
        Router {
            broker: Arc::new(rumqttd::Broker::new(config)),
            links: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A new local link. Names are made unique: takeover by client id is not wanted
    /// between a device's provisioning and hub sessions.
    pub async fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), Error> {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        // The router refuses `+ $ # /` in link names.
        let safe: String = client_id
            .chars()
            .map(|c| if "+$#/".contains(c) { '_' } else { c })
            .collect();
        let name = format!("{safe}~{n}");
        let broker = self.broker.clone();
        // Broker::link waits for the router's answer on a blocking channel.
        tokio::task::spawn_blocking(move || {
            broker.link(&name).map_err(|e| Error::Router(e.to_string()))
        })
        .await
        .map_err(|e| Error::Router(e.to_string()))?
    }

    /// Starts the task that publishes what the responder answers, in order, for as long
    /// as a [`Publisher`] is left.
    pub async fn spawn_publisher(&self) -> Result<Publisher, Error> {
        let (publisher, mut publications) = mpsc::channel::<Publication>(4096);
        let (mut tx, mut rx) = self.link("edgedps-responder").await?;
        tokio::spawn(async move {
            while let Some(message) = publications.recv().await {
                let publish =
                    Publish::new(message.topic.into_bytes(), message.payload, message.retain);
                if let Err(e) = tx.send(Packet::Publish(publish, None)).await {
                    tracing::error!(error = %e, "router link of the responder failed; records are no longer published");
                    return;
                }
            }
        });
        // The router answers on every link; read and discard, waking it when it asks.
        tokio::spawn(async move {
            loop {
                match rx.next().await {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Publisher { tx: publisher })
    }

    /// Clears every retained message under `filter` (an empty retained publish to each
    /// topic, the MQTT way) and returns how many there were.
    ///
    /// The router hands a new subscription its retained messages right after the
    /// SUBACK, in the same pass; a PINGREQ sent once the SUBACK is in is answered in a
    /// later pass, so every retained message has arrived before its PINGRESP.
    pub async fn purge_retained(&self, filter: &str) -> Result<usize, Error> {
        let (mut tx, mut rx) = self.link("edgedps-purge").await?;
        let failed = |e: rumqttd::local::LinkError| Error::Router(e.to_string());
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: filter.to_owned(),
                qos: QoS::AtMostOnce,
                nolocal: true,
                preserve_retain: true,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        };
        tx.send(Packet::Subscribe(subscribe, None))
            .await
            .map_err(failed)?;
        let mut topics = std::collections::BTreeSet::new();
        let mut pinged = false;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let next = tokio::time::timeout_at(deadline, rx.next())
                .await
                .map_err(|_| {
                    Error::Router(format!("no answer within 10 s while purging `{filter}`"))
                })?
                .map_err(failed)?;
            match next {
                Some(Notification::Forward(forward)) if forward.publish.retain => {
                    topics.insert(forward.publish.topic.clone());
                }
                Some(Notification::DeviceAck(ack)) => match Packet::from(ack) {
                    Packet::SubAck(..) if !pinged => {
                        tx.send(Packet::PingReq(PingReq)).await.map_err(failed)?;
                        pinged = true;
                    }
                    Packet::PingResp(..) => break,
                    _ => {}
                },
                Some(Notification::Unschedule) => rx.wake().await.map_err(failed)?,
                _ => {}
            }
        }
        for topic in &topics {
            let clear = Publish::new(topic.clone(), bytes::Bytes::new(), true);
            tx.send(Packet::Publish(clear, None))
                .await
                .map_err(failed)?;
        }
        let disconnect = rumqttd::protocol::Disconnect {
            reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
        };
        let _ = tx.send(Packet::Disconnect(disconnect, None)).await;
        Ok(topics.len())
    }
}

impl RetainedMessages for Router {
    async fn purge(&self, filter: String) -> usize {
        match self.purge_retained(&filter).await {
            Ok(purged) => purged,
            Err(e) => {
                tracing::error!(%filter, error = %e, "retained messages not purged");
                0
            }
        }
    }
}
