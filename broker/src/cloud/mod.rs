//! Registration at cloud hubs, the sending half: one worker per hub takes the oldest
//! operation of its outbox (kept by the responder, `edgedps_responder::cloud`), sends it
//! to the hub's service API (IoT Hub REST, api-version 2021-04-12), and reports the
//! attempt. The worker sends one operation at a time, so a device's operations reach the
//! hub in the order they were made; while the hub is down or busy (no answer, 408, 429,
//! 5xx, an answer that is not its JSON) the same operation is tried again after a capped
//! backoff, and an answer retrying cannot fix ends it as `failed`.
//!
//! Requests (every one idempotent, so an operation sent twice after a crash does no
//! harm):
//! - register: `PUT /devices/{id}` (create); if the hub has it (409), `PUT` again with
//!   `If-Match: *` (update); then the twin: `PUT /twins/{id}` with its tags and desired
//!   properties (for a moved device whose data migrates, `GET /twins/{id}` at the hub it
//!   left first).
//! - disable, enable: `GET /devices/{id}`, then `PUT` it back with the new `status` and
//!   `If-Match` its etag; a device the hub does not have is done.

pub mod client;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use edgedps_policies::cloud::{self as policy, Verdict};
use edgedps_responder::{Attempt, HubTarget, Responder};
use edgedps_topics::cloud::{HubAction, HubOperation, TwinBody, TwinWrite, API_VERSION};

use crate::router::Publisher;
use client::HubClient;

/// How edgedps talks to hubs: from `[cloud]`.
#[derive(Clone)]
pub struct CloudSettings {
    pub tls: Arc<rustls::ClientConfig>,
    pub request_timeout: Duration,
    pub max_retry: Duration,
}

