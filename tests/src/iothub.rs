//! A fake IoT Hub service API: HTTPS on 127.0.0.1 with a certificate for the hub's host
//! name (from the test server CA), checking what IoT Hub checks: the SAS token (its
//! signature over `sr` and `se` with the policy key, `sr` the host name, `skn` the
//! policy, not expired), `api-version`, `Content-Type`, and the JSON shapes of
//! identities and twins. It keeps identities and twins as the hub would, logs every
//! request, and fails on demand: a status with a body, a hang, a closed connection, or
//! down altogether.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::pki;

pub const API_VERSION: &str = "2021-04-12";
/// The policy of the connection strings the fake hubs hand out.
pub const POLICY: &str = "registryReadWrite";

/// A way to fail one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this status, content type and body (and `Retry-After` when set).
    Answer {
        status: u16,
        content_type: &'static str,
        body: String,
        retry_after: Option<u32>,
    },
    /// Read the request and never answer.
    Hang,
    /// Close the connection without answering.
    Close,
}

impl Fault {
    /// An IoT Hub error answer: `{"Message": "ErrorCode:{code};{text}", ...}`.
    pub fn hub(status: u16, code: &str, retry_after: Option<u32>) -> Fault {
        Fault::Answer {
            status,
            content_type: "application/json; charset=utf-8",
            body: json!({"Message": format!("ErrorCode:{code};{code} (fake hub)"), "ExceptionMessage": "Tracking ID:fake"}).to_string(),
            retry_after,
        }
    }

    pub fn html(status: u16) -> Fault {
        Fault::Answer {
            status,
            content_type: "text/html",
            body: "<html><body>Sign in to the network</body></html>".into(),
            retry_after: None,
        }
    }
}

/// One request the hub saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub if_match: Option<String>,
    pub status: u16,
}

impl Seen {
    /// The device id of a `/devices/{id}` or `/twins/{id}` request.
    pub fn device(&self) -> Option<&str> {
        let path = self.path.split('?').next()?;
        path.strip_prefix("/devices/")
            .or_else(|| path.strip_prefix("/twins/"))
    }
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Value>,
    twins: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    /// Faults for the next requests, in order.
    faults: VecDeque<Fault>,
    /// A fault for every request while set.
    always: Option<Fault>,
    /// Connections closed at once, before TLS: the hub is unreachable.
    down: bool,
    /// Every answer this late.
    delay: Option<Duration>,
    /// Every `Authorization` header received.
    tokens: Vec<String>,
    etags: u64,
}

