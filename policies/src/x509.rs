//! X.509 attestation (PROTOCOL A2, A6): does the chain a device presented in its TLS
//! handshake belong to this enrollment?
//!
//! The handshake already proved the device holds the leaf's private key. Here the chain
//! is checked against enrollment data that operators change at run time: rustls-webpki
//! builds and verifies the path to a group's signing certificate (validity, CA
//! constraints, clientAuth usage); x509-parser reads names and validity.

use ring::digest;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::Duration;
use x509_parser::prelude::{FromDer, X509Certificate};

use edgedps_topics::admin::CertificateRef;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    #[error("certificate is not parseable DER: {0}")]
    BadCertificate(String),
    #[error("PEM holds no certificate")]
    BadPem,
    #[error("leaf certificate has no subject common name")]
    NoCommonName,
    #[error("certificate is outside its validity period")]
    NotValidNow,
    #[error("certificate does not match the enrollment")]
    Mismatch,
    #[error("chain does not verify to the enrollment group's certificate: {0}")]
    Chain(String),
    #[error("thumbprint must be 64 hex digits")]
    BadThumbprint,
}

/// What the front end needs to know of a certificate, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub common_name: Option<String>,
    /// DER of the subject name, to find groups whose CA issued a presented certificate.
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
}

impl CertificateInfo {
    pub fn read(der: &[u8]) -> Result<CertificateInfo, X509Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| X509Error::BadCertificate(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        Ok(CertificateInfo {
            common_name,
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca,
        })
    }

    pub fn valid_at(&self, now: u64) -> bool {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.not_before <= now && now <= self.not_after
    }
}

/// The first certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, X509Error> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| X509Error::BadPem)?;
    if pem.label != "CERTIFICATE" {
        return Err(X509Error::BadPem);
    }
    CertificateInfo::read(&pem.contents)?;
    Ok(pem.contents)
}

/// Every certificate of a PEM text, in order, as DER (a chain, leaf first); each one
/// must parse. At most 8.
pub fn pem_chain(text: &str) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut chain = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|_| X509Error::BadPem)?;
        if pem.label != "CERTIFICATE" || chain.len() == 8 {
            return Err(X509Error::BadPem);
        }
        CertificateInfo::read(&pem.contents)?;
        chain.push(pem.contents);
    }
    match chain.is_empty() {
        true => Err(X509Error::BadPem),
        false => Ok(chain),
    }
}

/// The first certificate of a PEM text, as DER, decoded but not parsed: for enrollment
/// data that was validated when it was written.
pub fn pem_der(pem: &str) -> Result<Vec<u8>, X509Error> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| X509Error::BadPem)?;
    Ok(pem.contents)
}

/// A group's signing certificate, read once when the group is loaded or written.
#[derive(Debug, Clone)]
pub struct SigningCertificate {
    /// DER of its subject name: the issuer of the certificates it signs.
    pub subject: Vec<u8>,
    anchor: rustls_pki_types::TrustAnchor<'static>,
}

impl SigningCertificate {
    pub fn from_der(der: &[u8]) -> Result<SigningCertificate, X509Error> {
        let info = CertificateInfo::read(der)?;
        let anchor = webpki::anchor_from_trusted_cert(&CertificateDer::from(der))
            .map_err(|e| X509Error::Chain(format!("signing certificate: {e}")))?
            .to_owned();
        Ok(SigningCertificate {
            subject: info.subject,
            anchor,
        })
    }
}

/// A certificate as a registration record describes it: names, thumbprint, serial and
/// validity (Azure's `certificateInfo`).
pub fn describe(der: &[u8]) -> Result<edgedps_topics::registration::CertificateInfo, X509Error> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| X509Error::BadCertificate(e.to_string()))?;
    let when = |t: x509_parser::time::ASN1Time| {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
        );
        t.to_datetime().format(&format).unwrap_or_default()
    };
    Ok(edgedps_topics::registration::CertificateInfo {
        subject_name: cert.subject().to_string(),
        sha256_thumbprint: thumbprint(der),
        issuer_name: cert.issuer().to_string(),
        serial_number: cert
            .raw_serial_as_string()
            .replace(':', "")
            .to_ascii_uppercase(),
        not_before_utc: when(cert.validity().not_before),
        not_after_utc: when(cert.validity().not_after),
    })
}

/// SHA-256 of the DER, upper-case hex, as Azure shows thumbprints.
pub fn thumbprint(der: &[u8]) -> String {
    let hash = digest::digest(&digest::SHA256, der);
    hash.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

/// A thumbprint as an operator may write it: hex, any case, `:` separators allowed.
pub fn normalize_thumbprint(text: &str) -> Result<String, X509Error> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(X509Error::BadThumbprint);
    }
    Ok(hex.to_ascii_uppercase())
}

/// Individual enrollment: the leaf is the enrolled certificate (by DER or thumbprint)
/// and is valid now.
pub fn check_individual(
    leaf: &[u8],
    leaf_info: &CertificateInfo,
    enrolled: &CertificateRef,
    now: u64,
) -> Result<(), X509Error> {
    let matches = if let Some(pem) = &enrolled.certificate {
        pem_der(pem)? == leaf
    } else if let Some(print) = &enrolled.sha256_thumbprint {
        normalize_thumbprint(print)? == thumbprint(leaf)
    } else {
        false
    };
    if !matches {
        return Err(X509Error::Mismatch);
    }
    if !leaf_info.valid_at(now) {
        return Err(X509Error::NotValidNow);
    }
    Ok(())
}

