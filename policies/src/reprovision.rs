//! Re-provisioning (PROTOCOL A6): what a register makes of the device's record.
//!
//! Evaluated on every register of a device already assigned, by the enrollment's
//! `reprovisionPolicy`:
//! - `{updateHubAssignment: true, migrateDeviceData: true}` (default): the hub is
//!   allocated again; the device's data (its twin) moves with it: substatus
//!   `deviceDataMigrated` when the hub changed.
//! - `{true, false}`: the hub is allocated again and the twin reset to the enrollment's
//!   initial twin: substatus `deviceDataReset` when the hub or the twin changed.
//! - `{false, _}`: the hub and the twin stay.
//!
//! Nothing changed: the same record and etag (DPS: re-registering with no change
//! returns the same assignment).

use serde_json::{json, Value};

use edgedps_topics::admin::{AttestationType, ReprovisionPolicy};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{
    AttestationSource, CertificateInfo, RegistrationState, RegistrationStatus, Substatus,
};

use crate::allocation::AllocationError;

/// What a register asks for: the device, the enrollment it follows now, and the time.
pub struct Registering<'a> {
    pub registration_id: &'a RegistrationId,
    pub device_id: &'a str,
    pub enrollment_group_id: Option<&'a str>,
    pub attestation: AttestationType,
    /// X.509: the leaf the device registered with.
    pub certificate_info: Option<CertificateInfo>,
    pub policy: ReprovisionPolicy,
    pub initial_twin: Option<&'a Value>,
    /// DPS timestamp of now.
    pub now: &'a str,
}

/// The record after the register.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// Nothing changed: the stored record stands, etag and all.
    Unchanged(RegistrationState),
    /// A new or changed record to make durable, without its etag yet.
    Changed(RegistrationState),
}

impl Assignment {
    pub fn record(&self) -> &RegistrationState {
        match self {
            Assignment::Unchanged(record) | Assignment::Changed(record) => record,
        }
    }
}

/// Whether a register under `policy` allocates a hub (asks [`reprovision`]'s
/// `allocate`): always, unless the device is assigned and its policy keeps its hub.
pub fn allocates(existing: Option<&RegistrationState>, policy: ReprovisionPolicy) -> bool {
    match existing.filter(|r| r.is_assigned()) {
        Some(old) => policy.update_hub_assignment || old.assigned_hub.is_none(),
        None => true,
    }
}

/// The record a register leads to, from the stored one (`existing`, any status).
/// `allocate` picks a hub under the enrollment's allocation policy; it is called only
/// when the policy moves the device.
pub fn reprovision(
    existing: Option<&RegistrationState>,
    registering: Registering<'_>,
    allocate: impl FnOnce() -> Result<String, AllocationError>,
) -> Result<Assignment, AllocationError> {
    let existing = existing.filter(|r| r.is_assigned());
    let policy = registering.policy;
    let (hub, kept_twin) = match existing {
        // The hub and the device's data stay where they are.
        Some(old) if !policy.update_hub_assignment => {
            let hub = match &old.assigned_hub {
                Some(hub) => hub.clone(),
                None => allocate()?,
            };
            (hub, old.initial_twin.clone())
        }
        Some(old) => {
            let hub = allocate()?;
            let data = old.initial_twin.clone();
            (hub, data.filter(|_| policy.migrate_device_data))
        }
        None => (allocate()?, None),
    };
    let twin = kept_twin.unwrap_or_else(|| {
        registering
            .initial_twin
            .cloned()
            .unwrap_or_else(|| json!({"tags": {}, "properties": {"desired": {}}}))
    });
    let source = Some(AttestationSource {
        enrollment_group_id: registering.enrollment_group_id.map(str::to_owned),
        certificate_info: registering.certificate_info,
    });
    // A TPM device's answer carries `tpm` (its hub key) instead, added by the caller.
    let (x509, symmetric_key) = match registering.attestation {
        AttestationType::X509 => (source, None),
        AttestationType::SymmetricKey => (None, source),
        AttestationType::Tpm => (None, None),
    };
    let mut state = RegistrationState::new(
        registering.registration_id.clone(),
        RegistrationStatus::Assigned,
    );
    state.created_date_time_utc = Some(registering.now.to_owned());
    state.assigned_hub = Some(hub);
    state.device_id = Some(registering.device_id.to_owned());
    state.substatus = Some(Substatus::InitialAssignment);
    state.last_updated_date_time_utc = Some(registering.now.to_owned());
    state.x509 = x509;
    state.symmetric_key = symmetric_key;
    state.initial_twin = Some(twin.clone());
    state.payload = Some(twin);
    let Some(old) = existing else {
        return Ok(Assignment::Changed(state));
    };
    let unchanged = old.assigned_hub == state.assigned_hub
        && old.device_id == state.device_id
        && old.initial_twin == state.initial_twin
        && old.x509 == state.x509
        && old.symmetric_key == state.symmetric_key;
    if unchanged {
        return Ok(Assignment::Unchanged(old.clone()));
    }
    state.created_date_time_utc = old.created_date_time_utc.clone();
    state.substatus = Some(substatus(old, &state, policy.migrate_device_data));
    Ok(Assignment::Changed(state))
}

