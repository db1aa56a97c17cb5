//! Who may use the hub (PROTOCOL B, "Retirement"): one rule for every device session,
//! decided from plain facts. The broker calls it at CONNECT and after every admin write
//! that touches a live session; the responder calls it before it assigns a device and
//! when it answers a register.
//!
//! A session has hub rights (`devices/{deviceId}/#`) only while all of these hold:
//! - its registration is `assigned`;
//! - the enrollment that attested it still exists and is enabled: its individual
//!   enrollment, or the group its key or certificate chain belongs to;
//! - no disabled individual enrollment blocks the device (DPS: a disabled individual
//!   enrollment is how one device, or one certificate, of a group is blocked);
//! - no certificate of its chain is revoked.
//!
//! Whatever the verdict, the session keeps the provisioning topics, so that a device
//! taken out of service can still connect and learn why.

use edgedps_topics::admin::ProvisioningStatus;

/// Which enrollment accepted the session's credential at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestedBy<'a> {
    Individual,
    Group(&'a str),
}

/// The state the rule reads, as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts<'a> {
    pub attested_by: AttestedBy<'a>,
    /// The individual enrollment of the registration id, if there is one.
    pub individual: Option<ProvisioningStatus>,
    /// The attesting group, if it still exists (not read for individual devices).
    pub group: Option<ProvisioningStatus>,
    /// The device id of the registration record, when the record says `assigned`.
    pub assigned_device_id: Option<&'a str>,
    /// A certificate of the session's chain is on a revocation list.
    pub revoked: bool,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// In service and assigned: the provisioning topics and `devices/{device_id}/#`.
    Hub { device_id: String },
    /// In service but not assigned (never registered, or deregistered): the provisioning
    /// topics only; a register assigns it.
    Unassigned,
    /// Out of service: the provisioning topics only.
    OutOfService(OutOfService),
}

/// Why a device is out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfService {
    /// Its individual enrollment is disabled.
    EnrollmentDisabled,
    /// Its individual enrollment was deleted.
    EnrollmentDeleted,
    /// Its enrollment group is disabled.
    GroupDisabled,
    /// Its enrollment group was deleted.
    GroupDeleted,
    /// A disabled individual enrollment blocks this device of a group.
    Blocked,
    /// An individual enrollment now decides for this device, which connected through
    /// its group: it must connect again to be attested by that enrollment.
    Superseded,
    /// A certificate of its chain is revoked.
    Revoked,
}

/// How a register is answered for a device out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAnswer {
    /// `200` with `status: disabled` (DPS).
    Disabled,
    /// `404` with 404201: no enrollment for this device any more.
    NotFound,
    /// `401` with 401002: the credential the session holds is no longer accepted.
    Unauthorized,
}

impl OutOfService {
    pub fn register_answer(self) -> RegisterAnswer {
        match self {
            OutOfService::EnrollmentDisabled
            | OutOfService::GroupDisabled
            | OutOfService::Blocked => RegisterAnswer::Disabled,
            OutOfService::EnrollmentDeleted | OutOfService::GroupDeleted => {
                RegisterAnswer::NotFound
            }
            OutOfService::Superseded | OutOfService::Revoked => RegisterAnswer::Unauthorized,
        }
    }

    /// For logs, events and error messages.
    pub fn reason(self) -> &'static str {
        match self {
            OutOfService::EnrollmentDisabled => "the individual enrollment is disabled",
            OutOfService::EnrollmentDeleted => "the individual enrollment was deleted",
            OutOfService::GroupDisabled => "the enrollment group is disabled",
            OutOfService::GroupDeleted => "the enrollment group was deleted",
            OutOfService::Blocked => "a disabled individual enrollment blocks this device",
            OutOfService::Superseded => {
                "an individual enrollment now decides for this device; connect again"
            }
            OutOfService::Revoked => "a certificate of the chain is revoked",
        }
    }
}

/// The rule. Pure: the same facts always give the same verdict.
pub fn decide(facts: &Facts<'_>) -> Access {
    if let Err(reason) = in_service(facts) {
        return Access::OutOfService(reason);
    }
    match facts.assigned_device_id {
        Some(device_id) => Access::Hub {
            device_id: device_id.to_owned(),
        },
        None => Access::Unassigned,
    }
}

