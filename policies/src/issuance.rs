//! Certificates issued at registration (PROTOCOL F): is a device's certificate signing
//! request acceptable, and the certificate a certificate authority of the gateway gives
//! it.
//!
//! A request is acceptable when it is base64 of a DER PKCS#10 request whose signature
//! verifies (the device holds the key), whose key is EC P-256 or P-384 or RSA of at
//! least 2048 bits, and whose subject CN is the registration id. The leaf issued for it
//! names the device id, is for client authentication only, and is valid from five
//! minutes before `now` for the authority's `validity_days`. x509-parser reads and
//! verifies the request; rcgen writes and signs the leaf.

use base64::Engine;
use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use edgedps_topics::identity::RegistrationId;

/// The most certificates an issued chain holds, leaf included (an SDK corrupts memory on
/// a fourth).
pub const MAX_CHAIN: usize = 3;
/// How far back an issued certificate's validity starts, for devices whose clocks lag.
const BACKDATE_SECONDS: i64 = 5 * 60;

const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";

/// Why a request is refused; each names what the device must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not base64 (one line of standard base64 of the DER request, no PEM armour)")]
    NotBase64,
    #[error("csr is not a DER PKCS#10 certificate signing request: {0}")]
    NotCsr(String),
    #[error("csr signature does not verify with its own public key")]
    BadSignature,
    #[error("csr key is {0}; EC P-256, EC P-384 or RSA of at least 2048 bits is required")]
    WeakKey(String),
    #[error("csr subject CN is {found}; it must be the registration id `{expected}`")]
    WrongSubject { found: String, expected: String },
}

/// A request that passed every check: the public key to certify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// DER SubjectPublicKeyInfo.
    spki: Vec<u8>,
}

/// Checks a device's request (`csr`, as the register body carries it) for
/// `registration_id`.
pub fn check_csr(csr: &str, registration_id: &RegistrationId) -> Result<CheckedCsr, CsrError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(csr.trim())
        .map_err(|_| CsrError::NotBase64)?;
    let (rest, request) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::NotCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::NotCsr("trailing bytes after the request".into()));
    }
    request
        .verify_signature()
        .map_err(|_| CsrError::BadSignature)?;
    let info = &request.certification_request_info;
    let spki = &info.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            if curve != P256 && curve != P384 {
                return Err(CsrError::WeakKey(format!("EC on curve `{curve}`")));
            }
        }
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => {}
        Ok(PublicKey::RSA(rsa)) => {
            return Err(CsrError::WeakKey(format!("RSA of {} bits", rsa.key_size())))
        }
        Ok(_) => return Err(CsrError::WeakKey("of an unsupported algorithm".into())),
        Err(e) => return Err(CsrError::NotCsr(format!("public key: {e}"))),
    }
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    match cn {
        Some(cn) if registration_id.is(cn) => Ok(CheckedCsr {
            spki: spki.raw.to_vec(),
        }),
        other => Err(CsrError::WrongSubject {
            found: other.map_or_else(|| "missing".to_owned(), |cn| format!("`{cn}`")),
            expected: registration_id.as_str().to_owned(),
        }),
    }
}

/// Why a certificate authority cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error("certificate file holds no PEM certificate")]
    NoCertificate,
    #[error("certificate file holds {0} certificates; at most {max} (the CA and its issuers) fit an issued chain", max = MAX_CHAIN - 1)]
    ChainTooLong(usize),
    #[error("the certificate is not a CA certificate (basic constraints CA:TRUE)")]
    NotCa,
    #[error("the key is not usable: {0}")]
    BadKey(crate::keys::KeyError),
    #[error("the key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate is not readable: {0}")]
    BadCertificate(String),
    #[error("validity_days must be 1 to 3650")]
    BadValidity,
}

impl CaError {
    /// Whether the key file, not the certificate file, is what has to change.
    pub fn concerns_key(&self) -> bool {
        matches!(self, CaError::BadKey(_) | CaError::KeyMismatch)
    }
}

/// The key (PEM: PKCS#8, SEC1 or PKCS#1) of CA certificate `ca` (DER), once both check
/// out: a CA certificate, and the key its own.
pub fn ca_key(ca: &[u8], key_pem: &str) -> Result<rcgen::KeyPair, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| CaError::BadCertificate(e.to_string()))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(CaError::NotCa);
    }
    let key = crate::keys::key_pair(key_pem.as_bytes()).map_err(CaError::BadKey)?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(CaError::KeyMismatch);
    }
    Ok(key)
}

