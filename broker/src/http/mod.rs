//! `[http] bind`: metrics, health and the status page, over plain HTTP (axum).
//!
//! - `GET /metrics`: Prometheus metrics (`metrics.rs`), in the OpenMetrics text format.
//! - `GET /healthz`: 200 while the process runs. `GET /readyz`: 200 once every listener
//!   is bound and while the store takes writes, 503 with the reason otherwise.
//! - `GET /`: the status page (`page.rs`); `GET /events`: its live events
//!   (server-sent events); `GET /overview`: its counts, JSON.
//!
//! Read only: any other method is 405, any other path 404. When `[[operators]]` are
//! configured, everything but the two probes asks for HTTP basic authentication as an
//! operator with a password (either role); a check is remembered for a minute, since
//! argon2 is slow on purpose.

mod page;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_stream::StreamExt;

use edgedps_responder::Responder;

use crate::feed::EventFeed;
use crate::metrics::Metrics;
use crate::operators::Operators;

/// How long a password check is remembered.
const REMEMBERED: Duration = Duration::from_secs(60);
/// Password checks remembered at most.
const REMEMBERED_MAX: usize = 64;
/// Pages following the live events at once; more are answered 503.
pub const MAX_FOLLOWERS: usize = 32;

/// What the HTTP handlers read.
pub struct HttpState {
    pub responder: Arc<Responder>,
    pub metrics: Arc<Metrics>,
    pub feed: Arc<EventFeed>,
    pub operators: Arc<Operators>,
    /// Set once every listener is bound.
    pub ready: AtomicBool,
    pub id_scope: String,
    /// Passed checks: (name, SHA-256 of the password) until when.
    remembered: Mutex<HashMap<(String, [u8; 32]), Instant>>,
    /// Pages following `/events` now.
    followers: Arc<std::sync::atomic::AtomicUsize>,
    /// The page's counts, shared by the loads and refreshes of a few seconds.
    overview: crate::metrics::Recent<edgedps_responder::Overview>,
}

/// A page following `/events`, counted while its stream lives.
struct Follower(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HttpState {
    pub fn new(
        responder: Arc<Responder>,
        metrics: Arc<Metrics>,
        feed: Arc<EventFeed>,
        operators: Arc<Operators>,
        id_scope: String,
    ) -> HttpState {
        HttpState {
            responder,
            metrics,
            feed,
            operators,
            ready: AtomicBool::new(false),
            id_scope,
            remembered: Mutex::new(HashMap::new()),
            followers: Arc::default(),
            overview: Default::default(),
        }
    }

    /// The counts of the status page, at most `metrics::COUNTS_KEPT` old; off the
    /// runtime's threads, since counting walks the store.
    pub async fn overview(self: &Arc<Self>) -> Result<Arc<edgedps_responder::Overview>, String> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            state
                .overview
                .get(|| {
                    let counts = state.metrics.store_counts(&state.responder);
                    state.responder.overview(&counts)
                })
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The routes; `state` is shared with the server that sets it ready.
pub fn router(state: Arc<HttpState>) -> Router {
    let guarded = Router::new()
        .route("/", get(page::status_page))
        .route("/overview", get(page::overview_json))
        .route("/events", get(events))
        .route("/page.js", get(page::script))
        .route("/page.css", get(page::style))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page\n") })
        .layer(middleware::from_fn(headers))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<HttpState>) {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the HTTP listener stopped");
    }
}

/// Every answer: not cached, not framed, no guessing of types.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn authenticate(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if !state.operators.any() {
        return next.run(request).await;
    }
    match basic_credentials(request.headers()) {
        Some((name, password)) if state.check(peer, &name, &password).await => {
            next.run(request).await
        }
        given => {
            if given.is_some() {
                tracing::warn!(target: "edgedps::audit", %peer, path = %request.uri().path(), "status page: bad operator name or password");
            }
            (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"edgedps\", charset=\"UTF-8\"",
                )],
                "operator name and password required\n",
            )
                .into_response()
        }
    }
}

impl HttpState {
    async fn check(&self, peer: SocketAddr, name: &str, password: &str) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, password.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let key = (name.to_owned(), key);
        let now = Instant::now();
        if crate::session::lock(&self.remembered)
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return true;
        }
        match self
            .operators
            .by_password(peer.ip(), name, password.as_bytes())
            .await
        {
            Ok(_) => {
                let mut remembered = crate::session::lock(&self.remembered);
                remembered.retain(|_, until| *until > now);
                if remembered.len() < REMEMBERED_MAX {
                    remembered.insert(key, now + REMEMBERED);
                }
                true
            }
            Err(refusal) => {
                if refusal == crate::operators::Refusal::Throttled {
                    self.metrics.throttled("operator_password");
                }
                false
            }
        }
    }
}

/// `Authorization: Basic base64(name:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "listeners not bound yet\n").into_response();
    }
    match state.responder.store_healthy() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store takes no writes: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    // Counting the store's records walks it: off the runtime's threads.
    let rendered = tokio::task::spawn_blocking(move || state.metrics.render()).await;
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The live events, as server-sent events named `event`: `{"topic", "body"}`; at most
/// [`MAX_FOLLOWERS`] pages at once.
async fn events(State(state): State<Arc<HttpState>>) -> Response {
    if state.followers.fetch_add(1, Ordering::SeqCst) >= MAX_FOLLOWERS {
        state.followers.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(
            "status page: {MAX_FOLLOWERS} pages already follow the events; one more refused"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_FOLLOWERS} pages already follow the events\n"),
        )
            .into_response();
    }
    let follower = Follower(state.followers.clone());
    let live = tokio_stream::wrappers::BroadcastStream::new(state.feed.subscribe());
    let stream = live.map(move |event| {
        let _counted = &follower;
        let event = match event {
            Ok(event) => Event::default()
                .event("event")
                .data(page::event_json(&event.topic, &event.body)),
            // The page fell behind: it says so rather than pretend.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                Event::default().event("lagged").data(missed.to_string())
            }
        };
        Ok::<Event, std::convert::Infallible>(event)
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_and_anything_else_is_not() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_credentials(&headers), None);
        // "alice:pa:ss"
        headers.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6cGE6c3M=".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("alice".into(), "pa:ss".into()))
        );
        for bad in ["Bearer x", "Basic !!!", "Basic YWxpY2U="] {
            headers.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(basic_credentials(&headers), None, "{bad}");
        }
    }
}
