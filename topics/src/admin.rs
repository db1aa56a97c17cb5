//! The operator plane (PROTOCOL B): retained records under `dps/`, their bodies, and
//! the result and event topics edgedps publishes.
//!
//! Field names are those of Azure DPS enrollments (camelCase). Unknown fields are
//! refused with their name, so a typo never silently drops a setting.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::RegistrationId;

pub const PREFIX: &str = "dps/";
/// Everything the operator plane owns, as a subscription filter.
pub const FILTER: &str = "dps/#";
/// Every result of an operator write, as a subscription filter.
pub const RESULTS_FILTER: &str = "dps/admin/results/#";

/// The kind of record a retained admin topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Enrollment,
    EnrollmentGroup,
    Hub,
    Registration,
    /// `dps/crls/{name}`: a certificate revocation list (PEM or DER).
    Crl,
}

impl RecordKind {
    /// Every kind, in the order a subscription receives them.
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Enrollment,
        RecordKind::EnrollmentGroup,
        RecordKind::Hub,
        RecordKind::Registration,
        RecordKind::Crl,
    ];

    /// Which records of this kind the subscription `filter` matches (MQTT topic
    /// matching of `dps/{segment}/{id}`), `None` for none. `filter` is a plain filter:
    /// not shared, not a `$` filter.
    pub fn selected_by(self, filter: &str) -> Option<Selection> {
        let mut levels = filter.split('/');
        let mut next_level = |expected: &str| match levels.next() {
            Some("#") => Some(true),
            Some(level) if level == "+" || level == expected => Some(false),
            _ => None,
        };
        // `#` at the first or second level takes every record.
        if next_level(PREFIX.trim_end_matches('/'))? || next_level(self.segment())? {
            return Some(Selection::All);
        }
        let selection = match levels.next()? {
            "#" | "+" => Selection::All,
            id => Selection::One(id.to_owned()),
        };
        // A record topic has three levels: only `#` may follow (it matches its parent).
        match levels.next() {
            None => Some(selection),
            Some("#") if levels.next().is_none() => Some(selection),
            Some(_) => None,
        }
    }

    pub fn segment(self) -> &'static str {
        match self {
            RecordKind::Enrollment => "enrollments",
            RecordKind::EnrollmentGroup => "enrollment-groups",
            RecordKind::Hub => "hubs",
            RecordKind::Registration => "registrations",
            RecordKind::Crl => "crls",
        }
    }

    pub fn record_topic(self, id: &str) -> String {
        format!("{PREFIX}{}/{id}", self.segment())
    }

    pub fn result_topic(self, id: &str) -> String {
        format!("{PREFIX}admin/results/{}/{id}", self.segment())
    }
}

/// The records of one kind a subscription matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    /// The record with this id (as the filter spells it).
    One(String),
}

impl Selection {
    /// Whether the record with id `id` is selected.
    pub fn takes(&self, id: &str) -> bool {
        match self {
            Selection::All => true,
            Selection::One(one) => one == id,
        }
    }
}

/// Whether `topic` is one of the records edgedps keeps under `dps/` (in its store, not
/// as retained messages in the router: subscriptions read them from the store).
pub fn is_record_topic(topic: &str) -> bool {
    matches!(parse_topic(topic), Some(AdminTopic::Record { .. }))
}

/// What a publish under `dps/` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTopic {
    /// A retained record an operator may write.
    Record { kind: RecordKind, id: String },
    /// `dps/admin/retire/{registrationId}`: take one device out of service in one step.
    Retire { registration_id: String },
    /// `dps/admin/hub-outbox/{hostName}`: show a cloud hub's outbox, or retry it.
    HubOutbox { host_name: String },
    /// `dps/admin/explain/{registrationId}`: what a registration would do now, and why.
    Explain { registration_id: String },
    /// `dps/allocators/{name}/responses/{correlationId}`: an MQTT allocator's answer.
    AllocatorResponse {
        name: String,
        correlation_id: String,
    },
    /// Results and events: written by edgedps only.
    Output,
    /// Anything else under `dps/`.
    Unknown,
}

