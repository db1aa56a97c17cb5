//! Registration at cloud hubs, decided: a hub's connection string read, the identity a
//! device gets in the hub's registry, what to make of each answer the hub gives, and how
//! long to wait before trying again.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use edgedps_topics::admin::AttestationType;
use edgedps_topics::cloud::{
    Authentication, AuthenticationType, Capabilities, DeviceIdentity, DeviceStatus, SymmetricKeys,
    Thumbprints,
};

use crate::sas::{self, SasError};

/// How long a service token edgedps signs is good for.
pub const TOKEN_LIFETIME_SECONDS: u64 = 3600;
/// The longest reason kept from a hub's answer.
const MAX_REASON: usize = 300;

/// An IoT Hub connection string of a shared access policy:
/// `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`. Its `Debug` never shows
/// the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: String,
    key: String,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("key", &"(set)")
            .finish()
    }
}

/// Why a connection string cannot be used. The messages never quote the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string lacks `{0}` (expected HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)")]
    Missing(&'static str),
    #[error("connection string part `{0}` is not `Name=value`")]
    Malformed(String),
    #[error("connection string names `{0}` twice")]
    Repeated(String),
    #[error("connection string has a DeviceId: it is a device's; a shared access policy with registry write is needed")]
    DeviceString,
    #[error("connection string's SharedAccessKey is not base64")]
    BadKey,
    #[error("connection string is for `{found}`, not this hub `{hub}`")]
    OtherHub { found: String, hub: String },
}

impl ConnectionString {
    /// Reads a connection string; surrounding white space (a file's newline) is ignored.
    pub fn parse(text: &str) -> Result<ConnectionString, ConnectionStringError> {
        let (mut host_name, mut key_name, mut key) = (None, None, None);
        for part in text.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                // Never echo a part that could be the key.
                let shown: String = part.chars().take(20).collect();
                let shown = if part.contains("SharedAccessKey") {
                    "SharedAccessKey...".to_owned()
                } else {
                    shown
                };
                return Err(ConnectionStringError::Malformed(shown));
            };
            let slot = match name.trim() {
                "HostName" => &mut host_name,
                "SharedAccessKeyName" => &mut key_name,
                "SharedAccessKey" => &mut key,
                "DeviceId" | "ModuleId" => return Err(ConnectionStringError::DeviceString),
                _ => continue,
            };
            if slot.replace(value.trim().to_owned()).is_some() {
                return Err(ConnectionStringError::Repeated(name.trim().to_owned()));
            }
        }
        let present = |value: Option<String>, name| {
            value
                .filter(|v| !v.is_empty())
                .ok_or(ConnectionStringError::Missing(name))
        };
        let host_name = present(host_name, "HostName")?;
        let key_name = present(key_name, "SharedAccessKeyName")?;
        let key = present(key, "SharedAccessKey")?;
        match BASE64.decode(&key) {
            Ok(raw) if !raw.is_empty() => {}
            _ => return Err(ConnectionStringError::BadKey),
        }
        Ok(ConnectionString {
            host_name,
            key_name,
            key,
        })
    }

    /// Reads a connection string that must be `hub`'s.
    pub fn parse_for(text: &str, hub: &str) -> Result<ConnectionString, ConnectionStringError> {
        let parsed = ConnectionString::parse(text)?;
        if !parsed.host_name.eq_ignore_ascii_case(hub) {
            return Err(ConnectionStringError::OtherHub {
                found: parsed.host_name,
                hub: hub.to_owned(),
            });
        }
        Ok(parsed)
    }

    /// The `Authorization` header for the service API, good for
    /// [`TOKEN_LIFETIME_SECONDS`] from `now`.
    pub fn token(&self, now: u64) -> Result<String, SasError> {
        sas::sign_service(
            &self.key,
            &self.host_name,
            &self.key_name,
            now + TOKEN_LIFETIME_SECONDS,
        )
    }

    /// The connection string as written, for the store. Secret.
    pub fn expose(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name, self.key_name, self.key
        )
    }
}

/// What the registry must know of a device to let it connect as it will.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Symmetric-key devices: the key (a group device's derived one) and the other one.
    pub symmetric_keys: Option<(String, Option<String>)>,
    /// X.509 individual devices: the SHA-256 thumbprints of their certificates.
    pub thumbprints: Vec<String>,
    /// X.509 devices of a group: the hub checks their chain itself.
    pub certificate_authority: bool,
    /// The certificates edgedps issued to the device, newest last: it connects with them.
    pub issued: Vec<String>,
}

