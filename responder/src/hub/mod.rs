//! The gateway as the device's hub (PROTOCOL E): the state behind a hub session.
//!
//! - `twins.rs`: twins, kept in the store, made from the registration's initial twin,
//!   patched by devices (reported) and operators (desired, tags);
//! - `messages.rs`: each device's durable queue of cloud-to-device messages;
//! - `methods.rs`: direct method calls from operators, matched with the device's
//!   answers or timed out;
//! - `credentials.rs`: certificate renewals (PROTOCOL F).
//!
//! The decisions are `edgedps_policies::twin`'s and the topics `edgedps_topics::hub`'s;
//! this layer reads and writes the store and tells the device's live hub sessions
//! (their [`HubLink`]s) what came for them. The bytes on the wire are the broker's.

mod credentials;
mod messages;
mod methods;
mod twins;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{RegistrationState, RegistrationStatus};

pub use credentials::CredentialAnswer;
pub use messages::{Enqueued, QueueRefusal};
pub use methods::Invoked;
pub(crate) use methods::MAX_PENDING_CALLS;
pub use twins::HubAnswer;

use crate::{lock, Error, Responder};

/// What the local hub keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct HubSettings {
    /// Cloud-to-device messages kept per device at most (IoT Hub: 50); more are
    /// refused until the device takes some.
    pub max_queued_messages: usize,
    /// How long a cloud-to-device message waits for its device, in seconds.
    pub message_ttl_seconds: u64,
}

impl Default for HubSettings {
    fn default() -> HubSettings {
        HubSettings {
            max_queued_messages: 50,
            message_ttl_seconds: 3600,
        }
    }
}

/// What came for a live hub session.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    /// The desired properties changed: the notification (the patch with `$version`).
    Desired { version: u64, body: Vec<u8> },
    /// A direct method call to answer.
    Method {
        method: String,
        rid: String,
        payload: Vec<u8>,
    },
    /// Cloud-to-device messages were queued: read the queue.
    Messages,
}

/// Events a hub session may have waiting before the newest are dropped (the session
/// reads its queue and twin again on the next `Messages` or GET).
const LINK_CAPACITY: usize = 64;

struct Link {
    id: u64,
    tx: mpsc::Sender<HubEvent>,
    /// The session subscribed to `$iothub/methods/POST/#`.
    methods: AtomicBool,
}

/// The live hub sessions of each device (by device key).
#[derive(Default)]
pub(crate) struct HubLinks {
    next: AtomicU64,
    by_device: Mutex<HashMap<String, Vec<Arc<Link>>>>,
}

impl HubLinks {
    fn links(&self, device_id: &RegistrationId) -> Vec<Arc<Link>> {
        lock(&self.by_device)
            .get(device_id.key().as_ref())
            .cloned()
            .unwrap_or_default()
    }

    /// Tells every live hub session of the device.
    fn tell(&self, device_id: &RegistrationId, event: &HubEvent) {
        for link in self.links(device_id) {
            if link.tx.try_send(event.clone()).is_err() {
                tracing::warn!(device_id = %device_id.as_str(), ?event, "a hub session is not reading its events; this one is dropped");
            }
        }
    }
}

/// A live hub session's line to the hub state: what came for it arrives here. It
/// leaves the device's links when dropped.
pub struct HubLink {
    device_id: RegistrationId,
    link: Arc<Link>,
    rx: mpsc::Receiver<HubEvent>,
    links: Arc<HubLinks>,
}

impl HubLink {
    /// The next event for the session.
    pub async fn next(&mut self) -> Option<HubEvent> {
        self.rx.recv().await
    }

    /// The session took (or gave up) `$iothub/methods/POST/#`: method calls reach it.
    pub fn take_methods(&self, yes: bool) {
        self.link.methods.store(yes, Ordering::SeqCst);
    }
}

impl Drop for HubLink {
    fn drop(&mut self) {
        let mut by_device = lock(&self.links.by_device);
        let key = self.device_id.key();
        if let Some(links) = by_device.get_mut(key.as_ref()) {
            links.retain(|l| l.id != self.link.id);
            if links.is_empty() {
                by_device.remove(key.as_ref());
            }
        }
    }
}

impl Responder {
    /// A hub session of `device_id` begins: its link to the hub state.
    pub fn attach_hub(&self, device_id: &str) -> HubLink {
        let device_id = RegistrationId::from(device_id);
        let (tx, rx) = mpsc::channel(LINK_CAPACITY);
        let link = Arc::new(Link {
            id: self.hub_links.next.fetch_add(1, Ordering::Relaxed),
            tx,
            methods: AtomicBool::new(false),
        });
        lock(&self.hub_links.by_device)
            .entry(device_id.key().into_owned())
            .or_default()
            .push(link.clone());
        HubLink {
            device_id,
            link,
            rx,
            links: self.hub_links.clone(),
        }
    }

    /// The registration record of device `device_id`: the record of the registration id
    /// of that spelling, or the one the device id was last assigned under (an
    /// individual enrollment's own `deviceId`), if it still names this device.
    pub(crate) fn registration_of_device(
        &self,
        device_id: &str,
    ) -> Result<Option<RegistrationState>, Error> {
        let names_it = |r: &RegistrationState| {
            r.device_id
                .as_deref()
                .is_some_and(|d| d.eq_ignore_ascii_case(device_id))
        };
        let own = RegistrationId::from(device_id);
        if let Some(record) = self.store.registration(&own)?.filter(names_it) {
            return Ok(Some(record));
        }
        let Some(registration_id) = self.store.hub().device_registration(device_id)? else {
            return Ok(None);
        };
        Ok(self.store.registration(&registration_id)?.filter(names_it))
    }

    /// The registration of a device the local hub serves: assigned to a local hub,
    /// under this device id. `None` for any other device.
    fn local_registration(&self, device_id: &str) -> Result<Option<RegistrationState>, Error> {
        let Some(record) = self.registration_of_device(device_id)? else {
            return Ok(None);
        };
        let local = record.status == RegistrationStatus::Assigned
            && record
                .assigned_hub
                .as_deref()
                .is_some_and(|hub| self.is_local_hub(hub));
        Ok(local.then_some(record))
    }
}
