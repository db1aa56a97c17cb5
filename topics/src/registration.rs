//! Request and response bodies of the device protocol (PROTOCOL A4, A5).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Error codes of the DPS error table (PROTOCOL A5).
pub mod codes {
    pub const MALFORMED_BODY: u32 = 400004;
    pub const CUSTOM_ALLOCATION_FAILED: u32 = 400207;
    pub const NO_HUB: u32 = 400208;
    pub const UNAUTHORIZED: u32 = 401002;
    pub const NOT_FOUND: u32 = 404201;
    pub const CONFLICT: u32 = 409203;
    pub const THROTTLED: u32 = 429001;
    pub const INTERNAL: u32 = 500000;

    /// The MQTT topic status for an error code: its first three digits.
    pub fn status_of(code: u32) -> u16 {
        (code / 1000) as u16
    }
}

/// A register body. Either member may be missing; the body may be empty.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    #[serde(default)]
    pub registration_id: Option<String>,
    #[serde(default)]
    pub payload: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("register body is not a JSON object: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object or null")]
    PayloadNotObject,
}

impl RegisterRequest {
    /// Parses a register body: empty or whitespace-only bodies are an empty request.
    pub fn parse(body: &[u8]) -> Result<RegisterRequest, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(RegisterRequest::default());
        }
        // serde would also read a struct from a JSON array: only an object is a body.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BodyError::NotJson("expected a JSON object".into()));
        }
        let request: RegisterRequest = crate::encoding::Encoding::Json
            .decode(body)
            .map_err(BodyError::NotJson)?;
        match &request.payload {
            None | Some(Value::Null) | Some(Value::Object(_)) => Ok(request),
            Some(_) => Err(BodyError::PayloadNotObject),
        }
    }
}

/// Values of `status` in a registration record and an operation.
pub mod status {
    pub const ASSIGNING: &str = "assigning";
    pub const ASSIGNED: &str = "assigned";
    pub const FAILED: &str = "failed";
    pub const DISABLED: &str = "disabled";
    /// The record of a device whose enrollment was deleted, or that was retired: it
    /// stays for the operator's information and grants nothing.
    pub const DEREGISTERED: &str = "deregistered";
}

/// Where a registration's attestation came from, as DPS reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationSource {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrollment_group_id: Option<String>,
    /// X.509: the leaf the device registered with (Azure's `certificateInfo`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate_info: Option<CertificateInfo>,
}

/// A certificate as a registration record describes it (Azure's `X509CertificateInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    pub subject_name: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    pub issuer_name: String,
    /// Upper-case hex.
    pub serial_number: String,
    pub not_before_utc: String,
    pub not_after_utc: String,
}

/// `registrationState` of a response, and the body of the retained
/// `dps/registrations/{id}` record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub assigned_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_id: Option<String>,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub substatus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x509: Option<AttestationSource>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symmetric_key: Option<AttestationSource>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initial_twin: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub payload: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_message: Option<String>,
}

/// The body of a 200 or 202 response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub operation_id: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub registration_state: Option<RegistrationState>,
}

/// The body of an error response (status >= 300).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error_code: u32,
    pub tracking_id: String,
    pub message: String,
    pub timestamp_utc: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_space_bodies_are_empty_requests() {
        assert_eq!(
            RegisterRequest::parse(b"").unwrap(),
            RegisterRequest::default()
        );
        assert_eq!(
            RegisterRequest::parse(b" ").unwrap(),
            RegisterRequest::default()
        );
    }

    #[test]
    fn register_body_with_payload_parses() {
        let r = RegisterRequest::parse(br#"{"registrationId":"dev-1","payload":{"a":1}}"#).unwrap();
        assert_eq!(r.registration_id.as_deref(), Some("dev-1"));
        assert_eq!(r.payload, Some(serde_json::json!({"a": 1})));
        let r = RegisterRequest::parse(br#"{"payload":null}"#).unwrap();
        assert_eq!(r.payload, None);
    }

    #[test]
    fn malformed_register_bodies_are_refused() {
        assert!(matches!(
            RegisterRequest::parse(b"{"),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            RegisterRequest::parse(b"[]"),
            Err(BodyError::NotJson(_))
        ));
        assert_eq!(
            RegisterRequest::parse(br#"{"payload":"text"}"#),
            Err(BodyError::PayloadNotObject)
        );
    }

    #[test]
    fn status_is_the_first_three_digits_of_the_code() {
        assert_eq!(codes::status_of(codes::UNAUTHORIZED), 401);
        assert_eq!(codes::status_of(codes::THROTTLED), 429);
    }
}
