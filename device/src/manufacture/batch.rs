//! `edgedps manufacture batch`: one bundle per device, in `{out}/{registrationId}/`:
//!
//! - X.509: `device.pem` (the device certificate, then the intermediate), `device.key`
//!   (PKCS#8, readable by its owner only);
//! - symmetric key: `symmetric-key` (the key derived from the group key, owner only);
//! - both: `trust.pem` (the CA the device must trust for the service),
//!   `provisioning.json` (id scope, host, port, registration id, attestation) and
//!   `device.env` (the same for the SDK samples driven by environment variables; with
//!   the key for symmetric-key devices, and then owner-only).
//!
//! `manifest.csv` and `manifest.json` list every device: registration id, SHA-256
//! thumbprint, serial, notAfter and bundle path. A non-empty `--out` is refused unless
//! `--resume` is given; then the devices whose bundle is there are kept as they are (a
//! key is never replaced) and only the missing ones are made. With `--enroll` the
//! matching enrollment group is written over the operator plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
use serde::Serialize;
use serde_json::json;

use super::ca::CaFiles;
use super::{read, write_new, ManufactureError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchAttestation {
    X509,
    SymmetricKey,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Devices to make.
    #[arg(long)]
    pub count: usize,
    /// Registration ids are this prefix and a number: `sensor-00001`.
    #[arg(long)]
    pub id_prefix: String,
    /// Directory of the bundles and the manifest.
    #[arg(long)]
    pub out: PathBuf,
    /// x509 (certificates from --ca) or symmetric-key (keys derived from --group-key-file).
    #[arg(long, value_enum, default_value = "x509")]
    pub attestation: BatchAttestation,
    /// The manufacturing CA directory (`edgedps manufacture ca`), for x509.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// A file holding the enrollment group's base64 key, for symmetric-key.
    #[arg(long)]
    pub group_key_file: Option<PathBuf>,
    /// The id scope devices provision in.
    #[arg(long, default_value = "0ne00000001")]
    pub id_scope: String,
    /// The host name devices connect to: one the service's certificate carries.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// The CA certificate (PEM) devices trust for the service, e.g.
    /// `edgedps-data/tls/dev-ca.pem`.
    #[arg(long)]
    pub trust: PathBuf,
    /// Valid years of device certificates.
    #[arg(long, default_value_t = 10)]
    pub years: u16,
    /// Continue a batch in a directory that holds part of it.
    #[arg(long)]
    pub resume: bool,
    /// Write the matching enrollment group over the operator plane and wait for it.
    #[arg(long)]
    pub enroll: bool,
    /// The enrollment group's id (default: the id prefix without a trailing `-`).
    #[arg(long)]
    pub group_id: Option<String>,
    /// With --enroll: the group's devices may ask for certificates from this authority
    /// of the service (`clientCertificateIssuancePolicy`).
    #[arg(long)]
    pub issuance_policy: Option<String>,
    /// The operator listener for --enroll.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub operator: SocketAddr,
}

/// One device of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestEntry {
    pub registration_id: String,
    pub sha256_thumbprint: String,
    pub serial_number: String,
    pub not_after: String,
    pub bundle: String,
}

/// What each device's credential is made from.
enum Maker {
    X509(Box<Signer>),
    /// The group key devices' keys are derived from.
    Symmetric(String),
}

/// What the signing takes for X.509 devices.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    intermediate_pem: String,
}