/// A fake hub, served until dropped.
pub struct FakeHub {
    pub host_name: String,
    pub addr: SocketAddr,
    key: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeHub {
    /// A hub named `host_name` on a port of 127.0.0.1, with a policy key of its own.
    pub async fn start(host_name: &str) -> FakeHub {
        let key = BASE64.encode(format!("fake hub key of {host_name} for tests!").as_bytes());
        let acceptor = crate::pki::tls_acceptor(host_name);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let hub = Arc::new(Served {
            host_name: host_name.to_owned(),
            key: key.clone(),
            state: state.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if lock(&hub.state).down {
                    drop(tcp);
                    continue;
                }
                let (acceptor, hub) = (acceptor.clone(), hub.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let hub = hub.clone();
                        async move { hub.answer(request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeHub {
            host_name: host_name.to_owned(),
            addr,
            key,
            state,
            task,
        }
    }

    /// The hub's connection string (policy [`POLICY`]).
    pub fn connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={POLICY};SharedAccessKey={}",
            self.host_name, self.key
        )
    }

    /// The same with another key: the hub refuses its tokens (401).
    pub fn wrong_connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={POLICY};SharedAccessKey={}",
            self.host_name,
            BASE64.encode(b"not the key of this hub at all")
        )
    }

    pub fn service_address(&self) -> String {
        self.addr.to_string()
    }

    /// The configuration that links this hub: `[cloud]` trusting the test CA (and the
    /// `cloud` lines given), and a `[[hubs]]` entry with its service address and its
    /// connection string in a file; the files are written into `dir`.
    pub fn config_toml(&self, dir: &std::path::Path, cloud: &str) -> String {
        let secret = dir.join(format!("{}.connection-string", self.host_name));
        std::fs::write(&secret, self.connection_string()).expect("write the connection string");
        let anchors = dir.join("hub-ca.pem");
        std::fs::write(&anchors, &pki().server_ca.pem).expect("write the trust anchors");
        format!(
            "[cloud]\ntrust_anchors_file = \"{}\"\n{cloud}[[hubs]]\nhost_name = \"{}\"\nservice_address = \"{}\"\nconnection_string_file = \"{}\"\n",
            anchors.display(),
            self.host_name,
            self.service_address(),
            secret.display()
        )
    }

    pub fn identity(&self, device_id: &str) -> Option<Value> {
        lock(&self.state).devices.get(device_id).cloned()
    }

    pub fn twin(&self, device_id: &str) -> Option<Value> {
        lock(&self.state).twins.get(device_id).cloned()
    }

    pub fn identities(&self) -> BTreeMap<String, Value> {
        lock(&self.state).devices.clone()
    }

    /// The `Authorization` headers the hub received.
    pub fn tokens(&self) -> Vec<String> {
        lock(&self.state).tokens.clone()
    }

    /// The policy key (secret).
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }

    /// Changes a twin's tags there, as a cloud application would.
    pub fn set_tags(&self, device_id: &str, tags: Value) {
        if let Some(twin) = lock(&self.state).twins.get_mut(device_id) {
            twin["tags"] = tags;
        }
    }

    /// Puts an identity there as if made at the hub by someone else.
    pub fn put_identity(&self, device_id: &str, identity: Value) {
        let mut state = lock(&self.state);
        state.devices.insert(device_id.to_owned(), identity);
    }

    /// Fails the next requests with `faults`, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state).faults.extend(faults);
    }

    /// Fails every request with `fault` until [`FakeHub::heal`].
    pub fn fail_always(&self, fault: Fault) {
        lock(&self.state).always = Some(fault);
    }

    /// Every answer `delay` late (a slow uplink).
    pub fn slow_down(&self, delay: Option<Duration>) {
        lock(&self.state).delay = delay;
    }

    /// Unreachable until [`FakeHub::heal`].
    pub fn go_down(&self) {
        lock(&self.state).down = true;
    }

    pub fn heal(&self) {
        let mut state = lock(&self.state);
        state.down = false;
        state.always = None;
        state.faults.clear();
    }

