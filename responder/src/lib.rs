//! The provisioning state machine of edgedps: lookups, the store, and the effects of
//! every decision `edgedps_policies` makes. No sockets here.
//!
//! The broker hands the responder what a device presented at CONNECT
//! ([`Responder::admit`], `connect.rs`), then each register and poll
//! ([`Responder::register`], [`Responder::poll`], `registration.rs`), and each operator
//! write ([`Responder::apply_admin`], `admin.rs`; [`Responder::retire`], `retire.rs`).
//! Every answer is a value: the bytes to send back and the [`Publication`]s (retained
//! records, results, events) the broker then publishes into its router. A write that
//! takes devices out of service also cuts their live sessions (`sessions.rs`).

mod admin;
mod cloud;
mod connect;
mod crl;
mod custom;
mod error;
mod explain;
mod geo;
pub mod hub;
mod issuance;
mod latency;
mod limits;
mod overview;
mod records;
mod registration;
mod report;
mod retire;
pub mod sessions;
mod standing;
pub mod store;
mod throttle;
mod tpm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use edgedps_policies::access::Access;
use edgedps_policies::attestation::GroupCredentials;
use edgedps_policies::revocation::RevocationList;
use edgedps_topics::admin::{AllocationPolicy, LinkedHub};
use edgedps_topics::identity::RegistrationId;

pub use cloud::{Attempt, HubTarget, OutboxStats, HUB_ANSWER_TIMEOUT};
pub use connect::{Admission, Admitted};
pub use custom::{BoxFuture, Outside};
pub use edgedps_policies::attestation::{
    Attested, Credential, EnrollmentSource, PresentedCertificate,
};
pub use error::Error;
pub use geo::ProbeTarget;
pub use latency::{LatencyHistogram, LatencySummary};
pub use limits::GroupRefusal;
pub use overview::{HubOverview, Overview};
pub use records::RecordReading;
pub use registration::Reply;
pub use retire::RetainedMessages;
pub use sessions::{Cut, Entered, LiveSession, LiveSessions, Scope};
pub use standing::Standing;
pub use store::{SledStore, Store, StoreCounts, StoreError, StoreStats};
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
    /// The local hub's queues.
    pub hub: hub::HubSettings,
    /// Certificate authorities that issue device certificates (PROTOCOL F), by name.
    pub certificate_authorities:
        BTreeMap<String, Arc<edgedps_policies::issuance::CertificateAuthority>>,
    /// Connection strings of the configuration's hubs, by host name (operators may
    /// write others over `dps/hubs/`).
    pub hub_credentials: BTreeMap<String, edgedps_policies::cloud::ConnectionString>,
    /// How long a register waits for a `before_answer` hub.
    pub hub_answer_timeout: std::time::Duration,
    /// How long a custom allocator may take before the registration fails (400207).
    pub custom_allocation_timeout: std::time::Duration,
    /// How long a register waits for a custom allocator before it answers `202
    /// assigning` and the device polls.
    pub custom_allocation_wait: std::time::Duration,
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
            hub: hub::HubSettings::default(),
            certificate_authorities: BTreeMap::new(),
            hub_credentials: BTreeMap::new(),
            hub_answer_timeout: cloud::HUB_ANSWER_TIMEOUT,
            custom_allocation_timeout: std::time::Duration::from_secs(5),
            custom_allocation_wait: std::time::Duration::from_millis(50),
        }
    }
}

/// A message the broker publishes on the responder's behalf: a retained record, a
/// result, an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Publication {
    /// A retained record, in JSON.
    pub fn record<T: serde::Serialize>(topic: String, record: &T) -> Publication {
        Publication {
            topic,
            payload: to_json(record),
            retain: true,
        }
    }

    /// An empty retained message: the record is gone.
    pub fn cleared(topic: String) -> Publication {
        Publication {
            topic,
            payload: Vec::new(),
            retain: true,
        }
    }

    /// A message that is not retained (a result, an event).
    pub fn message(topic: String, payload: Vec<u8>) -> Publication {
        Publication {
            topic,
            payload,
            retain: false,
        }
    }

    /// An event, in JSON.
    pub fn event<T: serde::Serialize>(topic: String, event: &T) -> Publication {
        Publication::message(topic, to_json(event))
    }
}

