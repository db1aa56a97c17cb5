//! The CONNECT (PROTOCOL A2): read under its deadline, decided by the responder on the
//! device listener (attestation, the live-session registry, the access rule), answered
//! with a CONNACK. A refusal is a CONNACK with the MQTT refusal code and a log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{ConnAck, ConnAckProperties, ConnectReturnCode, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use edgedps_policies::access::Access;
use edgedps_policies::acl::Role;
use edgedps_policies::attestation::AttestationError;
use edgedps_responder::{unix_now, Credential, Error};
use edgedps_topics::encoding::Encoding;

use super::{lock, will, Close, Identity, ListenerKind, Session, Shared};
use crate::codec::{self, Codec, ConnectRefusal, Version};
use crate::config::OperatorRole;
use crate::operators::{Authenticated, Refusal};

/// Reads the CONNECT under its deadline and decides it. `Ok(None)`: refused (CONNACK sent).
pub(super) async fn accept<S>(
    mut stream: S,
    chain: Vec<Vec<u8>>,
    kind: ListenerKind,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Option<Box<Session<S>>>, Close>
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
    let Packet::Connect(connect, properties, will, will_properties, login) = frame.packet else {
        return Err(Close::Violation("first packet is not a CONNECT".into()));
    };
    let mut client_id = connect.client_id.clone();
    let mut link = None;
    let mut will_message = None;
    let mut assigned = None;
    let mut keep_session = false;
    let mut session_expiry = 0;
    let mut owner = 0;
    let mut hub_session = None;
    let mut saved: Option<super::SavedSession> = None;
    let (identity, role, live, standing) = match kind {
        ListenerKind::Local | ListenerKind::Operators => {
            let operator = match authenticate(&shared, kind, peer, &chain, login.as_ref()).await {
                Ok(operator) => operator,
                Err(refusal) => {
                    let listener = match kind {
                        ListenerKind::Operators => "operators",
                        _ => "local",
                    };
                    shared.metrics.connect_refused(listener, refusal.label());
                    if refusal == Refusal::Throttled {
                        shared.metrics.throttled("operator_password");
                    }
                    let username = login.as_ref().map(|l| l.username.as_str()).unwrap_or("");
                    tracing::warn!(target: "edgedps::audit", %peer, %client_id, %username, reason = %refusal, "operator connect refused");
                    refuse(&mut stream, &codec, ConnectRefusal::NotAuthorized).await?;
                    return Ok(None);
                }
            };
            let (name, role) = match operator {
                Some(operator) => {
                    tracing::info!(target: "edgedps::audit", %peer, %client_id, operator = %operator.name, role = ?operator.role, "operator connected");
                    let role = match operator.role {
                        OperatorRole::Admin => Role::Operator,
                        OperatorRole::Reader => Role::Reader,
                    };
                    (Some(operator.name.into_boxed_str()), role)
                }
                None => (None, Role::Operator),
            };
            if client_id.is_empty() {
                // MQTT 3.1.3.1: a server may assign an id to a client with a clean
                // session; one that wants its session kept must name it.
                if !connect.clean_session {
                    tracing::info!(%peer, "connect refused: empty client id without a clean session");
                    shared.metrics.connect_refused("local", "bad_client_id");
                    refuse(&mut stream, &codec, ConnectRefusal::BadClientId).await?;
                    return Ok(None);
                }
                client_id = format!("edgedps-{}", assigned_suffix());
                assigned = Some(client_id.clone());
            }
            let expiry = properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0);
            // MQTT 3.1.1: clean session 0 keeps the session. MQTT 5: Clean Start only
            // says whether to begin anew; the Session Expiry Interval whether to keep it.
            let (discard, keep) = match codec.version {
                Version::V4 => (connect.clean_session, !connect.clean_session),
                Version::V5 => (connect.clean_session, expiry > 0),
            };
            keep_session = keep;
            // No expiry of an offline session crosses this (`offline.rs`).
            let connecting = shared.connecting.lock().await;
            owner = shared.owners.claim(&client_id);
            if discard && keep {
                // rumqttd's one flag means both: clear the old session with a clean link
                // first, then keep the new one.
                let cleared = shared.router.session_link(&client_id, true).await;
                if let Ok(mut cleared) = cleared {
                    crate::router::release(&mut cleared.tx).await;
                }
            }
            let linked = shared.router.session_link(&client_id, !keep).await;
            drop(connecting);
            match linked {
                Ok(session) => {
                    // The connection or offline session this one took over hands its
                    // state on as it ends; only a resumed session needs it.
                    saved = if session.session_present {
                        shared.handed_over(&client_id, Duration::from_secs(2)).await
                    } else {
                        // Left by a session the router no longer has: forgotten.
                        if let Some(stale) = lock(&shared.saved).remove(&client_id) {
                            shared.forget_filters(&stale.filters);
                        }
                        None
                    };
                    link = Some(session)
                }
                Err(e) => {
                    shared.owners.release(&client_id, owner);
                    tracing::warn!(%peer, %client_id, error = %e, "connect refused: no router link");
                    refuse(&mut stream, &codec, ConnectRefusal::Unavailable).await?;
                    return Ok(None);
                }
            }
            let expiry = match codec.version {
                Version::V4 => u32::MAX,
                Version::V5 => expiry,
            };
            session_expiry = expiry;
            will_message = will::Will::from_connect(will, will_properties, expiry);
            (Identity::Operator(name), role, None, None)
        }
        ListenerKind::Devices => {
            let (username, password) = login.map(|l| (l.username, l.password)).unwrap_or_default();
            let credential = if password.is_empty() {
                Credential::X509(&chain)
            } else {
                Credential::Sas(&password)
            };
            // An IoT Hub username (`{host}/{deviceId}/?api-version=...`) is a device of
            // the local hub (PROTOCOL E); anything else provisions (PROTOCOL A2).
            let hub_username = edgedps_topics::identity::parse_hub_username(&username).ok();
            let hub = hub_username.is_some();
            let admission = match &hub_username {
                Some(hub_username) => {
                    shared
                        .responder
                        .admit_hub(&client_id, hub_username, credential, unix_now())
                }
                None => shared
                    .responder
                    .admit(&client_id, &username, credential, unix_now()),
            };
            shared.publisher.publish(vec![admission.event]).await;
            match admission.outcome {
                Ok(admitted) => {
                    tracing::info!(target: "edgedps::audit", %peer, %client_id, hub, source = ?admitted.device.source, kind = ?admitted.device.kind, access = %Verdict(&admitted.access), "connect accepted");
                    let device_id = match admitted.access {
                        Access::Hub { device_id } => Some(device_id),
                        Access::Unassigned | Access::OutOfService(_) => None,
                    };
                    if let (true, Some(device_id)) = (hub, &device_id) {
                        let link = shared.responder.attach_hub(device_id);
                        hub_session = Some(Box::new(super::hub::HubSession::new(
                            device_id.clone(),
                            link,
                            admitted.device.token_expires,
                        )));
                    }
                    (
                        Identity::Device(admitted.device),
                        Role::Device { device_id },
                        Some(admitted.live),
                        admitted.standing.map(Box::new),
                    )
                }
                Err(error) => {
                    tracing::warn!(target: "edgedps::audit", %peer, %client_id, hub, reason = %error, "connect refused");
                    let refusal = refusal(&error);
                    shared.metrics.connect_refused("devices", refusal.label());
                    refuse(&mut stream, &codec, refusal).await?;
                    return Ok(None);
                }
            }
        }
    };
    let passthrough = link.is_some();
    let session_present = link.as_ref().is_some_and(|l| l.session_present);
    // What the connection before left of the session.
    let saved = saved.unwrap_or_default();
    if saved.settling.dropped() > 0 || saved.settling.queued() > 0 {
        tracing::info!(%client_id, queued = saved.settling.queued(), dropped = saved.settling.dropped(), "session resumed with messages queued while the client was away (dropped: over the session's life, queue full)");
    }
    let receive_maximum = properties
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .unwrap_or(u16::MAX);
    let settling = super::settling::Settling::resume(
        saved.settling,
        receive_maximum,
        codec.version == Version::V5,
        shared.limits.max_queued_messages,
    );
    let (link_tx, link_rx) = match link {
        Some(link) => (Some(link.tx), Some(link.rx)),
        None => (None, None),
    };
    // Boxed: in the session's task it is a pointer, not a copy in each of its states.
    let mut session = Box::new(Session {
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
        standing,
        next_pkid: 0,
        link_tx,
        link_rx,
        keep_alive: connect.keep_alive,
        subscriptions: saved.filters,
        sequence: saved.sequence,
        live,
        passthrough,
        owner,
        will: will_message.map(Box::new),
        pending_subacks: std::collections::HashMap::new(),
        readings: std::collections::VecDeque::new(),
        own_qos2: std::collections::HashSet::new(),
        settling: passthrough.then(|| Box::new(settling)),
        keep: keep_session,
        expiry: session_expiry,
        topic_aliases: std::collections::HashMap::new(),
        hub: hub_session,
    });
    // DPS: SessionPresent is always 0; provisioning sessions are never persisted.
    // A full MQTT 5 session is told what it may use; DPS sessions get no properties.
    let properties = passthrough.then(|| ConnAckProperties {
        assigned_client_identifier: assigned,
        topic_alias_max: Some(super::TOPIC_ALIAS_MAX),
        ..Default::default()
    });
    let accepted = Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        properties.filter(|_| session.codec.version == Version::V5),
    );
    session.send(accepted)?;
    // A resumed session: what its client awaits, before anything new.
    let first = session
        .settling
        .as_mut()
        .map(|s| s.start())
        .unwrap_or_default();
    session.act(first).await?;
    session.flush().await?;
    Ok(Some(session))
}

