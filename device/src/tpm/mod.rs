//! A TPM as the provisioning client uses it (PROTOCOL C, TPM attestation): its two public
//! keys to send, an activation blob (`authenticationKey`) to take in, and HMAC with the
//! key it held. The device client needs nothing else of a TPM; `esapi` is the one for a
//! real TPM, and tests drive swtpm with the stock tools through the same trait.

use std::sync::Arc;

#[cfg(feature = "tpm")]
pub mod esapi;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::DeviceError;

/// A TPM holding, after [`TpmDevice::activate`], one HMAC key.
pub trait TpmDevice: Send + Sync {
    /// The endorsement key's TPM2B_PUBLIC.
    fn endorsement_key(&self) -> Vec<u8>;
    /// The storage root key's TPM2B_PUBLIC.
    fn storage_root_key(&self) -> Vec<u8>;
    /// Activates `blob` (ActivateCredential with the EK, Import and Load under the SRK):
    /// its key replaces the one held before.
    fn activate(&self, blob: &[u8]) -> Result<(), String>;
    /// HMAC-SHA256 of `data` with the key held.
    fn hmac(&self, data: &[u8]) -> Result<Vec<u8>, String>;
}

/// The registration id of the TPM: the base32 of its EK's SHA-256 (TPM.md).
pub fn registration_id(tpm: &dyn TpmDevice) -> String {
    registration_id_of(&tpm.endorsement_key())
}

/// The registration id of the TPM whose EK is `endorsement_key` (TPM2B_PUBLIC).
pub fn registration_id_of(endorsement_key: &[u8]) -> String {
    edgedps_policies::tpm::registration_id(endorsement_key)
}

/// The `tpm` member of a register body.
pub fn register_member(tpm: &dyn TpmDevice) -> serde_json::Value {
    serde_json::json!({
        "endorsementKey": BASE64.encode(tpm.endorsement_key()),
        "storageRootKey": BASE64.encode(tpm.storage_root_key()),
    })
}

/// Activates the base64 `authenticationKey` of an answer, off the async threads.
pub async fn activate(
    tpm: &Arc<dyn TpmDevice>,
    authentication_key: &str,
) -> Result<(), DeviceError> {
    let blob = BASE64
        .decode(authentication_key)
        .map_err(|_| DeviceError::BadResponse("authenticationKey is not base64".into()))?;
    let tpm = Arc::clone(tpm);
    tokio::task::spawn_blocking(move || tpm.activate(&blob))
        .await
        .map_err(|e| DeviceError::Tpm(e.to_string()))?
        .map_err(DeviceError::Tpm)
}

/// A SAS token for `sr` (URL-encoded) until `expiry`, signed in the TPM.
pub async fn token(
    tpm: &Arc<dyn TpmDevice>,
    sr: String,
    expiry: u64,
    key_name: Option<&str>,
) -> Result<String, DeviceError> {
    let tpm = Arc::clone(tpm);
    let token = tokio::task::spawn_blocking(move || {
        edgedps_policies::sas::token_signed_by(&sr, expiry, |data| tpm.hmac(data))
    })
    .await
    .map_err(|e| DeviceError::Tpm(e.to_string()))?
    .map_err(DeviceError::Tpm)?;
    Ok(match key_name {
        Some(name) => format!("{token}&skn={name}"),
        None => token,
    })
}
