//! The development server certificate of the embedded default: generated on first
//! start in `{data_dir}/tls/`, with the CA that signed it next to it (`dev-ca.pem`) so a
//! device can trust the server. For production, configure `tls_cert` and `tls_key`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// The name the development certificate always carries (the embedded default's local
/// hub is named so).
pub const ALWAYS_NAMED: &str = "localhost";

pub struct DevCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Returns the development certificate, generating it if it is not there yet.
pub fn ensure(data_dir: &Path) -> Result<DevCertificate, Error> {
    let dir = data_dir.join("tls");
    let paths = DevCertificate {
        cert: dir.join("server-fullchain.pem"),
        key: dir.join("server.key"),
        ca: dir.join("dev-ca.pem"),
    };
    if paths.cert.exists() && paths.key.exists() && paths.ca.exists() {
        return Ok(paths);
    }
    let io = |e: std::io::Error| Error::DevCertFile {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    };
    fs::create_dir_all(&dir).map_err(io)?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edgedps development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![ALWAYS_NAMED.to_string()];
    if let Ok(host) = fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != ALWAYS_NAMED {
            names.push(host.to_string());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "edgedps development server");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    fs::write(&paths.cert, format!("{}{}", cert.pem(), ca_cert.pem())).map_err(io)?;
    fs::write(&paths.ca, ca_cert.pem()).map_err(io)?;
    write_private(&paths.key, key.serialize_pem().as_bytes()).map_err(io)?;
    tracing::info!(ca = %paths.ca.display(), "generated a development server certificate; devices trust it through this CA file");
    Ok(paths)
}

/// Writes a private key file readable by its owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        let pem = fs::read_to_string(&first.cert).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "server and CA");
        let config = crate::tls::server_config(&first.cert, &first.key);
        assert!(config.is_ok());
        let again = ensure(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&again.cert).unwrap(), pem);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&first.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }
}
