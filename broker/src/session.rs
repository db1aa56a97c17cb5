//! One MQTT session, from CONNECT to close (DESIGN: data flow steps 2-5).
//!
//! `$dps/` requests are answered here by the responder, PUBACK first. Publishes under
//! `dps/` from operators are admin writes. Everything else passes the topic ACL and
//! goes packet by packet into this session's rumqttd link.
//!
//! A device session is entered in the responder's live-session registry before its
//! rights are read (the access rule), and stays there until it ends. When a write takes
//! the device out of service, the registry cuts the session: it uses nothing more, and
//! closes (MQTT 5: DISCONNECT 0x98, administrative action, first).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Filter, Packet, PingResp, PubAck, PubAckReason, PublishProperties,
    QoS, RetainForwardRule, SubAck, Subscribe, UnsubAck, UnsubAckReason, Unsubscribe,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use edgedps_policies::access::Access;
use edgedps_policies::acl::{self, Role};
use edgedps_responder::sessions::Entered;
use edgedps_responder::{unix_now, Attested, Credential, Cut, Refusal as AuthRefusal, Responder};
use edgedps_topics::admin::{self as admin_topics, AdminTopic};
use edgedps_topics::dps::{self, DeviceRequest};
use edgedps_topics::encoding::{Encoding, CBOR_CONTENT_TYPE};

use crate::codec::{self, Codec, Frame, Refusal, Version};
use crate::config::Limits;
use crate::router::Router;

/// Which listener a connection came in on; it sets the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Devices,
    Local,
}

/// What every session shares.
pub struct Shared {
    pub responder: Arc<Responder>,
    pub router: Router,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("connection closed by the peer")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] codec::CodecError),
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
    #[error("router: {0}")]
    Router(String),
    #[error("taken out of service: {0}")]
    OutOfService(Cut),
}

/// Who is on the other end, once the CONNECT is accepted.
enum Identity {
    Device(Attested),
    Operator,
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
    next_pkid: u16,
    link_tx: Option<LinkTx>,
    link_rx: Option<LinkRx>,
    /// Seconds; 0 turns keep-alive off.
    keep_alive: u16,
    /// Filters held in the router, for `limits.max_subscriptions_per_session`.
    subscriptions: std::collections::HashSet<String>,
    /// A device's place in the live-session registry.
    live: Option<Entered>,
}

