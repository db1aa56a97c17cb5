//! Register and poll (PROTOCOL A4-A6): find the enrollment, check the device is in
//! service (the access rule), apply the re-provisioning policy, allocate a hub, make the
//! record durable, answer. Every attempt, refused or not, is an event on
//! `dps/events/registrations/{registrationId}`.
//!
//! Re-provisioning (A6) is evaluated on every register of a device already assigned:
//! - `{updateHubAssignment: true, migrateDeviceData: true}` (default): the hub is
//!   allocated again; the device's data (its twin) moves with it: substatus
//!   `deviceDataMigrated` when the hub changed.
//! - `{true, false}`: the hub is allocated again and the twin reset to the enrollment's
//!   initial twin: substatus `deviceDataReset` when the hub or the twin changed.
//! - `{false, _}`: the hub and the twin stay.
//!
//! Nothing changed: the same record and etag (idempotent).

use std::time::Instant;

use serde_json::{json, Value};

use edgedps_policies::access::{Access, RegisterAnswer};
use edgedps_policies::allocation::{self, Candidate};
use edgedps_topics::admin::{
    self, AllocationPolicy, AttestationType, EnrollmentSettings, RecordKind,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::registration::{
    codes, status, AttestationSource, ErrorBody, OperationStatus, RegisterRequest,
    RegistrationState,
};

use crate::{lock, timestamp_now, Attested, EnrollmentSource, Operation, Responder, Standing};

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
            Err(e) => {
                return self
                    .refuse(device, codes::MALFORMED_BODY, e.to_string())
                    .await
            }
        };
        if let Some(id) = &request.registration_id {
            if !id.eq_ignore_ascii_case(&device.registration_id) {
                let message = format!(
                    "body registrationId `{id}` is not the connected registration `{}`",
                    device.registration_id
                );
                return self.refuse(device, codes::MALFORMED_BODY, message).await;
            }
        }
        let key = device.registration_id.to_ascii_lowercase();
        if let Err(retry_after) = self.throttle.admit_registration(&key, Instant::now()) {
            let message = "throttled: registration rate limit".into();
            let mut reply = self.refuse(device, codes::THROTTLED, message).await;
            reply.retry_after = Some(retry_after);
            return reply;
        }
        if !lock(&self.in_flight).insert(key.clone()) {
            let message = "a registration for this device is already in progress".into();
            return self.refuse(device, codes::CONFLICT, message).await;
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
                self.event(device, status::FAILED, None, Some(code), &message)
                    .await;
                tracing::info!(code, %message, registration_id = %device.registration_id, "registration failed");
                let failed = OperationStatus {
                    operation_id: operation_id.clone(),
                    status: status::FAILED.into(),
                    registration_state: Some(RegistrationState {
                        registration_id: device.registration_id.clone(),
                        status: status::FAILED.into(),
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
            Err((code, message)) => return self.refuse(device, code, message).await,
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
                status: status::ASSIGNING.into(),
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
            let message = "throttled: more than 5 polls in 10 s".into();
            let mut reply = self.refuse_poll(device, codes::THROTTLED, message);
            reply.retry_after = Some(retry_after);
            return reply;
        }
        let found = lock(&self.operations)
            .get(operation_id)
            .filter(|op| {
                op.expires > Instant::now()
                    && op
                        .registration_id
                        .eq_ignore_ascii_case(&device.registration_id)
            })
            .map(|op| (op.body.clone(), op.encoding, op.device_id.is_some()));
        let Some((body, encoding, assigned)) = found else {
            let message = format!("operation `{operation_id}` is unknown for this device");
            return self.refuse_poll(device, codes::NOT_FOUND, message);
        };
        // The answer is the operation's; the rights are the device's now (it may have
        // been taken out of service since its register).
        let assigned_device_id = match assigned.then(|| self.access(device)) {
            Some(Ok(Access::Hub { device_id })) => Some(device_id),
            Some(Err(e)) => {
                tracing::warn!(registration_id = %device.registration_id, error = %e, "cannot read the device's standing; no hub rights");
                None
            }
            _ => None,
        };
        Reply {
            encoding: Encoding::Json,
            status: 200,
            retry_after: None,
            body,
            assigned_device_id,
        }
        .in_encoding(encoding)
    }

    /// Runs the registration; returns the 200 answer.
    async fn decide(
        &self,
        device: &Attested,
        operation_id: &str,
    ) -> Result<Decision, (u32, String)> {
        let standing = self.standing(device).map_err(internal)?;
        if let Access::OutOfService(reason) = standing.access(device) {
            let message = format!("`{}`: {}", device.registration_id, reason.reason());
            return match reason.register_answer() {
                RegisterAnswer::Disabled => {
                    let body = OperationStatus {
                        operation_id: operation_id.to_owned(),
                        status: status::DISABLED.into(),
                        registration_state: Some(RegistrationState {
                            registration_id: device.registration_id.clone(),
                            status: status::DISABLED.into(),
                            ..Default::default()
                        }),
                    };
                    self.event(device, status::DISABLED, None, None, reason.reason())
                        .await;
                    Ok(Decision {
                        body: to_json(&body),
                        device_id: None,
                    })
                }
                RegisterAnswer::NotFound => Err((codes::NOT_FOUND, message)),
                RegisterAnswer::Unauthorized => Err((codes::UNAUTHORIZED, message)),
            };
        }
        let resolved = self.resolve(device, &standing)?;
        let existing = standing
            .registration
            .as_ref()
            .filter(|r| r.status == status::ASSIGNED);
        let policy = resolved.settings.reprovision_policy.unwrap_or_default();
        let (hub, kept_twin) = match existing {
            // The hub and the device's data stay where they are.
            Some(old) if !policy.update_hub_assignment => {
                let hub = match &old.assigned_hub {
                    Some(hub) => hub.clone(),
                    None => self.allocate(&device.registration_id, &resolved.settings)?,
                };
                (hub, old.initial_twin.clone())
            }
            Some(old) => {
                let hub = self.allocate(&device.registration_id, &resolved.settings)?;
                let data = old.initial_twin.clone();
                (hub, data.filter(|_| policy.migrate_device_data))
            }
            None => (
                self.allocate(&device.registration_id, &resolved.settings)?,
                None,
            ),
        };
        let twin = kept_twin.unwrap_or_else(|| {
            resolved
                .settings
                .initial_twin
                .clone()
                .unwrap_or_else(|| json!({"tags": {}, "properties": {"desired": {}}}))
        });
        let source = Some(AttestationSource {
            enrollment_group_id: resolved.group_id.clone(),
            // The leaf as the record describes it; it parsed at CONNECT.
            certificate_info: device
                .certificate
                .as_ref()
                .and_then(|c| c.chain.first())
                .and_then(|leaf| edgedps_policies::x509::describe(leaf).ok()),
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
            status: status::ASSIGNED.into(),
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
        let unchanged = existing.is_some_and(|old| {
            old.assigned_hub == state.assigned_hub
                && old.device_id == state.device_id
                && old.initial_twin == state.initial_twin
                && old.x509 == state.x509
                && old.symmetric_key == state.symmetric_key
        });
        if let (true, Some(old)) = (unchanged, existing) {
            // DPS: re-registering with no change returns the same assignment and etag.
            state = old.clone();
        } else {
            if let Some(old) = existing {
                state.created_date_time_utc = old.created_date_time_utc.clone();
                state.substatus = Some(substatus(old, &state, policy.migrate_device_data));
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
        // The rights the answer grants are the access rule's, with the new record.
        let mut facts = standing.facts(device);
        facts.assigned_device_id = Some(&resolved.device_id);
        let device_id = match edgedps_policies::access::decide(&facts) {
            Access::Hub { device_id } => Some(device_id),
            _ => None,
        };
        self.event(device, status::ASSIGNED, Some(&hub), None, "")
            .await;
        let body = OperationStatus {
            operation_id: operation_id.to_owned(),
            status: status::ASSIGNED.into(),
            registration_state: Some(state),
        };
        Ok(Decision {
            body: to_json(&body),
            device_id,
        })
    }

    /// The enrollment a device in service follows now.
    fn resolve(&self, device: &Attested, standing: &Standing) -> Result<Resolved, (u32, String)> {
        let gone = || {
            (
                codes::NOT_FOUND,
                format!("no enrollment for `{}`", device.registration_id),
            )
        };
        match &device.source {
            EnrollmentSource::Individual => {
                let enrollment = standing.individual.as_ref().ok_or_else(gone)?;
                Ok(Resolved {
                    group_id: None,
                    device_id: enrollment
                        .device_id
                        .clone()
                        .unwrap_or_else(|| device.registration_id.clone()),
                    settings: enrollment.settings.clone(),
                })
            }
            EnrollmentSource::Group(group_id) => Ok(Resolved {
                group_id: Some(group_id.clone()),
                device_id: device.registration_id.clone(),
                settings: self.group_settings(group_id).ok_or_else(gone)?,
            }),
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

    /// An error answer to a register, published as a `refused` event first.
    async fn refuse(&self, device: &Attested, code: u32, message: String) -> Reply {
        let event = refusal_event(device, "register", code, &message);
        self.publish(
            admin::registration_event_topic(&device.registration_id),
            to_json(&event),
            false,
        )
        .await;
        self.error(code, message)
    }

    /// An error answer to a poll, published as a `refused` event first.
    fn refuse_poll(&self, device: &Attested, code: u32, message: String) -> Reply {
        let event = refusal_event(device, "poll", code, &message);
        self.try_publish(
            admin::registration_event_topic(&device.registration_id),
            to_json(&event),
        );
        self.error(code, message)
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

    /// Operation ids in the shape Azure uses: `4.{16 hex}.{uuid-like}`.
    fn operation_id(&self) -> String {
        format!("4.{}", self.random_token(18))
    }
}

/// The substatus of a re-registration that changed something (PROTOCOL A6).
fn substatus(old: &RegistrationState, new: &RegistrationState, migrate: bool) -> String {
    if old.assigned_hub != new.assigned_hub {
        if migrate {
            "deviceDataMigrated".into()
        } else {
            "deviceDataReset".into()
        }
    } else if !migrate && old.initial_twin != new.initial_twin {
        "deviceDataReset".into()
    } else {
        old.substatus
            .clone()
            .unwrap_or_else(|| "initialAssignment".into())
    }
}

/// The event of a refused register or poll: what was asked, the code, the reason.
fn refusal_event(device: &Attested, request: &str, code: u32, message: &str) -> Value {
    let mut event = json!({
        "registrationId": device.registration_id,
        "outcome": "refused",
        "request": request,
        "errorCode": code,
        "message": message,
        "timestampUtc": timestamp_now(),
    });
    if let EnrollmentSource::Group(group) = &device.source {
        event["enrollmentGroupId"] = json!(group);
    }
    event
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
            certificate: None,
        }
    }

    #[tokio::test]
    async fn second_register_of_the_same_device_at_once_is_a_conflict_and_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (responder, mut outbound) = Responder::open(Settings::new("scope"), store).unwrap();
        lock(&responder.in_flight).insert("dev-1".into());
        let reply = responder
            .register(&device("DEV-1"), b"", Encoding::Json)
            .await;
        assert_eq!(reply.status, 409);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["errorCode"], codes::CONFLICT);
        // The guard of the refused attempt did not release the running one.
        assert!(lock(&responder.in_flight).contains("dev-1"));
        match outbound.try_recv() {
            Ok(crate::Outbound::Publish { topic, payload, .. }) => {
                assert_eq!(topic, "dps/events/registrations/DEV-1");
                let event: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(event["outcome"], "refused", "{event}");
                assert_eq!(event["errorCode"], codes::CONFLICT, "{event}");
                assert_eq!(event["request"], "register", "{event}");
            }
            other => panic!("no event for the refused register: {other:?}"),
        }
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
