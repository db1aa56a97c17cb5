//! The provisioning state machine of edgedps and its enrollment store.
//!
//! The broker hands the responder what a device presented at CONNECT
//! ([`Responder::authenticate`]), then each register and poll
//! ([`Responder::register`], [`Responder::poll`]), and each operator write
//! ([`Responder::apply_admin`]). The responder answers with bytes to send back and
//! pushes retained records, results and events to [`Outbound`], which the broker
//! publishes into its router. No sockets here.

mod admin;
mod attestation;
mod latency;
mod registration;
pub mod store;
mod throttle;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;

use edgedps_topics::admin::{AllocationPolicy, EnrollmentGroup, LinkedHub};

pub use attestation::{Attested, Credential, EnrollmentSource, Refusal};
pub use latency::LatencySummary;
pub use registration::Reply;
pub use store::{Store, StoreError};
pub use throttle::RateLimits;

/// What the responder needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id_scope: String,
    /// Used when an enrollment names no policy.
    pub allocation_policy: AllocationPolicy,
    /// Answer a register with `202 assigning` and the result on the poll, as Azure does.
    pub always_accept_then_poll: bool,
    pub retry_after_seconds: u32,
    /// Hubs linked in the configuration file; hubs linked over `dps/hubs/` add to them.
    pub hubs: Vec<LinkedHub>,
    /// How long a 202 operation can be polled.
    pub operation_ttl: std::time::Duration,
    pub rate_limits: RateLimits,
    /// Largest body of an operator write, in bytes.
    pub max_admin_body: usize,
}

impl Settings {
    pub fn new(id_scope: impl Into<String>) -> Settings {
        Settings {
            id_scope: id_scope.into(),
            allocation_policy: AllocationPolicy::Hashed,
            always_accept_then_poll: false,
            retry_after_seconds: 1,
            hubs: Vec::new(),
            operation_ttl: std::time::Duration::from_secs(300),
            rate_limits: RateLimits::default(),
            max_admin_body: 64 * 1024,
        }
    }
}

/// A message the broker publishes into its router on the responder's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enrollment group `{group}` in the store is unusable: {reason}")]
    BadGroup { group: String, reason: String },
}

/// An enrollment group with its signing certificates read once.
struct GroupEntry {
    group: EnrollmentGroup,
    /// The primary and secondary signing certificates.
    signing: Vec<edgedps_policies::x509::SigningCertificate>,
}

/// A 202 operation a device may poll.
struct Operation {
    registration_id: String,
    /// JSON; answered in `encoding`, the register's.
    body: Vec<u8>,
    encoding: edgedps_topics::encoding::Encoding,
    device_id: Option<String>,
    expires: Instant,
}

pub struct Responder {
    settings: Settings,
    store: Store,
    groups: RwLock<BTreeMap<String, GroupEntry>>,
    hubs: RwLock<BTreeMap<String, LinkedHub>>,
    operations: Mutex<HashMap<String, Operation>>,
    in_flight: Mutex<HashSet<String>>,
    outbound: mpsc::Sender<Outbound>,
    random: SystemRandom,
    throttle: throttle::Throttle,
    register_latency: latency::LatencyHistogram,
}

impl Responder {
    /// Opens the store and loads groups and hubs. Returns the responder and the stream
    /// of messages to publish.
    pub fn open(
        settings: Settings,
        store: Store,
    ) -> Result<(Responder, mpsc::Receiver<Outbound>), Error> {
        let (outbound, rx) = mpsc::channel(4096);
        let mut groups = BTreeMap::new();
        for group in store.groups()? {
            let id = group.enrollment_group_id.clone();
            let entry = GroupEntry::new(group).map_err(|reason| Error::BadGroup {
                group: id.clone(),
                reason,
            })?;
            groups.insert(id, entry);
        }
        let hubs = store
            .hubs()?
            .into_iter()
            .map(|h| (h.host_name.clone(), h))
            .collect();
        let throttle = throttle::Throttle::new(&settings.rate_limits);
        Ok((
            Responder {
                throttle,
                register_latency: latency::LatencyHistogram::default(),
                settings,
                store,
                groups: RwLock::new(groups),
                hubs: RwLock::new(hubs),
                operations: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashSet::new()),
                outbound,
                random: SystemRandom::new(),
            },
            rx,
        ))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Server-side latency of the registrations answered so far.
    pub fn register_latency(&self) -> LatencySummary {
        self.register_latency.summary()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The device id of a registration already assigned, for the topic ACL.
    pub fn assigned_device_id(&self, registration_id: &str) -> Result<Option<String>, Error> {
        Ok(self
            .store
            .registration(registration_id)?
            .filter(|r| r.status == "assigned")
            .and_then(|r| r.device_id))
    }

    /// Linked hubs: the configuration's, overridden by those linked over MQTT.
    fn linked_hubs(&self) -> Vec<LinkedHub> {
        let admin = read(&self.hubs);
        let mut all: BTreeMap<String, LinkedHub> = self
            .settings
            .hubs
            .iter()
            .map(|h| (h.host_name.clone(), h.clone()))
            .collect();
        for (name, hub) in admin.iter() {
            all.insert(name.clone(), hub.clone());
        }
        all.into_values().collect()
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        let message = Outbound {
            topic,
            payload,
            retain,
        };
        if self.outbound.send(message).await.is_err() {
            tracing::warn!("outbound channel closed; record not republished");
        }
    }

    /// Publishes without waiting (for callers that cannot await); a full queue is
    /// logged, not silent.
    fn try_publish(&self, topic: String, payload: Vec<u8>) {
        let message = Outbound {
            topic,
            payload,
            retain: false,
        };
        if let Err(e) = self.outbound.try_send(message) {
            tracing::warn!(topic = %e.into_inner().topic, "event not published: outbound queue full");
        }
    }

    /// Random id material, URL-safe.
    fn random_token(&self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        // SystemRandom fails only if the OS has no entropy source; fall back to time.
        if self.random.fill(&mut buf).is_err() {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (nanos >> ((i % 16) * 8)) as u8;
            }
        }
        URL_SAFE_NO_PAD.encode(buf)
    }
}

impl GroupEntry {
    fn new(group: EnrollmentGroup) -> Result<GroupEntry, String> {
        let mut signing = Vec::new();
        if let Some(certs) = group
            .attestation
            .x509
            .as_ref()
            .and_then(|x| x.signing_certificates.as_ref())
        {
            for cert in [&certs.primary, &certs.secondary].into_iter().flatten() {
                if let Some(pem) = &cert.certificate {
                    let der = edgedps_policies::x509::pem_to_der(pem).map_err(|e| e.to_string())?;
                    signing.push(
                        edgedps_policies::x509::SigningCertificate::from_der(&der)
                            .map_err(|e| e.to_string())?,
                    );
                }
            }
        }
        Ok(GroupEntry { group, signing })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// DPS timestamps: `2026-01-01T00:00:00.0000000Z`.
pub fn timestamp_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    );
    now.format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.0000000Z".into())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
