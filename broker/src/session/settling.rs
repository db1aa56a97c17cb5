//! The QoS 1 and 2 bookkeeping of a full MQTT session's deliveries, between the router
//! and the client, without IO: events in, packets for either side out.
//!
//! Why it is needed, from rumqttd 0.20's router:
//! - it takes PUBACKs and PUBRECs only in the order it sent the publishes, and PUBCOMPs
//!   only in the order of its PUBRELs (any other order disconnects the session), while a
//!   delivery made below its QoS must be acknowledged here, for the client;
//! - it numbers its publishes from 1 again on every connection, while the client of a
//!   resumed session still holds the packet ids of QoS 2 messages it has not seen
//!   released (a new message under such an id would be taken for a duplicate and lost),
//!   and it resends what was in flight as new messages, without DUP.
//!
//! So the client's packet ids are this session's own: a router delivery gets a free one,
//! or, when the router delivers again (same log position) a message the client had in
//! flight before it came back, the id the client knows, with DUP set. Acknowledgements
//! are queued in the router's order and sent from the front as they become due. A
//! persistent session's bookkeeping outlives its connection ([`Settling::saved`]).
//!
//! MQTT 5's Receive Maximum (3.3.4): no more QoS 1 and 2 messages in flight to the
//! client than it said it can take; the others wait here, in order.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelProperties, PubRelReason, PublishProperties,
};

/// A position in the router's log: the same message when delivered again.
pub(super) type Cursor = (u64, u64);

/// What to send, and to whom.
#[derive(Debug)]
pub(super) enum Action {
    ToClient(Packet),
    ToRouter(Packet),
}

/// A router delivery, as the session hands it over.
pub(super) struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// The router's QoS and packet id.
    pub routed: u8,
    pub router_pkid: u16,
    /// The QoS the message was published with.
    pub published: u8,
    pub cursor: Option<Cursor>,
    /// False for a message the client did not subscribe to (settled, not sent).
    pub wanted: bool,
}

#[derive(Default)]
pub(super) struct Settling {
    /// Deliveries the router awaits a PUBACK or PUBREC for, in its order.
    acks: VecDeque<Owed>,
    /// PUBRELs the router awaits a PUBCOMP for, in its order.
    completions: VecDeque<Completion>,
    /// Router packet ids of QoS 2 deliveries the client got below QoS 2: their PUBREL
    /// is answered here.
    released_here: HashSet<u16>,
    /// Router packet id -> client packet id, for QoS 2 deliveries the router has the
    /// PUBREC of and the client awaits the PUBREL of.
    released_to_client: HashMap<u16, u16>,
    /// Log positions of the QoS 2 deliveries whose PUBREC went to the router and whose
    /// PUBREL has not come back: if the connection is taken over before the router read
    /// that PUBREC, it delivers them again, and the client must know them.
    recorded: HashMap<u16, Cursor>,
    /// Client packet ids in flight (awaiting the client's PUBACK or PUBCOMP).
    in_use: HashSet<u16>,
    next: u16,
    /// From the connection before (a persistent session): messages the client had in
    /// flight, by log position: their client packet id, and whether the client had
    /// acknowledged them (PUBREC) already.
    resend: HashMap<Cursor, (u16, bool)>,
    /// The client's Receive Maximum (65,535 when it gave none).
    receive_maximum: usize,
    /// Deliveries waiting for room in the client's Receive Maximum, in order.
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    router_pkid: u16,
    delivery: Delivery,
    delivered: u8,
}

struct Owed {
    router_pkid: u16,
    client_pkid: u16,
    /// The router's QoS: 1 owes a PUBACK, 2 a PUBREC.
    routed: u8,
    /// The client's QoS.
    delivered: u8,
    /// The client acknowledged it (or it needs no acknowledgement).
    due: bool,
    cursor: Option<Cursor>,
}

struct Completion {
    router_pkid: u16,
    client_pkid: u16,
    due: bool,
}

/// What a persistent session keeps of this between connections.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    resend: HashMap<Cursor, (u16, bool)>,
    released_to_client: HashMap<u16, u16>,
}

