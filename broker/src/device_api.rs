//! `[listeners.https]`: the DPS device API over HTTPS, as Azure serves it to its REST
//! clients (the Node and C SDKs, and every TPM device). One registration path, two
//! transports: each request is attested as a CONNECT would be (a `SharedAccessSignature`
//! in `Authorization`, the TLS client certificate, or neither for a TPM device asking for
//! its challenge) and answered by the same responder calls as the `$dps` topics.
//!
//! - `PUT /{idScope}/registrations/{registrationId}/register`: register.
//! - `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`: poll.
//! - `POST /{idScope}/registrations/{registrationId}`: the device's registration as
//!   recorded (Azure's status lookup).
//!
//! Every request names an `api-version` the SDKs send (2019-03-31 and 2021-06-01 among
//! them, `edgedps_topics::identity::API_VERSIONS`). Answers are JSON
//! with `Content-Type: application/json; charset=utf-8`, errors Azure's error body;
//! `Retry-After` goes with 202 and 429. Unknown paths are 404, other methods 405,
//! bodies over `limits.max_packet_size` 413. TLS is the device listener's: a handshake
//! runs under the same deadline and slots, and a client slow to send its request
//! headers is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use serde::Deserialize;

use edgedps_policies::attestation::Credential;
use edgedps_responder::{timestamp_now, unix_now, Admitted, Reply};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::registration::ErrorBody;

use crate::session::Shared;
use crate::tls::TlsStream;

/// A connection that sends no complete request head in this time is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes over the limit still read (and dropped) so that the 413 reaches the client.
const DRAINED: usize = 1 << 20;

/// What a request's connection says about its client.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// The TLS client chain, DER, leaf first; empty without one.
    pub(crate) chain: Arc<Vec<Vec<u8>>>,
    /// The connection's place in the connection limit, for the session a WebSocket
    /// upgrade hands it to.
    slot: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

impl Peer {
    /// The connection's slot, once: the upgraded session holds it from then on.
    pub(crate) fn take_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slot.lock().ok().and_then(|mut slot| slot.take())
    }
}

#[derive(Deserialize)]
struct ApiQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// The routes (the DPS API's when `api`, MQTT over WebSocket always); each connection
/// adds its [`Peer`].
pub fn router(shared: Arc<Shared>, api: bool) -> Router {
    let mut routes = Router::new().route(crate::websocket::PATH, get(crate::websocket::upgrade));
    if api {
        routes = routes
            .route(
                "/{id_scope}/registrations/{registration_id}/register",
                put(register),
            )
            .route(
                "/{id_scope}/registrations/{registration_id}/operations/{operation_id}",
                get(poll),
            )
            .route("/{id_scope}/registrations/{registration_id}", post(lookup));
    }
    routes
        .method_not_allowed_fallback(|| async {
            http_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .fallback(|| async { http_error(StatusCode::NOT_FOUND, "no such resource") })
        .with_state(shared)
}

/// Serves one TLS connection: HTTP/1.1 with keep-alive, until the client closes it or
/// upgrades it to MQTT over WebSocket (`websocket.rs`).
pub async fn serve_connection(
    stream: TlsStream,
    chain: Vec<Vec<u8>>,
    addr: SocketAddr,
    app: Router,
    shutdown: Arc<crate::shutdown::Shutdown>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let peer = Peer {
        addr,
        chain: Arc::new(chain),
        slot: Arc::new(std::sync::Mutex::new(Some(slot))),
    };
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(peer.clone());
        let app = app.clone();
        async move {
            let request = request.map(Body::new);
            tower::ServiceExt::oneshot(app, request).await
        }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    // Shutting down: the request in flight is answered, then the connection closes.
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%addr, error = %e, "HTTPS connection ended");
    }
}

async fn register(
    State(shared): State<Arc<Shared>>,
    Path((id_scope, registration_id)): Path<(String, String)>,
    Query(query): Query<ApiQuery>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let asked = Asked {
        id_scope,
        registration_id,
        query,
        peer,
        headers,
    };
    let (body, admitted) = match asked.admitted(&shared, body, true).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let reply = shared
        .responder
        .register(&admitted.device, admitted.standing, &body, Encoding::Json)
        .await;
    let took = Some(started.elapsed());
    answer(&shared, "register", &admitted.device, reply, took).await
}

async fn poll(
    State(shared): State<Arc<Shared>>,
    Path((id_scope, registration_id, operation_id)): Path<(String, String, String)>,
    Query(query): Query<ApiQuery>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let asked = Asked {
        id_scope,
        registration_id,
        query,
        peer,
        headers,
    };
    // The Node client sends `{}` with its GET, the C client nothing: read and ignored.
    let (_, admitted) = match asked.admitted(&shared, body, false).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let reply = shared
        .responder
        .poll(&admitted.device, &operation_id, Encoding::Json);
    answer(&shared, "poll", &admitted.device, reply, None).await
}

async fn lookup(
    State(shared): State<Arc<Shared>>,
    Path((id_scope, registration_id)): Path<(String, String)>,
    Query(query): Query<ApiQuery>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let asked = Asked {
        id_scope,
        registration_id,
        query,
        peer,
        headers,
    };
    let (_, admitted) = match asked.admitted(&shared, body, true).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let reply = shared.responder.status_lookup(&admitted.device);
    answer(&shared, "lookup", &admitted.device, reply, None).await
}

/// What every request of the API names: the device, the api-version, its connection
/// and headers.
struct Asked {
    id_scope: String,
    registration_id: String,
    query: ApiQuery,
    peer: Peer,
    headers: HeaderMap,
}

