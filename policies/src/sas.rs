//! Shared access signatures of symmetric-key attestation (PROTOCOL A2).
//!
//! The SDKs spell the resource `sr` three ways (`%2F`, `%2f`, raw `/`) and each signs its
//! own spelling, so the signature is checked over `sr` exactly as sent, and only then is
//! the decoded resource compared with the registration the device claims.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::hmac;

/// Clock skew allowed past a token's expiry.
pub const EXPIRY_SKEW_SECONDS: u64 = 300;
const PREFIX: &str = "SharedAccessSignature ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("password is not a SharedAccessSignature")]
    NotSas,
    #[error("SAS token lacks `{0}`")]
    MissingField(&'static str),
    #[error("SAS token field `{0}` is malformed")]
    Malformed(&'static str),
    #[error("SAS token expired at {expiry} (now {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("SAS resource `{0}` is not this registration")]
    WrongResource(String),
    #[error("SAS signature does not match the enrollment's keys")]
    BadSignature,
    #[error("enrollment key is not valid base64")]
    BadKey,
}

/// A parsed token; the signature is checked by [`SasToken::verify`].
#[derive(Debug, Clone)]
pub struct SasToken<'a> {
    sr_raw: &'a str,
    se_raw: &'a str,
    expiry: u64,
    signature: Vec<u8>,
    pub key_name: Option<&'a str>,
}

/// Which enrollment key signed the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUsed {
    Primary,
    Secondary,
}

