//! Connect-time attestation (PROTOCOL A2, A6): which enrollment, if any, accepts what a
//! device presented at CONNECT (its client id, username and password, or the certificate
//! chain of the TLS handshake).
//!
//! Which enrollment wins (DPS): an individual enrollment for the registration id decides
//! whenever there is one; otherwise the enrollment groups do. A credential that verifies
//! against a disabled enrollment still connects: the register answers `disabled`, as DPS
//! does. A disabled individual enrollment blocks the device whatever it presents (that
//! is how one device or one certificate of a group is blocked), so a device whose group
//! accepts its credential connects too, and learns `disabled`. A certificate on a
//! revocation list is refused.
//!
//! Values in (the enrollments, the lists, the time), a verdict out: the responder reads
//! the store and calls [`attest`].

use std::collections::BTreeMap;
use std::sync::Arc;

use edgedps_topics::admin::{
    Attestation, AttestationType, Enrollment, EnrollmentGroup, ProvisioningStatus,
};
use edgedps_topics::identity::{self, RegistrationId, MAX_X509_REGISTRATION_ID};

use crate::revocation::RevocationList;
use crate::sas::SasToken;
use crate::x509::{self, CertificateInfo, SigningCertificate};

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

impl EnrollmentSource {
    pub fn group(&self) -> Option<&str> {
        match self {
            EnrollmentSource::Individual => None,
            EnrollmentSource::Group(group) => Some(group),
        }
    }
}

/// A device whose credential verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// As the device spelled it in the CONNECT.
    pub registration_id: RegistrationId,
    pub source: EnrollmentSource,
    pub kind: AttestationType,
    /// X.509: the chain the device presented.
    pub certificate: Option<Arc<PresentedCertificate>>,
    /// SAS: when the token it connected with expires (Unix seconds).
    pub token_expires: Option<u64>,
    /// False only for a TPM device that came without a token: it may ask for a
    /// challenge (its register is answered 401 with one) and nothing else.
    pub proven: bool,
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

impl PresentedCertificate {
    /// A chain (DER, leaf first) whose leaf's issuer name (`leaf_issuer`, DER) was read
    /// already: the issuers of the rest are read here.
    pub fn of(chain: &[Vec<u8>], leaf_issuer: Vec<u8>) -> PresentedCertificate {
        let mut issuers = vec![leaf_issuer];
        issuers.extend(
            chain
                .iter()
                .skip(1)
                .filter_map(|der| CertificateInfo::read(der).ok())
                .map(|info| info.issuer),
        );
        PresentedCertificate {
            thumbprint: chain
                .first()
                .map(|leaf| x509::thumbprint(leaf))
                .unwrap_or_default(),
            chain: chain.to_vec(),
            issuers,
        }
    }
}

/// Why a CONNECT is refused, with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("client id is not a valid registration id: {0}")]
    BadClientId(String),
    #[error("malformed username or token: {0}")]
    Malformed(String),
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// A stored enrollment cannot be used (the device may retry once it is fixed).
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

/// An enrollment group with its signing certificates read once.
#[derive(Debug, Clone)]
pub struct GroupCredentials {
    pub group: EnrollmentGroup,
    /// The primary and secondary signing certificates.
    pub signing: Vec<SigningCertificate>,
    /// The same, as DER: the CAs a revocation list may come from.
    pub signing_der: Vec<Vec<u8>>,
    /// `limits.registrationIdPattern`, compiled; `Err` (every id refused) if a stored
    /// pattern no longer compiles.
    pub id_pattern: Option<Result<regex::Regex, String>>,
}

impl GroupCredentials {
    pub fn new(group: EnrollmentGroup) -> Result<GroupCredentials, x509::X509Error> {
        let mut signing = Vec::new();
        let mut signing_der = Vec::new();
        if let Some(certs) = group
            .attestation
            .x509
            .as_ref()
            .and_then(|x| x.signing_certificates.as_ref())
        {
            for cert in [&certs.primary, &certs.secondary].into_iter().flatten() {
                if let Some(pem) = &cert.certificate {
                    let der = x509::pem_to_der(pem)?;
                    signing.push(SigningCertificate::from_der(&der)?);
                    signing_der.push(der);
                }
            }
        }
        let id_pattern = group
            .limits
            .as_ref()
            .and_then(|l| l.registration_id_pattern.as_deref())
            .map(crate::validation::id_pattern);
        Ok(GroupCredentials {
            group,
            signing,
            signing_der,
            id_pattern,
        })
    }

