//! Operator writes on the retained `dps/` records (PROTOCOL B).
//!
//! Every write is validated before it touches the store, checked against the stored
//! etag when it carries one, made durable, republished as the retained record, and
//! answered on `dps/admin/results/{kind}/{id}`. The retained copy never carries
//! symmetric keys; a later write that omits the keys keeps the stored ones.
//!
//! A write that takes devices out of service (PROTOCOL B, retirement) then cuts their
//! live sessions, and its result and audit event say how many. Deleting an enrollment
//! or a group marks the registrations it attested `deregistered`. A revocation list is
//! accepted only when its signature verifies against a CA edgedps trusts.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use edgedps_policies::revocation::{self, RevocationList};
use edgedps_policies::x509;
use edgedps_topics::admin::{
    admin_event_topic, codes, AdminEvent, AdminOperation, AdminOutcome, AdminResult,
    AllocationPolicy, Attestation, AttestationType, CertificatePair, Effects, Enrollment,
    EnrollmentGroup, EnrollmentSettings, LinkedHub, ProvisioningStatus, RecordKind, Retirement,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity;
use edgedps_topics::registration::{status, RegistrationState};

use crate::registration::to_json;
use crate::sessions::{Cut, Scope};
use crate::store::CrlRecord;
use crate::{read, timestamp_now, write, GroupEntry, Responder};

pub(crate) type Rejection = (u16, String);

/// What an accepted write did.
pub(crate) struct Applied {
    pub etag: Option<String>,
    pub outcome: AdminOutcome,
    pub retirement: Option<Retirement>,
    pub status: Option<ProvisioningStatus>,
    pub effects: Effects,
}

impl Applied {
    /// A created or updated enrollment or group; `stored` is the status before.
    fn record(
        etag: String,
        stored: Option<ProvisioningStatus>,
        now: ProvisioningStatus,
    ) -> Applied {
        let retired = now == ProvisioningStatus::Disabled && stored != Some(now);
        Applied {
            etag: Some(etag),
            outcome: if stored.is_some() {
                AdminOutcome::Updated
            } else {
                AdminOutcome::Created
            },
            retirement: retired.then_some(Retirement::Disabled),
            status: Some(now),
            effects: Effects::default(),
        }
    }

    fn closed(mut self, sessions: u32) -> Applied {
        self.effects.sessions_closed = Some(sessions);
        self
    }
}

impl Responder {
    /// Applies one write of an operator. An empty body deletes the record.
    ///
    /// The result goes to `dps/admin/results/{kind}/{id}`; the audit event (who, what,
    /// the outcome, whether it retired something) to `dps/events/admin/{kind}/{id}` and
    /// to the log under the `edgedps::audit` target.
    ///
    /// `encoding` is the body's (see [`Encoding::detect`]); the result is published in
    /// it. Retained records and events are always JSON.
    pub async fn apply_admin(
        &self,
        operator: &str,
        kind: RecordKind,
        id: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> AdminResult {
        let operation = if body.is_empty() {
            AdminOperation::Delete
        } else {
            AdminOperation::Write
        };
        let outcome = if body.is_empty() {
            self.delete(kind, id).await
        } else if let Err(rejection) = self.within_body_limit(body) {
            Err(rejection)
        } else {
            self.upsert(kind, id, body, encoding).await
        };
        self.report(
            operator,
            kind.segment(),
            id,
            operation,
            outcome,
            None,
            encoding,
            (kind.result_topic(id), admin_event_topic(kind, id)),
        )
        .await
    }

    /// `limits.max_enrollment_body_size` bounds every operator body.
    pub(crate) fn within_body_limit(&self, body: &[u8]) -> Result<(), Rejection> {
        if body.len() > self.settings.max_admin_body {
            return Err(bad(format!(
                "body of {} bytes is larger than limits.max_enrollment_body_size ({})",
                body.len(),
                self.settings.max_admin_body
            )));
        }
        Ok(())
    }

    /// Publishes the result and the audit event of a write, and logs it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn report(
        &self,
        operator: &str,
        kind: &str,
        id: &str,
        operation: AdminOperation,
        outcome: Result<Applied, Rejection>,
        reason: Option<String>,
        encoding: Encoding,
        (result_topic, event_topic): (String, String),
    ) -> AdminResult {
        let mut event = AdminEvent {
            operator: operator.to_owned(),
            kind: kind.to_owned(),
            id: id.to_owned(),
            operation,
            outcome: AdminOutcome::Rejected,
            retirement: None,
            provisioning_status: None,
            etag: None,
            error_code: None,
            message: None,
            reason,
            effects: Effects::default(),
            timestamp_utc: timestamp_now(),
        };
        let result = match outcome {
            Ok(applied) => {
                event.outcome = applied.outcome;
                event.retirement = applied.retirement;
                event.provisioning_status = applied.status;
                event.etag = applied.etag.clone();
                event.effects = applied.effects;
                AdminResult {
                    ok: true,
                    etag: applied.etag,
                    error_code: None,
                    message: None,
                    effects: applied.effects,
                }
            }
            Err((code, message)) => {
                event.error_code = Some(code);
                event.message = Some(message.clone());
                AdminResult {
                    ok: false,
                    etag: None,
                    error_code: Some(code),
                    message: Some(message),
                    effects: Effects::default(),
                }
            }
        };
        audit_log(&event);
        self.publish(result_topic, encoding.encode(&result), false)
            .await;
        self.publish(event_topic, to_json(&event), false).await;
        result
    }

    /// Publishes every stored record as a retained message (at start-up).
    pub async fn republish(&self) -> Result<usize, crate::Error> {
        let mut count = 0;
        for e in self.store.enrollments()? {
            self.publish(
                RecordKind::Enrollment.record_topic(&e.registration_id),
                to_json(&redact_enrollment(e)),
                true,
            )
            .await;
            count += 1;
        }
        let groups: Vec<EnrollmentGroup> = read(&self.groups)
            .values()
            .map(|entry| entry.group.clone())
            .collect();
        for g in groups {
            self.publish(
                RecordKind::EnrollmentGroup.record_topic(&g.enrollment_group_id),
                to_json(&redact_group(g)),
                true,
            )
            .await;
            count += 1;
        }
        for h in self.linked_hubs() {
            self.publish(
                RecordKind::Hub.record_topic(&h.host_name),
                to_json(&h),
                true,
            )
            .await;
            count += 1;
        }
        for r in self.store.registrations()? {
            self.publish(
                RecordKind::Registration.record_topic(&r.registration_id),
                to_json(&r),
                true,
            )
            .await;
            count += 1;
        }
        for crl in self.store.crls()? {
            self.publish(RecordKind::Crl.record_topic(&crl.name), crl_pem(&crl), true)
                .await;
            count += 1;
        }
        Ok(count)
    }

    async fn upsert(
        &self,
        kind: RecordKind,
        id: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Applied, Rejection> {
        match kind {
            RecordKind::Enrollment => {
                let mut e: Enrollment = parse_body(body, encoding)?;
                if !e.registration_id.eq_ignore_ascii_case(id) {
                    return Err(bad(format!(
                        "registrationId {} is not the topic's `{id}`",
                        shown(&e.registration_id)
                    )));
                }
                validate_registration_id(&e.registration_id)?;
                if let Some(device_id) = &e.device_id {
                    if !identity::valid_registration_id(device_id) {
                        return Err(bad(format!("deviceId {} is not valid", shown(device_id))));
                    }
                }
                let stored = self.store.enrollment(id).map_err(internal)?;
                let before = stored.as_ref().map(|s| s.settings.provisioning_status);
                let old = stored.as_ref().map(|s| (&s.settings, &s.attestation));
                keep_stored_keys(&mut e.attestation, old.map(|o| o.1));
                validate_attestation(&e.attestation, false)?;
                validate_settings(&e.settings)?;
                let etag = self.stamp(&mut e.settings, old.map(|o| o.0))?;
                self.store.put_enrollment(&e).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                let applied = Applied::record(etag, before, e.settings.provisioning_status);
                let thumbprints = enrolled_thumbprints(&e.attestation);
                let topic = kind.record_topic(&e.registration_id);
                self.publish(topic, to_json(&redact_enrollment(e)), true).await;
                // A disabled enrollment blocks the device (and its certificate); a new
                // enabled one takes over from the device's group.
                let mut scopes = vec![Scope::Registration(id)];
                scopes.extend(thumbprints.iter().map(|t| Scope::Thumbprint(t)));
                Ok(applied.closed(self.cut_off(&scopes, None).await))
            }
            RecordKind::EnrollmentGroup => {
                let mut g: EnrollmentGroup = parse_body(body, encoding)?;
                if g.enrollment_group_id != id {
                    return Err(bad(format!(
                        "enrollmentGroupId {} is not the topic's `{id}`",
                        shown(&g.enrollment_group_id)
                    )));
                }
                validate_registration_id(id)?;
                let stored = read(&self.groups).get(id).map(|entry| entry.group.clone());
                let before = stored.as_ref().map(|s| s.settings.provisioning_status);
                let old = stored.as_ref().map(|s| (&s.settings, &s.attestation));
                keep_stored_keys(&mut g.attestation, old.map(|o| o.1));
                validate_attestation(&g.attestation, true)?;
                validate_settings(&g.settings)?;
                let etag = self.stamp(&mut g.settings, old.map(|o| o.0))?;
                let entry = GroupEntry::new(g.clone()).map_err(bad)?;
                self.store.put_group(&g).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                write(&self.groups).insert(id.to_owned(), entry);
                let status = g.settings.provisioning_status;
                let applied = Applied::record(etag, before, status);
                self.publish(kind.record_topic(id), to_json(&redact_group(g)), true)
                    .await;
                // Only disabling can take the group's devices out; an enabled group's
                // write leaves its thousands of sessions alone.
                let closed = match status {
                    ProvisioningStatus::Disabled => {
                        self.cut_off(&[Scope::Group(id)], None).await
                    }
                    ProvisioningStatus::Enabled => 0,
                };
                Ok(applied.closed(closed))
            }
            RecordKind::Hub => {
                let mut hub: LinkedHub = parse_body(body, encoding)?;
                if hub.host_name.is_empty() {
                    hub.host_name = id.to_owned();
                }
                if hub.host_name != id {
                    return Err(bad(format!(
                        "hostName {} is not the topic's `{id}`",
                        shown(&hub.host_name)
                    )));
                }
                if !valid_host_name(id) {
                    return Err(bad(format!("`{id}` is not a host name")));
                }
                if hub.allocation_weight > 1000 {
                    return Err(bad("allocationWeight must be 0 to 1000".into()));
                }
                let stored_etag = read(&self.hubs).get(id).and_then(|h| h.etag.clone());
                check_etag(hub.etag.as_deref(), stored_etag.as_deref())?;
                let etag = format!("\"{}\"", self.random_token(12));
                hub.etag = Some(etag.clone());
                self.store.put_hub(&hub).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                let existed = write(&self.hubs).insert(id.to_owned(), hub.clone()).is_some()
                    || self.settings.hubs.iter().any(|h| h.host_name == id);
                self.publish(kind.record_topic(id), to_json(&hub), true).await;
                Ok(Applied {
                    etag: Some(etag),
                    outcome: if existed {
                        AdminOutcome::Updated
                    } else {
                        AdminOutcome::Created
                    },
                    retirement: None,
                    status: None,
                    effects: Effects::default(),
                })
            }
            RecordKind::Crl => self.put_crl(id, body).await,
            RecordKind::Registration => Err((
                codes::FORBIDDEN,
                "registration records are written by edgedps; publish an empty retained message to deregister".into(),
            )),
        }
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<Applied, Rejection> {
        // Registrations the deleted enrollment or group attested: marked `deregistered`
        // before the flush, so the delete and the marks are durable together.
        let mut deregistered = Vec::new();
        let existed = match kind {
            RecordKind::Enrollment => {
                let existed = self.store.remove_enrollment(id).map_err(internal)?;
                let record = self.store.registration(id).map_err(internal)?;
                if let Some(record) = record.filter(|r| {
                    existed && r.status == status::ASSIGNED && enrollment_group_of(r).is_none()
                }) {
                    let record = deregister(record);
                    self.store.put_registration(&record).map_err(internal)?;
                    deregistered.push(record);
                }
                existed
            }
            RecordKind::EnrollmentGroup => {
                let existed = self.store.remove_group(id).map_err(internal)?;
                write(&self.groups).remove(id);
                if existed {
                    deregistered = self.deregister_group(id).await?;
                }
                existed
            }
            RecordKind::Hub => {
                if self.settings.hubs.iter().any(|h| h.host_name == id) {
                    return Err((
                        codes::FORBIDDEN,
                        format!("hub `{id}` is linked in the configuration file; remove it there"),
                    ));
                }
                let existed = self.store.remove_hub(id).map_err(internal)?;
                write(&self.hubs).remove(id);
                existed
            }
            RecordKind::Registration => self.store.remove_registration(id).map_err(internal)?,
            RecordKind::Crl => {
                let existed = self.store.remove_crl(id).map_err(internal)?;
                write(&self.crls).remove(id);
                existed
            }
        };
        if existed {
            self.store.durable().await.map_err(internal)?;
        }
        // Clear the retained record either way, so subscribers agree with the store.
        self.publish(kind.record_topic(id), Vec::new(), true).await;
        for record in &deregistered {
            self.publish(
                RecordKind::Registration.record_topic(&record.registration_id),
                to_json(record),
                true,
            )
            .await;
        }
        if !existed {
            return Err((codes::NOT_FOUND, format!("no {} `{id}`", kind.segment())));
        }
        let mut effects = Effects::default();
        let (retirement, cut) = match kind {
            RecordKind::Enrollment => (
                Retirement::Deleted,
                Some(self.cut_off(&[Scope::Registration(id)], None).await),
            ),
            RecordKind::EnrollmentGroup => (
                Retirement::Deleted,
                Some(self.cut_off(&[Scope::Group(id)], None).await),
            ),
            RecordKind::Registration => (
                Retirement::Deregistered,
                Some(
                    self.cut_off(&[Scope::Registration(id)], Some(Cut::Deregistered))
                        .await,
                ),
            ),
            RecordKind::Hub => (Retirement::Unlinked, None),
            // Deleting a list revokes nothing; the certificates it listed may connect again.
            RecordKind::Crl => (Retirement::Deleted, None),
        };
        effects.sessions_closed = cut;
        if matches!(kind, RecordKind::Enrollment | RecordKind::EnrollmentGroup) {
            effects.registrations_deregistered = Some(count(deregistered.len()));
        }
        Ok(Applied {
            etag: None,
            outcome: AdminOutcome::Deleted,
            retirement: Some(retirement),
            status: None,
            effects,
        })
    }

    /// Marks the assigned registrations of group `id` `deregistered` in the store.
    async fn deregister_group(&self, id: &str) -> Result<Vec<RegistrationState>, Rejection> {
        let store = self.store.clone();
        let group = id.to_owned();
        // A scan of every registration: off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut marked = Vec::new();
            for record in store.registrations()? {
                if record.status == status::ASSIGNED
                    && enrollment_group_of(&record) == Some(group.as_str())
                {
                    let record = deregister(record);
                    store.put_registration(&record)?;
                    marked.push(record);
                }
            }
            Ok::<_, crate::StoreError>(marked)
        })
        .await
        .map_err(internal)?
        .map_err(internal)
    }

    /// Verifies a revocation list, stores it, and cuts the sessions it revokes.
    async fn put_crl(&self, name: &str, body: &[u8]) -> Result<Applied, Rejection> {
        validate_registration_id(name)?;
        let sent = revocation::read_body(body).map_err(|e| bad(e.to_string()))?;
        let trusted: Vec<Vec<u8>> = read(&self.groups)
            .values()
            .flat_map(|entry| entry.signing_der.iter().cloned())
            .collect();
        let trusted: Vec<&[u8]> = trusted.iter().map(Vec::as_slice).collect();
        let list = RevocationList::verify(&sent.crl, &sent.certificates, &trusted)
            .map_err(|e| bad(e.to_string()))?;
        let record = CrlRecord {
            name: name.to_owned(),
            crl: sent.crl,
            issuer_certificate: list.issuer_certificate.clone(),
            sent_certificates: sent.certificates,
        };
        let existed = read(&self.crls).contains_key(name);
        self.store.put_crl(&record).map_err(internal)?;
        self.store.durable().await.map_err(internal)?;
        let issuer = list.issuer().to_vec();
        let revoked = count(list.len());
        write(&self.crls).insert(name.to_owned(), list);
        self.publish(RecordKind::Crl.record_topic(name), crl_pem(&record), true)
            .await;
        let closed = self.cut_off(&[Scope::Issuer(&issuer)], None).await;
        Ok(Applied {
            etag: None,
            outcome: if existed {
                AdminOutcome::Updated
            } else {
                AdminOutcome::Created
            },
            retirement: Some(Retirement::Revoked),
            status: None,
            effects: Effects {
                sessions_closed: Some(closed),
                revoked_certificates: Some(revoked),
                ..Effects::default()
            },
        })
    }

    /// Checks the etag of a write against the stored record, then sets a new etag and
    /// the timestamps. Returns the new etag.
    pub(crate) fn stamp(
        &self,
        settings: &mut EnrollmentSettings,
        stored: Option<&EnrollmentSettings>,
    ) -> Result<String, Rejection> {
        check_etag(
            settings.etag.as_deref(),
            stored.and_then(|s| s.etag.as_deref()),
        )?;
        let now = timestamp_now();
        let etag = format!("\"{}\"", self.random_token(12));
        settings.etag = Some(etag.clone());
        settings.created_date_time_utc = Some(
            stored
                .and_then(|s| s.created_date_time_utc.clone())
                .unwrap_or_else(|| now.clone()),
        );
        settings.last_updated_date_time_utc = Some(now);
        Ok(etag)
    }
}

/// The enrollment group a registration record came through, if any.
pub(crate) fn enrollment_group_of(record: &RegistrationState) -> Option<&str> {
    record
        .x509
        .as_ref()
        .or(record.symmetric_key.as_ref())
        .and_then(|source| source.enrollment_group_id.as_deref())
}

/// The record of a registration that no longer grants anything.
pub(crate) fn deregister(mut record: RegistrationState) -> RegistrationState {
    record.status = status::DEREGISTERED.into();
    record.last_updated_date_time_utc = Some(timestamp_now());
    record.etag = Some(crate::new_etag());
    record
}

/// The SHA-256 thumbprints of the certificates an X.509 individual enrollment names.
fn enrolled_thumbprints(attestation: &Attestation) -> Vec<String> {
    let Some(pair) = attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
    else {
        return Vec::new();
    };
    [&pair.primary, &pair.secondary]
        .into_iter()
        .flatten()
        .filter_map(|cert| match (&cert.certificate, &cert.sha256_thumbprint) {
            (Some(pem), _) => x509::pem_der(pem).ok().map(|der| x509::thumbprint(&der)),
            (None, Some(print)) => x509::normalize_thumbprint(print).ok(),
            (None, None) => None,
        })
        .collect()
}

/// A revocation list as its retained record shows it: PEM, with the certificates the
/// operator sent with it.
fn crl_pem(record: &CrlRecord) -> Vec<u8> {
    let mut text = pem_block("X509 CRL", &record.crl);
    for cert in &record.sent_certificates {
        text.push_str(&pem_block("CERTIFICATE", cert));
    }
    text.into_bytes()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// A count for a result.
pub(crate) fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One log line per admin write, under the `edgedps::audit` target.
fn audit_log(event: &AdminEvent) {
    let outcome = format!("{:?}", event.outcome).to_lowercase();
    let retirement = event.retirement.map(|r| format!("{r:?}").to_lowercase());
    match event.outcome {
        AdminOutcome::Rejected => tracing::warn!(
            target: "edgedps::audit",
            operator = %event.operator,
            kind = %event.kind,
            id = %event.id,
            operation = ?event.operation,
            %outcome,
            code = event.error_code,
            reason = event.message.as_deref().unwrap_or_default(),
            "admin write rejected"
        ),
        _ => tracing::info!(
            target: "edgedps::audit",
            operator = %event.operator,
            kind = %event.kind,
            id = %event.id,
            operation = ?event.operation,
            %outcome,
            retirement,
            status = ?event.provisioning_status,
            etag = event.etag.as_deref().unwrap_or_default(),
            sessions_closed = event.effects.sessions_closed,
            registrations_deregistered = event.effects.registrations_deregistered,
            retained_messages_purged = event.effects.retained_messages_purged,
            revoked_certificates = event.effects.revoked_certificates,
            reason = event.reason.as_deref(),
            "admin write applied"
        ),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    encoding: Encoding,
) -> Result<T, Rejection> {
    encoding
        .decode(body)
        .map_err(|e| bad(format!("body is not a valid record: {e}")))
}

/// A value from the body as an error may show it: ids and host names are quoted; any
/// other value (it may be a key in the wrong field) is described by its length only.
fn shown(value: &str) -> String {
    if identity::valid_registration_id(value) {
        format!("`{value}`")
    } else {
        format!("({} bytes, not a valid id)", value.len())
    }
}

pub(crate) fn bad(message: String) -> Rejection {
    (codes::BAD_REQUEST, message)
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Rejection {
    (codes::INTERNAL, format!("internal error: {e}"))
}

fn check_etag(sent: Option<&str>, stored: Option<&str>) -> Result<(), Rejection> {
    match (sent, stored) {
        (None, _) | (Some("*"), _) => Ok(()),
        (Some(sent), Some(stored)) if sent == stored => Ok(()),
        (Some(_), stored) => Err((
            codes::PRECONDITION_FAILED,
            format!(
                "the etag sent does not match the stored {}",
                stored.unwrap_or("(none: the record does not exist)")
            ),
        )),
    }
}

fn validate_registration_id(id: &str) -> Result<(), Rejection> {
    if identity::valid_registration_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "`{id}` is not a valid id (1-128 of a-z A-Z 0-9 - . _ :)"
        )))
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_settings(settings: &EnrollmentSettings) -> Result<(), Rejection> {
    match settings.allocation_policy {
        Some(AllocationPolicy::GeoLatency) | Some(AllocationPolicy::Custom) => return Err(bad(
            "allocationPolicy geoLatency and custom are not supported yet; use hashed or static"
                .into(),
        )),
        Some(AllocationPolicy::Static) if settings.iot_hubs.len() != 1 => {
            return Err(bad(
                "allocationPolicy static needs exactly one hub in iotHubs".into(),
            ))
        }
        _ => {}
    }
    if let Some(hub) = settings.iot_hubs.iter().find(|h| !valid_host_name(h)) {
        return Err(bad(format!(
            "iotHubs entry {} is not a host name",
            shown(hub)
        )));
    }
    if let Some(twin) = &settings.initial_twin {
        if !twin.is_object() {
            return Err(bad("initialTwin must be a JSON object".into()));
        }
    }
    Ok(())
}

fn validate_attestation(attestation: &Attestation, group: bool) -> Result<(), Rejection> {
    match attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = attestation
                .symmetric_key
                .as_ref()
                .ok_or_else(|| bad("attestation.symmetricKey is missing".into()))?;
            let primary = keys
                .primary_key
                .as_deref()
                .ok_or_else(|| bad("attestation.symmetricKey.primaryKey is missing".into()))?;
            for (name, key) in [
                ("primaryKey", Some(primary)),
                ("secondaryKey", keys.secondary_key.as_deref()),
            ] {
                if let Some(key) = key {
                    let len = BASE64
                        .decode(key)
                        .map_err(|_| bad(format!("symmetricKey.{name} is not base64")))?
                        .len();
                    if !(16..=64).contains(&len) {
                        return Err(bad(format!(
                            "symmetricKey.{name} must decode to 16 to 64 bytes, not {len}"
                        )));
                    }
                }
            }
            Ok(())
        }
        AttestationType::X509 => {
            let x509 = attestation
                .x509
                .as_ref()
                .ok_or_else(|| bad("attestation.x509 is missing".into()))?;
            let (name, pair) = if group {
                ("signingCertificates", x509.signing_certificates.as_ref())
            } else {
                ("clientCertificates", x509.client_certificates.as_ref())
            };
            let pair = pair.ok_or_else(|| bad(format!("attestation.x509.{name} is missing")))?;
            validate_certificates(name, pair, group)
        }
        AttestationType::Tpm => Err(bad("TPM attestation is not supported yet".into())),
    }
}

