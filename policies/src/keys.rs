//! Private keys from PEM files, in the three forms operators keep them: PKCS#8
//! (`BEGIN PRIVATE KEY`, what rcgen and `openssl genpkey` write), SEC1 (`BEGIN EC
//! PRIVATE KEY`, what `openssl ecparam -genkey` writes) and PKCS#1 (`BEGIN RSA PRIVATE
//! KEY`, what `openssl genrsa -traditional` and older tools write).
//!
//! Every PEM key file edgedps reads comes through here: the TLS listeners' keys, the
//! certificate authorities' keys, the signing CA `edgedps manufacture` imports, a
//! device's key. rustls signs with any of the three forms; rcgen (with ring) signs with
//! PKCS#8 only, so a key that signs certificates is rewrapped as PKCS#8 first
//! ([`pkcs8`]): the key itself is not touched, only the envelope around it.

use pkcs8::der::asn1::AnyRef;
use pkcs8::der::Encode;
use pkcs8::{AlgorithmIdentifierRef, ObjectIdentifier, PrivateKeyInfo};
use rustls_pki_types::pem::{Error as PemError, PemObject};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The forms read, for messages.
pub const FORMS: &str =
    "PKCS#8 (BEGIN PRIVATE KEY), SEC1 (BEGIN EC PRIVATE KEY) or PKCS#1 (BEGIN RSA PRIVATE KEY)";

const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Why a PEM file gave no usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no private key in a form edgedps reads ({FORMS}); {found}")]
    NoKey { found: String },
    #[error("the {form} key is not readable: {reason}")]
    Malformed { form: &'static str, reason: String },
    #[error(
        "the {form} key is {what}; edgedps signs with EC P-256 or P-384, RSA, or Ed25519 (PKCS#8)"
    )]
    Unsupported { form: &'static str, what: String },
}

/// The first private key of `pem`, in whichever of the three forms it is. Other PEM
/// blocks (the `EC PARAMETERS` that `openssl ecparam -genkey` writes first, a
/// certificate) are passed over.
pub fn private_key(pem_text: &[u8]) -> Result<PrivateKeyDer<'static>, KeyError> {
    match PrivateKeyDer::from_pem_slice(pem_text) {
        Ok(key) => Ok(key),
        Err(PemError::NoItemsFound) => Err(KeyError::NoKey {
            found: found(pem_text),
        }),
        Err(e) => Err(KeyError::Malformed {
            form: "PEM",
            reason: e.to_string(),
        }),
    }
}

/// What a PEM file holds instead of a key, for [`KeyError::NoKey`].
fn found(pem_text: &[u8]) -> String {
    let text = String::from_utf8_lossy(pem_text);
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("-----BEGIN ")?
                .strip_suffix("-----")
        })
        .collect();
    if labels.is_empty() {
        return "the file holds no PEM block".to_owned();
    }
    let mut found = format!("the file holds: {}", labels.join(", "));
    if labels.iter().any(|label| label.contains("ENCRYPTED")) {
        found.push_str(
            " (an encrypted key is not read: decrypt it, e.g. `openssl pkey -in key.pem -out plain.pem`)",
        );
    }
    found
}

/// `key` as PKCS#8: as it is, or a SEC1 or PKCS#1 key in a PKCS#8 envelope.
pub fn pkcs8(key: &PrivateKeyDer<'_>) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    let form = form(key);
    let info_der = match key {
        PrivateKeyDer::Pkcs8(key) => return Ok(key.clone_key()),
        PrivateKeyDer::Sec1(key) => {
            let der = key.secret_sec1_der();
            let ec = sec1::EcPrivateKey::try_from(der).map_err(|e| KeyError::Malformed {
                form,
                reason: e.to_string(),
            })?;
            let curve = ec.parameters.and_then(|p| p.named_curve()).ok_or_else(|| {
                KeyError::Unsupported {
                    form,
                    what: "on a curve it does not name".to_owned(),
                }
            })?;
            if curve != P256 && curve != P384 {
                return Err(KeyError::Unsupported {
                    form,
                    what: format!("on curve {curve}"),
                });
            }
            // ring needs the public key beside the private one; openssl writes both.
            if ec.public_key.is_none() {
                return Err(KeyError::Malformed {
                    form,
                    reason: "it carries no public key (`openssl ec -in key.pem -out full.pem` writes one)"
                        .to_owned(),
                });
            }
            let algorithm = AlgorithmIdentifierRef {
                oid: sec1::ALGORITHM_OID,
                parameters: Some(AnyRef::from(&curve)),
            };
            PrivateKeyInfo::new(algorithm, der).to_der()
        }
        PrivateKeyDer::Pkcs1(key) => {
            let der = key.secret_pkcs1_der();
            pkcs1::RsaPrivateKey::try_from(der).map_err(|e| KeyError::Malformed {
                form,
                reason: e.to_string(),
            })?;
            PrivateKeyInfo::new(pkcs1::ALGORITHM_ID, der).to_der()
        }
        _ => {
            return Err(KeyError::Unsupported {
                form,
                what: "of a kind edgedps does not know".to_owned(),
            })
        }
    };
    info_der
        .map(PrivatePkcs8KeyDer::from)
        .map_err(|e| KeyError::Malformed {
            form: "PKCS#8",
            reason: e.to_string(),
        })
}

