//! Operator writes on the retained `dps/` records (PROTOCOL B).
//!
//! Every write is validated before it touches the store (`edgedps_policies::validation`),
//! checked against the stored etag when it carries one, made durable, republished as the
//! retained record, and answered on `dps/admin/results/{kind}/{id}`. The retained copy
//! never carries symmetric keys; a later write that omits the keys keeps the stored ones.
//!
//! A write that takes devices out of service then cuts their live sessions, and its
//! result and audit event say how many. Deleting an enrollment or a group marks the
//! registrations it attested `deregistered`. Revocation lists: `crl.rs`; results and
//! audit events: `report.rs`.

use edgedps_policies::attestation::GroupCredentials;
use edgedps_policies::validation::{self, enrolled_thumbprints, redact_enrollment, redact_group};
use edgedps_topics::admin::{
    admin_event_topic, AdminOperation, AdminOutcome, AdminResult, Effects, Enrollment,
    EnrollmentGroup, EnrollmentSettings, LinkedHub, ProvisioningStatus, RecordKind, Retirement,
};
use edgedps_topics::cloud::HubAction;
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{RegistrationState, RegistrationStatus};

use crate::sessions::{Cut, Scope};
use crate::{count, read, timestamp_now, write, Error, Publication, Responder};

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

/// The answer to an operator write: its result, and what to publish (the retained
/// records it changed, then the result and the audit event).
pub struct AdminAnswer {
    pub result: AdminResult,
    pub publish: Vec<Publication>,
}

/// Who wrote what, for the result and the audit event.
pub(crate) struct Write<'a> {
    pub operator: &'a str,
    pub kind: &'a str,
    pub id: &'a str,
    pub operation: AdminOperation,
    pub encoding: Encoding,
    pub result_topic: String,
    pub event_topic: String,
}

