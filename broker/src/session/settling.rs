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
//!   and it resends what was in flight as new messages, without DUP;
//! - it keeps what an offline session has not read in its shared log only, which drops
//!   the oldest segment when full, for every session at once and without a word.
//!
//! So the client's packet ids are this session's own: a router delivery gets a free one,
//! or, when the router delivers again (same message) one the client had in flight
//! before it came back, the id the client knows, with DUP set. Acknowledgements are
//! queued in the router's order and sent from the front as they become due.
//!
//! While the client is away ([`Settling::park`]) the session keeps its router link: every
//! delivery is settled with the router at once and the QoS 1 and 2 messages are queued
//! here, at most `limit` of them; beyond it the oldest is dropped and counted. When the
//! client comes back, the queue goes out first, in order; messages it had in flight go
//! again under their ids, with DUP.
//!
//! MQTT 5's Receive Maximum (3.3.4): no more QoS 1 and 2 messages in flight to the
//! client than it said it can take; the others wait here, in order.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelProperties, PubRelReason, PublishProperties,
};

/// A position in the router's log of one subscription filter.
pub(super) type Cursor = (u64, u64);

/// How many publishes rumqttd's router has in flight to one link at most: after a
/// takeover it sends again at most that many whose acknowledgements it did not read.
const ROUTER_IN_FLIGHT: usize = 100;

/// What to send, and to whom.
#[derive(Debug)]
pub(super) enum Action {
    ToClient(Packet),
    ToRouter(Packet),
}

/// A message for the client.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5 properties, as published (an MQTT 3.1.1 connection sends none).
    pub properties: Option<PublishProperties>,
    /// When it expires (Unix milliseconds), if it does.
    pub deadline: Option<u64>,
}

/// A router delivery, as the session hands it over.
pub(super) struct Delivery {
    pub message: Message,
    /// The router's QoS and packet id.
    pub routed: u8,
    pub router_pkid: u16,
    /// The QoS the message was published with.
    pub published: u8,
    pub cursor: Option<Cursor>,
    /// False for a message the client did not subscribe to (settled, not sent).
    pub wanted: bool,
}

/// Which message a router delivery is, to know it when the router sends it again: its
/// log position (per filter, so positions repeat across filters) and a fingerprint of
/// its topic and payload (which keeps no payload alive). Computed only when needed: to
/// look a delivery up, or when the session goes or is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Mark {
    cursor: Cursor,
    fingerprint: u64,
}

impl Mark {
    fn of(cursor: Option<Cursor>, message: &Message) -> Option<Mark> {
        use std::hash::{Hash, Hasher};
        cursor.map(|cursor| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            message.topic.hash(&mut hasher);
            message.payload.hash(&mut hasher);
            Mark {
                cursor,
                fingerprint: hasher.finish(),
            }
        })
    }
}

/// A message this session holds for the client, owed to nobody else.
#[derive(Debug, Clone)]
struct Queued {
    message: Message,
    qos: u8,
    /// The client had it in flight under this id: it goes again with DUP.
    pkid: Option<u16>,
}

/// A queued message sent to the client and not yet settled by it.
#[derive(Debug)]
enum Held {
    /// Awaiting its PUBACK or PUBREC (kept to be sent again if the client goes).
    Sent(u64, Box<Queued>),
    /// QoS 2: PUBREL sent, PUBCOMP awaited.
    Released,
}

