//! Direct methods (PROTOCOL E): an operator publishes a call to
//! `hub/methods/{deviceId}/{correlationId}`; a live hub session of the device that
//! subscribed to `$iothub/methods/POST/#` gets it under a request id of ours; the
//! device's answer on `$iothub/methods/res/{status}/?$rid=` goes to
//! `hub/methods/responses/{correlationId}`. No such session: 404 at once. No answer
//! within the call's timeout: 504. An answer nobody is waiting for is dropped and logged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use edgedps_policies::methods::TooMany;
use edgedps_topics::hub::{self as hub_topics, codes, MethodCall, MethodResult};
use edgedps_topics::identity::RegistrationId;

use super::HubEvent;
use crate::{lock, Publication, Responder};

/// Calls waiting for their answers, at most (beyond: 429).
pub(crate) const MAX_PENDING_CALLS: usize = 1024;

/// What an operator's call led to.
#[derive(Debug, Default)]
pub struct Invoked {
    /// The answer already known (a refusal, or the device is not there).
    pub publish: Vec<Publication>,
    /// The call went to the device: its request id, and when to give up waiting.
    pub waiting: Option<(String, Duration)>,
}

impl Responder {
    /// An operator's method call.
    pub fn invoke_method(&self, device_id: &str, correlation_id: &str, body: &[u8]) -> Invoked {
        let answer = |status: u16, code: u32, message: String| Invoked {
            publish: vec![method_answer(
                correlation_id,
                status,
                json!({"errorCode": code, "message": message}),
            )],
            waiting: None,
        };
        let call: MethodCall = match serde_json::from_slice(body) {
            Ok(call) => call,
            Err(e) => {
                let reason = edgedps_topics::encoding::without_values(&e.to_string());
                return answer(
                    400,
                    codes::BAD_FORMAT,
                    format!("the call is not valid: {reason}"),
                );
            }
        };
        if let Err(reason) = call.check() {
            return answer(400, codes::BAD_FORMAT, reason);
        }
        let id = RegistrationId::from(device_id);
        let link = self
            .hub_links
            .links(&id)
            .into_iter()
            .find(|l| l.methods.load(Ordering::SeqCst));
        let Some(link) = link else {
            return answer(
                404,
                codes::DEVICE_NOT_ONLINE,
                format!("`{device_id}` is not connected and subscribed to methods"),
            );
        };
        let rid = self.random_token(9);
        let filed = lock(&self.method_calls).start(&rid, &id.key(), correlation_id);
        if let Err(TooMany(limit)) = filed {
            return answer(
                429,
                codes::THROTTLED,
                format!("{limit} method calls are waiting already"),
            );
        }
        let event = HubEvent::Method {
            method: call.method_name.clone(),
            rid: rid.clone(),
            payload: serde_json::to_vec(&call.payload).unwrap_or_else(|_| b"null".to_vec()),
        };
        if link.tx.try_send(event).is_err() {
            lock(&self.method_calls).give_up(&rid);
            return answer(
                404,
                codes::DEVICE_NOT_ONLINE,
                format!("`{device_id}`'s session is not taking calls"),
            );
        }
        tracing::info!(%device_id, %correlation_id, method = %call.method_name, "method call sent to the device");
        Invoked {
            publish: Vec::new(),
            waiting: Some((rid, Duration::from_secs(call.timeout_seconds()))),
        }
    }

    /// The device's answer to call `rid`: for the operator, unless nobody waits for it
    /// (unknown, timed out, or another device's call).
    pub fn method_answered(
        &self,
        device_id: &str,
        rid: &str,
        status: u16,
        body: &[u8],
    ) -> Option<Publication> {
        let answered = lock(&self.method_calls).answer(rid, device_id);
        let Some(correlation_id) = answered else {
            tracing::warn!(%device_id, %rid, status, "method answer for no waiting call (unknown $rid, timed out, or not this device's); dropped");
            return None;
        };
        let payload = match serde_json::from_slice::<Value>(body) {
            Ok(value) => value,
            Err(_) if body.is_empty() => Value::Null,
            Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
        };
        Some(method_answer(&correlation_id, status, payload))
    }

