//! An HTTPS client for one hub's service API: HTTP/1.1 over TLS (hyper, tokio-rustls),
//! one kept-alive connection, every request (connect included) under one deadline, and
//! answers read up to [`MAX_ANSWER`] bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use edgedps_responder::HubTarget;

/// The largest answer read; a hub's answers are a few KiB.
const MAX_ANSWER: usize = 1024 * 1024;

/// One answer of the service API.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn judged(&self) -> edgedps_policies::cloud::Answer<'_> {
        edgedps_policies::cloud::Answer {
            status: self.status,
            content_type: self.content_type.as_deref(),
            retry_after: self.retry_after.as_deref(),
            body: &self.body,
        }
    }
}

/// The TLS set-up every hub client shares: the public roots and the configured ones.
pub fn tls_config(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("a trust anchor cannot be used: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub struct HubClient {
    pub target: HubTarget,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    connection: Option<SendRequest<Full<Bytes>>>,
}

impl HubClient {
    pub fn new(target: HubTarget, tls: Arc<rustls::ClientConfig>, timeout: Duration) -> HubClient {
        HubClient {
            target,
            tls,
            timeout,
            connection: None,
        }
    }

    /// Sends one request; `Err` with the reason when no answer came (unreachable,
    /// refused, TLS failed, closed, or nothing within the deadline).
    pub async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        if_match: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let timeout = self.timeout;
        match tokio::time::timeout(
            timeout,
            self.exchange(method, path_and_query, if_match, body),
        )
        .await
        {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => {
                self.connection = None;
                Err(reason)
            }
            Err(_) => {
                self.connection = None;
                Err(format!("no answer within {} s", timeout.as_secs_f32()))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path_and_query: &str,
        if_match: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let token = self
            .target
            .credentials
            .token(edgedps_responder::unix_now())
            .map_err(|e| e.to_string())?;
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", &self.target.host_name)
            .header("authorization", token)
            .header("accept", "application/json")
            .header("user-agent", concat!("edgedps/", env!("CARGO_PKG_VERSION")));
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json; charset=utf-8");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("request: {e}"))?;
        let sender = match self.connection.as_mut() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connection.insert(self.connect().await?),
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("connection closed before the answer: {e}"))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (content_type, retry_after) = (header("content-type"), header("retry-after"));
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("answer {status} not read: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            content_type,
            retry_after,
            body,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let host = &self.target.host_name;
        let address = self
            .target
            .service_address
            .clone()
            .unwrap_or_else(|| format!("{host}:443"));
        let tcp = TcpStream::connect(&address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {address} failed: {e}"))?;
        http1(tls)
            .await
            .map_err(|e| format!("HTTP with {address} failed: {e}"))
    }
}

/// An HTTP/1.1 client connection over `stream`, driven by a task of its own until it
/// closes: hubs' service APIs and custom allocation webhooks.
pub async fn http1<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP client connection ended");
        }
    });
    Ok(sender)
}