#[derive(Default)]
pub(super) struct Settling {
    /// Deliveries the router awaits a PUBACK or PUBREC for, in its order.
    acks: VecDeque<Owed>,
    /// PUBRELs the router awaits a PUBCOMP for, in its order.
    completions: VecDeque<Completion>,
    /// Router packet ids of QoS 2 deliveries the client got below QoS 2 (or not at all):
    /// their PUBREL is answered here.
    released_here: HashSet<u16>,
    /// Router packet id -> client packet id, for QoS 2 deliveries the router has the
    /// PUBREC of and the client awaits the PUBREL of.
    released_to_client: HashMap<u16, u16>,
    /// The QoS 2 deliveries whose PUBREC went to the router and whose PUBREL has not
    /// come back: if the connection is taken over before the router read that PUBREC,
    /// it delivers them again, and the client must know them.
    recorded: HashMap<u16, Mark>,
    /// Client packet ids in use (in flight, or reserved by a queued message).
    in_use: HashSet<u16>,
    /// Of `in_use`: ids reserved by queued messages not sent yet (not in flight).
    reserved: usize,
    next: u16,
    /// From the connection before: router deliveries the client had in flight: their
    /// client packet id, and whether the client had acknowledged them (PUBREC) already.
    resend: HashMap<Mark, (u16, bool)>,
    /// Messages queued here (while the client was away), sent before any router
    /// delivery, in order.
    queued: VecDeque<Queued>,
    /// Queued messages sent to the client, by client packet id.
    held: HashMap<u16, Held>,
    /// Numbers sends of queued messages, to queue them again in order.
    sends: u64,
    /// Router deliveries waiting for room in the client's Receive Maximum.
    waiting: usize,
    /// The last messages queued while the client was away: after a takeover the router
    /// may send them again, and they are not to be queued twice.
    seen: VecDeque<Mark>,
    /// The client's Receive Maximum (65,535 when it gave none).
    receive_maximum: usize,
    /// The client takes MQTT 5 properties.
    properties: bool,
    /// The client is connected; otherwise deliveries are queued.
    online: bool,
    /// Messages queued at most while the client is away.
    limit: usize,
    /// Messages dropped from the queue (the oldest, when it was full), ever.
    dropped: u64,
}

struct Owed {
    router_pkid: u16,
    client_pkid: u16,
    /// The router's QoS: 1 owes a PUBACK, 2 a PUBREC.
    routed: u8,
    /// The client's QoS (0: not sent to the client).
    delivered: u8,
    /// The client acknowledged it (or it needs no acknowledgement).
    due: bool,
    cursor: Option<Cursor>,
    /// Its mark, once one was needed.
    mark: Option<Mark>,
    /// The message, when it went or is to go to the client (`client_pkid` 0: it waits
    /// for room in the client's Receive Maximum), until it is settled with the router.
    message: Option<Message>,
}

impl Owed {
    /// Its mark: the one a lookup computed, or one from the message it keeps.
    fn mark(&self) -> Option<Mark> {
        self.mark.or_else(|| {
            self.message
                .as_ref()
                .and_then(|message| Mark::of(self.cursor, message))
        })
    }

    /// Settled here: it does not (or no longer) go to the client, and the router's
    /// release of a QoS 2 delivery is answered here.
    fn settle_here(&mut self) {
        self.due = true;
        self.delivered = 0;
        self.message = None;
    }
}

struct Completion {
    router_pkid: u16,
    client_pkid: u16,
    due: bool,
}

/// What a persistent session keeps of this between connections.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    resend: HashMap<Mark, (u16, bool)>,
    released_to_client: HashMap<u16, u16>,
    queued: VecDeque<Queued>,
    /// Client packet ids of QoS 2 messages the client acknowledged (PUBREC) and awaits
    /// the PUBREL of.
    releases: Vec<u16>,
    seen: VecDeque<Mark>,
    dropped: u64,
}

impl Saved {
    /// Messages waiting for the client.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Messages dropped because the queue was full, over the session's life.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Settling {
    /// The bookkeeping of a session (resumed from `saved`) whose client is connected,
    /// takes at most `receive_maximum` messages in flight and MQTT 5 properties if
    /// `properties`; at most `limit` messages are queued for it while it is away.
    /// [`Settling::start`] gives what goes to the client first.
    pub fn resume(saved: Saved, receive_maximum: u16, properties: bool, limit: usize) -> Settling {
        let mut in_use: HashSet<u16> = saved.resend.values().map(|(pkid, _)| *pkid).collect();
        in_use.extend(saved.released_to_client.values().copied());
        in_use.extend(saved.releases.iter().copied());
        let mut reserved = 0;
        for pkid in saved.queued.iter().filter_map(|q| q.pkid) {
            in_use.insert(pkid);
            reserved += 1;
        }
        Settling {
            resend: saved.resend,
            released_to_client: saved.released_to_client,
            in_use,
            reserved,
            queued: saved.queued,
            held: saved
                .releases
                .into_iter()
                .map(|pkid| (pkid, Held::Released))
                .collect(),
            seen: saved.seen,
            dropped: saved.dropped,
            receive_maximum: usize::from(receive_maximum.max(1)),
            properties,
            online: true,
            limit: limit.max(1),
            ..Settling::default()
        }
    }

