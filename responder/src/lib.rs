//! The provisioning state machine of edgedps and its enrollment store.
//!
//! The broker hands the responder what a device presented at CONNECT
//! ([`Responder::authenticate`]), enters the session in the live-session registry
//! ([`Responder::sessions`]) and asks what it may use ([`Responder::access`]), then
//! hands it each register and poll ([`Responder::register`], [`Responder::poll`]), and
//! each operator write ([`Responder::apply_admin`], [`Responder::retire`]). The
//! responder answers with bytes to send back, cuts the live sessions a write takes out
//! of service, and pushes retained records, results and events to [`Outbound`], which
//! the broker publishes into its router. No sockets here.

mod admin;
mod attestation;
mod latency;
mod registration;
mod retire;
pub mod sessions;
pub mod store;
mod throttle;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, oneshot};

use edgedps_policies::access::{self, Access, AttestedBy, Facts};
use edgedps_policies::revocation::RevocationList;
use edgedps_topics::admin::{
    AllocationPolicy, Enrollment, EnrollmentGroup, EnrollmentSettings, LinkedHub,
    ProvisioningStatus,
};
use edgedps_topics::registration::{status, RegistrationState};

pub use attestation::{Attested, Credential, EnrollmentSource, PresentedCertificate, Refusal};
pub use latency::LatencySummary;
pub use registration::Reply;
pub use sessions::{Cut, LiveSession, LiveSessions, Scope};
pub use store::{Store, StoreError};
pub use throttle::RateLimits;

/// Cut sessions woken at once to close their connections (see `Responder::cut_off`).
const WAKE_BATCH: usize = 64;
/// The pause between two batches of them.
const WAKE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

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

/// What the broker does in its router on the responder's behalf, in order.
#[derive(Debug)]
pub enum Outbound {
    /// Publish a message (a retained record, a result, an event).
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// Clear every retained message under `filter`, and say how many there were.
    PurgeRetained {
        filter: String,
        done: oneshot::Sender<usize>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enrollment group `{group}` in the store is unusable: {reason}")]
    BadGroup { group: String, reason: String },
    #[error("revocation list `{name}` in the store is unusable: {reason}")]
    BadCrl { name: String, reason: String },
}

/// An enrollment group with its signing certificates read once.
struct GroupEntry {
    group: EnrollmentGroup,
    /// The primary and secondary signing certificates.
    signing: Vec<edgedps_policies::x509::SigningCertificate>,
    /// The same, as DER: the CAs a revocation list may come from.
    signing_der: Vec<Vec<u8>>,
}

/// What the access rule reads about one device, read once.
pub(crate) struct Standing {
    pub individual: Option<Enrollment>,
    /// The status of the attesting group, if the device came through one and it still
    /// exists.
    pub group: Option<ProvisioningStatus>,
    pub registration: Option<RegistrationState>,
    pub revoked: bool,
}

impl Standing {
    pub fn access(&self, device: &Attested) -> Access {
        access::decide(&self.facts(device))
    }

