//! A persistent session while its client is away (MQTT 3.1.1 3.1.2.4, MQTT 5 4.1).
//!
//! The session keeps its router link, so that the router goes on routing to its
//! subscriptions. What the router delivers is settled with it at once and the QoS 1 and
//! 2 messages are queued here (`settling.rs`): at most `limits.max_queued_messages` per
//! session, the oldest dropped beyond it, counted and logged. QoS 0 messages are not
//! kept for an absent client, as with mosquitto.
//!
//! It ends in one of three ways:
//! - the client comes back: its CONNECT takes the link over (the router closes this
//!   one), and the queue and bookkeeping are handed to the new connection through
//!   [`Shared::saved`](super::Shared);
//! - its Session Expiry Interval runs out: the router forgets it;
//! - more sessions are offline than `limits.max_offline_sessions`: the one away the
//!   longest ends as if it had expired.
//!
//! Expiry and a CONNECT of the same client id never cross: both hold
//! [`Shared::connecting`](super::Shared) while they change the router's link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::link::{self, RouterEvent};
use super::settling::{Action, Settling};
use super::{lock, Filters, SavedSession, Shared};

/// The offline sessions, and what their queues dropped.
#[derive(Default)]
pub struct Registry {
    parked: Mutex<HashMap<String, Parked>>,
    dropped: AtomicU64,
}

struct Parked {
    token: u64,
    since: Instant,
    evict: Arc<Notify>,
}

impl Registry {
    /// Sessions whose client is away now.
    pub fn sessions(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Whether the session of `client_id` is offline now.
    pub fn holds(&self, client_id: &str) -> bool {
        lock(&self.parked).contains_key(client_id)
    }

    /// Messages dropped from full offline queues since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Enters the session of `client_id`; beyond `max` sessions the one away the
    /// longest is told to end.
    fn enter(&self, client_id: &str, token: u64, max: usize) -> Arc<Notify> {
        let evict = Arc::new(Notify::new());
        let mut parked = lock(&self.parked);
        parked.insert(
            client_id.to_owned(),
            Parked {
                token,
                since: Instant::now(),
                evict: evict.clone(),
            },
        );
        if parked.len() > max {
            if let Some((oldest, session)) = parked.iter().min_by_key(|(_, p)| p.since) {
                tracing::warn!(client_id = %oldest, max, "too many offline sessions (limits.max_offline_sessions): the one away the longest ends");
                session.evict.notify_one();
            }
        }
        evict
    }

    fn leave(&self, client_id: &str, token: u64) {
        let mut parked = lock(&self.parked);
        if parked.get(client_id).is_some_and(|p| p.token == token) {
            parked.remove(client_id);
        }
    }
}

/// A session whose client went away, with everything it keeps.
pub(super) struct Offline {
    pub client_id: String,
    /// The claim on the client id of the connection that went (`will::Owners`).
    pub owner: u64,
    pub tx: LinkTx,
    pub rx: LinkRx,
    pub settling: Settling,
    pub filters: Filters,
    pub sequence: u64,
    /// `None`: kept until the client comes back.
    pub expiry: Option<Duration>,
}

enum Wake {
    Router(RouterEvent),
    Expired,
    Evicted,
}

impl Offline {
    /// Keeps the session until it is taken over or ends.
    pub(super) async fn wait(mut self, shared: Arc<Shared>) {
        let evict = shared.offline.enter(
            &self.client_id,
            self.owner,
            shared.limits.max_offline_sessions,
        );
        let mut deadline = self.expiry.map(|expiry| Instant::now() + expiry);
        let mut dropped = self.settling.dropped();
        let actions = self.settling.park();
        let mut linked = self.settle_with_router(actions).await;
        while linked {
            let wake = tokio::select! {
                event = link::next_event_of(&mut self.rx) => Wake::Router(event),
                _ = until(deadline) => Wake::Expired,
                _ = evict.notified() => Wake::Evicted,
            };
            match wake {
                Wake::Router(RouterEvent::Deliver(forward)) => {
                    let delivery = link::delivery(*forward, &self.filters);
                    let actions = self.settling.deliver(delivery);
                    linked = self.settle_with_router(actions).await;
                    self.report_drops(&mut dropped, &shared);
                }
                Wake::Router(RouterEvent::Ack(packet)) => {
                    if let Packet::PubRel(pubrel, properties) = *packet {
                        let actions = self.settling.router_released(pubrel, properties);
                        linked = self.settle_with_router(actions).await;
                    }
                }
                Wake::Router(RouterEvent::Unscheduled) => linked = self.rx.wake().await.is_ok(),
                Wake::Router(RouterEvent::Nothing) => {}
                // The client came back and took the link over (or the router stopped).
                Wake::Router(RouterEvent::Failed(_) | RouterEvent::Disconnected) => linked = false,
                Wake::Expired | Wake::Evicted => {
                    let _connecting = shared.connecting.lock().await;
                    if !shared.owners.unclaimed_since(&self.client_id, self.owner) {
                        // A connection of the client has taken the link over: the
                        // router is closing this one; hand the session on.
                        deadline = None;
                        continue;
                    }
                    self.end(&shared).await;
                    return;
                }
            }
        }
        let saved = SavedSession {
            settling: self.settling.saved(),
            filters: self.filters,
            sequence: self.sequence,
        };
        shared.offline.leave(&self.client_id, self.owner);
        shared.hand_on(&self.client_id, self.owner, saved);
    }

    /// Sends the router what is due; false once the link is gone.
    async fn settle_with_router(&mut self, actions: Vec<Action>) -> bool {
        for action in actions {
            if let Action::ToRouter(packet) = action {
                if self.tx.send(packet).await.is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// Counts and logs what the queue dropped: its first drop, then every thousandth.
    fn report_drops(&self, reported: &mut u64, shared: &Shared) {
        let dropped = self.settling.dropped();
        if dropped == *reported {
            return;
        }
        shared
            .offline
            .dropped
            .fetch_add(dropped - *reported, Ordering::Relaxed);
        let first = *reported == 0;
        let thousandth = dropped / 1000 != *reported / 1000;
        *reported = dropped;
        if first || thousandth {
            tracing::warn!(
                client_id = %self.client_id,
                limit = shared.limits.max_queued_messages,
                dropped,
                "offline session's queue is full (limits.max_queued_messages): the oldest message was dropped"
            );
        }
    }

    /// The session ends: the router forgets it (a clean link under its client id takes
    /// it over), and so does everything here.
    async fn end(self, shared: &Shared) {
        lock(&shared.saved).remove(&self.client_id);
        shared.forget_filters(&self.filters);
        match shared.router.session_link(&self.client_id, true).await {
            Ok(mut cleared) => {
                crate::router::release(&mut cleared.tx).await;
                tracing::info!(client_id = %self.client_id, dropped = self.settling.dropped(), "offline session ended");
            }
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "an offline session could not be cleared")
            }
        }
        shared.offline.leave(&self.client_id, self.owner);
        shared.owners.release(&self.client_id, self.owner);
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
