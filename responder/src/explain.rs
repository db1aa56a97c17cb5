//! `dps/admin/explain/{registrationId}` (PROTOCOL B): what a registration of the device
//! would do now, and why, answered on `dps/admin/results/explain/{registrationId}`.
//!
//! The explanation runs the same decisions a registration does (attestation for a
//! certificate chain, the access rule, the group's limits, re-provisioning, allocation)
//! on what the store holds now, and writes nothing: no record, no limit counter, no
//! allocator called.

use edgedps_policies::access::{Access, RegisterAnswer};
use edgedps_policies::allocation;
use edgedps_policies::attestation::{self, Attested, Credential, EnrollmentSource, Enrollments};
use edgedps_policies::reprovision::{self, Registering};
use edgedps_topics::admin::{
    explain_result_topic, AllocationPolicy, AttestationType, ProvisioningStatus,
};
use edgedps_topics::allocation::{
    ConsideredEnrollment, ExplainOutcome, ExplainRequest, ExplainedAllocation, Explanation,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity::RegistrationId;

use crate::{read, timestamp_now, unix_now, Error, Publication, Responder};

/// A certificate chain as attestation keeps it.
type Presentation = std::sync::Arc<attestation::PresentedCertificate>;

/// What the explanation assumes the device presents.
enum Presented {
    Chain(Vec<Vec<u8>>),
    Kind(AttestationType),
    Unsaid,
}

impl Responder {
    /// Explains a registration of `registration_id`; the answer for the results topic.
    pub fn explain(&self, registration_id: &str, body: &[u8], encoding: Encoding) -> Publication {
        let topic = explain_result_topic(registration_id);
        let explanation = match self.explanation(registration_id, body, encoding) {
            Ok(explanation) => explanation,
            Err(error) => Explanation {
                ok: false,
                registration_id: registration_id.to_owned(),
                attestation: None,
                outcome: ExplainOutcome::Unknown,
                enrollment: None,
                reason: error.to_string(),
                considered: Vec::new(),
                current_hub: None,
                allocation: None,
                initial_twin: None,
                error_code: Some(error.admin_code()),
                timestamp_utc: timestamp_now(),
            },
        };
        Publication::message(topic, encoding.encode(&explanation))
    }

    fn explanation(
        &self,
        registration_id: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Explanation, Error> {
        let id = RegistrationId::parse(registration_id).map_err(|_| {
            Error::MalformedBody(format!(
                "`{registration_id}` is not a valid registration id"
            ))
        })?;
        let presented = presented(body, encoding)?;
        let enrollment = self.read_enrollment(&id)?;
        let registration = self.store.registration(&id)?;
        let mut considered = Vec::new();
        let individual = enrollment.individual.clone();
        if let Some(e) = &individual {
            considered.push(ConsideredEnrollment {
                kind: "individual".into(),
                id: e.registration_id.to_string(),
                provisioning_status: e.settings.provisioning_status,
                matches: false,
                reason: String::new(),
            });
        }
        // The kind of credential: given, or the enrollment's, or the record's.
        let kind = match &presented {
            Presented::Chain(_) => Some(AttestationType::X509),
            Presented::Kind(kind) => Some(*kind),
            Presented::Unsaid => individual.as_ref().map(|e| e.attestation.kind).or_else(|| {
                registration.as_ref().and_then(|r| {
                    if r.x509.is_some() {
                        Some(AttestationType::X509)
                    } else if r.symmetric_key.is_some() {
                        Some(AttestationType::SymmetricKey)
                    } else {
                        None
                    }
                })
            }),
        };
        let mut explanation = Explanation {
            ok: true,
            registration_id: registration_id.to_owned(),
            attestation: kind,
            outcome: ExplainOutcome::Unknown,
            enrollment: None,
            reason: String::new(),
            considered: Vec::new(),
            current_hub: registration
                .as_ref()
                .filter(|r| r.is_assigned())
                .and_then(|r| r.assigned_hub.clone()),
            allocation: None,
            initial_twin: None,
            error_code: None,
            timestamp_utc: timestamp_now(),
        };
        // Which enrollment accepts the device.
        let source = match (&presented, kind) {
            (Presented::Chain(chain), _) => {
                let groups = read(&self.groups);
                let lists = read(&self.crls);
                let enrollments = Enrollments {
                    id_scope: &self.settings.id_scope,
                    individual: individual.as_ref(),
                    groups: &groups,
                    revocation_lists: &lists,
                    now: unix_now(),
                    tpm_key: None,
                };
                attestation::attest(id.clone(), Credential::X509(chain), &enrollments)
                    .map(|attested| (attested.source, attested.certificate))
                    .map_err(|e| e.to_string())
            }
            (_, Some(AttestationType::Tpm)) => match &individual {
                Some(e) if e.attestation.kind == AttestationType::Tpm => {
                    Ok((EnrollmentSource::Individual, None))
                }
                _ => Err("TPM devices need an individual TPM enrollment".to_owned()),
            },
            (_, Some(AttestationType::X509)) if individual.is_none() => Err(
                "no individual enrollment: give the device's certificate chain (PEM) to find its group".to_owned(),
            ),
            (_, Some(AttestationType::X509)) => Ok((EnrollmentSource::Individual, None)),
            (_, Some(AttestationType::SymmetricKey)) | (_, None) => {
                self.symmetric_source(&id, individual.as_ref(), registration.as_ref())
            }
        };
        self.groups_considered(&id, kind, &mut considered);
        let (source, certificate) = match source {
            Ok(found) => found,
            Err(reason) => {
                mark(&mut considered, None, &reason);
                explanation.reason = reason;
                explanation.considered = considered;
                return Ok(explanation);
            }
        };
        let device = Attested {
            registration_id: id.clone(),
            source: source.clone(),
            kind: kind.unwrap_or(AttestationType::SymmetricKey),
            certificate,
            token_expires: None,
            proven: true,
        };
        let (outcome, label) = match &source {
            EnrollmentSource::Individual => (ExplainOutcome::Individual, "individual".to_owned()),
            EnrollmentSource::Group(group) => (ExplainOutcome::Group, format!("group:{group}")),
        };
        explanation.enrollment = Some(label);
        mark(&mut considered, Some(&source), "");
        let standing = self.standing_from(&device, enrollment, registration.clone());
        if let Access::OutOfService(why) = standing.access(&device) {
            explanation.outcome = match why.register_answer() {
                RegisterAnswer::Disabled
                    if !matches!(why, edgedps_policies::access::OutOfService::Blocked) =>
                {
                    ExplainOutcome::Disabled
                }
                _ => ExplainOutcome::Blocked,
            };
            explanation.reason = format!(
                "{}; a register would be answered {}",
                why.reason(),
                match why.register_answer() {
                    RegisterAnswer::Disabled => "`disabled`",
                    RegisterAnswer::NotFound => "404 (404201)",
                    RegisterAnswer::Unauthorized => "401 (401002)",
                }
            );
            explanation.considered = considered;
            return Ok(explanation);
        }
        let settings = self.resolve(&device, &standing)?.settings;
        if let EnrollmentSource::Group(group) = &source {
            if let Some(refusal) = self.group_refusal(group, &id, &standing)? {
                explanation.outcome = ExplainOutcome::Blocked;
                explanation.reason = refusal;
                explanation.considered = considered;
                return Ok(explanation);
            }
        }
        explanation.outcome = outcome;
        let policy = settings
            .allocation_policy
            .unwrap_or(self.settings.allocation_policy);
        let reprovision_policy = settings.reprovision_policy.unwrap_or_default();
        let existing = standing.registration.as_ref();
        if policy == AllocationPolicy::GeoLatency {
            self.latencies.want();
        }
        let linked = self.linked_hubs_measured();
        let mut allocated = match reprovision::allocates(existing, reprovision_policy) {
            true => allocation::explain(policy, &id, &settings.iot_hubs, &linked),
            false => ExplainedAllocation {
                policy,
                candidates: Vec::new(),
                hub: explanation.current_hub.clone(),
                reason: "kept: reprovisionPolicy.updateHubAssignment is false".into(),
            },
        };
        // The twin the record would get, as the registration makes it.
        let now = timestamp_now();
        let device_id = match &source {
            EnrollmentSource::Individual => individual
                .as_ref()
                .and_then(|e| e.device_id.clone())
                .unwrap_or_else(|| id.to_string()),
            EnrollmentSource::Group(_) => id.to_string(),
        };
        let registering = Registering {
            registration_id: &id,
            device_id: &device_id,
            enrollment_group_id: source.group(),
            attestation: device.kind,
            certificate_info: None,
            policy: reprovision_policy,
            initial_twin: settings.initial_twin.as_ref(),
            now: &now,
        };
        let hub = allocated.hub.clone();
        let custom = policy == AllocationPolicy::Custom;
        let record = reprovision::reprovision(existing, registering, || {
            hub.clone()
                .or_else(|| custom.then(|| "(the allocator's answer)".to_owned()))
                .ok_or(allocation::AllocationError::NoHub)
        });
        if let Ok(record) = record {
            explanation.initial_twin = record.record().initial_twin.clone();
        }
        if custom && allocated.hub.is_none() {
            allocated.reason = format!(
                "{}; the allocator may also replace the initial twin",
                allocated.reason
            );
        }
        explanation.reason = match &allocated.hub {
            Some(hub) => format!("would be assigned to {hub}: {}", allocated.reason),
            None => allocated.reason.clone(),
        };
        explanation.allocation = Some(allocated);
        explanation.considered = considered;
        Ok(explanation)
    }

    /// A symmetric-key device: its individual enrollment, else the group its record
    /// names, else the only symmetric-key group (with several, the device's key decides
    /// and the first in order whose pattern admits it is explained).
    fn symmetric_source(
        &self,
        id: &RegistrationId,
        individual: Option<&edgedps_topics::admin::Enrollment>,
        registration: Option<&edgedps_topics::registration::RegistrationState>,
    ) -> Result<(EnrollmentSource, Option<Presentation>), String> {
        if individual.is_some() {
            return Ok((EnrollmentSource::Individual, None));
        }
        let groups = read(&self.groups);
        let symmetric: Vec<&str> = groups
            .values()
            .filter(|g| g.group.attestation.kind == AttestationType::SymmetricKey)
            .map(|g| g.group.enrollment_group_id.as_str())
            .collect();
        if let Some(group) = registration.and_then(|r| r.enrollment_group_id()) {
            if symmetric.contains(&group) {
                return Ok((EnrollmentSource::Group(group.to_owned()), None));
            }
        }
        let admitting = symmetric
            .iter()
            .find(|g| {
                groups
                    .get(**g)
                    .is_some_and(|e| e.admits_id(id.as_str()).is_ok())
            })
            .or(symmetric.first());
        match admitting {
            Some(group) => Ok((EnrollmentSource::Group((*group).to_owned()), None)),
            None => Err(format!(
                "no enrollment and no symmetric-key group for `{id}`"
            )),
        }
    }

    /// Every group that could take a device of `kind`, added to `considered`.
    fn groups_considered(
        &self,
        id: &RegistrationId,
        kind: Option<AttestationType>,
        considered: &mut Vec<ConsideredEnrollment>,
    ) {
        let groups = read(&self.groups);
        for entry in groups.values() {
            let group = &entry.group;
            if kind.is_some_and(|k| k != group.attestation.kind) {
                continue;
            }
            let reason = match entry.admits_id(id.as_str()) {
                Err(reason) => reason,
                Ok(()) => String::new(),
            };
            considered.push(ConsideredEnrollment {
                kind: "group".into(),
                id: group.enrollment_group_id.clone(),
                provisioning_status: group.settings.provisioning_status,
                matches: false,
                reason,
            });
        }
    }

    /// Why the group's limits would refuse the device now (its pattern, its size), if
    /// they would. The rate is not predicted: it depends on the moment.
    fn group_refusal(
        &self,
        group: &str,
        id: &RegistrationId,
        standing: &crate::Standing,
    ) -> Result<Option<String>, Error> {
        let (admitted, limits) = match read(&self.groups).get(group) {
            Some(entry) => (entry.admits_id(id.as_str()), entry.group.limits.clone()),
            None => return Ok(None),
        };
        if let Err(reason) = admitted {
            return Ok(Some(format!("{reason}: a CONNECT would be refused (401)")));
        }
        let Some(max) = limits.and_then(|l| l.max_devices) else {
            return Ok(None);
        };
        let member = standing
            .registration
            .as_ref()
            .is_some_and(|r| r.is_assigned() && r.enrollment_group_id() == Some(group));
        if member {
            return Ok(None);
        }
        let held = self.group_members(group)?.len();
        Ok((held >= usize::try_from(max).unwrap_or(usize::MAX)).then(|| {
            format!(
                "enrollment group `{group}` holds {held} of its {max} devices (limits.maxDevices): a register would be refused (403001)"
            )
        }))
    }
}

/// Marks the enrollment `source` names as the match; the others say why not.
fn mark(considered: &mut [ConsideredEnrollment], source: Option<&EnrollmentSource>, refusal: &str) {
    for entry in considered.iter_mut() {
        let matches = match source {
            Some(EnrollmentSource::Individual) => entry.kind == "individual",
            Some(EnrollmentSource::Group(group)) => entry.kind == "group" && entry.id == *group,
            None => false,
        };
        entry.matches = matches;
        if matches {
            entry.reason = match entry.provisioning_status {
                ProvisioningStatus::Enabled => "accepts the device".into(),
                ProvisioningStatus::Disabled => "accepts the device, and is disabled".into(),
            };
        } else if entry.reason.is_empty() {
            entry.reason = match (source, entry.kind.as_str()) {
                (Some(EnrollmentSource::Individual), "group") => {
                    "the individual enrollment decides for this id".into()
                }
                (Some(_), _) => "another enrollment accepts the device first".into(),
                (None, _) => refusal.to_owned(),
            };
        }
    }
}

/// What the body says the device presents: nothing, a PEM chain, or an
/// [`ExplainRequest`].
fn presented(body: &[u8], encoding: Encoding) -> Result<Presented, Error> {
    let text = std::str::from_utf8(body).unwrap_or_default().trim();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Presented::Unsaid);
    }
    if text.starts_with("-----BEGIN") {
        return chain(text);
    }
    let request: ExplainRequest = match encoding {
        Encoding::Json => serde_json::from_slice(body)
            .map_err(|e| Error::MalformedBody(format!("explain body: {e}")))?,
        Encoding::Cbor => ciborium::from_reader(body)
            .map_err(|e| Error::MalformedBody(format!("explain body: {e}")))?,
    };
    match (request.certificate_chain, request.attestation) {
        (Some(pem), _) => chain(&pem),
        (None, Some(kind)) => Ok(Presented::Kind(kind)),
        (None, None) => Ok(Presented::Unsaid),
    }
}

fn chain(pem: &str) -> Result<Presented, Error> {
    edgedps_policies::x509::pem_chain(pem)
        .map(Presented::Chain)
        .map_err(|e| Error::MalformedBody(format!("certificate chain: {e}")))
}