impl Asked {
    /// The body (which must be JSON when `json_required`) and the attested device; the
    /// refusal is the answer.
    async fn admitted(
        &self,
        shared: &Shared,
        body: Body,
        json_required: bool,
    ) -> Result<(Vec<u8>, Admitted), Response> {
        let body = checked_body(shared, &self.headers, body, json_required).await?;
        let admitted = admit(shared, self).await?;
        Ok((body, admitted))
    }
}

/// The body, read up to the limit; a request with a body must say it is JSON.
async fn checked_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
    json_required: bool,
) -> Result<Vec<u8>, Response> {
    let limit = shared.limits.max_packet_size;
    let too_large = || {
        http_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is over {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // Over the limit by more than a drain's worth: answered at once (the connection then
    // closes, and the client may see that instead). Otherwise read to the end, what is
    // over the limit discarded, so that the client reads its 413.
    if declared.is_some_and(|n| n > limit + DRAINED) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        use http_body_util::BodyExt;
        let mut body = body;
        let (mut kept, mut seen) = (Vec::new(), 0usize);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|f| f.into_data()) else {
                return Err(());
            };
            let Ok(data) = data else { continue };
            seen += data.len();
            if seen <= limit {
                kept.extend_from_slice(&data);
            } else if seen > limit + DRAINED {
                break;
            }
        }
        Ok((kept, seen))
    })
    .await;
    let body = match read {
        Ok(Ok((_, seen))) if seen > limit => return Err(too_large()),
        Ok(Ok((kept, _))) => kept,
        Ok(Err(())) | Err(_) => {
            return Err(dps_error(
                StatusCode::BAD_REQUEST,
                edgedps_topics::registration::codes::MALFORMED_BODY,
                &format!(
                    "the body was cut off or took over {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if json_required && !json {
        return Err(dps_error(
            StatusCode::BAD_REQUEST,
            edgedps_topics::registration::codes::MALFORMED_BODY,
            "Content-Type must be application/json",
        ));
    }
    Ok(body)
}

/// Attests the request as a CONNECT of `registration_id` would be: the token in
/// `Authorization`, else the client certificate, else neither (a TPM device asking for
/// its challenge). The refusal is the answer.
async fn admit(shared: &Shared, asked: &Asked) -> Result<Admitted, Response> {
    use edgedps_topics::identity::API_VERSIONS;
    let (id_scope, registration_id) = (&asked.id_scope, &asked.registration_id);
    let api_version = match asked.query.api_version.as_deref() {
        Some(v) if API_VERSIONS.contains(&v) => v,
        Some(v) => {
            return Err(dps_error(
                StatusCode::BAD_REQUEST,
                edgedps_topics::registration::codes::MALFORMED_BODY,
                &format!(
                    "api-version `{}` is not supported (use {})",
                    edgedps_policies::validation::shown(v),
                    API_VERSIONS.join(", ")
                ),
            ))
        }
        None => {
            return Err(dps_error(
                StatusCode::BAD_REQUEST,
                edgedps_topics::registration::codes::MALFORMED_BODY,
                "the api-version query parameter is missing",
            ))
        }
    };
    let token = match asked.headers.get(header::AUTHORIZATION).map(|v| v.to_str()) {
        Some(Ok(token)) => Some(token),
        Some(Err(_)) => {
            return Err(dps_error(
                StatusCode::UNAUTHORIZED,
                edgedps_topics::registration::codes::UNAUTHORIZED,
                "the Authorization header is not text",
            ))
        }
        None => None,
    };
    let credential = match token {
        Some(token) => Credential::Sas(token),
        None => Credential::X509(&asked.peer.chain),
    };
    let username = format!("{id_scope}/registrations/{registration_id}/api-version={api_version}");
    let admission = shared
        .responder
        .admit(registration_id, &username, credential, unix_now());
    shared.publisher.publish(vec![admission.event]).await;
    match admission.outcome {
        Ok(admitted) => Ok(admitted),
        Err(error) => {
            tracing::warn!(target: "edgedps::audit", peer = %asked.peer.addr, client_id = %edgedps_policies::validation::shown(registration_id), reason = %error, "HTTPS request refused");
            // Counted with the device listener's refusals, by the same reasons.
            let reason = crate::session::refusal(&error).label();
            shared.metrics.connect_refused("https", reason);
            let reply = shared.responder.error_reply(&error, Encoding::Json);
            Err(response(reply))
        }
    }
}

/// The responder's reply as the HTTP answer; its records and events published.
async fn answer(
    shared: &Shared,
    request: &'static str,
    device: &edgedps_policies::attestation::Attested,
    mut reply: Reply,
    took: Option<Duration>,
) -> Response {
    shared.metrics.registration(
        request,
        crate::session::attestation_label(device.kind),
        reply.status,
        reply.assigned_device_id.is_some(),
        took,
    );
    shared
        .publisher
        .publish(std::mem::take(&mut reply.publish))
        .await;
    response(reply)
}

fn response(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(seconds) = reply.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// An error of the API itself (path, method, size): Azure's error body, its code the
/// status times a thousand.
pub(crate) fn http_error(status: StatusCode, message: &str) -> Response {
    dps_error(status, u32::from(status.as_u16()) * 1000, message)
}

fn dps_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = ErrorBody {
        error_code: code,
        tracking_id: tracking_id(),
        message: message.to_owned(),
        timestamp_utc: timestamp_now(),
    };
    response(Reply {
        status: status.as_u16(),
        retry_after: None,
        body: Encoding::Json.encode(&body),
        encoding: Encoding::Json,
        assigned_device_id: None,
        publish: Vec::new(),
    })
}

fn tracking_id() -> String {
    edgedps_responder::random_hex(12)
}