impl Settling {
    /// The bookkeeping of a session (resumed from `saved`), for a client that takes at
    /// most `receive_maximum` messages in flight.
    pub fn resume(saved: Saved, receive_maximum: u16) -> Settling {
        let mut in_use: HashSet<u16> = saved.resend.values().map(|(pkid, _)| *pkid).collect();
        in_use.extend(saved.released_to_client.values().copied());
        Settling {
            resend: saved.resend,
            released_to_client: saved.released_to_client,
            in_use,
            receive_maximum: usize::from(receive_maximum.max(1)),
            ..Settling::default()
        }
    }

    /// What the next connection of a persistent session needs.
    pub fn saved(&self) -> Saved {
        let mut resend = self.resend.clone();
        for owed in &self.acks {
            if let (Some(cursor), true) = (owed.cursor, owed.delivered > 0 && owed.client_pkid != 0)
            {
                // Acknowledged by the client but not yet by this session to the router
                // (it waited behind an earlier one): the router sends it again, and the
                // client, which holds it, must not take it for a new one.
                resend.insert(cursor, (owed.client_pkid, owed.due));
            }
        }
        for (router_pkid, cursor) in &self.recorded {
            if let Some(client_pkid) = self.released_to_client.get(router_pkid) {
                resend.entry(*cursor).or_insert((*client_pkid, true));
            }
        }
        let mut released_to_client = self.released_to_client.clone();
        for completion in &self.completions {
            if completion.client_pkid != 0 && !completion.due {
                released_to_client.insert(completion.router_pkid, completion.client_pkid);
            }
        }
        Saved {
            resend,
            released_to_client,
        }
    }

    fn allocate(&mut self) -> u16 {
        loop {
            self.next = self.next.checked_add(1).unwrap_or(1);
            if self.in_use.insert(self.next) {
                return self.next;
            }
        }
    }

    /// A router delivery: the publish for the client (at the lower of the published and
    /// the router's QoS), and whatever is due to the router.
    pub fn deliver(&mut self, delivery: Delivery) -> Vec<Action> {
        let mut actions = Vec::new();
        let delivered = if delivery.wanted {
            delivery.published.min(delivery.routed)
        } else {
            0
        };
        let again = delivery.cursor.and_then(|c| self.resend.remove(&c));
        if delivered > 0
            && again.is_none()
            && (self.in_use.len() >= self.receive_maximum || !self.waiting.is_empty())
        {
            // The client has as many in flight as it can take: this one waits (its
            // acknowledgement to the router waits with it, in the router's order).
            self.acks.push_back(Owed {
                router_pkid: delivery.router_pkid,
                client_pkid: 0,
                routed: delivery.routed,
                delivered,
                due: false,
                cursor: delivery.cursor,
            });
            self.waiting.push_back(Waiting {
                router_pkid: delivery.router_pkid,
                delivery,
                delivered,
            });
            return actions;
        }
        let (client_pkid, dup, already_acknowledged) = match (delivered, again) {
            (0, _) => (0, false, false),
            (_, Some((pkid, acknowledged))) => (pkid, true, acknowledged),
            (_, None) => (self.allocate(), false, false),
        };
        if delivery.wanted && !already_acknowledged {
            let publish = crate::codec::publish(
                &delivery.topic,
                delivery.payload,
                delivered,
                client_pkid,
                delivery.retain,
                dup,
            );
            actions.push(Action::ToClient(Packet::Publish(
                publish,
                delivery.properties,
            )));
        }
        if delivery.routed > 0 {
            self.acks.push_back(Owed {
                router_pkid: delivery.router_pkid,
                client_pkid,
                routed: delivery.routed,
                delivered,
                due: delivered == 0 || already_acknowledged,
                cursor: delivery.cursor,
            });
        } else if client_pkid != 0 {
            // Nothing owed to the router; the client's acknowledgement frees the id.
            self.acks.push_back(Owed {
                router_pkid: 0,
                client_pkid,
                routed: 0,
                delivered,
                due: false,
                cursor: None,
            });
        }
        self.settle(&mut actions);
        actions
    }

