//! A device bundle (`edgedps manufacture batch`) as our device client uses it: the
//! provisioning facts and the factory credential, and beside them the operational
//! certificate the service issued (PROTOCOL F), kept in `operational.pem` and
//! `operational.key` and replaced on renewal.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::credentials::{chain_pem, issued_chain, CertificateRequest};
use crate::provision::{register, DeviceAuth, DeviceConfig, Outcome};
use crate::DeviceError;

/// `provisioning.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provisioning {
    pub id_scope: String,
    pub host: String,
    pub port: u16,
    pub registration_id: String,
    /// `x509` or `symmetricKey`.
    pub attestation: String,
}

/// A bundle directory.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    pub provisioning: Provisioning,
}

impl Bundle {
    pub fn open(dir: &Path) -> Result<Bundle, DeviceError> {
        let text = read(&dir.join("provisioning.json"))?;
        let provisioning = serde_json::from_str(&text)
            .map_err(|e| DeviceError::Bundle(format!("provisioning.json: {e}")))?;
        Ok(Bundle {
            dir: dir.to_owned(),
            provisioning,
        })
    }

    /// The CA to trust for the service.
    pub fn trust(&self) -> Result<Vec<u8>, DeviceError> {
        Ok(read(&self.dir.join("trust.pem"))?.into_bytes())
    }

    /// The credential the device left the factory with.
    pub fn factory_auth(&self) -> Result<DeviceAuth, DeviceError> {
        match self.provisioning.attestation.as_str() {
            "x509" => Ok(DeviceAuth::X509 {
                chain_pem: read(&self.dir.join("device.pem"))?.into_bytes(),
                key_pem: read(&self.dir.join("device.key"))?.into_bytes(),
            }),
            "symmetricKey" => Ok(DeviceAuth::SymmetricKey {
                key: read(&self.dir.join("symmetric-key"))?.trim().to_owned(),
            }),
            other => Err(DeviceError::Bundle(format!(
                "provisioning.json: attestation `{other}` is not x509 or symmetricKey"
            ))),
        }
    }

    /// The operational certificate the service issued, once there is one.
    pub fn operational_auth(&self) -> Result<Option<DeviceAuth>, DeviceError> {
        let (cert, key) = self.operational_files();
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        Ok(Some(DeviceAuth::X509 {
            chain_pem: read(&cert)?.into_bytes(),
            key_pem: read(&key)?.into_bytes(),
        }))
    }

    /// The provisioning client's configuration with `auth`.
    pub fn device_config(&self, auth: DeviceAuth) -> Result<DeviceConfig, DeviceError> {
        let p = &self.provisioning;
        Ok(DeviceConfig::new(
            &p.host,
            p.port,
            &p.id_scope,
            &p.registration_id,
            auth,
            self.trust()?,
        ))
    }

    /// Keeps an issued chain (DER, leaf first) and its key as the operational
    /// credential, replacing the one before in one step each (write, then rename).
    pub fn store_operational(&self, chain: &[Vec<u8>], key_pem: &str) -> Result<(), DeviceError> {
        let (cert, key) = self.operational_files();
        replace(&key, key_pem.as_bytes(), true)?;
        replace(&cert, chain_pem(chain).as_bytes(), false)
    }

    fn operational_files(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("operational.pem"),
            self.dir.join("operational.key"),
        )
    }
}

/// Provisions with the factory credential, asking for a certificate, and keeps the one
/// issued as the operational credential.
pub async fn provision_with_certificate(bundle: &Bundle) -> Result<Outcome, DeviceError> {
    let request = CertificateRequest::new(&bundle.provisioning.registration_id)
        .map_err(|e| DeviceError::Bundle(format!("certificate request: {e}")))?;
    let mut config = bundle.device_config(bundle.factory_auth()?)?;
    config.csr = Some(request.csr);
    let outcome = register(&config, None).await?;
    if let Some(chain) = issued_chain(&outcome.body) {
        bundle.store_operational(&chain, &request.key_pem)?;
    }
    Ok(outcome)
}

fn read(path: &Path) -> Result<String, DeviceError> {
    std::fs::read_to_string(path)
        .map_err(|e| DeviceError::Bundle(format!("{}: {e}", path.display())))
}

fn replace(path: &Path, bytes: &[u8], private: bool) -> Result<(), DeviceError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| DeviceError::Bundle(format!("{}: {e}", path.display()));
    let temporary = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&temporary)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}
