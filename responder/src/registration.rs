//! Register and poll (PROTOCOL A4-A6): find the enrollment, check its status, apply the
//! re-provisioning policy, allocate a hub, make the record durable, answer.

use std::time::Instant;

use serde_json::{json, Value};

use edgedps_policies::allocation::{self, Candidate};
use edgedps_topics::admin::{
    self, AllocationPolicy, AttestationType, EnrollmentSettings, ProvisioningStatus, RecordKind,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::registration::{
    codes, AttestationSource, ErrorBody, OperationStatus, RegisterRequest, RegistrationState,
};

use crate::{lock, read, timestamp_now, Attested, EnrollmentSource, Operation, Responder};

/// The answer to one device request: a status for the response topic and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u32>,
    pub body: Vec<u8>,
    /// The body's encoding (for the MQTT 5 content type).
    pub encoding: Encoding,
    /// Set when the answer is `assigned`: the device may now use its hub topics.
    pub assigned_device_id: Option<String>,
}

/// The outcome of a registration: the 200 body and, when assigned, the device id.
struct Decision {
    body: Vec<u8>,
    device_id: Option<String>,
}

/// The enrollment a registration follows, whichever kind it is.
struct Resolved {
    group_id: Option<String>,
    device_id: String,
    settings: EnrollmentSettings,
}

/// Removes a registration id from the in-flight set however the register ends.
struct InFlight<'a> {
    responder: &'a Responder,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.responder.in_flight).remove(&self.key);
    }
}

impl Responder {
    /// Handles `PUT iotdps-register` from an attested device. A CBOR request (see
    /// [`Encoding::detect`]) is read as the same JSON document and answered in CBOR.
    pub async fn register(&self, device: &Attested, body: &[u8], encoding: Encoding) -> Reply {
        let started = Instant::now();
        let reply = match encoding {
            Encoding::Json => self.register_inner(device, body, encoding).await,
            Encoding::Cbor if body.is_empty() => self.register_inner(device, body, encoding).await,
            Encoding::Cbor => match Encoding::Cbor.decode::<serde_json::Value>(body) {
                Ok(document) => {
                    self.register_inner(device, &to_json(&document), encoding)
                        .await
                }
                Err(e) => self.error(
                    codes::MALFORMED_BODY,
                    format!("register body is not a CBOR map: {e}"),
                ),
            },
        };
        self.register_latency.record(started.elapsed());
        reply.in_encoding(encoding)
    }

    /// `body` is JSON; `encoding` is what the answers to this registration's polls use.
    async fn register_inner(&self, device: &Attested, body: &[u8], encoding: Encoding) -> Reply {
        let request = match RegisterRequest::parse(body) {
            Ok(request) => request,
            Err(e) => return self.error(codes::MALFORMED_BODY, e.to_string()),
        };
        if let Some(id) = &request.registration_id {
            if !id.eq_ignore_ascii_case(&device.registration_id) {
                return self.error(
                    codes::MALFORMED_BODY,
                    format!(
                        "body registrationId `{id}` is not the connected registration `{}`",
                        device.registration_id
                    ),
                );
            }
        }
        let key = device.registration_id.to_ascii_lowercase();
        if let Err(retry_after) = self.throttle.admit_registration(&key, Instant::now()) {
            return self.throttled(retry_after, "registration rate limit");
        }
        if !lock(&self.in_flight).insert(key.clone()) {
            return self.error(
                codes::CONFLICT,
                "a registration for this device is already in progress".into(),
            );
        }
        let _guard = InFlight {
            responder: self,
            key,
        };
        let operation_id = self.operation_id();
        let decision = match self.decide(device, &operation_id).await {
            Ok(outcome) => outcome,
            Err((code, message))
                if code == codes::NO_HUB || code == codes::CUSTOM_ALLOCATION_FAILED =>
            {
                // DPS: an assignment that cannot be made completes the operation as
                // `failed` (a 200), with the reason in the registration state.
                self.event(device, "failed", None, Some(code), &message)
                    .await;
                tracing::info!(code, %message, registration_id = %device.registration_id, "registration failed");
                let failed = OperationStatus {
                    operation_id: operation_id.clone(),
                    status: "failed".into(),
                    registration_state: Some(RegistrationState {
                        registration_id: device.registration_id.clone(),
                        status: "failed".into(),
                        last_updated_date_time_utc: Some(timestamp_now()),
                        error_code: Some(code),
                        error_message: Some(message),
                        ..Default::default()
                    }),
                };
                Decision {
                    body: to_json(&failed),
                    device_id: None,
                }
            }
            Err((code, message)) => {
                self.event(device, "failed", None, Some(code), &message)
                    .await;
                return self.error(code, message);
            }
        };
        if self.settings.always_accept_then_poll {
            let expires = Instant::now() + self.settings.operation_ttl;
            let mut operations = lock(&self.operations);
            let now = Instant::now();
            operations.retain(|_, op| op.expires > now);
            operations.insert(
                operation_id.clone(),
                Operation {
                    registration_id: device.registration_id.to_ascii_lowercase(),
                    body: decision.body,
                    encoding,
                    device_id: decision.device_id,
                    expires,
                },
            );
            drop(operations);
            let accepted = OperationStatus {
                operation_id,
                status: "assigning".into(),
                registration_state: None,
            };
            return Reply {
                encoding: Encoding::Json,
                status: 202,
                retry_after: Some(self.settings.retry_after_seconds),
                body: to_json(&accepted),
                assigned_device_id: None,
            };
        }
        Reply {
            encoding: Encoding::Json,
            status: 200,
            retry_after: None,
            body: decision.body,
            assigned_device_id: decision.device_id,
        }
    }

