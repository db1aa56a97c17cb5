//! Register and poll (PROTOCOL A4-A6): check the device is in service (the access
//! rule), find the enrollment it follows, let `edgedps_policies::reprovision` and
//! `allocation` decide its record, make the record durable, answer. Every attempt,
//! refused or not, is an event on `dps/events/registrations/{registrationId}`.
//!
//! Answers are built as typed values and encoded once, in the register's encoding
//! (JSON or CBOR); a 202 operation keeps its answer typed until it is polled.

use std::time::Instant;

use edgedps_policies::access::{self, Access, RegisterAnswer};
use std::sync::Arc;

use edgedps_policies::allocation::{self, AllocationError};
use edgedps_policies::reprovision::{self, Assignment, Registering};
use edgedps_topics::admin::{
    AllocationPolicy, AttestationType, EnrollmentSettings, GroupLimits, RecordKind,
};
use edgedps_topics::allocation::AllocationRecord;
use edgedps_topics::encoding::Encoding;
use edgedps_topics::events::{DeviceRequestKind, RegistrationEvent, RegistrationOutcome};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{
    ErrorBody, OperationStatus, RegisterRequest, RegistrationState, RegistrationStatus,
};

use crate::limits::GroupRefusal;
use crate::standing::Standing;
use crate::{
    lock, timestamp_now, Attested, EnrollmentSource, Error, Operation, Publication, Responder,
};

/// The answer to one device request: a status for the response topic, the encoded body,
/// and what to publish because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u32>,
    pub body: Vec<u8>,
    /// The body's encoding (for the MQTT 5 content type).
    pub encoding: Encoding,
    /// Set when the answer is `assigned`: the device may now use its hub topics.
    pub assigned_device_id: Option<String>,
    /// Records and events, in order.
    pub publish: Vec<Publication>,
}

/// The 200 answer of a registration and, when assigned, the device id.
struct Decision {
    answer: OperationStatus,
    device_id: Option<String>,
}

impl Decision {
    /// A registration completed as `failed` (a 200, as DPS): its code and reason in the
    /// registration state, no hub rights.
    fn failed(
        device: &Attested,
        operation_id: &str,
        code: u32,
        message: String,
        at: String,
    ) -> Decision {
        let mut state =
            RegistrationState::new(device.registration_id.clone(), RegistrationStatus::Failed);
        state.last_updated_date_time_utc = Some(at);
        state.error_code = Some(code);
        state.error_message = Some(message);
        Decision {
            answer: OperationStatus {
                operation_id: operation_id.to_owned(),
                status: RegistrationStatus::Failed,
                registration_state: Some(state),
            },
            device_id: None,
        }
    }
}

/// The enrollment a registration follows, whichever kind it is.
pub(crate) struct Resolved {
    pub group_id: Option<String>,
    /// The group's limits, and whether its id pattern admits the device.
    pub group_limits: Option<GroupLimits>,
    pub id_admitted: Result<(), String>,
    pub device_id: String,
    pub settings: EnrollmentSettings,
}

/// A register a custom allocator decides, handed to its own task.
struct Custom {
    standing: Standing,
    request: RegisterRequest,
    operation_id: String,
    encoding: Encoding,
    guard: InFlight,
}

/// Removes a registration id from the in-flight set however the register ends (in
/// the background too, for a custom allocation answered late).
struct InFlight {
    responder: Arc<Responder>,
    key: RegistrationId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.responder.in_flight).remove(&self.key);
    }
}

