//! TPM attestation (PROTOCOL C; the Azure exchange): a TPM device that comes without a
//! token registers with its endorsement and storage root keys and is answered 401 with a
//! challenge, a registration key only its TPM can take in (`edgedps_policies::tpm`). Its
//! next request carries a SAS token signed by that key; the final answer carries its hub
//! key, sealed the same way, which signs its tokens at the local hub and is the key a cloud
//! hub registers it with.
//!
//! A device has one open challenge: a new one replaces the last (a token signed by an
//! earlier key is refused). Challenges live in memory for as long as the stock clients'
//! tokens do; the hub key is kept in the store, apart from the published record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use edgedps_policies::tpm::{self, PublicArea};
use edgedps_topics::admin::{AttestationType, Enrollment, TpmAttestation};
use edgedps_topics::events::RegistrationOutcome;
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{TpmAuthentication, TpmChallenge};

use crate::{lock, Attested, Error, Responder};

/// How long a challenge's key signs tokens: the Node client's token lives an hour.
const CHALLENGE_LIFETIME: Duration = Duration::from_secs(3600);
/// Open challenges kept at most; the oldest go first.
const MAX_OPEN_CHALLENGES: usize = 10_000;

/// The open challenges, by canonical registration id.
#[derive(Default)]
pub(crate) struct Challenges {
    open: std::sync::Mutex<HashMap<String, Challenge>>,
}

struct Challenge {
    /// The registration key, base64.
    key: String,
    issued: Instant,
}

impl Challenges {
    fn key(&self, registration_id: &RegistrationId) -> Option<String> {
        lock(&self.open)
            .get(registration_id.key().as_ref())
            .filter(|c| c.issued.elapsed() < CHALLENGE_LIFETIME)
            .map(|c| c.key.clone())
    }

    fn open(&self, registration_id: &RegistrationId, key: String) {
        let mut open = lock(&self.open);
        if open.len() >= MAX_OPEN_CHALLENGES {
            open.retain(|_, c| c.issued.elapsed() < CHALLENGE_LIFETIME);
        }
        if open.len() >= MAX_OPEN_CHALLENGES {
            let oldest = open
                .iter()
                .min_by_key(|(_, c)| c.issued)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                open.remove(&oldest);
            }
        }
        let issued = Instant::now();
        open.insert(
            registration_id.key().into_owned(),
            Challenge { key, issued },
        );
    }
}

/// A TPM device's keys as its request and its enrollment give them, checked against
/// each other: the endorsement key must be the enrolled one, the storage root key the
/// enrolled one when it was enrolled.
struct DeviceKeys {
    endorsement: PublicArea,
    storage: PublicArea,
}

fn device_keys(
    registration_id: &RegistrationId,
    enrollment: &Enrollment,
    request: Option<&TpmAttestation>,
) -> Result<DeviceKeys, Error> {
    let enrolled = enrollment
        .attestation
        .tpm
        .as_ref()
        .filter(|_| enrollment.attestation.kind == AttestationType::Tpm)
        .ok_or_else(|| unauthorized(format!("`{registration_id}` is not enrolled with a TPM")))?;
    let sent = request.ok_or_else(|| {
        Error::MalformedBody(
            "a TPM device's register carries tpm.endorsementKey and tpm.storageRootKey".into(),
        )
    })?;
    let decode = |what: &str, b64: &str| {
        BASE64
            .decode(b64.trim())
            .map_err(|_| Error::MalformedBody(format!("tpm.{what} is not base64")))
    };
    let endorsement_sent = decode(
        "endorsementKey",
        sent.endorsement_key
            .as_deref()
            .ok_or_else(|| Error::MalformedBody("tpm.endorsementKey is missing".into()))?,
    )?;
    let endorsement_enrolled = decode(
        "endorsementKey",
        enrolled.endorsement_key.as_deref().unwrap_or_default(),
    )?;
    if endorsement_sent != endorsement_enrolled {
        return Err(unauthorized(format!(
            "tpm.endorsementKey is not the one enrolled for `{registration_id}`"
        )));
    }
    let storage = match (&sent.storage_root_key, &enrolled.storage_root_key) {
        (Some(sent), Some(enrolled)) => {
            if decode("storageRootKey", sent)? != decode("storageRootKey", enrolled)? {
                return Err(unauthorized(format!(
                    "tpm.storageRootKey is not the one enrolled for `{registration_id}`"
                )));
            }
            decode("storageRootKey", sent)?
        }
        (Some(key), None) | (None, Some(key)) => decode("storageRootKey", key)?,
        (None, None) => {
            return Err(Error::MalformedBody(
                "tpm.storageRootKey is missing (and none is enrolled)".into(),
            ))
        }
    };
    let malformed = |e: tpm::TpmError| Error::MalformedBody(format!("tpm: {e}"));
    let endorsement = PublicArea::parse(&endorsement_sent).map_err(malformed)?;
    endorsement.check_endorsement_key().map_err(malformed)?;
    let storage = PublicArea::parse(&storage).map_err(malformed)?;
    if storage.storage_key().is_none() {
        return Err(Error::MalformedBody(
            "tpm.storageRootKey is not an RSA 2048 storage key with SHA-256 and AES-128-CFB".into(),
        ));
    }
    Ok(DeviceKeys {
        endorsement,
        storage,
    })
}

