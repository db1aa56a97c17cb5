//! A device CONNECT (PROTOCOL A2): attestation (`edgedps_policies::attestation` decides
//! over the enrollments read here), the live-session registry, and the rights the
//! access rule gives the session. Every decision is an event on
//! `dps/events/attestation/{registrationId}`.

use edgedps_policies::access::Access;
use edgedps_policies::attestation::{self, Attested, Credential, Enrollments};
use edgedps_topics::events::{AttestationEvent, AttestationOutcome};

use crate::sessions::Entered;
use crate::standing::Standing;
use crate::{read, timestamp_now, Error, Publication, Responder};

/// An accepted device session.
pub struct Admitted {
    pub device: Attested,
    /// Its place in the live-session registry, for as long as it lives.
    pub live: Entered,
    /// What it may use now.
    pub access: Access,
    /// What its access was decided on, for its register; `None` when it could not be
    /// read (the session then has provisioning rights only).
    pub standing: Option<Standing>,
}

/// The answer to a CONNECT, and its event.
pub struct Admission {
    pub outcome: Result<Admitted, Error>,
    pub event: Publication,
}

impl Responder {
    /// Decides a device CONNECT. `now` is seconds since the Unix epoch.
    ///
    /// An accepted session is entered in the live-session registry before its rights
    /// are read: a write that takes the device out of service either is seen here or
    /// finds the session.
    pub fn admit(
        &self,
        client_id: &str,
        username: &str,
        credential: Credential<'_>,
        now: u64,
    ) -> Admission {
        let attested = self.attest(client_id, username, credential, now);
        let mut event = AttestationEvent {
            registration_id: client_id.to_owned(),
            outcome: AttestationOutcome::Refused,
            attestation: None,
            enrollment_group_id: None,
            reason: None,
            timestamp_utc: timestamp_now(),
        };
        let outcome = match attested {
            Ok((device, enrollment)) => {
                event.outcome = AttestationOutcome::Accepted;
                event.attestation = Some(device.kind);
                event.enrollment_group_id = device.source.group().map(str::to_owned);
                let live = self.sessions.enter(device.clone());
                let attested_on = self.standing_from(&device, enrollment, None);
                let standing = self.standing(&device, Some(attested_on));
                let (access, standing) = match standing {
                    Ok(standing) => (standing.access(&device), Some(standing)),
                    Err(e) => {
                        tracing::warn!(registration_id = %device.registration_id, error = %e, "could not read the device's standing; no hub rights");
                        (Access::Unassigned, None)
                    }
                };
                Ok(Admitted {
                    device,
                    live,
                    access,
                    standing,
                })
            }
            Err(error) => {
                // Reasons name ids, certificates' names and times, never keys or tokens.
                event.reason = Some(error.to_string());
                Err(error)
            }
        };
        Admission {
            outcome,
            event: Publication::event(event.topic(), &event),
        }
    }

    fn attest(
        &self,
        client_id: &str,
        username: &str,
        credential: Credential<'_>,
        now: u64,
    ) -> Result<(Attested, crate::standing::EnrollmentRead), Error> {
        let registration_id = attestation::claim(client_id, username, &self.settings.id_scope)?;
        let enrollment = self.read_enrollment(&registration_id)?;
        let groups = read(&self.groups);
        let lists = read(&self.crls);
        let enrollments = Enrollments {
            id_scope: &self.settings.id_scope,
            individual: enrollment.individual.as_ref(),
            groups: &groups,
            revocation_lists: &lists,
            now,
        };
        let device = attestation::attest(registration_id, credential, &enrollments)?;
        Ok((device, enrollment))
    }
}