impl<'a> Write<'a> {
    /// A write of a record: a delete when `body` is empty.
    fn of(
        operator: &'a str,
        kind: RecordKind,
        id: &'a str,
        body: &[u8],
        encoding: Encoding,
    ) -> Write<'a> {
        Write {
            operator,
            kind: kind.segment(),
            id,
            operation: if body.is_empty() {
                AdminOperation::Delete
            } else {
                AdminOperation::Write
            },
            encoding,
            result_topic: kind.result_topic(id),
            event_topic: admin_event_topic(kind, id),
        }
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
    ) -> AdminAnswer {
        let mut publish = Vec::new();
        let outcome = if body.is_empty() {
            self.delete(kind, id, &mut publish).await
        } else {
            match self.within_body_limit(body) {
                Ok(()) => self.upsert(kind, id, body, encoding, &mut publish).await,
                Err(e) => Err(e),
            }
        };
        let write = Write::of(operator, kind, id, body, encoding);
        let result = self.report(write, outcome, None, &mut publish);
        AdminAnswer { result, publish }
    }

    /// A write the operator's role does not allow: refused with 403, reported on the
    /// result topic and audited like any other write.
    pub fn refuse_admin(
        &self,
        operator: &str,
        kind: RecordKind,
        id: &str,
        body: &[u8],
        encoding: Encoding,
        reason: &str,
    ) -> AdminAnswer {
        let mut publish = Vec::new();
        let write = Write::of(operator, kind, id, body, encoding);
        let outcome = Err(Error::Forbidden(reason.to_owned()));
        let result = self.report(write, outcome, None, &mut publish);
        AdminAnswer { result, publish }
    }

    /// `limits.max_enrollment_body_size` bounds every operator body.
    pub(crate) fn within_body_limit(&self, body: &[u8]) -> Result<(), Error> {
        if body.len() > self.settings.max_admin_body {
            return Err(bad(format!(
                "body of {} bytes is larger than limits.max_enrollment_body_size ({})",
                body.len(),
                self.settings.max_admin_body
            )));
        }
        Ok(())
    }

    async fn upsert(
        &self,
        kind: RecordKind,
        id: &str,
        body: &[u8],
        encoding: Encoding,
        publish: &mut Vec<Publication>,
    ) -> Result<Applied, Error> {
        match kind {
            RecordKind::Enrollment => {
                let sent: Enrollment = validation::parse_body(body, encoding)?;
                let registration_id = RegistrationId::from(id);
                let stored = self.store.enrollment(&registration_id)?;
                let mut e = validation::enrollment(id, sent, stored.as_ref())?;
                self.check_issuance_policy(&e.settings)?;
                let before = stored.as_ref().map(|s| s.settings.provisioning_status);
                let etag = self.stamp(&mut e.settings, stored.as_ref().map(|s| &s.settings));
                self.store.put_enrollment(&e)?;
                let now = e.settings.provisioning_status;
                let hub_record = match status_action(before, now) {
                    Some(action) => self.hub_status_of(&registration_id, action)?,
                    None => None,
                };
                self.durable().await?;
                self.written();
                let applied = Applied::record(etag, before, e.settings.provisioning_status);
                if let Some(record) = hub_record {
                    publish.push(Publication::record(
                        RecordKind::Registration.record_topic(record.registration_id.as_str()),
                        &record,
                    ));
                }
                let thumbprints = enrolled_thumbprints(&e.attestation);
                let topic = kind.record_topic(e.registration_id.as_str());
                publish.push(Publication::record(topic, &redact_enrollment(e)));
                // A disabled enrollment blocks the device (and its certificate); a new
                // enabled one takes over from the device's group.
                let mut scopes = vec![Scope::Registration(&registration_id)];
                scopes.extend(thumbprints.iter().map(|t| Scope::Thumbprint(t)));
                Ok(applied.closed(self.cut_off(&scopes, None).await))
            }
            RecordKind::EnrollmentGroup => {
                let sent: EnrollmentGroup = validation::parse_body(body, encoding)?;
                let stored = read(&self.groups).get(id).map(|entry| entry.group.clone());
                let mut g = validation::group(id, sent, stored.as_ref())?;
                self.check_issuance_policy(&g.settings)?;
                let before = stored.as_ref().map(|s| s.settings.provisioning_status);
                let etag = self.stamp(&mut g.settings, stored.as_ref().map(|s| &s.settings));
                let entry = GroupCredentials::new(g.clone()).map_err(|e| bad(e.to_string()))?;
                self.store.put_group(&g)?;
                let hub_records = match status_action(before, g.settings.provisioning_status) {
                    Some(action) => self.group_hub_status(id, action).await?,
                    None => Vec::new(),
                };
                self.durable().await?;
                for record in &hub_records {
                    publish.push(Publication::record(
                        RecordKind::Registration.record_topic(record.registration_id.as_str()),
                        record,
                    ));
                }
                write(&self.groups).insert(id.to_owned(), entry);
                self.group_gates.forget(id);
                self.written();
                let status = g.settings.provisioning_status;
                let applied = Applied::record(etag, before, status);
                publish.push(Publication::record(kind.record_topic(id), &redact_group(g)));
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
                let sent: LinkedHub = validation::parse_body(body, encoding)?;
                let stored_etag = read(&self.hubs).get(id).and_then(|h| h.etag.clone());
                let mut hub = validation::hub(id, sent, stored_etag.as_deref())?;
                self.hub_credentials_written(&mut hub)?;
                let etag = self.new_etag();
                hub.etag = Some(etag.clone());
                self.store.put_hub(&hub)?;
                self.durable().await?;
                let existed = write(&self.hubs).insert(id.to_owned(), hub.clone()).is_some()
                    || self.settings.hubs.iter().any(|h| h.host_name == id);
                self.written();
                self.latencies.changed.notify_one();
                hub.latency = self.latency_of(id);
                publish.push(Publication::record(kind.record_topic(id), &hub));
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
            RecordKind::Crl => self.put_crl(id, body, publish).await,
            RecordKind::Registration => Err(Error::Forbidden(
                "registration records are written by edgedps; publish an empty retained message to deregister".into(),
            )),
        }
    }

    async fn delete(
        &self,
        kind: RecordKind,
        id: &str,
        publish: &mut Vec<Publication>,
    ) -> Result<Applied, Error> {
        let registration_id = RegistrationId::from(id);
        // Registrations the deleted enrollment or group attested: marked `deregistered`
        // before the flush, so the delete and the marks are durable together.
        let mut deregistered = Vec::new();
        // A group device unblocked: its record, with its hub's operation.
        let mut reenabled = None;
        let existed = match kind {
            RecordKind::Enrollment => {
                let removed = self.store.enrollment(&registration_id)?;
                let existed = self.store.remove_enrollment(&registration_id)?;
                let record = self.store.registration(&registration_id)?;
                match record.filter(|r| existed && r.is_assigned()) {
                    Some(record) if record.enrollment_group_id().is_none() => {
                        let record = self.deregister(record)?;
                        self.store.put_registration(&record)?;
                        deregistered.push(record);
                    }
                    // A disabled enrollment that blocked a device of a group is gone:
                    // the group's device is back in service, at its hub too.
                    Some(_)
                        if removed.is_some_and(|e| {
                            e.settings.provisioning_status == ProvisioningStatus::Disabled
                        }) =>
                    {
                        reenabled = self.hub_status_of(&registration_id, HubAction::Enable)?;
                    }
                    _ => {}
                }
                existed
            }
            RecordKind::EnrollmentGroup => {
                let existed = self.store.remove_group(id)?;
                write(&self.groups).remove(id);
                self.group_gates.forget(id);
                if existed {
                    deregistered = self.deregister_group(id).await?;
                    for record in &mut deregistered {
                        if self.hub_status_changed(record, HubAction::Disable)? {
                            self.store.put_registration(record)?;
                        }
                    }
                }
                existed
            }
            RecordKind::Hub => {
                if self.settings.hubs.iter().any(|h| h.host_name == id) {
                    return Err(Error::Forbidden(format!(
                        "hub `{id}` is linked in the configuration file; remove it there"
                    )));
                }
                let existed = self.store.remove_hub(id)?;
                write(&self.hubs).remove(id);
                self.latencies.changed.notify_one();
                self.hub_unlinked(id)?;
                existed
            }
            RecordKind::Registration => {
                // Deregistered: out at its cloud hub too.
                if let Some(mut record) = self.store.registration(&registration_id)? {
                    if record.is_assigned() {
                        self.hub_status_changed(&mut record, HubAction::Disable)?;
                    }
                }
                self.store.remove_registration(&registration_id)?
            }
            RecordKind::Crl => {
                let existed = self.store.remove_crl(id)?;
                write(&self.crls).remove(id);
                existed
            }
        };
        if existed {
            self.durable().await?;
            self.written();
        }
        // Clear the retained record either way, so subscribers agree with the store.
        publish.push(Publication::cleared(kind.record_topic(id)));
        for record in deregistered.iter().chain(&reenabled) {
            publish.push(Publication::record(
                RecordKind::Registration.record_topic(record.registration_id.as_str()),
                record,
            ));
        }
        if !existed {
            return Err(Error::NotFound(format!("no {} `{id}`", kind.segment())));
        }
        let mut effects = Effects::default();
        let (retirement, cut) = match kind {
            RecordKind::Enrollment => (
                Retirement::Deleted,
                Some(
                    self.cut_off(&[Scope::Registration(&registration_id)], None)
                        .await,
                ),
            ),
            RecordKind::EnrollmentGroup => (
                Retirement::Deleted,
                Some(self.cut_off(&[Scope::Group(id)], None).await),
            ),
            RecordKind::Registration => (
                Retirement::Deregistered,
                Some(
                    self.cut_off(
                        &[Scope::Registration(&registration_id)],
                        Some(Cut::Deregistered),
                    )
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

    /// A group disabled or enabled: its assigned devices' identities at their cloud
    /// hubs follow (enqueued with the group's write). The records changed.
    async fn group_hub_status(
        &self,
        id: &str,
        action: HubAction,
    ) -> Result<Vec<RegistrationState>, Error> {
        if !self.any_cloud_hub() {
            return Ok(Vec::new());
        }
        let store = self.store.clone();
        let group = id.to_owned();
        // A scan of every registration: off the async workers.
        let assigned = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for record in store.scan_registrations(None) {
                let record = record?;
                if record.is_assigned() && record.enrollment_group_id() == Some(group.as_str()) {
                    found.push(record);
                }
            }
            Ok::<_, crate::StoreError>(found)
        })
        .await
        .map_err(|e| Error::Store(crate::StoreError::Flush(format!("scan task: {e}"))))??;
        let mut changed = Vec::new();
        for mut record in assigned {
            if self.hub_status_changed(&mut record, action)? {
                record.etag = Some(self.new_etag());
                self.store.put_registration(&record)?;
                changed.push(record);
            }
        }
        Ok(changed)
    }

    /// Marks the assigned registrations of group `id` `deregistered` in the store.
    async fn deregister_group(&self, id: &str) -> Result<Vec<RegistrationState>, Error> {
        let store = self.store.clone();
        let group = id.to_owned();
        let now = timestamp_now();
        let random = self.random.clone();
        // A scan of every registration: off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut marked = Vec::new();
            for record in store.scan_registrations(None) {
                let record = record?;
                if record.is_assigned() && record.enrollment_group_id() == Some(group.as_str()) {
                    let etag = edgedps_topics::etag(&crate::random_bytes(&random, 12));
                    let record = deregistered(record, &now, etag);
                    store.put_registration(&record)?;
                    marked.push(record);
                }
            }
            Ok::<_, crate::StoreError>(marked)
        })
        .await
        .map_err(|e| Error::Store(crate::StoreError::Flush(format!("scan task: {e}"))))?
        .map_err(Error::from)
    }

    /// The record of a registration that no longer grants anything; its cloud hub's
    /// identity is disabled through the outbox (enqueued, durable with the record).
    pub(crate) fn deregister(&self, record: RegistrationState) -> Result<RegistrationState, Error> {
        let was_assigned = record.is_assigned();
        let mut record = deregistered(record, &timestamp_now(), self.new_etag());
        if was_assigned {
            self.hub_status_changed(&mut record, HubAction::Disable)?;
        }
        Ok(record)
    }

    /// Sets a new etag and the timestamps of a record about to be stored; returns the
    /// etag. (The etag sent was checked by `edgedps_policies::validation`.)
    pub(crate) fn stamp(
        &self,
        settings: &mut EnrollmentSettings,
        stored: Option<&EnrollmentSettings>,
    ) -> String {
        // An enrollment or group that allocates by geoLatency starts the measurements.
        if settings.allocation_policy == Some(edgedps_topics::admin::AllocationPolicy::GeoLatency) {
            self.latencies.want();
        }
        let now = timestamp_now();
        let etag = self.new_etag();
        settings.etag = Some(etag.clone());
        settings.created_date_time_utc = Some(
            stored
                .and_then(|s| s.created_date_time_utc.clone())
                .unwrap_or_else(|| now.clone()),
        );
        settings.last_updated_date_time_utc = Some(now);
        etag
    }
}