    /// Whether the group's `registrationIdPattern` admits `registration_id`; `Err` with
    /// the reason when it does not.
    pub fn admits_id(&self, registration_id: &str) -> Result<(), String> {
        let group = &self.group.enrollment_group_id;
        match &self.id_pattern {
            None => Ok(()),
            Some(Ok(pattern)) if pattern.is_match(registration_id) => Ok(()),
            Some(Ok(_)) => Err(format!(
                "registration id `{registration_id}` does not match enrollment group `{group}`'s registrationIdPattern"
            )),
            Some(Err(reason)) => Err(format!(
                "enrollment group `{group}`'s stored registrationIdPattern is unusable: {reason}"
            )),
        }
    }
}

/// What attestation reads: the service's id scope, the device's individual enrollment
/// (if any), the groups and the revocation lists, and the time (Unix seconds).
pub struct Enrollments<'a> {
    pub id_scope: &'a str,
    pub individual: Option<&'a Enrollment>,
    pub groups: &'a BTreeMap<String, GroupCredentials>,
    pub revocation_lists: &'a BTreeMap<String, RevocationList>,
    pub now: u64,
    /// A TPM device's key for this audience (base64): the registration key of the
    /// challenge it was last sent at provisioning, the hub key it was given at a hub.
    pub tpm_key: Option<&'a str>,
}

/// Who a CONNECT says it is: the client id, checked against the username and the
/// service's id scope. Only then are the enrollments read and [`attest`] called.
pub fn claim(
    client_id: &str,
    username: &str,
    id_scope: &str,
) -> Result<RegistrationId, AttestationError> {
    let registration_id = RegistrationId::parse(client_id)
        .map_err(|_| AttestationError::BadClientId(client_id.to_owned()))?;
    let parsed = identity::parse_username(username)
        .map_err(|e| AttestationError::Malformed(e.to_string()))?;
    if parsed.id_scope != id_scope {
        return Err(AttestationError::NotAuthorized(format!(
            "id scope `{}` is not this service's",
            parsed.id_scope
        )));
    }
    if parsed.registration_id != client_id {
        return Err(AttestationError::NotAuthorized(format!(
            "username names `{}` but the client id is `{client_id}`",
            parsed.registration_id
        )));
    }
    Ok(registration_id)
}

/// Who a hub CONNECT (PROTOCOL E) says it is: the client id is the device id, the
/// username (parsed by the caller, which chose the hub path by it) names the same device
/// and a hub this gateway serves (`is_local`). Returns the device id and the hub's host
/// name as the username spells it.
pub fn claim_hub<'u>(
    client_id: &str,
    parsed: &identity::HubUsername<'u>,
    is_local: impl Fn(&str) -> bool,
) -> Result<(RegistrationId, &'u str), AttestationError> {
    let device_id = RegistrationId::parse(client_id)
        .map_err(|_| AttestationError::BadClientId(client_id.to_owned()))?;
    if parsed.device_id != client_id {
        return Err(AttestationError::NotAuthorized(format!(
            "username names device `{}` but the client id is `{client_id}`",
            parsed.device_id
        )));
    }
    if !is_local(parsed.host_name) {
        return Err(AttestationError::NotAuthorized(format!(
            "hub `{}` is not served by this gateway",
            parsed.host_name
        )));
    }
    Ok((device_id, parsed.host_name))
}

/// Decides whether `credential` proves `registration_id` (see [`claim`]).
pub fn attest(
    registration_id: RegistrationId,
    credential: Credential<'_>,
    enrollments: &Enrollments<'_>,
) -> Result<Attested, AttestationError> {
    attest_for(registration_id, credential, enrollments, Audience::Dps)
}

