//! One MQTT session, from CONNECT to close (DESIGN: data flow steps 2-5), one job per
//! file:
//! - `connect.rs`: the CONNECT under its deadline, attestation, the CONNACK;
//! - `dps.rs`: `$dps/` requests, answered by the responder in process;
//! - `hub.rs`: a device of the local hub (`$iothub/`, twins, methods, cloud-to-device
//!   messages), and the operator writes that reach it;
//! - `admin.rs`: operator writes under `dps/`;
//! - `subscriptions.rs`: SUBSCRIBE and UNSUBSCRIBE, with the topic ACL;
//! - `records.rs`: the operator plane's records, read from the store for a new
//!   subscription;
//! - `link.rs`: this session's rumqttd link: publishes in, deliveries out;
//! - `settling.rs`: the QoS bookkeeping of deliveries between the router and the client;
//! - `offline.rs`: a persistent session while its client is away;
//! - `will.rs`: will messages.
//!
//! Two kinds of session. A DPS session (device listener) keeps PROTOCOL A's rules: only
//! `$dps/` and, once assigned, its device topics; router deliveries at QoS 0; nothing
//! kept after it ends. Every other session (local listener: operators and the
//! gateway's applications) is a full MQTT 3.1.1 and 5 session: its link is named by its
//! client id, so that rumqttd's router keeps its persistent session and takes it over
//! on a second CONNECT, and its publishes, subscriptions and acknowledgements (QoS 0, 1
//! and 2 both ways) pass through to the router, which answers them.
//!
//! Here: the session's state and its event loop (the socket, the router, the
//! keep-alive, the cut-off), and how it ends.
//!
//! A device session is in the responder's live-session registry from its CONNECT until
//! it ends. When a write takes the device out of service, the registry cuts the
//! session: it uses nothing more, and closes (MQTT 5: DISCONNECT 0x98, administrative
//! action, first).

mod admin;
mod connect;
pub(crate) use connect::refusal;
mod dps;
pub(crate) use dps::attestation_label;
mod hub;
mod link;
pub mod offline;
mod records;
mod settling;
pub(crate) mod subscriptions;
pub(crate) mod will;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use edgedps_policies::acl::{self, Role};
use edgedps_responder::{Attested, Cut, Entered, Publication, Responder, Standing};
use edgedps_topics::admin as admin_topics;
use edgedps_topics::dps as dps_topics;
use edgedps_topics::encoding::Encoding;

use crate::codec::{self, Codec, Frame, Version};
use crate::config::Limits;
use crate::router::{Publisher, Router};

use link::RouterEvent;

/// Which listener a connection came in on; it sets how clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Devices, by attestation (TLS).
    Devices,
    /// The gateway's own processes: operators, anonymous ones when configured.
    Local,
    /// Operators from elsewhere (TLS): a password or a client certificate.
    Operators,
}

/// What every session shares.
pub struct Shared {
    pub responder: Arc<Responder>,
    pub router: Router,
    /// Where the responder's records, results and events go into the router.
    pub publisher: Publisher,
    pub limits: Limits,
    /// Which connection holds each client id (for will delays).
    pub owners: Arc<will::Owners>,
    /// Persistent sessions handed from one connection to the next.
    pub saved: Arc<std::sync::Mutex<std::collections::HashMap<String, SavedSession>>>,
    /// Persistent sessions whose client is away.
    pub offline: Arc<offline::Registry>,
    /// Held while a CONNECT of the local listener, or an offline session's end, changes
    /// the router's link of a client id: the two never cross.
    pub connecting: tokio::sync::Mutex<()>,
    /// The subscriptions that may take the server's own messages (`interest.rs`).
    pub interest: Arc<crate::interest::Interest>,
    /// `[[operators]]`, and the bad passwords of each source address.
    pub operators: Arc<crate::operators::Operators>,
    /// `[listeners.local] anonymous`: a client without a username is an admin there.
    pub local_anonymous: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when the server shuts down: sessions close at their next wake.
    pub shutdown: Arc<crate::shutdown::Shutdown>,
    /// Custom allocators: MQTT allocators' answers go here.
    pub allocators: Arc<crate::allocators::Allocators>,
}

