//! Custom allocators (PROTOCOL C), the sockets half: what the responder's
//! [`Outside`] asks of the broker.
//!
//! - `webhookUrl`: one HTTPS POST (HTTP to loopback only) with Azure's request body,
//!   `api-version` on the query when the definition names one. Only a failed connect is
//!   tried again (twice, 100 ms then 200 ms later): a request that reached the webhook
//!   may have had effects there. A redirect is not followed, and an answer larger than
//!   `allocation.webhook_max_answer_bytes` is not read: each is a failure with its
//!   reason. The responder bounds the whole call (`allocation.custom_timeout_ms`).
//! - `mqttAllocator: {name}`: the request is published (not retained) on
//!   `dps/allocators/{name}/requests/{correlationId}`; the answer is the first publish
//!   of an operator-role client on `dps/allocators/{name}/responses/{correlationId}`.
//!   With nobody subscribed to the requests, it fails at once instead of timing out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use edgedps_responder::{BoxFuture, Outside, Publication};
use edgedps_topics::admin::{allocator_request_topic, CustomAllocationDefinition};

use crate::interest::Interest;
use crate::router::Publisher;

/// Connect attempts of one webhook call.
const CONNECT_ATTEMPTS: u32 = 3;

pub struct Allocators {
    publisher: Publisher,
    interest: Arc<Interest>,
    tls: Arc<rustls::ClientConfig>,
    max_answer: usize,
    /// MQTT allocations waiting for their answer, by correlation id.
    pending: Arc<Mutex<HashMap<String, Waiting>>>,
}

struct Waiting {
    allocator: String,
    answer: oneshot::Sender<Vec<u8>>,
}

/// Removes an MQTT allocation from the waiting ones however its call ends.
struct Pending {
    pending: Arc<Mutex<HashMap<String, Waiting>>>,
    correlation_id: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.correlation_id);
    }
}

impl Allocators {
    pub fn new(
        publisher: Publisher,
        interest: Arc<Interest>,
        tls: Arc<rustls::ClientConfig>,
        max_answer: usize,
    ) -> Allocators {
        Allocators {
            publisher,
            interest,
            tls,
            max_answer,
            pending: Arc::default(),
        }
    }

    /// An MQTT allocator's answer on `dps/allocators/{name}/responses/{correlationId}`:
    /// `false` when no allocation of that allocator waits for it (late, or twice).
    pub fn answered(&self, allocator: &str, correlation_id: &str, body: &[u8]) -> bool {
        let mut pending = lock(&self.pending);
        let waiting = pending
            .get(correlation_id)
            .is_some_and(|w| w.allocator == allocator);
        if !waiting {
            return false;
        }
        match pending.remove(correlation_id) {
            Some(waiting) => waiting.answer.send(body.to_vec()).is_ok(),
            None => false,
        }
    }

    fn ask_mqtt(&self, name: &str, request: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let correlation_id = edgedps_responder::random_hex(16);
        let topic = allocator_request_topic(name, &correlation_id);
        if !self.interest.matches(&topic) {
            let reason = format!(
                "no MQTT client is subscribed to dps/allocators/{name}/requests/# (is the allocator running?)"
            );
            return Box::pin(async move { Err(reason) });
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(
            correlation_id.clone(),
            Waiting {
                allocator: name.to_owned(),
                answer: tx,
            },
        );
        let guard = Pending {
            pending: self.pending.clone(),
            correlation_id,
        };
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let _guard = guard;
            publisher
                .publish(vec![Publication::message(topic, request)])
                .await;
            rx.await
                .map_err(|_| "the allocation was abandoned".to_owned())
        })
    }

    fn ask_webhook(
        &self,
        url: &str,
        api_version: Option<&str>,
        request: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        let target = edgedps_policies::validation::webhook_url(url).map(|mut url| {
            if let Some(version) = api_version {
                url.query_pairs_mut().append_pair("api-version", version);
            }
            url
        });
        let tls = self.tls.clone();
        let max_answer = self.max_answer;
        Box::pin(async move {
            let url = target?;
            post(&url, request, tls, max_answer).await
        })
    }
}

impl Outside for Allocators {
    fn ask_allocator(
        &self,
        definition: &CustomAllocationDefinition,
        request: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        match (&definition.mqtt_allocator, &definition.webhook_url) {
            (Some(name), _) => self.ask_mqtt(name, request),
            (None, Some(url)) => self.ask_webhook(url, definition.api_version.as_deref(), request),
            (None, None) => Box::pin(async { Err("the enrollment names no allocator".to_owned()) }),
        }
    }

    fn publish(&self, publications: Vec<Publication>) {
        let publisher = self.publisher.clone();
        tokio::spawn(async move { publisher.publish(publications).await });
    }
}

/// One POST of `body` to `url`; the answer's body when it is a 2xx.
async fn post(
    url: &url::Url,
    body: Vec<u8>,
    tls: Arc<rustls::ClientConfig>,
    max_answer: usize,
) -> Result<Vec<u8>, String> {
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let secure = url.scheme() == "https";
    // The host as a URL spells it; IPv6 without its brackets for the socket.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = connect(&bare, port).await?;
    let _ = tcp.set_nodelay(true);
    let mut path = url.path().to_owned();
    if let Some(query) = url.query() {
        path.push('?');
        path.push_str(query);
    }
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", url.host_str().unwrap_or_default())
        .header("content-type", "application/json; charset=utf-8")
        .header("accept", "application/json")
        .header("user-agent", concat!("edgedps/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    let response = match secure {
        true => {
            let name = ServerName::try_from(bare.clone())
                .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with the webhook failed: {e}"))?;
            send(stream, request).await?
        }
        false => send(tcp, request).await?,
    };
    let status = response.status();
    if status.is_redirection() {
        return Err(format!(
            "the webhook answered {} (a redirect); redirects are not followed",
            status.as_u16()
        ));
    }
    let answer = Limited::new(response.into_body(), max_answer)
        .collect()
        .await
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => format!("the webhook's answer is larger than {max_answer} bytes"),
                None => format!("the webhook's answer was not read: {e}"),
            },
        )?
        .to_bytes()
        .to_vec();
    if !status.is_success() {
        let start = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
        return Err(format!(
            "the webhook answered {}: {}",
            status.as_u16(),
            start.trim()
        ));
    }
    Ok(answer)
}

/// A TCP connection to the webhook: only this is tried again.
async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << (attempt - 1))).await;
        }
        match TcpStream::connect((host, port)).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "cannot connect to the webhook at {host}:{port} ({CONNECT_ATTEMPTS} attempts): {last}"
    ))
}

async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut sender = crate::cloud::client::http1(stream)
        .await
        .map_err(|e| format!("HTTP with the webhook failed: {e}"))?;
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("the webhook closed the connection before answering: {e}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
