//! The operator plane's records as retained messages, read from the store when a
//! subscription asks for them (DESIGN: operator plane).
//!
//! The records (`dps/enrollments/…`, `dps/enrollment-groups/…`, `dps/hubs/…`,
//! `dps/registrations/…`, `dps/crls/…`) are not kept in the router as retained
//! messages: a million devices would keep a million copies and a million topics in
//! memory, and a restart would republish them all. Instead a new subscription that
//! matches records reads them from the store, a page at a time
//! ([`Responder::read_records`]), and receives them as retained messages; a change is
//! published live to the subscriptions that are there.

use edgedps_policies::validation::{redact_enrollment, redact_group};
use edgedps_topics::admin::{RecordKind, Selection};
use edgedps_topics::identity::RegistrationId;

use crate::crl::crl_pem;
use crate::{read, Error, Publication, Responder};

/// Where one subscription's reading of the records stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordReading {
    /// The kinds left to read, the current one first.
    left: Vec<(RecordKind, Selection)>,
    /// The key of the last record read of the current kind, in a scan.
    after: Option<String>,
}

impl RecordReading {
    /// The reading of every record `filter` (a plain filter, not shared) matches;
    /// `None` when it matches none.
    pub fn of(filter: &str) -> Option<RecordReading> {
        let left: Vec<_> = RecordKind::ALL
            .into_iter()
            .filter_map(|kind| kind.selected_by(filter).map(|s| (kind, s)))
            .collect();
        (!left.is_empty()).then_some(RecordReading { left, after: None })
    }

    pub fn is_done(&self) -> bool {
        self.left.is_empty()
    }
}

impl Responder {
    /// The next records of `reading` as retained messages, at most `page` of them
    /// (more only for the kinds kept in memory: groups, hubs, revocation lists). Empty
    /// once the reading is done. Reads the store: call it off the async workers, or
    /// with a small page.
    pub fn read_records(
        &self,
        reading: &mut RecordReading,
        page: usize,
    ) -> Result<Vec<Publication>, Error> {
        let mut out = Vec::new();
        while out.len() < page {
            let Some((kind, selection)) = reading.left.first().cloned() else {
                break;
            };
            let room = page - out.len();
            let finished = match (kind, &selection) {
                (RecordKind::Enrollment, Selection::One(id)) => {
                    if let Some(e) = spelled_exactly(
                        id,
                        |rid| self.store.enrollment(rid),
                        |e| e.registration_id.as_str(),
                    )? {
                        out.push(enrollment(e));
                    }
                    true
                }
                (RecordKind::Enrollment, Selection::All) => {
                    let scan = self.store.scan_enrollments(reading.after.as_deref());
                    page_of(scan, room, &mut reading.after, &mut out, |e| {
                        (e.registration_id.key().into_owned(), enrollment(e))
                    })?
                }
                (RecordKind::Registration, Selection::One(id)) => {
                    if let Some(r) = spelled_exactly(
                        id,
                        |rid| self.store.registration(rid),
                        |r| r.registration_id.as_str(),
                    )? {
                        out.push(record(kind, r.registration_id.as_str(), &r));
                    }
                    true
                }
                (RecordKind::Registration, Selection::All) => {
                    let scan = self.store.scan_registrations(reading.after.as_deref());
                    page_of(scan, room, &mut reading.after, &mut out, |r| {
                        let key = r.registration_id.key().into_owned();
                        (key, record(kind, r.registration_id.as_str(), &r))
                    })?
                }
                (RecordKind::EnrollmentGroup, _) => {
                    let groups = read(&self.groups);
                    for entry in groups.values() {
                        let g = &entry.group;
                        if selection.takes(&g.enrollment_group_id) {
                            out.push(record(
                                kind,
                                &g.enrollment_group_id,
                                &redact_group(g.clone()),
                            ));
                        }
                    }
                    true
                }
                (RecordKind::Hub, _) => {
                    for h in self.shown_hubs() {
                        if selection.takes(&h.host_name) {
                            out.push(record(kind, &h.host_name, &h));
                        }
                    }
                    true
                }
                (RecordKind::Crl, _) => {
                    for crl in self.store.crls()? {
                        if selection.takes(&crl.name) {
                            out.push(Publication {
                                topic: kind.record_topic(&crl.name),
                                payload: crl_pem(&crl),
                                retain: true,
                            });
                        }
                    }
                    true
                }
            };
            if finished {
                reading.left.remove(0);
                reading.after = None;
            }
        }
        Ok(out)
    }
}