/// Decides whether `credential` proves the device of a hub CONNECT (see [`claim_hub`]),
/// registered as `registration_id` (its device id is the registration id, or an
/// individual enrollment's own `deviceId`): the same enrollments and keys as
/// provisioning, but a SAS token must name `{host_name}/devices/{device_id}`. A token
/// made for provisioning is refused here, and a hub token at provisioning.
pub fn attest_hub(
    registration_id: RegistrationId,
    device_id: &str,
    host_name: &str,
    credential: Credential<'_>,
    enrollments: &Enrollments<'_>,
) -> Result<Attested, AttestationError> {
    let audience = Audience::Hub {
        host_name,
        device_id,
    };
    attest_for(registration_id, credential, enrollments, audience)
}

/// What a SAS token must name.
#[derive(Debug, Clone, Copy)]
enum Audience<'a> {
    /// `{idScope}/registrations/{registrationId}`.
    Dps,
    /// `{hostName}/devices/{deviceId}`.
    Hub {
        host_name: &'a str,
        device_id: &'a str,
    },
}

impl Audience<'_> {
    fn verify(
        self,
        token: &SasToken<'_>,
        enrollments: &Enrollments<'_>,
        id: &str,
        keys: &[&str],
    ) -> Result<crate::sas::KeyUsed, crate::sas::SasError> {
        match self {
            Audience::Dps => token.verify(enrollments.id_scope, id, keys, enrollments.now),
            Audience::Hub {
                host_name,
                device_id,
            } => token.verify_hub(host_name, device_id, keys, enrollments.now),
        }
    }
}

fn attest_for(
    registration_id: RegistrationId,
    credential: Credential<'_>,
    enrollments: &Enrollments<'_>,
    audience: Audience<'_>,
) -> Result<Attested, AttestationError> {
    let attested = match credential {
        Credential::Sas(password) => attest_sas(registration_id, password, enrollments, audience),
        Credential::X509(chain) => attest_x509(registration_id, chain, enrollments, audience),
    }?;
    // A group admits only the ids its `limits.registrationIdPattern` allows.
    if let EnrollmentSource::Group(group) = &attested.source {
        if let Some(entry) = enrollments.groups.get(group) {
            entry
                .admits_id(attested.registration_id.as_str())
                .map_err(AttestationError::NotAuthorized)?;
        }
    }
    Ok(attested)
}

fn attest_sas(
    registration_id: RegistrationId,
    password: &str,
    enrollments: &Enrollments<'_>,
    audience: Audience<'_>,
) -> Result<Attested, AttestationError> {
    let token =
        SasToken::parse(password).map_err(|e| AttestationError::Malformed(e.to_string()))?;
    let id = registration_id.as_str();
    let mut kind = AttestationType::SymmetricKey;
    let source = match enrollments.individual {
        Some(enrollment) => {
            let tpm = enrollment.attestation.kind == AttestationType::Tpm;
            let keys = match (tpm, enrollments.tpm_key) {
                (true, Some(key)) => Some(vec![key]),
                (true, None) => {
                    return Err(AttestationError::NotAuthorized(match audience {
                        Audience::Dps => format!("TPM device `{id}` has no challenge to answer: it registers without a token first"),
                        Audience::Hub { .. } => format!("TPM device `{id}` was given no hub key: it registers first"),
                    }))
                }
                (false, _) => symmetric_keys(&enrollment.attestation),
            };
            let verdict = match keys {
                None => Err(AttestationError::NotAuthorized(format!(
                    "individual enrollment `{id}` is not a symmetric-key enrollment"
                ))),
                Some(keys) => audience
                    .verify(&token, enrollments, id, &keys)
                    .map(|_| EnrollmentSource::Individual)
                    .map_err(|e| AttestationError::NotAuthorized(e.to_string())),
            };
            if tpm && verdict.is_ok() {
                kind = AttestationType::Tpm;
            }
            or_group_if_blocked(enrollment, verdict, || {
                sas_group(id, &token, enrollments, audience)
            })?
        }
        None => sas_group(id, &token, enrollments, audience)?,
    };
    Ok(Attested {
        registration_id,
        source,
        kind,
        certificate: None,
        token_expires: Some(token.expiry()),
        proven: true,
    })
}