    /// What a resumed session sends first: the PUBRELs the client awaits, then the
    /// queued messages its Receive Maximum has room for.
    pub fn start(&mut self) -> Vec<Action> {
        let mut releases: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, held)| matches!(held, Held::Released))
            .map(|(pkid, _)| *pkid)
            .collect();
        releases.sort_unstable();
        let mut actions: Vec<Action> = releases.into_iter().map(pubrel_to_client).collect();
        self.release_waiting(&mut actions);
        actions
    }

    /// The client is gone and the session stays: from now on every delivery is
    /// settled with the router at once and queued. What the client had in flight is
    /// queued first, to go again under its id; what the router is owed goes to it.
    pub fn park(&mut self) -> Vec<Action> {
        self.online = false;
        let mut requeue: Vec<(u64, Queued)> = Vec::new();
        let mut releases = Vec::new();
        for (pkid, held) in self.held.drain() {
            match held {
                Held::Sent(order, queued) => requeue.push((order, *queued)),
                Held::Released => releases.push(pkid),
            }
        }
        for pkid in releases {
            self.held.insert(pkid, Held::Released);
        }
        requeue.sort_by_key(|(order, _)| *order);
        for (_, queued) in requeue.into_iter().rev() {
            self.reserved += 1;
            self.queued.push_front(queued);
        }
        let mut later = Vec::new();
        for owed in &mut self.acks {
            if owed.due || owed.delivered == 0 {
                continue;
            }
            if let Some(mark) = owed.mark() {
                remember(&mut self.seen, mark);
            }
            let pkid = (owed.client_pkid != 0).then_some(owed.client_pkid);
            if let Some(message) = owed.message.take() {
                if pkid.is_some() {
                    self.reserved += 1;
                }
                later.push(Queued {
                    message,
                    qos: owed.delivered,
                    pkid,
                });
            } else if let Some(pkid) = pkid {
                self.in_use.remove(&pkid);
            }
            owed.settle_here();
        }
        self.waiting = 0;
        self.queued.extend(later);
        for completion in &mut self.completions {
            if !completion.due && completion.client_pkid != 0 {
                completion.due = true;
                self.held.insert(completion.client_pkid, Held::Released);
            }
        }
        let mut actions = Vec::new();
        self.settle(&mut actions);
        self.bound();
        actions
    }

    /// What the next connection of a persistent session needs, when this one lost its
    /// router link (taken over): the router sends again what it was not told of.
    pub fn saved(&self) -> Saved {
        let mut resend = self.resend.clone();
        for owed in &self.acks {
            if let (true, Some(mark)) = (owed.delivered > 0 && owed.client_pkid != 0, owed.mark()) {
                // Sent to the client and not yet settled with the router: the router
                // sends it again, and the client, which holds it, must not take it for
                // a new one.
                resend.insert(mark, (owed.client_pkid, owed.due));
            }
        }
        for (router_pkid, mark) in &self.recorded {
            if let Some(client_pkid) = self.released_to_client.get(router_pkid) {
                resend.entry(*mark).or_insert((*client_pkid, true));
            }
        }
        let mut released_to_client = self.released_to_client.clone();
        for completion in &self.completions {
            if completion.client_pkid != 0 && !completion.due {
                released_to_client.insert(completion.router_pkid, completion.client_pkid);
            }
        }
        let mut sent: Vec<(u64, Queued)> = Vec::new();
        let mut releases = Vec::new();
        for (pkid, held) in &self.held {
            match held {
                Held::Sent(order, queued) => sent.push((*order, (**queued).clone())),
                Held::Released => releases.push(*pkid),
            }
        }
        sent.sort_by_key(|(order, _)| *order);
        let mut queued: VecDeque<Queued> = sent.into_iter().map(|(_, q)| q).collect();
        queued.extend(self.queued.iter().cloned());
        Saved {
            resend,
            released_to_client,
            queued,
            releases,
            seen: self.seen.clone(),
            dropped: self.dropped,
        }
    }

    /// Messages dropped because the queue was full, over the session's life.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn allocate(&mut self) -> u16 {
        loop {
            self.next = self.next.checked_add(1).unwrap_or(1);
            if self.in_use.insert(self.next) {
                return self.next;
            }
        }
    }

    /// In flight to the client now.
    fn in_flight(&self) -> usize {
        self.in_use.len().saturating_sub(self.reserved)
    }

    /// A router delivery: the publish for the client (at the lower of the published and
    /// the router's QoS) or, while it is away, the queue; and whatever is due to the
    /// router.
    pub fn deliver(&mut self, delivery: Delivery) -> Vec<Action> {
        let mut actions = Vec::new();
        // Computed (hashing the payload) only for a delivery at the position of one the
        // router may be sending again.
        let mark = match delivery.cursor {
            Some(cursor)
                if self.seen.iter().any(|m| m.cursor == cursor)
                    || self.resend.keys().any(|m| m.cursor == cursor) =>
            {
                Mark::of(delivery.cursor, &delivery.message)
            }
            _ => None,
        };
        let queued_before = mark.as_ref().is_some_and(|m| forget(&mut self.seen, m));
        let send = delivery.wanted && !queued_before;
        let delivered = if send {
            delivery.published.min(delivery.routed)
        } else {
            0
        };
        let again = mark.as_ref().and_then(|m| self.resend.remove(m));
        let (message, routed, router_pkid) =
            (delivery.message, delivery.routed, delivery.router_pkid);
        let mut owed = Owed {
            router_pkid,
            client_pkid: 0,
            routed,
            delivered,
            due: delivered == 0,
            cursor: delivery.cursor,
            mark,
            message: None,
        };
        match (delivered, again) {
            // QoS 0 goes out at once, and is not kept for an absent client.
            (0, _) => {
                if send && self.online {
                    if let Some(packet) = self.publish(message, 0, 0, false) {
                        actions.push(Action::ToClient(packet));
                    }
                }
            }
            (delivered, Some((pkid, true))) => {
                // The client has it: only the router's acknowledgement (or, at QoS 2,
                // the release) is left.
                owed.client_pkid = pkid;
                owed.due = true;
                // QoS 1: the client's PUBACK freed its id.
                if delivered == 1 {
                    self.in_use.remove(&pkid);
                }
            }
            (qos, again) if !self.online => {
                let pkid = again.map(|(pkid, _)| pkid);
                if pkid.is_some() {
                    self.reserved += 1;
                }
                if let Some(mark) = owed.mark.or_else(|| Mark::of(owed.cursor, &message)) {
                    remember(&mut self.seen, mark);
                }
                self.queued.push_back(Queued { message, qos, pkid });
                owed.settle_here();
                self.bound();
            }
            (qos, None)
                if self.in_flight() >= self.receive_maximum
                    || self.waiting > 0
                    || !self.queued.is_empty() =>
            {
                // The client has as many in flight as it can take, or older messages
                // wait: this one waits (its acknowledgement to the router with it).
                owed.message = Some(message);
                owed.delivered = qos;
                self.waiting += 1;
            }
            (qos, again) => {
                let (pkid, dup) = match again {
                    Some((pkid, _)) => (pkid, true),
                    None => (self.allocate(), false),
                };
                owed.client_pkid = pkid;
                if let Some(packet) = self.publish(message.clone(), qos, pkid, dup) {
                    actions.push(Action::ToClient(packet));
                    owed.message = Some(message);
                } else {
                    // Expired while it waited: settled as if acknowledged.
                    self.in_use.remove(&pkid);
                    owed.settle_here();
                }
            }
        }
        if routed > 0 {
            self.acks.push_back(owed);
        }
        self.settle(&mut actions);
        actions
    }

    /// The publish of `message` to the client, unless it expired.
    fn publish(&self, message: Message, qos: u8, pkid: u16, dup: bool) -> Option<Packet> {
        let mut properties = if self.properties {
            message.properties
        } else {
            None
        };
        if let Some(deadline) = message.deadline {
            if !crate::qos::left_until(&mut properties, deadline) {
                return None;
            }
            if !self.properties {
                properties = None;
            }
        }
        let publish = crate::codec::publish(
            &message.topic,
            message.payload,
            qos,
            pkid,
            message.retain,
            dup,
        );
        Some(Packet::Publish(publish, properties))
    }

    /// Drops the oldest queued messages beyond the limit. One the client may hold at
    /// QoS 2 keeps its id until a PUBREL has settled it.
    fn bound(&mut self) {
        while self.queued.len() > self.limit {
            let Some(oldest) = self.queued.pop_front() else {
                return;
            };
            self.dropped += 1;
            if let Some(pkid) = oldest.pkid {
                self.reserved = self.reserved.saturating_sub(1);
                if oldest.qos == 2 {
                    self.held.insert(pkid, Held::Released);
                } else {
                    self.in_use.remove(&pkid);
                }
            }
        }
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
        } else if let Some(held) = self.held.get_mut(&client_pkid) {
            match held {
                Held::Sent(_, queued) if queued.qos == 2 => {
                    *held = Held::Released;
                    actions.push(pubrel_to_client(client_pkid));
                }
                Held::Sent(..) => {
                    self.held.remove(&client_pkid);
                    self.in_use.remove(&client_pkid);
                }
                Held::Released => {}
            }
        }
        self.release_waiting(&mut actions);
        self.settle(&mut actions);
        actions
    }

    /// Sends what waited for room in the client's Receive Maximum: queued messages
    /// first, then router deliveries, in order.
    fn release_waiting(&mut self, actions: &mut Vec<Action>) {
        while self.in_flight() < self.receive_maximum {
            if let Some(queued) = self.queued.pop_front() {
                let (pkid, dup) = match queued.pkid {
                    Some(pkid) => {
                        self.reserved = self.reserved.saturating_sub(1);
                        (pkid, true)
                    }
                    None => (self.allocate(), false),
                };
                match self.publish(queued.message.clone(), queued.qos, pkid, dup) {
                    Some(packet) => {
                        actions.push(Action::ToClient(packet));
                        self.sends += 1;
                        self.held
                            .insert(pkid, Held::Sent(self.sends, Box::new(queued)));
                    }
                    None => {
                        self.in_use.remove(&pkid);
                    }
                }
                continue;
            }
            if self.waiting == 0 {
                return;
            }
            let Some(index) = self
                .acks
                .iter()
                .position(|o| o.client_pkid == 0 && !o.due && o.message.is_some())
            else {
                self.waiting = 0;
                return;
            };
            self.waiting -= 1;
            let client_pkid = self.allocate();
            let packet = {
                let owed = &self.acks[index];
                owed.message
                    .as_ref()
                    .and_then(|m| self.publish(m.clone(), owed.delivered, client_pkid, false))
            };
            let owed = &mut self.acks[index];
            match packet {
                Some(packet) => {
                    owed.client_pkid = client_pkid;
                    actions.push(Action::ToClient(packet));
                }
                None => {
                    owed.settle_here();
                    self.in_use.remove(&client_pkid);
                }
            }
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
        } else if matches!(self.held.get(&client_pkid), Some(Held::Released)) {
            self.held.remove(&client_pkid);
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
        if !self.online {
            // The client gets the PUBREL when it comes back.
            self.in_use.insert(client_pkid);
            self.held.insert(client_pkid, Held::Released);
            self.completions.push_back(Completion {
                router_pkid,
                client_pkid,
                due: true,
            });
            self.settle(&mut actions);
            return actions;
        }
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
                        if let Some(mark) = owed.mark() {
                            self.recorded.insert(owed.router_pkid, mark);
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

fn pubrel_to_client(pkid: u16) -> Action {
    Action::ToClient(Packet::PubRel(
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        },
        None,
    ))
}

/// Remembers a queued message's mark, the last [`ROUTER_IN_FLIGHT`] only.
fn remember(seen: &mut VecDeque<Mark>, mark: Mark) {
    if seen.len() == ROUTER_IN_FLIGHT {
        seen.pop_front();
    }
    seen.push_back(mark);
}

/// Whether `mark` was remembered (and forgets it).
fn forget(seen: &mut VecDeque<Mark>, mark: &Mark) -> bool {
    match seen.iter().position(|m| m == mark) {
        Some(index) => {
            seen.remove(index);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: Bytes) -> Message {
        Message {
            topic: Bytes::from_static(b"t"),
            payload,
            retain: false,
            properties: None,
            deadline: None,
        }
    }

    fn delivery(routed: u8, router_pkid: u16, published: u8, cursor: u64) -> Delivery {
        // One payload per position, as the router's log has one message there.
        Delivery {
            message: message(Bytes::from(cursor.to_string())),
            routed,
            router_pkid,
            published,
            cursor: Some((0, cursor)),
            wanted: true,
        }
    }

    fn settling(receive_maximum: u16) -> Settling {
        Settling::resume(Saved::default(), receive_maximum, true, 1000)
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

    /// The client's publishes: packet id, DUP, payload.
    fn client_publishes(actions: &[Action]) -> Vec<(u16, bool, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ToClient(Packet::Publish(p, _)) => {
                    let raw = p.serialize();
                    Some((
                        u16::from_be_bytes([raw[1], raw[2]]),
                        raw[0] & 0b1000 != 0,
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ))
                }
                _ => None,
            })
            .collect()
    }

    fn client_publish(actions: &[Action]) -> Option<(u16, bool)> {
        client_publishes(actions)
            .first()
            .map(|(pkid, dup, _)| (*pkid, *dup))
    }

    fn client_pubrels(actions: &[Action]) -> Vec<u16> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ToClient(Packet::PubRel(rel, _)) => Some(rel.pkid),
                _ => None,
            })
            .collect()
    }

    fn release(pkid: u16) -> PubRel {
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        }
    }

    #[test]
    fn acknowledgements_reach_the_router_in_its_order() {
        let mut s = settling(u16::MAX);
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
        let mut s = settling(u16::MAX);
        let actions = s.deliver(delivery(2, 3, 1, 1));
        let (client, _) = client_publish(&actions).unwrap();
        assert_eq!(to_router(&s.client_acknowledged(client)), vec!["pubrec 3"]);
        let actions = s.router_released(release(3), None);
        assert_eq!(to_router(&actions), vec!["pubcomp 3"]);
        assert!(!actions.iter().any(|a| matches!(a, Action::ToClient(_))));
    }

    #[test]
    fn a_message_whose_pubrec_the_router_may_not_have_read_is_known_when_it_comes_again() {
        let mut s = settling(u16::MAX);
        let first = s.deliver(delivery(2, 1, 2, 20));
        let (client, _) = client_publish(&first).unwrap();
        assert_eq!(to_router(&s.client_acknowledged(client)), vec!["pubrec 1"]);
        // Taken over before the router read that PUBREC: it delivers the message again.
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        let again = s.deliver(delivery(2, 1, 2, 20));
        assert!(
            client_publish(&again).is_none(),
            "the client has it already"
        );
        assert_eq!(to_router(&again), vec!["pubrec 1"]);
        let released = s.router_released(release(1), None);
        assert_eq!(client_pubrels(&released), vec![client]);
    }

    #[test]
    fn no_more_in_flight_than_the_client_s_receive_maximum() {
        let mut s = settling(2);
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
        let mut s = settling(u16::MAX);
        let held = s.deliver(delivery(2, 1, 2, 10));
        let (held_id, _) = client_publish(&held).unwrap();
        let unacked = s.deliver(delivery(2, 2, 2, 11));
        let (unacked_id, _) = client_publish(&unacked).unwrap();
        s.client_acknowledged(held_id);
        // The connection drops; the router numbers from 1 again and sends both again.
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        let again = s.deliver(delivery(2, 1, 2, 11));
        assert_eq!(client_publish(&again), Some((unacked_id, true)));
        let fresh = s.deliver(delivery(2, 2, 2, 12));
        let (fresh_id, dup) = client_publish(&fresh).unwrap();
        assert!(!dup);
        assert!(fresh_id != held_id && fresh_id != unacked_id, "{fresh_id}");
    }

    #[test]
    fn the_same_position_in_another_filter_s_log_is_another_message() {
        let mut s = settling(u16::MAX);
        let first = s.deliver(delivery(2, 1, 2, 5));
        let (id, _) = client_publish(&first).unwrap();
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        // Position 5 of another subscription's log: a new message, not a redelivery.
        let mut other = delivery(2, 1, 2, 5);
        other.message.payload = Bytes::from_static(b"another");
        let (pkid, dup) = client_publish(&s.deliver(other)).unwrap();
        assert!(!dup && pkid != id);
    }

    #[test]
    fn an_offline_session_settles_with_the_router_at_once_and_queues() {
        let mut s = settling(u16::MAX);
        let sent = s.deliver(delivery(1, 1, 1, 1));
        let (in_flight, _) = client_publish(&sent).unwrap();
        // The client goes before acknowledging: the router is told, the message kept.
        assert_eq!(to_router(&s.park()), vec!["puback 1"]);
        assert_eq!(
            to_router(&s.deliver(delivery(1, 2, 1, 2))),
            vec!["puback 2"]
        );
        assert_eq!(
            to_router(&s.deliver(delivery(2, 3, 2, 3))),
            vec!["pubrec 3"]
        );
        assert_eq!(
            to_router(&s.router_released(release(3), None)),
            vec!["pubcomp 3"]
        );
        // QoS 0 is not kept for an absent client.
        assert_eq!(
            to_router(&s.deliver(delivery(1, 4, 0, 4))),
            vec!["puback 4"]
        );
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        let sent: Vec<(u16, bool, String)> = client_publishes(&s.start());
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert_eq!(sent[0], (in_flight, true, "1".to_owned()));
        assert_eq!((sent[1].1, sent[1].2.as_str()), (false, "2"));
        assert_eq!((sent[2].1, sent[2].2.as_str()), (false, "3"));
        // The QoS 2 one is released by this session.
        assert_eq!(
            client_pubrels(&s.client_acknowledged(sent[2].0)),
            vec![sent[2].0]
        );
        assert!(s.client_completed(sent[2].0).is_empty());
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts() {
        let mut s = Settling::resume(Saved::default(), u16::MAX, true, 3);
        s.park();
        for n in 1..=5 {
            s.deliver(delivery(1, n as u16, 1, n));
        }
        assert_eq!(s.dropped(), 2);
        let saved = s.saved();
        assert_eq!((saved.queued(), saved.dropped()), (3, 2));
        let mut s = Settling::resume(saved, u16::MAX, true, 3);
        let payloads: Vec<String> = client_publishes(&s.start())
            .into_iter()
            .map(|(_, _, payload)| payload)
            .collect();
        assert_eq!(payloads, vec!["3", "4", "5"]);
    }

    #[test]
    fn a_dropped_qos_2_message_the_client_may_hold_is_released() {
        let mut s = Settling::resume(Saved::default(), u16::MAX, true, 1);
        let (held, _) = client_publish(&s.deliver(delivery(2, 1, 2, 1))).unwrap();
        s.park();
        s.deliver(delivery(2, 2, 2, 2));
        assert_eq!(s.dropped(), 1);
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1);
        let start = s.start();
        assert_eq!(client_pubrels(&start), vec![held]);
        let (fresh, _) = client_publish(&start).unwrap();
        assert_ne!(fresh, held, "its id stays the client's until the PUBCOMP");
    }

    #[test]
    fn queued_messages_go_first_within_the_receive_maximum() {
        let mut s = settling(u16::MAX);
        s.park();
        s.deliver(delivery(1, 1, 1, 1));
        s.deliver(delivery(1, 2, 1, 2));
        let mut s = Settling::resume(s.saved(), 1, true, 1000);
        let first = client_publishes(&s.start());
        assert_eq!(first.len(), 1);
        // A new router delivery waits behind the queue.
        assert!(client_publish(&s.deliver(delivery(1, 1, 1, 3))).is_none());
        let second = client_publishes(&s.client_acknowledged(first[0].0));
        assert_eq!(second[0].2, "2");
        let third = s.client_acknowledged(second[0].0);
        assert_eq!(client_publishes(&third)[0].2, "3");
        assert!(
            to_router(&third).is_empty(),
            "acknowledged by the client first"
        );
    }

    #[test]
    fn a_message_queued_offline_and_sent_again_after_a_takeover_is_not_queued_twice() {
        let mut s = settling(u16::MAX);
        s.park();
        s.deliver(delivery(2, 1, 2, 7));
        // The router did not read the PUBREC before the takeover: it sends it again.
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        let start = client_publishes(&s.start());
        assert_eq!(start.len(), 1);
        let again = s.deliver(delivery(2, 1, 2, 7));
        assert!(client_publish(&again).is_none());
        assert_eq!(to_router(&again), vec!["pubrec 1"]);
    }

    #[test]
    fn an_expired_queued_message_is_not_sent() {
        let mut s = settling(u16::MAX);
        s.park();
        let mut expired = delivery(1, 1, 1, 1);
        expired.message.deadline = Some(1);
        s.deliver(expired);
        s.deliver(delivery(1, 2, 1, 2));
        let mut s = Settling::resume(s.saved(), u16::MAX, true, 1000);
        let sent = client_publishes(&s.start());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].2, "2");
    }
}
