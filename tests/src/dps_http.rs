//! The DPS device API over HTTPS (`[listeners.https]`), from a test: one kept-alive
//! HTTP/1.1 connection over TLS (hyper's client), with or without a client certificate,
//! and the register, poll and lookup requests as the Azure REST clients send them.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::{pki, ID_SCOPE};

/// An answer of the API.
#[derive(Debug)]
pub struct DpsAnswer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when it is not).
    pub body: Value,
}

impl DpsAnswer {
    pub fn error_code(&self) -> Option<u64> {
        self.body["errorCode"].as_u64()
    }
}

/// One connection to the API.
pub struct DpsHttp {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub api_version: String,
}

impl DpsHttp {
    /// Connects to 127.0.0.1:`port` (server name `localhost`), presenting `identity`
    /// (a PEM chain and key) when given.
    pub async fn connect(port: u16, identity: Option<(&[u8], &[u8])>) -> DpsHttp {
        let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), identity)
            .expect("client TLS");
        Self::connect_with(port, tls).await
    }

    pub async fn connect_with(port: u16, tls: Arc<rustls::ClientConfig>) -> DpsHttp {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("TCP connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP/1.1");
        tokio::spawn(connection);
        DpsHttp {
            sender,
            api_version: "2019-03-31".into(),
        }
    }

    /// `method path` with `headers` and `body`: the answer.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> DpsAnswer {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        self.sender
            .ready()
            .await
            .expect("the connection takes another request");
        let response = self.sender.send_request(request).await.expect("an answer");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (retry_after, content_type) = (header("retry-after"), header("content-type"));
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        DpsAnswer {
            status,
            retry_after,
            content_type,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    fn headers(token: Option<&str>) -> Vec<(&str, &str)> {
        let mut headers = vec![
            ("Accept", "application/json"),
            ("Content-Type", "application/json; charset=utf-8"),
        ];
        if let Some(token) = token {
            headers.push(("Authorization", token));
        }
        headers
    }

    /// `PUT .../register` with `body`, and `token` as `Authorization`.
    pub async fn register(&mut self, id: &str, token: Option<&str>, body: &Value) -> DpsAnswer {
        let path = format!(
            "/{ID_SCOPE}/registrations/{id}/register?api-version={}",
            self.api_version
        );
        let body = serde_json::to_vec(body).expect("json");
        self.send("PUT", &path, &Self::headers(token), &body).await
    }

    /// `GET .../operations/{operation_id}`, with the `{}` body the Node client sends.
    pub async fn poll(&mut self, id: &str, token: Option<&str>, operation_id: &str) -> DpsAnswer {
        let path = format!(
            "/{ID_SCOPE}/registrations/{id}/operations/{operation_id}?api-version={}",
            self.api_version
        );
        self.send("GET", &path, &Self::headers(token), b"{}").await
    }

    /// `POST /{idScope}/registrations/{id}`: the status lookup.
    pub async fn lookup(&mut self, id: &str, token: Option<&str>) -> DpsAnswer {
        let path = format!(
            "/{ID_SCOPE}/registrations/{id}?api-version={}",
            self.api_version
        );
        self.send("POST", &path, &Self::headers(token), b"{}").await
    }
}

/// A provisioning token for `id` signed with `key`.
pub fn dps_token(key: &str, id: &str) -> String {
    edgedps_policies::sas::sign(key, ID_SCOPE, id, edgedps_responder::unix_now() + 600)
        .expect("token")
}
