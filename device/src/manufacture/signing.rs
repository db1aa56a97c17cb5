//! An in-memory signing CA and device certificates made with rcgen, for the load
//! generator's X.509 devices and the tests.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A CA that signs device certificates.
pub struct SigningCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A device certificate, its key, and its SHA-256 thumbprint (upper-case hex).
pub struct DeviceCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub thumbprint: String,
}

impl SigningCa {
    pub fn new(name: &str) -> Result<SigningCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(SigningCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A client certificate with subject CN = the registration id.
    pub fn device(&self, registration_id: &str) -> Result<DeviceCertificate, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, registration_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DeviceCertificate {
            thumbprint: edgedps_policies::x509::thumbprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