impl Shared {
    /// Forgets the subscriptions of a session that ended.
    fn forget_filters(&self, filters: &Filters) {
        for filter in filters.keys() {
            self.interest.remove(filter);
        }
    }

    /// Hands a persistent session on to the connection that takes it over, and lets go
    /// of the client id (`token`'s claim).
    fn hand_on(&self, client_id: &str, token: u64, saved: SavedSession) {
        lock(&self.saved).insert(client_id.to_owned(), saved);
        self.owners.release(client_id, token);
    }

    /// The session a resumed connection took over, once the connection or offline
    /// session that held it has handed it on (at most `limit`).
    async fn handed_over(&self, client_id: &str, limit: Duration) -> Option<SavedSession> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(saved) = lock(&self.saved).remove(client_id) {
                return Some(saved);
            }
            if Instant::now() >= deadline {
                tracing::warn!(%client_id, "the session taken over was not handed on in time; its queued messages and delivery state are lost");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A session's subscriptions: each filter as the client wrote it, with its options.
type Filters = std::collections::HashMap<String, subscriptions::FilterOptions>;

#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("connection closed by the peer")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Mqtt(#[from] crate::Error),
    #[error("no CONNECT within the deadline")]
    ConnectTimeout,
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("not authorized: {0}")]
    Denied(String),
    #[error("client disconnected")]
    Disconnect,
    #[error("client disconnected, asking for its will to be sent")]
    DisconnectWithWill,
    #[error("a new connection with the same client id took the session over")]
    TakenOver,
    #[error("router: {0}")]
    Router(String),
    #[error("taken out of service: {0}")]
    OutOfService(Cut),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Who is on the other end, once the CONNECT is accepted.
enum Identity {
    Device(Attested),
    /// An operator, by name; an anonymous one of the local listener has none.
    Operator(Option<Box<str>>),
}

struct Session<S> {
    stream: S,
    peer: SocketAddr,
    client_id: String,
    inbuf: BytesMut,
    out: BytesMut,
    codec: Codec,
    shared: Arc<Shared>,
    identity: Identity,
    role: Role,
    /// QoS granted on `$dps/registrations/res/#`, once subscribed.
    dps_qos: Option<u8>,
    /// The encoding of this connection's last register; its polls are answered in it.
    dps_encoding: Encoding,
    /// What the CONNECT read about the device, for its first register.
    standing: Option<Box<Standing>>,
    next_pkid: u16,
    link_tx: Option<LinkTx>,
    link_rx: Option<LinkRx>,
    /// Seconds; 0 turns keep-alive off.
    keep_alive: u16,
    /// Filters held in the router, as the client wrote them, with what it asked of them
    /// (`limits.max_subscriptions_per_session` bounds them).
    subscriptions: Filters,
    /// Numbers subscriptions in order.
    sequence: u64,
    /// A device's place in the live-session registry.
    live: Option<Entered>,
    /// Not a DPS session: a full MQTT session whose packets pass through to the router.
    passthrough: bool,
    /// This connection's claim on its client id (pass-through sessions).
    owner: u64,
    will: Option<Box<will::Will>>,
    /// SUBSCRIBEs the router has not acknowledged yet.
    pending_subacks: std::collections::HashMap<u16, subscriptions::Pending>,
    /// The operator plane's records new subscriptions are receiving (`records.rs`).
    readings: std::collections::VecDeque<records::Reading>,
    /// QoS 2 publishes answered here (operator writes): PUBREC sent, PUBREL awaited.
    own_qos2: std::collections::HashSet<u16>,
    /// The QoS bookkeeping of router deliveries (`settling.rs`); full MQTT sessions
    /// only (boxed: a device session, idle most of its life, does not carry it).
    settling: Option<Box<settling::Settling>>,
    /// A persistent session: its bookkeeping is kept when the connection ends.
    keep: bool,
    /// How long a kept session outlives its connection, in seconds (MQTT 5 Session
    /// Expiry Interval; `u32::MAX`, MQTT 3.1.1's clean session 0: until it comes back).
    expiry: u32,
    /// MQTT 5 topic aliases the client set.
    topic_aliases: std::collections::HashMap<u16, bytes::Bytes>,
    /// A device of the local hub (PROTOCOL E): its hub protocol state.
    hub: Option<Box<hub::HubSession>>,
}

/// What a persistent session keeps between its connections besides what the router
/// keeps: its delivery bookkeeping and its subscriptions' options.
#[derive(Debug, Default, Clone)]
pub struct SavedSession {
    settling: settling::Saved,
    filters: Filters,
    sequence: u64,
}

/// The write buffer a device session keeps between flushes, at most.
const OUT_KEPT: usize = 256;

/// Topic aliases a full MQTT 5 session may set (CONNACK Topic Alias Maximum).
pub(crate) const TOPIC_ALIAS_MAX: u16 = 32;

/// Runs a session on an established (TLS or plain) stream until it closes. `slot` is
/// the session's place in the connection limit, given back when it ends.
///
/// The arguments go straight into the CONNECT's boxed future and the session is boxed:
/// the task that lives as long as the session holds neither the stream nor the session
/// inline (an `async fn` keeps its arguments for all its life: BENCHMARKS.md, idle
/// session memory).
pub fn serve<S>(
    stream: S,
    chain: Vec<Vec<u8>>,
    kind: ListenerKind,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = shared.metrics.clone();
    let shutdown = shared.shutdown.clone();
    let accept = Box::pin(connect::accept(stream, chain, kind, peer, shared));
    async move {
        let _slot = slot;
        let started = Instant::now();
        // A connection still without its CONNECT when the server shuts down is closed:
        // it has asked nothing yet.
        let accepted = tokio::select! {
            accepted = accept => accepted,
            () = shutdown.wait() => {
                tracing::debug!(%peer, "connection closed before its CONNECT: shutting down");
                return;
            }
        };
        // Answered with a CONNACK, accepted or refused; not the connections that
        // never sent a CONNECT.
        if accepted.is_ok() {
            metrics.connect(started.elapsed());
        }
        match accepted {
            Ok(Some(mut session)) => {
                let _counted = metrics.session(session.role_label());
                let result = session.run().await;
                session.end(&result).await;
                session.report(result);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::info!(%peer, reason = %e, "connection dropped before CONNECT was accepted")
            }
        }
    }
}

async fn next_cut(live: &Option<Entered>) -> Cut {
    match live {
        Some(entered) => entered.session().cut_off().await,
        None => std::future::pending().await,
    }
}

/// What woke the session's loop.
enum Event {
    Read(Result<usize, std::io::Error>),
    KeepAliveExpired,
    Router(RouterEvent),
    Cut(Cut),
    /// Records are waiting to be read for a new subscription.
    Records,
    /// The local hub sent a hub session something, or its token ran out.
    Hub(hub::HubWake),
    Shutdown,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The QoS bookkeeping of router deliveries, made on first use.
    fn settling_mut(&mut self) -> &mut settling::Settling {
        self.settling.get_or_insert_with(Default::default)
    }

