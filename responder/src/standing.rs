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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use edgedps_policies::attestation::Credential;
    use edgedps_topics::admin::{Enrollment, EnrollmentGroup, LinkedHub, RecordKind};
    use edgedps_topics::encoding::Encoding;
    use edgedps_topics::identity::RegistrationId;
    use edgedps_topics::registration::RegistrationState;

    use crate::store::{CloudStore, CrlRecord, Scan, SledStore, Store, StoreError};
    use crate::{Responder, Settings};

    /// The embedded store, counting the reads of individual enrollments.
    struct Counting {
        inner: SledStore,
        enrollment_reads: AtomicUsize,
    }

    impl Store for Counting {
        fn enrollment(&self, id: &RegistrationId) -> Result<Option<Enrollment>, StoreError> {
            self.enrollment_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.enrollment(id)
        }
        fn put_enrollment(&self, e: &Enrollment) -> Result<(), StoreError> {
            self.inner.put_enrollment(e)
        }
        fn remove_enrollment(&self, id: &RegistrationId) -> Result<bool, StoreError> {
            self.inner.remove_enrollment(id)
        }
        fn scan_enrollments(&self, after: Option<&str>) -> Scan<'_, Enrollment> {
            self.inner.scan_enrollments(after)
        }
        fn put_group(&self, g: &EnrollmentGroup) -> Result<(), StoreError> {
            self.inner.put_group(g)
        }
        fn remove_group(&self, group_id: &str) -> Result<bool, StoreError> {
            self.inner.remove_group(group_id)
        }
        fn scan_groups(&self) -> Scan<'_, EnrollmentGroup> {
            self.inner.scan_groups()
        }
        fn put_hub(&self, h: &LinkedHub) -> Result<(), StoreError> {
            self.inner.put_hub(h)
        }
        fn remove_hub(&self, host_name: &str) -> Result<bool, StoreError> {
            self.inner.remove_hub(host_name)
        }
        fn scan_hubs(&self) -> Scan<'_, LinkedHub> {
            self.inner.scan_hubs()
        }
        fn registration(
            &self,
            id: &RegistrationId,
        ) -> Result<Option<RegistrationState>, StoreError> {
            self.inner.registration(id)
        }
        fn put_registration(&self, r: &RegistrationState) -> Result<(), StoreError> {
            self.inner.put_registration(r)
        }
        fn remove_registration(&self, id: &RegistrationId) -> Result<bool, StoreError> {
            self.inner.remove_registration(id)
        }
        fn scan_registrations(&self, after: Option<&str>) -> Scan<'_, RegistrationState> {
            self.inner.scan_registrations(after)
        }
        fn put_crl(&self, record: &CrlRecord) -> Result<(), StoreError> {
            self.inner.put_crl(record)
        }
        fn remove_crl(&self, name: &str) -> Result<bool, StoreError> {
            self.inner.remove_crl(name)
        }
        fn scan_crls(&self) -> Scan<'_, CrlRecord> {
            self.inner.scan_crls()
        }
        fn cloud(&self) -> &dyn CloudStore {
            self.inner.cloud()
        }
        fn device_key(&self, id: &RegistrationId) -> Result<Option<String>, StoreError> {
            self.inner.device_key(id)
        }
        fn put_device_key(&self, id: &RegistrationId, key: &str) -> Result<(), StoreError> {
            self.inner.put_device_key(id, key)
        }
        fn remove_device_key(&self, id: &RegistrationId) -> Result<bool, StoreError> {
            self.inner.remove_device_key(id)
        }
        fn update_registration(
            &self,
            id: &RegistrationId,
            change: &mut dyn FnMut(RegistrationState) -> Option<RegistrationState>,
        ) -> Result<Option<RegistrationState>, StoreError> {
            self.inner.update_registration(id, change)
        }
        fn hub(&self) -> &dyn crate::store::HubStore {
            self.inner.hub()
        }
        fn durable(
            &self,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
        {
            self.inner.durable()
        }
        fn flush_count(&self) -> u64 {
            self.inner.flush_count()
        }
    }

    const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWI=";

    fn enrollment_body(id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY}}}))
        .unwrap()
    }

    #[tokio::test]
    async fn one_registration_reads_the_enrollment_once_unless_a_write_came_between() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Counting {
            inner: SledStore::open(dir.path()).unwrap(),
            enrollment_reads: AtomicUsize::new(0),
        });
        let mut settings = Settings::new("scope");
        settings.hubs =
            vec![
                serde_json::from_value(serde_json::json!({"hostName": "hub-a.example.net"}))
                    .unwrap(),
            ];
        let responder = Arc::new(Responder::open(settings, store.clone()).unwrap());
        for id in ["dev-1", "dev-2"] {
            let answer = responder
                .apply_admin(
                    "op",
                    RecordKind::Enrollment,
                    id,
                    &enrollment_body(id),
                    Encoding::Json,
                )
                .await;
            assert!(answer.result.ok, "{:?}", answer.result);
        }
        let reads = || store.enrollment_reads.load(Ordering::SeqCst);
        let username = "scope/registrations/dev-1/api-version=2021-06-01";
        let now = crate::unix_now();
        let token = edgedps_policies::sas::sign(KEY, "scope", "dev-1", now + 600).unwrap();

        let before = reads();
        let admission = responder.admit("dev-1", username, Credential::Sas(&token), now);
        let admitted = admission.outcome.unwrap();
        assert_eq!(reads() - before, 1, "the CONNECT reads the enrollment once");
        let reply = responder
            .register(&admitted.device, admitted.standing, b"", Encoding::Json)
            .await;
        assert_eq!(reply.status, 200);
        assert!(reply.assigned_device_id.is_some());
        assert_eq!(
            reads() - before,
            1,
            "the register reuses what the CONNECT read"
        );

        // An operator write between CONNECT and register: the enrollment is read again.
        let before = reads();
        let admission = responder.admit("dev-1", username, Credential::Sas(&token), now);
        let admitted = admission.outcome.unwrap();
        let answer = responder
            .apply_admin(
                "op",
                RecordKind::Enrollment,
                "dev-2",
                &enrollment_body("dev-2"),
                Encoding::Json,
            )
            .await;
        assert!(answer.result.ok);
        let between = reads();
        let reply = responder
            .register(&admitted.device, admitted.standing, b"", Encoding::Json)
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reads() - between, 1, "a write came between: read again");
        assert!(between > before);
    }
}
