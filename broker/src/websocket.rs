//! MQTT over WebSocket on the HTTPS listener (PROTOCOL A1), as Azure serves it on 443:
//! `GET /$iothub/websocket` with `Upgrade: websocket` and the subprotocol `mqtt`. The
//! upgraded connection is a device listener session like any other (the same CONNECT,
//! attestation by SAS token or the TLS client certificate, limits and local hub): only
//! the framing differs, each binary WebSocket message carrying MQTT bytes.
//!
//! Refusals are plain HTTP answers before the upgrade, each with Azure's error body
//! saying what is wrong: another path is 404, another method 405, a request that is no
//! WebSocket upgrade 400, a WebSocket version other than 13 426, no `mqtt` subprotocol
//! 400. After it, a frame or message over `limits.max_packet_size` (and a text message)
//! ends the connection.

use std::sync::Arc;

use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use ws_stream_tungstenite::WsStream;

use crate::device_api::{http_error, Peer};
use crate::session::{self, ListenerKind, Shared};

/// The path Azure's SDKs ask for, DPS and IoT Hub alike.
pub const PATH: &str = "/$iothub/websocket";

/// The one subprotocol served.
const SUBPROTOCOL: &str = "mqtt";

/// Bytes a WebSocket frame may carry over an MQTT packet of `limits.max_packet_size`:
/// the packet's own fixed header.
const FRAMING: usize = 5;

/// `GET /$iothub/websocket`: checks the upgrade, answers 101 and hands the connection
/// to an MQTT session.
pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    mut request: Request,
) -> Response {
    let accept = match check_upgrade(request.headers()) {
        Ok(accept) => accept,
        Err(refusal) => {
            tracing::info!(peer = %peer.addr, reason = %refusal.message, "WebSocket upgrade refused");
            return refusal.into_response();
        }
    };
    if shared.shutdown.started() {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    // The slot is taken last: a refused upgrade leaves it with the HTTP connection.
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return http_error(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded to a WebSocket",
        );
    };
    let Some(slot) = peer.take_slot() else {
        return http_error(
            StatusCode::BAD_REQUEST,
            "this connection was upgraded already",
        );
    };
    let limit = shared.limits.max_packet_size + FRAMING;
    let config = WebSocketConfig::default()
        // Read 1 KiB at a time, written a message at a time: an idle session keeps no
        // 128 KiB buffers (tungstenite's defaults). 4 KiB read buffers cost 2.8 KiB more
        // per idle session (BENCHMARKS.md, issue 26).
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let chain = peer.chain.as_ref().clone();
    let addr = peer.addr;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = TokioAdapter::new(hyper_util::rt::TokioIo::new(upgraded));
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                let stream = Framed(sync_wrapper::SyncWrapper::new(WsStream::new(socket)));
                // A session of the device listener's kind, from its CONNECT on.
                session::serve(stream, chain, ListenerKind::Devices, addr, shared, slot).await;
            }
            Err(e) => tracing::info!(peer = %addr, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept.key);
    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, accept.protocol);
    response
}

/// The WebSocket as the session's byte stream. A session is shared across its awaits
/// (`Sync`); the WebSocket is only ever used through `&mut`, which `SyncWrapper`
/// makes `Sync` without a lock.
struct Framed<S>(sync_wrapper::SyncWrapper<S>);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Framed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.get_mut()).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Framed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.get_mut().0.get_mut()).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.get_mut()).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.get_mut()).poll_shutdown(cx)
    }
}

/// What a valid upgrade is answered with.
#[derive(Debug)]
struct Accept {
    /// `Sec-WebSocket-Accept`.
    key: HeaderValue,
    /// `Sec-WebSocket-Protocol`: `mqtt` as the client spelled it.
    protocol: HeaderValue,
}

/// Why an upgrade is refused, as its HTTP answer.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = http_error(self.status, &self.message);
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// RFC 6455 4.2.1: `Upgrade: websocket`, `Connection: Upgrade`, version 13, a key; and
/// the `mqtt` subprotocol among those offered.
fn check_upgrade(headers: &HeaderMap) -> Result<Accept, Refusal> {
    let refuse = |status, message: &str| Refusal {
        status,
        message: message.to_owned(),
    };
    if !has_token(headers, header::UPGRADE, "websocket")
        || !has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this path serves MQTT over WebSocket only: ask with Connection: Upgrade and Upgrade: websocket",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some("13")
    {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .filter(|k| is_key(k))
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key is missing or not 16 bytes in base64",
            )
        })?;
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.eq_ignore_ascii_case(SUBPROTOCOL));
    let Some(protocol) = offered.and_then(|p| HeaderValue::from_str(p).ok()) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol must be mqtt (Sec-WebSocket-Protocol: mqtt)",
        ));
    };
    let key = HeaderValue::from_str(&derive_accept_key(key)).map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key cannot be answered",
        )
    })?;
    Ok(Accept { key, protocol })
}

/// Whether a comma-separated header holds `token` (any case).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A `Sec-WebSocket-Key`: 16 bytes in base64.
fn is_key(key: &[u8]) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers(protocol: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        if let Some(protocol) = protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(protocol).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn the_rfc_example_key_is_answered_and_mqtt_echoed_as_spelled() {
        let accept = check_upgrade(&upgrade_headers(Some("chat, MQTT"))).unwrap();
        // RFC 6455 1.3.
        assert_eq!(accept.key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(accept.protocol, "MQTT");
    }

    #[test]
    fn each_bad_upgrade_is_refused_with_its_status() {
        let cases: Vec<(&str, HeaderMap, StatusCode)> = vec![
            (
                "no subprotocol",
                upgrade_headers(None),
                StatusCode::BAD_REQUEST,
            ),
            (
                "another subprotocol",
                upgrade_headers(Some("mqttv3.1x, chat")),
                StatusCode::BAD_REQUEST,
            ),
            (
                "no upgrade",
                {
                    let mut h = upgrade_headers(Some("mqtt"));
                    h.remove(header::UPGRADE);
                    h
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                "connection keep-alive only",
                {
                    let mut h = upgrade_headers(Some("mqtt"));
                    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
                    h
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                "version 8",
                {
                    let mut h = upgrade_headers(Some("mqtt"));
                    h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
                    h
                },
                StatusCode::UPGRADE_REQUIRED,
            ),
            (
                "a key of 4 bytes",
                {
                    let mut h = upgrade_headers(Some("mqtt"));
                    h.insert(
                        header::SEC_WEBSOCKET_KEY,
                        HeaderValue::from_static("AAAAAA=="),
                    );
                    h
                },
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (name, headers, status) in cases {
            let refusal = check_upgrade(&headers).expect_err(name);
            assert_eq!(refusal.status, status, "{name}: {}", refusal.message);
        }
    }
}
