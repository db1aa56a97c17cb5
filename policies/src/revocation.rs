//! Certificate revocation lists (PROTOCOL B, "Certificate revocation lists").
//!
//! An operator publishes a CRL; it is accepted only when its signature verifies against
//! a CA edgedps already trusts: the signing certificate of an enrollment group, or a CA
//! certificate sent with the CRL that is itself signed, link by link, by such a group
//! certificate. A certificate is revoked by a list when the list's issuer is the
//! certificate's issuer (by name, and by the signature on the certificate) and the list
//! names its serial. Revocation is permanent: a list past its `nextUpdate` still revokes.
//! x509-parser (with ring) reads the lists and checks the signatures.

use std::collections::HashSet;

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::SubjectPublicKeyInfo;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    #[error("body is neither a PEM `X509 CRL` block nor a DER CRL")]
    NoCrl,
    #[error("the CRL does not parse: {0}")]
    BadCrl(String),
    #[error("certificate {index} sent with the CRL does not parse: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("certificate `{0}` sent with the CRL is not a CA certificate")]
    NotCa(String),
    #[error("certificate `{0}` sent with the CRL is not signed by any enrollment group's CA (or by another certificate sent with it)")]
    UntrustedCertificate(String),
    #[error("the CRL's issuer `{0}` is not an enrollment group's signing certificate, nor a CA certificate sent with the CRL and signed by one")]
    UnknownIssuer(String),
    #[error("the CRL's signature does not verify with the key of its issuer `{0}`")]
    BadSignature(String),
}

/// A CRL body as an operator sends it: the list, and the CA certificates sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlBody {
    pub crl: Vec<u8>,
    pub certificates: Vec<Vec<u8>>,
}

/// Reads a body: a DER CRL, or PEM with one `X509 CRL` block and any number of
/// `CERTIFICATE` blocks (the CA that issued the list and, if that CA is not a group's,
/// the CAs between it and a group's certificate).
pub fn read_body(body: &[u8]) -> Result<CrlBody, CrlError> {
    if body.first() == Some(&0x30) {
        return Ok(CrlBody {
            crl: body.to_vec(),
            certificates: Vec::new(),
        });
    }
    let mut crl = None;
    let mut certificates = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(body) {
        let pem = pem.map_err(|e| CrlError::BadCrl(format!("PEM: {e}")))?;
        match pem.label.as_str() {
            "X509 CRL" if crl.is_none() => crl = Some(pem.contents),
            "X509 CRL" => return Err(CrlError::BadCrl("more than one CRL in the body".into())),
            "CERTIFICATE" => certificates.push(pem.contents),
            other => {
                return Err(CrlError::BadCrl(format!(
                    "unexpected PEM block `{other}` (only `X509 CRL` and `CERTIFICATE`)"
                )))
            }
        }
    }
    Ok(CrlBody {
        crl: crl.ok_or(CrlError::NoCrl)?,
        certificates,
    })
}

/// A verified revocation list.
#[derive(Debug, Clone)]
pub struct RevocationList {
    /// DER of the issuer's name.
    issuer: Vec<u8>,
    /// DER SubjectPublicKeyInfo of the CA whose key signed the list.
    issuer_key: Vec<u8>,
    /// Revoked serials, big-endian without leading zero bytes.
    serials: HashSet<Vec<u8>>,
    /// The issuer's name as text (`CN=...`), for messages.
    pub issuer_name: String,
    /// DER of the certificate that verified the list, kept to verify it again at start-up.
    pub issuer_certificate: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub this_update: i64,
    pub next_update: Option<i64>,
}