impl<'a> SasToken<'a> {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`, fields in any order.
    pub fn parse(password: &'a str) -> Result<SasToken<'a>, SasError> {
        let fields = password.strip_prefix(PREFIX).ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&') {
            let (key, value) = pair.split_once('=').ok_or(SasError::Malformed("field"))?;
            match key {
                "sr" => sr = Some(value),
                "sig" => sig = Some(value),
                "se" => se = Some(value),
                "skn" => skn = Some(value),
                _ => {}
            }
        }
        let sr_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let se_raw = se.ok_or(SasError::MissingField("se"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let expiry = se_raw.parse().map_err(|_| SasError::Malformed("se"))?;
        let sig = percent_decode_str(sig)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig"))?;
        let signature = BASE64
            .decode(sig.as_bytes())
            .map_err(|_| SasError::Malformed("sig"))?;
        Ok(SasToken {
            sr_raw,
            se_raw,
            expiry,
            signature,
            key_name: skn,
        })
    }

    /// The resource, URL-decoded.
    pub fn resource(&self) -> String {
        percent_decode_str(self.sr_raw)
            .decode_utf8_lossy()
            .into_owned()
    }

    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// Checks resource, expiry and signature. `keys` are base64 as in the enrollment,
    /// primary first. `now` is seconds since the Unix epoch.
    pub fn verify(
        &self,
        id_scope: &str,
        registration_id: &str,
        keys: &[&str],
        now: u64,
    ) -> Result<KeyUsed, SasError> {
        let expected = format!("{id_scope}/registrations/{registration_id}");
        self.verify_for(
            |resource| resource.eq_ignore_ascii_case(&expected),
            keys,
            now,
        )
    }

    /// Checks a hub token (PROTOCOL E): resource `{hostName}/devices/{deviceId}` (the
    /// host name in any case, the device id exactly: IoT Hub's device ids are
    /// case-sensitive), expiry and signature, as [`SasToken::verify`].
    pub fn verify_hub(
        &self,
        host_name: &str,
        device_id: &str,
        keys: &[&str],
        now: u64,
    ) -> Result<KeyUsed, SasError> {
        let ours = |resource: &str| {
            resource
                .split_once("/devices/")
                .is_some_and(|(host, device)| {
                    host.eq_ignore_ascii_case(host_name) && device == device_id
                })
        };
        self.verify_for(ours, keys, now)
    }

    /// Checks that the URL-decoded resource is `ours`, then expiry and signature.
    fn verify_for(
        &self,
        ours: impl FnOnce(&str) -> bool,
        keys: &[&str],
        now: u64,
    ) -> Result<KeyUsed, SasError> {
        let resource = self.resource();
        if !ours(&resource) {
            return Err(SasError::WrongResource(quotable_resource(&resource)));
        }
        if self.expiry.saturating_add(EXPIRY_SKEW_SECONDS) < now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        let mut message = Vec::with_capacity(self.sr_raw.len() + 1 + self.se_raw.len());
        message.extend_from_slice(self.sr_raw.as_bytes());
        message.push(b'\n');
        message.extend_from_slice(self.se_raw.as_bytes());
        for (index, key) in keys.iter().enumerate() {
            let key = BASE64.decode(key).map_err(|_| SasError::BadKey)?;
            let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
            // ring compares in constant time.
            if hmac::verify(&key, &message, &self.signature).is_ok() {
                return Ok(if index == 0 {
                    KeyUsed::Primary
                } else {
                    KeyUsed::Secondary
                });
            }
        }
        Err(SasError::BadSignature)
    }
}

/// The resource as the refusal may quote it: a registration resource names a scope and
/// an id and is worth showing; anything else could be a key pasted into the wrong
/// place and is described, not quoted.
fn quotable_resource(resource: &str) -> String {
    let shaped = resource
        .split_once("/registrations/")
        .is_some_and(|(scope, id)| {
            let plain = |s: &str| {
                !s.is_empty()
                    && s.len() <= 128
                    && s.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')
                    })
            };
            plain(scope) && plain(id)
        });
    if shaped {
        resource.to_owned()
    } else {
        format!(
            "({} bytes, not {{idScope}}/registrations/{{registrationId}})",
            resource.len()
        )
    }
}

/// DPS group keys: device key = base64(HMAC-SHA256(base64decode(groupKey), registrationId)).
pub fn derive_device_key(group_key: &str, registration_id: &str) -> Result<String, SasError> {
    let key = BASE64.decode(group_key).map_err(|_| SasError::BadKey)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
    Ok(BASE64.encode(hmac::sign(&key, registration_id.as_bytes())))
}

/// `/` and everything but unreserved characters, as the Python SDK encodes `sr` and `sig`.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Device side: a token for `{idScope}/registrations/{registrationId}` that expires at
/// `expiry`, with the resource URL-encoded as the Python SDK sends it.
pub fn sign(
    key: &str,
    id_scope: &str,
    registration_id: &str,
    expiry: u64,
) -> Result<String, SasError> {
    sign_resource(
        key,
        &registration_resource(id_scope, registration_id),
        expiry,
    )
}

/// Device side: a hub token for `{hostName}/devices/{deviceId}` (PROTOCOL E), the
/// resource URL-encoded, no key name.
pub fn sign_hub(
    key: &str,
    host_name: &str,
    device_id: &str,
    expiry: u64,
) -> Result<String, SasError> {
    token(key, &hub_resource(host_name, device_id), expiry)
}

/// Signs a resource spelled exactly as given (`sr` is not re-encoded), with the key
/// name DPS tokens carry.
pub fn sign_resource(key: &str, sr: &str, expiry: u64) -> Result<String, SasError> {
    Ok(format!("{}&skn=registration", token(key, sr, expiry)?))
}

/// Service side: a token for IoT Hub's service API at `host_name`, signed with the key of
/// the shared access policy `key_name`, as Azure's service SDKs make them.
pub fn sign_service(
    key: &str,
    host_name: &str,
    key_name: &str,
    expiry: u64,
) -> Result<String, SasError> {
    Ok(format!(
        "{}&skn={}",
        token(key, &encoded(host_name), expiry)?,
        encoded(key_name)
    ))
}

/// `SharedAccessSignature sr=..&sig=..&se=..` over `sr` as given.
fn token(key: &str, sr: &str, expiry: u64) -> Result<String, SasError> {
    let raw_key = BASE64.decode(key).map_err(|_| SasError::BadKey)?;
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &raw_key);
    token_signed_by(sr, expiry, |data| {
        Ok(hmac::sign(&hmac_key, data).as_ref().to_vec())
    })
}

/// Device side: a token whose HMAC-SHA256 is computed by `sign` (a TPM holds the key),
/// over `sr` as given (URL-encoded, see [`registration_resource`]) and `expiry`.
pub fn token_signed_by<E>(
    sr: &str,
    expiry: u64,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let signature = sign(format!("{sr}\n{expiry}").as_bytes())?;
    let sig = utf8_percent_encode(&BASE64.encode(signature), ENCODE).to_string();
    Ok(format!("{PREFIX}sr={sr}&sig={sig}&se={expiry}"))
}

/// `{idScope}/registrations/{registrationId}`, URL-encoded: a provisioning token's `sr`.
pub fn registration_resource(id_scope: &str, registration_id: &str) -> String {
    encoded(&format!("{id_scope}/registrations/{registration_id}"))
}

/// `{hostName}/devices/{deviceId}`, URL-encoded: a hub token's `sr`.
pub fn hub_resource(host_name: &str, device_id: &str) -> String {
    encoded(&format!("{host_name}/devices/{device_id}"))
}

/// A resource URL-encoded as the Python SDK encodes it.
fn encoded(resource: &str) -> String {
    utf8_percent_encode(resource, ENCODE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "VGhpcyBpcyBhIHRlc3Qga2V5IGZvciBkb2NzIG9ubHkhIQ==";
    const OTHER_KEY: &str = "b3RoZXIga2V5IG90aGVyIGtleSBvdGhlciBrZXkgISE=";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn derived_key_matches_the_worked_example() {
        assert_eq!(
            derive_device_key(KEY, "my-device-01").unwrap(),
            "Tvd0+oV7jeV9h4OAvsPxEXKXeWo8/0rpcDEtU1BzeGU="
        );
    }

    #[test]
    fn every_sdk_spelling_of_sr_verifies() {
        for sr in [
            "0ne00000001%2Fregistrations%2Fdev-1",
            "0ne00000001%2fregistrations%2fdev-1",
            "0ne00000001/registrations/dev-1",
        ] {
            let token = sign_resource(KEY, sr, NOW + 3600).unwrap();
            let parsed = SasToken::parse(&token).unwrap();
            assert_eq!(
                parsed.verify("0ne00000001", "dev-1", &[KEY], NOW),
                Ok(KeyUsed::Primary),
                "{sr}"
            );
        }
    }

    #[test]
    fn skn_is_optional_and_fields_come_in_any_order() {
        let token = sign(KEY, "0ne00000001", "dev-1", NOW + 60).unwrap();
        let fields: Vec<&str> = token.strip_prefix(PREFIX).unwrap().split('&').collect();
        let without_skn: Vec<&str> = fields
            .iter()
            .copied()
            .filter(|f| !f.starts_with("skn="))
            .rev()
            .collect();
        let token = format!("{PREFIX}{}", without_skn.join("&"));
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.key_name, None);
        assert!(parsed.verify("0ne00000001", "dev-1", &[KEY], NOW).is_ok());
    }

    #[test]
    fn secondary_key_is_tried_after_the_primary() {
        let token = sign(KEY, "scope", "dev-1", NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(
            parsed.verify("scope", "dev-1", &[OTHER_KEY, KEY], NOW),
            Ok(KeyUsed::Secondary)
        );
    }

    #[test]
    fn expired_token_is_refused_after_the_skew() {
        let token = sign(KEY, "scope", "dev-1", NOW - EXPIRY_SKEW_SECONDS - 1).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert!(matches!(
            parsed.verify("scope", "dev-1", &[KEY], NOW),
            Err(SasError::Expired { .. })
        ));
        let token = sign(KEY, "scope", "dev-1", NOW - EXPIRY_SKEW_SECONDS + 1).unwrap();
        assert!(SasToken::parse(&token)
            .unwrap()
            .verify("scope", "dev-1", &[KEY], NOW)
            .is_ok());
    }

    #[test]
    fn forged_signature_is_refused() {
        let token = sign(OTHER_KEY, "scope", "dev-1", NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(
            parsed.verify("scope", "dev-1", &[KEY], NOW),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn a_resource_that_is_not_a_registration_is_not_quoted() {
        let token = sign_resource(KEY, KEY, NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        let refusal = parsed.verify("scope", "dev-1", &[KEY], NOW).unwrap_err();
        assert!(!refusal.to_string().contains(KEY), "{refusal}");
        let token = sign(KEY, "scope", "dev-2", NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        let refusal = parsed.verify("scope", "dev-1", &[KEY], NOW).unwrap_err();
        assert!(
            refusal.to_string().contains("scope/registrations/dev-2"),
            "{refusal}"
        );
    }

    #[test]
    fn hub_tokens_name_the_host_and_the_exact_device_id() {
        let token = sign_hub(KEY, "Gateway.Local", "Dev-1", NOW + 60).unwrap();
        assert!(!token.contains("skn="));
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(
            parsed.verify_hub("gateway.local", "Dev-1", &[KEY], NOW),
            Ok(KeyUsed::Primary)
        );
        for (host, device) in [
            ("gateway.local", "dev-1"),
            ("other.local", "Dev-1"),
            ("gateway.local", "Dev-2"),
        ] {
            assert!(
                matches!(
                    parsed.verify_hub(host, device, &[KEY], NOW),
                    Err(SasError::WrongResource(_))
                ),
                "{host} {device}"
            );
        }
        // A DPS token is not a hub token, and the other way round.
        let dps_token = sign(KEY, "gateway.local", "Dev-1", NOW + 60).unwrap();
        let dps = SasToken::parse(&dps_token).unwrap();
        assert!(matches!(
            dps.verify_hub("gateway.local", "Dev-1", &[KEY], NOW),
            Err(SasError::WrongResource(_))
        ));
        assert!(matches!(
            parsed.verify("gateway.local", "Dev-1", &[KEY], NOW),
            Err(SasError::WrongResource(_))
        ));
        assert_eq!(
            parsed.verify_hub("gateway.local", "Dev-1", &[KEY], NOW + 3600),
            Err(SasError::Expired {
                expiry: NOW + 60,
                now: NOW + 3600
            })
        );
        let other_key = derive_device_key(KEY, "x").unwrap();
        assert_eq!(
            parsed.verify_hub("gateway.local", "Dev-1", &[other_key.as_str()], NOW),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn token_for_another_registration_is_refused() {
        let token = sign(KEY, "scope", "dev-2", NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert!(matches!(
            parsed.verify("scope", "dev-1", &[KEY], NOW),
            Err(SasError::WrongResource(_))
        ));
    }

    #[test]
    fn group_key_used_directly_is_refused() {
        let device_key = derive_device_key(KEY, "dev-1").unwrap();
        let token = sign(KEY, "scope", "dev-1", NOW + 60).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(
            parsed.verify("scope", "dev-1", &[device_key.as_str()], NOW),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert_eq!(SasToken::parse("").unwrap_err(), SasError::NotSas);
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=abc&se=1").unwrap_err(),
            SasError::MissingField("sr")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=abc&se=soon").unwrap_err(),
            SasError::Malformed("se")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=!!!&se=1").unwrap_err(),
            SasError::Malformed("sig")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig").unwrap_err(),
            SasError::Malformed("field")
        );
    }
}