/// Characters of a device id left as they are in a path.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Starts a worker for every hub that needs one, now and whenever one may (a connection
/// string written, an operation for a hub without a worker).
pub async fn supervise(responder: Arc<Responder>, publisher: Publisher, settings: CloudSettings) {
    let changed = responder.cloud_hubs_changed();
    let mut workers = Workers::default();
    loop {
        match responder.cloud_hubs() {
            Ok(hubs) => {
                for hub in hubs {
                    let key = hub.to_ascii_lowercase();
                    if workers.0.get(&key).is_some_and(|w| !w.is_finished()) {
                        continue;
                    }
                    tracing::info!(%hub, "hub outbox worker started");
                    let worker = work(hub, responder.clone(), publisher.clone(), settings.clone());
                    workers.0.insert(key, tokio::spawn(worker));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the hubs' outboxes"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), changed.notified()).await;
    }
}

/// The workers, stopped with their supervisor (when edgedps stops).
#[derive(Default)]
struct Workers(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in self.0.values() {
            worker.abort();
        }
    }
}

/// The worker of `hub`: forever, the oldest operation of its outbox, sent.
async fn work(
    hub: String,
    responder: Arc<Responder>,
    publisher: Publisher,
    settings: CloudSettings,
) {
    let waker = responder.outbox_waker(&hub);
    let mut client: Option<HubClient> = None;
    loop {
        let operation = match responder.next_hub_operation(&hub) {
            Ok(Some(operation)) => operation,
            Ok(None) => {
                // A missed wake-up costs at most this long.
                let _ = tokio::time::timeout(Duration::from_secs(30), waker.notified()).await;
                continue;
            }
            Err(e) => {
                tracing::error!(%hub, error = %e, "cannot read the hub's outbox; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (attempt, hint) = match responder.hub_target(&hub) {
            None => (
                Attempt::Failed(format!(
                    "hub `{hub}` is not linked with a connection string any more"
                )),
                None,
            ),
            Some(target) => {
                let reuse = client
                    .as_ref()
                    .is_some_and(|c| same_target(&c.target, &target));
                if !reuse {
                    client = Some(HubClient::new(
                        target,
                        settings.tls.clone(),
                        settings.request_timeout,
                    ));
                }
                match client.as_mut() {
                    Some(client) => perform(client, &operation, &responder, &settings).await,
                    None => continue,
                }
            }
        };
        let retry = matches!(attempt, Attempt::Retry(_));
        let attempts = operation.attempts.saturating_add(1);
        match responder.hub_operation_attempted(operation, attempt).await {
            Ok(publish) => publisher.publish(publish).await,
            Err(e) => {
                tracing::error!(%hub, error = %e, "cannot record the hub's answer; the operation stays in the outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if retry {
            tokio::time::sleep(policy::backoff(attempts, hint, settings.max_retry)).await;
        }
    }
}

fn same_target(a: &HubTarget, b: &HubTarget) -> bool {
    a.host_name == b.host_name
        && a.service_address == b.service_address
        && a.credentials == b.credentials
}

/// What one attempt at `operation` came to, and the hub's `Retry-After` if it gave one.
async fn perform(
    client: &mut HubClient,
    operation: &HubOperation,
    responder: &Responder,
    settings: &CloudSettings,
) -> (Attempt, Option<Duration>) {
    let outcome = match operation.action {
        HubAction::Register => register(client, operation, responder, settings).await,
        HubAction::Disable | HubAction::Enable => set_status(client, operation).await,
    };
    match outcome {
        Ok(()) => (Attempt::Done, None),
        Err(Verdict::Retry { after, reason }) => (Attempt::Retry(reason), after),
        Err(Verdict::Fail(reason)) => (Attempt::Failed(reason), None),
        Err(Verdict::Done) => (Attempt::Done, None),
    }
}

fn device_path(kind: &str, device_id: &str) -> String {
    format!(
        "/{kind}/{}?api-version={API_VERSION}",
        utf8_percent_encode(device_id, PATH)
    )
}

/// One request; `Err` unless the hub said yes. `what` names the request in reasons.
async fn call(
    client: &mut HubClient,
    what: &str,
    method: Method,
    path: &str,
    if_match: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<client::Answer, Verdict> {
    let answer = sent(client, what, method, path, if_match, body).await?;
    judged(what, answer)
}

/// One request and whatever the hub answered; `Err` (to retry) when no answer came.
async fn sent(
    client: &mut HubClient,
    what: &str,
    method: Method,
    path: &str,
    if_match: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<client::Answer, Verdict> {
    client
        .send(method, path, if_match, body)
        .await
        .map_err(|reason| Verdict::Retry {
            after: None,
            reason: format!("{what}: {reason}"),
        })
}

async fn register(
    client: &mut HubClient,
    operation: &HubOperation,
    responder: &Responder,
    settings: &CloudSettings,
) -> Result<(), Verdict> {
    let Some(identity) = &operation.identity else {
        return Err(Verdict::Fail(
            "the operation has no identity to register".into(),
        ));
    };
    let body = serde_json::to_vec(identity).map_err(|e| Verdict::Fail(e.to_string()))?;
    let path = device_path("devices", &operation.device_id);
    let created = sent(
        client,
        "PUT identity",
        Method::PUT,
        &path,
        None,
        Some(body.clone()),
    )
    .await?;
    // 409: the hub has the device; update it whatever its etag.
    if created.status == 409 {
        call(
            client,
            "PUT identity (update)",
            Method::PUT,
            &path,
            Some("*"),
            Some(body),
        )
        .await?;
    } else {
        judged("PUT identity", created)?;
    }
    let twin = match &operation.twin {
        None => return Ok(()),
        Some(TwinWrite::Replace(body)) => body.clone(),
        Some(TwinWrite::Migrate { from, fallback }) => {
            migrated(from, &operation.device_id, fallback, responder, settings).await?
        }
    };
    let body = serde_json::to_vec(&twin).map_err(|e| Verdict::Fail(e.to_string()))?;
    let path = device_path("twins", &operation.device_id);
    call(
        client,
        "PUT twin",
        Method::PUT,
        &path,
        Some("*"),
        Some(body),
    )
    .await?;
    Ok(())
}

/// The twin of a device that moved from `from`: its tags and desired properties there,
/// or `fallback` when that hub no longer has the device or cannot be asked.
async fn migrated(
    from: &str,
    device_id: &str,
    fallback: &TwinBody,
    responder: &Responder,
    settings: &CloudSettings,
) -> Result<TwinBody, Verdict> {
    let Some(target) = responder.hub_target(from) else {
        return Ok(fallback.clone());
    };
    let mut old = HubClient::new(target, settings.tls.clone(), settings.request_timeout);
    let path = device_path("twins", device_id);
    let answer = sent(
        &mut old,
        &format!("GET twin at `{from}`"),
        Method::GET,
        &path,
        None,
        None,
    )
    .await?;
    if answer.status == 404 {
        return Ok(fallback.clone());
    }
    let answer = judged(&format!("GET twin at `{from}`"), answer)?;
    let twin: serde_json::Value =
        serde_json::from_slice(&answer.body).map_err(|e| Verdict::Retry {
            after: None,
            reason: format!("GET twin at `{from}`: not a twin: {e}"),
        })?;
    Ok(TwinBody::of(Some(&twin)))
}

/// `answer` if the hub said yes; `what` names the request in reasons.
fn judged(what: &str, answer: client::Answer) -> Result<client::Answer, Verdict> {
    match policy::verdict(answer.judged()) {
        Verdict::Done => Ok(answer),
        Verdict::Retry { after, reason } => Err(Verdict::Retry {
            after,
            reason: format!("{what}: {reason}"),
        }),
        Verdict::Fail(reason) => Err(Verdict::Fail(format!("{what}: {reason}"))),
    }
}

/// Disable or enable: the hub's identity with its status changed, nothing else.
async fn set_status(client: &mut HubClient, operation: &HubOperation) -> Result<(), Verdict> {
    let path = device_path("devices", &operation.device_id);
    let answer = sent(client, "GET identity", Method::GET, &path, None, None).await?;
    if answer.status == 404 {
        tracing::info!(hub = %operation.hub, device_id = %operation.device_id, "the hub does not have the device: nothing to change");
        return Ok(());
    }
    let answer = judged("GET identity", answer)?;
    let mut identity: serde_json::Value =
        serde_json::from_slice(&answer.body).map_err(|e| Verdict::Retry {
            after: None,
            reason: format!("GET identity: not an identity: {e}"),
        })?;
    let etag = identity
        .get("etag")
        .and_then(|e| e.as_str())
        .map(|e| format!("\"{}\"", e.trim_matches('"')));
    let status = match operation.action {
        HubAction::Disable => "disabled",
        _ => "enabled",
    };
    let Some(object) = identity.as_object_mut() else {
        return Err(Verdict::Retry {
            after: None,
            reason: "GET identity: not a JSON object".into(),
        });
    };
    object.insert("status".into(), status.into());
    let body = serde_json::to_vec(&identity).map_err(|e| Verdict::Fail(e.to_string()))?;
    let answer = sent(
        client,
        &format!("PUT identity ({status})"),
        Method::PUT,
        &path,
        Some(etag.as_deref().unwrap_or("*")),
        Some(body),
    )
    .await?;
    // 412: changed at the hub since the GET: read it again.
    if answer.status == 412 {
        return Err(Verdict::Retry {
            after: None,
            reason: format!("PUT identity ({status}): 412: the hub's identity changed meanwhile"),
        });
    }
    judged(&format!("PUT identity ({status})"), answer).map(|_| ())
}