/// Runs a session on an established (TLS or plain) stream until it closes. `_slot` is
/// the session's place in the connection limit, given back when it ends.
pub async fn serve<S>(
    stream: S,
    chain: Vec<Vec<u8>>,
    kind: ListenerKind,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match Box::pin(accept(stream, chain, kind, peer, shared)).await {
        Ok(Some(mut session)) => {
            let result = session.run().await;
            session.release_link().await;
            match result {
                Err(Close::Eof) | Err(Close::Disconnect) => {
                    tracing::debug!(peer = %session.peer, client_id = %session.client_id, "session ended")
                }
                Err(e @ Close::Denied(_)) => {
                    tracing::warn!(peer = %session.peer, client_id = %session.client_id, reason = %e, "session closed")
                }
                Err(Close::OutOfService(cut)) => {
                    tracing::info!(target: "edgedps::audit", peer = %session.peer, client_id = %session.client_id, reason = %cut, "session closed: out of service")
                }
                Err(e) => {
                    tracing::info!(peer = %session.peer, client_id = %session.client_id, reason = %e, "session closed")
                }
                Ok(()) => {}
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::info!(%peer, reason = %e, "connection dropped before CONNECT was accepted")
        }
    }
}

/// Reads the CONNECT under its deadline and decides it. `Ok(None)`: refused (CONNACK sent).
async fn accept<S>(
    mut stream: S,
    chain: Vec<Vec<u8>>,
    kind: ListenerKind,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Option<Session<S>>, Close>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + Duration::from_millis(shared.limits.connect_timeout_ms);
    let max = shared.limits.max_packet_size;
    let mut inbuf = BytesMut::with_capacity(512);
    let version = loop {
        if let Some(version) = codec::detect_version(&inbuf, max)? {
            break version;
        }
        read_more(&mut stream, &mut inbuf, deadline).await?;
    };
    let mut codec = Codec::new(version, max);
    let frame = loop {
        if let Some(frame) = codec.decode(&mut inbuf)? {
            break frame;
        }
        read_more(&mut stream, &mut inbuf, deadline).await?;
    };
    let Packet::Connect(connect, _properties, _will, _will_properties, login) = frame.packet else {
        return Err(Close::Violation("first packet is not a CONNECT".into()));
    };
    let client_id = connect.client_id.clone();
    let mut live = None;
    let (identity, role) = match kind {
        ListenerKind::Local => (Identity::Operator, Role::Operator),
        ListenerKind::Devices => {
            let (username, password) = login.map(|l| (l.username, l.password)).unwrap_or_default();
            let credential = if password.is_empty() {
                Credential::X509(&chain)
            } else {
                Credential::Sas(&password)
            };
            match shared
                .responder
                .authenticate(&client_id, &username, credential, unix_now())
            {
                Ok(attested) => {
                    // Entered before its rights are read: a write that takes the device
                    // out of service either is seen below or finds the session.
                    live = Some(shared.responder.sessions().enter(attested.clone()));
                    let access = shared.responder.access(&attested).unwrap_or_else(|e| {
                        tracing::warn!(%peer, %client_id, error = %e, "could not read the device's standing; no hub rights");
                        Access::Unassigned
                    });
                    tracing::info!(target: "edgedps::audit", %peer, %client_id, source = ?attested.source, kind = ?attested.kind, access = %Verdict(&access), "connect accepted");
                    let device_id = match access {
                        Access::Hub { device_id } => Some(device_id),
                        Access::Unassigned | Access::OutOfService(_) => None,
                    };
                    (Identity::Device(attested), Role::Device { device_id })
                }
                Err(refusal) => {
                    tracing::warn!(target: "edgedps::audit", %peer, %client_id, reason = %refusal, "connect refused");
                    let code = codec.refusal_code(match refusal {
                        AuthRefusal::BadClientId(_) => Refusal::BadClientId,
                        AuthRefusal::Malformed(_) => Refusal::BadCredentials,
                        AuthRefusal::NotAuthorized(_) => Refusal::NotAuthorized,
                        AuthRefusal::Unavailable(_) => Refusal::Unavailable,
                    });
                    let mut out = BytesMut::with_capacity(8);
                    codec.encode(connack(code), &mut out)?;
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    let _ = stream.shutdown().await;
                    return Ok(None);
                }
            }
        }
    };
    let mut session = Session {
        stream,
        peer,
        client_id,
        inbuf,
        out: BytesMut::with_capacity(256),
        codec,
        shared,
        identity,
        role,
        dps_qos: None,
        dps_encoding: Encoding::Json,
        next_pkid: 0,
        link_tx: None,
        link_rx: None,
        keep_alive: connect.keep_alive,
        subscriptions: std::collections::HashSet::new(),
        live,
    };
    session.send(connack(ConnectReturnCode::Success))?;
    session.flush().await?;
    Ok(Some(session))
}

/// The access verdict, for the audit line.
struct Verdict<'a>(&'a Access);

impl std::fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Access::Hub { device_id } => write!(f, "hub rights for `{device_id}`"),
            Access::Unassigned => f.write_str("provisioning only (not assigned)"),
            Access::OutOfService(reason) => {
                write!(f, "provisioning only ({})", reason.reason())
            }
        }
    }
}

fn connack(code: ConnectReturnCode) -> Packet {
    // DPS: SessionPresent is always 0; provisioning sessions are never persisted.
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), Close> {
    match timeout_at(deadline, stream.read_buf(buf)).await {
        Err(_) => Err(Close::ConnectTimeout),
        Ok(Ok(0)) => Err(Close::Eof),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
    }
}