/// A certificate authority of the gateway that issues device certificates.
pub struct CertificateAuthority {
    name: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA as a trust anchor, to recognise what it issued.
    anchor: rustls_pki_types::TrustAnchor<'static>,
    /// DER: the CA's certificate, then the certificates above it.
    chain: Vec<Vec<u8>>,
    validity_days: u32,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("name", &self.name)
            .field("validity_days", &self.validity_days)
            .finish_non_exhaustive()
    }
}

/// A certificate issued to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// DER: the leaf, then the CA chain; at most [`MAX_CHAIN`].
    pub chain: Vec<Vec<u8>>,
    /// Upper-case hex.
    pub serial_number: String,
    /// SHA-256 of the leaf, upper-case hex.
    pub sha256_thumbprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertificateAuthority {
    /// The authority `name` from its certificate (PEM, the CA first, then its issuers)
    /// and its key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(
        name: &str,
        cert_pem: &str,
        key_pem: &str,
        validity_days: u32,
    ) -> Result<CertificateAuthority, CaError> {
        if !(1..=3650).contains(&validity_days) {
            return Err(CaError::BadValidity);
        }
        let chain: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes())
            .filter_map(Result::ok)
            .filter(|pem| pem.label == "CERTIFICATE")
            .map(|pem| pem.contents)
            .collect();
        let ca = chain.first().ok_or(CaError::NoCertificate)?;
        if chain.len() > MAX_CHAIN - 1 {
            return Err(CaError::ChainTooLong(chain.len()));
        }
        let key = ca_key(ca, key_pem)?;
        let ca_der = CertificateDer::from(ca.as_slice());
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| CaError::BadCertificate(e.to_string()))?;
        let anchor = webpki::anchor_from_trusted_cert(&ca_der)
            .map_err(|e| CaError::BadCertificate(e.to_string()))?
            .to_owned();
        Ok(CertificateAuthority {
            name: name.to_owned(),
            issuer,
            anchor,
            chain,
            validity_days,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// DER: the CA's certificate and its issuers, as issued chains end.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// Whether `leaf` is a client certificate this authority issued, valid at `now`
    /// (Unix seconds): the signature, validity and usage checked by rustls-webpki.
    pub fn issued(&self, leaf: &[u8], now: u64) -> bool {
        let leaf = CertificateDer::from(leaf);
        let Ok(end_entity) = webpki::EndEntityCert::try_from(&leaf) else {
            return false;
        };
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&self.anchor),
                &[],
                rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .is_ok()
    }

    /// Issues the leaf for `csr` to `device_id`. `now` is Unix seconds; `serial` random
    /// bytes (made positive here).
    pub fn issue(
        &self,
        csr: &CheckedCsr,
        device_id: &str,
        now: u64,
        serial: [u8; 16],
    ) -> Result<Issued, rcgen::Error> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let at = |seconds: i64| {
            time::OffsetDateTime::from_unix_timestamp(seconds)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        };
        let not_after = now.saturating_add(i64::from(self.validity_days) * 86_400);
        let mut serial = serial;
        serial[0] = (serial[0] & 0x7f) | 0x01;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device_id);
        params.not_before = at(now - BACKDATE_SECONDS);
        params.not_after = at(not_after);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki)?;
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let der = leaf.der().to_vec();
        let mut chain = vec![der.clone()];
        chain.extend(self.chain.iter().take(MAX_CHAIN - 1).cloned());
        Ok(Issued {
            sha256_thumbprint: crate::x509::thumbprint(&der),
            serial_number: serial.iter().map(|b| format!("{b:02X}")).collect(),
            not_after,
            chain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000;

    /// A root CA made here, as PEM (certificate, key).
    fn authority_pem() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway issuing CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn request(cn: &str, key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let csr = params.serialize_request(key).unwrap();
        base64::engine::general_purpose::STANDARD.encode(csr.der())
    }

    fn id(text: &str) -> RegistrationId {
        RegistrationId::from(text)
    }

    #[test]
    fn a_good_request_gets_a_client_certificate_for_the_device_chained_to_the_ca() {
        let (cert_pem, key_pem) = authority_pem();
        let ca = CertificateAuthority::from_pem("gateway", &cert_pem, &key_pem, 30).unwrap();
        let device_key = rcgen::KeyPair::generate().unwrap();
        let checked = check_csr(&request("dev-1", &device_key), &id("DEV-1")).unwrap();
        let issued = ca.issue(&checked, "device-one", NOW, [0xff; 16]).unwrap();
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(issued.chain[1], ca.chain()[0]);
        assert_eq!(issued.not_after, NOW as i64 + 30 * 86_400);
        assert_eq!(issued.serial_number.len(), 32);
        assert!(
            issued.serial_number.starts_with('7'),
            "positive: {}",
            issued.serial_number
        );

        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let cn = leaf.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "device-one");
        assert_eq!(leaf.validity().not_before.timestamp(), NOW as i64 - 300);
        assert_eq!(
            leaf.public_key().raw,
            device_key.subject_public_key_info().as_slice()
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(
            issued.sha256_thumbprint,
            crate::x509::thumbprint(&issued.chain[0])
        );
        assert!(ca.issued(&issued.chain[0], NOW));
        assert!(!ca.issued(&issued.chain[0], NOW + 31 * 86_400), "expired");
        let (other_pem, other_key) = authority_pem();
        let other = CertificateAuthority::from_pem("other", &other_pem, &other_key, 30).unwrap();
        assert!(!other.issued(&issued.chain[0], NOW), "another authority's");
        assert!(
            !ca.issued(&issued.chain[1], NOW),
            "the CA itself is no client"
        );

        // The chain verifies as a client certificate to the CA (rustls-webpki).
        let ca_der = CertificateDer::from(&issued.chain[1][..]);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let leaf_der = CertificateDer::from(&issued.chain[0][..]);
        let end_entity = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &[],
                rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW)),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .unwrap();
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let good_key = rcgen::KeyPair::generate().unwrap();
        assert_eq!(
            check_csr("not base64!", &id("dev-1")),
            Err(CsrError::NotBase64)
        );
        assert!(matches!(
            check_csr("aGVsbG8=", &id("dev-1")),
            Err(CsrError::NotCsr(_))
        ));
        // A certificate is not a request.
        let (cert_pem, _) = authority_pem();
        let cert_der = crate::x509::pem_der(&cert_pem).unwrap();
        let as_b64 = base64::engine::general_purpose::STANDARD.encode(cert_der);
        assert!(matches!(
            check_csr(&as_b64, &id("dev-1")),
            Err(CsrError::NotCsr(_))
        ));
        // Another device's name.
        assert_eq!(
            check_csr(&request("dev-2", &good_key), &id("dev-1")),
            Err(CsrError::WrongSubject {
                found: "`dev-2`".into(),
                expected: "dev-1".into()
            })
        );
        // A signature that does not verify: one byte of the signature changed.
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(request("dev-1", &good_key))
            .unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(
            check_csr(&tampered, &id("dev-1")),
            Err(CsrError::BadSignature)
        );
        // P-384 is accepted; Ed25519 is not.
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(check_csr(&request("dev-1", &p384), &id("dev-1")).is_ok());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            check_csr(&request("dev-1", &ed), &id("dev-1")),
            Err(CsrError::WeakKey(_))
        ));
    }

    #[test]
    fn an_authority_must_be_a_ca_with_its_own_key() {
        let (cert_pem, key_pem) = authority_pem();
        let (_, other_key) = authority_pem();
        assert_eq!(
            CertificateAuthority::from_pem("x", &cert_pem, &other_key, 30).unwrap_err(),
            CaError::KeyMismatch
        );
        assert_eq!(
            CertificateAuthority::from_pem("x", "", &key_pem, 30).unwrap_err(),
            CaError::NoCertificate
        );
        assert_eq!(
            CertificateAuthority::from_pem("x", &cert_pem, &key_pem, 0).unwrap_err(),
            CaError::BadValidity
        );
        // A leaf is not an authority.
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["leaf".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        assert_eq!(
            CertificateAuthority::from_pem("x", &leaf.pem(), &leaf_key.serialize_pem(), 30)
                .unwrap_err(),
            CaError::NotCa
        );
        let three = format!("{cert_pem}{cert_pem}{cert_pem}");
        assert_eq!(
            CertificateAuthority::from_pem("x", &three, &key_pem, 30).unwrap_err(),
            CaError::ChainTooLong(3)
        );
    }
}