/// Enrollment group: the leaf chains, through the presented intermediates, to the
/// group's signing certificate, every certificate valid now, the leaf usable for
/// client authentication and not a CA.
pub fn check_group_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    signing_certificate: &SigningCertificate,
    now: u64,
) -> Result<(), X509Error> {
    let leaf_der = CertificateDer::from(leaf);
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| X509Error::Chain(format!("leaf: {e}")))?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(now));
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&signing_certificate.anchor),
            &intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| X509Error::Chain(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, Ca};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

    const NOW: u64 = 1_800_000_000; // 2027-01-15

    fn signing(der: &[u8]) -> SigningCertificate {
        SigningCertificate::from_der(der).unwrap()
    }

    fn info(der: &[u8]) -> CertificateInfo {
        CertificateInfo::read(der).unwrap()
    }

    fn leaf(cn: &str, parent: &Ca, eku: Vec<ExtendedKeyUsagePurpose>) -> Vec<u8> {
        crate::test_pki::leaf(cn, parent, |p| p.extended_key_usages = eku)
    }

    #[test]
    fn leaf_chains_to_root_through_an_intermediate() {
        let root = ca("root", None);
        let inter = ca("intermediate", Some(&root));
        let device = leaf("dev-1", &inter, vec![ExtendedKeyUsagePurpose::ClientAuth]);
        assert_eq!(
            check_group_chain(
                &device,
                std::slice::from_ref(&inter.der),
                &signing(&root.der),
                NOW
            ),
            Ok(())
        );
        // The intermediate itself may be the group's certificate.
        assert_eq!(
            check_group_chain(&device, &[], &signing(&inter.der), NOW),
            Ok(())
        );
        assert_eq!(
            CertificateInfo::read(&device)
                .unwrap()
                .common_name
                .as_deref(),
            Some("dev-1")
        );
    }

    #[test]
    fn leaf_of_a_rogue_ca_is_refused() {
        let root = ca("root", None);
        let rogue = ca("root", None);
        let device = leaf("dev-1", &rogue, vec![ExtendedKeyUsagePurpose::ClientAuth]);
        assert!(matches!(
            check_group_chain(&device, &[], &signing(&root.der), NOW),
            Err(X509Error::Chain(_))
        ));
    }

    #[test]
    fn server_only_leaf_and_ca_as_leaf_are_refused() {
        let root = ca("root", None);
        let server = leaf("dev-1", &root, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        assert!(check_group_chain(&server, &[], &signing(&root.der), NOW).is_err());
        let sub_ca = ca("dev-1", Some(&root));
        assert!(check_group_chain(&sub_ca.der, &[], &signing(&root.der), NOW).is_err());
    }

    #[test]
    fn expired_chain_is_refused() {
        let root = ca("root", None);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "dev-1");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().unwrap();
        let device = params.signed_by(&key, &root.issuer).unwrap().der().to_vec();
        assert!(matches!(
            check_group_chain(&device, &[], &signing(&root.der), NOW),
            Err(X509Error::Chain(_))
        ));
        assert!(!CertificateInfo::read(&device).unwrap().valid_at(NOW));
    }

    #[test]
    fn individual_matches_by_certificate_or_thumbprint() {
        let root = ca("root", None);
        let device = leaf("dev-1", &root, vec![]);
        let other = leaf("dev-1", &root, vec![]);
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64_lines(&device)
        );
        let by_pem = CertificateRef {
            certificate: Some(pem),
            sha256_thumbprint: None,
        };
        let by_print = CertificateRef {
            certificate: None,
            sha256_thumbprint: Some(thumbprint(&device).to_lowercase()),
        };
        assert_eq!(
            check_individual(&device, &info(&device), &by_pem, NOW),
            Ok(())
        );
        assert_eq!(
            check_individual(&device, &info(&device), &by_print, NOW),
            Ok(())
        );
        assert_eq!(
            check_individual(&other, &info(&other), &by_pem, NOW),
            Err(X509Error::Mismatch)
        );
        assert_eq!(
            check_individual(&other, &info(&other), &by_print, NOW),
            Err(X509Error::Mismatch)
        );
    }

    fn base64_lines(der: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    }

    #[test]
    fn certificates_are_described_as_azure_does() {
        let root = ca("root", None);
        let device = leaf("dev-1", &root, vec![]);
        let info = describe(&device).unwrap();
        assert_eq!(info.subject_name, "CN=dev-1");
        assert_eq!(info.issuer_name, "CN=root");
        assert_eq!(info.sha256_thumbprint, thumbprint(&device));
        assert!(info.serial_number.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(info.not_after_utc.ends_with('Z'), "{}", info.not_after_utc);
    }

    #[test]
    fn thumbprints_normalize() {
        let hex = "ab".repeat(32);
        assert_eq!(normalize_thumbprint(&hex).unwrap(), "AB".repeat(32));
        assert!(normalize_thumbprint("abc").is_err());
    }
}
