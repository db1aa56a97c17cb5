//! One-step retirement (PROTOCOL B): `dps/admin/retire/{registrationId}`.
//!
//! Takes one device out of service: blocks it (its individual enrollment set to
//! `disabled`, or, for a device that came through a group, a new disabled individual
//! enrollment with the device's own credential, so that enabling it later restores the
//! device), marks its registration `deregistered`, cuts its live sessions and clears
//! its retained `devices/{deviceId}/#` messages. The result and the audit event count
//! each of these. A second retirement of the same device changes nothing and says so.

use edgedps_topics::admin::{
    codes, retire_event_topic, retire_result_topic, AdminOperation, AdminOutcome, AdminResult,
    Attestation, AttestationType, CertificatePair, CertificateRef, Effects, Enrollment,
    EnrollmentSettings, ProvisioningStatus, RecordKind, RetireRequest, Retirement,
    SymmetricKeyAttestation, X509Attestation, MAX_RETIRE_REASON,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity;
use edgedps_topics::registration::{status, RegistrationState};

use crate::admin::{
    bad, count, deregister, enrollment_group_of, internal, redact_enrollment, Applied, Rejection,
};
use crate::registration::to_json;
use crate::sessions::{Cut, Scope};
use crate::{read, EnrollmentSource, GroupEntry, Responder};

impl Responder {
    /// Retires `registration_id` for `operator`; `body` is `{"reason"?}` or empty.
    /// The result goes to `dps/admin/results/retire/{id}`, the audit event to
    /// `dps/events/admin/retire/{id}` and the audit log.
    pub async fn retire(
        &self,
        operator: &str,
        registration_id: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> AdminResult {
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
        let (reason, outcome) = match request {
            Ok(request) => (request.reason, self.retire_device(registration_id).await),
            Err(rejection) => (None, Err(rejection)),
        };
        self.report(
            operator,
            "retire",
            registration_id,
            AdminOperation::Retire,
            outcome,
            reason,
            encoding,
            (
                retire_result_topic(registration_id),
                retire_event_topic(registration_id),
            ),
        )
        .await
    }

    async fn retire_device(&self, id: &str) -> Result<Applied, Rejection> {
        if !identity::valid_registration_id(id) {
            return Err(bad(format!(
                "`{id}` is not a valid registration id (1-128 of a-z A-Z 0-9 - . _ :)"
            )));
        }
        let individual = self.store.enrollment(id).map_err(internal)?;
        let record = self.store.registration(id).map_err(internal)?;
        let live = self.sessions.find(&[Scope::Registration(id)]);
        if individual.is_none() && record.is_none() && live.is_empty() {
            return Err((
                codes::NOT_FOUND,
                format!(
                    "no enrollment, registration or live session for `{id}`; to block a device \
                     of a group that never registered, publish a disabled individual enrollment"
                ),
            ));
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
                    .and_then(enrollment_group_of)
                    .map(str::to_owned)
                    .or_else(|| {
                        live.iter().find_map(|s| match &s.device().source {
                            EnrollmentSource::Group(g) => Some(g.clone()),
                            EnrollmentSource::Individual => None,
                        })
                    });
                let groups = read(&self.groups);
                match group.as_deref().and_then(|g| groups.get(g)) {
                    Some(entry) => Some(blocking_enrollment(id, entry, record.as_ref(), &live)?),
                    // Its group is gone: nothing admits the device any more.
                    None => None,
                }
            }
        };
        let blocking = match blocking {
            Some(mut e) => {
                let stored = individual.as_ref().map(|s| &s.settings);
                self.stamp(&mut e.settings, stored)?;
                Some(e)
            }
            None => None,
        };
        // 2. Deregister.
        let record = record.filter(|r| r.status != status::DEREGISTERED);
        let device_id = record
            .as_ref()
            .and_then(|r| r.device_id.clone())
            .or_else(|| individual.as_ref().and_then(|e| e.device_id.clone()))
            .unwrap_or_else(|| id.to_owned());
        let deregistered = record.map(deregister);
        if let Some(e) = &blocking {
            self.store.put_enrollment(e).map_err(internal)?;
        }
        if let Some(r) = &deregistered {
            self.store.put_registration(r).map_err(internal)?;
        }
        if blocking.is_some() || deregistered.is_some() {
            self.store.durable().await.map_err(internal)?;
        }
        let etag = blocking.as_ref().and_then(|e| e.settings.etag.clone());
        if let Some(e) = blocking {
            let topic = RecordKind::Enrollment.record_topic(&e.registration_id);
            self.publish(topic, to_json(&redact_enrollment(e)), true)
                .await;
        }
        if let Some(r) = &deregistered {
            let topic = RecordKind::Registration.record_topic(&r.registration_id);
            self.publish(topic, to_json(r), true).await;
        }
        // 3. Cut its sessions, DPS and hub alike.
        let closed = self
            .cut_off(&[Scope::Registration(id)], Some(Cut::Retired))
            .await;
        // 4. Clear what it left retained on its topics.
        let purged = self.purge_retained(format!("devices/{device_id}/#")).await;
        Ok(Applied {
            etag,
            outcome: AdminOutcome::Retired,
            retirement: Some(Retirement::Retired),
            status: Some(ProvisioningStatus::Disabled),
            effects: Effects {
                sessions_closed: Some(closed),
                registrations_deregistered: Some(u32::from(deregistered.is_some())),
                retained_messages_purged: Some(count(purged)),
                revoked_certificates: None,
            },
        })
    }
}

/// A disabled individual enrollment that blocks one device of a group, with the
/// device's own credential: its derived keys, or its certificate's thumbprint.
fn blocking_enrollment(
    id: &str,
    group: &GroupEntry,
    record: Option<&RegistrationState>,
    live: &[std::sync::Arc<crate::LiveSession>],
) -> Result<Enrollment, Rejection> {
    let group_id = &group.group.enrollment_group_id;
    let attestation = match group.group.attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = group
                .group
                .attestation
                .symmetric_key
                .as_ref()
                .ok_or_else(|| internal(format!("group `{group_id}` has no keys")))?;
            let derive = |key: &Option<String>| {
                key.as_deref()
                    .map(|k| edgedps_policies::sas::derive_device_key(k, id).map_err(internal))
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
                    (
                        codes::CONFLICT,
                        format!(
                            "cannot block `{id}`: the certificate it uses is not known (it has no \
                             registration record with one and no live session); publish a \
                             disabled individual enrollment with its certificate instead"
                        ),
                    )
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
        AttestationType::Tpm => {
            return Err(internal(format!(
                "group `{group_id}` has a TPM attestation"
            )))
        }
    };
    Ok(Enrollment {
        registration_id: id.to_owned(),
        device_id: None,
        attestation,
        settings: EnrollmentSettings {
            provisioning_status: ProvisioningStatus::Disabled,
            ..EnrollmentSettings::default()
        },
    })
}
