//! rustls client configurations for devices.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::DeviceError;

pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DeviceError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(DeviceError::Pem("no certificate".into()));
    }
    Ok(certs)
}

/// A device's key: PKCS#8, SEC1 or PKCS#1 (`edgedps_policies::keys`).
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, DeviceError> {
    edgedps_policies::keys::private_key(pem).map_err(|e| DeviceError::Pem(e.to_string()))
}

/// A client configuration trusting `server_ca_pem`, presenting `identity` (chain PEM,
/// key PEM) when given.
pub fn client_config(
    server_ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, DeviceError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(server_ca_pem)? {
        roots.add(cert)?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => {
            builder.with_client_auth_cert(certificates(chain)?, private_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    // Every connection is a full handshake, as for a fleet of distinct devices (and for
    // the load generator, which plays one).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