fn validate_certificates(name: &str, pair: &CertificatePair, group: bool) -> Result<(), Rejection> {
    let primary = pair
        .primary
        .as_ref()
        .ok_or_else(|| bad(format!("attestation.x509.{name}.primary is missing")))?;
    for (slot, cert) in [
        ("primary", Some(primary)),
        ("secondary", pair.secondary.as_ref()),
    ] {
        let Some(cert) = cert else { continue };
        match (&cert.certificate, &cert.sha256_thumbprint) {
            (Some(pem), None) => {
                let der = x509::pem_to_der(pem)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.certificate: {e}")))?;
                if group {
                    let info = x509::CertificateInfo::read(&der)
                        .map_err(|e| bad(format!("x509.{name}.{slot}: {e}")))?;
                    if !info.is_ca {
                        return Err(bad(format!("x509.{name}.{slot} is not a CA certificate")));
                    }
                }
            }
            (None, Some(print)) if !group => {
                x509::normalize_thumbprint(print)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.sha256Thumbprint: {e}")))?;
            }
            _ => {
                return Err(bad(format!(
                    "x509.{name}.{slot} needs exactly one of certificate{}",
                    if group { "" } else { " or sha256Thumbprint" }
                )))
            }
        }
    }
    Ok(())
}

/// A write that omits the keys of a symmetric-key attestation keeps the stored keys,
/// so the retained (redacted) record can be edited and published back.
fn keep_stored_keys(attestation: &mut Attestation, stored: Option<&Attestation>) {
    let (Some(new), Some(old)) = (
        attestation.symmetric_key.as_mut(),
        stored.and_then(|s| s.symmetric_key.as_ref()),
    ) else {
        return;
    };
    if new.primary_key.is_none() && new.secondary_key.is_none() {
        new.primary_key = old.primary_key.clone();
        new.secondary_key = old.secondary_key.clone();
    }
}

