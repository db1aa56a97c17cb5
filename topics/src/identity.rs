//! Who a device says it is at CONNECT (PROTOCOL A2): the registration id rules and the
//! username `{idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion=..]`.

use serde::{Deserialize, Serialize};

/// Longest registration id DPS accepts.
pub const MAX_REGISTRATION_ID: usize = 128;
/// Longest X.509 registration id (the certificate CN limit).
pub const MAX_X509_REGISTRATION_ID: usize = 64;

/// API versions the stock SDKs send.
pub const API_VERSIONS: &[&str] = &[
    "2019-03-31",
    "2021-06-01",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
];

/// DPS: up to 128 characters of `a-z A-Z 0-9 - . _ :`.
pub fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REGISTRATION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

/// A registration id as the device or the operator spelled it.
///
/// DPS registration ids are case-insensitive: two ids that differ only in ASCII case are
/// equal and hash alike, and [`RegistrationId::key`] is the one spelling the store, the
/// allocation hash and every lookup use. The spelling is kept for answers and topics.
/// Deserializing does not validate (a stored or operator record is checked where it
/// enters the service); [`RegistrationId::parse`] does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegistrationId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid registration id (1-128 of a-z A-Z 0-9 - . _ :)")]
pub struct InvalidRegistrationId(pub String);

impl RegistrationId {
    /// A valid registration id (see [`valid_registration_id`]).
    pub fn parse(id: &str) -> Result<RegistrationId, InvalidRegistrationId> {
        if valid_registration_id(id) {
            Ok(RegistrationId(id.to_owned()))
        } else {
            Err(InvalidRegistrationId(id.to_owned()))
        }
    }

    /// As spelled.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The canonical (lower-case) spelling.
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        if self.0.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(self.0.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(&self.0)
        }
    }

    pub fn is_valid(&self) -> bool {
        valid_registration_id(&self.0)
    }

    /// Whether `other`, as spelled anywhere, names this id.
    pub fn is(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl From<&str> for RegistrationId {
    /// Unvalidated: for ids that were checked already or come from the store.
    fn from(id: &str) -> RegistrationId {
        RegistrationId(id.to_owned())
    }
}

impl From<String> for RegistrationId {
    fn from(id: String) -> RegistrationId {
        RegistrationId(id)
    }
}

impl PartialEq for RegistrationId {
    fn eq(&self, other: &RegistrationId) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for RegistrationId {}

impl std::hash::Hash for RegistrationId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_lowercase());
        }
        state.write_u8(0xff);
    }
}

impl std::fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RegistrationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A parsed CONNECT username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username<'a> {
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    pub api_version: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("username is not {{idScope}}/registrations/{{registrationId}}/api-version=..")]
    Shape,
    #[error("username has no api-version")]
    MissingApiVersion,
    #[error("api-version {0} is not one edgedps speaks")]
    UnknownApiVersion(String),
}

/// Parses a DPS username. Extra query keys (`ClientVersion`, raw or URL-encoded, and any
/// the SDKs add later) are accepted and ignored.
pub fn parse_username(username: &str) -> Result<Username<'_>, UsernameError> {
    let mut parts = username.splitn(4, '/');
    let id_scope = parts.next().ok_or(UsernameError::Shape)?;
    if parts.next() != Some("registrations") {
        return Err(UsernameError::Shape);
    }
    let registration_id = parts.next().ok_or(UsernameError::Shape)?;
    let query = parts.next().ok_or(UsernameError::MissingApiVersion)?;
    if id_scope.is_empty() || registration_id.is_empty() {
        return Err(UsernameError::Shape);
    }
    let query = query.strip_prefix('?').unwrap_or(query);
    let api_version = api_version(query).ok_or(UsernameError::MissingApiVersion)?;
    if !API_VERSIONS.contains(&api_version) {
        return Err(UsernameError::UnknownApiVersion(api_version.to_owned()));
    }
    Ok(Username {
        id_scope,
        registration_id,
        api_version,
    })
}

/// The `api-version` of a username's query (`k=v&...`).
fn api_version(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("api-version="))
}

/// A parsed IoT Hub CONNECT username (PROTOCOL E):
/// `{hostName}/{deviceId}/?api-version={v}[&key=value...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUsername<'a> {
    pub host_name: &'a str,
    pub device_id: &'a str,
    pub api_version: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubUsernameError {
    #[error("username is not {{hostName}}/{{deviceId}}/?api-version=.. (module identities are not served)")]
    Shape,
    #[error("username has no api-version")]
    MissingApiVersion,
}

