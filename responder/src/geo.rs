//! geoLatency's figures (PROTOCOL A6): the broker measures each linked hub in the
//! background (`edgedps::probe`) and reports here; allocation reads the latest figure
//! of every hub from [`Responder::linked_hubs`], and the hub's retained record shows it.
//! The figures live in memory only: after a restart the first round measures again.

use std::collections::HashMap;
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

    /// Woken when the linked hubs change.
    pub fn linked_hubs_changed(&self) -> Arc<tokio::sync::Notify> {
        self.latencies.changed.clone()
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