/// The identity `device_id` gets at its hub; `None` when its credentials are not known
/// (no keys, no thumbprints).
pub fn identity(
    device_id: &str,
    attestation: AttestationType,
    credentials: &Credentials,
    status: DeviceStatus,
) -> Option<DeviceIdentity> {
    let thumbprints = |prints: &mut dyn Iterator<Item = &String>| {
        Some(Thumbprints {
            primary_thumbprint: prints.next().cloned(),
            secondary_thumbprint: prints.next().cloned(),
        })
    };
    let authentication = if !credentials.issued.is_empty() {
        Authentication {
            kind: AuthenticationType::SelfSigned,
            symmetric_key: None,
            x509_thumbprint: thumbprints(&mut credentials.issued.iter().rev()),
        }
    } else {
        match attestation {
            // A TPM device signs with the hub key edgedps gave it: a symmetric key.
            AttestationType::SymmetricKey | AttestationType::Tpm => {
                let (primary, secondary) = credentials.symmetric_keys.clone()?;
                // IoT Hub takes both keys or none: an enrollment with one key gives it twice.
                let secondary = secondary.unwrap_or_else(|| primary.clone());
                Authentication {
                    kind: AuthenticationType::Sas,
                    symmetric_key: Some(SymmetricKeys {
                        primary_key: Some(primary),
                        secondary_key: Some(secondary),
                    }),
                    x509_thumbprint: None,
                }
            }
            AttestationType::X509 if credentials.certificate_authority => Authentication {
                kind: AuthenticationType::CertificateAuthority,
                symmetric_key: None,
                x509_thumbprint: None,
            },
            AttestationType::X509 if !credentials.thumbprints.is_empty() => Authentication {
                kind: AuthenticationType::SelfSigned,
                symmetric_key: None,
                x509_thumbprint: thumbprints(&mut credentials.thumbprints.iter()),
            },
            AttestationType::X509 => return None,
        }
    };
    Some(DeviceIdentity {
        device_id: device_id.to_owned(),
        status,
        status_reason: None,
        authentication,
        capabilities: Capabilities::default(),
    })
}

/// What to make of one answer of the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// Worth trying again: the hub is busy or broken for now. `after` when it said.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Trying again cannot fix it; an operator must (credentials, the hub's limits...).
    Fail(String),
}

/// One HTTP answer of the service API.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub retry_after: Option<&'a str>,
    pub body: &'a [u8],
}