/// Who an operator's CONNECT says it is: a username and password (checked when
/// operators are configured), else (operator listener) a client certificate, else
/// (local listener, when it takes them) nobody, an anonymous admin. `Ok(None)`:
/// anonymous.
async fn authenticate(
    shared: &Shared,
    kind: ListenerKind,
    peer: SocketAddr,
    chain: &[Vec<u8>],
    login: Option<&rumqttd::protocol::Login>,
) -> Result<Option<Authenticated>, Refusal> {
    // Without `[[operators]]` there is nothing to check a username against: as with
    // mosquitto without a password file, a client of an anonymous listener that sends
    // one (many applications always do) is anonymous.
    let checked =
        shared.operators.any() || !(kind == ListenerKind::Local && shared.local_anonymous);
    if let Some(login) = login.filter(|l| !l.username.is_empty() && checked) {
        return shared
            .operators
            .by_password(peer.ip(), &login.username, login.password.as_bytes())
            .await
            .map(Some);
    }
    if let Some(leaf) = chain.first().filter(|_| kind == ListenerKind::Operators) {
        // The handshake checked the chain against `client_ca`.
        let cn = crate::operators::common_name(leaf).unwrap_or_default();
        return shared.operators.by_certificate(&cn).map(Some);
    }
    if kind == ListenerKind::Local && shared.local_anonymous {
        return Ok(None);
    }
    Err(Refusal::Anonymous)
}

/// The CONNACK refusal for a CONNECT the responder refused: the one place its errors
/// become MQTT refusal codes.
pub(crate) fn refusal(error: &Error) -> ConnectRefusal {
    match error {
        Error::Attestation(AttestationError::BadClientId(_)) => ConnectRefusal::BadClientId,
        Error::Attestation(AttestationError::Malformed(_)) => ConnectRefusal::BadCredentials,
        Error::Attestation(AttestationError::NotAuthorized(_)) => ConnectRefusal::NotAuthorized,
        // The store failed or holds something unusable: the device may retry.
        _ => ConnectRefusal::Unavailable,
    }
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

/// Answers a refused CONNECT and closes the connection.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    codec: &Codec,
    refusal: ConnectRefusal,
) -> Result<(), Close> {
    let code = codec.refusal_code(refusal);
    let mut out = BytesMut::with_capacity(8);
    codec.encode(
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        ),
        &mut out,
    )?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Random id material for an assigned client id.
fn assigned_suffix() -> String {
    edgedps_responder::random_hex(9)
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