    /// The client's PUBACK or PUBREC.
    pub fn client_acknowledged(&mut self, client_pkid: u16) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(owed) = self
            .acks
            .iter_mut()
            .find(|o| o.client_pkid == client_pkid && client_pkid != 0 && !o.due)
        {
            owed.due = true;
            if owed.delivered == 1 {
                self.in_use.remove(&client_pkid);
            }
        }
        self.release_waiting(&mut actions);
        self.settle(&mut actions);
        actions
    }

    /// Sends what waited for room in the client's Receive Maximum.
    fn release_waiting(&mut self, actions: &mut Vec<Action>) {
        while self.in_use.len() < self.receive_maximum {
            let Some(waiting) = self.waiting.pop_front() else {
                return;
            };
            let client_pkid = self.allocate();
            if let Some(owed) = self
                .acks
                .iter_mut()
                .find(|o| o.router_pkid == waiting.router_pkid && o.client_pkid == 0 && !o.due)
            {
                owed.client_pkid = client_pkid;
            }
            let delivery = waiting.delivery;
            let publish = crate::codec::publish(
                &delivery.topic,
                delivery.payload,
                waiting.delivered,
                client_pkid,
                delivery.retain,
                false,
            );
            actions.push(Action::ToClient(Packet::Publish(
                publish,
                delivery.properties,
            )));
        }
    }

    /// The client's PUBCOMP.
    pub fn client_completed(&mut self, client_pkid: u16) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(completion) = self
            .completions
            .iter_mut()
            .find(|c| c.client_pkid == client_pkid && !c.due)
        {
            completion.due = true;
        }
        self.in_use.remove(&client_pkid);
        self.release_waiting(&mut actions);
        self.settle(&mut actions);
        actions
    }

    /// The router's PUBREL of a QoS 2 delivery.
    pub fn router_released(
        &mut self,
        pubrel: PubRel,
        properties: Option<PubRelProperties>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let router_pkid = pubrel.pkid;
        if self.released_here.remove(&router_pkid) {
            self.completions.push_back(Completion {
                router_pkid,
                client_pkid: 0,
                due: true,
            });
            self.settle(&mut actions);
            return actions;
        }
        // Unknown to this session (its mapping was lost): the client's id is taken to
        // be the router's.
        self.recorded.remove(&router_pkid);
        let client_pkid = self
            .released_to_client
            .remove(&router_pkid)
            .unwrap_or(router_pkid);
        // Released: not to be taken for a redelivery any more.
        self.resend.retain(|_, (pkid, _)| *pkid != client_pkid);
        self.completions.push_back(Completion {
            router_pkid,
            client_pkid,
            due: false,
        });
        actions.push(Action::ToClient(Packet::PubRel(
            PubRel {
                pkid: client_pkid,
                reason: PubRelReason::Success,
            },
            properties,
        )));
        actions
    }

    /// Sends the router what is due, from the front of each queue.
    fn settle(&mut self, actions: &mut Vec<Action>) {
        while self.acks.front().is_some_and(|o| o.due) {
            let Some(owed) = self.acks.pop_front() else {
                break;
            };
            match owed.routed {
                0 => {}
                1 => actions.push(Action::ToRouter(Packet::PubAck(
                    PubAck {
                        pkid: owed.router_pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ))),
                _ => {
                    if owed.delivered < 2 {
                        self.released_here.insert(owed.router_pkid);
                    } else {
                        self.released_to_client
                            .insert(owed.router_pkid, owed.client_pkid);
                        if let Some(cursor) = owed.cursor {
                            self.recorded.insert(owed.router_pkid, cursor);
                        }
                    }
                    actions.push(Action::ToRouter(Packet::PubRec(
                        PubRec {
                            pkid: owed.router_pkid,
                            reason: PubRecReason::Success,
                        },
                        None,
                    )));
                }
            }
        }
        while self.completions.front().is_some_and(|c| c.due) {
            let Some(completion) = self.completions.pop_front() else {
                break;
            };
            actions.push(Action::ToRouter(Packet::PubComp(
                PubComp {
                    pkid: completion.router_pkid,
                    reason: PubCompReason::Success,
                },
                None,
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(routed: u8, router_pkid: u16, published: u8, cursor: u64) -> Delivery {
        Delivery {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"p"),
            retain: false,
            properties: None,
            routed,
            router_pkid,
            published,
            cursor: Some((0, cursor)),
            wanted: true,
        }
    }

    fn to_router(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ToRouter(Packet::PubAck(a, _)) => Some(format!("puback {}", a.pkid)),
                Action::ToRouter(Packet::PubRec(a, _)) => Some(format!("pubrec {}", a.pkid)),
                Action::ToRouter(Packet::PubComp(a, _)) => Some(format!("pubcomp {}", a.pkid)),
                _ => None,
            })
            .collect()
    }

    fn client_publish(actions: &[Action]) -> Option<(u16, bool)> {
        actions.iter().find_map(|a| match a {
            Action::ToClient(Packet::Publish(p, _)) => {
                let raw = p.serialize();
                Some((u16::from_be_bytes([raw[1], raw[2]]), raw[0] & 0b1000 != 0))
            }
            _ => None,
        })
    }

    #[test]
    fn acknowledgements_reach_the_router_in_its_order() {
        let mut s = Settling::resume(Saved::default(), u16::MAX);
        let first = s.deliver(delivery(1, 7, 1, 1));
        let (a, _) = client_publish(&first).unwrap();
        // Published at QoS 0: due at once, but waits behind the first.
        let second = s.deliver(delivery(1, 8, 0, 2));
        assert!(to_router(&second).is_empty());
        assert_eq!(
            to_router(&s.client_acknowledged(a)),
            vec!["puback 7", "puback 8"]
        );
    }

    #[test]
    fn a_qos_2_delivery_at_qos_1_is_completed_here() {
        let mut s = Settling::resume(Saved::default(), u16::MAX);
        let actions = s.deliver(delivery(2, 3, 1, 1));
        let (client, _) = client_publish(&actions).unwrap();
        assert_eq!(to_router(&s.client_acknowledged(client)), vec!["pubrec 3"]);
        let release = PubRel {
            pkid: 3,
            reason: PubRelReason::Success,
        };
        let actions = s.router_released(release, None);
        assert_eq!(to_router(&actions), vec!["pubcomp 3"]);
        assert!(!actions.iter().any(|a| matches!(a, Action::ToClient(_))));
    }

    #[test]
    fn a_message_whose_pubrec_the_router_may_not_have_read_is_known_when_it_comes_again() {
        let mut s = Settling::resume(Saved::default(), u16::MAX);
        let first = s.deliver(delivery(2, 1, 2, 20));
        let (client, _) = client_publish(&first).unwrap();
        assert_eq!(to_router(&s.client_acknowledged(client)), vec!["pubrec 1"]);
        // Taken over before the router read that PUBREC: it delivers the message again.
        let mut s = Settling::resume(s.saved(), u16::MAX);
        let again = s.deliver(delivery(2, 1, 2, 20));
        assert!(
            client_publish(&again).is_none(),
            "the client has it already"
        );
        assert_eq!(to_router(&again), vec!["pubrec 1"]);
        let release = PubRel {
            pkid: 1,
            reason: PubRelReason::Success,
        };
        let released = s.router_released(release, None);
        assert!(released.iter().any(|a| matches!(
            a,
            Action::ToClient(Packet::PubRel(rel, _)) if rel.pkid == client
        )));
    }

    #[test]
    fn no_more_in_flight_than_the_client_s_receive_maximum() {
        let mut s = Settling::resume(Saved::default(), 2);
        let first = client_publish(&s.deliver(delivery(1, 1, 1, 1))).unwrap().0;
        assert!(client_publish(&s.deliver(delivery(1, 2, 1, 2))).is_some());
        // The third waits; QoS 0 deliveries do not count but keep their place.
        assert!(client_publish(&s.deliver(delivery(1, 3, 1, 3))).is_none());
        let released = s.client_acknowledged(first);
        assert!(client_publish(&released).is_some(), "the third goes out");
        assert_eq!(to_router(&released), vec!["puback 1"]);
    }

    #[test]
    fn a_resumed_session_gets_its_in_flight_message_again_under_its_id_with_dup() {
        let mut s = Settling::resume(Saved::default(), u16::MAX);
        let held = s.deliver(delivery(2, 1, 2, 10));
        let (held_id, _) = client_publish(&held).unwrap();
        let unacked = s.deliver(delivery(2, 2, 2, 11));
        let (unacked_id, _) = client_publish(&unacked).unwrap();
        s.client_acknowledged(held_id);
        // The connection drops; the router numbers from 1 again and sends both again.
        let mut s = Settling::resume(s.saved(), u16::MAX);
        let again = s.deliver(delivery(2, 1, 2, 11));
        assert_eq!(client_publish(&again), Some((unacked_id, true)));
        let fresh = s.deliver(delivery(2, 2, 2, 12));
        let (fresh_id, dup) = client_publish(&fresh).unwrap();
        assert!(!dup);
        assert!(fresh_id != held_id && fresh_id != unacked_id, "{fresh_id}");
    }
}