/// `record` as `deregistered`, updated `now`, with `etag`.
/// The record of a device deregistered: its status, and every certificate issued to it
/// revoked (PROTOCOL F: an issued certificate is a credential only while the device is
/// in service).
fn deregistered(mut record: RegistrationState, now: &str, etag: String) -> RegistrationState {
    record.status = RegistrationStatus::Deregistered;
    for issued in &mut record.issued_certificates {
        issued.revoked = true;
    }
    record.last_updated_date_time_utc = Some(now.to_owned());
    record.etag = Some(etag);
    record
}

impl Responder {
    /// An issuance policy must name a certificate authority of the configuration.
    fn check_issuance_policy(
        &self,
        settings: &edgedps_topics::admin::EnrollmentSettings,
    ) -> Result<(), Error> {
        let Some(policy) = &settings.client_certificate_issuance_policy else {
            return Ok(());
        };
        let name = &policy.certificate_authority_name;
        if self.settings.certificate_authorities.contains_key(name) {
            return Ok(());
        }
        let known: Vec<&str> = self
            .settings
            .certificate_authorities
            .keys()
            .map(String::as_str)
            .collect();
        Err(bad(format!(
            "clientCertificateIssuancePolicy.certificateAuthorityName `{name}` is not a certificate authority of this gateway (configured: {})",
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        )))
    }
}

/// What a status change of an enrollment or group makes of its devices at their hubs.
fn status_action(before: Option<ProvisioningStatus>, now: ProvisioningStatus) -> Option<HubAction> {
    match (before, now) {
        (Some(ProvisioningStatus::Enabled), ProvisioningStatus::Disabled) => {
            Some(HubAction::Disable)
        }
        (Some(ProvisioningStatus::Disabled), ProvisioningStatus::Enabled) => {
            Some(HubAction::Enable)
        }
        // A new disabled enrollment blocks a device that may be registered already (one
        // certificate of a group blocked).
        (None, ProvisioningStatus::Disabled) => Some(HubAction::Disable),
        _ => None,
    }
}

pub(crate) fn bad(message: String) -> Error {
    Error::Invalid(validation::Invalid::BadRequest(message))
}

#[cfg(test)]
mod tests {
    use super::*;

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
