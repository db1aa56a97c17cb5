//! Request and response bodies of the device protocol (PROTOCOL A4, A5).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::encoding::Encoding;
use crate::identity::RegistrationId;

/// Error codes of the DPS error table (PROTOCOL A5).
pub mod codes {
    pub const MALFORMED_BODY: u32 = 400004;
    pub const CUSTOM_ALLOCATION_FAILED: u32 = 400207;
    pub const NO_HUB: u32 = 400208;
    /// edgedps: the registration id does not match its group's `registrationIdPattern`.
    pub const ID_PATTERN: u32 = 400210;
    pub const UNAUTHORIZED: u32 = 401002;
    /// edgedps: the enrollment group holds its `maxDevices`.
    pub const GROUP_FULL: u32 = 403001;
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
    /// A certificate signing request (PROTOCOL F): base64 of the DER PKCS#10 request.
    #[serde(default)]
    pub csr: Option<String>,
    /// A TPM device's keys (base64 TPM2B_PUBLIC): its register asks for a challenge
    /// with them, and its final answer's `authenticationKey` is made to them.
    #[serde(default)]
    pub tpm: Option<crate::admin::TpmAttestation>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("register body is not a JSON object: {0}")]
    NotJson(String),
    #[error("register body is not a CBOR map: {0}")]
    NotCbor(String),
    #[error("payload must be a JSON object or null")]
    PayloadNotObject,
}

impl RegisterRequest {
    /// Parses a register body in its encoding: empty or whitespace-only bodies are an
    /// empty request. A CBOR body is read as the same document as JSON would be.
    pub fn parse(body: &[u8], encoding: Encoding) -> Result<RegisterRequest, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(RegisterRequest::default());
        }
        let request: RegisterRequest = match encoding {
            Encoding::Json => {
                // serde would also read a struct from a JSON array: only an object is a
                // body.
                if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                    return Err(BodyError::NotJson("expected a JSON object".into()));
                }
                Encoding::Json.decode(body).map_err(BodyError::NotJson)?
            }
            Encoding::Cbor => {
                let document: Value = Encoding::Cbor.decode(body).map_err(BodyError::NotCbor)?;
                if !document.is_object() {
                    return Err(BodyError::NotJson("expected a JSON object".into()));
                }
                serde_json::from_value(document).map_err(|e| {
                    BodyError::NotJson(crate::encoding::without_values(&e.to_string()))
                })?
            }
        };
        match &request.payload {
            None | Some(Value::Null) | Some(Value::Object(_)) => Ok(request),
            Some(_) => Err(BodyError::PayloadNotObject),
        }
    }
}

/// `status` of an operation and of a registration record (PROTOCOL A5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    Unassigned,
    Assigning,
    Assigned,
    Failed,
    Disabled,
    /// The record of a device whose enrollment was deleted, or that was retired: it
    /// stays for the operator's information and grants nothing.
    Deregistered,
}

impl RegistrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationStatus::Unassigned => "unassigned",
            RegistrationStatus::Assigning => "assigning",
            RegistrationStatus::Assigned => "assigned",
            RegistrationStatus::Failed => "failed",
            RegistrationStatus::Disabled => "disabled",
            RegistrationStatus::Deregistered => "deregistered",
        }
    }
}

impl PartialEq<&str> for RegistrationStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for RegistrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `substatus` of an assigned registration (PROTOCOL A6): what the last register did to
/// the device's hub and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    /// The first assignment, or a re-registration that changed nothing.
    InitialAssignment,
    /// Assigned to another hub; the device's data moved with it.
    DeviceDataMigrated,
    /// The device's data was reset to the enrollment's initial twin.
    DeviceDataReset,
    /// Assigned again from the enrollment's initial settings.
    ReprovisionedToInitialAssignment,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: RegistrationId,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub assigned_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub substatus: Option<Substatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x509: Option<AttestationSource>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symmetric_key: Option<AttestationSource>,
    /// Written as IoT Hub writes twins (`crate::twin::ordered`): `$version` last.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        serialize_with = "crate::twin::ordered"
    )]
    pub initial_twin: Option<Value>,
    /// The initial twin when no custom allocator set one; written as a twin.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        serialize_with = "crate::twin::ordered"
    )]
    pub payload: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_message: Option<String>,
    /// Certificates edgedps issued to the device (PROTOCOL F), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub issued_certificates: Vec<IssuedCertificate>,
    /// In an answer only, never stored: the chain just issued for the register's
    /// `csr`, base64 DER, leaf first.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub issued_certificate_chain: Option<Vec<String>>,
    /// On the record only, never in an answer: how far the assigned cloud hub has the
    /// device (none for the local hub and hubs without credentials).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hub_registration: Option<crate::cloud::HubRegistration>,
    /// In an answer only, never stored: a TPM device's hub key, sealed to its TPM.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tpm: Option<TpmAuthentication>,
    /// On the record only, never in an answer: which policy chose the hub, and why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allocation: Option<crate::allocation::AllocationRecord>,
}

