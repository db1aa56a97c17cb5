//! A device's standing: what the access rule (`edgedps_policies::access`) reads about
//! it, read once and carried.
//!
//! The CONNECT reads the device's individual enrollment to attest it; the same read
//! serves its standing, and the session carries that standing to its register. One
//! registration reads the enrollment once. What was read is used again only while no
//! operator write has been applied since (`Responder::writes`); otherwise it is read
//! again. The registration record is read afresh each time: registers write it.

use std::sync::atomic::Ordering;

use edgedps_policies::access::{self, Access, AttestedBy, Facts};
use edgedps_policies::attestation::{self as attestation, Attested, EnrollmentSource};
use edgedps_topics::admin::{Enrollment, ProvisioningStatus};
use edgedps_topics::registration::RegistrationState;

use crate::{read, Error, Responder};

/// What the access rule reads about one device.
#[derive(Debug, Clone)]
pub struct Standing {
    pub(crate) individual: Option<Enrollment>,
    /// The status of the attesting group, if the device came through one and it still
    /// exists.
    pub(crate) group: Option<ProvisioningStatus>,
    pub(crate) registration: Option<RegistrationState>,
    pub(crate) revoked: bool,
    /// `Responder::writes` when the enrollment part was read.
    pub(crate) generation: u64,
}

/// The enrollment part of a standing, read before the device was attested.
pub(crate) struct EnrollmentRead {
    pub individual: Option<Enrollment>,
    pub generation: u64,
}

impl Standing {
    pub fn access(&self, device: &Attested) -> Access {
        access::decide(&self.facts(device))
    }

    pub(crate) fn facts<'a>(&'a self, device: &'a Attested) -> Facts<'a> {
        Facts {
            attested_by: match &device.source {
                EnrollmentSource::Individual => AttestedBy::Individual,
                EnrollmentSource::Group(group) => AttestedBy::Group(group),
            },
            individual: self
                .individual
                .as_ref()
                .map(|e| e.settings.provisioning_status),
            group: self.group,
            assigned_device_id: self
                .registration
                .as_ref()
                .filter(|r| r.is_assigned())
                .and_then(|r| r.device_id.as_deref()),
            revoked: self.revoked,
        }
    }
}

impl Responder {
    /// Reads `device`'s individual enrollment, noting when.
    pub(crate) fn read_enrollment(
        &self,
        id: &edgedps_topics::identity::RegistrationId,
    ) -> Result<EnrollmentRead, Error> {
        // Noted before the read: a write applied after it moves the count.
        let generation = self.writes.load(Ordering::SeqCst);
        Ok(EnrollmentRead {
            individual: self.store.enrollment(id)?,
            generation,
        })
    }

    /// The standing of `device` now, using what `carried` read while no operator write
    /// has been applied since.
    pub(crate) fn standing(
        &self,
        device: &Attested,
        carried: Option<Standing>,
    ) -> Result<Standing, Error> {
        let registration = self.store.registration(&device.registration_id)?;
        let now = self.writes.load(Ordering::SeqCst);
        if let Some(mut standing) = carried.filter(|s| s.generation == now) {
            standing.registration = registration;
            return Ok(standing);
        }
        let enrollment = self.read_enrollment(&device.registration_id)?;
        Ok(self.standing_from(device, enrollment, registration))
    }

    /// A standing from an enrollment read and the registration record.
    pub(crate) fn standing_from(
        &self,
        device: &Attested,
        enrollment: EnrollmentRead,
        registration: Option<RegistrationState>,
    ) -> Standing {
        let group = device.source.group().and_then(|id| {
            read(&self.groups)
                .get(id)
                .map(|e| e.group.settings.provisioning_status)
        });
        let revoked = device
            .certificate
            .as_ref()
            .is_some_and(|c| attestation::revoked(&read(&self.crls), &c.chain).is_some());
        Standing {
            individual: enrollment.individual,
            group,
            registration,
            revoked,
            generation: enrollment.generation,
        }
    }
}
