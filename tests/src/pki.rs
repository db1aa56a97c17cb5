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
        let key = KeyPair::generate().expect("key");
        Identity {
            cert_pem: self.leaf_for(cn, &key, adjust),
            key_pem: key.serialize_pem(),
        }
    }

    /// A certificate for `key` with custom parameters: PEM.
    pub fn leaf_for(
        &self,
        cn: &str,
        key: &KeyPair,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        adjust(&mut params);
        params.signed_by(key, &self.issuer).expect("sign").pem()
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
        let key = KeyPair::generate().expect("key");
        Identity {
            cert_pem: self.server_chain(&key),
            key_pem: key.serialize_pem(),
        }
    }

    /// A TLS server certificate for `localhost` and 127.0.0.1 with `key`, followed by
    /// this CA: PEM.
    pub fn server_chain(&self, key: &KeyPair) -> String {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(key, &self.issuer).expect("sign");
        format!("{}{}", cert.pem(), self.pem)
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

/// The three PEM forms of a private key, as operators' tools write them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    /// `openssl genpkey` (EC P-256): `BEGIN PRIVATE KEY`.
    Pkcs8,
    /// `openssl ecparam -genkey` (P-256): `BEGIN EC PARAMETERS`, then `BEGIN EC PRIVATE KEY`.
    Sec1,
    /// `openssl genrsa -traditional` (2048 bits): `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
}

/// Runs the stock `openssl` tool with `args`; panics with what it said unless it
/// succeeds.
pub fn openssl<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) {
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let out = std::process::Command::new("openssl")
        .args(&args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl KeyForm {
    pub const ALL: [KeyForm; 3] = [KeyForm::Pkcs8, KeyForm::Sec1, KeyForm::Pkcs1];

    /// A new key in this form, made by the stock `openssl` tool: its PEM text.
    pub fn openssl_key(self) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let out = path.to_string_lossy();
        let (label, args): (&str, Vec<&str>) = match self {
            KeyForm::Pkcs8 => (
                "-----BEGIN PRIVATE KEY-----",
                vec![
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    &out,
                ],
            ),
            KeyForm::Sec1 => (
                "-----BEGIN EC PRIVATE KEY-----",
                vec!["ecparam", "-name", "prime256v1", "-genkey", "-out", &out],
            ),
            KeyForm::Pkcs1 => (
                "-----BEGIN RSA PRIVATE KEY-----",
                vec!["genrsa", "-traditional", "-out", &out, "2048"],
            ),
        };
        openssl(args);
        let pem = std::fs::read_to_string(&path).expect("the key openssl wrote");
        assert!(pem.contains(label), "{self:?}: openssl wrote {pem}");
        pem
    }

    /// A new key in this form with a self-signed CA certificate for it (`openssl req
    /// -x509`, CA:TRUE, keyCertSign): (certificate PEM, key PEM).
    pub fn openssl_ca(self, cn: &str) -> (String, String) {
        let key = self.openssl_key();
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("ca.key");
        let cert_path = dir.path().join("ca.pem");
        std::fs::write(&key_path, &key).expect("write key");
        let subject = format!("/CN={cn}");
        openssl([
            "req",
            "-x509",
            "-new",
            "-days",
            "30",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-key",
            &key_path.to_string_lossy(),
            "-out",
            &cert_path.to_string_lossy(),
        ]);
        let cert = std::fs::read_to_string(&cert_path).expect("the certificate openssl wrote");
        (cert, key)
    }
}

/// A TLS server for `host_name` (a DNS name), its certificate signed by the test server
/// CA: test servers the gateway dials (fake hubs, webhooks).
pub fn tls_acceptor(host_name: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let identity = pki().server_ca.leaf(host_name, |params| {
        params
            .subject_alt_names
            .push(SanType::DnsName(host_name.try_into().expect("dns name")));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let certs =
        vec![
            rustls::pki_types::CertificateDer::from_pem_slice(identity.cert_pem.as_bytes())
                .expect("cert"),
        ];
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}