    /// Handles `GET iotdps-get-operationstatus`. The answer is CBOR when `encoding`
    /// asks for it or when the register was CBOR (a device that reconnects to poll, on
    /// MQTT 3.1.1, has no other way to say so).
    pub fn poll(&self, device: &Attested, operation_id: &str, encoding: Encoding) -> Reply {
        let reply = self.poll_inner(device, operation_id);
        match encoding {
            Encoding::Cbor => reply.in_encoding(Encoding::Cbor),
            Encoding::Json => reply,
        }
    }

    fn poll_inner(&self, device: &Attested, operation_id: &str) -> Reply {
        let key = device.registration_id.to_ascii_lowercase();
        if let Err(retry_after) = self.throttle.admit_poll(&key, Instant::now()) {
            return self.throttled(retry_after, "more than 5 polls in 10 s");
        }
        let operations = lock(&self.operations);
        match operations.get(operation_id) {
            Some(op)
                if op.expires > Instant::now()
                    && op
                        .registration_id
                        .eq_ignore_ascii_case(&device.registration_id) =>
            {
                Reply {
                    encoding: Encoding::Json,
                    status: 200,
                    retry_after: None,
                    body: op.body.clone(),
                    assigned_device_id: op.device_id.clone(),
                }
                .in_encoding(op.encoding)
            }
            _ => {
                drop(operations);
                self.error(
                    codes::NOT_FOUND,
                    format!("operation `{operation_id}` is unknown for this device"),
                )
            }
        }
    }

    /// Runs the registration; returns the 200 answer.
    async fn decide(
        &self,
        device: &Attested,
        operation_id: &str,
    ) -> Result<Decision, (u32, String)> {
        let resolved = self.resolve(device)?;
        if resolved.settings.provisioning_status == ProvisioningStatus::Disabled {
            let body = OperationStatus {
                operation_id: operation_id.to_owned(),
                status: "disabled".into(),
                registration_state: Some(RegistrationState {
                    registration_id: device.registration_id.clone(),
                    status: "disabled".into(),
                    ..Default::default()
                }),
            };
            self.event(device, "disabled", None, None, "enrollment is disabled")
                .await;
            return Ok(Decision {
                body: to_json(&body),
                device_id: None,
            });
        }
        let existing = self
            .store
            .registration(&device.registration_id)
            .map_err(internal)?;
        let policy = resolved.settings.reprovision_policy.unwrap_or_default();
        let keep_hub = existing
            .as_ref()
            .filter(|r| r.status == "assigned" && !policy.update_hub_assignment)
            .and_then(|r| r.assigned_hub.clone());
        let hub = match keep_hub {
            Some(hub) => hub,
            None => self.allocate(&device.registration_id, &resolved.settings)?,
        };
        let twin = resolved
            .settings
            .initial_twin
            .clone()
            .unwrap_or_else(|| json!({"tags": {}, "properties": {"desired": {}}}));
        let source = Some(AttestationSource {
            enrollment_group_id: resolved.group_id.clone(),
        });
        let (x509, symmetric_key) = match device.kind {
            AttestationType::X509 => (source, None),
            _ => (None, source),
        };
        let now = timestamp_now();
        let mut state = RegistrationState {
            registration_id: device.registration_id.clone(),
            created_date_time_utc: Some(now.clone()),
            assigned_hub: Some(hub.clone()),
            device_id: Some(resolved.device_id.clone()),
            status: "assigned".into(),
            substatus: Some("initialAssignment".into()),
            last_updated_date_time_utc: Some(now),
            etag: None,
            x509,
            symmetric_key,
            initial_twin: Some(twin.clone()),
            payload: Some(twin),
            error_code: None,
            error_message: None,
        };
        let unchanged = existing.as_ref().is_some_and(|old| {
            old.status == "assigned"
                && old.assigned_hub == state.assigned_hub
                && old.device_id == state.device_id
                && old.initial_twin == state.initial_twin
                && old.x509 == state.x509
                && old.symmetric_key == state.symmetric_key
        });
        if let (true, Some(old)) = (unchanged, &existing) {
            // DPS: re-registering with no change returns the same assignment and etag.
            state = old.clone();
        } else {
            if let Some(old) = existing.as_ref().filter(|r| r.status == "assigned") {
                state.created_date_time_utc = old.created_date_time_utc.clone();
                state.substatus = Some(if old.assigned_hub == state.assigned_hub {
                    old.substatus
                        .clone()
                        .unwrap_or_else(|| "initialAssignment".into())
                } else if policy.migrate_device_data {
                    "deviceDataMigrated".into()
                } else {
                    "deviceDataReset".into()
                });
            }
            state.etag = Some(format!("\"{}\"", self.random_token(12)));
            self.store.put_registration(&state).map_err(internal)?;
            self.store.durable().await.map_err(internal)?;
            self.publish(
                RecordKind::Registration.record_topic(&device.registration_id),
                to_json(&state),
                true,
            )
            .await;
        }
        self.event(device, "assigned", Some(&hub), None, "").await;
        let body = OperationStatus {
            operation_id: operation_id.to_owned(),
            status: "assigned".into(),
            registration_state: Some(state),
        };
        Ok(Decision {
            body: to_json(&body),
            device_id: Some(resolved.device_id),
        })
    }