fn redact(attestation: &mut Attestation) {
    if let Some(keys) = attestation.symmetric_key.as_mut() {
        keys.primary_key = None;
        keys.secondary_key = None;
    }
}

pub(crate) fn redact_enrollment(mut e: Enrollment) -> Enrollment {
    redact(&mut e.attestation);
    e
}

fn redact_group(mut g: EnrollmentGroup) -> EnrollmentGroup {
    redact(&mut g.attestation);
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWI=";

    fn message_for(body: &str) -> String {
        parse_body::<Enrollment>(body.as_bytes(), Encoding::Json)
            .map(|_| String::new())
            .unwrap_or_else(|(_, message)| message)
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let wrong_type = format!(
            r#"{{"registrationId":"d","attestation":{{"type":"symmetricKey"}},"iotHubs":"{KEY}"}}"#
        );
        let wrong_variant = format!(r#"{{"registrationId":"d","attestation":{{"type":"{KEY}"}}}}"#);
        let escaped = r#"{"registrationId":"d","attestation":{"type":"symmetricKey"},"iotHubs":"a\"b\\c-SECRET"}"#;
        for body in [wrong_type.as_str(), wrong_variant.as_str(), escaped] {
            let message = message_for(body);
            assert!(
                message.starts_with("body is not a valid record"),
                "{message}"
            );
            assert!(!message.contains(KEY), "{message}");
            assert!(!message.contains("SECRET"), "{message}");
            assert!(message.contains("line 1 column"), "{message}");
        }
        let message = message_for(&wrong_type);
        assert!(message.contains("expected a sequence"), "{message}");
        let message = message_for(&wrong_variant);
        assert!(message.contains("expected one of `x509`"), "{message}");
    }

    #[test]
    fn parse_errors_keep_field_names_and_syntax_positions() {
        let message =
            message_for(r#"{"registrationId":"d","attestation":{"type":"x509"},"iotHub":"h"}"#);
        assert!(message.contains("unknown field `iotHub`"), "{message}");
        let message = message_for(r#"{"registrationId":"d","#);
        assert!(message.contains("EOF while parsing"), "{message}");
    }

    #[test]
    fn disabling_is_a_retirement_and_enabling_is_not() {
        use ProvisioningStatus::{Disabled, Enabled};
        let cases = [
            (None, Enabled, AdminOutcome::Created, None),
            (
                None,
                Disabled,
                AdminOutcome::Created,
                Some(Retirement::Disabled),
            ),
            (
                Some(Enabled),
                Disabled,
                AdminOutcome::Updated,
                Some(Retirement::Disabled),
            ),
            (Some(Disabled), Disabled, AdminOutcome::Updated, None),
            (Some(Disabled), Enabled, AdminOutcome::Updated, None),
        ];
        for (before, now, outcome, retirement) in cases {
            let applied = Applied::record("\"e\"".into(), before, now);
            assert_eq!(applied.outcome, outcome, "{before:?} -> {now:?}");
            assert_eq!(applied.retirement, retirement, "{before:?} -> {now:?}");
            assert_eq!(applied.status, Some(now));
        }
    }
}