    pub fn facts<'a>(&'a self, device: &'a Attested) -> Facts<'a> {
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
                .filter(|r| r.status == status::ASSIGNED)
                .and_then(|r| r.device_id.as_deref()),
            revoked: self.revoked,
        }
    }
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
    /// Verified revocation lists by name.
    crls: RwLock<BTreeMap<String, RevocationList>>,
    sessions: Arc<LiveSessions>,
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
        let mut crls = BTreeMap::new();
        for record in store.crls()? {
            let list =
                RevocationList::reload(&record.crl, &record.issuer_certificate).map_err(|e| {
                    Error::BadCrl {
                        name: record.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
            crls.insert(record.name, list);
        }
        let throttle = throttle::Throttle::new(&settings.rate_limits);
        Ok((
            Responder {
                throttle,
                register_latency: latency::LatencyHistogram::default(),
                settings,
                store,
                groups: RwLock::new(groups),
                hubs: RwLock::new(hubs),
                crls: RwLock::new(crls),
                sessions: Arc::new(LiveSessions::default()),
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

    /// The live device sessions. A session enters before it asks [`Responder::access`].
    pub fn sessions(&self) -> &Arc<LiveSessions> {
        &self.sessions
    }

    /// What an attested device may use now (PROTOCOL B, retirement): the access rule of
    /// `edgedps_policies::access` over the current state.
    pub fn access(&self, device: &Attested) -> Result<Access, Error> {
        Ok(self.standing(device)?.access(device))
    }

    /// Reads what the access rule needs about `device`.
    pub(crate) fn standing(&self, device: &Attested) -> Result<Standing, Error> {
        let individual = self.store.enrollment(&device.registration_id)?;
        let group = match &device.source {
            EnrollmentSource::Group(id) => read(&self.groups)
                .get(id)
                .map(|e| e.group.settings.provisioning_status),
            EnrollmentSource::Individual => None,
        };
        let registration = self.store.registration(&device.registration_id)?;
        let revoked = device
            .certificate
            .as_ref()
            .is_some_and(|c| self.revoked(&c.chain).is_some());
        Ok(Standing {
            individual,
            group,
            registration,
            revoked,
        })
    }

    /// The settings of group `id` now, if it exists.
    pub(crate) fn group_settings(&self, id: &str) -> Option<EnrollmentSettings> {
        read(&self.groups).get(id).map(|e| e.group.settings.clone())
    }

    /// Cuts the live sessions `scopes` reach that the access rule now puts out of
    /// service, or all of them when `force` says why. Returns how many were cut.
    ///
    /// Every cut session loses its rights before this returns. Closing a connection
    /// costs its task some CPU (the TLS close, the socket): thousands woken at once
    /// would queue ahead of every other session on the gateway's two cores, so beyond
    /// [`WAKE_BATCH`] they are woken in batches, [`WAKE_PAUSE`] apart, by a task of
    /// their own (10,000 sessions: all closed within about 0.8 s; BENCHMARKS.md, cut-off).
    pub(crate) async fn cut_off(&self, scopes: &[Scope<'_>], force: Option<Cut>) -> u32 {
        let sessions = self.sessions.find(scopes);
        let mut cut = Vec::new();
        for (n, session) in sessions.into_iter().enumerate() {
            // Thousands of sessions in a group: let other tasks run between batches.
            if n % WAKE_BATCH == WAKE_BATCH - 1 {
                tokio::task::yield_now().await;
            }
            let why = match force {
                Some(why) => why,
                None => match self.access(session.device()) {
                    Ok(Access::OutOfService(reason)) => Cut::OutOfService(reason),
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!(registration_id = %session.device().registration_id, error = %e, "cannot read the device's standing after a write; closing its session");
                        Cut::Unverifiable
                    }
                },
            };
            if session.revoke(why) {
                cut.push(session);
            }
        }
        let count = u32::try_from(cut.len()).unwrap_or(u32::MAX);
        if cut.len() <= WAKE_BATCH {
            cut.iter().for_each(|session| session.wake());
        } else {
            tokio::spawn(async move {
                for batch in cut.chunks(WAKE_BATCH) {
                    batch.iter().for_each(|session| session.wake());
                    tokio::time::sleep(WAKE_PAUSE).await;
                }
            });
        }
        count
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
        let message = Outbound::Publish {
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
        let message = Outbound::Publish {
            topic: topic.clone(),
            payload,
            retain: false,
        };
        if self.outbound.try_send(message).is_err() {
            tracing::warn!(%topic, "event not published: outbound queue full");
        }
    }

    /// A session was refused a topic (an ACL denial or a refused subscription): an event
    /// on `dps/events/acl/{clientId}`. Topic names only; never a payload.
    pub fn topic_refused(&self, client_id: &str, action: &str, topic: &str, reason: &str) {
        let event = serde_json::json!({
            "clientId": client_id,
            "action": action,
            "topic": topic,
            "outcome": "refused",
            "reason": reason,
            "timestampUtc": timestamp_now(),
        });
        self.try_publish(
            edgedps_topics::admin::acl_event_topic(client_id),
            registration::to_json(&event),
        );
    }

    /// Clears the retained messages under `filter` in the router; how many there were.
    async fn purge_retained(&self, filter: String) -> usize {
        let (done, count) = oneshot::channel();
        let request = Outbound::PurgeRetained {
            filter: filter.clone(),
            done,
        };
        if self.outbound.send(request).await.is_err() {
            tracing::warn!(%filter, "outbound channel closed; retained messages not purged");
            return 0;
        }
        count.await.unwrap_or_else(|_| {
            tracing::warn!(%filter, "the router did not purge the retained messages");
            0
        })
    }

    /// Random id material, URL-safe.
    fn random_token(&self, bytes: usize) -> String {
        random_token(&self.random, bytes)
    }
}

/// Random id material, URL-safe.
fn random_token(random: &SystemRandom, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // SystemRandom fails only if the OS has no entropy source; fall back to time.
    if random.fill(&mut buf).is_err() {
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

/// A new etag: `"{random}"`.
pub(crate) fn new_etag() -> String {
    format!("\"{}\"", random_token(&SystemRandom::new(), 12))
}

impl GroupEntry {
    fn new(group: EnrollmentGroup) -> Result<GroupEntry, String> {
        let mut signing = Vec::new();
        let mut signing_der = Vec::new();
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
                    signing_der.push(der);
                }
            }
        }
        Ok(GroupEntry {
            group,
            signing,
            signing_der,
        })
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