    /// Waits until `check` holds of the hub (at most `within`).
    pub async fn wait_for(&self, within: Duration, what: &str, check: impl Fn(&FakeHub) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !check(self) {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "the fake hub {} never saw {what}; it saw {:#?}",
                    self.host_name,
                    self.seen()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Served {
    host_name: String,
    key: String,
    state: Arc<Mutex<State>>,
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn respond(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn hub_error(status: u16, code: &str, text: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        json!({"Message": format!("ErrorCode:{code};{text}"), "ExceptionMessage": "Tracking ID:fake"}),
    )
}

impl Served {
    async fn answer(&self, request: Request<Incoming>) -> Answer {
        let method = request.method().as_str().to_owned();
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (authorization, content_type, if_match) = (
            header("authorization"),
            header("content-type"),
            header("if-match"),
        );
        if let Some(token) = &authorization {
            lock(&self.state).tokens.push(token.clone());
        }
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        let delay = lock(&self.state).delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let fault = {
            let mut state = lock(&self.state);
            state.faults.pop_front().or_else(|| state.always.clone())
        };
        let response = match fault {
            Some(Fault::Hang) => {
                self.log(&method, &path, &if_match, 0);
                std::future::pending::<()>().await;
                unreachable!()
            }
            Some(Fault::Close) => {
                self.log(&method, &path, &if_match, 0);
                // An error from the service: hyper closes the connection unanswered.
                return Err(std::io::Error::other("closed by the fake hub"));
            }
            Some(Fault::Answer {
                status,
                content_type,
                body,
                retry_after,
            }) => {
                let mut response = Response::builder()
                    .status(status)
                    .header("content-type", content_type);
                if let Some(after) = retry_after {
                    response = response.header("retry-after", after.to_string());
                }
                response
                    .body(Full::new(Bytes::from(body)))
                    .expect("response")
            }
            None => self.serve(
                &method,
                &path,
                authorization,
                content_type,
                if_match.as_deref(),
                &body,
            ),
        };
        self.log(&method, &path, &if_match, response.status().as_u16());
        Ok(response)
    }

    fn log(&self, method: &str, path: &str, if_match: &Option<String>, status: u16) {
        lock(&self.state).seen.push(Seen {
            method: method.to_owned(),
            path: path.to_owned(),
            if_match: if_match.clone(),
            status,
        });
    }

    /// IoT Hub's checks of the token: `SharedAccessSignature sr=&sig=&se=&skn=`.
    fn authorized(&self, authorization: Option<&str>) -> Result<(), String> {
        let token = authorization
            .and_then(|a| a.strip_prefix("SharedAccessSignature "))
            .ok_or("no SharedAccessSignature")?;
        let fields: BTreeMap<&str, &str> = token
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let field = |name: &str| fields.get(name).copied().ok_or(format!("no `{name}`"));
        let (sr, sig, se, skn) = (field("sr")?, field("sig")?, field("se")?, field("skn")?);
        let decode = |v: &str| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|e| e.to_string())
        };
        if !decode(sr)?.eq_ignore_ascii_case(&self.host_name) {
            return Err(format!("sr `{sr}` is not this hub"));
        }
        if decode(skn)? != POLICY {
            return Err(format!("no policy `{skn}`"));
        }
        let expiry: u64 = se.parse().map_err(|_| "se is not a number".to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        if expiry <= now {
            return Err("token expired".into());
        }
        let key = BASE64.decode(&self.key).map_err(|e| e.to_string())?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let signature = BASE64.decode(decode(sig)?).map_err(|e| e.to_string())?;
        ring::hmac::verify(&key, format!("{sr}\n{se}").as_bytes(), &signature)
            .map_err(|_| "signature does not match the policy key".to_string())
    }

    fn serve(
        &self,
        method: &str,
        path: &str,
        authorization: Option<String>,
        content_type: Option<String>,
        if_match: Option<&str>,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        if let Err(why) = self.authorized(authorization.as_deref()) {
            return hub_error(401, "IotHubUnauthorizedAccess", &why);
        }
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        if !query
            .split('&')
            .any(|q| q == format!("api-version={API_VERSION}"))
        {
            return hub_error(
                400,
                "InvalidProtocolVersion",
                "api-version 2021-04-12 is required",
            );
        }
        let (kind, id) = match route.strip_prefix("/devices/") {
            Some(id) => ("devices", id),
            None => match route.strip_prefix("/twins/") {
                Some(id) => ("twins", id),
                None => return hub_error(404, "NotFound", "no such route"),
            },
        };
        let id = percent_encoding::percent_decode_str(id)
            .decode_utf8_lossy()
            .into_owned();
        if method == "PUT" {
            let json = content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json"));
            if !json {
                return hub_error(
                    400,
                    "InvalidContentType",
                    "Content-Type must be application/json",
                );
            }
        }
        let sent: Option<Value> = match method {
            "PUT" => match serde_json::from_slice(body) {
                Ok(value) => Some(value),
                Err(e) => return hub_error(400, "ArgumentInvalid", &format!("body: {e}")),
            },
            _ => None,
        };
        let mut state = lock(&self.state);
        match (kind, method, sent) {
            ("devices", "GET", _) => match state.devices.get(&id) {
                Some(identity) => respond(200, identity.clone()),
                None => hub_error(404, "DeviceNotFound", &format!("device {id} not found")),
            },
            ("devices", "PUT", Some(sent)) => {
                if let Err(why) = check_identity(&id, &sent) {
                    return hub_error(400, "ArgumentInvalid", &why);
                }
                let existing = state.devices.get(&id).cloned();
                match (existing, if_match) {
                    (Some(_), None) => {
                        return hub_error(
                            409,
                            "DeviceAlreadyExists",
                            &format!("device {id} already exists"),
                        )
                    }
                    (None, Some(_)) => {
                        return hub_error(404, "DeviceNotFound", &format!("device {id} not found"))
                    }
                    (Some(existing), Some(tag)) if tag != "*" => {
                        let stored = existing["etag"].as_str().unwrap_or_default();
                        if tag.trim_matches('"') != stored {
                            return hub_error(412, "PreconditionFailed", "etag mismatch");
                        }
                    }
                    _ => {}
                }
                state.etags += 1;
                let mut identity = sent;
                identity["etag"] = json!(format!("etag{}", state.etags));
                identity["generationId"] = json!("638000000000000000");
                state.devices.insert(id.clone(), identity.clone());
                state.twins.entry(id.clone()).or_insert_with(|| {
                    json!({"deviceId": id, "etag": "AAAA", "version": 1, "tags": {},
                        "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}})
                });
                respond(200, identity)
            }
            ("twins", "GET", _) => match state.twins.get(&id) {
                Some(twin) => respond(200, twin.clone()),
                None => hub_error(404, "DeviceNotFound", &format!("device {id} not found")),
            },
            ("twins", "PUT", Some(sent)) => {
                let Some(twin) = state.twins.get_mut(&id) else {
                    return hub_error(404, "DeviceNotFound", &format!("device {id} not found"));
                };
                let tags = sent.get("tags").cloned().unwrap_or(json!({}));
                let desired = sent
                    .pointer("/properties/desired")
                    .cloned()
                    .unwrap_or(json!({}));
                if !tags.is_object() || !desired.is_object() {
                    return hub_error(
                        400,
                        "ArgumentInvalid",
                        "tags and properties.desired must be objects",
                    );
                }
                if desired
                    .as_object()
                    .is_some_and(|d| d.keys().any(|k| k.starts_with('$')))
                {
                    return hub_error(
                        400,
                        "ArgumentInvalid",
                        "desired properties may not set $ keys",
                    );
                }
                let version = twin
                    .pointer("/properties/desired/$version")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    + 1;
                let mut desired = desired;
                desired["$version"] = json!(version);
                twin["tags"] = tags;
                twin["properties"]["desired"] = desired;
                respond(200, twin.clone())
            }
            _ => hub_error(405, "MethodNotAllowed", "not a service API request"),
        }
    }
}

/// An identity as IoT Hub takes it.
fn check_identity(id: &str, identity: &Value) -> Result<(), String> {
    if identity["deviceId"].as_str() != Some(id) {
        return Err(format!(
            "deviceId {} is not the path's {id}",
            identity["deviceId"]
        ));
    }
    match identity["status"].as_str() {
        Some("enabled" | "disabled") => {}
        other => return Err(format!("status {other:?}")),
    }
    let auth = &identity["authentication"];
    match auth["type"].as_str() {
        Some("sas") => {
            for key in ["primaryKey", "secondaryKey"] {
                let value = auth["symmetricKey"][key]
                    .as_str()
                    .ok_or(format!("no {key}"))?;
                BASE64
                    .decode(value)
                    .map_err(|_| format!("{key} is not base64"))?;
            }
        }
        Some("selfSigned") => {
            let print = auth["x509Thumbprint"]["primaryThumbprint"]
                .as_str()
                .ok_or("no primaryThumbprint")?;
            if !(print.len() == 40 || print.len() == 64)
                || !print.chars().all(|c| c.is_ascii_hexdigit())
            {
                return Err(format!(
                    "primaryThumbprint {print} is not SHA-1 or SHA-256 hex"
                ));
            }
        }
        Some("certificateAuthority") => {}
        other => return Err(format!("authentication type {other:?}")),
    }
    Ok(())
}
