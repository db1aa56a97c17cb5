//! Test PKI for the unit tests of this crate, generated at test time (rcgen).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that can sign certificates.
pub struct Ca {
    pub der: Vec<u8>,
    pub issuer: Issuer<'static, KeyPair>,
}

/// A root CA (`parent` none) or an intermediate signed by `parent`.
pub fn ca(name: &str, parent: Option<&Ca>) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = match parent {
        Some(p) => params.signed_by(&key, &p.issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    Ca {
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate with subject CN `cn` signed by `parent`, DER; `adjust` sets the rest.
pub fn leaf(cn: &str, parent: &Ca, adjust: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    adjust(&mut params);
    let key = KeyPair::generate().unwrap();
    params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .to_vec()
}
