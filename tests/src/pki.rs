//! Test PKI, generated once per test binary (rcgen): a server CA and certificate, a
//! device root and intermediate, and a rogue root with the same name as the device root.

use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A CA that can sign certificates.
pub struct Ca {
    pub pem: String,
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate with its key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn root(name: &str) -> Ca {
        Self::make(name, None)
    }

    pub fn intermediate(&self, name: &str) -> Ca {
        Self::make(name, Some(self))
    }

    fn make(name: &str, parent: Option<&Ca>) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = match parent {
            Some(p) => params.signed_by(&key, &p.issuer),
            None => params.self_signed(&key),
        }
        .expect("sign");
        Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A device (client) certificate with subject CN `cn`.
    pub fn device(&self, cn: &str) -> Identity {
        self.leaf(cn, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })
    }

    /// A certificate with custom parameters.
    pub fn leaf(&self, cn: &str, adjust: impl FnOnce(&mut CertificateParams)) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        adjust(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A PEM revocation list of this CA that revokes `revoked` (PEM certificates).
    pub fn crl(&self, revoked: &[&Identity]) -> String {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|identity| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&identity.serial()),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .expect("CRL")
        .pem()
        .expect("CRL PEM")
    }

    /// The TLS server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Identity {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity {
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Identity {
    /// The certificate's serial number, as its DER integer bytes.
    pub fn serial(&self) -> Vec<u8> {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).expect("certificate PEM");
        let cert = pem.parse_x509().expect("certificate");
        cert.raw_serial().to_vec()
    }

    /// SHA-256 of the certificate, upper-case hex.
    pub fn thumbprint(&self) -> String {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).expect("certificate PEM");
        edgedps_policies::x509::thumbprint(&pem.contents)
    }
}

/// A self-signed device certificate (no CA at all).
pub fn self_signed(cn: &str) -> Identity {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("sign");
    Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The PKI of one test binary.
pub struct Pki {
    pub server_ca: Ca,
    pub server: Identity,
    pub device_root: Ca,
    pub device_intermediate: Ca,
    pub rogue_root: Ca,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let server_ca = Ca::root("edgedps test server CA");
        let server = server_ca.server();
        let device_root = Ca::root("edgedps test device root");
        let device_intermediate = device_root.intermediate("edgedps test device intermediate");
        let rogue_root = Ca::root("edgedps test device root");
        Pki {
            server_ca,
            server,
            device_root,
            device_intermediate,
            rogue_root,
        }
    })
}
