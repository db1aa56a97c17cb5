//! Start-up: every stored record goes back out as a retained message (DESIGN: operator
//! plane), so `dps/enrollments/#` shows the current list after any restart.
//!
//! The records are read one at a time as the broker publishes them: a million
//! registrations never sit in memory at once.

use edgedps_policies::validation::{redact_enrollment, redact_group};
use edgedps_topics::admin::RecordKind;

use crate::crl::crl_pem;
use crate::{read, Error, Publication, Responder};

impl Responder {
    /// The retained messages of every stored record, in order: enrollments (keys
    /// redacted), groups (keys redacted), linked hubs, registrations, revocation lists.
    pub fn republish(&self) -> impl Iterator<Item = Result<Publication, Error>> + Send + '_ {
        let enrollments = self.store.scan_enrollments().map(|e| {
            let e = redact_enrollment(e?);
            let topic = RecordKind::Enrollment.record_topic(e.registration_id.as_str());
            Ok(Publication::record(topic, &e))
        });
        let groups: Vec<Publication> = read(&self.groups)
            .values()
            .map(|entry| {
                let g = redact_group(entry.group.clone());
                Publication::record(
                    RecordKind::EnrollmentGroup.record_topic(&g.enrollment_group_id),
                    &g,
                )
            })
            .collect();
        let hubs: Vec<Publication> = self
            .linked_hubs()
            .into_iter()
            .map(|h| Publication::record(RecordKind::Hub.record_topic(&h.host_name), &h))
            .collect();
        let registrations = self.store.scan_registrations().map(|r| {
            let r = r?;
            let topic = RecordKind::Registration.record_topic(r.registration_id.as_str());
            Ok(Publication::record(topic, &r))
        });
        let crls = self.store.scan_crls().map(|crl| {
            let crl = crl?;
            Ok(Publication {
                topic: RecordKind::Crl.record_topic(&crl.name),
                payload: crl_pem(&crl),
                retain: true,
            })
        });
        enrollments
            .chain(groups.into_iter().map(Ok))
            .chain(hubs.into_iter().map(Ok))
            .chain(registrations)
            .chain(crls)
    }
}
