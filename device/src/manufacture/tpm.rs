//! `edgedps manufacture tpm`: the factory read-out of TPM devices. For each `--tcti`
//! (one TPM each, for example `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`)
//! the endorsement key is read (made from the TCG default RSA 2048 template and persisted
//! at 0x81010001 when the TPM has none, where the Azure TPM clients look), and the storage
//! root key (0x81000001, made likewise). Its registration id (the base32 of the EK's
//! SHA-256) is printed, its individual enrollment written to `{out}/{registrationId}.json`
//! (never replacing another), every device listed in `manifest.csv` and `manifest.json`,
//! and with `--enroll` the enrollments are written over the operator plane.
//!
//! The TPM is reached through the `tpm` feature's ESAPI client; a build without it says so.

use std::net::SocketAddr;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use super::ManufactureError;

#[derive(Debug, Clone, clap::Args)]
pub struct TpmArgs {
    /// The TCTI of a TPM; one per device, repeated for a line of them.
    #[arg(long, required = true)]
    pub tcti: Vec<String>,
    /// Directory of the enrollments and the manifest.
    #[arg(long)]
    pub out: PathBuf,
    /// Pin the storage root key in the enrollment (a TPM cleared since then no longer
    /// registers until re-enrolled).
    #[arg(long)]
    pub with_storage_root_key: bool,
    /// The devices' initial twin (JSON), in every enrollment.
    #[arg(long)]
    pub initial_twin: Option<String>,
    /// Write the enrollments over the operator plane and wait for them.
    #[arg(long)]
    pub enroll: bool,
    /// The operator listener for --enroll.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub operator: SocketAddr,
}

/// One TPM of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmEntry {
    pub registration_id: String,
    pub tcti: String,
    /// Base64 TPM2B_PUBLIC.
    pub endorsement_key: String,
    pub storage_root_key: String,
    pub enrollment: String,
}

/// Reads every TPM, writes the enrollments and the manifest, enrolls if asked.
pub async fn run(args: &TpmArgs) -> Result<Vec<TpmEntry>, ManufactureError> {
    let initial_twin =
        match &args.initial_twin {
            None => None,
            Some(text) => Some(serde_json::from_str::<Value>(text).map_err(|e| {
                ManufactureError::Refused(format!("--initial-twin is not JSON: {e}"))
            })?),
        };
    std::fs::create_dir_all(&args.out).map_err(|e| ManufactureError::file(&args.out, e))?;
    let mut manifest = Vec::with_capacity(args.tcti.len());
    let mut records = Vec::with_capacity(args.tcti.len());
    for tcti in &args.tcti {
        let (ek, srk) = read_keys(tcti).await?;
        let registration_id = crate::tpm::registration_id_of(&ek);
        let mut tpm = json!({"endorsementKey": BASE64.encode(&ek)});
        if args.with_storage_root_key {
            tpm["storageRootKey"] = json!(BASE64.encode(&srk));
        }
        let mut enrollment = json!({"registrationId": registration_id,
            "attestation": {"type": "tpm", "tpm": tpm}});
        if let Some(twin) = &initial_twin {
            enrollment["initialTwin"] = twin.clone();
        }
        let path = args.out.join(format!("{registration_id}.json"));
        let text = serde_json::to_vec_pretty(&enrollment).unwrap_or_default();
        keep_or_write(&path, &text)?;
        println!("{registration_id}\t{tcti}");
        manifest.push(TpmEntry {
            registration_id: registration_id.clone(),
            tcti: tcti.clone(),
            endorsement_key: BASE64.encode(&ek),
            storage_root_key: BASE64.encode(&srk),
            enrollment: path.display().to_string(),
        });
        let topic = edgedps_topics::admin::RecordKind::Enrollment.record_topic(&registration_id);
        records.push((topic, enrollment));
    }
    write_manifest(&args.out, &manifest)?;
    if args.enroll {
        crate::admin::write_all(args.operator, &records).await?;
        eprintln!(
            "enrolled {} TPM devices at {}",
            records.len(),
            args.operator
        );
    }
    Ok(manifest)
}

/// A file written before is kept when it says the same (a read-out run again); another
/// is never replaced.
fn keep_or_write(path: &std::path::Path, bytes: &[u8]) -> Result<(), ManufactureError> {
    match std::fs::read(path) {
        Ok(existing) if existing == bytes => Ok(()),
        Ok(_) => Err(ManufactureError::Refused(format!(
            "{} exists with another enrollment: not replaced",
            path.display()
        ))),
        Err(_) => super::write_new(path, bytes, false),
    }
}

fn write_manifest(out: &std::path::Path, manifest: &[TpmEntry]) -> Result<(), ManufactureError> {
    let csv_path = out.join("manifest.csv");
    let failed = |e: csv::Error| ManufactureError::file(&csv_path, e);
    let mut csv = csv::Writer::from_path(&csv_path).map_err(failed)?;
    for entry in manifest {
        csv.serialize(entry).map_err(failed)?;
    }
    csv.flush()
        .map_err(|e| ManufactureError::file(&csv_path, e))?;
    let json_path = out.join("manifest.json");
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(manifest).unwrap_or_default(),
    )
    .map_err(|e| ManufactureError::file(&json_path, e))
}

/// The EK and SRK of the TPM at `tcti` (TPM2B_PUBLIC), off the async threads.
#[cfg(feature = "tpm")]
async fn read_keys(tcti: &str) -> Result<(Vec<u8>, Vec<u8>), ManufactureError> {
    use crate::tpm::TpmDevice;
    let tcti = tcti.to_owned();
    tokio::task::spawn_blocking(move || {
        let tpm = crate::tpm::esapi::EsapiTpm::open(&tcti)
            .map_err(|e| ManufactureError::Refused(format!("TPM at `{tcti}`: {e}")))?;
        Ok((tpm.endorsement_key(), tpm.storage_root_key()))
    })
    .await
    .map_err(|e| ManufactureError::Refused(e.to_string()))?
}

#[cfg(not(feature = "tpm"))]
async fn read_keys(_tcti: &str) -> Result<(Vec<u8>, Vec<u8>), ManufactureError> {
    Err(ManufactureError::Refused(
        "this edgedps was built without TPM support: build it with `--features tpm` (needs libtss2-dev)".into(),
    ))
}