fn in_service(facts: &Facts<'_>) -> Result<(), OutOfService> {
    use ProvisioningStatus::{Disabled, Enabled};
    if facts.revoked {
        return Err(OutOfService::Revoked);
    }
    match (facts.attested_by, facts.individual) {
        (AttestedBy::Individual, None) => Err(OutOfService::EnrollmentDeleted),
        (AttestedBy::Individual, Some(Disabled)) => Err(OutOfService::EnrollmentDisabled),
        (AttestedBy::Individual, Some(Enabled)) => Ok(()),
        // DPS: an individual enrollment wins over any group.
        (AttestedBy::Group(_), Some(Disabled)) => Err(OutOfService::Blocked),
        (AttestedBy::Group(_), Some(Enabled)) => Err(OutOfService::Superseded),
        (AttestedBy::Group(_), None) => match facts.group {
            None => Err(OutOfService::GroupDeleted),
            Some(Disabled) => Err(OutOfService::GroupDisabled),
            Some(Enabled) => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProvisioningStatus::{Disabled, Enabled};

    fn group_device() -> Facts<'static> {
        Facts {
            attested_by: AttestedBy::Group("fleet"),
            individual: None,
            group: Some(Enabled),
            assigned_device_id: Some("dev-1"),
            revoked: false,
        }
    }

    fn individual_device() -> Facts<'static> {
        Facts {
            attested_by: AttestedBy::Individual,
            individual: Some(Enabled),
            group: None,
            assigned_device_id: Some("dev-1"),
            revoked: false,
        }
    }

    fn hub() -> Access {
        Access::Hub {
            device_id: "dev-1".into(),
        }
    }

    #[test]
    fn assigned_device_of_an_enabled_enrollment_has_hub_rights() {
        assert_eq!(decide(&individual_device()), hub());
        assert_eq!(decide(&group_device()), hub());
    }

    #[test]
    fn unassigned_device_in_service_has_provisioning_only() {
        for facts in [individual_device(), group_device()] {
            let facts = Facts {
                assigned_device_id: None,
                ..facts
            };
            assert_eq!(decide(&facts), Access::Unassigned);
        }
    }

    #[test]
    fn disabled_or_deleted_individual_enrollment_takes_the_device_out() {
        let cases = [
            (Some(Disabled), OutOfService::EnrollmentDisabled),
            (None, OutOfService::EnrollmentDeleted),
        ];
        for (individual, reason) in cases {
            let facts = Facts {
                individual,
                ..individual_device()
            };
            assert_eq!(decide(&facts), Access::OutOfService(reason));
            // An assignment does not outweigh it, nor does the lack of one.
            let facts = Facts {
                assigned_device_id: None,
                ..facts
            };
            assert_eq!(decide(&facts), Access::OutOfService(reason));
        }
    }

    #[test]
    fn disabled_or_deleted_group_takes_its_devices_out() {
        let cases = [
            (Some(Disabled), OutOfService::GroupDisabled),
            (None, OutOfService::GroupDeleted),
        ];
        for (group, reason) in cases {
            let facts = Facts {
                group,
                ..group_device()
            };
            assert_eq!(decide(&facts), Access::OutOfService(reason));
        }
    }

    #[test]
    fn an_individual_enrollment_blocks_or_supersedes_a_group_device() {
        let blocked = Facts {
            individual: Some(Disabled),
            ..group_device()
        };
        assert_eq!(
            decide(&blocked),
            Access::OutOfService(OutOfService::Blocked)
        );
        let superseded = Facts {
            individual: Some(Enabled),
            ..group_device()
        };
        assert_eq!(
            decide(&superseded),
            Access::OutOfService(OutOfService::Superseded)
        );
        // The group's status does not matter once an individual enrollment decides.
        let blocked_in_a_disabled_group = Facts {
            group: Some(Disabled),
            ..blocked
        };
        assert_eq!(
            decide(&blocked_in_a_disabled_group),
            Access::OutOfService(OutOfService::Blocked)
        );
    }

    #[test]
    fn the_group_status_is_not_read_for_individual_devices() {
        let facts = Facts {
            group: Some(Disabled),
            ..individual_device()
        };
        assert_eq!(decide(&facts), hub());
    }

    #[test]
    fn a_revoked_certificate_outweighs_everything() {
        for facts in [individual_device(), group_device()] {
            let facts = Facts {
                revoked: true,
                ..facts
            };
            assert_eq!(decide(&facts), Access::OutOfService(OutOfService::Revoked));
        }
    }

    #[test]
    fn registers_are_answered_by_the_reason() {
        use OutOfService::*;
        for (reason, answer) in [
            (EnrollmentDisabled, RegisterAnswer::Disabled),
            (GroupDisabled, RegisterAnswer::Disabled),
            (Blocked, RegisterAnswer::Disabled),
            (EnrollmentDeleted, RegisterAnswer::NotFound),
            (GroupDeleted, RegisterAnswer::NotFound),
            (Superseded, RegisterAnswer::Unauthorized),
            (Revoked, RegisterAnswer::Unauthorized),
        ] {
            assert_eq!(reason.register_answer(), answer, "{reason:?}");
            assert!(!reason.reason().is_empty());
        }
    }
}