/// Classifies a topic under `dps/`; `None` for topics outside the operator plane.
pub fn parse_topic(topic: &str) -> Option<AdminTopic> {
    let rest = topic.strip_prefix(PREFIX)?;
    let (segment, id) = match rest.split_once('/') {
        Some(pair) => pair,
        None => return Some(AdminTopic::Unknown),
    };
    let kind = match segment {
        "enrollments" => RecordKind::Enrollment,
        "enrollment-groups" => RecordKind::EnrollmentGroup,
        "hubs" => RecordKind::Hub,
        "registrations" => RecordKind::Registration,
        "crls" => RecordKind::Crl,
        "allocators" => {
            let mut levels = id.split('/');
            return Some(
                match (levels.next(), levels.next(), levels.next(), levels.next()) {
                    (Some(name), Some("responses"), Some(cid), None)
                        if plain_id(name) && plain_id(cid) =>
                    {
                        AdminTopic::AllocatorResponse {
                            name: name.to_owned(),
                            correlation_id: cid.to_owned(),
                        }
                    }
                    (Some(_), Some("requests"), Some(_), None) => AdminTopic::Output,
                    _ => AdminTopic::Unknown,
                },
            );
        }
        "admin" => {
            if let Some(rid) = id.strip_prefix("explain/") {
                return Some(match plain_id(rid) {
                    true => AdminTopic::Explain {
                        registration_id: rid.to_owned(),
                    },
                    false => AdminTopic::Unknown,
                });
            }
            if let Some(host) = id.strip_prefix("hub-outbox/") {
                return Some(match plain_id(host) {
                    true => AdminTopic::HubOutbox {
                        host_name: host.to_owned(),
                    },
                    false => AdminTopic::Unknown,
                });
            }
            return Some(match id.strip_prefix("retire/") {
                Some(rid) if plain_id(rid) => AdminTopic::Retire {
                    registration_id: rid.to_owned(),
                },
                Some(_) => AdminTopic::Unknown,
                None => AdminTopic::Output,
            });
        }
        "events" => return Some(AdminTopic::Output),
        _ => return Some(AdminTopic::Unknown),
    };
    if !plain_id(id) {
        return Some(AdminTopic::Unknown);
    }
    Some(AdminTopic::Record {
        kind,
        id: id.to_owned(),
    })
}

/// One topic level, without wildcards.
fn plain_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#'])
}

/// Where the result of a write to `record_topic` goes: `dps/admin/results/{kind}/{id}`
/// for a record, `dps/admin/results/retire/{id}` for a retirement.
pub fn result_topic_of(record_topic: &str) -> Option<String> {
    match parse_topic(record_topic)? {
        AdminTopic::Record { kind, id } => Some(kind.result_topic(&id)),
        AdminTopic::Retire { registration_id } => Some(retire_result_topic(&registration_id)),
        AdminTopic::HubOutbox { host_name } => Some(crate::cloud::outbox_result_topic(&host_name)),
        AdminTopic::Explain { registration_id } => Some(explain_result_topic(&registration_id)),
        AdminTopic::AllocatorResponse { .. } | AdminTopic::Output | AdminTopic::Unknown => None,
    }
}

/// Where an operator asks what a registration would do: `dps/admin/explain/{registrationId}`.
pub fn explain_topic(registration_id: &str) -> String {
    format!("{PREFIX}admin/explain/{registration_id}")
}

/// Where the explanation goes: `dps/admin/results/explain/{registrationId}`.
pub fn explain_result_topic(registration_id: &str) -> String {
    format!("{PREFIX}admin/results/explain/{registration_id}")
}

/// Where edgedps asks MQTT allocator `name`: `dps/allocators/{name}/requests/{correlationId}`.
pub fn allocator_request_topic(name: &str, correlation_id: &str) -> String {
    format!("{PREFIX}allocators/{name}/requests/{correlation_id}")
}

/// Where MQTT allocator `name` answers: `dps/allocators/{name}/responses/{correlationId}`.
pub fn allocator_response_topic(name: &str, correlation_id: &str) -> String {
    format!("{PREFIX}allocators/{name}/responses/{correlation_id}")
}

