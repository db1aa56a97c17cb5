//! A device's operational credential (PROTOCOL F): a key made on the device, the
//! certificate signing request sent with the register, and the chain the service
//! issued for it.

use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde_json::Value;

/// A new symmetric key: 32 random bytes, base64, as enrollments take them.
pub fn new_symmetric_key() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for a new key".to_owned())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A new key and the request for a certificate of it, subject CN = the registration id.
pub struct CertificateRequest {
    /// PEM, PKCS#8: stays on the device.
    pub key_pem: String,
    /// Base64 of the DER request, as the register body carries it.
    pub csr: String,
}

impl CertificateRequest {
    /// An ECDSA P-256 key and its request.
    pub fn new(registration_id: &str) -> Result<CertificateRequest, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, registration_id);
        let request = params.serialize_request(&key)?;
        Ok(CertificateRequest {
            key_pem: key.serialize_pem(),
            csr: base64::engine::general_purpose::STANDARD.encode(request.der()),
        })
    }
}

/// The chain issued with an answer (`registrationState.issuedCertificateChain`), DER,
/// leaf first; `None` when the answer has none or it is not base64.
pub fn issued_chain(answer: &Value) -> Option<Vec<Vec<u8>>> {
    answer["registrationState"]["issuedCertificateChain"]
        .as_array()?
        .iter()
        .map(|entry| {
            base64::engine::general_purpose::STANDARD
                .decode(entry.as_str()?)
                .ok()
        })
        .collect()
}

/// A chain as PEM, leaf first: what a TLS client presents.
pub fn chain_pem(chain: &[Vec<u8>]) -> String {
    let blocks: Vec<pem::Pem> = chain
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
        .collect();
    pem::encode_many(&blocks)
}
