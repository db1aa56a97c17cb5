//! Registration at a cloud IoT Hub: what a registration record says about it
//! (`hubRegistration`), the operations the outbox keeps until the hub has them, and the
//! bodies of IoT Hub's service API (api-version [`API_VERSION`]) that carry them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identity::RegistrationId;

/// The IoT Hub service API version edgedps speaks.
pub const API_VERSION: &str = "2021-04-12";

/// How far the hub has the device (`hubRegistration.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HubRegistrationState {
    /// In the outbox: not yet sent, or sent and to be tried again.
    Pending,
    /// The hub answered every request of the operation with success.
    Done,
    /// The hub refused it in a way retrying cannot fix; `lastError` says how.
    Failed,
}

/// What an operation makes of the device at the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HubAction {
    /// Create or update the identity (enabled) and write the twin the policy says.
    Register,
    /// The device is out of service: its identity `disabled`.
    Disable,
    /// The device is back in service: its identity `enabled`.
    Enable,
}

/// `hubRegistration` on a registration record and its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubRegistration {
    pub state: HubRegistrationState,
    pub action: HubAction,
    /// Requests sent for the operation so far.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    /// When the state was last set (a DPS timestamp).
    pub at: String,
    /// The operation's place in its hub's outbox.
    pub sequence: u64,
}

/// One operation in a hub's outbox, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubOperation {
    pub hub: String,
    pub sequence: u64,
    pub registration_id: RegistrationId,
    pub device_id: String,
    pub action: HubAction,
    /// `register`: the identity to put. `disable` and `enable` read the identity the hub
    /// holds and change only its status (the keys stay the hub's).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub identity: Option<DeviceIdentity>,
    /// The twin to write after the identity, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub twin: Option<TwinWrite>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    pub enqueued_at: String,
}

impl HubOperation {
    /// What the registration record says about the operation now.
    pub fn registration(&self, state: HubRegistrationState, at: String) -> HubRegistration {
        HubRegistration {
            state,
            action: self.action,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            at,
            sequence: self.sequence,
        }
    }
}

/// One operation as `dps/admin/results/hub-outbox/{hostName}` shows it: never the
/// identity (it holds the device's keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEntry {
    pub sequence: u64,
    pub registration_id: String,
    pub device_id: String,
    pub action: HubAction,
    pub state: HubRegistrationState,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    pub enqueued_at: String,
}

impl OutboxEntry {
    pub fn of(operation: &HubOperation, state: HubRegistrationState) -> OutboxEntry {
        OutboxEntry {
            sequence: operation.sequence,
            registration_id: operation.registration_id.to_string(),
            device_id: operation.device_id.clone(),
            action: operation.action,
            state,
            attempts: operation.attempts,
            last_error: operation.last_error.clone(),
            enqueued_at: operation.enqueued_at.clone(),
        }
    }
}

/// The body of `dps/admin/hub-outbox/{hostName}`: empty (or `{}`) shows the outbox;
/// `{"retry": true}` sends the failed operations again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboxRequest {
    #[serde(default)]
    pub retry: bool,
}

/// The answer on `dps/admin/results/hub-outbox/{hostName}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxReport {
    pub host_name: String,
    pub ok: bool,
    /// Why the request was refused.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// The hub has a connection string.
    pub credentials: bool,
    pub pending: u64,
    pub failed: u64,
    /// Failed operations sent again by this request.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retried: Option<u64>,
    /// Failed operations dropped because the device's record has moved on since.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub superseded: Option<u64>,
    /// The oldest operations, failed ones first (at most 100 of each).
    pub operations: Vec<OutboxEntry>,
}

/// Where an operator asks for a hub's outbox: `dps/admin/hub-outbox/{hostName}`.
pub fn outbox_topic(host_name: &str) -> String {
    format!("dps/admin/hub-outbox/{host_name}")
}

/// Where the answer goes: `dps/admin/results/hub-outbox/{hostName}`.
pub fn outbox_result_topic(host_name: &str) -> String {
    format!("dps/admin/results/hub-outbox/{host_name}")
}