impl Responder {
    /// Handles `PUT iotdps-register` from an attested device in `encoding` (see
    /// [`Encoding::detect`]); the answer is in the same encoding. `carried` is what its
    /// CONNECT read about it, if the session still holds it.
    pub async fn register(
        self: &Arc<Self>,
        device: &Attested,
        carried: Option<Standing>,
        body: &[u8],
        encoding: Encoding,
    ) -> Reply {
        let started = Instant::now();
        let mut publish = Vec::with_capacity(2);
        let reply = match self
            .register_inner(device, carried, body, encoding, &mut publish)
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                publish.push(refusal_event(device, DeviceRequestKind::Register, &error));
                self.error_reply(&error, encoding)
            }
        };
        self.register_latency.record(started.elapsed());
        Reply { publish, ..reply }
    }

    async fn register_inner(
        self: &Arc<Self>,
        device: &Attested,
        carried: Option<Standing>,
        body: &[u8],
        encoding: Encoding,
        publish: &mut Vec<Publication>,
    ) -> Result<Reply, Error> {
        let request = RegisterRequest::parse(body, encoding)
            .map_err(|e| Error::MalformedBody(e.to_string()))?;
        if let Some(id) = &request.registration_id {
            if !device.registration_id.is(id) {
                return Err(Error::MalformedBody(format!(
                    "body registrationId `{id}` is not the connected registration `{}`",
                    device.registration_id
                )));
            }
        }
        let key = &device.registration_id;
        self.throttle
            .admit_registration(key, Instant::now())
            .map_err(|retry_after| Error::Throttled {
                what: "registration rate limit",
                retry_after,
            })?;
        if !device.proven {
            // A TPM device without a token: its challenge, and nothing else.
            let standing = self.standing(device, carried)?;
            let challenge =
                self.tpm_challenge(device, standing.individual.as_ref(), request.tpm.as_ref())?;
            publish.push(self.challenged_event(device));
            return Ok(Reply {
                status: 401,
                retry_after: None,
                body: encoding.encode(&challenge),
                encoding,
                assigned_device_id: None,
                publish: Vec::new(),
            });
        }
        if !lock(&self.in_flight).insert(key.clone()) {
            return Err(Error::InProgress);
        }
        let guard = InFlight {
            responder: Arc::clone(self),
            key: key.clone(),
        };
        let operation_id = self.operation_id();
        let standing = self.standing(device, carried)?;
        if self.allocates_by_custom(device, &standing) {
            let custom = Custom {
                standing,
                request,
                operation_id,
                encoding,
                guard,
            };
            return Box::pin(self.register_custom(device, custom, publish)).await;
        }
        let decision = self
            .decide(device, standing, &request, &operation_id, publish)
            .await?;
        drop(guard);
        Ok(self.answer(device, operation_id, decision, encoding))
    }

    /// The answer to a decided register: `200` with the decision, or `202` with an
    /// operation to poll (`always_accept_then_poll`).
    fn answer(
        &self,
        device: &Attested,
        operation_id: String,
        decision: Decision,
        encoding: Encoding,
    ) -> Reply {
        if self.settings.always_accept_then_poll {
            self.keep_operation(device, &operation_id, Some(decision), encoding);
            return self.accepted(operation_id, encoding);
        }
        Reply {
            status: 200,
            retry_after: None,
            body: encoding.encode(&decision.answer),
            encoding,
            assigned_device_id: decision.device_id,
            publish: Vec::new(),
        }
    }

    /// `202 assigning`: the device polls `operation_id`.
    fn accepted(&self, operation_id: String, encoding: Encoding) -> Reply {
        let accepted = OperationStatus {
            operation_id,
            status: RegistrationStatus::Assigning,
            registration_state: None,
        };
        Reply {
            status: 202,
            retry_after: Some(self.settings.retry_after_seconds),
            body: encoding.encode(&accepted),
            encoding,
            assigned_device_id: None,
            publish: Vec::new(),
        }
    }

    /// Keeps an operation for polls: decided, or (`None`) still being decided.
    fn keep_operation(
        &self,
        device: &Attested,
        operation_id: &str,
        decision: Option<Decision>,
        encoding: Encoding,
    ) {
        let expires = Instant::now() + self.settings.operation_ttl;
        let mut operations = lock(&self.operations);
        let now = Instant::now();
        operations.retain(|_, op| op.expires > now);
        let (answer, device_id) = match decision {
            Some(decision) => (Some(decision.answer), decision.device_id),
            None => (None, None),
        };
        operations.insert(
            operation_id.to_owned(),
            Operation {
                registration_id: device.registration_id.clone(),
                answer,
                encoding,
                device_id,
                expires,
            },
        );
    }

    /// Whether this register is decided by a custom allocator: the device is in service
    /// and follows an enrollment whose policy is `custom`. Asked on every register, so
    /// it peeks at the policy and copies nothing.
    fn allocates_by_custom(&self, device: &Attested, standing: &Standing) -> bool {
        let policy = match &device.source {
            EnrollmentSource::Individual => standing
                .individual
                .as_ref()
                .and_then(|e| e.settings.allocation_policy),
            EnrollmentSource::Group(group) => crate::read(&self.groups)
                .get(group)
                .and_then(|e| e.group.settings.allocation_policy),
        };
        policy == Some(AllocationPolicy::Custom)
            && !matches!(standing.access(device), Access::OutOfService(_))
    }

    /// A register decided by a custom allocator: answered in one round trip when the
    /// allocator answers within `custom_allocation_wait`, otherwise `202 assigning` at
    /// once and the registration completes in the background (its record and event
    /// published through [`crate::Outside`]), for the device's polls.
    async fn register_custom(
        self: &Arc<Self>,
        device: &Attested,
        custom: Custom,
        publish: &mut Vec<Publication>,
    ) -> Result<Reply, Error> {
        let Custom {
            standing,
            request,
            operation_id,
            encoding,
            guard,
        } = custom;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        let owned = device.clone();
        let op = operation_id.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut publish = Vec::new();
            let decided = this
                .decide(&owned, standing, &request, &op, &mut publish)
                .await;
            if let Err((decision, publish)) = tx.send((decided, publish)) {
                this.completed_late(&owned, &op, decision, encoding, publish);
            }
        });
        let wait = self.settings.custom_allocation_wait;
        let done = match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(_)) => return Err(Error::Internal("the registration's task ended".into())),
            Err(_) => {
                // Kept before the channel closes: a late answer always finds it.
                self.keep_operation(device, &operation_id, None, encoding);
                rx.close();
                rx.try_recv().ok()
            }
        };
        match done {
            Some((decision, published)) => {
                // Its records and events go out with the answer, as any register's.
                publish.extend(published);
                let decision = decision?;
                Ok(self.answer(device, operation_id, decision, encoding))
            }
            None => Ok(self.accepted(operation_id, encoding)),
        }
    }

    /// A custom allocation answered after its register was answered `202`: the
    /// operation gets its answer and what it published goes out.
    fn completed_late(
        &self,
        device: &Attested,
        operation_id: &str,
        decision: Result<Decision, Error>,
        encoding: Encoding,
        mut publish: Vec<Publication>,
    ) {
        let decision = decision.unwrap_or_else(|error| {
            publish.push(refusal_event(device, DeviceRequestKind::Register, &error));
            let code = error.dps_code();
            Decision::failed(
                device,
                operation_id,
                code,
                error.to_string(),
                timestamp_now(),
            )
        });
        self.keep_operation(device, operation_id, Some(decision), encoding);
        match self.outside.get() {
            Some(outside) => outside.publish(publish),
            None => {
                tracing::warn!(registration_id = %device.registration_id, "a late registration's record and event have no publisher")
            }
        }
    }

    /// An allocation that cannot be made completes the registration as `failed` (a
    /// 200, as DPS), its reason in the registration state and the event.
    fn allocation_failed(
        &self,
        device: &Attested,
        policy: AllocationPolicy,
        failure: AllocationError,
        operation_id: &str,
        publish: &mut Vec<Publication>,
    ) -> Decision {
        let error = Error::Allocation(failure);
        let code = error.dps_code();
        let message = error.to_string();
        let mut event = event_of(
            device,
            RegistrationOutcome::Failed,
            None,
            Some(code),
            Some(message.clone()),
        );
        event.allocation = Some(AllocationRecord {
            policy,
            hub: None,
            reason: message.clone(),
        });
        publish.push(Publication::event(event.topic(), &event));
        tracing::info!(code, %message, registration_id = %device.registration_id, "registration failed");
        Decision::failed(device, operation_id, code, message, timestamp_now())
    }

    /// Handles `GET iotdps-get-operationstatus`. The answer is CBOR when `encoding`
    /// asks for it or when the register was CBOR (a device that reconnects to poll, on
    /// MQTT 3.1.1, has no other way to say so).
    pub fn poll(&self, device: &Attested, operation_id: &str, encoding: Encoding) -> Reply {
        match self.poll_inner(device, operation_id, encoding) {
            Ok(reply) => reply,
            Err(error) => {
                let event = refusal_event(device, DeviceRequestKind::Poll, &error);
                Reply {
                    publish: vec![event],
                    ..self.error_reply(&error, encoding)
                }
            }
        }
    }

    fn poll_inner(
        &self,
        device: &Attested,
        operation_id: &str,
        encoding: Encoding,
    ) -> Result<Reply, Error> {
        if !device.proven {
            return Err(Error::Attestation(
                edgedps_policies::attestation::AttestationError::NotAuthorized(
                    "a TPM device answers its challenge before it polls".into(),
                ),
            ));
        }
        self.throttle
            .admit_poll(&device.registration_id, Instant::now())
            .map_err(|retry_after| Error::Throttled {
                what: "more than 5 polls in 10 s",
                retry_after,
            })?;
        let found = lock(&self.operations)
            .get(operation_id)
            .filter(|op| {
                op.expires > Instant::now() && op.registration_id == device.registration_id
            })
            .map(|op| (op.answer.clone(), op.encoding, op.device_id.is_some()));
        let Some((answer, registered_in, assigned)) = found else {
            return Err(Error::UnknownOperation(operation_id.to_owned()));
        };
        let encoding = match encoding {
            Encoding::Cbor => Encoding::Cbor,
            Encoding::Json => registered_in,
        };
        // A custom allocator has not answered yet.
        let Some(answer) = answer else {
            return Ok(self.accepted(operation_id.to_owned(), encoding));
        };
        // The answer is the operation's; the rights are the device's now (it may have
        // been taken out of service since its register).
        let assigned_device_id = match assigned.then(|| self.standing(device, None)) {
            Some(Ok(standing)) => match standing.access(device) {
                Access::Hub { device_id } => Some(device_id),
                _ => None,
            },
            Some(Err(e)) => {
                tracing::warn!(registration_id = %device.registration_id, error = %e, "cannot read the device's standing; no hub rights");
                None
            }
            None => None,
        };
        Ok(Reply {
            status: 200,
            retry_after: None,
            body: encoding.encode(&answer),
            encoding,
            assigned_device_id,
            publish: Vec::new(),
        })
    }

    /// The device's registration as recorded (the HTTPS API's status lookup, `POST
    /// /{idScope}/registrations/{registrationId}`): 200 with the registration state, 404
    /// when it has none. Throttled as polls are.
    pub fn status_lookup(&self, device: &Attested) -> Reply {
        let looked_up = (|| {
            if !device.proven {
                return Err(Error::Attestation(
                    edgedps_policies::attestation::AttestationError::NotAuthorized(
                        "a TPM device answers its challenge before it looks up its registration"
                            .into(),
                    ),
                ));
            }
            self.throttle
                .admit_poll(&device.registration_id, Instant::now())
                .map_err(|retry_after| Error::Throttled {
                    what: "more than 5 polls in 10 s",
                    retry_after,
                })?;
            let mut state = self
                .store
                .registration(&device.registration_id)?
                .ok_or_else(|| {
                    Error::NotFound(format!("`{}` has not registered", device.registration_id))
                })?;
            // What an answer carries, never what only the record does.
            state.hub_registration = None;
            state.allocation = None;
            Ok(state)
        })();
        match looked_up {
            Ok(state) => Reply {
                status: 200,
                retry_after: None,
                body: Encoding::Json.encode(&state),
                encoding: Encoding::Json,
                assigned_device_id: None,
                publish: Vec::new(),
            },
            Err(error) => {
                let event = refusal_event(device, DeviceRequestKind::Poll, &error);
                Reply {
                    publish: vec![event],
                    ..self.error_reply(&error, Encoding::Json)
                }
            }
        }
    }

    /// Runs the registration; returns the 200 answer.
    async fn decide(
        &self,
        device: &Attested,
        standing: Standing,
        request: &RegisterRequest,
        operation_id: &str,
        publish: &mut Vec<Publication>,
    ) -> Result<Decision, Error> {
        let csr = request.csr.as_deref();
        if let Access::OutOfService(reason) = standing.access(device) {
            return match reason.register_answer() {
                RegisterAnswer::Disabled => {
                    let state = RegistrationState::new(
                        device.registration_id.clone(),
                        RegistrationStatus::Disabled,
                    );
                    publish.push(registration_event(
                        device,
                        RegistrationOutcome::Disabled,
                        None,
                        None,
                        Some(reason.reason().to_owned()),
                    ));
                    Ok(Decision {
                        answer: OperationStatus {
                            operation_id: operation_id.to_owned(),
                            status: RegistrationStatus::Disabled,
                            registration_state: Some(state),
                        },
                        device_id: None,
                    })
                }
                RegisterAnswer::NotFound | RegisterAnswer::Unauthorized => {
                    Err(Error::OutOfService {
                        registration_id: device.registration_id.to_string(),
                        reason,
                    })
                }
            };
        }
        let resolved = self.resolve(device, &standing)?;
        // A group's limits: its id pattern (a group edited since the CONNECT), its rate
        // and its size. A device already assigned through it never counts twice.
        if let Some(id) = &resolved.group_id {
            resolved
                .id_admitted
                .clone()
                .map_err(|reason| Error::Group(GroupRefusal::IdPattern(reason)))?;
            if let Some(limits) = &resolved.group_limits {
                let member = standing.registration.as_ref().is_some_and(|r| {
                    r.is_assigned() && r.enrollment_group_id() == Some(id.as_str())
                });
                self.admit_to_group(id, limits, &device.registration_id, member)?;
            }
        }
        // A certificate request is checked before anything is written: a refused one
        // leaves the record as it was.
        let issuance = csr
            .map(|csr| self.issuance_for(device, &resolved.settings, csr))
            .transpose()?;
        let policy = resolved
            .settings
            .allocation_policy
            .unwrap_or(self.settings.allocation_policy);
        let reprovision_policy = resolved.settings.reprovision_policy.unwrap_or_default();
        let existing = standing.registration.as_ref();
        // A custom allocator is asked only when the policy moves the device.
        let custom = match (
            policy,
            &resolved.settings.custom_allocation_definition,
            reprovision::allocates(existing, reprovision_policy),
        ) {
            (AllocationPolicy::Custom, Some(definition), true) => {
                // Boxed, as the other rare paths below: inline, their futures (an HTTP
                // client's among them) would make every register's future as large.
                let asked = Box::pin(self.custom_allocate(
                    device,
                    &standing,
                    definition,
                    &resolved.settings.iot_hubs,
                    request.payload.as_ref(),
                ))
                .await;
                match asked {
                    Ok(outcome) => Some(outcome),
                    Err(failure) => {
                        return Ok(self.allocation_failed(
                            device,
                            policy,
                            failure,
                            operation_id,
                            publish,
                        ))
                    }
                }
            }
            _ => None,
        };
        let now = timestamp_now();
        let registering = Registering {
            registration_id: &device.registration_id,
            device_id: &resolved.device_id,
            enrollment_group_id: resolved.group_id.as_deref(),
            attestation: device.kind,
            // The leaf as the record describes it; it parsed at CONNECT.
            certificate_info: device
                .certificate
                .as_ref()
                .and_then(|c| c.chain.first())
                .and_then(|leaf| edgedps_policies::x509::describe(leaf).ok()),
            policy: reprovision_policy,
            // A custom allocator's twin replaces the enrollment's.
            initial_twin: custom
                .as_ref()
                .and_then(|c| c.initial_twin.as_ref())
                .or(resolved.settings.initial_twin.as_ref()),
            now: &now,
        };
        let mut allocated: Option<AllocationRecord> = None;
        let assignment = reprovision::reprovision(existing, registering, || match &custom {
            Some(outcome) => {
                allocated = Some(outcome.record.clone());
                Ok(outcome.hub.clone())
            }
            None => {
                let (hub, record) =
                    self.allocate(&device.registration_id, policy, &resolved.settings)?;
                allocated = Some(record);
                Ok(hub)
            }
        });
        let assignment = match assignment {
            Ok(assignment) => assignment,
            Err(failure) => {
                return Ok(self.allocation_failed(device, policy, failure, operation_id, publish))
            }
        };
        let (mut state, mut changed) = match assignment {
            Assignment::Unchanged(state) => (state, false),
            Assignment::Changed(mut state) => {
                // Certificates issued before stay on the record.
                if let Some(old) = &standing.registration {
                    state.issued_certificates = old.issued_certificates.clone();
                }
                state.allocation = allocated.or_else(|| {
                    // The policy kept the device where it was.
                    Some(AllocationRecord {
                        policy,
                        hub: state.assigned_hub.clone(),
                        reason: "kept: reprovisionPolicy.updateHubAssignment is false".into(),
                    })
                });
                (state, true)
            }
        };
        // The allocator's payload is what the device receives; a new one is a change.
        if let Some(payload) = custom.as_ref().and_then(|c| c.payload.clone()) {
            if state.payload.as_ref() != Some(&payload) {
                state.payload = Some(payload);
                state.last_updated_date_time_utc = Some(now.clone());
                if let Some(outcome) = &custom {
                    state.allocation = Some(outcome.record.clone());
                }
                changed = true;
            }
        }
        let mut issued_now = None;
        if let Some((checked, ca)) = issuance {
            let (record, chain) = self.issue(&checked, &ca, &resolved.device_id)?;
            state.issued_certificates.push(record.clone());
            state.last_updated_date_time_utc = Some(now.clone());
            issued_now = Some((record, chain));
            changed = true;
        }
        // A TPM device's hub key: given once, kept in the store, in this flush.
        let tpm = match device.kind {
            AttestationType::Tpm => {
                let individual = standing.individual.as_ref();
                let (answer, created) =
                    self.tpm_authentication(device, individual, request.tpm.as_ref())?;
                changed |= created;
                Some(answer)
            }
            _ => None,
        };
        // The assigned cloud hub learns of the device through its outbox, in this flush.
        let hub_before = state.hub_registration.clone();
        let hub_wait = self.register_at_hub(device, &standing, &mut state, changed)?;
        changed |= state.hub_registration != hub_before;
        let state = match changed {
            false => state,
            true => {
                let mut state = state;
                state.etag = Some(self.new_etag());
                self.store.put_registration(&state)?;
                // The local hub's twin, made or reset with the record, in its flush.
                let reset = state.substatus
                    == Some(edgedps_topics::registration::Substatus::DeviceDataReset);
                let twin = self.twin_registered(&state, reset)?;
                if let Some(device_id) = state.device_id.as_deref() {
                    if !device.registration_id.is(device_id) {
                        self.store
                            .hub()
                            .put_device_registration(device_id, &device.registration_id)?;
                    }
                }
                self.durable().await?;
                publish.push(Publication::record(
                    RecordKind::Registration.record_topic(device.registration_id.as_str()),
                    &state,
                ));
                publish.extend(twin);
                state
            }
        };
        if let Some(wait) = hub_wait {
            if let Err(reason) = Box::pin(self.wait_for_hub(wait)).await {
                return Box::pin(self.hub_refused(device, state, reason, operation_id, publish))
                    .await;
            }
            // The hub's worker published the record as `done` meanwhile: the record this
            // register publishes is that one, not the `pending` one before it.
            if let Some(now) = self.store.registration(&device.registration_id)? {
                let topic = RecordKind::Registration.record_topic(device.registration_id.as_str());
                publish.retain(|p| p.topic != topic);
                publish.push(Publication::record(topic, &now));
            }
        }
        let (issued_certificate, chain) = issued_now.unzip();
        // The rights the answer grants are the access rule's, with the new record.
        let mut facts = standing.facts(device);
        facts.assigned_device_id = Some(&resolved.device_id);
        let device_id = match access::decide(&facts) {
            Access::Hub { device_id } => Some(device_id),
            _ => None,
        };
        let mut event = event_of(
            device,
            RegistrationOutcome::Assigned,
            state.assigned_hub.clone(),
            None,
            None,
        );
        event.issued_certificate = issued_certificate;
        event.hub_registration = state.hub_registration.clone();
        event.allocation = state.allocation.clone();
        publish.push(Publication::event(event.topic(), &event));
        // The chain goes in the answer only, never in the stored record; the hub's
        // registration on the record only.
        let mut answered = state;
        answered.issued_certificate_chain = chain;
        answered.hub_registration = None;
        answered.allocation = None;
        answered.tpm = tpm;
        Ok(Decision {
            answer: OperationStatus {
                operation_id: operation_id.to_owned(),
                status: RegistrationStatus::Assigned,
                registration_state: Some(answered),
            },
            device_id,
        })
    }

    /// A `before_answer` hub did not take the device: the record is `failed` with the
    /// hub's reason (the device registers again to try again), and so is the answer.
    async fn hub_refused(
        &self,
        device: &Attested,
        state: RegistrationState,
        reason: String,
        operation_id: &str,
        publish: &mut Vec<Publication>,
    ) -> Result<Decision, Error> {
        let hub = state.assigned_hub.clone().unwrap_or_default();
        let code = edgedps_topics::registration::codes::INTERNAL;
        let message = format!("IoT Hub `{hub}` did not register the device: {reason}");
        tracing::warn!(registration_id = %device.registration_id, %hub, %reason, "registration failed at the hub");
        let mut failed = None;
        let etag = self.new_etag();
        self.store
            .update_registration(&device.registration_id, &mut |mut record| {
                record.status = RegistrationStatus::Failed;
                record.error_code = Some(code);
                record.error_message = Some(message.clone());
                record.last_updated_date_time_utc = Some(timestamp_now());
                record.etag = Some(etag.clone());
                failed = Some(record.clone());
                Some(record)
            })?;
        self.durable().await?;
        let record = failed.unwrap_or(state);
        publish.push(Publication::record(
            RecordKind::Registration.record_topic(device.registration_id.as_str()),
            &record,
        ));
        let mut event = event_of(
            device,
            RegistrationOutcome::Failed,
            Some(hub),
            Some(code),
            Some(message.clone()),
        );
        event.hub_registration = record.hub_registration.clone();
        publish.push(Publication::event(event.topic(), &event));
        let at = record
            .last_updated_date_time_utc
            .unwrap_or_else(timestamp_now);
        Ok(Decision::failed(device, operation_id, code, message, at))
    }

    /// The enrollment a device in service follows now.
    pub(crate) fn resolve(
        &self,
        device: &Attested,
        standing: &Standing,
    ) -> Result<Resolved, Error> {
        let gone = || Error::NoEnrollment(device.registration_id.to_string());
        match &device.source {
            EnrollmentSource::Individual => {
                let enrollment = standing.individual.as_ref().ok_or_else(gone)?;
                Ok(Resolved {
                    group_id: None,
                    group_limits: None,
                    id_admitted: Ok(()),
                    device_id: enrollment
                        .device_id
                        .clone()
                        .unwrap_or_else(|| device.registration_id.to_string()),
                    settings: enrollment.settings.clone(),
                })
            }
            EnrollmentSource::Group(group_id) => {
                let groups = crate::read(&self.groups);
                let entry = groups.get(group_id).ok_or_else(gone)?;
                Ok(Resolved {
                    group_id: Some(group_id.clone()),
                    group_limits: entry.group.limits.clone(),
                    id_admitted: entry.admits_id(device.registration_id.as_str()),
                    device_id: device.registration_id.to_string(),
                    settings: entry.group.settings.clone(),
                })
            }
        }
    }

    /// Picks a hub by `policy` (the enrollment's, or the service default), with the
    /// rule that chose it.
    fn allocate(
        &self,
        registration_id: &RegistrationId,
        policy: AllocationPolicy,
        settings: &EnrollmentSettings,
    ) -> Result<(String, AllocationRecord), AllocationError> {
        // Only geoLatency reads the latencies: other registrations skip copying them.
        let linked = match policy {
            AllocationPolicy::GeoLatency => {
                self.latencies.want();
                self.linked_hubs_measured()
            }
            _ => self.linked_hubs(),
        };
        let chosen = allocation::allocate(policy, registration_id, &settings.iot_hubs, &linked)?;
        let hub = chosen.hub.to_owned();
        let record = AllocationRecord {
            policy,
            hub: Some(hub.clone()),
            reason: chosen.reason,
        };
        Ok((hub, record))
    }

    /// The answer to a request that failed with `error`, in `encoding`.
    /// The error answer to a device request refused with `error`.
    pub fn error_reply(&self, error: &Error, encoding: Encoding) -> Reply {
        let code = error.dps_code();
        let message = error.to_string();
        if code >= edgedps_topics::registration::codes::INTERNAL {
            tracing::error!(code, %message, "registration failed");
        } else if matches!(error, Error::Throttled { .. }) {
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
            status: edgedps_topics::registration::codes::status_of(code),
            retry_after: error.retry_after(self.settings.retry_after_seconds),
            body: encoding.encode(&body),
            encoding,
            assigned_device_id: None,
            publish: Vec::new(),
        }
    }

    /// Operation ids in the shape Azure uses: `4.{16 hex}.{uuid-like}`.
    fn operation_id(&self) -> String {
        format!("4.{}", self.random_token(18))
    }
}

