//! The baseline of the load generator (`edgedps bench-server`): the same TLS
//! configuration as the device listener, and nothing else. It completes the handshake
//! and answers each MQTT packet with canned bytes, so "edgedps rate / baseline rate"
//! measures what provisioning costs on top of TLS, on one machine in one run.
//!
//! The least a server must do for the same exchange: one task per connection, one
//! write per batch of answers, no per-connection state but the QoS the device
//! subscribed with (the response goes at that QoS, as edgedps sends it, and the device
//! acknowledges it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rumqttd::protocol::v4;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::tls::{self, TlsStream};

/// Larger packets end the connection, as the device listener's default limit does.
const MAX_PACKET: usize = 256 * 1024;
const CONNACK: &[u8] = &[0x20, 0x02, 0x00, 0x00];
const PINGRESP: &[u8] = &[0xd0, 0x00];
/// The response topic up to the request's `$rid`, which it echoes.
const RESPONSE_TOPIC: &[u8] = b"$dps/registrations/res/200/?$rid=";
const RESPONSE_BODY: &[u8] = br#"{"operationId":"4.baseline","status":"assigned","registrationState":{"registrationId":"baseline","assignedHub":"hub-a.example.net","deviceId":"baseline","status":"assigned","substatus":"initialAssignment","etag":"\"baseline\""}}"#;

/// Serves until the process ends.
pub async fn run(
    bind: SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = tls::server_config(cert, key)?;
    let listener = TcpListener::bind(bind).await?;
    println!("baseline listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(mut stream) = TlsStream::new(tcp, config.clone()) else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(10), stream.handshake()).await
            {
                let _ = answer(stream).await;
            }
        });
    }
}

/// Answers packets by type: CONNECT, SUBSCRIBE, PUBLISH (PUBACK and a canned response),
/// PINGREQ; the device's PUBACK of the response needs no answer; DISCONNECT or EOF ends
/// it.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The QoS granted on the response filter (at most 1, as PROTOCOL A grants).
    let mut granted = 0u8;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = bytes::BytesMut::new();
        // Framing as the codec frames (rumqttd's fixed-header check), nothing more.
        while let Ok(header) = v4::check(buf.iter(), MAX_PACKET) {
            let (kind, flags) = (header.byte1 >> 4, header.byte1 & 0x0f);
            let body_start = header.fixed_header_len;
            let len = header.remaining_len;
            let body = &buf[body_start..body_start + len];
            match kind {
                1 => out.extend_from_slice(CONNACK),
                8 if body.len() >= 2 => {
                    // Packet id, filter length, filter, options: the last byte.
                    granted = body.last().map_or(0, |options| (options & 0b11).min(1));
                    out.extend_from_slice(&[0x90, 0x03, body[0], body[1], granted])
                }
                3 => {
                    let qos = (flags >> 1) & 0b11;
                    if qos > 0 && body.len() >= 2 {
                        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        if let Some(pkid) = body.get(2 + topic_len..4 + topic_len) {
                            out.extend_from_slice(&[0x40, 0x02, pkid[0], pkid[1]]);
                        }
                    }
                    let rid = request_id(body);
                    let topic_len = RESPONSE_TOPIC.len() + rid.len();
                    let pkid_len = if granted > 0 { 2 } else { 0 };
                    let remaining = 2 + topic_len + pkid_len + RESPONSE_BODY.len();
                    out.extend_from_slice(&[0x30 | (granted << 1)]);
                    v4::write_remaining_length(&mut out, remaining)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    out.extend_from_slice(&(topic_len as u16).to_be_bytes());
                    out.extend_from_slice(RESPONSE_TOPIC);
                    out.extend_from_slice(rid);
                    if granted > 0 {
                        out.extend_from_slice(&[0x00, 0x01]);
                    }
                    out.extend_from_slice(RESPONSE_BODY);
                }
                12 => out.extend_from_slice(PINGRESP),
                14 => {
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                _ => {}
            }
            buf.drain(..body_start + len);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}

/// The `$rid` of a PUBLISH body's topic (empty without one), at most 64 bytes: clients
/// match the response to their request by it.
fn request_id(body: &[u8]) -> &[u8] {
    let Some(&[high, low]) = body.get(..2) else {
        return &[];
    };
    let topic = body
        .get(2..2 + usize::from(u16::from_be_bytes([high, low])))
        .unwrap_or(&[]);
    let Some(start) = topic.windows(5).position(|w| w == b"$rid=") else {
        return &[];
    };
    let rid = &topic[start + 5..];
    let end = rid.iter().position(|&b| b == b'&').unwrap_or(rid.len());
    &rid[..end.min(64)]
}

#[cfg(test)]
mod tests {
    use super::request_id;

    fn publish_body(topic: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        body.extend_from_slice(&[0, 7, b'{', b'}']);
        body
    }

    #[test]
    fn the_response_echoes_the_requests_rid() {
        let body = publish_body(b"$dps/registrations/PUT/iotdps-register/?$rid=9f1c&x=1");
        assert_eq!(request_id(&body), b"9f1c");
        let body = publish_body(b"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=42");
        assert_eq!(request_id(&body), b"42");
        assert_eq!(
            request_id(&publish_body(b"devices/d/messages/events/")),
            b""
        );
        assert_eq!(request_id(&[0x00]), b"");
        assert_eq!(request_id(&[0xff, 0xff, b'$']), b"");
    }
}