/// Where an operator retires a device: `dps/admin/retire/{registrationId}`.
pub fn retire_topic(registration_id: &str) -> String {
    format!("{PREFIX}admin/retire/{registration_id}")
}

/// Where the result of a retirement goes: `dps/admin/results/retire/{registrationId}`.
pub fn retire_result_topic(registration_id: &str) -> String {
    format!("{PREFIX}admin/results/retire/{registration_id}")
}

/// Where the audit event of a retirement goes: `dps/events/admin/retire/{registrationId}`.
pub fn retire_event_topic(registration_id: &str) -> String {
    format!("{PREFIX}events/admin/retire/{registration_id}")
}

/// Where the audit event of each admin write goes: `dps/events/admin/{kind}/{id}`.
pub fn admin_event_topic(kind: RecordKind, id: &str) -> String {
    format!("{PREFIX}events/admin/{}/{id}", kind.segment())
}

/// What an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdminOperation {
    /// A retained record with a body.
    Write,
    /// An empty retained message.
    Delete,
    /// `dps/admin/retire/{registrationId}`.
    Retire,
}

/// What became of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdminOutcome {
    Created,
    Updated,
    Deleted,
    /// A device retired in one step.
    Retired,
    Rejected,
}

/// A write that takes a device, a group or a hub out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Retirement {
    /// An enrollment or group now `disabled` that was enabled or did not exist (a
    /// disabled individual enrollment is how one certificate of a group is blocked).
    Disabled,
    /// An enrollment or group deleted.
    Deleted,
    /// A registration record cleared.
    Deregistered,
    /// A linked hub removed.
    Unlinked,
    /// A device retired in one step (`dps/admin/retire/{id}`).
    Retired,
    /// Certificates revoked by a certificate revocation list.
    Revoked,
}

/// The body of `dps/admin/retire/{registrationId}`; an empty message is `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetireRequest {
    /// Why, for the audit trail.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// Longest retirement reason kept, in bytes.
pub const MAX_RETIRE_REASON: usize = 512;

/// What a write did to live sessions and registrations; counts a kind of write does not
/// have are left out of the JSON. Results and audit events carry it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Effects {
    /// Live sessions closed because the write took their device out of service.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sessions_closed: Option<u32>,
    /// Registration records marked `deregistered` (deletes and retirements).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub registrations_deregistered: Option<u32>,
    /// Retained `devices/{deviceId}/#` messages cleared (retirements).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retained_messages_purged: Option<u32>,
    /// Certificates a revocation list revokes, or, for a retirement, the certificates
    /// the gateway had issued to the device.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revoked_certificates: Option<u32>,
}

/// The audit event of one admin write, on [`admin_event_topic`]. It carries no record
/// body, so no key can travel in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminEvent {
    /// The operator's MQTT client id.
    pub operator: String,
    pub kind: String,
    pub id: String,
    pub operation: AdminOperation,
    pub outcome: AdminOutcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retirement: Option<Retirement>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// The operator's reason, for retirements.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub effects: Effects,
    pub timestamp_utc: String,
}

/// Outcome of one admin write, on `dps/admin/results/{kind}/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    #[serde(flatten)]
    pub effects: Effects,
}

/// Admin error codes (HTTP-style, as the DPS service API answers them).
pub mod codes {
    pub const BAD_REQUEST: u16 = 400;
    pub const FORBIDDEN: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const CONFLICT: u16 = 409;
    pub const PRECONDITION_FAILED: u16 = 412;
    pub const INTERNAL: u16 = 500;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    #[default]
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    Hashed,
    GeoLatency,
    Static,
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        ReprovisionPolicy {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// One certificate of an X.509 attestation: the PEM itself, or its SHA-256 thumbprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRef {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificatePair {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub primary: Option<CertificateRef>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secondary: Option<CertificateRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct X509Attestation {
    /// Individual enrollments: the device's own certificate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_certificates: Option<CertificatePair>,
    /// Enrollment groups: the root or intermediate CA that signs the devices.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signing_certificates: Option<CertificatePair>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SymmetricKeyAttestation {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub primary_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TpmAttestation {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub endorsement_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub storage_root_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    X509,
    SymmetricKey,
    Tpm,
}

/// `attestation` as Azure spells it: a `type` and the member of that name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attestation {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x509: Option<X509Attestation>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tpm: Option<TpmAttestation>,
}