async fn next_notification(
    rx: &mut Option<LinkRx>,
) -> Option<Result<Option<Notification>, String>> {
    match rx {
        Some(rx) => Some(rx.next().await.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

async fn next_cut(live: &Option<Entered>) -> Cut {
    match live {
        Some(entered) => entered.session().cut_off().await,
        None => std::future::pending().await,
    }
}

enum Event {
    Read(Result<usize, std::io::Error>),
    KeepAliveExpired,
    Router(Box<Option<Result<Option<Notification>, String>>>),
    Cut(Cut),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self) -> Result<(), Close> {
        // Packets that arrived with the CONNECT.
        self.drain_input().await?;
        self.flush().await?;
        let mut last_heard = Instant::now();
        loop {
            if let Some(cut) = self.cut() {
                return self.out_of_service(cut).await;
            }
            // MQTT: the server closes after one and a half keep-alive periods in which the
            // client sent nothing (what the router sends it does not count).
            let deadline = (self.keep_alive > 0)
                .then(|| last_heard + Duration::from_millis(u64::from(self.keep_alive) * 1500));
            let event = {
                let read = self.stream.read_buf(&mut self.inbuf);
                let notification = next_notification(&mut self.link_rx);
                let cut = next_cut(&self.live);
                tokio::select! {
                    cut = cut => Event::Cut(cut),
                    r = async {
                        match deadline {
                            Some(d) => timeout_at(d, read).await.ok(),
                            None => Some(read.await),
                        }
                    } => match r {
                        Some(r) => Event::Read(r),
                        None => Event::KeepAliveExpired,
                    },
                    n = notification => Event::Router(Box::new(n)),
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
                Event::Router(notification) => Box::pin(self.forward(*notification)).await?,
                Event::Cut(cut) => return self.out_of_service(cut).await,
            }
            self.flush().await?;
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
        if self.codec.version == Version::V5 {
            let disconnect = rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::AdministrativeAction,
            };
            // With a reason string: rumqttd's encoder miscounts the length of a
            // DISCONNECT that has a reason code but no properties.
            let properties = rumqttd::protocol::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("taken out of service: {cut}")),
                user_properties: Vec::new(),
                server_reference: None,
            };
            // Best effort: the connection closes either way.
            if self
                .send(Packet::Disconnect(disconnect, Some(properties)))
                .is_ok()
            {
                let _ = self.flush().await;
            }
        }
        let _ = self.stream.shutdown().await;
        Err(Close::OutOfService(cut))
    }

    async fn drain_input(&mut self) -> Result<(), Close> {
        while let Some(frame) = self.codec.decode(&mut self.inbuf)? {
            // Boxed: the register path is a deep future; inline, every idle session
            // would carry its size (see BENCHMARKS.md, idle session memory).
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
        }
        Ok(())
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), Close> {
        // Packets that arrived with the one that was being handled when the cut came.
        if let Some(cut) = self.cut() {
            return Err(Close::OutOfService(cut));
        }
        match frame.packet {
            Packet::Publish(publish, properties) => {
                let meta = frame
                    .publish
                    .unwrap_or(codec::PublishMeta { qos: 0, pkid: 0 });
                if meta.qos > 1 {
                    return Err(Close::Violation("QoS 2 is not supported".into()));
                }
                let topic = std::str::from_utf8(&publish.topic)
                    .map_err(|_| Close::Violation("topic is not UTF-8".into()))?
                    .to_owned();
                let content_type = properties.as_ref().and_then(|p| p.content_type.as_deref());
                if dps::is_dps_topic(&topic) {
                    return self
                        .dps_request(&topic, &publish.payload, content_type, meta)
                        .await;
                }
                if let Some(admin) = admin_topics::parse_topic(&topic) {
                    let encoding = Encoding::detect(&publish.payload, content_type);
                    return self
                        .admin_write(&topic, admin, &publish.payload, encoding, meta)
                        .await;
                }
                if !acl::may_publish(&self.role, &topic) {
                    return Err(self.denied("publish", &topic));
                }
                let forward = rumqttd::protocol::Publish::new(
                    publish.topic.clone(),
                    publish.payload.clone(),
                    publish.retain,
                );
                self.router_send(Packet::Publish(forward, self.codec.properties(properties)))
                    .await?;
                self.puback(meta)
            }
            Packet::Subscribe(subscribe, _) => self.subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe, _) => self.unsubscribe(unsubscribe).await,
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Disconnect(..) => Err(Close::Disconnect),
            // Acknowledgements of what we delivered: nothing is retransmitted, so
            // nothing to settle.
            Packet::PubAck(..) => Ok(()),
            Packet::Connect(..) => Err(Close::Violation("second CONNECT".into())),
            other => Err(Close::Violation(format!("unexpected packet {other:?}"))),
        }
    }

    /// A refused use of a topic: an event for the operators, and the session closes.
    fn denied(&self, action: &str, topic: &str) -> Close {
        let reason = match (&self.identity, &self.role) {
            (Identity::Device(_), Role::Device { device_id: None }) => {
                "the device has no hub rights (not assigned, or out of service)"
            }
            (Identity::Device(_), _) => "outside the device's own topics",
            (Identity::Operator, _) => "not allowed for operators",
        };
        self.shared
            .responder
            .topic_refused(&self.client_id, action, topic, reason);
        Close::Denied(format!("{action} to `{topic}`: {reason}"))
    }

    fn puback(&mut self, meta: codec::PublishMeta) -> Result<(), Close> {
        if meta.qos == 1 {
            self.send(Packet::PubAck(
                PubAck {
                    pkid: meta.pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ))?;
        }
        Ok(())
    }

    /// PROTOCOL A3: a `$dps/` request, answered in process.
    async fn dps_request(
        &mut self,
        topic: &str,
        body: &[u8],
        content_type: Option<&str>,
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        let Identity::Device(device) = &self.identity else {
            return Err(self.denied("publish", topic));
        };
        let device = device.clone();
        let request = dps::parse_request(topic)
            .map_err(|e| Close::Violation(format!("bad DPS request: {e}")))?;
        // PUBACK before the response.
        self.puback(meta)?;
        let reply = match &request {
            DeviceRequest::Register { .. } => {
                self.dps_encoding = Encoding::detect(body, content_type);
                let encoding = self.dps_encoding;
                self.shared
                    .responder
                    .register(&device, body, encoding)
                    .await
            }
            DeviceRequest::Poll { operation_id, .. } => {
                let encoding = match Encoding::detect(body, content_type) {
                    Encoding::Cbor => Encoding::Cbor,
                    Encoding::Json => self.dps_encoding,
                };
                self.shared.responder.poll(&device, operation_id, encoding)
            }
        };
        if let (Some(device_id), None) = (reply.assigned_device_id, self.cut()) {
            // After `assigned`, the device may use `devices/{deviceId}/#`.
            self.role = Role::Device {
                device_id: Some(device_id),
            };
        }
        let Some(qos) = self.dps_qos else {
            tracing::warn!(client_id = %self.client_id, "DPS request before subscribing to $dps/registrations/res/#; no response sent");
            return Ok(());
        };
        let topic = dps::response_topic(reply.status, request.rid(), reply.retry_after);
        let pkid = self.pkid();
        let publish = codec::publish(topic.as_bytes(), &reply.body, qos, pkid, false);
        let properties = (reply.encoding == Encoding::Cbor).then(|| PublishProperties {
            content_type: Some(CBOR_CONTENT_TYPE.into()),
            ..Default::default()
        });
        self.send(Packet::Publish(publish, self.codec.properties(properties)))
    }

    /// PROTOCOL B: an operator's write of a retained record.
    async fn admin_write(
        &mut self,
        topic: &str,
        admin: AdminTopic,
        body: &[u8],
        encoding: Encoding,
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        if self.role != Role::Operator {
            return Err(self.denied("publish", topic));
        }
        let responder = self.shared.responder.clone();
        match admin {
            AdminTopic::Record { kind, id } => {
                self.puback(meta)?;
                // Flush the PUBACK first: the result arrives on its own topic.
                self.flush().await?;
                responder
                    .apply_admin(&self.client_id, kind, &id, body, encoding)
                    .await;
            }
            AdminTopic::Retire { registration_id } => {
                self.puback(meta)?;
                self.flush().await?;
                responder
                    .retire(&self.client_id, &registration_id, body, encoding)
                    .await;
            }
            AdminTopic::Output | AdminTopic::Unknown => {
                return Err(Close::Denied(format!(
                    "`{topic}` is not an operator record (enrollments, enrollment-groups, hubs, registrations, crls) nor dps/admin/retire/{{registrationId}}"
                )))
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, subscribe: Subscribe) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut forward = Vec::new();
        for filter in subscribe.filters {
            let requested = filter.qos as u8;
            if filter.path == dps::RESPONSE_FILTER && matches!(self.identity, Identity::Device(_)) {
                let granted = requested.min(1);
                self.dps_qos = Some(granted);
                codes.push(self.codec.subscribe_granted(granted));
            } else if !rumqttd::protocol::valid_filter(&filter.path)
                || !acl::may_subscribe(&self.role, &filter.path)
            {
                tracing::warn!(client_id = %self.client_id, filter = %filter.path, "subscription refused");
                self.shared.responder.topic_refused(
                    &self.client_id,
                    "subscribe",
                    &filter.path,
                    "not allowed for this session",
                );
                codes.push(self.codec.subscribe_refused());
            } else if !self.subscriptions.contains(&filter.path)
                && self.subscriptions.len() >= self.shared.limits.max_subscriptions_per_session
            {
                tracing::warn!(client_id = %self.client_id, filter = %filter.path, "subscription refused: limits.max_subscriptions_per_session reached");
                codes.push(self.codec.subscribe_refused());
            } else {
                // Router deliveries go out at QoS 0 (see docs/protocol.md).
                self.subscriptions.insert(filter.path.clone());
                codes.push(self.codec.subscribe_granted(0));
                forward.push(Filter {
                    path: filter.path,
                    qos: QoS::AtMostOnce,
                    nolocal: filter.nolocal,
                    preserve_retain: filter.preserve_retain,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                });
            }
        }
        let mut early = Vec::new();
        if !forward.is_empty() {
            self.router_send(Packet::Subscribe(
                Subscribe {
                    pkid: subscribe.pkid,
                    filters: forward,
                },
                None,
            ))
            .await?;
            early = self.await_router_ack().await?;
        }
        self.send(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes: codes,
            },
            None,
        ))?;
        // Retained messages the router sent with its acknowledgement follow the SUBACK.
        for notification in early {
            self.forward(Some(Ok(Some(notification)))).await?;
        }
        Ok(())
    }

    /// Waits until the router has applied what this session sent it: only then is the
    /// subscription live, and only then may the client be told so (otherwise a publish
    /// right after the SUBACK could miss it). Returns what arrived meanwhile.
    async fn await_router_ack(&mut self) -> Result<Vec<Notification>, Close> {
        let mut early = Vec::new();
        let Some(rx) = self.link_rx.as_mut() else {
            return Ok(early);
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match timeout_at(deadline, rx.next()).await {
                Err(_) => return Err(Close::Router("no acknowledgement within 10 s".into())),
                Ok(Err(e)) => return Err(Close::Router(e.to_string())),
                Ok(Ok(Some(Notification::DeviceAck(_)))) => return Ok(early),
                Ok(Ok(Some(Notification::Unschedule))) => {
                    rx.wake().await.map_err(|e| Close::Router(e.to_string()))?
                }
                Ok(Ok(Some(other))) => early.push(other),
                Ok(Ok(None)) => {}
            }
        }
    }

    async fn unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), Close> {
        let reasons = vec![UnsubAckReason::Success; unsubscribe.filters.len()];
        let forward: Vec<String> = unsubscribe
            .filters
            .into_iter()
            .filter(|f| !dps::is_dps_topic(f))
            .collect();
        for filter in &forward {
            self.subscriptions.remove(filter);
        }
        if !forward.is_empty() && self.link_tx.is_some() {
            self.router_send(Packet::Unsubscribe(
                Unsubscribe {
                    pkid: unsubscribe.pkid,
                    filters: forward,
                },
                None,
            ))
            .await?;
        }
        self.send(Packet::UnsubAck(
            UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
            },
            None,
        ))
    }

    /// Sends into this session's router link, creating it on first use.
    async fn router_send(&mut self, packet: Packet) -> Result<(), Close> {
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
    async fn release_link(&mut self) {
        if let Some(mut tx) = self.link_tx.take() {
            let disconnect = rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            };
            let _ = tx.send(Packet::Disconnect(disconnect, None)).await;
        }
        self.link_rx = None;
    }

    /// A notification of the router: deliver publishes, wake it when it asks.
    async fn forward(
        &mut self,
        notification: Option<Result<Option<Notification>, String>>,
    ) -> Result<(), Close> {
        match notification {
            None | Some(Ok(None)) => Ok(()),
            Some(Err(e)) => Err(Close::Router(e)),
            Some(Ok(Some(Notification::Forward(forward)))) => {
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
            Some(Ok(Some(Notification::Unschedule))) => {
                if let Some(rx) = self.link_rx.as_ref() {
                    rx.wake().await.map_err(|e| Close::Router(e.to_string()))?;
                }
                Ok(())
            }
            Some(Ok(Some(Notification::Disconnect(..)))) => {
                Err(Close::Router("router disconnected the link".into()))
            }
            Some(Ok(Some(_))) => Ok(()),
        }
    }
}
