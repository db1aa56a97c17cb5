//! `edgedps manufacture ca`: the device root CA and the intermediate that signs device
//! certificates (ECDSA P-256), written to a directory as `root.pem`, `root.key`,
//! `intermediate.pem` and `intermediate.key` (keys readable by their owner only). Or an
//! existing signing CA imported into the same layout. Existing files are never replaced.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::{read, write_new, ManufactureError};

#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// Directory to write the CA files to (created; must not hold them already).
    #[arg(long)]
    pub out: PathBuf,
    /// Common name prefix of the CAs made.
    #[arg(long, default_value = "edgedps device")]
    pub name: String,
    /// Import this signing CA (PEM certificate) instead of making one; with --import-key.
    #[arg(long, requires = "import_key")]
    pub import_cert: Option<PathBuf>,
    /// The imported signing CA's key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, requires = "import_cert")]
    pub import_key: Option<PathBuf>,
    /// With --import-cert: the root it chains to (PEM), when it is an intermediate.
    #[arg(long, requires = "import_cert")]
    pub import_root: Option<PathBuf>,
}

/// The files of a manufacturing CA directory.
pub struct CaFiles {
    pub root: PathBuf,
    pub root_key: PathBuf,
    pub intermediate: PathBuf,
    pub intermediate_key: PathBuf,
}

impl CaFiles {
    pub fn of(dir: &Path) -> CaFiles {
        CaFiles {
            root: dir.join("root.pem"),
            root_key: dir.join("root.key"),
            intermediate: dir.join("intermediate.pem"),
            intermediate_key: dir.join("intermediate.key"),
        }
    }
}

/// Makes (or imports) the CA into `args.out`.
pub fn run(args: &CaArgs) -> Result<CaFiles, ManufactureError> {
    std::fs::create_dir_all(&args.out).map_err(|e| ManufactureError::file(&args.out, e))?;
    let files = CaFiles::of(&args.out);
    for path in [&files.root, &files.intermediate, &files.intermediate_key] {
        if path.exists() {
            return Err(ManufactureError::Refused(format!(
                "{} exists; a CA is never overwritten (choose another --out)",
                path.display()
            )));
        }
    }
    if let (Some(cert), Some(key)) = (&args.import_cert, &args.import_key) {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        check_signing_ca((cert, &cert_pem), (key, &key_pem))?;
        let root_pem = match &args.import_root {
            Some(root) => read(root)?,
            None => cert_pem.clone(),
        };
        write_new(&files.intermediate, cert_pem.as_bytes(), false)?;
        write_new(&files.intermediate_key, key_pem.as_bytes(), true)?;
        write_new(&files.root, root_pem.as_bytes(), false)?;
        eprintln!(
            "imported the signing CA into {}; devices are enrolled against {}",
            args.out.display(),
            files.root.display()
        );
        return Ok(files);
    }
    let root_key = KeyPair::generate()?;
    let root_params = ca_params(&format!("{} root CA", args.name), 1)?;
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);
    let intermediate_key = KeyPair::generate()?;
    let intermediate = ca_params(&format!("{} intermediate CA", args.name), 0)?
        .signed_by(&intermediate_key, &root_issuer)?;
    write_new(&files.root, root.pem().as_bytes(), false)?;
    write_new(
        &files.root_key,
        root_issuer.key().serialize_pem().as_bytes(),
        true,
    )?;
    write_new(&files.intermediate, intermediate.pem().as_bytes(), false)?;
    write_new(
        &files.intermediate_key,
        intermediate_key.serialize_pem().as_bytes(),
        true,
    )?;
    eprintln!(
        "made a root and an intermediate CA in {}; keep root.key offline",
        args.out.display()
    );
    Ok(files)
}

fn ca_params(name: &str, path_length: u8) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_length));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(20 * 365);
    Ok(params)
}

/// A signing CA: a CA certificate (`cert`) and the key that belongs to it (`key`:
/// PKCS#8, SEC1 or PKCS#1); the key, or what is wrong with which of the two files.
pub fn check_signing_ca(
    (cert, cert_pem): (&Path, &str),
    (key, key_pem): (&Path, &str),
) -> Result<KeyPair, ManufactureError> {
    let der = edgedps_policies::x509::pem_to_der(cert_pem)
        .map_err(|e| ManufactureError::file(cert, e))?;
    edgedps_policies::issuance::ca_key(&der, key_pem)
        .map_err(|e| ManufactureError::file(if e.concerns_key() { key } else { cert }, e))
}