/// The settings an individual enrollment and a group share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSettings {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub iot_hubs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Who decides under `allocationPolicy: custom` (PROTOCOL C).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Republished as IoT Hub writes twins (`crate::twin::ordered`): `$version` last.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        serialize_with = "crate::twin::ordered"
    )]
    pub initial_twin: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub capabilities: Option<Value>,
    #[serde(default)]
    pub provisioning_status: ProvisioningStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Devices may ask for a certificate at registration (PROTOCOL F).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_certificate_issuance_policy: Option<IssuancePolicy>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_updated_date_time_utc: Option<String>,
}

/// `customAllocationDefinition`: a webhook (Azure's) or an MQTT allocator, exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomAllocationDefinition {
    /// HTTPS (or HTTP to a loopback address): edgedps POSTs Azure's allocation request.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub webhook_url: Option<String>,
    /// Sent as `api-version` on the webhook's query string, as Azure does.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub api_version: Option<String>,
    /// An operator-role MQTT client answering on `dps/allocators/{name}/...`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mqtt_allocator: Option<String>,
}

/// `limits` of an enrollment group: how many devices, how fast, which ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupLimits {
    /// Distinct devices the group may hold registered at once.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_devices: Option<u32>,
    /// Registrations through the group per minute (every device together).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub registrations_per_minute: Option<u32>,
    /// A regular expression the whole registration id must match.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub registration_id_pattern: Option<String>,
}

/// `clientCertificateIssuancePolicy`: which certificate authority of the configuration
/// signs the certificates this enrollment's devices ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuancePolicy {
    pub certificate_authority_name: String,
}

/// `dps/enrollments/{registrationId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Enrollment {
    pub registration_id: RegistrationId,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_id: Option<String>,
    pub attestation: Attestation,
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

/// `dps/enrollment-groups/{groupId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollmentGroup {
    pub enrollment_group_id: String,
    pub attestation: Attestation,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub limits: Option<GroupLimits>,
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

/// `dps/hubs/{hostName}`: a hub devices can be assigned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkedHub {
    #[serde(default)]
    pub host_name: String,
    #[serde(default = "LinkedHub::default_allocation_weight")]
    pub allocation_weight: u32,
    #[serde(default = "LinkedHub::default_apply_allocation_policy")]
    pub apply_allocation_policy: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub location: Option<String>,
    /// The hub is this gateway (PROTOCOL E): devices assigned to it connect to edgedps's
    /// own device listener as IoT Hub devices.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub local: bool,
    /// Where the hub's service API is dialled, when not `{hostName}:443` (a proxy, a
    /// test hub). The TLS name and the tokens' `sr` stay `hostName`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub service_address: Option<String>,
    /// Where geoLatency measures the hub, when not `{hostName}:8883`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub probe_address: Option<String>,
    /// Written by edgedps: the latest latency measured to the hub (`probeAddress`).
    /// What an operator writes here is ignored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latency: Option<HubLatency>,
    /// How devices assigned here are registered at the hub.
    #[serde(skip_serializing_if = "is_default", default)]
    pub registration: crate::cloud::HubRegistrationMode,
    /// Written by operators, never read back: the hub's connection string. edgedps keeps
    /// it apart from the record; an empty string removes it.
    #[serde(skip_serializing, default)]
    pub connection_string: Option<String>,
    /// Written by edgedps: the hub has a connection string (its policy's name).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credentials: Option<crate::cloud::CredentialsShown>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
}

