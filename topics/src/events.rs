//! The events edgedps publishes about devices (PROTOCOL B, events): every connect-time
//! attestation decision on `dps/events/attestation/{registrationId}`, every register and
//! poll outcome on `dps/events/registrations/{registrationId}`, and every refused topic
//! use on `dps/events/acl/{clientId}`. Operator writes have their own [`AdminEvent`].
//!
//! Events name ids, certificates' names and times, never keys, tokens or payloads.
//!
//! [`AdminEvent`]: crate::admin::AdminEvent

use serde::{Deserialize, Serialize};

use crate::admin::{AttestationType, PREFIX};
use crate::identity::valid_registration_id;

/// Where connect-time attestation decisions go. Ids that are not valid registration ids
/// (they may hold `/`, `+` or `#`) share `_invalid`.
pub fn attestation_event_topic(registration_id: &str) -> String {
    if valid_registration_id(registration_id) {
        format!("{PREFIX}events/attestation/{registration_id}")
    } else {
        format!("{PREFIX}events/attestation/_invalid")
    }
}

/// Every event's topic starts with this.
pub const EVENTS_PREFIX: &str = "dps/events/";

pub fn registration_event_topic(registration_id: &str) -> String {
    format!("{PREFIX}events/registrations/{registration_id}")
}

/// Where refused topic uses (ACL denials, refused subscriptions) of a session go. Client
/// ids that are not valid registration ids share `_invalid`.
pub fn acl_event_topic(client_id: &str) -> String {
    if valid_registration_id(client_id) {
        format!("{PREFIX}events/acl/{client_id}")
    } else {
        format!("{PREFIX}events/acl/_invalid")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationOutcome {
    Accepted,
    Refused,
}

/// A CONNECT decision on the device listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationEvent {
    /// The CONNECT's client id, as sent.
    pub registration_id: String,
    pub outcome: AttestationOutcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attestation: Option<AttestationType>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrollment_group_id: Option<String>,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    pub timestamp_utc: String,
}

impl AttestationEvent {
    pub fn topic(&self) -> String {
        attestation_event_topic(&self.registration_id)
    }
}

/// What became of a register or poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationOutcome {
    Assigned,
    Disabled,
    /// The assignment could not be made (no hub); the operation completed as `failed`.
    Failed,
    /// An error answer (the request was malformed, throttled, unauthorized...).
    Refused,
    /// A TPM device was sent a challenge (a 401 with its registration key).
    Challenged,
    /// Not a device request: the assigned cloud hub's registration changed state.
    HubRegistration,
}

/// Which device request a refusal answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceRequestKind {
    Register,
    Poll,
}

/// The outcome of one register or poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationEvent {
    pub registration_id: String,
    pub outcome: RegistrationOutcome,
    /// Set on refusals.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request: Option<DeviceRequestKind>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrollment_group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub assigned_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// The certificate issued with the assignment (PROTOCOL F).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub issued_certificate: Option<crate::registration::IssuedCertificate>,
    /// The assignment's registration at its cloud hub, and each change of it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hub_registration: Option<crate::cloud::HubRegistration>,
    /// Which policy chose the hub, and why (assignments and custom-allocation failures).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allocation: Option<crate::allocation::AllocationRecord>,
    pub timestamp_utc: String,
}

impl RegistrationEvent {
    pub fn topic(&self) -> String {
        registration_event_topic(&self.registration_id)
    }
}

/// A topic use the ACL refused (a publish or a subscription).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AclEvent {
    pub client_id: String,
    /// `publish` or `subscribe`.
    pub action: String,
    pub topic: String,
    /// Always `refused`.
    pub outcome: String,
    pub reason: String,
    pub timestamp_utc: String,
}

impl AclEvent {
    pub fn topic(&self) -> String {
        acl_event_topic(&self.client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_leave_out_what_they_do_not_have() {
        let event = RegistrationEvent {
            registration_id: "dev-1".into(),
            outcome: RegistrationOutcome::Refused,
            request: Some(DeviceRequestKind::Poll),
            enrollment_group_id: None,
            assigned_hub: None,
            error_code: Some(404201),
            message: Some("unknown".into()),
            issued_certificate: None,
            hub_registration: None,
            allocation: None,
            timestamp_utc: "t".into(),
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::json!({"registrationId": "dev-1", "outcome": "refused", "request": "poll",
                "errorCode": 404201, "message": "unknown", "timestampUtc": "t"})
        );
        assert_eq!(event.topic(), "dps/events/registrations/dev-1");
    }

    #[test]
    fn ids_that_are_not_topic_safe_share_one_event_topic() {
        assert_eq!(
            attestation_event_topic("a/#"),
            "dps/events/attestation/_invalid"
        );
        assert_eq!(acl_event_topic("a+b"), "dps/events/acl/_invalid");
        assert_eq!(acl_event_topic("op-1"), "dps/events/acl/op-1");
    }
}
