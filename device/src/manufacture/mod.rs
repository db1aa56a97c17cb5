//! `edgedps manufacture`: what the factory line needs to give devices an identity.
//!
//! - `ca.rs`: a device root and an intermediate CA (ECDSA P-256), made or imported;
//! - `batch.rs`: device keys and certificates (or derived symmetric keys) in bundles,
//!   one directory per device, with a manifest; never overwriting a key; optionally
//!   enrolled over the operator plane;
//! - `tpm.rs`: the read-out of TPM devices' keys, their individual enrollments;
//! - `signing.rs`: the in-memory signing CA the load generator and tests use.

pub mod batch;
pub mod ca;
mod signing;
pub mod tpm;

use std::path::{Path, PathBuf};

pub use signing::{DeviceCertificate, SigningCa};

/// Command-line arguments of `edgedps manufacture`.
#[derive(Debug, Clone, clap::Args)]
pub struct ManufactureArgs {
    #[command(subcommand)]
    pub command: ManufactureCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ManufactureCommand {
    /// Create a device root CA and an intermediate that signs device certificates, or
    /// import existing ones.
    ///
    /// Example: edgedps manufacture ca --out factory-ca
    Ca(ca::CaArgs),
    /// Make a batch of device bundles and their manifest.
    ///
    /// Example: edgedps manufacture batch --ca factory-ca --count 50 --id-prefix sensor-
    /// --id-scope 0ne00000001 --host gateway.local --trust edgedps-data/tls/dev-ca.pem
    /// --out batch-1 --enroll
    Batch(batch::BatchArgs),
    /// Read TPMs' endorsement keys: their registration ids and individual enrollments.
    ///
    /// Example: edgedps manufacture tpm --tcti device:/dev/tpmrm0 --out line-1 --enroll
    Tpm(tpm::TpmArgs),
}

/// Why a manufacturing step stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManufactureError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("enrolling: {0}")]
    Enroll(#[from] crate::DeviceError),
}

impl ManufactureError {
    fn file(path: &Path, error: impl std::fmt::Display) -> ManufactureError {
        ManufactureError::File {
            path: path.to_owned(),
            reason: error.to_string(),
        }
    }
}

/// Runs `edgedps manufacture`.
pub async fn main(args: ManufactureArgs) -> Result<(), ManufactureError> {
    match args.command {
        ManufactureCommand::Ca(args) => ca::run(&args).map(|_| ()),
        ManufactureCommand::Batch(args) => batch::run(&args).await.map(|_| ()),
        ManufactureCommand::Tpm(args) => tpm::run(&args).await.map(|_| ()),
    }
}

fn read(path: &Path) -> Result<String, ManufactureError> {
    std::fs::read_to_string(path).map_err(|e| ManufactureError::file(path, e))
}

/// Writes a new file; an existing one is never replaced.
fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), ManufactureError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| ManufactureError::file(path, e))?;
    file.write_all(bytes)
        .map_err(|e| ManufactureError::file(path, e))
}
