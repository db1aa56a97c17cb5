//! A device CONNECT (PROTOCOL A2): attestation (`edgedps_policies::attestation` decides
//! over the enrollments read here), the live-session registry, and the rights the
//! access rule gives the session. Every decision is an event on
//! `dps/events/attestation/{registrationId}`.

use edgedps_policies::access::Access;
use edgedps_policies::attestation::{self, AttestationError, Attested, Credential, Enrollments};
use edgedps_topics::admin::LinkedHub;
use edgedps_topics::events::{AttestationEvent, AttestationOutcome};
use edgedps_topics::identity::{HubUsername, RegistrationId};

use crate::sessions::Entered;
use crate::standing::{EnrollmentRead, Standing};
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
        self.admission(client_id, attested, None)
    }

    /// Decides a hub CONNECT (PROTOCOL E) on the device listener: attested as at
    /// provisioning (the token naming `{host}/devices/{deviceId}`), then accepted only
    /// for a device assigned to this local hub and in service. The device id is the
    /// registration id (an enrollment's own `deviceId` is not looked up).
    pub fn admit_hub(
        &self,
        client_id: &str,
        username: &HubUsername<'_>,
        credential: Credential<'_>,
        now: u64,
    ) -> Admission {
        let claimed = attestation::claim_hub(client_id, username, |host| self.is_local_hub(host));
        let (attested, host) = match claimed {
            Ok((device_id, host)) => {
                let attested = self.registered_as(&device_id).and_then(|registration_id| {
                    let hub = Some((host, device_id.as_str()));
                    self.attest_device(registration_id, credential, now, hub)
                });
                (attested, Some(host))
            }
            Err(e) => (Err(e.into()), None),
        };
        self.admission(client_id, attested, host)
    }

    /// The registration id device `device_id` was assigned under: its own, unless an
    /// individual enrollment gave it another device id.
    fn registered_as(&self, device_id: &RegistrationId) -> Result<RegistrationId, Error> {
        Ok(self
            .registration_of_device(device_id.as_str())?
            .map(|record| record.registration_id)
            .unwrap_or_else(|| device_id.clone()))
    }

    /// Whether `host_name` is a hub this gateway serves itself: among the linked hubs
    /// (the configuration's, unless one linked over MQTT has the same name), without
    /// copying them, as each hub CONNECT asks.
    pub fn is_local_hub(&self, host_name: &str) -> bool {
        let admin = read(&self.hubs);
        let local = |h: &LinkedHub| h.local && h.host_name.eq_ignore_ascii_case(host_name);
        admin.values().any(local)
            || self
                .settings
                .hubs
                .iter()
                .any(|h| local(h) && !admin.contains_key(&h.host_name))
    }

    /// The admission of an attested (or refused) device; a hub CONNECT (`hub`) must also
    /// be assigned to that hub and in service.
    fn admission(
        &self,
        client_id: &str,
        attested: Result<(Attested, EnrollmentRead), Error>,
        hub: Option<&str>,
    ) -> Admission {
        let mut event = AttestationEvent {
            registration_id: client_id.to_owned(),
            outcome: AttestationOutcome::Refused,
            attestation: None,
            enrollment_group_id: None,
            reason: None,
            timestamp_utc: timestamp_now(),
        };
        let outcome = attested.and_then(|(device, enrollment)| {
            let live = self.sessions.enter(device.clone());
            let attested_on = self.standing_from(&device, enrollment, None);
            let standing = self.standing(&device, Some(attested_on));
            let (access, standing) = match standing {
                // A TPM device without a token may only ask for its challenge.
                Ok(standing) if !device.proven => (Access::Unassigned, Some(standing)),
                Ok(standing) => (standing.access(&device), Some(standing)),
                // A hub session needs its standing: without it, refused (the device retries).
                Err(e) if hub.is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(registration_id = %device.registration_id, error = %e, "could not read the device's standing; no hub rights");
                    (Access::Unassigned, None)
                }
            };
            if let Some(host) = hub {
                assigned_here(host, client_id, &access, standing.as_ref())?;
            }
            event.attestation = Some(device.kind);
            event.enrollment_group_id = device.source.group().map(str::to_owned);
            Ok(Admitted {
                device,
                live,
                access,
                standing,
            })
        });
        match &outcome {
            Ok(_) => event.outcome = AttestationOutcome::Accepted,
            // Reasons name ids, hosts, certificates' names and times, never keys or tokens.
            Err(error) => event.reason = Some(error.to_string()),
        }
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
    ) -> Result<(Attested, EnrollmentRead), Error> {
        let registration_id = attestation::claim(client_id, username, &self.settings.id_scope)?;
        self.attest_device(registration_id, credential, now, None)
    }

    /// Attests the claimed device: for provisioning, or for the local hub `hub` (its host
    /// name and the device id the CONNECT named).
    fn attest_device(
        &self,
        registration_id: RegistrationId,
        credential: Credential<'_>,
        now: u64,
        hub: Option<(&str, &str)>,
    ) -> Result<(Attested, EnrollmentRead), Error> {
        let enrollment = self.read_enrollment(&registration_id)?;
        // A certificate the gateway issued to the device (PROTOCOL F).
        if let Credential::X509(chain) = credential {
            if let Some(device) = self.attest_issued(&registration_id, chain, now)? {
                return Ok((device, enrollment));
            }
        }
        let tpm_key = self.tpm_key(
            &registration_id,
            enrollment.individual.as_ref(),
            hub.is_some(),
        )?;
        let groups = read(&self.groups);
        let lists = read(&self.crls);
        let enrollments = Enrollments {
            id_scope: &self.settings.id_scope,
            individual: enrollment.individual.as_ref(),
            groups: &groups,
            revocation_lists: &lists,
            now,
            tpm_key: tpm_key.as_deref(),
        };
        let device = match hub {
            None => attestation::attest(registration_id, credential, &enrollments)?,
            Some((host, device_id)) => {
                attestation::attest_hub(registration_id, device_id, host, credential, &enrollments)?
            }
        };
        Ok((device, enrollment))
    }
}