/// The individual enrollment decides; a disabled one blocks a device of a group, whose
/// group credential still connects so that the device can learn `disabled`.
fn or_group_if_blocked(
    enrollment: &Enrollment,
    verdict: Result<EnrollmentSource, AttestationError>,
    group: impl FnOnce() -> Result<EnrollmentSource, AttestationError>,
) -> Result<EnrollmentSource, AttestationError> {
    match verdict {
        Ok(source) => Ok(source),
        Err(refusal) if enrollment.settings.provisioning_status == ProvisioningStatus::Disabled => {
            group().map_err(|_| refusal)
        }
        Err(refusal) => Err(refusal),
    }
}

/// The first group whose derived key signed the token.
fn sas_group(
    registration_id: &str,
    token: &SasToken<'_>,
    enrollments: &Enrollments<'_>,
    audience: Audience<'_>,
) -> Result<EnrollmentSource, AttestationError> {
    let mut last_error = None;
    for entry in enrollments.groups.values() {
        let Some(group_keys) = symmetric_keys(&entry.group.attestation) else {
            continue;
        };
        let mut derived = Vec::with_capacity(2);
        for key in group_keys {
            derived.push(
                crate::sas::derive_device_key(key, registration_id)
                    .map_err(|e| AttestationError::Unavailable(e.to_string()))?,
            );
        }
        let derived: Vec<&str> = derived.iter().map(String::as_str).collect();
        match audience.verify(token, enrollments, registration_id, &derived) {
            Ok(_) => {
                return Ok(EnrollmentSource::Group(
                    entry.group.enrollment_group_id.clone(),
                ))
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(AttestationError::NotAuthorized(match last_error {
        Some(e) => format!("no enrollment accepts the token ({e})"),
        None => format!("no enrollment for `{registration_id}`"),
    }))
}

fn attest_x509(
    registration_id: RegistrationId,
    chain: &[Vec<u8>],
    enrollments: &Enrollments<'_>,
    audience: Audience<'_>,
) -> Result<Attested, AttestationError> {
    let id = registration_id.as_str();
    let Some(leaf) = chain.first() else {
        let tpm = enrollments
            .individual
            .is_some_and(|e| e.attestation.kind == AttestationType::Tpm);
        return match (tpm, audience) {
            // It asks for its challenge.
            (true, Audience::Dps) => Ok(Attested {
                registration_id,
                source: EnrollmentSource::Individual,
                kind: AttestationType::Tpm,
                certificate: None,
                token_expires: None,
                proven: false,
            }),
            _ => Err(AttestationError::NotAuthorized(
                "no password and no client certificate".into(),
            )),
        };
    };
    if id.len() > MAX_X509_REGISTRATION_ID {
        return Err(AttestationError::BadClientId(format!(
            "{id}: X.509 registration ids are at most 64 characters"
        )));
    }
    let leaf_info =
        CertificateInfo::read(leaf).map_err(|e| AttestationError::NotAuthorized(e.to_string()))?;
    let cn = leaf_info.common_name.as_deref().unwrap_or_default();
    if !cn.eq_ignore_ascii_case(id) {
        return Err(AttestationError::NotAuthorized(format!(
            "certificate CN `{cn}` is not the client id `{id}`"
        )));
    }
    let group = || x509_group(id, chain, &leaf_info, enrollments);
    let source = match enrollments.individual {
        Some(enrollment) => {
            let verdict = individual_certificate(enrollment, leaf, &leaf_info, enrollments.now)
                .map(|()| EnrollmentSource::Individual);
            or_group_if_blocked(enrollment, verdict, group)?
        }
        None => group()?,
    };
    if let Some(revoked) = revoked(enrollments.revocation_lists, chain) {
        return Err(AttestationError::NotAuthorized(revoked));
    }
    Ok(Attested {
        registration_id,
        source,
        kind: AttestationType::X509,
        certificate: Some(Arc::new(PresentedCertificate::of(chain, leaf_info.issuer))),
        token_expires: None,
        proven: true,
    })
}

/// DPS: the first group found walking the chain from the leaf towards the root
/// decides. A group's certificate is found by the issuer of a presented one.
fn x509_group(
    registration_id: &str,
    chain: &[Vec<u8>],
    leaf_info: &CertificateInfo,
    enrollments: &Enrollments<'_>,
) -> Result<EnrollmentSource, AttestationError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(AttestationError::NotAuthorized(
            "no client certificate".into(),
        ));
    };
    for (depth, cert) in chain.iter().enumerate() {
        let issuer = if depth == 0 {
            leaf_info.issuer.clone()
        } else {
            match CertificateInfo::read(cert) {
                Ok(info) => info.issuer,
                Err(_) => break,
            }
        };
        for entry in enrollments.groups.values() {
            if entry.group.attestation.kind != AttestationType::X509 {
                continue;
            }
            for signing in &entry.signing {
                if signing.subject != issuer {
                    continue;
                }
                let path = &intermediates[..depth.min(intermediates.len())];
                let group = &entry.group.enrollment_group_id;
                return match x509::check_group_chain(leaf, path, signing, enrollments.now) {
                    Ok(()) => Ok(EnrollmentSource::Group(group.clone())),
                    Err(e) => Err(AttestationError::NotAuthorized(format!(
                        "enrollment group `{group}`: {e}"
                    ))),
                };
            }
        }
    }
    Err(AttestationError::NotAuthorized(format!(
        "no enrollment or enrollment group for the certificate of `{registration_id}`"
    )))
}

/// Why `chain` is revoked, if one of `lists` revokes one of its certificates.
pub fn revoked(lists: &BTreeMap<String, RevocationList>, chain: &[Vec<u8>]) -> Option<String> {
    if lists.is_empty() {
        return None;
    }
    crate::revocation::revoked_in(lists.values(), chain).map(|r| {
        format!(
            "certificate {} of the chain (serial {}, issued by `{}`) is revoked",
            r.position, r.serial, r.issuer_name
        )
    })
}

/// Individual enrollment: the leaf is its primary or secondary certificate.
fn individual_certificate(
    enrollment: &Enrollment,
    leaf: &[u8],
    leaf_info: &CertificateInfo,
    now: u64,
) -> Result<(), AttestationError> {
    let registration_id = &enrollment.registration_id;
    let certs = enrollment
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .filter(|_| enrollment.attestation.kind == AttestationType::X509)
        .ok_or_else(|| {
            AttestationError::NotAuthorized(format!(
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
    Err(AttestationError::NotAuthorized(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki;
    use base64::Engine;
    use serde_json::json;

    const SCOPE: &str = "0ne0001";
    const NOW: u64 = 2_000_000_000;

    fn key(seed: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([seed; 32])
    }

    fn sas_enrollment(id: &str, key: &str, status: &str) -> Enrollment {
        serde_json::from_value(json!({"registrationId": id, "provisioningStatus": status,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}}))
        .unwrap()
    }

    fn sas_group(id: &str, key: &str) -> (String, GroupCredentials) {
        let group = serde_json::from_value(json!({"enrollmentGroupId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}}))
        .unwrap();
        (id.to_owned(), GroupCredentials::new(group).unwrap())
    }

    fn x509_group(id: &str, ca_der: &[u8]) -> (String, GroupCredentials) {
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(ca_der)
        );
        let group = serde_json::from_value(json!({"enrollmentGroupId": id,
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}}}))
        .unwrap();
        (id.to_owned(), GroupCredentials::new(group).unwrap())
    }

    fn username(id: &str) -> String {
        format!("{SCOPE}/registrations/{id}/api-version=2021-06-01")
    }

    fn token(key: &str, id: &str) -> String {
        crate::sas::sign(key, SCOPE, id, NOW + 3600).unwrap()
    }

    fn attest_with(
        id: &str,
        credential: Credential<'_>,
        individual: Option<&Enrollment>,
        groups: &BTreeMap<String, GroupCredentials>,
    ) -> Result<Attested, AttestationError> {
        attest_as(None, id, credential, individual, groups)
    }

    /// A provisioning CONNECT, or with `hub` a hub CONNECT (the local hub being `HUB`).
    fn attest_as(
        hub: Option<&str>,
        id: &str,
        credential: Credential<'_>,
        individual: Option<&Enrollment>,
        groups: &BTreeMap<String, GroupCredentials>,
    ) -> Result<Attested, AttestationError> {
        let lists = BTreeMap::new();
        let enrollments = Enrollments {
            id_scope: SCOPE,
            individual,
            groups,
            revocation_lists: &lists,
            now: NOW,
            tpm_key: None,
        };
        match hub {
            None => attest(claim(id, &username(id), SCOPE)?, credential, &enrollments),
            Some(username) => {
                let (device_id, host) = claim_hub_spelled(id, username, local)?;
                attest_hub(
                    device_id.clone(),
                    device_id.as_str(),
                    host,
                    credential,
                    &enrollments,
                )
            }
        }
    }

    #[test]
    fn an_individual_enrollment_wins_over_a_group_that_also_accepts() {
        let group_key = key(1);
        let device_key = crate::sas::derive_device_key(&group_key, "dev-1").unwrap();
        let individual = sas_enrollment("dev-1", &device_key, "enabled");
        let groups = BTreeMap::from([sas_group("g", &group_key)]);
        let password = token(&device_key, "dev-1");
        let attested = attest_with(
            "dev-1",
            Credential::Sas(&password),
            Some(&individual),
            &groups,
        )
        .unwrap();
        assert_eq!(attested.source, EnrollmentSource::Individual);
        let attested = attest_with("dev-1", Credential::Sas(&password), None, &groups).unwrap();
        assert_eq!(attested.source, EnrollmentSource::Group("g".into()));
    }

    #[test]
    fn an_enabled_individual_enrollment_refuses_the_group_credential() {
        let group_key = key(1);
        let device_key = crate::sas::derive_device_key(&group_key, "dev-1").unwrap();
        let individual = sas_enrollment("dev-1", &key(2), "enabled");
        let groups = BTreeMap::from([sas_group("g", &group_key)]);
        let password = token(&device_key, "dev-1");
        let refused = attest_with(
            "dev-1",
            Credential::Sas(&password),
            Some(&individual),
            &groups,
        );
        assert!(
            matches!(refused, Err(AttestationError::NotAuthorized(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn a_disabled_individual_enrollment_lets_the_group_credential_connect_to_learn_disabled() {
        let group_key = key(1);
        let device_key = crate::sas::derive_device_key(&group_key, "dev-1").unwrap();
        let blocking = sas_enrollment("dev-1", &key(2), "disabled");
        let groups = BTreeMap::from([sas_group("g", &group_key)]);
        let password = token(&device_key, "dev-1");
        let attested = attest_with(
            "dev-1",
            Credential::Sas(&password),
            Some(&blocking),
            &groups,
        )
        .unwrap();
        assert_eq!(attested.source, EnrollmentSource::Group("g".into()));
        // A credential no enrollment accepts is refused with the individual's reason.
        let wrong = token(&key(3), "dev-1");
        let refused = attest_with("dev-1", Credential::Sas(&wrong), Some(&blocking), &groups);
        assert!(
            matches!(&refused, Err(AttestationError::NotAuthorized(m)) if m.contains("signature")),
            "{refused:?}"
        );
    }

    #[test]
    fn the_group_nearest_the_leaf_decides_the_chain_walk() {
        let root = test_pki::ca("walk-root", None);
        let intermediate = test_pki::ca("walk-intermediate", Some(&root));
        let leaf = test_pki::leaf("dev-x", &intermediate, |_| {});
        let chain = vec![leaf, intermediate.der.clone()];
        let groups = BTreeMap::from([
            x509_group("by-root", &root.der),
            x509_group("by-intermediate", &intermediate.der),
        ]);
        let attested = attest_with("dev-x", Credential::X509(&chain), None, &groups).unwrap();
        assert_eq!(
            attested.source,
            EnrollmentSource::Group("by-intermediate".into())
        );
        assert_eq!(attested.kind, AttestationType::X509);
        let only_root = BTreeMap::from([x509_group("by-root", &root.der)]);
        let attested = attest_with("dev-x", Credential::X509(&chain), None, &only_root).unwrap();
        assert_eq!(attested.source, EnrollmentSource::Group("by-root".into()));
        let certificate = attested.certificate.unwrap();
        assert_eq!(certificate.issuers.len(), 2);
    }

    #[test]
    fn a_certificate_whose_cn_is_not_the_client_id_is_refused() {
        let root = test_pki::ca("cn-root", None);
        let chain = vec![test_pki::leaf("dev-y", &root, |_| {})];
        let groups = BTreeMap::from([x509_group("g", &root.der)]);
        let refused = attest_with("dev-z", Credential::X509(&chain), None, &groups);
        assert!(
            matches!(&refused, Err(AttestationError::NotAuthorized(m)) if m.contains("CN")),
            "{refused:?}"
        );
    }

    const HUB: &str = "gateway.local";

    fn assert_not_authorized(outcome: &Result<Attested, AttestationError>, case: &str) {
        assert!(
            matches!(outcome, Err(AttestationError::NotAuthorized(_))),
            "{case}: {outcome:?}"
        );
    }

    fn hub_username(device_id: &str) -> String {
        format!("{HUB}/{device_id}/?api-version=2021-04-12&DeviceClientType=py")
    }

    fn local(host: &str) -> bool {
        host.eq_ignore_ascii_case(HUB)
    }

    /// A hub username as the broker takes it: parsed, then claimed.
    fn claim_hub_spelled<'u>(
        client_id: &str,
        username: &'u str,
        is_local: impl Fn(&str) -> bool,
    ) -> Result<(RegistrationId, &'u str), AttestationError> {
        let parsed = identity::parse_hub_username(username)
            .map_err(|e| AttestationError::Malformed(e.to_string()))?;
        claim_hub(client_id, &parsed, is_local)
    }

    /// A hub CONNECT through `claim_hub` and `attest_hub`, the local hub being `HUB`.
    fn attest_hub_with(
        id: &str,
        credential: Credential<'_>,
        individual: Option<&Enrollment>,
        groups: &BTreeMap<String, GroupCredentials>,
    ) -> Result<Attested, AttestationError> {
        attest_as(Some(&hub_username(id)), id, credential, individual, groups)
    }

    #[test]
    fn a_hub_token_signed_with_the_device_key_or_the_derived_group_key_is_accepted() {
        let group_key = key(1);
        let device_key = crate::sas::derive_device_key(&group_key, "dev-1").unwrap();
        let hub_token = crate::sas::sign_hub(&device_key, HUB, "dev-1", NOW + 60).unwrap();
        let groups = BTreeMap::from([sas_group("g", &group_key)]);
        let by_group =
            attest_hub_with("dev-1", Credential::Sas(&hub_token), None, &groups).unwrap();
        assert_eq!(by_group.source, EnrollmentSource::Group("g".into()));
        let individual = sas_enrollment("dev-1", &device_key, "enabled");
        let by_device = attest_hub_with(
            "dev-1",
            Credential::Sas(&hub_token),
            Some(&individual),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(by_device.source, EnrollmentSource::Individual);
        assert_eq!(by_device.kind, AttestationType::SymmetricKey);
    }

    #[test]
    fn hub_and_provisioning_tokens_are_not_interchangeable() {
        let device_key = key(4);
        let individual = sas_enrollment("dev-1", &device_key, "enabled");
        let none = BTreeMap::new();
        // A provisioning token at the hub.
        let dps_token = token(&device_key, "dev-1");
        let refused = attest_hub_with(
            "dev-1",
            Credential::Sas(&dps_token),
            Some(&individual),
            &none,
        );
        assert_not_authorized(&refused, "a provisioning token at the hub");
        // A hub token at provisioning.
        let hub_token = crate::sas::sign_hub(&device_key, HUB, "dev-1", NOW + 60).unwrap();
        let refused = attest_with(
            "dev-1",
            Credential::Sas(&hub_token),
            Some(&individual),
            &none,
        );
        assert_not_authorized(&refused, "a hub token at provisioning");
    }

    #[test]
    fn a_hub_token_for_another_device_another_hub_or_out_of_date_is_refused() {
        let group_key = key(1);
        let groups = BTreeMap::from([sas_group("g", &group_key)]);
        let key_of = |id: &str| crate::sas::derive_device_key(&group_key, id).unwrap();
        // dev-2's own valid token, presented as dev-1.
        let other_device = crate::sas::sign_hub(&key_of("dev-2"), HUB, "dev-2", NOW + 60).unwrap();
        // dev-1's key, but a token naming another hub.
        let other_hub =
            crate::sas::sign_hub(&key_of("dev-1"), "cloud-hub.example.net", "dev-1", NOW + 60)
                .unwrap();
        // dev-1's key, expired.
        let expired = crate::sas::sign_hub(
            &key_of("dev-1"),
            HUB,
            "dev-1",
            NOW - crate::sas::EXPIRY_SKEW_SECONDS - 1,
        )
        .unwrap();
        for (case, password) in [
            ("another device's token", &other_device),
            ("a token for another hub", &other_hub),
            ("an expired token", &expired),
        ] {
            let refused = attest_hub_with("dev-1", Credential::Sas(password), None, &groups);
            assert_not_authorized(&refused, case);
        }
    }

    #[test]
    fn a_hub_connect_claims_a_local_hub_and_its_own_device() {
        let username_of_dev_1 = hub_username("dev-1");
        let (device_id, host) = claim_hub_spelled("dev-1", &username_of_dev_1, local).unwrap();
        assert_eq!((device_id.as_str(), host), ("dev-1", HUB));
        // Host names are case-insensitive.
        let upper = hub_username("dev-1").replacen(HUB, "GATEWAY.local", 1);
        assert!(claim_hub_spelled("dev-1", &upper, local).is_ok());
        let refusals = [
            (
                "dev-1",
                "cloud-hub.example.net/dev-1/?api-version=2021-04-12".to_owned(),
            ),
            ("dev-1", hub_username("dev-2")),
            ("dev-1", username("dev-1")),
            (
                "dev-1",
                format!("{HUB}/dev-1/module-a/?api-version=2021-04-12"),
            ),
            ("a/b", hub_username("a/b")),
        ];
        for (client_id, username) in refusals {
            let refused = claim_hub_spelled(client_id, &username, local);
            assert!(refused.is_err(), "{client_id} {username}: {refused:?}");
        }
    }

    #[test]
    fn a_hub_connect_with_a_certificate_is_attested_as_provisioning_is() {
        let root = test_pki::ca("hub-root", None);
        let chain = vec![test_pki::leaf("dev-h", &root, |_| {})];
        let groups = BTreeMap::from([x509_group("g", &root.der)]);
        let attested = attest_hub_with("dev-h", Credential::X509(&chain), None, &groups).unwrap();
        assert_eq!(attested.source, EnrollmentSource::Group("g".into()));
        let refused = attest_hub_with("dev-other", Credential::X509(&chain), None, &groups);
        assert!(
            matches!(&refused, Err(AttestationError::NotAuthorized(m)) if m.contains("CN")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_client_id_that_is_no_registration_id_or_a_foreign_scope_is_refused() {
        let bad = claim("a/b", &username("a/b"), SCOPE);
        assert!(matches!(bad, Err(AttestationError::BadClientId(_))));
        let foreign = claim(
            "dev-1",
            "other/registrations/dev-1/api-version=2021-06-01",
            SCOPE,
        );
        assert!(matches!(foreign, Err(AttestationError::NotAuthorized(_))));
        let other_id = claim("dev-1", &username("dev-2"), SCOPE);
        assert!(matches!(other_id, Err(AttestationError::NotAuthorized(_))));
        assert_eq!(
            claim("Dev-1", &username("Dev-1"), SCOPE),
            Ok("dev-1".into())
        );
    }
}
