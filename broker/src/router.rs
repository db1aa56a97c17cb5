//! The embedded rumqttd router (DESIGN: everything else goes through rumqttd's router).
//!
//! Sessions get a local link each, created when they first publish or subscribe outside
//! `$dps/`; the responder's records, results and events enter through one more link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rumqttd::local::LinkBuilder;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Filter, Packet, PingReq, Publish, QoS, RetainForwardRule, Subscribe};
use rumqttd::{Notification, RouterConfig};
use tokio::sync::mpsc;

use crate::Error;
use edgedps_responder::{Publication, RetainedMessages};

/// Where sessions hand the responder's publications (and the wills of sessions that
/// ended); one task publishes them into the router, in order, on a link of its own.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outgoing>,
    /// Who listens: a message that is not retained goes only where a subscription may
    /// take it.
    interest: Arc<crate::interest::Interest>,
    /// Events also go to the status page (when there is one), whoever subscribes.
    feed: Option<Arc<crate::feed::EventFeed>>,
}

/// A message for the publisher's link.
enum Outgoing {
    /// QoS 0.
    Record(Publication),
    /// A will: with its QoS and properties.
    Will {
        topic: bytes::Bytes,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
        properties: Option<rumqttd::protocol::PublishProperties>,
    },
}

impl Publisher {
    /// Queues `publications` in order; waits while the queue is full. A publication
    /// that is not kept retained and that no subscription matches is dropped here, as
    /// the router would drop it (`interest.rs`). The operator plane's records are not
    /// kept retained: subscriptions read them from the store (`session/records.rs`).
    pub async fn publish(&self, publications: Vec<Publication>) {
        // Interest is counted for `dps/` only: the rest (the local hub's `hub/...`
        // answers) always goes to the router.
        let heard = |p: &Publication| {
            kept(p) || !p.topic.starts_with("dps/") || self.interest.matches(&p.topic)
        };
        if let Some(feed) = &self.feed {
            for publication in &publications {
                feed.offer(&publication.topic, &publication.payload);
            }
        }
        for publication in publications.into_iter().filter(heard) {
            if self.tx.send(Outgoing::Record(publication)).await.is_err() {
                tracing::warn!("the router's publisher stopped; record not published");
                return;
            }
        }
    }

    /// Publishes a session's will message with its QoS, retain flag and properties.
    pub async fn will(
        &self,
        topic: bytes::Bytes,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
        properties: Option<rumqttd::protocol::PublishProperties>,
    ) {
        let will = Outgoing::Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        };
        if self.tx.send(will).await.is_err() {
            tracing::warn!("the router's publisher stopped; will not published");
        }
    }
}

/// Whether the router keeps `publication` as a retained message: retained and not one
/// of the operator plane's records.
fn kept(publication: &Publication) -> bool {
    publication.retain && !edgedps_topics::admin::is_record_topic(&publication.topic)
}

/// Retained messages a new subscription receives at most (a rumqttd limit).
pub const RETAINED_PER_SUBSCRIPTION: u64 = 100_000;

/// Builds a link to the router: name, clean session.
type LinkFactory =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;

#[derive(Clone)]
pub struct Router {
    make_link: Arc<LinkFactory>,
    links: Arc<AtomicU64>,
}

/// A session's own link, named by its client id.
pub struct SessionLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
    /// The router kept this client's session (clean session 0 / session expiry).
    pub session_present: bool,
}