/// A hub session is for a device assigned to that hub under the device id it claims,
/// and in service (the access rule: PROTOCOL B, retirement); anything else is refused
/// with its reason.
fn assigned_here(
    host: &str,
    claimed: &str,
    access: &Access,
    standing: Option<&Standing>,
) -> Result<(), Error> {
    let refuse = |reason: String| Err(AttestationError::NotAuthorized(reason).into());
    match access {
        Access::Hub { device_id } if !device_id.eq_ignore_ascii_case(claimed) => {
            return refuse(format!(
                "the device was assigned as device `{device_id}`, not `{claimed}`"
            ))
        }
        Access::Hub { .. } => {}
        Access::Unassigned => return refuse(format!("the device is not assigned to hub `{host}`")),
        Access::OutOfService(reason) => {
            return refuse(format!("the device is out of service: {}", reason.reason()))
        }
    }
    let assigned = standing
        .and_then(|s| s.registration.as_ref())
        .and_then(|r| r.assigned_hub.as_deref());
    match assigned {
        Some(assigned) if assigned.eq_ignore_ascii_case(host) => Ok(()),
        Some(other) => refuse(format!(
            "the device is assigned to hub `{other}`, not `{host}`"
        )),
        None => refuse(format!("the device is not assigned to hub `{host}`")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgedps_topics::admin::LinkedHub;

    use crate::store::{SledStore, Store};
    use crate::{Responder, Settings};

    fn hub(host_name: &str, local: bool) -> LinkedHub {
        serde_json::from_value(serde_json::json!({"hostName": host_name, "local": local})).unwrap()
    }

    /// A responder with `configured` hubs and `linked` ones (as if linked over MQTT).
    fn responder(
        configured: Vec<LinkedHub>,
        linked: &[LinkedHub],
    ) -> (Responder, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for h in linked {
            store.put_hub(h).unwrap();
        }
        let mut settings = Settings::new("scope");
        settings.hubs = configured;
        (Responder::open(settings, Arc::new(store)).unwrap(), dir)
    }

    #[test]
    fn a_hub_is_local_as_linked_a_link_over_mqtt_overriding_the_configuration() {
        let configured = vec![hub("gw.local", true), hub("cloud.example.net", false)];
        let (plain, _dir) = responder(configured.clone(), &[]);
        assert!(plain.is_local_hub("gw.local"));
        assert!(
            plain.is_local_hub("GW.Local"),
            "host names compare without case"
        );
        assert!(!plain.is_local_hub("cloud.example.net"));
        assert!(!plain.is_local_hub("unknown.example.net"));

        let (overridden, _dir) = responder(
            configured,
            &[hub("gw.local", false), hub("edge-2.local", true)],
        );
        assert!(
            !overridden.is_local_hub("gw.local"),
            "relinked as not local"
        );
        assert!(
            overridden.is_local_hub("Edge-2.local"),
            "linked over MQTT as local"
        );
    }
}