/// A 202 operation a device may poll.
struct Operation {
    registration_id: RegistrationId,
    /// The 200 answer, encoded when it is polled; `None` while a custom allocator has
    /// not answered (polls answer `202 assigning`).
    answer: Option<edgedps_topics::registration::OperationStatus>,
    encoding: edgedps_topics::encoding::Encoding,
    device_id: Option<String>,
    expires: Instant,
}

pub struct Responder {
    settings: Settings,
    store: Arc<dyn Store>,
    groups: RwLock<BTreeMap<String, GroupCredentials>>,
    hubs: RwLock<BTreeMap<String, LinkedHub>>,
    /// Verified revocation lists by name.
    crls: RwLock<BTreeMap<String, RevocationList>>,
    sessions: Arc<LiveSessions>,
    operations: Mutex<HashMap<String, Operation>>,
    in_flight: Mutex<HashSet<RegistrationId>>,
    random: SystemRandom,
    throttle: throttle::Throttle,
    register_latency: latency::LatencyHistogram,
    /// Operator writes applied so far: what a session read about its device before can
    /// be used again while this has not moved (see `standing.rs`).
    writes: AtomicU64,
    /// The live hub sessions, by device (`hub/`).
    hub_links: Arc<hub::HubLinks>,
    /// Twin changes and certificate renewals, one at a time (`hub/`).
    hub_writes: tokio::sync::Mutex<()>,
    /// Cloud-to-device queue writes, one at a time (`hub/messages.rs`).
    queue_writes: tokio::sync::Mutex<()>,
    /// Method calls waiting for the device's answer, by request id (`hub/methods.rs`).
    method_calls: Mutex<edgedps_policies::methods::PendingCalls>,
    /// Twin changes written, by devices and operators (for metrics).
    twin_updates: AtomicU64,
    /// Cloud hubs: credentials, outbox wake-ups, registers waiting (`cloud.rs`).
    cloud: cloud::CloudHubs,
    /// TPM devices' open challenges (`tpm.rs`).
    tpm: tpm::Challenges,
    /// The broker's custom allocators and publisher (`custom.rs`).
    outside: std::sync::OnceLock<Arc<dyn Outside>>,
    /// Round trips of custom allocators that answered.
    custom_latency: latency::LatencyHistogram,
    /// Hubs' measured latencies (`geo.rs`).
    latencies: geo::Latencies,
    /// Enrollment groups' `maxDevices` and rate (`limits.rs`).
    group_gates: limits::GroupGates,
}