impl RevocationList {
    /// Verifies `crl` against the CAs edgedps trusts (`trusted`, DER) and the CA
    /// certificates sent with it (`sent`, DER; each must be signed by a trusted one or by
    /// another sent one already accepted).
    pub fn verify(
        crl: &[u8],
        sent: &[Vec<u8>],
        trusted: &[&[u8]],
    ) -> Result<RevocationList, CrlError> {
        let (_, list) = CertificateRevocationList::from_der(crl)
            .map_err(|e| CrlError::BadCrl(e.to_string()))?;
        let mut known: Vec<X509Certificate<'_>> = Vec::new();
        for der in trusted {
            // Group certificates were parsed when they were written; skip any that do not.
            if let Ok((_, cert)) = X509Certificate::from_der(der) {
                known.push(cert);
            }
        }
        let mut pending = Vec::new();
        for (index, der) in sent.iter().enumerate() {
            let (_, cert) =
                X509Certificate::from_der(der).map_err(|e| CrlError::BadCertificate {
                    index,
                    reason: e.to_string(),
                })?;
            if !cert.is_ca() {
                return Err(CrlError::NotCa(cert.subject().to_string()));
            }
            pending.push(cert);
        }
        // Accept sent certificates link by link, whatever order they came in.
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for cert in pending {
                if signed_by_one_of(&cert, &known) {
                    known.push(cert);
                } else {
                    rest.push(cert);
                }
            }
            if rest.len() == before {
                return Err(CrlError::UntrustedCertificate(
                    rest[0].subject().to_string(),
                ));
            }
            pending = rest;
        }
        let issuer_name = list.issuer().to_string();
        let mut candidates = known
            .iter()
            .filter(|ca| ca.subject().as_raw() == list.issuer().as_raw())
            .peekable();
        if candidates.peek().is_none() {
            return Err(CrlError::UnknownIssuer(issuer_name));
        }
        let issuer = candidates
            .find(|ca| list.verify_signature(ca.public_key()).is_ok())
            .ok_or_else(|| CrlError::BadSignature(issuer_name.clone()))?;
        Ok(Self::build(&list, issuer, issuer_name))
    }

    /// A list verified before (at its write), verified again against the certificate
    /// that verified it then.
    pub fn reload(crl: &[u8], issuer_certificate: &[u8]) -> Result<RevocationList, CrlError> {
        let (_, list) = CertificateRevocationList::from_der(crl)
            .map_err(|e| CrlError::BadCrl(e.to_string()))?;
        let (_, issuer) = X509Certificate::from_der(issuer_certificate).map_err(|e| {
            CrlError::BadCertificate {
                index: 0,
                reason: e.to_string(),
            }
        })?;
        let issuer_name = list.issuer().to_string();
        if issuer.subject().as_raw() != list.issuer().as_raw()
            || list.verify_signature(issuer.public_key()).is_err()
        {
            return Err(CrlError::BadSignature(issuer_name));
        }
        Ok(Self::build(&list, &issuer, issuer_name))
    }

    fn build(
        list: &CertificateRevocationList<'_>,
        issuer: &X509Certificate<'_>,
        issuer_name: String,
    ) -> RevocationList {
        RevocationList {
            issuer: list.issuer().as_raw().to_vec(),
            issuer_key: issuer.public_key().raw.to_vec(),
            serials: list
                .iter_revoked_certificates()
                .map(|revoked| serial(revoked.raw_serial()))
                .collect(),
            issuer_name,
            issuer_certificate: issuer.as_raw().to_vec(),
            this_update: list.last_update().timestamp(),
            next_update: list.next_update().map(|t| t.timestamp()),
        }
    }

    /// How many certificates the list revokes.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// DER of the issuer's name: certificates issued by it are the ones this list speaks of.
    pub fn issuer(&self) -> &[u8] {
        &self.issuer
    }

    /// Does this list revoke `cert`?
    pub fn revokes(&self, cert: &X509Certificate<'_>) -> bool {
        if cert.issuer().as_raw() != self.issuer.as_slice()
            || !self.serials.contains(&serial(cert.raw_serial()))
        {
            return false;
        }
        // Same name and serial: make sure this list's CA really issued the certificate
        // (two CAs may share a name).
        SubjectPublicKeyInfo::from_der(&self.issuer_key)
            .map(|(_, key)| cert.verify_signature(Some(&key)).is_ok())
            .unwrap_or(false)
    }
}

/// A revoked certificate of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Position in the chain (0: the leaf).
    pub position: usize,
    /// Upper-case hex.
    pub serial: String,
    pub issuer_name: String,
}

/// The first certificate of `chain` (DER, leaf first) that one of `lists` revokes.
/// Certificates that do not parse are skipped: the chain check refuses them anyway.
pub fn revoked_in<'a>(
    lists: impl IntoIterator<Item = &'a RevocationList> + Clone,
    chain: &[Vec<u8>],
) -> Option<Revoked> {
    for (position, der) in chain.iter().enumerate() {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        if let Some(list) = lists.clone().into_iter().find(|l| l.revokes(&cert)) {
            return Some(Revoked {
                position,
                serial: hex(&serial(cert.raw_serial())),
                issuer_name: list.issuer_name.clone(),
            });
        }
    }
    None
}

fn signed_by_one_of(cert: &X509Certificate<'_>, cas: &[X509Certificate<'_>]) -> bool {
    cas.iter().any(|ca| {
        ca.subject().as_raw() == cert.issuer().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok()
    })
}

