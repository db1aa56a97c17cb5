//! geoLatency's figures (PROTOCOL A6): the broker measures each linked hub in the
//! background (`edgedps::probe`) and reports here; allocation reads the latest figure
//! of every hub from [`Responder::linked_hubs`], and the hub's retained record shows it.
//! The figures live in memory only: after a restart the first round measures again.
//!
//! Nothing is dialled until something allocates by geoLatency: the service's default
//! policy, a group (at start or when written), an individual enrollment when written, or
//! the first registration under it (an individual geoLatency enrollment stored before a
//! restart: that first device is hashed, with the reason saying so).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use edgedps_topics::admin::{HubLatency, RecordKind};

use crate::{read, write, Publication, Responder};

/// A hub to measure, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub host_name: String,
    /// `probeAddress`, or `{hostName}:8883`.
    pub address: String,
    /// The gateway itself, without a `probeAddress`: not dialled, 0 ms.
    pub is_self: bool,
}

/// Latest figures by hub (lowercase host name).
#[derive(Default)]
pub(crate) struct Latencies {
    pub(crate) by_hub: std::sync::RwLock<HashMap<String, HubLatency>>,
    /// Woken when a hub is linked, changed or unlinked: it is measured at once.
    pub(crate) changed: Arc<tokio::sync::Notify>,
    /// Whether anything allocates by geoLatency: until then no hub is dialled.
    pub(crate) wanted: AtomicBool,
}

impl Latencies {
    /// Something allocates by geoLatency: the measurements start (at once, the first
    /// time).
    pub(crate) fn want(&self) {
        if !self.wanted.swap(true, Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }
}

impl Responder {
    /// The linked hubs to measure now.
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        self.linked_hubs()
            .into_iter()
            .map(|hub| {
                let is_self = hub.local && hub.probe_address.is_none();
                let address = match (&hub.probe_address, is_self) {
                    (Some(address), _) => address.clone(),
                    (None, true) => "this gateway".to_owned(),
                    (None, false) => format!("{}:8883", hub.host_name),
                };
                ProbeTarget {
                    host_name: hub.host_name,
                    address,
                    is_self,
                }
            })
            .collect()
    }

    /// Woken when the linked hubs change, or measurements are first wanted.
    pub fn linked_hubs_changed(&self) -> Arc<tokio::sync::Notify> {
        self.latencies.changed.clone()
    }

    /// Whether the hubs are to be measured: something allocates by geoLatency (the
    /// service default, an enrollment or group written with it, or a device that
    /// registered under it). Until then edgedps dials no hub.
    pub fn latencies_wanted(&self) -> bool {
        self.latencies.wanted.load(Ordering::SeqCst)
    }

    /// Records a round of measurements of `host_name`; returns its record to republish
    /// (the hub is still linked).
    pub fn latency_measured(&self, host_name: &str, latency: HubLatency) -> Vec<Publication> {
        let key = host_name.to_ascii_lowercase();
        let linked = self
            .shown_hubs()
            .into_iter()
            .find(|h| h.host_name.eq_ignore_ascii_case(host_name));
        let Some(mut hub) = linked else {
            write(&self.latencies.by_hub).remove(&key);
            return Vec::new();
        };
        write(&self.latencies.by_hub).insert(key, latency.clone());
        hub.latency = Some(latency);
        vec![Publication::record(
            RecordKind::Hub.record_topic(&hub.host_name),
            &hub,
        )]
    }

    /// The latest figure of `host_name`, if it has been measured.
    pub(crate) fn latency_of(&self, host_name: &str) -> Option<HubLatency> {
        read(&self.latencies.by_hub)
            .get(&host_name.to_ascii_lowercase())
            .cloned()
    }
}
