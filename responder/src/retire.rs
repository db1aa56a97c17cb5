//! One-step retirement (PROTOCOL B): `dps/admin/retire/{registrationId}`.
//!
//! Takes one device out of service: blocks it (its individual enrollment set to
//! `disabled`, or, for a device that came through a group, a new disabled individual
//! enrollment with the device's own credential, so that enabling it later restores the
//! device), marks its registration `deregistered`, cuts its live sessions and clears
//! its retained `devices/{deviceId}/#` messages. The result and the audit event count
//! each of these. A second retirement of the same device changes nothing and says so.

use edgedps_policies::attestation::GroupCredentials;
use edgedps_policies::validation::redact_enrollment;
use edgedps_topics::admin::{
    retire_event_topic, retire_result_topic, AdminOperation, AdminOutcome, Attestation,
    AttestationType, CertificatePair, CertificateRef, Effects, Enrollment, EnrollmentSettings,
    ProvisioningStatus, RecordKind, RetireRequest, Retirement, SymmetricKeyAttestation,
    X509Attestation, MAX_RETIRE_REASON,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{RegistrationState, RegistrationStatus};

use crate::admin::{bad, AdminAnswer, Applied, Write};
use crate::sessions::{Cut, Scope};
use crate::{count, read, Error, Publication, Responder};

/// The broker's retained messages, as a retirement clears them.
pub trait RetainedMessages: Sync {
    /// Clears every retained message under `filter`; how many there were.
    fn purge(&self, filter: String) -> impl std::future::Future<Output = usize> + Send;
}

impl Responder {
    /// Retires `registration_id` for `operator`; `body` is `{"reason"?}` or empty.
    /// The result goes to `dps/admin/results/retire/{id}`, the audit event to
    /// `dps/events/admin/retire/{id}` and the audit log.
    pub async fn retire(
        &self,
        retained: &impl RetainedMessages,
        operator: &str,
        registration_id: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> AdminAnswer {
        let request = if body.iter().all(u8::is_ascii_whitespace) {
            Ok(RetireRequest::default())
        } else {
            self.within_body_limit(body).and_then(|()| {
                encoding
                    .decode::<RetireRequest>(body)
                    .map_err(|e| bad(format!("body is not a retirement request: {e}")))
            })
        };
        let request = request.and_then(|r| match &r.reason {
            Some(reason) if reason.len() > MAX_RETIRE_REASON => Err(bad(format!(
                "reason is {} bytes; at most {MAX_RETIRE_REASON}",
                reason.len()
            ))),
            _ => Ok(r),
        });
        let mut publish = Vec::new();
        let (reason, outcome) = match request {
            Ok(request) => (
                request.reason,
                self.retire_device(retained, registration_id, &mut publish)
                    .await,
            ),
            Err(rejection) => (None, Err(rejection)),
        };
        let write = Write {
            operator,
            kind: "retire",
            id: registration_id,
            operation: AdminOperation::Retire,
            encoding,
            result_topic: retire_result_topic(registration_id),
            event_topic: retire_event_topic(registration_id),
        };
        let result = self.report(write, outcome, reason, &mut publish);
        AdminAnswer { result, publish }
    }

    async fn retire_device(
        &self,
        retained: &impl RetainedMessages,
        id: &str,
        publish: &mut Vec<Publication>,
    ) -> Result<Applied, Error> {
        let registration_id = RegistrationId::parse(id).map_err(|e| bad(e.to_string()))?;
        let individual = self.store.enrollment(&registration_id)?;
        let record = self.store.registration(&registration_id)?;
        let live = self.sessions.find(&[Scope::Registration(&registration_id)]);
        if individual.is_none() && record.is_none() && live.is_empty() {
            return Err(Error::NotFound(format!(
                "no enrollment, registration or live session for `{id}`; to block a device \
                     of a group that never registered, publish a disabled individual enrollment"
            )));
        }
        // 1. Block: everything is decided before anything is written.
        let blocking = match &individual {
            Some(e) if e.settings.provisioning_status == ProvisioningStatus::Enabled => {
                let mut e = e.clone();
                e.settings.provisioning_status = ProvisioningStatus::Disabled;
                Some(e)
            }
            Some(_) => None,
            None => {
                let group = record
                    .as_ref()
                    .and_then(RegistrationState::enrollment_group_id)
                    .or_else(|| live.iter().find_map(|s| s.device().source.group()))
                    .map(str::to_owned);
                let groups = read(&self.groups);
                match group.as_deref().and_then(|g| groups.get(g)) {
                    Some(entry) => Some(blocking_enrollment(
                        &registration_id,
                        entry,
                        record.as_ref(),
                        &live,
                    )?),
                    // Its group is gone: nothing admits the device any more.
                    None => None,
                }
            }
        };
        let blocking = match blocking {
            Some(mut e) => {
                let stored = individual.as_ref().map(|s| &s.settings);
                self.stamp(&mut e.settings, stored);
                Some(e)
            }
            None => None,
        };
        // 2. Deregister.
        let record = record.filter(|r| r.status != RegistrationStatus::Deregistered);
        let device_id = record
            .as_ref()
            .and_then(|r| r.device_id.clone())
            .or_else(|| individual.as_ref().and_then(|e| e.device_id.clone()))
            .unwrap_or_else(|| id.to_owned());
        let revoked = record.as_ref().map_or(0, |r| {
            r.issued_certificates.iter().filter(|c| !c.revoked).count()
        });
        let deregistered = record.map(|r| self.deregister(r)).transpose()?;
        if let Some(e) = &blocking {
            self.store.put_enrollment(e)?;
        }
        if let Some(r) = &deregistered {
            self.store.put_registration(r)?;
        }
        // The local hub's twin and queued messages go with it.
        let twin_cleared = self.hub_purged(&device_id)?;
        if blocking.is_some() || deregistered.is_some() || twin_cleared.is_some() {
            self.durable().await?;
            self.written();
        }
        let etag = blocking.as_ref().and_then(|e| e.settings.etag.clone());
        if let Some(e) = blocking {
            let topic = RecordKind::Enrollment.record_topic(e.registration_id.as_str());
            publish.push(Publication::record(topic, &redact_enrollment(e)));
        }
        if let Some(r) = &deregistered {
            let topic = RecordKind::Registration.record_topic(r.registration_id.as_str());
            publish.push(Publication::record(topic, r));
        }
        publish.extend(twin_cleared);
        // 3. Cut its sessions, DPS and hub alike.
        let closed = self
            .cut_off(&[Scope::Registration(&registration_id)], Some(Cut::Retired))
            .await;
        // 4. Clear what it left retained on its topics.
        let purged = retained.purge(format!("devices/{device_id}/#")).await;
        Ok(Applied {
            etag,
            outcome: AdminOutcome::Retired,
            retirement: Some(Retirement::Retired),
            status: Some(ProvisioningStatus::Disabled),
            effects: Effects {
                sessions_closed: Some(closed),
                registrations_deregistered: Some(u32::from(deregistered.is_some())),
                retained_messages_purged: Some(count(purged)),
                revoked_certificates: (revoked > 0).then(|| count(revoked)),
            },
        })
    }
}

/// A disabled individual enrollment that blocks one device of a group, with the
/// device's own credential: its derived keys, or its certificate's thumbprint.
fn blocking_enrollment(
    id: &RegistrationId,
    group: &GroupCredentials,
    record: Option<&RegistrationState>,
    live: &[std::sync::Arc<crate::LiveSession>],
) -> Result<Enrollment, Error> {
    let group_id = &group.group.enrollment_group_id;
    let attestation = match group.group.attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = group
                .group
                .attestation
                .symmetric_key
                .as_ref()
                .ok_or_else(|| unusable(group_id, "it has no keys"))?;
            let derive = |key: &Option<String>| {
                key.as_deref()
                    .map(|k| {
                        edgedps_policies::sas::derive_device_key(k, id.as_str())
                            .map_err(|e| unusable(group_id, &e.to_string()))
                    })
                    .transpose()
            };
            Attestation {
                kind: AttestationType::SymmetricKey,
                x509: None,
                symmetric_key: Some(SymmetricKeyAttestation {
                    primary_key: derive(&keys.primary_key)?,
                    secondary_key: derive(&keys.secondary_key)?,
                }),
                tpm: None,
            }
        }
        AttestationType::X509 => {
            let thumbprint = live
                .iter()
                .find_map(|s| s.device().certificate.as_ref())
                .map(|c| c.thumbprint.clone())
                .or_else(|| {
                    record
                        .and_then(|r| r.x509.as_ref())
                        .and_then(|x| x.certificate_info.as_ref())
                        .map(|info| info.sha256_thumbprint.clone())
                })
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "cannot block `{id}`: the certificate it uses is not known (it has no \
                         registration record with one and no live session); publish a \
                         disabled individual enrollment with its certificate instead"
                    ))
                })?;
            Attestation {
                kind: AttestationType::X509,
                x509: Some(X509Attestation {
                    client_certificates: Some(CertificatePair {
                        primary: Some(CertificateRef {
                            certificate: None,
                            sha256_thumbprint: Some(thumbprint),
                        }),
                        secondary: None,
                    }),
                    signing_certificates: None,
                }),
                symmetric_key: None,
                tpm: None,
            }
        }
        AttestationType::Tpm => return Err(unusable(group_id, "it has a TPM attestation")),
    };
    Ok(Enrollment {
        registration_id: id.clone(),
        device_id: None,
        attestation,
        settings: EnrollmentSettings {
            provisioning_status: ProvisioningStatus::Disabled,
            ..EnrollmentSettings::default()
        },
    })
}

fn unusable(group: &str, reason: &str) -> Error {
    Error::BadGroup {
        group: group.to_owned(),
        reason: reason.to_owned(),
    }
}