/// Makes the batch; returns its manifest.
pub async fn run(args: &BatchArgs) -> Result<Vec<ManifestEntry>, ManufactureError> {
    if args.count == 0 {
        return Err(ManufactureError::Refused(
            "--count must be at least 1".into(),
        ));
    }
    if !edgedps_topics::valid_registration_id(&format!("{}1", args.id_prefix)) {
        return Err(ManufactureError::Refused(format!(
            "--id-prefix `{}` does not make valid registration ids (letters, digits, `-._:`)",
            args.id_prefix
        )));
    }
    let trust = read(&args.trust)?;
    edgedps_policies::x509::pem_to_der(&trust)
        .map_err(|e| ManufactureError::file(&args.trust, e))?;
    let maker = match args.attestation {
        BatchAttestation::X509 => {
            let dir = args
                .ca
                .as_ref()
                .ok_or_else(|| ManufactureError::Refused("--attestation x509 needs --ca".into()))?;
            Maker::X509(Box::new(signer(dir)?))
        }
        BatchAttestation::SymmetricKey => {
            let path = args.group_key_file.as_ref().ok_or_else(|| {
                ManufactureError::Refused(
                    "--attestation symmetric-key needs --group-key-file".into(),
                )
            })?;
            let key = read(path)?.trim().to_owned();
            edgedps_policies::sas::derive_device_key(&key, "probe")
                .map_err(|e| ManufactureError::file(path, format!("not a base64 key: {e}")))?;
            Maker::Symmetric(key)
        }
    };
    prepare_out(args)?;
    let width = args.count.to_string().len().max(5);
    let started = Instant::now();
    let mut manifest = Vec::with_capacity(args.count);
    for n in 1..=args.count {
        let registration_id = format!("{}{n:0width$}", args.id_prefix);
        let bundle = args.out.join(&registration_id);
        let entry = match &maker {
            Maker::X509(signer) => x509_bundle(args, signer, &trust, &registration_id, &bundle)?,
            Maker::Symmetric(group_key) => {
                symmetric_bundle(args, group_key, &trust, &registration_id, &bundle)?
            }
        };
        manifest.push(entry);
        if n % 1000 == 0 || n == args.count {
            eprintln!(
                "manufactured {n}/{} devices in {:.1} s",
                args.count,
                started.elapsed().as_secs_f64()
            );
        }
    }
    write_manifest(&args.out, &manifest)?;
    if args.enroll {
        let group_key = match &maker {
            Maker::Symmetric(key) => Some(key.as_str()),
            Maker::X509(_) => None,
        };
        enroll(args, group_key).await?;
    }
    Ok(manifest)
}

/// The intermediate of a manufacturing CA directory, ready to sign.
fn signer(dir: &Path) -> Result<Signer, ManufactureError> {
    let files = CaFiles::of(dir);
    let intermediate_pem = read(&files.intermediate)?;
    let key_pem = read(&files.intermediate_key)?;
    let key = super::ca::check_signing_ca(
        (&files.intermediate, &intermediate_pem),
        (&files.intermediate_key, &key_pem),
    )?;
    let issuer = Issuer::from_ca_cert_pem(&intermediate_pem, key)?;
    Ok(Signer {
        issuer,
        intermediate_pem,
    })
}