impl Responder {
    /// Loads groups, hubs and revocation lists from `store`.
    pub fn open(settings: Settings, store: Arc<dyn Store>) -> Result<Responder, Error> {
        let mut groups = BTreeMap::new();
        for group in store.scan_groups() {
            let group = group?;
            let id = group.enrollment_group_id.clone();
            let entry = GroupCredentials::new(group).map_err(|e| Error::BadGroup {
                group: id.clone(),
                reason: e.to_string(),
            })?;
            groups.insert(id, entry);
        }
        let mut hubs = BTreeMap::new();
        for hub in store.scan_hubs() {
            let hub = hub?;
            hubs.insert(hub.host_name.clone(), hub);
        }
        let mut crls = BTreeMap::new();
        for record in store.scan_crls() {
            let record = record?;
            let list =
                RevocationList::reload(&record.crl, &record.issuer_certificate).map_err(|e| {
                    Error::BadCrl {
                        name: record.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
            crls.insert(record.name, list);
        }
        let cloud = cloud::CloudHubs::new(&settings.hub_credentials);
        let responder = Responder {
            cloud,
            tpm: tpm::Challenges::default(),
            outside: std::sync::OnceLock::new(),
            custom_latency: latency::LatencyHistogram::default(),
            latencies: geo::Latencies::default(),
            group_gates: limits::GroupGates::default(),
            throttle: throttle::Throttle::new(&settings.rate_limits),
            register_latency: latency::LatencyHistogram::default(),
            settings,
            store,
            groups: RwLock::new(groups),
            hubs: RwLock::new(hubs),
            crls: RwLock::new(crls),
            sessions: Arc::new(LiveSessions::default()),
            operations: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            random: SystemRandom::new(),
            writes: AtomicU64::new(0),
            twin_updates: AtomicU64::new(0),
            hub_links: Arc::default(),
            hub_writes: tokio::sync::Mutex::new(()),
            queue_writes: tokio::sync::Mutex::new(()),
            method_calls: Mutex::new(edgedps_policies::methods::PendingCalls::new(
                hub::MAX_PENDING_CALLS,
            )),
        };
        responder.load_hub_secrets()?;
        let geo = Some(AllocationPolicy::GeoLatency);
        if responder.settings.allocation_policy == AllocationPolicy::GeoLatency
            || read(&responder.groups)
                .values()
                .any(|g| g.group.settings.allocation_policy == geo)
        {
            responder.latencies.want();
        }
        Ok(responder)
    }

    /// Server-side latency of the registrations answered so far.
    pub fn register_latency(&self) -> LatencySummary {
        self.register_latency.summary()
    }

    /// Round trips of the custom allocators that answered so far.
    pub fn custom_allocation_latency(&self) -> LatencySummary {
        self.custom_latency.summary()
    }

    /// The registration record of `registration_id`, as stored.
    pub fn registration_record(
        &self,
        registration_id: &str,
    ) -> Result<Option<edgedps_topics::registration::RegistrationState>, Error> {
        Ok(self
            .store
            .registration(&RegistrationId::from(registration_id))?)
    }

    /// The live device sessions.
    pub fn sessions(&self) -> &Arc<LiveSessions> {
        &self.sessions
    }

    /// A session was refused a topic (an ACL denial or a refused subscription): the
    /// event for `dps/events/acl/{clientId}`. Topic names only; never a payload.
    pub fn topic_refused(
        &self,
        client_id: &str,
        action: &str,
        topic: &str,
        reason: &str,
    ) -> Publication {
        let event = edgedps_topics::events::AclEvent {
            client_id: client_id.to_owned(),
            action: action.to_owned(),
            topic: topic.to_owned(),
            outcome: "refused".into(),
            reason: reason.to_owned(),
            timestamp_utc: timestamp_now(),
        };
        Publication::event(event.topic(), &event)
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
                None => match self.standing(session.device(), None) {
                    Ok(standing) => match standing.access(session.device()) {
                        Access::OutOfService(reason) => Cut::OutOfService(reason),
                        _ => continue,
                    },
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
        let count = count(cut.len());
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

    /// Linked hubs with the latency last measured to each (geoLatency, explain).
    fn linked_hubs_measured(&self) -> Vec<LinkedHub> {
        let mut hubs = self.linked_hubs();
        let latencies = read(&self.latencies.by_hub);
        for hub in &mut hubs {
            hub.latency = latencies.get(&hub.host_name.to_ascii_lowercase()).cloned();
        }
        hubs
    }

    /// Linked hubs as their records show them: with what is set of their credentials
    /// and their latency. (Allocation, on every register, reads
    /// [`Responder::linked_hubs`] without them.)
    fn shown_hubs(&self) -> Vec<LinkedHub> {
        let mut hubs = self.linked_hubs_measured();
        for hub in &mut hubs {
            hub.credentials = self.credentials_shown(&hub.host_name);
        }
        hubs
    }

    /// Marks an operator write applied: what sessions read before is read again.
    fn written(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// Random id material, URL-safe.
    fn random_token(&self, bytes: usize) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.random_bytes(bytes))
    }

    fn random_bytes(&self, bytes: usize) -> Vec<u8> {
        random_bytes(&self.random, bytes)
    }

    /// A new etag for a record.
    fn new_etag(&self) -> String {
        edgedps_topics::etag(&self.random_bytes(12))
    }
}

/// `bytes` random bytes in lower-case hex: tracking ids, correlation ids, assigned
/// client ids.
pub fn random_hex(bytes: usize) -> String {
    random_bytes(&SystemRandom::new(), bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_bytes(random: &SystemRandom, bytes: usize) -> Vec<u8> {
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
    buf
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
    format_timestamp(time::OffsetDateTime::now_utc())
}

/// The DPS timestamp of `unix` seconds.
pub fn timestamp_at(unix: i64) -> String {
    format_timestamp(
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

fn format_timestamp(now: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    );
    now.format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.0000000Z".into())
}

/// A count for a result or an event.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    edgedps_topics::encoding::Encoding::Json.encode(value)
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