    /// The current enrollment behind an attested device.
    fn resolve(&self, device: &Attested) -> Result<Resolved, (u32, String)> {
        match &device.source {
            EnrollmentSource::Individual => {
                let enrollment = self
                    .store
                    .enrollment(&device.registration_id)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        (
                            codes::NOT_FOUND,
                            format!("no enrollment for `{}`", device.registration_id),
                        )
                    })?;
                Ok(Resolved {
                    group_id: None,
                    device_id: enrollment
                        .device_id
                        .clone()
                        .unwrap_or_else(|| device.registration_id.clone()),
                    settings: enrollment.settings,
                })
            }
            EnrollmentSource::Group(group_id) => {
                let groups = read(&self.groups);
                let entry = groups.get(group_id).ok_or_else(|| {
                    (
                        codes::NOT_FOUND,
                        format!("enrollment group `{group_id}` no longer exists"),
                    )
                })?;
                Ok(Resolved {
                    group_id: Some(group_id.clone()),
                    device_id: device.registration_id.clone(),
                    settings: entry.group.settings.clone(),
                })
            }
        }
    }

    /// Picks a hub by the enrollment's policy (or the service default).
    fn allocate(
        &self,
        registration_id: &str,
        settings: &EnrollmentSettings,
    ) -> Result<String, (u32, String)> {
        let linked = self.linked_hubs();
        let candidates: Vec<Candidate<'_>> = linked
            .iter()
            .filter(|hub| {
                if settings.iot_hubs.is_empty() {
                    hub.apply_allocation_policy
                } else {
                    settings
                        .iot_hubs
                        .iter()
                        .any(|name| name.eq_ignore_ascii_case(&hub.host_name))
                }
            })
            .map(|hub| Candidate {
                host_name: &hub.host_name,
                weight: hub.allocation_weight,
            })
            .collect();
        let policy = settings
            .allocation_policy
            .unwrap_or(self.settings.allocation_policy);
        let chosen = match policy {
            AllocationPolicy::Static => match candidates.as_slice() {
                [only] => Some(only.host_name),
                [] => None,
                _ => {
                    return Err((
                        codes::NO_HUB,
                        "static allocation needs exactly one hub in the enrollment's iotHubs"
                            .into(),
                    ))
                }
            },
            _ => allocation::hashed(registration_id, &candidates),
        };
        chosen.map(str::to_owned).ok_or_else(|| {
            (
                codes::NO_HUB,
                "no linked hub can be assigned to this device".into(),
            )
        })
    }

    async fn event(
        &self,
        device: &Attested,
        outcome: &str,
        hub: Option<&str>,
        code: Option<u32>,
        message: &str,
    ) {
        let mut event = json!({
            "registrationId": device.registration_id,
            "outcome": outcome,
            "timestampUtc": timestamp_now(),
        });
        if let Value::Object(map) = &mut event {
            if let Some(group) = match &device.source {
                EnrollmentSource::Group(g) => Some(g),
                EnrollmentSource::Individual => None,
            } {
                map.insert("enrollmentGroupId".into(), json!(group));
            }
            if let Some(hub) = hub {
                map.insert("assignedHub".into(), json!(hub));
            }
            if let Some(code) = code {
                map.insert("errorCode".into(), json!(code));
            }
            if !message.is_empty() {
                map.insert("message".into(), json!(message));
            }
        }
        self.publish(
            admin::registration_event_topic(&device.registration_id),
            to_json(&event),
            false,
        )
        .await;
    }

    /// An error reply with the DPS body.
    pub fn error(&self, code: u32, message: String) -> Reply {
        if code >= codes::INTERNAL {
            tracing::error!(code, %message, "registration failed");
        } else if code == codes::THROTTLED {
            tracing::debug!(code, %message, "registration throttled");
        } else {
            tracing::info!(code, %message, "registration refused");
        }
        let body = ErrorBody {
            error_code: code,
            tracking_id: self.random_token(12),
            message,
            timestamp_utc: timestamp_now(),
        };
        Reply {
            encoding: Encoding::Json,
            status: codes::status_of(code),
            retry_after: (code == codes::THROTTLED || code == codes::INTERNAL)
                .then_some(self.settings.retry_after_seconds),
            body: to_json(&body),
            assigned_device_id: None,
        }
    }

    /// A 429 with the wait the limit asks for.
    fn throttled(&self, retry_after: u32, why: &str) -> Reply {
        let mut reply = self.error(codes::THROTTLED, format!("throttled: {why}"));
        reply.retry_after = Some(retry_after);
        reply
    }

    /// Operation ids in the shape Azure uses: `4.{16 hex}.{uuid-like}`.
    fn operation_id(&self) -> String {
        format!("4.{}", self.random_token(18))
    }
}

