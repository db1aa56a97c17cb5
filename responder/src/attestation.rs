//! Connect-time attestation (PROTOCOL A2, A6): the CONNECT's client id, username and
//! password, and the certificate chain of the TLS handshake, against the enrollments.
//!
//! An enabled individual enrollment for the registration id decides whenever there is
//! one; otherwise the enrollment groups do. A credential that verifies against a disabled
//! enrollment still connects: the register answers `disabled`, as DPS does. A disabled
//! individual enrollment blocks the device whatever it presents (DPS: that is how one
//! device or one certificate of a group is blocked), so a device whose group accepts
//! its credential connects too, and learns `disabled`. A certificate on a revocation
//! list is refused.

use std::sync::Arc;

use edgedps_policies::sas::SasToken;
use edgedps_policies::x509::{self, CertificateInfo};
use edgedps_topics::admin::{Attestation, AttestationType, Enrollment, ProvisioningStatus};
use edgedps_topics::identity::{self, MAX_X509_REGISTRATION_ID};

use crate::{read, Responder};

/// What the device presented.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// The CONNECT password.
    Sas(&'a str),
    /// The TLS client chain, leaf first.
    X509(&'a [Vec<u8>]),
}

/// Which enrollment admitted the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentSource {
    Individual,
    Group(String),
}

/// A device whose credential verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// As the device spelled it in the CONNECT.
    pub registration_id: String,
    pub source: EnrollmentSource,
    pub kind: AttestationType,
    /// X.509: the chain the device presented.
    pub certificate: Option<Arc<PresentedCertificate>>,
}

/// The certificate chain of an X.509 device, kept for the life of its session so that a
/// new revocation list can be checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedCertificate {
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// SHA-256 of the leaf, upper-case hex.
    pub thumbprint: String,
    /// DER of each certificate's issuer name: a new revocation list from one of them
    /// may revoke this chain.
    pub issuers: Vec<Vec<u8>>,
}

