//! TLS for the device listener (DESIGN, data flow step 1) and the operator listener.
//!
//! rustls with TLS 1.2 (the Python SDK offers nothing newer) and 1.3. The client
//! certificate is optional: symmetric-key devices present none. When one is presented,
//! the verifier checks the handshake signature, which proves the device holds the
//! private key, and accepts the chain as presented; whether the chain is trusted is
//! decided at CONNECT against the enrollments, which operators change at run time.

mod stream;

pub use stream::TlsStream;

use std::path::Path;
use std::sync::Arc;

use crate::Error;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ring, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

/// Accepts any presented chain after checking the handshake signature.
#[derive(Debug)]
pub struct PresentedChainVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PresentedChainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Trust is decided at CONNECT (responder::attestation), see the module comment.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server configuration, built once and shared by every handshake.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, Error> {
    let certs = read_certificates(cert_path)?;
    let key = read_key(key_path)?;
    let provider = Arc::new(ring::default_provider());
    let verifier = Arc::new(PresentedChainVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| key_error(key_path, e))?;
    without_resumption(&mut config);
    Ok(Arc::new(config))
}

/// The operator listener's configuration: the server certificate, and with `client_ca`
/// client certificates checked against it (chain, validity, client use). A client may
/// still come without one and give a password instead.
pub fn operator_server_config(
    cert_path: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, Error> {
    let certs = read_certificates(cert_path)?;
    let key = read_key(key_path)?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?;
    let mut config = match client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certificates(path)? {
                roots.add(ca).map_err(|e| file_error(path, e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| file_error(path, e))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key),
    }
    .map_err(|e| key_error(key_path, e))?;
    without_resumption(&mut config);
    Ok(Arc::new(config))
}

/// No session resumption: every client offers it (rustls's and OpenSSL's send
/// `psk_key_exchange_modes` in every TLS 1.3 hello), so by default two tickets would be
/// made, encrypted, sent and cached per handshake: about 5% of a registration's server
/// CPU (BENCHMARKS.md, issue 28). No DPS client resumes: the device SDKs open a new
/// connection for each registration.
fn without_resumption(config: &mut ServerConfig) {
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

fn file_error(path: &Path, reason: impl ToString) -> Error {
    Error::TlsFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// rustls refused the key (a kind it cannot sign with, or not the certificate's).
fn key_error(path: &Path, error: rustls::Error) -> Error {
    let reason = match error {
        rustls::Error::InconsistentKeys(_) => {
            "the key does not belong to the certificate (tls_cert)".to_owned()
        }
        other => format!("the key cannot sign TLS handshakes: {other}"),
    };
    file_error(path, reason)
}

pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A listener's key: PKCS#8, SEC1 or PKCS#1 (`edgedps_policies::keys`).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    edgedps_policies::keys::private_key(&pem).map_err(|e| file_error(path, e))
}