fn internal(e: impl std::fmt::Display) -> (u32, String) {
    (codes::INTERNAL, format!("internal error: {e}"))
}

impl Reply {
    /// The same answer in `encoding`: bodies are built as JSON and re-encoded for CBOR.
    fn in_encoding(mut self, encoding: Encoding) -> Reply {
        if encoding != self.encoding {
            if let Ok(document) = self.encoding.decode::<serde_json::Value>(&self.body) {
                self.body = encoding.encode(&document);
                self.encoding = encoding;
            }
        }
        self
    }
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types to JSON cannot fail (string keys, no custom impls).
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Settings, Store};

    fn responder(dir: &std::path::Path) -> Responder {
        let store = Store::open(dir).unwrap();
        let mut settings = Settings::new("scope");
        settings.hubs = vec![edgedps_topics::admin::LinkedHub {
            host_name: "hub-a.example.net".into(),
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
            etag: None,
        }];
        Responder::open(settings, store).unwrap().0
    }

    fn device(id: &str) -> Attested {
        Attested {
            registration_id: id.into(),
            source: EnrollmentSource::Individual,
            kind: AttestationType::SymmetricKey,
        }
    }

    #[tokio::test]
    async fn second_register_of_the_same_device_at_once_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let responder = responder(dir.path());
        lock(&responder.in_flight).insert("dev-1".into());
        let reply = responder
            .register(&device("DEV-1"), b"", Encoding::Json)
            .await;
        assert_eq!(reply.status, 409);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["errorCode"], codes::CONFLICT);
        // The guard of the refused attempt did not release the running one.
        assert!(lock(&responder.in_flight).contains("dev-1"));
    }

    #[tokio::test]
    async fn body_naming_another_registration_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let responder = responder(dir.path());
        let reply = responder
            .register(
                &device("dev-1"),
                br#"{"registrationId":"dev-2"}"#,
                Encoding::Json,
            )
            .await;
        assert_eq!(reply.status, 400);
        let reply = responder
            .register(&device("dev-1"), br#"{"payload":[1]}"#, Encoding::Json)
            .await;
        assert_eq!(reply.status, 400);
    }

    #[tokio::test]
    async fn unknown_operation_and_another_devices_operation_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let responder = responder(dir.path());
        let reply = responder.poll(&device("dev-1"), "4.nope", Encoding::Json);
        assert_eq!(reply.status, 404);
        lock(&responder.operations).insert(
            "4.op".into(),
            Operation {
                registration_id: "dev-2".into(),
                body: b"{}".to_vec(),
                encoding: Encoding::Json,
                device_id: Some("dev-2".into()),
                expires: Instant::now() + std::time::Duration::from_secs(60),
            },
        );
        assert_eq!(
            responder
                .poll(&device("dev-1"), "4.op", Encoding::Json)
                .status,
            404
        );
        assert_eq!(
            responder
                .poll(&device("dev-2"), "4.op", Encoding::Json)
                .status,
            200
        );
    }
}