/// The record `read` finds for `id` when its registration id is spelled exactly `id`:
/// topics are case-sensitive, the store's keys are not.
fn spelled_exactly<T>(
    id: &str,
    read: impl FnOnce(&RegistrationId) -> Result<Option<T>, crate::StoreError>,
    id_of: impl Fn(&T) -> &str,
) -> Result<Option<T>, Error> {
    let Ok(rid) = RegistrationId::parse(id) else {
        return Ok(None);
    };
    Ok(read(&rid)?.filter(|record| id_of(record) == id))
}

/// Up to `room` records of `scan` into `out`, `after` set to the key of the last;
/// whether the scan is done.
fn page_of<T>(
    scan: crate::store::Scan<'_, T>,
    room: usize,
    after: &mut Option<String>,
    out: &mut Vec<Publication>,
    publication: impl Fn(T) -> (String, Publication),
) -> Result<bool, Error> {
    let mut read = 0;
    for item in scan.take(room) {
        let (key, publication) = publication(item?);
        read += 1;
        *after = Some(key);
        out.push(publication);
    }
    Ok(read < room)
}

/// An enrollment's record: keys redacted.
fn enrollment(e: edgedps_topics::admin::Enrollment) -> Publication {
    let topic = RecordKind::Enrollment.record_topic(e.registration_id.as_str());
    Publication::record(topic, &redact_enrollment(e))
}

fn record(kind: RecordKind, id: &str, body: &impl serde::Serialize) -> Publication {
    Publication::record(kind.record_topic(id), body)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgedps_topics::admin::Enrollment;
    use edgedps_topics::registration::{RegistrationState, RegistrationStatus};

    use super::*;
    use crate::{Settings, SledStore, Store};

    fn enrollment(id: &str) -> Enrollment {
        serde_json::from_value(serde_json::json!({"registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "VGhpcyBpcyBhIHRlc3Qga2V5IGZvciBkb2NzIG9ubHkhIQ=="}}}))
        .unwrap()
    }

    /// Every page size reads every record once, in key order, whatever the case of the
    /// ids (keys are lower-case, topics keep the id's spelling).
    #[tokio::test]
    async fn pages_of_any_size_read_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let ids = ["b-2", "A-1", "c-3", "D-4", "e-5"];
        for id in ids {
            store.put_enrollment(&enrollment(id)).unwrap();
        }
        for id in ["A-1", "c-3"] {
            let record = RegistrationState::new(id.into(), RegistrationStatus::Assigned);
            store.put_registration(&record).unwrap();
        }
        let mut settings = Settings::new("scope");
        settings.hubs =
            vec![serde_json::from_value(serde_json::json!({"hostName": "hub-a"})).unwrap()];
        let responder = Responder::open(settings, Arc::new(store)).unwrap();

        let mut expected: Vec<String> = ids
            .iter()
            .map(|id| format!("dps/enrollments/{id}"))
            .chain(["dps/hubs/hub-a".into()])
            .chain(["A-1", "c-3"].map(|id| format!("dps/registrations/{id}")))
            .collect();
        expected.sort();
        for page in 1..=8 {
            let mut reading = RecordReading::of("dps/#").unwrap();
            let mut topics = Vec::new();
            while !reading.is_done() {
                let records = responder.read_records(&mut reading, page).unwrap();
                assert!(records.len() <= page, "page {page}: {}", records.len());
                topics.extend(records.into_iter().map(|r| r.topic));
            }
            // Enrollments come in key order (the case of the id does not matter).
            let enrollments: Vec<_> = topics
                .iter()
                .filter(|t| t.starts_with("dps/enrollments/"))
                .cloned()
                .collect();
            assert_eq!(
                enrollments,
                ["A-1", "b-2", "c-3", "D-4", "e-5"].map(|id| format!("dps/enrollments/{id}")),
                "page {page}"
            );
            topics.sort();
            assert_eq!(topics, expected, "page {page}");
        }
        // One id, spelled exactly.
        let mut one = RecordReading::of("dps/+/A-1").unwrap();
        let mut topics: Vec<_> = responder
            .read_records(&mut one, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.topic)
            .collect();
        topics.sort();
        assert_eq!(topics, ["dps/enrollments/A-1", "dps/registrations/A-1"]);
        assert!(one.is_done());
        let mut wrong_case = RecordReading::of("dps/enrollments/a-1").unwrap();
        assert!(responder
            .read_records(&mut wrong_case, 10)
            .unwrap()
            .is_empty());
        assert!(RecordReading::of("dps/events/#").is_none());
    }
}