impl Router {
    /// Starts the router thread (no rumqttd listeners: the front end is ours) with room
    /// for `max_links` links; rumqttd reserves its tables for them up front.
    pub fn start(max_links: usize) -> Router {
        let config = RouterConfig {
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
        };
        // The router's own sender: links are built with the options a CONNECT asks for
        // (rumqttd's `Broker::link` only builds clean-session links).
        let router_tx = rumqttd::Router::new(0, config).spawn();
        let make_link: Arc<LinkFactory> = Arc::new(move |name, clean| {
            LinkBuilder::new(name, router_tx.clone())
                .clean_session(clean)
                .build()
                .map_err(|e| e.to_string())
        });
        Router {
            make_link,
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
        let (tx, rx, _) = self.build(name, true).await?;
        Ok((tx, rx))
    }

    /// The link of an MQTT session that is not a DPS session: named by the client id,
    /// so that the router keeps a persistent session under it and a second connection
    /// with the same client id takes the session over (MQTT 3.1.4).
    pub async fn session_link(&self, client_id: &str, clean: bool) -> Result<SessionLink, Error> {
        let (tx, rx, connack) = self.build(session_link_name(client_id), clean).await?;
        let session_present = match Option::<Packet>::from(connack) {
            Some(Packet::ConnAck(ack, _)) => ack.session_present,
            _ => false,
        };
        Ok(SessionLink {
            tx,
            rx,
            session_present,
        })
    }

    async fn build(
        &self,
        name: String,
        clean: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), Error> {
        let make_link = self.make_link.clone();
        // Building a link waits for the router's answer on a blocking channel.
        tokio::task::spawn_blocking(move || make_link(&name, clean).map_err(Error::Router))
            .await
            .map_err(|e| Error::Router(e.to_string()))?
    }

    /// Starts the task that publishes what the responder answers, in order, for as long
    /// as a [`Publisher`] is left.
    pub async fn spawn_publisher(
        &self,
        interest: Arc<crate::interest::Interest>,
        feed: Option<Arc<crate::feed::EventFeed>>,
    ) -> Result<Publisher, Error> {
        let (publisher, mut publications) = mpsc::channel::<Outgoing>(4096);
        let (mut tx, mut rx) = self.link("edgedps-responder").await?;
        tokio::spawn(async move {
            let mut pkid: u16 = 0;
            while let Some(message) = publications.recv().await {
                let packets = match message {
                    Outgoing::Record(message) => {
                        // A record goes out live only, carrying the RETAIN it was
                        // published with for Retain As Published.
                        let keep = kept(&message);
                        let publish =
                            Publish::new(message.topic.into_bytes(), message.payload, keep);
                        vec![Packet::Publish(
                            publish,
                            crate::qos::tag(None, 0, message.retain),
                        )]
                    }
                    Outgoing::Will {
                        topic,
                        payload,
                        qos,
                        retain,
                        properties,
                    } => {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        let publish =
                            crate::codec::publish(&topic, payload, qos, pkid, retain, false);
                        let properties = crate::qos::tag(properties, qos, retain);
                        let mut packets = vec![Packet::Publish(publish, properties)];
                        // QoS 2: the router holds the message until the PUBREL, which
                        // this link sends at once (its PUBREC is not awaited).
                        if qos == 2 {
                            packets.push(Packet::PubRel(
                                rumqttd::protocol::PubRel {
                                    pkid,
                                    reason: rumqttd::protocol::PubRelReason::Success,
                                },
                                None,
                            ));
                        }
                        packets
                    }
                };
                for packet in packets {
                    if let Err(e) = tx.send(packet).await {
                        tracing::error!(error = %e, "router link of the responder failed; records are no longer published");
                        return;
                    }
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
        Ok(Publisher {
            tx: publisher,
            interest,
            feed,
        })
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
            tx.send(Packet::Publish(clear, crate::qos::tag(None, 0, true)))
                .await
                .map_err(failed)?;
        }
        release(&mut tx).await;
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

/// Tells the router a link is gone (best effort: a link the router already dropped is
/// gone anyway). A persistent session's state is kept by the router from then on.
pub async fn release(tx: &mut LinkTx) {
    let disconnect = rumqttd::protocol::Disconnect {
        reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
    };
    let _ = tx.send(Packet::Disconnect(disconnect, None)).await;
}

/// The router's name for a session's link: the client id with `%`, the characters the
/// router refuses (`+ $ # /`) and `~` (which the DPS links' names use) percent-encoded,
/// so that two client ids never share a link.
fn session_link_name(client_id: &str) -> String {
    let mut name = String::with_capacity(client_id.len());
    for c in client_id.chars() {
        match c {
            '%' | '+' | '$' | '#' | '/' | '~' => name.push_str(&format!("%{:02X}", c as u32)),
            c => name.push(c),
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_link_names_are_distinct_and_acceptable_to_the_router() {
        let names: std::collections::HashSet<String> = ["a+b", "a_b", "a%2Bb", "a~1", "a/b", "a"]
            .iter()
            .map(|id| session_link_name(id))
            .collect();
        assert_eq!(names.len(), 6);
        assert!(names.iter().all(|n| !n.contains(['+', '$', '#', '/', '~'])));
    }
}
