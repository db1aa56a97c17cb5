//! Allocation on the wire (PROTOCOL A6, B, C): the `allocation` a registration record
//! and event carry, the bodies a custom allocator is sent and answers (Azure's), and the
//! answer to `dps/admin/explain/{registrationId}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admin::{AllocationPolicy, AttestationType, ProvisioningStatus};

/// Which policy chose a registration's hub, and why, in words an operator can check:
/// "hashed: highest score 0.83 of 2 candidates", "geoLatency: 4.1 ms, next 9.8 ms".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    pub policy: AllocationPolicy,
    /// The hub chosen; absent when the allocation failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hub: Option<String>,
    pub reason: String,
}

/// What a custom allocator is asked (Azure's `AllocationRequest`): the enrollment the
/// device came through (without keys), the device, and the hubs it may be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationRequest {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub individual_enrollment: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrollment_group: Option<Value>,
    pub device_runtime_context: DeviceRuntimeContext,
    pub linked_hubs: Vec<String>,
}

/// `deviceRuntimeContext`: the registering device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRuntimeContext {
    pub registration_id: String,
    /// The hub the device is assigned to now, if it is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub current_iot_hub_host_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub current_device_id: Option<String>,
    /// X.509: `{"clientCertificate": {subjectName, sha256Thumbprint, ...}}`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x509: Option<Value>,
    /// Symmetric key: `{}` (the key never leaves the gateway).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symmetric_key: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tpm: Option<Value>,
    /// The `payload` of the device's register body.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub payload: Option<Value>,
}

/// What a custom allocator answers (Azure's `AllocationResponse`). Other members are
/// ignored, as Azure ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationAnswer {
    pub iot_hub_host_name: String,
    /// Replaces the enrollment's initial twin.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initial_twin: Option<Value>,
    /// What the device receives as `registrationState.payload`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub payload: Option<Value>,
}

/// The body of `dps/admin/explain/{registrationId}`: what the device would present. An
/// empty body, `{}`, a PEM certificate chain (leaf first), or this object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExplainRequest {
    /// The kind of credential the device would present; `x509` needs the chain.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attestation: Option<AttestationType>,
    /// PEM certificates, leaf first.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate_chain: Option<String>,
}

/// How a registration would end, were the device to register now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExplainOutcome {
    /// Its individual enrollment provisions it.
    Individual,
    /// An enrollment group provisions it.
    Group,
    /// It is kept out: a disabled individual enrollment of a group device, a revoked
    /// certificate, a group limit, a retirement.
    Blocked,
    /// Its enrollment or group is disabled: the register answers `disabled`.
    Disabled,
    /// No enrollment accepts it.
    Unknown,
}

/// One enrollment looked at, and what it makes of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsideredEnrollment {
    /// `individual` or `group`.
    pub kind: String,
    pub id: String,
    pub provisioning_status: ProvisioningStatus,
    /// Whether this is the enrollment the device would follow.
    pub matches: bool,
    pub reason: String,
}

/// One hub the device could be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainedCandidate {
    pub host_name: String,
    pub weight: u32,
    /// Its rendezvous-hash score for this device (the highest wins under `hashed`).
    pub hash_score: f64,
    /// The latency measured to it (geoLatency), in microseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latency_microseconds: Option<u64>,
    /// Whether the last probe reached it; absent before any probe.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reachable: Option<bool>,
    pub chosen: bool,
}

/// The allocation a registration would make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainedAllocation {
    pub policy: AllocationPolicy,
    pub candidates: Vec<ExplainedCandidate>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hub: Option<String>,
    /// The rule that chose it, or why none can be chosen.
    pub reason: String,
}

/// The answer on `dps/admin/results/explain/{registrationId}`. Explaining changes
/// nothing: no record, no counter, no allocator is called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub ok: bool,
    pub registration_id: String,
    /// What the explanation assumed the device presents.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attestation: Option<AttestationType>,
    pub outcome: ExplainOutcome,
    /// The enrollment the device would follow (`individual` or `group:{id}`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrollment: Option<String>,
    /// Why the outcome is what it is.
    pub reason: String,
    pub considered: Vec<ConsideredEnrollment>,
    /// The device's registration record now, if it has one: its status and hub.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub current_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allocation: Option<ExplainedAllocation>,
    /// The twin the device would be given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initial_twin: Option<Value>,
    /// Set when the request itself could not be explained (a bad body).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u16>,
    pub timestamp_utc: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_allocation_bodies_are_azures() {
        let request = CustomAllocationRequest {
            individual_enrollment: None,
            enrollment_group: Some(serde_json::json!({"enrollmentGroupId": "g"})),
            device_runtime_context: DeviceRuntimeContext {
                registration_id: "dev-1".into(),
                current_iot_hub_host_name: None,
                current_device_id: None,
                x509: None,
                symmetric_key: Some(serde_json::json!({})),
                tpm: None,
                payload: Some(serde_json::json!({"model": "m1"})),
            },
            linked_hubs: vec!["hub-a".into()],
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({
                "enrollmentGroup": {"enrollmentGroupId": "g"},
                "deviceRuntimeContext": {"registrationId": "dev-1", "symmetricKey": {},
                    "payload": {"model": "m1"}},
                "linkedHubs": ["hub-a"]})
        );
        let answer: CustomAllocationAnswer = serde_json::from_value(serde_json::json!({
            "iotHubHostName": "hub-a", "payload": {"x": 1}, "other": true}))
        .unwrap();
        assert_eq!(answer.iot_hub_host_name, "hub-a");
        assert_eq!(answer.payload, Some(serde_json::json!({"x": 1})));
        assert!(serde_json::from_value::<CustomAllocationAnswer>(serde_json::json!({})).is_err());
    }
}