/// The key of `pem` as a key pair that signs certificates (a CA's key, a device key
/// the manufacturing tools certify).
pub fn key_pair(pem_text: &[u8]) -> Result<rcgen::KeyPair, KeyError> {
    let key = private_key(pem_text)?;
    let form = form(&key);
    let pkcs8 = pkcs8(&key)?;
    rcgen::KeyPair::try_from(&pkcs8).map_err(|_| KeyError::Unsupported {
        form,
        what: "not one rcgen can sign with (or an RSA key under 2048 bits)".to_owned(),
    })
}

/// The name of `key`'s form, for messages.
fn form(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs8(_) => "PKCS#8",
        PrivateKeyDer::Sec1(_) => "SEC1",
        PrivateKeyDer::Pkcs1(_) => "PKCS#1",
        _ => "PEM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs8::der::Decode;
    use rcgen::PublicKeyData;

    /// PEM text of `der` under `label`.
    fn armour(label: &str, der: &[u8]) -> String {
        pem::encode(&pem::Pem::new(label, der))
    }

    /// An rcgen key (PKCS#8) as openssl's `ecparam -genkey` writes it: SEC1 with the
    /// curve named, after an `EC PARAMETERS` block.
    fn as_sec1(key: &rcgen::KeyPair, curve: ObjectIdentifier, public: bool) -> String {
        let info = PrivateKeyInfo::from_der(key.serialized_der()).unwrap();
        let mut ec = sec1::EcPrivateKey::from_der(info.private_key).unwrap();
        ec.parameters = Some(sec1::EcParameters::NamedCurve(curve));
        if !public {
            ec.public_key = None;
        }
        format!(
            "{}{}",
            armour("EC PARAMETERS", &curve.to_der().unwrap()),
            armour("EC PRIVATE KEY", &ec.to_der().unwrap())
        )
    }

    fn signs(key: &rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(vec!["ca".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert!(parsed.verify_signature(None).is_ok());
    }

    #[test]
    fn a_pkcs8_key_is_read_as_it_is() {
        let key = rcgen::KeyPair::generate().unwrap();
        let read = key_pair(key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(read.serialized_der(), key.serialized_der());
        assert!(matches!(
            private_key(key.serialize_pem().as_bytes()),
            Ok(PrivateKeyDer::Pkcs8(_))
        ));
    }

    #[test]
    fn a_sec1_key_after_its_parameters_is_read_and_signs_as_the_same_key() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let original = rcgen::KeyPair::generate_for(alg).unwrap();
            let curve = if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
                P256
            } else {
                P384
            };
            let sec1 = as_sec1(&original, curve, true);
            assert!(matches!(
                private_key(sec1.as_bytes()),
                Ok(PrivateKeyDer::Sec1(_))
            ));
            let read = key_pair(sec1.as_bytes()).unwrap();
            assert_eq!(
                read.subject_public_key_info(),
                original.subject_public_key_info()
            );
            signs(&read);
        }
    }

    #[test]
    fn a_sec1_key_without_its_curve_or_public_key_or_on_another_curve_is_refused() {
        let original = rcgen::KeyPair::generate().unwrap();
        let no_public = as_sec1(&original, P256, false);
        assert!(matches!(
            key_pair(no_public.as_bytes()),
            Err(KeyError::Malformed { form: "SEC1", reason }) if reason.contains("no public key")
        ));
        let secp256k1 = ObjectIdentifier::new_unwrap("1.3.132.0.10");
        let other = as_sec1(&original, secp256k1, true);
        assert_eq!(
            key_pair(other.as_bytes()).unwrap_err().to_string(),
            "the SEC1 key is on curve 1.3.132.0.10; edgedps signs with EC P-256 or P-384, RSA, or Ed25519 (PKCS#8)"
        );
        let info = PrivateKeyInfo::from_der(original.serialized_der()).unwrap();
        let unnamed = armour("EC PRIVATE KEY", info.private_key);
        assert!(matches!(
            key_pair(unnamed.as_bytes()),
            Err(KeyError::Unsupported { form: "SEC1", .. })
        ));
    }

    #[test]
    fn a_pkcs1_envelope_is_checked_before_it_is_rewrapped() {
        let garbage = armour("RSA PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            key_pair(garbage.as_bytes()),
            Err(KeyError::Malformed { form: "PKCS#1", .. })
        ));
    }

    #[test]
    fn a_file_without_a_key_says_what_it_holds_and_which_forms_are_read() {
        let cert_only = armour("CERTIFICATE", &[1, 2, 3]);
        let message = private_key(cert_only.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            message,
            "no private key in a form edgedps reads (PKCS#8 (BEGIN PRIVATE KEY), SEC1 (BEGIN EC \
             PRIVATE KEY) or PKCS#1 (BEGIN RSA PRIVATE KEY)); the file holds: CERTIFICATE"
        );
        let encrypted = armour("ENCRYPTED PRIVATE KEY", &[1, 2, 3]);
        let message = private_key(encrypted.as_bytes()).unwrap_err().to_string();
        assert!(
            message.contains("ENCRYPTED PRIVATE KEY (an encrypted key is not read"),
            "{message}"
        );
        let message = private_key(b"not pem at all").unwrap_err().to_string();
        assert!(
            message.ends_with("the file holds no PEM block"),
            "{message}"
        );
    }
}
