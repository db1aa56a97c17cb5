//! What an operator sees at a glance (the status page, metrics): counts over the store
//! and the live sessions. Reading registrations walks the whole tree: fine for a
//! gateway's fleet, and only when a page or a scrape asks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::{Error, Responder, StoreCounts, StoreStats};

/// The counts of the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub enrollments: u64,
    pub enrollment_groups: u64,
    /// Registrations by status (`assigned`, `disabled`, ...), every status listed.
    pub registrations: BTreeMap<&'static str, u64>,
    /// Device sessions connected now (provisioning and hub).
    pub live_device_sessions: usize,
    pub hubs: Vec<HubOverview>,
}

/// A linked hub, with the devices assigned to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOverview {
    pub host_name: String,
    pub local: bool,
    pub allocation_weight: u32,
    /// Registrations whose assigned hub this is (any status).
    pub devices: u64,
    /// The policy name of the hub's connection string, when it has one (never the key).
    pub credentials: Option<String>,
    /// Its outbox: operations waiting, and refused for good.
    pub outbox_pending: u64,
    pub outbox_failed: u64,
}

impl Responder {
    /// Counts over the store now, with `counts` (what [`Responder::store_counts`] gave,
    /// shared with the metrics: one walk of the store serves both).
    pub fn overview(&self, counts: &StoreCounts) -> Result<Overview, Error> {
        use edgedps_topics::registration::RegistrationStatus as S;
        let mut registrations: BTreeMap<&'static str, u64> = [
            S::Unassigned,
            S::Assigning,
            S::Assigned,
            S::Failed,
            S::Disabled,
            S::Deregistered,
        ]
        .into_iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        let mut by_hub: BTreeMap<String, u64> = BTreeMap::new();
        for record in self.store.scan_registrations(None) {
            let record = record?;
            *registrations.entry(record.status.as_str()).or_default() += 1;
            if let Some(hub) = record.assigned_hub {
                *by_hub.entry(hub.to_ascii_lowercase()).or_default() += 1;
            }
        }
        let counted = counts
            .records
            .iter()
            .find(|(kind, _)| *kind == "enrollments")
            .map(|(_, n)| *n);
        // A store that does not count: the enrollments, read.
        let enrollments = match counted {
            Some(n) => n,
            None => self.store.scan_enrollments(None).count() as u64,
        };
        let hubs = self
            .shown_hubs()
            .into_iter()
            .map(|hub| {
                let (outbox_pending, outbox_failed) =
                    self.store.cloud().operation_counts(&hub.host_name);
                HubOverview {
                    credentials: hub.credentials.map(|c| c.shared_access_key_name),
                    outbox_pending,
                    outbox_failed,
                    devices: by_hub
                        .get(&hub.host_name.to_ascii_lowercase())
                        .copied()
                        .unwrap_or(0),
                    host_name: hub.host_name,
                    local: hub.local,
                    allocation_weight: hub.allocation_weight,
                }
            })
            .collect();
        Ok(Overview {
            enrollments,
            enrollment_groups: crate::read(&self.groups).len() as u64,
            registrations,
            live_device_sessions: self.sessions.len(),
            hubs,
        })
    }

    /// Can the store take writes? The reason when it cannot.
    pub fn store_healthy(&self) -> Result<(), String> {
        self.store.healthy()
    }

    /// The store's timings and size: cheap.
    pub fn store_stats(&self) -> StoreStats<'_> {
        self.store.stats()
    }

    /// What the store holds: walks every record.
    pub fn store_counts(&self) -> StoreCounts {
        self.store.counts()
    }

    /// Twin changes written since start.
    pub fn twin_updates(&self) -> u64 {
        self.twin_updates.load(Ordering::Relaxed)
    }
}