/// A serial as a set key: DER integers may carry a leading zero byte.
fn serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, Ca};
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};

    fn leaf(cn: &str, serial: u64, parent: &Ca) -> Vec<u8> {
        crate::test_pki::leaf(cn, parent, |p| {
            p.serial_number = Some(SerialNumber::from(serial))
        })
    }

    fn crl(by: &Ca, serials: &[u64]) -> rcgen::CertificateRevocationList {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&by.issuer)
        .unwrap()
    }

    #[test]
    fn a_group_ca_list_revokes_its_listed_certificates_only() {
        let root = ca("root", None);
        let list = crl(&root, &[7, 300]);
        let list = RevocationList::verify(list.der(), &[], &[&root.der]).unwrap();
        assert_eq!(list.len(), 2);
        let revoked = leaf("dev-1", 300, &root);
        let fine = leaf("dev-2", 8, &root);
        assert_eq!(
            revoked_in([&list], std::slice::from_ref(&fine)),
            None,
            "an unlisted serial"
        );
        let hit = revoked_in([&list], &[fine, revoked]).unwrap();
        assert_eq!(hit.position, 1);
        assert_eq!(hit.serial, "012C");
        assert_eq!(hit.issuer_name, "CN=root");
    }

    #[test]
    fn a_list_from_another_ca_with_the_same_name_revokes_nothing() {
        let root = ca("root", None);
        let twin = ca("root", None);
        let list = crl(&root, &[5]);
        let list = RevocationList::verify(list.der(), &[], &[&root.der]).unwrap();
        let other = leaf("dev-1", 5, &twin);
        assert_eq!(revoked_in([&list], &[other]), None);
    }

    #[test]
    fn a_forged_list_is_refused() {
        let root = ca("root", None);
        let rogue = ca("root", None);
        let forged = crl(&rogue, &[5]);
        assert_eq!(
            RevocationList::verify(forged.der(), &[], &[&root.der]).unwrap_err(),
            CrlError::BadSignature("CN=root".into())
        );
        let stranger = ca("stranger", None);
        let unknown = crl(&stranger, &[5]);
        assert!(matches!(
            RevocationList::verify(unknown.der(), &[], &[&root.der]),
            Err(CrlError::UnknownIssuer(_))
        ));
        assert!(matches!(
            RevocationList::verify(b"\x30\x03\x02\x01\x01", &[], &[&root.der]),
            Err(CrlError::BadCrl(_))
        ));
    }

    #[test]
    fn an_intermediate_sent_with_its_list_is_accepted_when_a_group_ca_signed_it() {
        let root = ca("root", None);
        let intermediate = ca("intermediate", Some(&root));
        let list = crl(&intermediate, &[9]);
        assert!(matches!(
            RevocationList::verify(list.der(), &[], &[&root.der]),
            Err(CrlError::UnknownIssuer(_))
        ));
        let accepted = RevocationList::verify(
            list.der(),
            std::slice::from_ref(&intermediate.der),
            &[&root.der],
        )
        .unwrap();
        let device = leaf("dev-1", 9, &intermediate);
        assert!(revoked_in([&accepted], &[device]).is_some());
        // The same intermediate without a trusted group CA above it is not trusted.
        let stranger = ca("stranger", None);
        assert!(matches!(
            RevocationList::verify(
                list.der(),
                std::slice::from_ref(&intermediate.der),
                &[&stranger.der]
            ),
            Err(CrlError::UntrustedCertificate(_))
        ));
        // A list can be verified again from the certificate that verified it.
        let again = RevocationList::reload(list.der(), &accepted.issuer_certificate).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn bodies_are_pem_or_der() {
        let root = ca("root", None);
        let list = crl(&root, &[1]);
        let pem = list.pem().unwrap();
        let body = read_body(pem.as_bytes()).unwrap();
        assert_eq!(body.crl, list.der().to_vec());
        assert!(body.certificates.is_empty());
        let root_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64_of(&root.der)
        );
        let body = read_body(format!("{pem}{root_pem}").as_bytes()).unwrap();
        assert_eq!(body.certificates, vec![root.der.clone()]);
        assert_eq!(read_body(list.der()).unwrap().crl, list.der().to_vec());
        assert_eq!(read_body(b"hello").unwrap_err(), CrlError::NoCrl);
        assert!(read_body(root_pem.as_bytes()).is_err());
    }

    fn base64_of(der: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    }
}