/// `registrationState.tpm` of a TPM device's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAuthentication {
    /// Base64 of the activation blob (`edgedps_policies::tpm::activation_blob`).
    pub authentication_key: String,
}

/// The body of a TPM challenge (status 401), as Azure's TPM clients read it: no
/// `status` member (the C client tells a challenge from an answer by that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmChallenge {
    pub message: String,
    /// Base64 of the activation blob of the registration key.
    pub authentication_key: String,
    /// Always `registration`: the `skn` of the SAS token the key signs.
    pub key_name: String,
}

/// A certificate edgedps issued to a device, as its registration record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Upper-case hex.
    pub serial_number: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    pub not_after_utc: String,
    /// The issuing certificate authority's name.
    pub certificate_authority: String,
    /// Revoked (the device was retired, or the certificate replaced).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub revoked: bool,
    /// The renewal request (`$rid`) that got it; none for one issued at registration.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    /// A renewal's `replace` of one request id: the certificate that request got is
    /// revoked when this one is first used.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replaces: Option<String>,
}

impl RegistrationState {
    /// A record with its id and status and nothing else.
    pub fn new(registration_id: RegistrationId, status: RegistrationStatus) -> RegistrationState {
        RegistrationState {
            registration_id,
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            last_updated_date_time_utc: None,
            etag: None,
            x509: None,
            symmetric_key: None,
            initial_twin: None,
            payload: None,
            error_code: None,
            error_message: None,
            issued_certificates: Vec::new(),
            issued_certificate_chain: None,
            hub_registration: None,
            tpm: None,
            allocation: None,
        }
    }

    /// The enrollment group the registration came through, if any.
    pub fn enrollment_group_id(&self) -> Option<&str> {
        self.x509
            .as_ref()
            .or(self.symmetric_key.as_ref())
            .and_then(|source| source.enrollment_group_id.as_deref())
    }

    pub fn is_assigned(&self) -> bool {
        self.status == RegistrationStatus::Assigned
    }
}

/// The body of a 200 or 202 response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub operation_id: String,
    pub status: RegistrationStatus,
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
            RegisterRequest::parse(b"", Encoding::Json).unwrap(),
            RegisterRequest::default()
        );
        assert_eq!(
            RegisterRequest::parse(b" ", Encoding::Json).unwrap(),
            RegisterRequest::default()
        );
    }

    #[test]
    fn register_body_with_payload_parses() {
        let r = RegisterRequest::parse(
            br#"{"registrationId":"dev-1","payload":{"a":1}}"#,
            Encoding::Json,
        )
        .unwrap();
        assert_eq!(r.registration_id.as_deref(), Some("dev-1"));
        assert_eq!(r.payload, Some(serde_json::json!({"a": 1})));
        let r = RegisterRequest::parse(br#"{"payload":null}"#, Encoding::Json).unwrap();
        assert_eq!(r.payload, None);
    }

    #[test]
    fn malformed_register_bodies_are_refused() {
        assert!(matches!(
            RegisterRequest::parse(b"{", Encoding::Json),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            RegisterRequest::parse(b"[]", Encoding::Json),
            Err(BodyError::NotJson(_))
        ));
        assert_eq!(
            RegisterRequest::parse(br#"{"payload":"text"}"#, Encoding::Json),
            Err(BodyError::PayloadNotObject)
        );
    }

    #[test]
    fn statuses_are_written_as_dps_writes_them() {
        let mut record = RegistrationState::new("Dev-1".into(), RegistrationStatus::Assigned);
        record.substatus = Some(Substatus::DeviceDataMigrated);
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"registrationId": "Dev-1", "status": "assigned", "substatus": "deviceDataMigrated"})
        );
        assert_eq!(RegistrationStatus::Deregistered.to_string(), "deregistered");
        let back: RegistrationState = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn cbor_bodies_are_read_as_the_same_document() {
        let body = Encoding::Cbor
            .encode(&serde_json::json!({"registrationId": "dev-1", "payload": {"a": 1}}));
        let r = RegisterRequest::parse(&body, Encoding::Cbor).unwrap();
        assert_eq!(r.registration_id.as_deref(), Some("dev-1"));
        assert_eq!(r.payload, Some(serde_json::json!({"a": 1})));
        assert!(matches!(
            RegisterRequest::parse(&[0xa1, 0x61], Encoding::Cbor),
            Err(BodyError::NotCbor(_))
        ));
        let list = Encoding::Cbor.encode(&serde_json::json!([1]));
        assert!(matches!(
            RegisterRequest::parse(&list, Encoding::Cbor),
            Err(BodyError::NotJson(_))
        ));
        let text = Encoding::Cbor.encode(&serde_json::json!({"payload": "text"}));
        assert_eq!(
            RegisterRequest::parse(&text, Encoding::Cbor),
            Err(BodyError::PayloadNotObject)
        );
    }

    #[test]
    fn status_is_the_first_three_digits_of_the_code() {
        assert_eq!(codes::status_of(codes::UNAUTHORIZED), 401);
        assert_eq!(codes::status_of(codes::THROTTLED), 429);
    }
}
