//! Certificates issued at registration (PROTOCOL F): the register's `csr` is checked
//! (`edgedps_policies::issuance`) against the enrollment's
//! `clientCertificateIssuancePolicy` and signed by the certificate authority it names;
//! the registration record keeps what was issued, the answer carries the chain.
//!
//! An issued certificate is then a credential of its device (`attest_issued`), on the
//! DPS CONNECT and the hub CONNECT alike, while it is valid, listed on the device's
//! registration record and not revoked; the access rule decides the rest, as for any
//! credential.

use std::sync::Arc;

use base64::Engine;

use edgedps_policies::attestation::{AttestationError, EnrollmentSource, PresentedCertificate};
use edgedps_policies::issuance::{check_csr, CertificateAuthority, CheckedCsr};
use edgedps_policies::x509;
use edgedps_topics::admin::{AttestationType, EnrollmentSettings};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::IssuedCertificate;

use crate::{unix_now, Attested, Error, Responder};

impl Responder {
    /// What a register's `csr` will be signed with, once it and the enrollment allow it;
    /// otherwise the 400 (400004) that says why.
    pub(crate) fn issuance_for(
        &self,
        device: &Attested,
        settings: &EnrollmentSettings,
        csr: &str,
    ) -> Result<(CheckedCsr, Arc<CertificateAuthority>), Error> {
        let checked = check_csr(csr, &device.registration_id)
            .map_err(|e| Error::MalformedBody(e.to_string()))?;
        let Some(policy) = &settings.client_certificate_issuance_policy else {
            return Err(Error::MalformedBody(
                "csr: the enrollment has no clientCertificateIssuancePolicy, so no certificate is issued for it"
                    .into(),
            ));
        };
        let name = &policy.certificate_authority_name;
        let ca = self
            .settings
            .certificate_authorities
            .get(name)
            .cloned()
            .ok_or_else(|| {
                Error::MalformedBody(format!(
                    "csr: certificate authority `{name}` of the enrollment's issuance policy is not configured on this gateway"
                ))
            })?;
        Ok((checked, ca))
    }

    /// Signs `checked` for `device_id`: the record of the certificate, and the chain for
    /// the answer (base64 DER, leaf first).
    pub(crate) fn issue(
        &self,
        checked: &CheckedCsr,
        ca: &CertificateAuthority,
        device_id: &str,
    ) -> Result<(IssuedCertificate, Vec<String>), Error> {
        let mut serial = [0u8; 16];
        serial.copy_from_slice(&self.random_bytes(16));
        let issued = ca
            .issue(checked, device_id, unix_now(), serial)
            .map_err(|e| Error::Issuance(format!("authority `{}`: {e}", ca.name())))?;
        tracing::info!(target: "edgedps::audit", %device_id, authority = ca.name(), serial = %issued.serial_number, thumbprint = %issued.sha256_thumbprint, "certificate issued");
        let record = IssuedCertificate {
            serial_number: issued.serial_number,
            sha256_thumbprint: issued.sha256_thumbprint,
            not_after_utc: crate::timestamp_at(issued.not_after),
            certificate_authority: ca.name().to_owned(),
            revoked: false,
            request_id: None,
            replaces: None,
        };
        let chain = issued
            .chain
            .iter()
            .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
            .collect();
        Ok((record, chain))
    }
}

impl Responder {
    /// A device presenting a certificate one of the gateway's authorities issued:
    /// attested by its registration record, which must list the certificate, not as
    /// revoked. `Ok(None)` when no authority here issued it (the enrollments decide).
    pub(crate) fn attest_issued(
        &self,
        registration_id: &RegistrationId,
        chain: &[Vec<u8>],
        now: u64,
    ) -> Result<Option<Attested>, Error> {
        let Some(leaf) = chain.first() else {
            return Ok(None);
        };
        let authorities = &self.settings.certificate_authorities;
        let Some(ca) = authorities.values().find(|ca| ca.issued(leaf, now)) else {
            return Ok(None);
        };
        let refuse = |reason: String| Err(AttestationError::NotAuthorized(reason).into());
        let leaf_issuer = x509::CertificateInfo::read(leaf)
            .map(|info| info.issuer)
            .unwrap_or_default();
        let presented = PresentedCertificate::of(chain, leaf_issuer);
        let thumbprint = presented.thumbprint.as_str();
        let record = self.store.registration(registration_id)?;
        let issued = record.as_ref().and_then(|r| {
            r.issued_certificates
                .iter()
                .find(|c| c.sha256_thumbprint == thumbprint)
        });
        let (Some(record), Some(issued)) = (record.as_ref(), issued) else {
            return refuse(format!(
                "certificate {thumbprint} of authority `{}` was not issued to `{registration_id}`",
                ca.name()
            ));
        };
        if issued.revoked {
            return refuse(format!(
                "certificate {thumbprint} issued to `{registration_id}` is revoked"
            ));
        }
        if let Some(replaced) = issued.replaces.clone() {
            self.replaced_by_use(record, thumbprint, &replaced)?;
        }
        let source = match record.enrollment_group_id() {
            Some(group) => EnrollmentSource::Group(group.to_owned()),
            None => EnrollmentSource::Individual,
        };
        Ok(Some(Attested {
            registration_id: registration_id.clone(),
            source,
            kind: AttestationType::X509,
            certificate: Some(Arc::new(presented)),
            token_expires: None,
            proven: true,
        }))
    }
}

impl Responder {
    /// The first use of a renewed certificate whose renewal named `replaced` (a request
    /// id): the certificate that request got is revoked. Written at once and flushed in
    /// the background (the CONNECT does not wait for the disk).
    fn replaced_by_use(
        &self,
        record: &edgedps_topics::registration::RegistrationState,
        thumbprint: &str,
        replaced: &str,
    ) -> Result<(), Error> {
        let mut record = record.clone();
        for certificate in &mut record.issued_certificates {
            if certificate.sha256_thumbprint == thumbprint {
                certificate.replaces = None;
            } else if certificate.request_id.as_deref() == Some(replaced) {
                certificate.revoked = true;
                tracing::info!(target: "edgedps::audit", registration_id = %record.registration_id, serial = %certificate.serial_number, "certificate revoked: replaced by its renewal, now in use");
            }
        }
        self.store.put_registration(&record)?;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            runtime.spawn(async move {
                if let Err(error) = store.durable().await {
                    tracing::error!(%error, "the revocation of a replaced certificate is not on disk");
                }
            });
        }
        Ok(())
    }
}