/// Why a CONNECT is refused, with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// CONNACK 2.
    #[error("client id is not a valid registration id: {0}")]
    BadClientId(String),
    /// CONNACK 4.
    #[error("malformed username or token: {0}")]
    Malformed(String),
    /// CONNACK 5.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// CONNACK 3: the store failed; the device may retry.
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl Responder {
    /// Decides a device CONNECT. `now` is seconds since the Unix epoch.
    /// The decision is also published as an event on `dps/events/attestation/{id}`.
    pub fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        credential: Credential<'_>,
        now: u64,
    ) -> Result<Attested, Refusal> {
        let decision = self.decide_attestation(client_id, username, credential, now);
        let mut event = serde_json::json!({
            "registrationId": client_id,
            "timestampUtc": crate::timestamp_now(),
        });
        match &decision {
            Ok(attested) => {
                event["outcome"] = "accepted".into();
                event["attestation"] = serde_json::to_value(attested.kind).unwrap_or_default();
                if let EnrollmentSource::Group(group) = &attested.source {
                    event["enrollmentGroupId"] = group.clone().into();
                }
            }
            Err(refusal) => {
                event["outcome"] = "refused".into();
                // Reasons name ids, certificates' names and times, never keys or tokens.
                event["reason"] = refusal.to_string().into();
            }
        }
        self.try_publish(
            edgedps_topics::admin::attestation_event_topic(client_id),
            crate::registration::to_json(&event),
        );
        decision
    }

    fn decide_attestation(
        &self,
        client_id: &str,
        username: &str,
        credential: Credential<'_>,
        now: u64,
    ) -> Result<Attested, Refusal> {
        if !identity::valid_registration_id(client_id) {
            return Err(Refusal::BadClientId(client_id.to_owned()));
        }
        let parsed =
            identity::parse_username(username).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if parsed.id_scope != self.settings.id_scope {
            return Err(Refusal::NotAuthorized(format!(
                "id scope `{}` is not this service's",
                parsed.id_scope
            )));
        }
        if parsed.registration_id != client_id {
            return Err(Refusal::NotAuthorized(format!(
                "username names `{}` but the client id is `{client_id}`",
                parsed.registration_id
            )));
        }
        let individual = self
            .store
            .enrollment(client_id)
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        match credential {
            Credential::Sas(password) => self.attest_sas(client_id, password, individual, now),
            Credential::X509(chain) => self.attest_x509(client_id, chain, individual, now),
        }
    }

    fn attest_sas(
        &self,
        registration_id: &str,
        password: &str,
        individual: Option<Enrollment>,
        now: u64,
    ) -> Result<Attested, Refusal> {
        let token = SasToken::parse(password).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let scope = &self.settings.id_scope;
        if let Some(enrollment) = individual {
            let verdict = match symmetric_keys(&enrollment.attestation) {
                None => Err(Refusal::NotAuthorized(format!(
                    "individual enrollment `{registration_id}` is not a symmetric-key enrollment"
                ))),
                Some(keys) => token
                    .verify(scope, registration_id, &keys, now)
                    .map(|_| Attested {
                        registration_id: registration_id.to_owned(),
                        source: EnrollmentSource::Individual,
                        kind: AttestationType::SymmetricKey,
                        certificate: None,
                    })
                    .map_err(|e| Refusal::NotAuthorized(e.to_string())),
            };
            let refusal = match verdict {
                Ok(attested) => return Ok(attested),
                Err(refusal) => refusal,
            };
            // A disabled individual enrollment blocks a device of a group: the group's
            // credential still connects, so the device can learn `disabled`.
            if enrollment.settings.provisioning_status != ProvisioningStatus::Disabled {
                return Err(refusal);
            }
            return self
                .attest_sas_group(registration_id, &token, now)
                .map_err(|_| refusal);
        }
        self.attest_sas_group(registration_id, &token, now)
    }

    fn attest_sas_group(
        &self,
        registration_id: &str,
        token: &SasToken<'_>,
        now: u64,
    ) -> Result<Attested, Refusal> {
        let scope = &self.settings.id_scope;
        let groups = read(&self.groups);
        let mut last_error = None;
        for entry in groups.values() {
            let Some(group_keys) = symmetric_keys(&entry.group.attestation) else {
                continue;
            };
            let mut derived = Vec::with_capacity(2);
            for key in group_keys {
                derived.push(
                    edgedps_policies::sas::derive_device_key(key, registration_id)
                        .map_err(|e| Refusal::Unavailable(e.to_string()))?,
                );
            }
            let derived: Vec<&str> = derived.iter().map(String::as_str).collect();
            match token.verify(scope, registration_id, &derived, now) {
                Ok(_) => {
                    return Ok(Attested {
                        registration_id: registration_id.to_owned(),
                        source: EnrollmentSource::Group(entry.group.enrollment_group_id.clone()),
                        kind: AttestationType::SymmetricKey,
                        certificate: None,
                    })
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(Refusal::NotAuthorized(match last_error {
            Some(e) => format!("no enrollment accepts the token ({e})"),
            None => format!("no enrollment for `{registration_id}`"),
        }))
    }

    fn attest_x509(
        &self,
        registration_id: &str,
        chain: &[Vec<u8>],
        individual: Option<Enrollment>,
        now: u64,
    ) -> Result<Attested, Refusal> {
        let Some(leaf) = chain.first() else {
            return Err(Refusal::NotAuthorized(
                "no password and no client certificate".into(),
            ));
        };
        if registration_id.len() > MAX_X509_REGISTRATION_ID {
            return Err(Refusal::BadClientId(format!(
                "{registration_id}: X.509 registration ids are at most 64 characters"
            )));
        }
        let leaf_info =
            CertificateInfo::read(leaf).map_err(|e| Refusal::NotAuthorized(e.to_string()))?;
        let cn = leaf_info.common_name.as_deref().unwrap_or_default();
        if !cn.eq_ignore_ascii_case(registration_id) {
            return Err(Refusal::NotAuthorized(format!(
                "certificate CN `{cn}` is not the client id `{registration_id}`"
            )));
        }
        let source = match individual {
            Some(enrollment) => match individual_certificate(&enrollment, leaf, &leaf_info, now) {
                Ok(()) => EnrollmentSource::Individual,
                // A disabled individual enrollment blocks a certificate of a group: the
                // group's chain still connects, so the device can learn `disabled`.
                Err(refusal)
                    if enrollment.settings.provisioning_status == ProvisioningStatus::Disabled =>
                {
                    self.x509_group(registration_id, chain, &leaf_info, now)
                        .map_err(|_| refusal)?
                }
                Err(refusal) => return Err(refusal),
            },
            None => self.x509_group(registration_id, chain, &leaf_info, now)?,
        };
        if let Some(revoked) = self.revoked(chain) {
            return Err(Refusal::NotAuthorized(revoked));
        }
        let mut issuers = vec![leaf_info.issuer];
        issuers.extend(
            chain[1..]
                .iter()
                .filter_map(|der| CertificateInfo::read(der).ok())
                .map(|info| info.issuer),
        );
        Ok(Attested {
            registration_id: registration_id.to_owned(),
            source,
            kind: AttestationType::X509,
            certificate: Some(Arc::new(PresentedCertificate {
                chain: chain.to_vec(),
                thumbprint: x509::thumbprint(leaf),
                issuers,
            })),
        })
    }

    /// DPS: the first group found walking the chain from the leaf towards the root
    /// decides. A group's certificate is found by the issuer of a presented one.
    fn x509_group(
        &self,
        registration_id: &str,
        chain: &[Vec<u8>],
        leaf_info: &CertificateInfo,
        now: u64,
    ) -> Result<EnrollmentSource, Refusal> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Refusal::NotAuthorized("no client certificate".into()));
        };
        let groups = read(&self.groups);
        for (depth, cert) in chain.iter().enumerate() {
            let issuer = if depth == 0 {
                leaf_info.issuer.clone()
            } else {
                match CertificateInfo::read(cert) {
                    Ok(info) => info.issuer,
                    Err(_) => break,
                }
            };
            for entry in groups.values() {
                if entry.group.attestation.kind != AttestationType::X509 {
                    continue;
                }
                for signing in &entry.signing {
                    if signing.subject != issuer {
                        continue;
                    }
                    let path = &intermediates[..depth.min(intermediates.len())];
                    let group = &entry.group.enrollment_group_id;
                    return match x509::check_group_chain(leaf, path, signing, now) {
                        Ok(()) => Ok(EnrollmentSource::Group(group.clone())),
                        Err(e) => Err(Refusal::NotAuthorized(format!(
                            "enrollment group `{group}`: {e}"
                        ))),
                    };
                }
            }
        }
        Err(Refusal::NotAuthorized(format!(
            "no enrollment or enrollment group for the certificate of `{registration_id}`"
        )))
    }

    /// Why `chain` is revoked, if a revocation list revokes one of its certificates.
    pub(crate) fn revoked(&self, chain: &[Vec<u8>]) -> Option<String> {
        let lists = read(&self.crls);
        if lists.is_empty() {
            return None;
        }
        edgedps_policies::revocation::revoked_in(lists.values(), chain).map(|r| {
            format!(
                "certificate {} of the chain (serial {}, issued by `{}`) is revoked",
                r.position, r.serial, r.issuer_name
            )
        })
    }
}