    /// The session's role, for `edgedps_sessions`.
    fn role_label(&self) -> &'static str {
        match (&self.role, &self.identity) {
            (Role::Device { .. }, _) if self.hub.is_some() => "hub_device",
            (Role::Device { .. }, _) => "device",
            (Role::Reader, _) => "reader",
            (Role::Operator, Identity::Operator(None)) => "anonymous",
            (Role::Operator, _) => "admin",
        }
    }

    /// Logs how the session ended.
    fn report(&self, result: Result<(), Close>) {
        let (peer, client_id) = (&self.peer, &self.client_id);
        match result {
            Err(Close::Eof) | Err(Close::Disconnect) | Err(Close::DisconnectWithWill) => {
                tracing::debug!(%peer, %client_id, "session ended")
            }
            Err(Close::ShuttingDown) => {
                tracing::debug!(%peer, %client_id, "session closed: shutting down")
            }
            Err(e @ Close::Denied(_)) => {
                tracing::warn!(%peer, %client_id, reason = %e, "session closed")
            }
            Err(Close::OutOfService(cut)) => {
                tracing::info!(target: "edgedps::audit", %peer, %client_id, reason = %cut, "session closed: out of service")
            }
            Err(e) => tracing::info!(%peer, %client_id, reason = %e, "session closed"),
            Ok(()) => {}
        }
    }

