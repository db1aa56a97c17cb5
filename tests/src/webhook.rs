//! A custom allocation webhook for tests (PROTOCOL C): HTTPS (the test server CA,
//! `localhost`) or plain HTTP on 127.0.0.1, answering Azure's allocation request as its
//! [`Behaviour`] says, and keeping every request it got.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How the webhook answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with this hub, echoing the device's payload under `echo` and with `twin`.
    Assign { hub: String, twin: Option<Value> },
    /// This status and body.
    Status(u16, String),
    /// Never answers.
    Hang,
    /// Answers after this long, as `Assign`.
    Slow(Duration, String),
    /// 200 with `bytes` bytes of JSON-looking filler.
    Huge(usize),
    /// 302 to another URL.
    Redirect,
}

/// One request the webhook got.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path_and_query: String,
    pub content_type: Option<String>,
    pub body: Value,
}

pub struct Webhook {
    pub port: u16,
    pub tls: bool,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Webhook {
    /// A webhook on 127.0.0.1, over TLS (`localhost`, signed by the test server CA) or
    /// plain HTTP.
    pub async fn start(tls: bool, behaviour: Behaviour) -> Webhook {
        let acceptor = tls.then(|| crate::pki::tls_acceptor("localhost"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (b, s) = (behaviour.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, b, s) = (acceptor.clone(), b.clone(), s.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (b, s) = (b.clone(), s.clone());
                        async move { Ok::<_, Infallible>(answer(request, b, s).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Webhook {
            port,
            tls,
            behaviour,
            seen,
            task,
        }
    }

    /// Its URL, with a path and a function key in the query as Azure Functions have.
    pub fn url(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}/api/allocate?code=k3y", self.port),
            false => format!("http://127.0.0.1:{}/api/allocate?code=k3y", self.port),
        }
    }

    pub fn behave(&self, behaviour: Behaviour) {
        *lock(&self.behaviour) = behaviour;
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

/// The answer of an `Assign`: the hub, the twin, and the device's payload echoed.
pub fn assignment(request: &Value, hub: &str, twin: Option<&Value>) -> Value {
    let mut answer = serde_json::json!({
        "iotHubHostName": hub,
        "payload": {
            "allocatedBy": "webhook",
            "echo": request["deviceRuntimeContext"]["payload"].clone(),
        },
    });
    if let Some(twin) = twin {
        answer["initialTwin"] = twin.clone();
    }
    answer
}

async fn answer(
    request: Request<Incoming>,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    lock(&seen).push(Seen {
        path_and_query,
        content_type,
        body: body.clone(),
    });
    let behaviour = lock(&behaviour).clone();
    let json = |status: u16, value: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(value.to_string())))
            .expect("response")
    };
    match behaviour {
        Behaviour::Assign { hub, twin } => json(200, assignment(&body, &hub, twin.as_ref())),
        Behaviour::Slow(delay, hub) => {
            tokio::time::sleep(delay).await;
            json(200, assignment(&body, &hub, None))
        }
        Behaviour::Status(status, text) => Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text)))
            .expect("response"),
        Behaviour::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Behaviour::Huge(bytes) => {
            let mut filler = String::with_capacity(bytes + 32);
            filler.push_str("{\"iotHubHostName\":\"hub-a.example.net\",\"x\":\"");
            filler.push_str(&"a".repeat(bytes));
            filler.push_str("\"}");
            Response::builder()
                .status(200)
                .body(Full::new(Bytes::from(filler)))
                .expect("response")
        }
        Behaviour::Redirect => Response::builder()
            .status(302)
            .header("location", "https://elsewhere.example.net/allocate")
            .body(Full::new(Bytes::new()))
            .expect("response"),
    }
}