/// The substatus of a re-registration that changed something.
fn substatus(old: &RegistrationState, new: &RegistrationState, migrate: bool) -> Substatus {
    if old.assigned_hub != new.assigned_hub {
        if migrate {
            Substatus::DeviceDataMigrated
        } else {
            Substatus::DeviceDataReset
        }
    } else if !migrate && old.initial_twin != new.initial_twin {
        Substatus::DeviceDataReset
    } else {
        old.substatus.unwrap_or(Substatus::InitialAssignment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registering<'a>(
        id: &'a RegistrationId,
        policy: ReprovisionPolicy,
        twin: Option<&'a Value>,
    ) -> Registering<'a> {
        Registering {
            registration_id: id,
            device_id: "dev-1",
            enrollment_group_id: None,
            attestation: AttestationType::SymmetricKey,
            certificate_info: None,
            policy,
            initial_twin: twin,
            now: "2026-12-01T00:00:00.0000000Z",
        }
    }

    fn policy(update_hub_assignment: bool, migrate_device_data: bool) -> ReprovisionPolicy {
        ReprovisionPolicy {
            update_hub_assignment,
            migrate_device_data,
        }
    }

    fn assigned(hub: &str, twin: Value) -> RegistrationState {
        let id = RegistrationId::from("dev-1");
        let first = reprovision(
            None,
            registering(&id, policy(true, true), Some(&twin)),
            || Ok(hub.to_owned()),
        )
        .unwrap();
        let Assignment::Changed(mut record) = first else {
            panic!("a first registration is a change")
        };
        record.etag = Some("\"first\"".into());
        record
    }

    #[test]
    fn a_first_registration_is_an_initial_assignment_with_the_enrollment_twin() {
        let twin = json!({"tags": {"floor": 1}});
        let record = assigned("hub-a", twin.clone());
        assert_eq!(record.status, RegistrationStatus::Assigned);
        assert_eq!(record.substatus, Some(Substatus::InitialAssignment));
        assert_eq!(record.assigned_hub.as_deref(), Some("hub-a"));
        assert_eq!(record.initial_twin, Some(twin.clone()));
        assert_eq!(record.payload, Some(twin));
        assert!(record.symmetric_key.is_some() && record.x509.is_none());
    }

    #[test]
    fn the_same_answer_again_keeps_the_record_and_its_etag() {
        let twin = json!({"tags": {}});
        let old = assigned("hub-a", twin.clone());
        let id = RegistrationId::from("dev-1");
        let again = reprovision(
            Some(&old),
            registering(&id, policy(true, true), Some(&twin)),
            || Ok("hub-a".into()),
        )
        .unwrap();
        assert_eq!(again, Assignment::Unchanged(old));
    }

    #[test]
    fn migrate_moves_the_old_twin_to_the_new_hub() {
        let old = assigned("hub-a", json!({"tags": {"old": true}}));
        let id = RegistrationId::from("dev-1");
        let new_twin = json!({"tags": {"new": true}});
        let Assignment::Changed(record) = reprovision(
            Some(&old),
            registering(&id, policy(true, true), Some(&new_twin)),
            || Ok("hub-b".into()),
        )
        .unwrap() else {
            panic!("the hub changed")
        };
        assert_eq!(record.substatus, Some(Substatus::DeviceDataMigrated));
        assert_eq!(record.initial_twin, old.initial_twin);
        assert_eq!(record.created_date_time_utc, old.created_date_time_utc);
    }

    #[test]
    fn reset_takes_the_enrollment_twin_even_on_the_same_hub() {
        let old = assigned("hub-a", json!({"tags": {"old": true}}));
        let id = RegistrationId::from("dev-1");
        let new_twin = json!({"tags": {"new": true}});
        let Assignment::Changed(record) = reprovision(
            Some(&old),
            registering(&id, policy(true, false), Some(&new_twin)),
            || Ok("hub-a".into()),
        )
        .unwrap() else {
            panic!("the twin changed")
        };
        assert_eq!(record.substatus, Some(Substatus::DeviceDataReset));
        assert_eq!(record.initial_twin, Some(new_twin));
    }

    #[test]
    fn never_keeps_hub_and_twin_without_allocating() {
        let old = assigned("hub-a", json!({"tags": {"old": true}}));
        let id = RegistrationId::from("dev-1");
        let new_twin = json!({"tags": {"new": true}});
        let kept = reprovision(
            Some(&old),
            registering(&id, policy(false, false), Some(&new_twin)),
            || panic!("a device that stays is not allocated"),
        )
        .unwrap();
        assert_eq!(kept, Assignment::Unchanged(old));
    }

    #[test]
    fn an_allocation_failure_is_the_answer() {
        let id = RegistrationId::from("dev-1");
        let failed = reprovision(None, registering(&id, policy(true, true), None), || {
            Err(AllocationError::NoHub)
        });
        assert_eq!(failed, Err(AllocationError::NoHub));
    }
}