fn unauthorized(reason: String) -> Error {
    Error::Attestation(edgedps_policies::attestation::AttestationError::NotAuthorized(reason))
}

impl Responder {
    /// The key a TPM device's token must be signed with (base64), for a provisioning
    /// request or, with `hub`, at the local hub; `None` when the device is not a TPM
    /// device or has no key yet.
    pub(crate) fn tpm_key(
        &self,
        registration_id: &RegistrationId,
        individual: Option<&Enrollment>,
        hub: bool,
    ) -> Result<Option<String>, Error> {
        let tpm = individual.is_some_and(|e| e.attestation.kind == AttestationType::Tpm);
        match (tpm, hub) {
            (false, _) => Ok(None),
            (true, false) => Ok(self.tpm.key(registration_id)),
            (true, true) => Ok(self.store.device_key(registration_id)?),
        }
    }

    /// The challenge for a TPM device's register without a token: a fresh registration
    /// key sealed to the keys it sent, the same as enrolled. The answer's body (a 401).
    pub(crate) fn tpm_challenge(
        &self,
        device: &Attested,
        enrollment: Option<&Enrollment>,
        request: Option<&TpmAttestation>,
    ) -> Result<TpmChallenge, Error> {
        let id = &device.registration_id;
        let enrollment = enrollment.ok_or_else(|| Error::NoEnrollment(id.to_string()))?;
        let keys = device_keys(id, enrollment, request)?;
        let key = self.random_key()?;
        let blob = tpm::activation_blob(&keys.endorsement, &keys.storage, &key, &self.random)
            .map_err(|e| Error::MalformedBody(format!("tpm: {e}")))?;
        self.tpm.open(id, BASE64.encode(key));
        tracing::info!(registration_id = %id, "TPM challenge sent");
        Ok(TpmChallenge {
            message: "Authorize the registration with the key in authenticationKey".into(),
            authentication_key: BASE64.encode(blob),
            key_name: "registration".into(),
        })
    }

    /// A proven TPM device's hub key, sealed to the keys its register sent, and whether
    /// the key is new (then written to the store, to be made durable with the record).
    pub(crate) fn tpm_authentication(
        &self,
        device: &Attested,
        enrollment: Option<&Enrollment>,
        request: Option<&TpmAttestation>,
    ) -> Result<(TpmAuthentication, bool), Error> {
        let id = &device.registration_id;
        let enrollment = enrollment.ok_or_else(|| Error::NoEnrollment(id.to_string()))?;
        let keys = device_keys(id, enrollment, request)?;
        let (key, created) = match self.store.device_key(id)? {
            Some(stored) => {
                let bytes = BASE64
                    .decode(&stored)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok());
                match bytes {
                    Some(key) => (key, false),
                    None => {
                        tracing::warn!(registration_id = %id, "the stored hub key is unreadable; a new one is given");
                        (self.random_key()?, true)
                    }
                }
            }
            None => (self.random_key()?, true),
        };
        if created {
            self.store.put_device_key(id, &BASE64.encode(key))?;
        }
        let blob = tpm::activation_blob(&keys.endorsement, &keys.storage, &key, &self.random)
            .map_err(|e| Error::MalformedBody(format!("tpm: {e}")))?;
        Ok((
            TpmAuthentication {
                authentication_key: BASE64.encode(blob),
            },
            created,
        ))
    }

    fn random_key(&self) -> Result<[u8; 32], Error> {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&self.random, &mut key)
            .map_err(|_| Error::Issuance("no randomness for a TPM key".into()))?;
        Ok(key)
    }

    /// The event of a challenge sent.
    pub(crate) fn challenged_event(&self, device: &Attested) -> crate::Publication {
        crate::registration::registration_event(
            device,
            RegistrationOutcome::Challenged,
            None,
            None,
            None,
        )
    }
}