/// The connect latency edgedps measured to a hub: TCP connect plus the TLS ServerHello,
/// the median of a round of samples, smoothed over rounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubLatency {
    /// Whether the last round reached the hub at all.
    pub reachable: bool,
    /// The smoothed latency, in microseconds; absent while the hub has never answered.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub microseconds: Option<u64>,
    /// Where it was measured.
    pub probe_address: String,
    /// Why the last round failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub measured_at_utc: String,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl LinkedHub {
    /// A hub named `host_name` with every setting as by default.
    pub fn named(host_name: &str) -> LinkedHub {
        LinkedHub {
            host_name: host_name.to_owned(),
            allocation_weight: LinkedHub::default_allocation_weight(),
            apply_allocation_policy: LinkedHub::default_apply_allocation_policy(),
            location: None,
            local: false,
            service_address: None,
            probe_address: None,
            latency: None,
            registration: Default::default(),
            connection_string: None,
            credentials: None,
            etag: None,
        }
    }

    /// DPS: a hub takes part in allocation with weight 1 unless it says otherwise.
    pub fn default_allocation_weight() -> u32 {
        1
    }

    pub fn default_apply_allocation_policy() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_select_the_records_mqtt_matching_would() {
        use RecordKind::*;
        let one = |id: &str| Some(Selection::One(id.into()));
        let cases: &[(&str, RecordKind, Option<Selection>)] = &[
            ("#", Registration, Some(Selection::All)),
            ("dps/#", Crl, Some(Selection::All)),
            ("+/#", Hub, Some(Selection::All)),
            ("dps/registrations/#", Registration, Some(Selection::All)),
            ("dps/registrations/#", Enrollment, None),
            ("dps/+/+", EnrollmentGroup, Some(Selection::All)),
            ("+/+/dev-1", Enrollment, one("dev-1")),
            ("dps/enrollments/dev-1", Enrollment, one("dev-1")),
            ("dps/enrollments/dev-1/#", Enrollment, one("dev-1")),
            ("dps/enrollments/+/#", Enrollment, Some(Selection::All)),
            ("dps/enrollments/dev-1/+", Enrollment, None),
            ("dps/enrollments/dev-1/x", Enrollment, None),
            ("dps/enrollments/dev-1/#/x", Enrollment, None),
            ("dps/enrollments", Enrollment, None),
            ("dps/enrollments/", Enrollment, one("")),
            ("dps", Enrollment, None),
            ("+", Enrollment, None),
            ("dps/+", Enrollment, None),
            ("other/enrollments/#", Enrollment, None),
            ("dps/events/#", Registration, None),
            ("dps/admin/#", Hub, None),
        ];
        for (filter, kind, selection) in cases {
            assert_eq!(
                &kind.selected_by(filter),
                selection,
                "{filter} for {kind:?}"
            );
        }
        assert!(is_record_topic("dps/crls/root"));
        assert!(!is_record_topic("dps/events/registrations/dev-1"));
        assert!(!is_record_topic("dps/admin/retire/dev-1"));
    }

    #[test]
    fn record_topics_parse() {
        assert_eq!(
            parse_topic("dps/enrollments/dev-1"),
            Some(AdminTopic::Record {
                kind: RecordKind::Enrollment,
                id: "dev-1".into()
            })
        );
        assert_eq!(
            parse_topic("dps/hubs/hub-a.example.net"),
            Some(AdminTopic::Record {
                kind: RecordKind::Hub,
                id: "hub-a.example.net".into()
            })
        );
        assert_eq!(
            parse_topic("dps/admin/results/hubs/x"),
            Some(AdminTopic::Output)
        );
        assert_eq!(
            parse_topic("dps/enrollments/a/b"),
            Some(AdminTopic::Unknown)
        );
        assert_eq!(parse_topic("dps/enrollments/"), Some(AdminTopic::Unknown));
        assert_eq!(parse_topic("dps/other/x"), Some(AdminTopic::Unknown));
        assert_eq!(parse_topic("devices/x"), None);
        assert_eq!(
            parse_topic("dps/crls/root-2026"),
            Some(AdminTopic::Record {
                kind: RecordKind::Crl,
                id: "root-2026".into()
            })
        );
    }

    #[test]
    fn retire_topics_parse_and_outputs_stay_outputs() {
        assert_eq!(
            parse_topic("dps/admin/hub-outbox/hub-a.example.net"),
            Some(AdminTopic::HubOutbox {
                host_name: "hub-a.example.net".into()
            })
        );
        assert_eq!(
            parse_topic("dps/admin/hub-outbox/a/b"),
            Some(AdminTopic::Unknown)
        );
        assert_eq!(
            result_topic_of("dps/admin/hub-outbox/hub-a").as_deref(),
            Some("dps/admin/results/hub-outbox/hub-a")
        );
        assert_eq!(
            parse_topic("dps/admin/retire/dev-1"),
            Some(AdminTopic::Retire {
                registration_id: "dev-1".into()
            })
        );
        for topic in [
            "dps/admin/retire/",
            "dps/admin/retire/a/b",
            "dps/admin/retire/+",
        ] {
            assert_eq!(parse_topic(topic), Some(AdminTopic::Unknown), "{topic}");
        }
        assert_eq!(
            parse_topic("dps/admin/results/retire/dev-1"),
            Some(AdminTopic::Output)
        );
        assert_eq!(
            retire_result_topic("dev-1"),
            "dps/admin/results/retire/dev-1"
        );
        assert_eq!(
            result_topic_of("dps/enrollment-groups/g1").as_deref(),
            Some("dps/admin/results/enrollment-groups/g1")
        );
        assert_eq!(
            result_topic_of("dps/admin/retire/dev-1").as_deref(),
            Some("dps/admin/results/retire/dev-1")
        );
        assert_eq!(result_topic_of("dps/events/x"), None);
        assert_eq!(
            parse_topic("dps/admin/explain/dev-1"),
            Some(AdminTopic::Explain {
                registration_id: "dev-1".into()
            })
        );
        assert_eq!(
            result_topic_of("dps/admin/explain/dev-1").as_deref(),
            Some("dps/admin/results/explain/dev-1")
        );
        assert_eq!(
            parse_topic("dps/admin/explain/a/b"),
            Some(AdminTopic::Unknown)
        );
        assert_eq!(
            parse_topic(&allocator_response_topic("plant-7", "c1")),
            Some(AdminTopic::AllocatorResponse {
                name: "plant-7".into(),
                correlation_id: "c1".into()
            })
        );
        // Requests are edgedps's to publish; anything else under allocators is unknown.
        assert_eq!(
            parse_topic(&allocator_request_topic("plant-7", "c1")),
            Some(AdminTopic::Output)
        );
        for topic in [
            "dps/allocators/plant-7",
            "dps/allocators/plant-7/responses",
            "dps/allocators/plant-7/responses/c1/x",
            "dps/allocators/+/responses/c1",
            "dps/allocators/plant-7/other/c1",
        ] {
            assert_eq!(parse_topic(topic), Some(AdminTopic::Unknown), "{topic}");
        }
        assert_eq!(
            crate::events::acl_event_topic("dev-1"),
            "dps/events/acl/dev-1"
        );
        assert_eq!(
            crate::events::acl_event_topic("a/#"),
            "dps/events/acl/_invalid"
        );
    }

    #[test]
    fn enrollment_in_azure_shape_round_trips() {
        let body = serde_json::json!({
            "registrationId": "dev-1",
            "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": "a2V5", "secondaryKey": "a2V5"}},
            "iotHubs": ["hub-a.example.net"],
            "allocationPolicy": "static",
            "provisioningStatus": "disabled",
            "initialTwin": {"tags": {"floor": 1}}
        });
        let e: Enrollment = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(e.settings.provisioning_status, ProvisioningStatus::Disabled);
        assert_eq!(e.settings.allocation_policy, Some(AllocationPolicy::Static));
        assert_eq!(serde_json::to_value(&e).unwrap(), body);
    }

    #[test]
    fn unknown_enrollment_fields_are_refused_by_name() {
        let err = serde_json::from_value::<Enrollment>(serde_json::json!({
            "registrationId": "dev-1",
            "attestation": {"type": "symmetricKey"},
            "provisioningstatus": "disabled"
        }))
        .unwrap_err();
        assert!(err.to_string().contains("provisioningstatus"), "{err}");
    }
}