/// An empty (or new) output directory, or one being resumed.
fn prepare_out(args: &BatchArgs) -> Result<(), ManufactureError> {
    let out = &args.out;
    let occupied = std::fs::read_dir(out)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied && !args.resume {
        return Err(ManufactureError::Refused(format!(
            "{} is not empty; nothing was written. Use --resume to complete a batch there, or another --out",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| ManufactureError::file(out, e))
}

fn x509_bundle(
    args: &BatchArgs,
    signer: &Signer,
    trust: &str,
    registration_id: &str,
    bundle: &Path,
) -> Result<ManifestEntry, ManufactureError> {
    let cert_path = bundle.join("device.pem");
    let key_path = bundle.join("device.key");
    std::fs::create_dir_all(bundle).map_err(|e| ManufactureError::file(bundle, e))?;
    if !cert_path.exists() {
        // A key already there (a batch stopped between two files) is kept and certified.
        let key = if key_path.exists() {
            edgedps_policies::keys::key_pair(read(&key_path)?.as_bytes())
                .map_err(|e| ManufactureError::file(&key_path, e))?
        } else {
            let key = KeyPair::generate()?;
            write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
            key
        };
        let leaf = device_certificate(registration_id, &key, signer, args.years)?;
        let chain = format!("{}{}", leaf.pem(), signer.intermediate_pem);
        write_new(&cert_path, chain.as_bytes(), false)?;
    }
    common_files(args, trust, registration_id, bundle, None)?;
    let der = edgedps_policies::x509::pem_to_der(&read(&cert_path)?)
        .map_err(|e| ManufactureError::file(&cert_path, e))?;
    let info = edgedps_policies::x509::describe(&der)
        .map_err(|e| ManufactureError::file(&cert_path, e))?;
    Ok(ManifestEntry {
        registration_id: registration_id.to_owned(),
        sha256_thumbprint: info.sha256_thumbprint,
        serial_number: info.serial_number,
        not_after: info.not_after_utc,
        bundle: bundle.display().to_string(),
    })
}

fn device_certificate(
    registration_id: &str,
    key: &KeyPair,
    signer: &Signer,
    years: u16,
) -> Result<rcgen::Certificate, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, registration_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * i64::from(years));
    params.signed_by(key, &signer.issuer)
}

fn symmetric_bundle(
    args: &BatchArgs,
    group_key: &str,
    trust: &str,
    registration_id: &str,
    bundle: &Path,
) -> Result<ManifestEntry, ManufactureError> {
    std::fs::create_dir_all(bundle).map_err(|e| ManufactureError::file(bundle, e))?;
    let key_path = bundle.join("symmetric-key");
    let key = if key_path.exists() {
        read(&key_path)?.trim().to_owned()
    } else {
        let key = edgedps_policies::sas::derive_device_key(group_key, registration_id)
            .map_err(|e| ManufactureError::Refused(e.to_string()))?;
        write_new(&key_path, format!("{key}\n").as_bytes(), true)?;
        key
    };
    common_files(args, trust, registration_id, bundle, Some(&key))?;
    Ok(ManifestEntry {
        registration_id: registration_id.to_owned(),
        sha256_thumbprint: String::new(),
        serial_number: String::new(),
        not_after: String::new(),
        bundle: bundle.display().to_string(),
    })
}

/// `trust.pem`, `provisioning.json` and `device.env`, unless there. `symmetric_key`:
/// the device's key, for a symmetric-key bundle (its `device.env` holds it and is the
/// owner's only); none for X.509.
fn common_files(
    args: &BatchArgs,
    trust: &str,
    registration_id: &str,
    bundle: &Path,
    symmetric_key: Option<&str>,
) -> Result<(), ManufactureError> {
    let attestation = match symmetric_key {
        Some(_) => "symmetricKey",
        None => "x509",
    };
    let write_once = |name: &str, bytes: &[u8], private: bool| {
        let path = bundle.join(name);
        match path.exists() {
            true => Ok(()),
            false => write_new(&path, bytes, private),
        }
    };
    write_once("trust.pem", trust.as_bytes(), false)?;
    let provisioning = json!({
        "idScope": args.id_scope,
        "host": args.host,
        "port": args.port,
        "registrationId": registration_id,
        "attestation": attestation,
    });
    let provisioning = serde_json::to_vec_pretty(&provisioning).unwrap_or_default();
    write_once("provisioning.json", &provisioning, false)?;
    // The variables the Azure IoT SDK samples read.
    let mut env = format!(
        "PROVISIONING_HOST={}\nPROVISIONING_IDSCOPE={}\nPROVISIONING_REGISTRATION_ID={registration_id}\n",
        args.host, args.id_scope
    );
    match symmetric_key {
        None => env.push_str("X509_CERT_FILE=device.pem\nX509_KEY_FILE=device.key\n"),
        Some(key) => env.push_str(&format!("PROVISIONING_SYMMETRIC_KEY={key}\n")),
    }
    write_once("device.env", env.as_bytes(), symmetric_key.is_some())
}

fn write_manifest(out: &Path, manifest: &[ManifestEntry]) -> Result<(), ManufactureError> {
    let csv_path = out.join("manifest.csv");
    let failed = |e: csv::Error| ManufactureError::file(&csv_path, e);
    let mut csv = csv::Writer::from_path(&csv_path).map_err(failed)?;
    for entry in manifest {
        csv.serialize(entry).map_err(failed)?;
    }
    csv.flush()
        .map_err(|e| ManufactureError::file(&csv_path, e))?;
    let replace = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(|e| ManufactureError::file(&path, e))
    };
    let json = serde_json::to_vec_pretty(manifest).unwrap_or_default();
    replace("manifest.json", &json)
}

/// The enrollment group of the batch, written over the operator plane.
async fn enroll(args: &BatchArgs, group_key: Option<&str>) -> Result<(), ManufactureError> {
    let group_id = args.group_id.clone().unwrap_or_else(|| {
        args.id_prefix
            .trim_end_matches(['-', '_', '.', ':'])
            .to_owned()
    });
    let attestation = match group_key {
        Some(key) => json!({"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key, "secondaryKey": key}}),
        None => {
            let dir = args.ca.as_ref().ok_or_else(|| {
                ManufactureError::Refused("--enroll of an x509 batch needs --ca".into())
            })?;
            let root = read(&CaFiles::of(dir).root)?;
            json!({"type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": root}}}})
        }
    };
    let mut body = json!({"enrollmentGroupId": group_id, "attestation": attestation});
    if let Some(authority) = &args.issuance_policy {
        body["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": authority});
    }
    let topic = edgedps_topics::admin::RecordKind::EnrollmentGroup.record_topic(&group_id);
    crate::admin::write_all(args.operator, &[(topic, body)]).await?;
    eprintln!("enrolled group `{group_id}` at {}", args.operator);
    Ok(())
}