pub(crate) fn registration_event(
    device: &Attested,
    outcome: RegistrationOutcome,
    assigned_hub: Option<String>,
    error_code: Option<u32>,
    message: Option<String>,
) -> Publication {
    let event = event_of(device, outcome, assigned_hub, error_code, message);
    Publication::event(event.topic(), &event)
}

fn event_of(
    device: &Attested,
    outcome: RegistrationOutcome,
    assigned_hub: Option<String>,
    error_code: Option<u32>,
    message: Option<String>,
) -> RegistrationEvent {
    RegistrationEvent {
        registration_id: device.registration_id.to_string(),
        outcome,
        request: None,
        enrollment_group_id: device.source.group().map(str::to_owned),
        assigned_hub,
        error_code,
        message: message.filter(|m| !m.is_empty()),
        issued_certificate: None,
        hub_registration: None,
        allocation: None,
        timestamp_utc: timestamp_now(),
    }
}

/// The event of a refused register or poll: what was asked, the code, the reason.
fn refusal_event(device: &Attested, request: DeviceRequestKind, error: &Error) -> Publication {
    let event = RegistrationEvent {
        registration_id: device.registration_id.to_string(),
        outcome: RegistrationOutcome::Refused,
        request: Some(request),
        enrollment_group_id: device.source.group().map(str::to_owned),
        assigned_hub: None,
        error_code: Some(error.dps_code()),
        message: Some(error.to_string()),
        issued_certificate: None,
        hub_registration: None,
        allocation: None,
        timestamp_utc: timestamp_now(),
    };
    Publication::event(event.topic(), &event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Settings, SledStore};
    use edgedps_topics::admin::AttestationType;
    use edgedps_topics::registration::codes;
    use std::sync::Arc;

    fn responder(dir: &std::path::Path) -> Arc<Responder> {
        let store = SledStore::open(dir).unwrap();
        let mut settings = Settings::new("scope");
        settings.hubs = vec![edgedps_topics::admin::LinkedHub::named("hub-a.example.net")];
        Arc::new(Responder::open(settings, Arc::new(store)).unwrap())
    }

    fn device(id: &str) -> Attested {
        Attested {
            registration_id: id.into(),
            source: EnrollmentSource::Individual,
            kind: AttestationType::SymmetricKey,
            certificate: None,
            token_expires: None,
            proven: true,
        }
    }

    #[tokio::test]
    async fn second_register_of_the_same_device_at_once_is_a_conflict_and_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let responder = Arc::new(Responder::open(Settings::new("scope"), Arc::new(store)).unwrap());
        lock(&responder.in_flight).insert("dev-1".into());
        let reply = responder
            .register(&device("DEV-1"), None, b"", Encoding::Json)
            .await;
        assert_eq!(reply.status, 409);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["errorCode"], codes::CONFLICT);
        // The guard of the refused attempt did not release the running one.
        assert!(lock(&responder.in_flight).contains(&"dev-1".into()));
        match reply.publish.first() {
            Some(Publication { topic, payload, .. }) => {
                assert_eq!(topic, "dps/events/registrations/DEV-1");
                let event: serde_json::Value = serde_json::from_slice(payload).unwrap();
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
                None,
                br#"{"registrationId":"dev-2"}"#,
                Encoding::Json,
            )
            .await;
        assert_eq!(reply.status, 400);
        let reply = responder
            .register(
                &device("dev-1"),
                None,
                br#"{"payload":[1]}"#,
                Encoding::Json,
            )
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
                answer: Some(OperationStatus {
                    operation_id: "4.op".into(),
                    status: RegistrationStatus::Assigned,
                    registration_state: None,
                }),
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
