//! Operator record bodies: parsing never panics, and certificates in them are parsed
//! the way an admin write parses them.
#![no_main]
use edgedps_topics::admin::{Enrollment, EnrollmentGroup, LinkedHub};
use edgedps_topics::encoding::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Encoding::Json.decode::<Enrollment>(data) {
        if let Some(pair) = e.attestation.x509.and_then(|x| x.client_certificates) {
            for cert in [pair.primary, pair.secondary].into_iter().flatten() {
                if let Some(pem) = cert.certificate {
                    let _ = edgedps_policies::x509::pem_to_der(&pem);
                }
                if let Some(print) = cert.sha256_thumbprint {
                    let _ = edgedps_policies::x509::normalize_thumbprint(&print);
                }
            }
        }
    }
    if let Ok(g) = Encoding::Json.decode::<EnrollmentGroup>(data) {
        if let Some(pair) = g.attestation.x509.and_then(|x| x.signing_certificates) {
            for cert in [pair.primary, pair.secondary].into_iter().flatten() {
                if let Some(der) = cert
                    .certificate
                    .and_then(|pem| edgedps_policies::x509::pem_to_der(&pem).ok())
                {
                    let _ = edgedps_policies::x509::SigningCertificate::from_der(&der);
                }
            }
        }
    }
    let _ = Encoding::Json.decode::<LinkedHub>(data);
    // Raw DER as a presented certificate.
    let _ = edgedps_policies::x509::CertificateInfo::read(data);
});