/// Parses an IoT Hub device username. Any api-version is accepted (the SDKs send many);
/// other query keys (`DeviceClientType`, `model-id`, ...) are ignored.
pub fn parse_hub_username(username: &str) -> Result<HubUsername<'_>, HubUsernameError> {
    let mut parts = username.splitn(3, '/');
    let (Some(host_name), Some(device_id), Some(query)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(HubUsernameError::Shape);
    };
    // A module identity has one more level before the query.
    let Some(query) = query.strip_prefix('?') else {
        return Err(HubUsernameError::Shape);
    };
    if host_name.is_empty() || device_id.is_empty() || device_id == "registrations" {
        return Err(HubUsernameError::Shape);
    }
    let api_version = api_version(query)
        .filter(|v| !v.is_empty())
        .ok_or(HubUsernameError::MissingApiVersion)?;
    Ok(HubUsername {
        host_name,
        device_id,
        api_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_usernames_of_the_sdks_parse_and_dps_ones_do_not() {
        for (username, version) in [
            ("gw.local/dev-1/?api-version=2019-10-01&DeviceClientType=py-azure-iot-device%2F2.14.0", "2019-10-01"),
            ("gw.local/dev-1/?api-version=2021-04-12&DeviceClientType=azure-iot-device-mqtt", "2021-04-12"),
            ("gw.local/dev-1/?DeviceClientType=c&api-version=2025-08-01-preview&model-id=dtmi:x;1", "2025-08-01-preview"),
        ] {
            let parsed = parse_hub_username(username).unwrap();
            assert_eq!((parsed.host_name, parsed.device_id, parsed.api_version), ("gw.local", "dev-1", version));
        }
        for (username, error) in [
            (
                "0ne00000001/registrations/dev-1/api-version=2019-03-31",
                HubUsernameError::Shape,
            ),
            (
                "gw.local/dev-1/module-a/?api-version=2019-10-01",
                HubUsernameError::Shape,
            ),
            (
                "gw.local/dev-1/api-version=2019-10-01",
                HubUsernameError::Shape,
            ),
            ("gw.local//?api-version=2019-10-01", HubUsernameError::Shape),
            ("gw.local/dev-1", HubUsernameError::Shape),
            (
                "gw.local/dev-1/?DeviceClientType=x",
                HubUsernameError::MissingApiVersion,
            ),
            (
                "gw.local/dev-1/?api-version=",
                HubUsernameError::MissingApiVersion,
            ),
        ] {
            assert_eq!(parse_hub_username(username), Err(error), "{username}");
        }
    }

    #[test]
    fn usernames_of_the_sdks_parse() {
        for username in [
            "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0",
            "0ne00000001/registrations/dev-1/api-version=2021-06-01&ClientVersion=azure-iot-device/2.14.0",
            "0ne00000001/registrations/dev-1/api-version=2021-10-01",
            "0ne00000001/registrations/dev-1/api-version=2025-07-01-preview&future=1",
            "0ne00000001/registrations/dev-1/ClientVersion=c%2F1.0&api-version=2021-11-01-preview",
        ] {
            let parsed = parse_username(username).unwrap();
            assert_eq!(parsed.id_scope, "0ne00000001");
            assert_eq!(parsed.registration_id, "dev-1");
        }
    }

    #[test]
    fn malformed_usernames_are_refused() {
        assert_eq!(parse_username("dev-1"), Err(UsernameError::Shape));
        assert_eq!(
            parse_username("scope/devices/dev-1/api-version=2021-06-01"),
            Err(UsernameError::Shape)
        );
        assert_eq!(
            parse_username("scope/registrations/dev-1"),
            Err(UsernameError::MissingApiVersion)
        );
        assert_eq!(
            parse_username("scope/registrations/dev-1/api-version=1999-01-01"),
            Err(UsernameError::UnknownApiVersion("1999-01-01".into()))
        );
    }

    #[test]
    fn registration_id_rules() {
        assert!(valid_registration_id("My.Device_01:a-b"));
        assert!(valid_registration_id(&"a".repeat(128)));
        assert!(!valid_registration_id(&"a".repeat(129)));
        assert!(!valid_registration_id(""));
        assert!(!valid_registration_id("dev/1"));
        assert!(!valid_registration_id("dev 1"));
    }

    #[test]
    fn registration_ids_differing_in_case_are_one_id() {
        use std::collections::HashSet;
        let spelled = RegistrationId::parse("Dev-A").unwrap();
        assert_eq!(spelled.key(), "dev-a");
        assert_eq!(spelled.as_str(), "Dev-A");
        assert_eq!(spelled, RegistrationId::from("DEV-a"));
        assert!(spelled.is("dev-A"));
        let set: HashSet<RegistrationId> = ["dev-a", "DEV-A", "Dev-A"]
            .into_iter()
            .map(RegistrationId::from)
            .collect();
        assert_eq!(set.len(), 1);
        assert!(RegistrationId::parse("dev/a").is_err());
        assert_eq!(serde_json::to_string(&spelled).unwrap(), "\"Dev-A\"");
    }
}