/// Judges an answer: success must be JSON (or empty); 408, 429 and 5xx are tried again
/// (after `Retry-After` when given); other answers fail with the hub's own message.
pub fn verdict(answer: Answer<'_>) -> Verdict {
    let status = answer.status;
    let json = answer
        .content_type
        .map(|t| t.to_ascii_lowercase().contains("json"))
        .unwrap_or(false);
    match status {
        200..=299 => {
            if answer.body.is_empty()
                || (json && serde_json::from_slice::<serde_json::Value>(answer.body).is_ok())
            {
                Verdict::Done
            } else {
                Verdict::Retry {
                    after: None,
                    reason: format!(
                        "answered {status} with {}, not the service API's JSON (a proxy or captive portal?)",
                        answer.content_type.unwrap_or("no content type")
                    ),
                }
            }
        }
        408 | 429 | 500..=599 => Verdict::Retry {
            after: answer.retry_after.and_then(retry_after),
            reason: format!("{status}: {}", hub_message(answer)),
        },
        _ => Verdict::Fail(format!("{status}: {}", hub_message(answer))),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by IoT Hub).
fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The hub's reason: IoT Hub's `Message` (`ErrorCode:...;...`), or the start of a body
/// that is not its JSON.
pub fn hub_message(answer: Answer<'_>) -> String {
    let parsed = serde_json::from_slice::<serde_json::Value>(answer.body).ok();
    let message = parsed.as_ref().and_then(|v| {
        ["Message", "message", "ExceptionMessage"]
            .iter()
            .find_map(|k| v.get(k).and_then(|m| m.as_str()))
    });
    let text = match message {
        Some(message) => message.to_owned(),
        None if answer.body.is_empty() => "no body".to_owned(),
        None => format!(
            "{} body: {}",
            answer.content_type.unwrap_or("untyped"),
            String::from_utf8_lossy(answer.body)
        ),
    };
    shorten(&text)
}

/// A reason kept on a record: one line, at most [`MAX_REASON`] characters.
pub fn shorten(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= MAX_REASON {
        return line;
    }
    let mut short: String = line.chars().take(MAX_REASON).collect();
    short.push('…');
    short
}

/// The wait before attempt `attempts + 1`: 1 s doubling up to `cap`; a hub's
/// `Retry-After` wins when given (capped too).
pub fn backoff(attempts: u32, hinted: Option<Duration>, cap: Duration) -> Duration {
    if let Some(hinted) = hinted {
        return hinted.min(cap);
    }
    let exponent = attempts.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exponent).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "VGhpcyBpcyBhIHRlc3Qga2V5IGZvciBkb2NzIG9ubHkhIQ==";

    #[test]
    fn connection_strings_are_read_and_bad_ones_named_without_the_key() {
        let text = format!(
            "HostName=hub-a.azure-devices.net;SharedAccessKeyName=registryReadWrite;SharedAccessKey={KEY}\n"
        );
        let parsed = ConnectionString::parse(&text).unwrap();
        assert_eq!(parsed.host_name, "hub-a.azure-devices.net");
        assert_eq!(parsed.key_name, "registryReadWrite");
        assert!(!format!("{parsed:?}").contains(KEY));
        assert_eq!(ConnectionString::parse(&parsed.expose()).unwrap(), parsed);
        let cases = [
            ("HostName=h;SharedAccessKeyName=p", "SharedAccessKey"),
            (
                &format!("SharedAccessKeyName=p;SharedAccessKey={KEY}"),
                "HostName",
            ),
            (
                &format!("HostName=h;SharedAccessKey={KEY}"),
                "SharedAccessKeyName",
            ),
            (
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!",
                "base64",
            ),
            (
                &format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}"),
                "device",
            ),
            (
                &format!("HostName=h;SharedAccessKeyName=p;{KEY}"),
                "lacks `SharedAccessKey`",
            ),
            ("HostName=h;SharedAccessKeyName=p;garbage", "Name=value"),
            (
                &format!("HostName=h;HostName=i;SharedAccessKeyName=p;SharedAccessKey={KEY}"),
                "twice",
            ),
            ("", "HostName"),
        ];
        for (text, says) in cases {
            let err = ConnectionString::parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(!err.contains(KEY), "{err}");
        }
        let err = ConnectionString::parse_for(&text, "hub-b").unwrap_err();
        assert!(err.to_string().contains("hub-b"), "{err}");
        assert!(ConnectionString::parse_for(&text, "HUB-A.azure-devices.net").is_ok());
    }

    #[test]
    fn service_tokens_sign_the_host_with_the_policy_key() {
        let parsed = ConnectionString::parse(&format!(
            "HostName=hub-a.example.net;SharedAccessKeyName=registry write;SharedAccessKey={KEY}"
        ))
        .unwrap();
        let token = parsed.token(1_000).unwrap();
        let expected_sig = {
            use ring::hmac;
            let key = hmac::Key::new(hmac::HMAC_SHA256, &BASE64.decode(KEY).unwrap());
            let sig = hmac::sign(&key, b"hub-a.example.net\n4600");
            percent_encoding::utf8_percent_encode(
                &BASE64.encode(sig),
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string()
        };
        assert_eq!(
            token,
            format!("SharedAccessSignature sr=hub-a.example.net&sig={expected_sig}&se=4600&skn=registry%20write")
        );
    }

    #[test]
    fn each_kind_of_device_gets_the_identity_it_connects_with() {
        let keys = Credentials {
            symmetric_keys: Some(("k1".into(), Some("k2".into()))),
            ..Credentials::default()
        };
        let sas = identity(
            "d",
            AttestationType::SymmetricKey,
            &keys,
            DeviceStatus::Enabled,
        )
        .unwrap();
        assert_eq!(sas.authentication.kind, AuthenticationType::Sas);
        assert_eq!(
            sas.authentication
                .symmetric_key
                .unwrap()
                .secondary_key
                .as_deref(),
            Some("k2")
        );
        let group = Credentials {
            certificate_authority: true,
            ..Credentials::default()
        };
        let ca = identity("d", AttestationType::X509, &group, DeviceStatus::Disabled).unwrap();
        assert_eq!(
            ca.authentication.kind,
            AuthenticationType::CertificateAuthority
        );
        assert_eq!(ca.status, DeviceStatus::Disabled);
        let own = Credentials {
            thumbprints: vec!["AA".into(), "BB".into()],
            ..Credentials::default()
        };
        let own = identity("d", AttestationType::X509, &own, DeviceStatus::Enabled).unwrap();
        let prints = own.authentication.x509_thumbprint.unwrap();
        assert_eq!(prints.primary_thumbprint.as_deref(), Some("AA"));
        assert_eq!(prints.secondary_thumbprint.as_deref(), Some("BB"));
        let issued = Credentials {
            issued: vec!["OLD".into(), "NEW".into()],
            ..keys
        };
        let issued = identity(
            "d",
            AttestationType::SymmetricKey,
            &issued,
            DeviceStatus::Enabled,
        )
        .unwrap();
        assert_eq!(issued.authentication.kind, AuthenticationType::SelfSigned);
        let prints = issued.authentication.x509_thumbprint.unwrap();
        assert_eq!(prints.primary_thumbprint.as_deref(), Some("NEW"));
        assert_eq!(prints.secondary_thumbprint.as_deref(), Some("OLD"));
        assert!(identity(
            "d",
            AttestationType::Tpm,
            &Credentials::default(),
            DeviceStatus::Enabled
        )
        .is_none());
        // A TPM device is registered with the hub key it was given, twice.
        let tpm = Credentials {
            symmetric_keys: Some(("HUBKEY".into(), None)),
            ..Credentials::default()
        };
        let tpm = identity("d", AttestationType::Tpm, &tpm, DeviceStatus::Enabled).unwrap();
        assert_eq!(tpm.authentication.kind, AuthenticationType::Sas);
        let keys = tpm.authentication.symmetric_key.unwrap();
        assert_eq!(keys.primary_key.as_deref(), Some("HUBKEY"));
        assert_eq!(keys.secondary_key.as_deref(), Some("HUBKEY"));
    }

    #[test]
    fn answers_are_done_retried_or_failed() {
        let answer = |status, content_type, body: &'static [u8], retry_after| Answer {
            status,
            content_type,
            retry_after,
            body,
        };
        let json = Some("application/json; charset=utf-8");
        assert_eq!(verdict(answer(200, json, b"{}", None)), Verdict::Done);
        assert_eq!(verdict(answer(204, None, b"", None)), Verdict::Done);
        match verdict(answer(200, Some("text/html"), b"<html>login</html>", None)) {
            Verdict::Retry { reason, .. } => assert!(reason.contains("text/html"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verdict(answer(
                429,
                json,
                br#"{"Message":"ErrorCode:ThrottlingException;slow down"}"#,
                Some("7")
            )),
            Verdict::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "429: ErrorCode:ThrottlingException;slow down".into()
            }
        );
        assert!(matches!(
            verdict(answer(503, None, b"", None)),
            Verdict::Retry { after: None, .. }
        ));
        assert_eq!(
            verdict(answer(
                401,
                json,
                br#"{"Message":"ErrorCode:IotHubUnauthorizedAccess;Unauthorized"}"#,
                None
            )),
            Verdict::Fail("401: ErrorCode:IotHubUnauthorizedAccess;Unauthorized".into())
        );
        match verdict(answer(
            302,
            Some("text/html"),
            b"<a href=x>moved</a>\n\n",
            None,
        )) {
            Verdict::Fail(reason) => assert_eq!(reason, "302: text/html body: <a href=x>moved</a>"),
            other => panic!("{other:?}"),
        }
        assert_eq!(shorten(&"x".repeat(400)).chars().count(), MAX_REASON + 1);
    }

    #[test]
    fn waits_double_to_the_cap_and_follow_the_hub_s_hint() {
        let cap = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n, None, cap).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(1, Some(Duration::from_secs(5)), cap).as_secs(), 5);
        assert_eq!(backoff(1, Some(Duration::from_secs(500)), cap), cap);
        assert_eq!(backoff(u32::MAX, None, cap), cap);
    }
}
