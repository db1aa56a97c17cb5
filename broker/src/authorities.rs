//! The certificate authorities that issue device certificates (PROTOCOL F,
//! `[[certificate_authorities]]`): read from their files, or, for one configured without
//! files, generated on first start in `{data_dir}/ca/{name}/` (an ECDSA P-256 root) and
//! read from there afterwards.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use edgedps_policies::issuance::CertificateAuthority;

use crate::config::CertificateAuthorityConfig;
use crate::Error;

/// Every configured authority, by name.
pub fn load(
    configured: &[CertificateAuthorityConfig],
    data_dir: &Path,
) -> Result<BTreeMap<String, Arc<CertificateAuthority>>, Error> {
    let mut out = BTreeMap::new();
    for ca in configured {
        let (cert, key) = match (&ca.cert, &ca.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => generated(&ca.name, data_dir)?,
        };
        let read = |path: &PathBuf| {
            fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
                key: "certificate_authorities",
                message: format!("`{}`: {}: {e}", ca.name, path.display()),
            })
        };
        let authority =
            CertificateAuthority::from_pem(&ca.name, &read(&cert)?, &read(&key)?, ca.validity_days)
                .map_err(|e| {
                    // Name the file the operator has to change.
                    let file = if e.concerns_key() { &key } else { &cert };
                    Error::InvalidConfig {
                        key: "certificate_authorities",
                        message: format!("`{}` ({}): {e}", ca.name, file.display()),
                    }
                })?;
        tracing::info!(name = %ca.name, cert = %cert.display(), validity_days = ca.validity_days, "certificate authority ready to issue device certificates");
        out.insert(ca.name.clone(), Arc::new(authority));
    }
    Ok(out)
}

/// The files of an authority generated in the data directory, made on first use.
fn generated(name: &str, data_dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let dir = data_dir.join("ca").join(name);
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let io = |e: std::io::Error| Error::DevCertFile {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    };
    fs::create_dir_all(&dir).map_err(io)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("edgedps {name} device CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let signing_key = KeyPair::generate()?;
    let certificate = params.self_signed(&signing_key)?;
    crate::devcert::write_private(&key, signing_key.serialize_pem().as_bytes()).map_err(io)?;
    fs::write(&cert, certificate.pem()).map_err(io)?;
    tracing::info!(%name, cert = %cert.display(), "generated a certificate authority for device certificates; devices and hubs that check issued certificates trust this file");
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(name: &str) -> CertificateAuthorityConfig {
        CertificateAuthorityConfig {
            name: name.into(),
            cert: None,
            key: None,
            validity_days: 30,
        }
    }

    #[test]
    fn an_authority_without_files_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load(&[configured("gateway")], dir.path()).unwrap();
        let pem = fs::read_to_string(dir.path().join("ca/gateway/ca.pem")).unwrap();
        assert_eq!(first["gateway"].chain().len(), 1);
        let again = load(&[configured("gateway")], dir.path()).unwrap();
        assert_eq!(again["gateway"].chain(), first["gateway"].chain());
        assert_eq!(
            fs::read_to_string(dir.path().join("ca/gateway/ca.pem")).unwrap(),
            pem
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("ca/gateway/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn files_that_are_not_an_authority_are_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = crate::devcert::ensure(dir.path()).unwrap();
        // The development server certificate is not a CA.
        let mut ca = configured("server");
        ca.cert = Some(dev.cert.clone());
        ca.key = Some(dev.key.clone());
        let err = load(&[ca], dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("`server`") && err.contains("not a CA"),
            "{err}"
        );
        let mut missing = configured("missing");
        missing.cert = Some(dir.path().join("nope.pem"));
        missing.key = Some(dir.path().join("nope.key"));
        let err = load(&[missing], dir.path()).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