/// Individual enrollment: the leaf is its primary or secondary certificate.
fn individual_certificate(
    enrollment: &Enrollment,
    leaf: &[u8],
    leaf_info: &CertificateInfo,
    now: u64,
) -> Result<(), Refusal> {
    let registration_id = &enrollment.registration_id;
    let certs = enrollment
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .filter(|_| enrollment.attestation.kind == AttestationType::X509)
        .ok_or_else(|| {
            Refusal::NotAuthorized(format!(
                "individual enrollment `{registration_id}` is not an X.509 enrollment"
            ))
        })?;
    let mut last = x509::X509Error::Mismatch;
    for cert in [&certs.primary, &certs.secondary].into_iter().flatten() {
        match x509::check_individual(leaf, leaf_info, cert, now) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(Refusal::NotAuthorized(format!(
        "individual enrollment `{registration_id}`: {last}"
    )))
}

/// Primary then secondary key of a symmetric-key attestation.
fn symmetric_keys(attestation: &Attestation) -> Option<Vec<&str>> {
    if attestation.kind != AttestationType::SymmetricKey {
        return None;
    }
    let keys = attestation.symmetric_key.as_ref()?;
    let list: Vec<&str> = [&keys.primary_key, &keys.secondary_key]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    (!list.is_empty()).then_some(list)
}