    async fn run(&mut self) -> Result<(), Close> {
        // Packets that arrived with the CONNECT.
        self.drain_input().await?;
        self.flush().await?;
        let mut last_heard = Instant::now();
        loop {
            if let Some(cut) = self.cut() {
                return self.out_of_service(cut).await;
            }
            if self.shared.shutdown.started() {
                return self.shutting_down().await;
            }
            // MQTT: the server closes after one and a half keep-alive periods in which the
            // client sent nothing (what the router sends it does not count).
            let deadline = (self.keep_alive > 0)
                .then(|| last_heard + Duration::from_millis(u64::from(self.keep_alive) * 1500));
            let event = {
                let read = self.stream.read_buf(&mut self.inbuf);
                let notification = link::next_event(&mut self.link_rx);
                let cut = next_cut(&self.live);
                let reading = !self.readings.is_empty();
                let hub = hub::next_wake(&mut self.hub);
                let shutdown = self.shared.shutdown.wait();
                tokio::select! {
                    cut = cut => Event::Cut(cut),
                    () = shutdown => Event::Shutdown,
                    () = std::future::ready(()), if reading => Event::Records,
                    r = async {
                        match deadline {
                            Some(d) => timeout_at(d, read).await.ok(),
                            None => Some(read.await),
                        }
                    } => match r {
                        Some(r) => Event::Read(r),
                        None => Event::KeepAliveExpired,
                    },
                    n = notification => Event::Router(n),
                    h = hub => Event::Hub(h),
                }
            };
            match event {
                Event::Read(Ok(0)) => return Err(Close::Eof),
                Event::Read(Ok(_)) => {
                    last_heard = Instant::now();
                    self.drain_input().await?
                }
                Event::Read(Err(e)) => return Err(e.into()),
                Event::KeepAliveExpired => return Err(Close::KeepAlive),
                Event::Router(event) => Box::pin(self.on_router(event)).await?,
                Event::Cut(cut) => return self.out_of_service(cut).await,
                Event::Shutdown => return self.shutting_down().await,
                Event::Records => self.send_records().await?,
                Event::Hub(wake) => Box::pin(self.on_hub_wake(wake)).await?,
            }
            self.flush().await?;
        }
    }

    /// After the session: its will, unless it ended with a normal DISCONNECT; a
    /// persistent session goes on without its client (`offline.rs`) or, taken over,
    /// hands itself to the connection that took it.
    async fn end(&mut self, result: &Result<(), Close>) {
        if !self.passthrough {
            self.release_link().await;
            self.shared.forget_filters(&self.subscriptions);
            return;
        }
        let normal = matches!(result, Ok(()) | Err(Close::Disconnect));
        if let (false, Some(will)) = (normal, self.will.take()) {
            will::publish(
                *will,
                self.client_id.clone(),
                self.owner,
                self.shared.owners.clone(),
                self.shared.publisher.clone(),
            )
            .await;
        }
        let taken_over = matches!(result, Err(Close::TakenOver));
        if !self.keep {
            if !taken_over {
                self.release_link().await;
            }
            self.shared.forget_filters(&self.subscriptions);
            self.shared.owners.release(&self.client_id, self.owner);
            return;
        }
        let filters = std::mem::take(&mut self.subscriptions);
        match (taken_over, self.link_tx.take(), self.link_rx.take()) {
            (false, Some(tx), Some(rx)) => {
                let offline = offline::Offline {
                    client_id: self.client_id.clone(),
                    owner: self.owner,
                    tx,
                    rx,
                    settling: self.settling.take().map(|s| *s).unwrap_or_default(),
                    filters,
                    sequence: self.sequence,
                    expiry: (self.expiry != u32::MAX)
                        .then(|| Duration::from_secs(u64::from(self.expiry))),
                };
                // The claim on the client id goes with it.
                tokio::spawn(offline.wait(self.shared.clone()));
            }
            _ => {
                let saved = SavedSession {
                    settling: self
                        .settling
                        .as_ref()
                        .map(|s| s.saved())
                        .unwrap_or_default(),
                    filters,
                    sequence: self.sequence,
                };
                self.shared.hand_on(&self.client_id, self.owner, saved);
            }
        }
    }

