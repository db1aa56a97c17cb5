//! The CONNECT (PROTOCOL A2): read under its deadline, decided by the responder on the
//! device listener (attestation, the live-session registry, the access rule), answered
//! with a CONNACK. A refusal is a CONNACK with the MQTT refusal code and a log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{ConnAck, ConnectReturnCode, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use edgedps_policies::access::Access;
use edgedps_policies::acl::Role;
use edgedps_policies::attestation::AttestationError;
use edgedps_responder::{unix_now, Credential, Error};
use edgedps_topics::encoding::Encoding;

use super::{Close, Identity, ListenerKind, Session, Shared};
use crate::codec::{self, Codec, ConnectRefusal};

/// Reads the CONNECT under its deadline and decides it. `Ok(None)`: refused (CONNACK sent).
pub(super) async fn accept<S>(
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
    let (identity, role, live, standing) = match kind {
        ListenerKind::Local => (Identity::Operator, Role::Operator, None, None),
        ListenerKind::Devices => {
            let (username, password) = login.map(|l| (l.username, l.password)).unwrap_or_default();
            let credential = if password.is_empty() {
                Credential::X509(&chain)
            } else {
                Credential::Sas(&password)
            };
            let admission = shared
                .responder
                .admit(&client_id, &username, credential, unix_now());
            shared.publisher.publish(vec![admission.event]).await;
            match admission.outcome {
                Ok(admitted) => {
                    tracing::info!(target: "edgedps::audit", %peer, %client_id, source = ?admitted.device.source, kind = ?admitted.device.kind, access = %Verdict(&admitted.access), "connect accepted");
                    let device_id = match admitted.access {
                        Access::Hub { device_id } => Some(device_id),
                        Access::Unassigned | Access::OutOfService(_) => None,
                    };
                    (
                        Identity::Device(admitted.device),
                        Role::Device { device_id },
                        Some(admitted.live),
                        admitted.standing.map(Box::new),
                    )
                }
                Err(error) => {
                    tracing::warn!(target: "edgedps::audit", %peer, %client_id, reason = %error, "connect refused");
                    let code = codec.refusal_code(refusal(&error));
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
        standing,
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

/// The CONNACK refusal for a CONNECT the responder refused: the one place its errors
/// become MQTT refusal codes.
fn refusal(error: &Error) -> ConnectRefusal {
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