/// The twin an operation writes at the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TwinWrite {
    /// Replace the tags and desired properties (a new device, or its data reset).
    Replace(TwinBody),
    /// The device moved and its data goes with it: read the twin at `from` and write its
    /// tags and desired here; `fallback` when `from` cannot be read (no credentials).
    Migrate { from: String, fallback: TwinBody },
}

/// The body of Replace Twin (`PUT /twins/{id}`): tags and desired properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinBody {
    #[serde(default)]
    pub tags: Map<String, Value>,
    #[serde(default)]
    pub properties: TwinProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinProperties {
    #[serde(default)]
    pub desired: Map<String, Value>,
}

impl TwinBody {
    /// The tags and desired properties of a twin document (an enrollment's `initialTwin`
    /// or a twin read from a hub), without the `$` keys the hub writes itself.
    pub fn of(twin: Option<&Value>) -> TwinBody {
        let member = |path: &[&str]| {
            let mut at = twin;
            for key in path {
                at = at.and_then(|v| v.get(key));
            }
            at.and_then(Value::as_object)
                .map(|object| {
                    object
                        .iter()
                        .filter(|(key, _)| !key.starts_with('$'))
                        .map(|(key, value)| (key.clone(), value.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        TwinBody {
            tags: member(&["tags"]),
            properties: TwinProperties {
                desired: member(&["properties", "desired"]),
            },
        }
    }
}

/// A device identity as IoT Hub's registry takes it (`PUT /devices/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    pub device_id: String,
    pub status: DeviceStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status_reason: Option<String>,
    pub authentication: Authentication,
    #[serde(default)]
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceStatus {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(rename = "type")]
    pub kind: AuthenticationType,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symmetric_key: Option<SymmetricKeys>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x509_thumbprint: Option<Thumbprints>,
}

/// IoT Hub's names for its authentication mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthenticationType {
    Sas,
    SelfSigned,
    CertificateAuthority,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Thumbprints {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// How a linked hub learns of its devices (`registration` on the hub).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HubRegistrationMode {
    /// The device is answered at once; the outbox brings the hub up to date.
    #[default]
    #[serde(alias = "after_answer")]
    AfterAnswer,
    /// The register waits (bounded) for the hub and fails with its reason, as Azure.
    #[serde(alias = "before_answer")]
    BeforeAnswer,
}

/// What the retained hub record shows of its credentials: that they are set, and the
/// policy's name. Never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsShown {
    pub shared_access_key_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn twin_bodies_keep_tags_and_desired_and_drop_what_the_hub_writes() {
        let twin = json!({
            "tags": {"site": "a", "$x": 1},
            "properties": {"desired": {"rate": 5, "$version": 3, "$metadata": {}}, "reported": {"r": 1}},
        });
        let body = TwinBody::of(Some(&twin));
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}})
        );
        assert_eq!(
            serde_json::to_value(TwinBody::of(None)).unwrap(),
            json!({"tags": {}, "properties": {"desired": {}}})
        );
    }

    #[test]
    fn identities_are_written_in_iot_hub_s_shape() {
        let identity = DeviceIdentity {
            device_id: "dev-1".into(),
            status: DeviceStatus::Disabled,
            status_reason: None,
            authentication: Authentication {
                kind: AuthenticationType::SelfSigned,
                symmetric_key: None,
                x509_thumbprint: Some(Thumbprints {
                    primary_thumbprint: Some("AB".into()),
                    secondary_thumbprint: None,
                }),
            },
            capabilities: Capabilities::default(),
        };
        assert_eq!(
            serde_json::to_value(&identity).unwrap(),
            json!({"deviceId": "dev-1", "status": "disabled",
                "authentication": {"type": "selfSigned",
                    "x509Thumbprint": {"primaryThumbprint": "AB", "secondaryThumbprint": null}},
                "capabilities": {"iotEdge": false}})
        );
        let mode: HubRegistrationMode = serde_json::from_str("\"before_answer\"").unwrap();
        assert_eq!(mode, HubRegistrationMode::BeforeAnswer);
    }
}