    /// Set once the registry has cut this device session.
    fn cut(&self) -> Option<Cut> {
        self.live
            .as_ref()
            .and_then(|entered| entered.session().cut())
    }

    /// Ends a session that was taken out of service: MQTT 5 says why first.
    async fn out_of_service(&mut self, cut: Cut) -> Result<(), Close> {
        self.say_disconnect(
            DisconnectReasonCode::AdministrativeAction,
            format!("taken out of service: {cut}"),
        )
        .await;
        let _ = self.stream.shutdown().await;
        Err(Close::OutOfService(cut))
    }

    /// Ends a session because the server shuts down: between packets, so whatever it
    /// asked has been answered; MQTT 5 says why first.
    async fn shutting_down(&mut self) -> Result<(), Close> {
        self.say_disconnect(
            DisconnectReasonCode::ServerShuttingDown,
            "the server is shutting down".to_owned(),
        )
        .await;
        let _ = self.stream.shutdown().await;
        Err(Close::ShuttingDown)
    }

    /// Tells an MQTT 5 client why the server closes its connection (best effort: it
    /// closes either way). MQTT 3.1.1 has no server DISCONNECT.
    async fn say_disconnect(&mut self, reason_code: DisconnectReasonCode, why: String) {
        if self.codec.version != Version::V5 {
            return;
        }
        let disconnect = rumqttd::protocol::Disconnect { reason_code };
        // With a reason string: rumqttd's encoder miscounts the length of a DISCONNECT
        // that has a reason code but no properties.
        let properties = rumqttd::protocol::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why),
            user_properties: Vec::new(),
            server_reference: None,
        };
        if self
            .send(Packet::Disconnect(disconnect, Some(properties)))
            .is_ok()
        {
            let _ = self.flush().await;
        }
    }

    async fn drain_input(&mut self) -> Result<(), Close> {
        while let Some(frame) = self.codec.decode(&mut self.inbuf)? {
            // Boxed, small: the deep paths (a register, the local hub, admin writes,
            // SUBSCRIBE) are boxed where `handle` calls them, so that the packets without
            // one (a device's PUBACK and DISCONNECT, a full session's PUBLISH and its
            // acknowledgements) do not allocate and copy their size (BENCHMARKS.md, issue
            // 28); inline, every idle session would carry it.
            Box::pin(self.handle(frame)).await?;
        }
        Ok(())
    }

    fn send(&mut self, packet: Packet) -> Result<(), Close> {
        self.codec.encode(packet, &mut self.out)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await?;
            self.out.clear();
            // A device session, idle for most of its life, keeps no room for a large
            // answer it sent once (a registration response grows it to about 1 KiB).
            // Full MQTT sessions keep theirs for their traffic.
            if !self.passthrough && self.out.capacity() > OUT_KEPT {
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// Hands what the responder wants published to the router, in order.
    async fn publish(&self, publications: Vec<Publication>) {
        self.shared.publisher.publish(publications).await;
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), Close> {
        // Packets that arrived with the one that was being handled when the cut came.
        if let Some(cut) = self.cut() {
            return Err(Close::OutOfService(cut));
        }
        match frame.packet {
            Packet::Publish(mut publish, mut properties) => {
                let meta = frame
                    .publish
                    .unwrap_or(codec::PublishMeta { qos: 0, pkid: 0 });
                if meta.qos > 1 && !self.passthrough {
                    // PROTOCOL A: DPS sessions speak QoS 0 and 1.
                    return Err(Close::Violation("QoS 2 is not supported".into()));
                }
                if let Some(alias) = properties.as_mut().and_then(|p| p.topic_alias.take()) {
                    publish.topic = self.resolve_alias(alias, publish.topic)?;
                }
                let topic = std::str::from_utf8(&publish.topic)
                    .map_err(|_| Close::Violation("topic is not UTF-8".into()))?
                    .to_owned();
                let content_type = properties.as_ref().and_then(|p| p.content_type.as_deref());
                if topic.starts_with(edgedps_topics::hub::IOTHUB_PREFIX) && !self.passthrough {
                    return Box::pin(self.hub_request(&topic, &publish.payload, meta)).await;
                }
                if self.role == Role::Reader {
                    return Box::pin(self.reader_publish(&topic, &publish.payload, meta)).await;
                }
                if let Identity::Operator(_) = self.identity {
                    if let Some(write) = edgedps_topics::hub::parse_operator_topic(&topic) {
                        return Box::pin(self.hub_operator_write(
                            &topic,
                            write,
                            &publish.payload,
                            meta,
                        ))
                        .await;
                    }
                    if let Some((device_id, bag)) = edgedps_topics::hub::parse_devicebound(&topic) {
                        let (device_id, bag) = (device_id.to_owned(), bag.to_owned());
                        if Box::pin(self.queue_message(&device_id, &bag, &publish.payload, meta))
                            .await?
                        {
                            return Ok(());
                        }
                    }
                }
                if dps_topics::is_dps_topic(&topic) {
                    return Box::pin(self.dps_request(
                        &topic,
                        &publish.payload,
                        content_type,
                        meta,
                    ))
                    .await;
                }
                if let Some(admin) = admin_topics::parse_topic(&topic) {
                    let encoding = Encoding::detect(&publish.payload, content_type);
                    return Box::pin(self.admin_write(
                        &topic,
                        admin,
                        &publish.payload,
                        encoding,
                        meta,
                    ))
                    .await;
                }
                if crate::dollar::forbidden(&topic) {
                    return Err(Close::Violation("topic holds U+0000".into()));
                }
                if !acl::may_publish(&self.role, &topic) {
                    if self.passthrough {
                        // A full MQTT session keeps its connection: the publish is
                        // refused (MQTT 5: reason 0x87) and dropped.
                        Box::pin(self.refused(
                            "publish",
                            &topic,
                            "reserved to the server ($SYS, $dps)",
                        ))
                        .await;
                        return self.refuse_publish(meta);
                    }
                    return Err(Box::pin(self.denied("publish", &topic)).await);
                }
                if self.passthrough {
                    // The router stores it and acknowledges it (PUBACK, PUBREC).
                    let mut publish = publish;
                    if let std::borrow::Cow::Owned(routed) = crate::dollar::to_router_topic(&topic)
                    {
                        publish.topic = routed.into();
                    }
                    let properties = crate::qos::tag(properties, meta.qos, publish.retain);
                    return self.router_send(Packet::Publish(publish, properties)).await;
                }
                let forward = rumqttd::protocol::Publish::new(
                    publish.topic.clone(),
                    publish.payload.clone(),
                    publish.retain,
                );
                let properties =
                    crate::qos::tag(self.codec.properties(properties), meta.qos, publish.retain);
                self.router_send(Packet::Publish(forward, properties))
                    .await?;
                self.puback(meta)
            }
            Packet::Subscribe(subscribe, properties) => {
                Box::pin(self.subscribe(subscribe, properties)).await
            }
            Packet::Unsubscribe(unsubscribe, properties) => {
                Box::pin(self.unsubscribe(unsubscribe, properties)).await
            }
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Disconnect(disconnect, properties) => {
                // MQTT 5: a DISCONNECT may change the Session Expiry Interval, but not
                // make a session that was to end with its connection outlive it.
                if let Some(expiry) = properties.and_then(|p| p.session_expiry_interval) {
                    if self.keep {
                        self.expiry = expiry;
                    }
                }
                match disconnect.reason_code {
                    DisconnectReasonCode::DisconnectWithWillMessage => {
                        Err(Close::DisconnectWithWill)
                    }
                    _ => Err(Close::Disconnect),
                }
            }
            Packet::PubRel(pubrel, _) if self.own_qos2.remove(&pubrel.pkid) => {
                self.send(Packet::PubComp(
                    PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    },
                    None,
                ))
            }
            // Acknowledgements of what the router delivered: settled with the router in
            // its order (`link.rs`).
            Packet::PubAck(PubAck { pkid, .. }, _) | Packet::PubRec(PubRec { pkid, .. }, _)
                if self.passthrough =>
            {
                self.acknowledged(pkid).await
            }
            Packet::PubComp(PubComp { pkid, .. }, _) if self.passthrough => {
                self.completed(pkid).await
            }
            // The release of a QoS 2 publish the router holds.
            release @ Packet::PubRel(..) if self.passthrough => self.router_send(release).await,
            // Device sessions: router deliveries are QoS 0, nothing to settle; a hub
            // session's cloud-to-device messages leave their queue.
            Packet::PubAck(PubAck { pkid, .. }, _) => self.hub_acknowledged(pkid),
            Packet::Connect(..) => Err(Close::Violation("second CONNECT".into())),
            other => Err(Close::Violation(format!("unexpected packet {other:?}"))),
        }
    }

    /// MQTT 5 topic aliases (3.3.2.3.4) of a full session: a publish with a topic sets
    /// the alias, one without uses it. DPS sessions are offered none.
    fn resolve_alias(&mut self, alias: u16, topic: bytes::Bytes) -> Result<bytes::Bytes, Close> {
        if !self.passthrough || alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(Close::Violation(format!(
                "topic alias {alias} is outside 1..={TOPIC_ALIAS_MAX}"
            )));
        }
        if topic.is_empty() {
            return self
                .topic_aliases
                .get(&alias)
                .cloned()
                .ok_or_else(|| Close::Violation(format!("topic alias {alias} was never set")));
        }
        self.topic_aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    /// A refused publish of a full MQTT session: an event for the operators.
    async fn refused(&self, action: &str, topic: &str, reason: &str) {
        let operator = match &self.identity {
            Identity::Operator(name) => name.as_deref().unwrap_or("(anonymous)"),
            Identity::Device(_) => "(device)",
        };
        tracing::warn!(target: "edgedps::audit", client_id = %self.client_id, %operator, %topic, %reason, "{action} refused");
        let event = self
            .shared
            .responder
            .topic_refused(&self.client_id, action, topic, reason);
        self.publish(vec![event]).await;
    }

    /// Acknowledges a refused publish: MQTT 5 with reason 0x87 (not authorized); MQTT
    /// 3.1.1, which has no such code, as if accepted.
    fn refuse_publish(&mut self, meta: codec::PublishMeta) -> Result<(), Close> {
        if self.codec.version == Version::V4 {
            return self.puback(meta);
        }
        match meta.qos {
            1 => self.send(Packet::PubAck(
                PubAck {
                    pkid: meta.pkid,
                    reason: PubAckReason::NotAuthorized,
                },
                None,
            )),
            2 => self.send(Packet::PubRec(
                PubRec {
                    pkid: meta.pkid,
                    reason: PubRecReason::NotAuthorized,
                },
                None,
            )),
            _ => Ok(()),
        }
    }

    /// A refused use of a topic: an event for the operators, and the session closes.
    async fn denied(&self, action: &str, topic: &str) -> Close {
        let reason = match (&self.identity, &self.role) {
            (Identity::Device(_), Role::Device { device_id: None }) => {
                "the device has no hub rights (not assigned, or out of service)"
            }
            (Identity::Device(_), _) => "outside the device's own topics",
            (Identity::Operator(_), _) => "not allowed for operators",
        };
        let event = self
            .shared
            .responder
            .topic_refused(&self.client_id, action, topic, reason);
        self.publish(vec![event]).await;
        Close::Denied(format!("{action} to `{topic}`: {reason}"))
    }

    /// Acknowledges a publish answered here: PUBACK for QoS 1, PUBREC for QoS 2 (the
    /// PUBCOMP follows the client's PUBREL).
    fn puback(&mut self, meta: codec::PublishMeta) -> Result<(), Close> {
        match meta.qos {
            1 => self.send(Packet::PubAck(
                PubAck {
                    pkid: meta.pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            2 => {
                self.own_qos2.insert(meta.pkid);
                self.send(Packet::PubRec(
                    PubRec {
                        pkid: meta.pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ))
            }
            _ => Ok(()),
        }
    }
}

pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