    /// Call `rid` had no answer in time: 504, unless it was answered meanwhile.
    pub fn method_timed_out(&self, rid: &str) -> Option<Publication> {
        let correlation_id = lock(&self.method_calls).give_up(rid)?;
        tracing::info!(%correlation_id, "method call timed out");
        Some(method_answer(
            &correlation_id,
            504,
            json!({"errorCode": codes::TIMEOUT, "message": "the device did not answer in time"}),
        ))
    }
}

fn method_answer(correlation_id: &str, status: u16, payload: Value) -> Publication {
    Publication::event(
        hub_topics::method_response_topic(correlation_id),
        &MethodResult { status, payload },
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use crate::hub::HubEvent;
    use crate::store::SledStore;
    use crate::{Publication, Responder, Settings};

    fn responder() -> (Responder, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let responder = Responder::open(Settings::new("scope"), Arc::new(store)).unwrap();
        (responder, dir)
    }

    fn answer(publication: &Publication) -> (String, Value) {
        let body = serde_json::from_slice(&publication.payload).unwrap();
        (publication.topic.clone(), body)
    }

    #[tokio::test]
    async fn a_call_reaches_a_subscribed_session_and_its_answer_only_its_caller() {
        let (responder, _dir) = responder();
        let call = br#"{"methodName": "blink", "payload": {"n": 2}}"#;

        // Nobody connected, or connected without the methods subscription: 404.
        let offline = responder.invoke_method("dev-1", "c-0", call);
        assert_eq!(answer(&offline.publish[0]).1["status"], 404);
        let mut link = responder.attach_hub("dev-1");
        let unsubscribed = responder.invoke_method("dev-1", "c-0", call);
        assert_eq!(answer(&unsubscribed.publish[0]).1["status"], 404);

        link.take_methods(true);
        let invoked = responder.invoke_method("DEV-1", "c-1", call);
        assert!(invoked.publish.is_empty());
        let (rid, timeout) = invoked.waiting.expect("waiting");
        assert_eq!(timeout.as_secs(), 30);
        let Some(HubEvent::Method {
            method,
            rid: sent,
            payload,
        }) = link.next().await
        else {
            panic!("no call");
        };
        assert_eq!((method.as_str(), sent.as_str()), ("blink", rid.as_str()));
        assert_eq!(
            serde_json::from_slice::<Value>(&payload).unwrap(),
            json!({"n": 2})
        );

        // Another device cannot answer it; the device can, once.
        assert!(responder
            .method_answered("dev-2", &rid, 200, b"{}")
            .is_none());
        let answered = responder
            .method_answered("dev-1", &rid, 200, br#"{"ok": true}"#)
            .expect("answered");
        assert_eq!(
            answer(&answered),
            (
                "hub/methods/responses/c-1".to_owned(),
                json!({"status": 200, "payload": {"ok": true}})
            )
        );
        assert!(responder
            .method_answered("dev-1", &rid, 200, b"{}")
            .is_none());
        assert!(
            responder.method_timed_out(&rid).is_none(),
            "answered: no 504"
        );

        // Unanswered: 504, and a late answer goes nowhere.
        let late = responder.invoke_method("dev-1", "c-2", call);
        let (rid, _) = late.waiting.expect("waiting");
        let timed_out = responder.method_timed_out(&rid).expect("504");
        assert_eq!(answer(&timed_out).1["status"], 504);
        assert!(responder
            .method_answered("dev-1", &rid, 200, b"{}")
            .is_none());

        // Gone: its link leaves with it.
        drop(link);
        let gone = responder.invoke_method("dev-1", "c-3", call);
        assert_eq!(answer(&gone.publish[0]).1["status"], 404);
    }
}
