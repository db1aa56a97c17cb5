//! Enrollment group limits (PROTOCOL B, `limits`): how many distinct devices a group
//! holds (`maxDevices`) and how fast it registers them (`registrationsPerMinute`). The
//! id pattern is checked with attestation (`GroupCredentials::admits_id`).
//!
//! A group's members are the devices whose record is assigned through it. They are
//! read from the store the first time a limited group is asked about, then kept: a new
//! device is added when it is admitted (before its registration completes, so two
//! devices at once cannot both take the last place). Devices that leave (deregistered,
//! moved, failed) are only noticed by reading the store again, which happens when the
//! group looks full, at most once a second: a place freed is usable within a second.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgedps_topics::admin::GroupLimits;
use edgedps_topics::identity::RegistrationId;

use crate::throttle::{whole_seconds, Bucket};
use crate::{lock, Error, Responder};

/// How often a full group's members may be read again from the store.
const RESCAN: Duration = Duration::from_secs(1);

/// Why a group did not admit a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupRefusal {
    #[error("enrollment group `{group}` holds its limit of {max} devices (limits.maxDevices)")]
    Full { group: String, max: u32 },
    #[error("{0}")]
    IdPattern(String),
}

#[derive(Default)]
pub(crate) struct GroupGates {
    gates: Mutex<HashMap<String, Gate>>,
}

struct Gate {
    /// The limits the gate was made for: a write that changes them starts a new gate.
    limits: GroupLimits,
    members: Option<HashSet<RegistrationId>>,
    scanned: Option<Instant>,
    rate: Option<Bucket>,
}

impl Gate {
    fn new(limits: &GroupLimits, now: Instant) -> Gate {
        Gate {
            limits: limits.clone(),
            members: None,
            scanned: None,
            rate: limits.registrations_per_minute.map(|per_minute| {
                let per_minute = f64::from(per_minute);
                Bucket::new(per_minute, per_minute / 60.0, now)
            }),
        }
    }
}

impl GroupGates {
    /// Forgets a group's gate (the group was written or deleted).
    pub(crate) fn forget(&self, group: &str) {
        lock(&self.gates).remove(group);
    }
}

impl Responder {
    /// Admits a registration of `registration_id` through `group` under its `limits`:
    /// its rate first, then its size. `member` says the device's record is already
    /// assigned through this group: a device re-registering never counts twice.
    pub(crate) fn admit_to_group(
        &self,
        group: &str,
        limits: &GroupLimits,
        registration_id: &RegistrationId,
        member: bool,
    ) -> Result<(), Error> {
        if limits.max_devices.is_none() && limits.registrations_per_minute.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let mut gates = lock(&self.group_gates.gates);
        let gate = gates
            .entry(group.to_owned())
            .or_insert_with(|| Gate::new(limits, now));
        if gate.limits != *limits {
            *gate = Gate::new(limits, now);
        }
        if let Some(bucket) = gate.rate.as_mut() {
            bucket.admit(now).map_err(|wait| Error::Throttled {
                what: "the enrollment group's registration rate (limits.registrationsPerMinute)",
                retry_after: whole_seconds(wait),
            })?;
        }
        let Some(max) = limits.max_devices else {
            return Ok(());
        };
        let max_members = usize::try_from(max).unwrap_or(usize::MAX);
        if gate.members.is_none() {
            gate.members = Some(self.group_members(group)?);
            gate.scanned = Some(now);
        }
        let fits = |members: &HashSet<RegistrationId>| {
            member || members.contains(registration_id) || members.len() < max_members
        };
        let members = gate.members.get_or_insert_with(HashSet::new);
        if !fits(members) {
            let stale = !matches!(gate.scanned, Some(at) if now.duration_since(at) < RESCAN);
            if stale {
                *members = self.group_members(group)?;
                gate.scanned = Some(now);
            }
        }
        if fits(members) {
            members.insert(registration_id.clone());
            return Ok(());
        }
        Err(Error::Group(GroupRefusal::Full {
            group: group.to_owned(),
            max,
        }))
    }

    /// The devices assigned through `group`, as the store has them.
    pub(crate) fn group_members(&self, group: &str) -> Result<HashSet<RegistrationId>, Error> {
        let mut members = HashSet::new();
        for record in self.store.scan_registrations(None) {
            let record = record?;
            if record.is_assigned() && record.enrollment_group_id() == Some(group) {
                members.insert(record.registration_id);
            }
        }
        Ok(members)
    }
}
