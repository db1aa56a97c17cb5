//! The enrollment store (DESIGN: store): the [`Store`] trait the responder uses, and
//! [`SledStore`], its embedded implementation: sled trees with CBOR values.
//!
//! Trees: `enrollments` and `registrations` keyed by the canonical registration id,
//! `groups` by group id, `hubs` by host name, `crls` by the name an operator gave; for
//! the local hub, `twins` by device id, `messages` by device id and sequence, and
//! `device_ids` (device id to registration id, for devices whose ids differ); for cloud
//! hubs, `hub_secrets` (connection strings by host name, never in a record), and
//! `hub_outbox` and `hub_failed` (operations by host name and sequence); `device_keys`
//! (keys edgedps gave devices, by registration id, never in a record). A
//! write is acknowledged only after [`Store::durable`] covers it; writes that arrive
//! together share one flush (group commit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use crate::latency::LatencyHistogram;
use edgedps_topics::admin::{Enrollment, EnrollmentGroup, LinkedHub};
use edgedps_topics::cloud::HubOperation;
use edgedps_topics::hub::QueuedMessage;
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::RegistrationState;
use edgedps_topics::twin::Twin;

/// Records of one kind, read one at a time (a scan of a large store stays small).
pub type Scan<'a, T> = Box<dyn Iterator<Item = Result<T, StoreError>> + Send + 'a>;

/// What the responder keeps durably. Every `put` and `remove` is visible to the next
/// read at once and on disk once a later [`Store::durable`] returns.
pub trait Store: Send + Sync + 'static {
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<Enrollment>, StoreError>;
    fn put_enrollment(&self, e: &Enrollment) -> Result<(), StoreError>;
    fn remove_enrollment(&self, id: &RegistrationId) -> Result<bool, StoreError>;
    /// Enrollments in key order, from the first whose key (canonical registration id)
    /// comes after `after`: a scan can be read a page at a time.
    fn scan_enrollments(&self, after: Option<&str>) -> Scan<'_, Enrollment>;

    fn put_group(&self, g: &EnrollmentGroup) -> Result<(), StoreError>;
    fn remove_group(&self, group_id: &str) -> Result<bool, StoreError>;
    fn scan_groups(&self) -> Scan<'_, EnrollmentGroup>;

    fn put_hub(&self, h: &LinkedHub) -> Result<(), StoreError>;
    fn remove_hub(&self, host_name: &str) -> Result<bool, StoreError>;
    fn scan_hubs(&self) -> Scan<'_, LinkedHub>;

    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationState>, StoreError>;
    fn put_registration(&self, r: &RegistrationState) -> Result<(), StoreError>;
    /// Changes the stored record by `change` (which may decline with `None`) unless a
    /// writer changed it meanwhile, in which case `change` sees the new record. The
    /// record as left.
    fn update_registration(
        &self,
        id: &RegistrationId,
        change: &mut dyn FnMut(RegistrationState) -> Option<RegistrationState>,
    ) -> Result<Option<RegistrationState>, StoreError>;
    fn remove_registration(&self, id: &RegistrationId) -> Result<bool, StoreError>;
    /// Registrations in key order, after `after` as [`Store::scan_enrollments`].
    fn scan_registrations(&self, after: Option<&str>) -> Scan<'_, RegistrationState>;

    fn put_crl(&self, record: &CrlRecord) -> Result<(), StoreError>;
    fn remove_crl(&self, name: &str) -> Result<bool, StoreError>;
    fn scan_crls(&self) -> Scan<'_, CrlRecord>;

    /// The key edgedps gave a device (a TPM device's hub key, base64): a secret, kept
    /// apart from the registration record that is published.
    fn device_key(&self, id: &RegistrationId) -> Result<Option<String>, StoreError>;
    fn put_device_key(&self, id: &RegistrationId, key: &str) -> Result<(), StoreError>;
    fn remove_device_key(&self, id: &RegistrationId) -> Result<bool, StoreError>;

    /// The local hub's records: twins and cloud-to-device queues (PROTOCOL E).
    fn hub(&self) -> &dyn HubStore;

    /// Cloud hubs' connection strings and outboxes.
    fn cloud(&self) -> &dyn CloudStore;

    /// Waits until everything written before this call is on disk.
    fn durable(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>;

    /// How many disk flushes have run: less than the writes when they share flushes.
    fn flush_count(&self) -> u64;

    /// How the store performs, for metrics: cheap.
    fn stats(&self) -> StoreStats<'_> {
        StoreStats::default()
    }

    /// What the store holds, for metrics and the status page: may walk every record.
    fn counts(&self) -> StoreCounts {
        StoreCounts::default()
    }

    /// Can the store take writes? The reason when it cannot (its last flush failed).
    fn healthy(&self) -> Result<(), String> {
        Ok(())
    }

    fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError> {
        self.scan_enrollments(None).collect()
    }

    fn groups(&self) -> Result<Vec<EnrollmentGroup>, StoreError> {
        self.scan_groups().collect()
    }

    fn hubs(&self) -> Result<Vec<LinkedHub>, StoreError> {
        self.scan_hubs().collect()
    }

    fn registrations(&self) -> Result<Vec<RegistrationState>, StoreError> {
        self.scan_registrations(None).collect()
    }

    fn crls(&self) -> Result<Vec<CrlRecord>, StoreError> {
        self.scan_crls().collect()
    }
}

/// The local hub's records, in the same store and under the same flush rule as the
/// rest: twins by device id, and each device's queue of cloud-to-device messages in
/// the order they came.
pub trait HubStore: Send + Sync {
    fn twin(&self, device_id: &RegistrationId) -> Result<Option<Twin>, StoreError>;
    fn put_twin(&self, twin: &Twin) -> Result<(), StoreError>;
    fn remove_twin(&self, device_id: &RegistrationId) -> Result<bool, StoreError>;
    fn scan_twins(&self) -> Scan<'_, Twin>;

    /// The registration of a device whose device id is not its registration id (an
    /// individual enrollment's own `deviceId`), as the last assignment recorded it.
    fn device_registration(&self, device_id: &str) -> Result<Option<RegistrationId>, StoreError>;
    fn put_device_registration(
        &self,
        device_id: &str,
        registration_id: &RegistrationId,
    ) -> Result<(), StoreError>;

    /// Appends a message to the device's queue; its sequence number, which grows with
    /// every message ever queued.
    fn push_message(
        &self,
        device_id: &RegistrationId,
        message: &QueuedMessage,
    ) -> Result<u64, StoreError>;
    /// The device's queue, oldest first, at most `limit` messages after `after`.
    fn messages(
        &self,
        device_id: &RegistrationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, QueuedMessage)>, StoreError>;
    fn remove_message(&self, device_id: &RegistrationId, sequence: u64)
        -> Result<bool, StoreError>;
    /// Empties the device's queue; how many messages it held.
    fn clear_messages(&self, device_id: &RegistrationId) -> Result<usize, StoreError>;
}

/// What edgedps keeps for the cloud hubs it registers devices at: their connection
/// strings (secret), and each hub's outbox of operations in the order they were made,
/// and the operations the hub refused for good.
pub trait CloudStore: Send + Sync {
    fn hub_secret(&self, host_name: &str) -> Result<Option<String>, StoreError>;
    fn put_hub_secret(&self, host_name: &str, connection_string: &str) -> Result<(), StoreError>;
    fn remove_hub_secret(&self, host_name: &str) -> Result<bool, StoreError>;

    /// Appends `operation` to its hub's outbox, giving it its sequence number.
    fn enqueue(&self, operation: &mut HubOperation) -> Result<(), StoreError>;
    /// The first `limit` operations of `host_name`'s outbox (or of its failed ones).
    fn operations(
        &self,
        host_name: &str,
        failed: bool,
        limit: usize,
    ) -> Result<Vec<HubOperation>, StoreError>;
    /// Rewrites an operation where it is (its attempts and last error).
    fn put_operation(&self, operation: &HubOperation, failed: bool) -> Result<(), StoreError>;
    fn remove_operation(
        &self,
        host_name: &str,
        sequence: u64,
        failed: bool,
    ) -> Result<bool, StoreError>;
    /// How many operations `host_name` has waiting, and failed.
    fn operation_counts(&self, host_name: &str) -> (u64, u64);
    /// The hubs with operations waiting.
    fn hubs_with_operations(&self) -> Result<Vec<String>, StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record `{key}` in `{tree}` is not readable: {reason}")]
    Decode {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("store: could not encode a record: {0}")]
    Encode(String),
    #[error("store: flush to disk failed: {0}")]
    Flush(String),
}

/// A revocation list as stored: the list, the CA certificate that verified it, and the
/// certificates the operator sent with it (republished with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CrlRecord {
    pub name: String,
    pub crl: Vec<u8>,
    pub issuer_certificate: Vec<u8>,
    pub sent_certificates: Vec<Vec<u8>>,
}

/// How a store performs (each field when it knows).
#[derive(Default)]
pub struct StoreStats<'a> {
    pub size_on_disk: Option<u64>,
    /// How long each flush took.
    pub flush_latency: Option<&'a LatencyHistogram>,
    /// How long writers waited for their writes to be on disk (the group commit).
    pub write_latency: Option<&'a LatencyHistogram>,
}

/// What a store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Records of each kind: enrollments, groups, hubs, registrations, crls, twins.
    pub records: Vec<(&'static str, u64)>,
    /// Cloud-to-device messages waiting, over all devices.
    pub queued_messages: u64,
}

/// Flush progress shared between writers and the flusher thread.
#[derive(Debug, Clone, Default)]
struct FlushState {
    /// How many flushes ran (each may cover many writes).
    flushes: u64,
    flushed: u64,
    failed: u64,
    error: Option<String>,
}

struct GroupCommit {
    requested: AtomicU64,
    /// Set by a writer that wants a flush; the flusher thread waits on `woken`.
    wanted: std::sync::Mutex<bool>,
    woken: std::sync::Condvar,
    closed: AtomicBool,
    state: watch::Sender<FlushState>,
    flush_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
}

struct Inner {
    db: sled::Db,
    enrollments: sled::Tree,
    groups: sled::Tree,
    hubs: sled::Tree,
    registrations: sled::Tree,
    crls: sled::Tree,
    twins: sled::Tree,
    messages: sled::Tree,
    device_ids: sled::Tree,
    hub_secrets: sled::Tree,
    device_keys: sled::Tree,
    hub_outbox: sled::Tree,
    hub_failed: sled::Tree,
    commit: Arc<GroupCommit>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.commit.closed.store(true, Ordering::SeqCst);
        self.commit.wake();
    }
}

/// The embedded store; cheap to clone. The database closes (and its directory lock is
/// released) when the last handle is dropped.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

impl SledStore {
    /// Opens (or creates) the store in `path` and starts its flusher thread.
    pub fn open(path: &std::path::Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        let (state, _) = watch::channel(FlushState::default());
        let inner = Arc::new(Inner {
            enrollments: db.open_tree("enrollments")?,
            groups: db.open_tree("groups")?,
            hubs: db.open_tree("hubs")?,
            registrations: db.open_tree("registrations")?,
            crls: db.open_tree("crls")?,
            twins: db.open_tree("twins")?,
            messages: db.open_tree("messages")?,
            device_ids: db.open_tree("device_ids")?,
            hub_secrets: db.open_tree("hub_secrets")?,
            device_keys: db.open_tree("device_keys")?,
            hub_outbox: db.open_tree("hub_outbox")?,
            hub_failed: db.open_tree("hub_failed")?,
            db,
            commit: Arc::new(GroupCommit {
                requested: AtomicU64::new(0),
                wanted: std::sync::Mutex::new(false),
                woken: std::sync::Condvar::new(),
                closed: AtomicBool::new(false),
                state,
                flush_latency: LatencyHistogram::default(),
                write_latency: LatencyHistogram::default(),
            }),
        });
        let (store, commit) = (Arc::downgrade(&inner), inner.commit.clone());
        std::thread::Builder::new()
            .name("edgedps-flusher".into())
            .spawn(move || flusher(store, commit))
            .map_err(|e| StoreError::Flush(format!("cannot start the flusher thread: {e}")))?;
        Ok(SledStore { inner })
    }

    async fn flushed(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let outcome = self.wait_flushed().await;
        self.inner.commit.write_latency.record(started.elapsed());
        outcome
    }

    async fn wait_flushed(&self) -> Result<(), StoreError> {
        let ticket = self.inner.commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.inner.commit.state.subscribe();
        self.inner.commit.wake();
        let state = rx
            .wait_for(|s| s.flushed >= ticket || s.failed >= ticket)
            .await
            .map_err(|_| StoreError::Flush("flusher stopped".into()))?;
        if state.flushed >= ticket {
            Ok(())
        } else {
            Err(StoreError::Flush(
                state.error.clone().unwrap_or_else(|| "unknown".into()),
            ))
        }
    }
}

impl Store for SledStore {
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<Enrollment>, StoreError> {
        get(&self.inner.enrollments, "enrollments", &id.key())
    }

    fn put_enrollment(&self, e: &Enrollment) -> Result<(), StoreError> {
        put(&self.inner.enrollments, &e.registration_id.key(), e)
    }

    fn remove_enrollment(&self, id: &RegistrationId) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .enrollments
            .remove(id.key().as_bytes())?
            .is_some())
    }

    fn scan_enrollments(&self, after: Option<&str>) -> Scan<'_, Enrollment> {
        scan_after(&self.inner.enrollments, "enrollments", after)
    }

    fn put_group(&self, g: &EnrollmentGroup) -> Result<(), StoreError> {
        put(&self.inner.groups, &g.enrollment_group_id, g)
    }

    fn remove_group(&self, group_id: &str) -> Result<bool, StoreError> {
        Ok(self.inner.groups.remove(group_id)?.is_some())
    }

    fn scan_groups(&self) -> Scan<'_, EnrollmentGroup> {
        scan(&self.inner.groups, "groups")
    }

    fn put_hub(&self, h: &LinkedHub) -> Result<(), StoreError> {
        put(&self.inner.hubs, &h.host_name, h)
    }

    fn remove_hub(&self, host_name: &str) -> Result<bool, StoreError> {
        Ok(self.inner.hubs.remove(host_name)?.is_some())
    }

    fn scan_hubs(&self) -> Scan<'_, LinkedHub> {
        scan(&self.inner.hubs, "hubs")
    }

    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationState>, StoreError> {
        get(&self.inner.registrations, "registrations", &id.key())
    }

    fn put_registration(&self, r: &RegistrationState) -> Result<(), StoreError> {
        put(&self.inner.registrations, &r.registration_id.key(), r)
    }

    fn update_registration(
        &self,
        id: &RegistrationId,
        change: &mut dyn FnMut(RegistrationState) -> Option<RegistrationState>,
    ) -> Result<Option<RegistrationState>, StoreError> {
        let tree = &self.inner.registrations;
        let key = id.key();
        loop {
            let Some(current) = tree.get(key.as_bytes())? else {
                return Ok(None);
            };
            let record: RegistrationState = decode("registrations", key.as_bytes(), &current)?;
            let Some(changed) = change(record.clone()) else {
                return Ok(Some(record));
            };
            let bytes = encode(&changed)?;
            match tree.compare_and_swap(key.as_bytes(), Some(current), Some(bytes))? {
                Ok(()) => return Ok(Some(changed)),
                // Another writer came between: look again.
                Err(_) => continue,
            }
        }
    }

    fn remove_registration(&self, id: &RegistrationId) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .registrations
            .remove(id.key().as_bytes())?
            .is_some())
    }

    fn scan_registrations(&self, after: Option<&str>) -> Scan<'_, RegistrationState> {
        scan_after(&self.inner.registrations, "registrations", after)
    }

    fn put_crl(&self, record: &CrlRecord) -> Result<(), StoreError> {
        put(&self.inner.crls, &record.name, record)
    }

    fn remove_crl(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.inner.crls.remove(name)?.is_some())
    }

    fn scan_crls(&self) -> Scan<'_, CrlRecord> {
        scan(&self.inner.crls, "crls")
    }

    fn device_key(&self, id: &RegistrationId) -> Result<Option<String>, StoreError> {
        get(&self.inner.device_keys, "device_keys", &id.key())
    }

    fn put_device_key(&self, id: &RegistrationId, key: &str) -> Result<(), StoreError> {
        put(&self.inner.device_keys, &id.key(), &key)
    }

    fn remove_device_key(&self, id: &RegistrationId) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .device_keys
            .remove(id.key().as_bytes())?
            .is_some())
    }

    fn hub(&self) -> &dyn HubStore {
        self
    }

    fn cloud(&self) -> &dyn CloudStore {
        self
    }

    fn durable(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
    {
        Box::pin(self.flushed())
    }

    fn flush_count(&self) -> u64 {
        self.inner.commit.state.borrow().flushes
    }

    fn healthy(&self) -> Result<(), String> {
        let state = self.inner.commit.state.borrow();
        if state.failed > state.flushed {
            return Err(state
                .error
                .clone()
                .unwrap_or_else(|| "the last flush failed".into()));
        }
        Ok(())
    }

    fn stats(&self) -> StoreStats<'_> {
        StoreStats {
            size_on_disk: self.inner.db.size_on_disk().ok(),
            flush_latency: Some(&self.inner.commit.flush_latency),
            write_latency: Some(&self.inner.commit.write_latency),
        }
    }

    /// Counting records walks each tree: sled keeps no count.
    fn counts(&self) -> StoreCounts {
        let inner = &self.inner;
        let len = |tree: &sled::Tree| tree.len() as u64;
        StoreCounts {
            records: vec![
                ("enrollments", len(&inner.enrollments)),
                ("enrollment_groups", len(&inner.groups)),
                ("hubs", len(&inner.hubs)),
                ("registrations", len(&inner.registrations)),
                ("crls", len(&inner.crls)),
                ("twins", len(&inner.twins)),
            ],
            queued_messages: len(&inner.messages),
        }
    }
}

/// An outbox key: the hub's name, a NUL (no host name holds one), the sequence.
fn operation_key(host_name: &str, sequence: u64) -> Vec<u8> {
    let mut key = outbox_prefix(host_name);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn outbox_prefix(host_name: &str) -> Vec<u8> {
    let mut key = host_name.to_ascii_lowercase().into_bytes();
    key.push(0);
    key
}

impl SledStore {
    fn outbox(&self, failed: bool) -> &sled::Tree {
        match failed {
            false => &self.inner.hub_outbox,
            true => &self.inner.hub_failed,
        }
    }
}

impl CloudStore for SledStore {
    fn hub_secret(&self, host_name: &str) -> Result<Option<String>, StoreError> {
        get(
            &self.inner.hub_secrets,
            "hub_secrets",
            &host_name.to_ascii_lowercase(),
        )
    }

    fn put_hub_secret(&self, host_name: &str, connection_string: &str) -> Result<(), StoreError> {
        put(
            &self.inner.hub_secrets,
            &host_name.to_ascii_lowercase(),
            &connection_string,
        )
    }

    fn remove_hub_secret(&self, host_name: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .hub_secrets
            .remove(host_name.to_ascii_lowercase())?
            .is_some())
    }

    fn enqueue(&self, operation: &mut HubOperation) -> Result<(), StoreError> {
        operation.sequence = self.inner.db.generate_id()?;
        self.inner.hub_outbox.insert(
            operation_key(&operation.hub, operation.sequence),
            encode(operation)?,
        )?;
        Ok(())
    }

    fn operations(
        &self,
        host_name: &str,
        failed: bool,
        limit: usize,
    ) -> Result<Vec<HubOperation>, StoreError> {
        let tree = self.outbox(failed);
        let mut out = Vec::new();
        for entry in tree.scan_prefix(outbox_prefix(host_name)).take(limit) {
            let (key, value) = entry?;
            out.push(decode("hub_outbox", &key, &value)?);
        }
        Ok(out)
    }

    fn put_operation(&self, operation: &HubOperation, failed: bool) -> Result<(), StoreError> {
        self.outbox(failed).insert(
            operation_key(&operation.hub, operation.sequence),
            encode(operation)?,
        )?;
        Ok(())
    }

    fn remove_operation(
        &self,
        host_name: &str,
        sequence: u64,
        failed: bool,
    ) -> Result<bool, StoreError> {
        Ok(self
            .outbox(failed)
            .remove(operation_key(host_name, sequence))?
            .is_some())
    }

    fn operation_counts(&self, host_name: &str) -> (u64, u64) {
        let count = |tree: &sled::Tree| tree.scan_prefix(outbox_prefix(host_name)).count() as u64;
        (count(&self.inner.hub_outbox), count(&self.inner.hub_failed))
    }

    fn hubs_with_operations(&self) -> Result<Vec<String>, StoreError> {
        let mut hubs = Vec::new();
        let tree = &self.inner.hub_outbox;
        let mut next = tree.first()?;
        while let Some((key, _)) = next {
            let Some(end) = key.iter().position(|b| *b == 0) else {
                break;
            };
            let host = String::from_utf8_lossy(&key[..end]).into_owned();
            // Past every key of this hub: its name, then a byte above NUL.
            let mut after = key[..end].to_vec();
            after.push(1);
            next = tree.range(after..).next().transpose()?;
            hubs.push(host);
        }
        Ok(hubs)
    }
}

/// A queue's key prefix: the device's key and a NUL, which no device id holds.
fn queue_prefix(device_id: &RegistrationId) -> Vec<u8> {
    let mut key = device_id.key().as_bytes().to_vec();
    key.push(0);
    key
}

fn message_key(device_id: &RegistrationId, sequence: u64) -> Vec<u8> {
    let mut key = queue_prefix(device_id);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

impl HubStore for SledStore {
    fn twin(&self, device_id: &RegistrationId) -> Result<Option<Twin>, StoreError> {
        get(&self.inner.twins, "twins", &device_id.key())
    }

    fn put_twin(&self, twin: &Twin) -> Result<(), StoreError> {
        let key = RegistrationId::from(twin.device_id.as_str());
        put(&self.inner.twins, &key.key(), twin)
    }

    fn remove_twin(&self, device_id: &RegistrationId) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .twins
            .remove(device_id.key().as_bytes())?
            .is_some())
    }

    fn scan_twins(&self) -> Scan<'_, Twin> {
        scan(&self.inner.twins, "twins")
    }

    fn device_registration(&self, device_id: &str) -> Result<Option<RegistrationId>, StoreError> {
        let key = RegistrationId::from(device_id);
        get(&self.inner.device_ids, "device_ids", &key.key())
    }

    fn put_device_registration(
        &self,
        device_id: &str,
        registration_id: &RegistrationId,
    ) -> Result<(), StoreError> {
        let key = RegistrationId::from(device_id);
        put(&self.inner.device_ids, &key.key(), registration_id)
    }

    fn push_message(
        &self,
        device_id: &RegistrationId,
        message: &QueuedMessage,
    ) -> Result<u64, StoreError> {
        let sequence = self.inner.db.generate_id()?;
        self.inner
            .messages
            .insert(message_key(device_id, sequence), encode(message)?)?;
        Ok(sequence)
    }

    fn messages(
        &self,
        device_id: &RegistrationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, QueuedMessage)>, StoreError> {
        let prefix = queue_prefix(device_id);
        let start = match after {
            Some(after) => match after.checked_add(1) {
                Some(next) => message_key(device_id, next),
                None => return Ok(Vec::new()),
            },
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for entry in self.inner.messages.range(start..) {
            let (key, value) = entry?;
            let Some(sequence) = key
                .strip_prefix(prefix.as_slice())
                .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
                .map(u64::from_be_bytes)
            else {
                break;
            };
            out.push((sequence, decode("messages", &key, &value)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn remove_message(
        &self,
        device_id: &RegistrationId,
        sequence: u64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .messages
            .remove(message_key(device_id, sequence))?
            .is_some())
    }

    fn clear_messages(&self, device_id: &RegistrationId) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.inner.messages.scan_prefix(queue_prefix(device_id)) {
            let (key, _) = entry?;
            if self.inner.messages.remove(key)?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl GroupCommit {
    /// Asks the flusher thread for a flush (or, once closed, to stop).
    fn wake(&self) {
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.woken.notify_one();
    }

    /// Waits until a flush is wanted; false once the store is closed.
    fn wait(&self) -> bool {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        while !*wanted {
            wanted = self.woken.wait(wanted).unwrap_or_else(|p| p.into_inner());
        }
        *wanted = false;
        !self.closed.load(Ordering::SeqCst)
    }
}

/// The group commit: one flush covers every write requested before it started. An OS
/// thread of its own, not a task handing the flush to tokio's blocking pool: each
/// hand-off between threads waits for a core, and on a gateway whose two cores are busy
/// with TLS handshakes those waits were the whole of the register's p99 (BENCHMARKS.md,
/// issue 11).
fn flusher(store: Weak<Inner>, commit: Arc<GroupCommit>) {
    while commit.wait() {
        let target = commit.requested.load(Ordering::SeqCst);
        if commit.state.borrow().flushed >= target {
            continue;
        }
        let Some(db) = store.upgrade().map(|inner| inner.db.clone()) else {
            return;
        };
        let started = std::time::Instant::now();
        let outcome = db.flush().map_err(|e| e.to_string());
        commit.flush_latency.record(started.elapsed());
        drop(db);
        commit.state.send_modify(|state| match outcome {
            Ok(_) => {
                state.flushes += 1;
                state.flushed = state.flushed.max(target);
            }
            Err(error) => {
                tracing::error!(%error, "store flush failed; pending writes are reported as failed");
                state.failed = state.failed.max(target);
                state.error = Some(error);
            }
        });
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut bytes).map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(bytes)
}

fn put<T: Serialize>(tree: &sled::Tree, key: &str, value: &T) -> Result<(), StoreError> {
    tree.insert(key, encode(value)?)?;
    Ok(())
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Decode {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        Some(bytes) => decode(name, key.as_bytes(), &bytes).map(Some),
        None => Ok(None),
    }
}

fn scan<'a, T: DeserializeOwned + 'a>(tree: &'a sled::Tree, name: &'static str) -> Scan<'a, T> {
    scan_after(tree, name, None)
}

/// The records of `tree` in key order, from the first key after `after`.
fn scan_after<'a, T: DeserializeOwned + 'a>(
    tree: &'a sled::Tree,
    name: &'static str,
    after: Option<&str>,
) -> Scan<'a, T> {
    use std::ops::Bound;
    let items = match after {
        None => tree.iter(),
        Some(after) => {
            tree.range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded))
        }
    };
    Box::new(items.map(move |item| {
        let (key, bytes) = item?;
        decode(name, &key, &bytes)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgedps_topics::cloud::HubAction;
    use edgedps_topics::registration::RegistrationStatus;

    fn operation(hub: &str, id: &str) -> HubOperation {
        HubOperation {
            hub: hub.into(),
            sequence: 0,
            registration_id: id.into(),
            device_id: id.into(),
            action: HubAction::Disable,
            identity: None,
            twin: None,
            attempts: 0,
            last_error: None,
            enqueued_at: "t".into(),
        }
    }

    #[test]
    fn outboxes_keep_each_hub_s_operations_in_order_and_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let outbox = store.cloud();
        let mut sent = Vec::new();
        for (hub, id) in [
            ("Hub-B", "d1"),
            ("hub-a", "d1"),
            ("hub-b", "d2"),
            ("hub-b", "d1"),
        ] {
            let mut op = operation(hub, id);
            outbox.enqueue(&mut op).unwrap();
            sent.push(op);
        }
        let ids = |ops: Vec<HubOperation>| -> Vec<u64> { ops.iter().map(|o| o.sequence).collect() };
        assert_eq!(
            ids(outbox.operations("hub-b", false, 10).unwrap()),
            [sent[0].sequence, sent[2].sequence, sent[3].sequence]
        );
        assert_eq!(
            ids(outbox.operations("HUB-B", false, 1).unwrap()),
            [sent[0].sequence]
        );
        assert_eq!(outbox.hubs_with_operations().unwrap(), ["hub-a", "hub-b"]);
        // Failed: moved aside, counted apart.
        let mut failed = sent[2].clone();
        failed.last_error = Some("404".into());
        outbox.put_operation(&failed, true).unwrap();
        assert!(outbox
            .remove_operation("hub-b", failed.sequence, false)
            .unwrap());
        assert_eq!(outbox.operation_counts("hub-b"), (2, 1));
        assert_eq!(
            outbox.operations("hub-b", true, 10).unwrap()[0]
                .last_error
                .as_deref(),
            Some("404")
        );
        assert!(outbox
            .remove_operation("hub-a", sent[1].sequence, false)
            .unwrap());
        assert_eq!(outbox.hubs_with_operations().unwrap(), ["hub-b"]);
        // Secrets by host name in any case.
        outbox
            .put_hub_secret("Hub-A", "HostName=hub-a;...")
            .unwrap();
        assert!(outbox.hub_secret("hub-a").unwrap().is_some());
        assert!(outbox.remove_hub_secret("HUB-A").unwrap());
    }

    #[test]
    fn an_update_of_a_record_sees_the_write_that_came_between() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let id = RegistrationId::from("dev-1");
        store
            .put_registration(&RegistrationState::new(
                id.clone(),
                RegistrationStatus::Assigned,
            ))
            .unwrap();
        let mut calls = 0;
        let updated = store
            .update_registration(&id, &mut |mut record| {
                calls += 1;
                if calls == 1 {
                    // Another writer, between the read and the swap.
                    let mut other = record.clone();
                    other.device_id = Some("written-between".into());
                    store.put_registration(&other).unwrap();
                }
                record.etag = Some("mine".into());
                Some(record)
            })
            .unwrap()
            .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(updated.device_id.as_deref(), Some("written-between"));
        assert_eq!(updated.etag.as_deref(), Some("mine"));
        // Declined: left as it was.
        let kept = store
            .update_registration(&id, &mut |_| None)
            .unwrap()
            .unwrap();
        assert_eq!(kept, updated);
        assert!(store
            .update_registration(&RegistrationId::from("none"), &mut |r| Some(r))
            .unwrap()
            .is_none());
    }

    fn message(n: u8) -> QueuedMessage {
        QueuedMessage {
            property_bag: format!("n={n}"),
            payload: vec![n],
            enqueued: 1,
            expires: 2,
        }
    }

    #[test]
    fn each_device_s_queue_keeps_its_order_and_no_other_device_s_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let hub = store.hub();
        let (a, ab) = (
            RegistrationId::from("dev-a"),
            RegistrationId::from("dev-ab"),
        );
        let mut sequences = Vec::new();
        for n in 0..5 {
            sequences.push(hub.push_message(&a, &message(n)).unwrap());
            hub.push_message(&ab, &message(100 + n)).unwrap();
        }
        // A device id that is a prefix of another's does not read the other's queue.
        let all = hub.messages(&a, None, 100).unwrap();
        let payloads: Vec<u8> = all.iter().map(|(_, m)| m.payload[0]).collect();
        assert_eq!(payloads, [0, 1, 2, 3, 4]);
        assert_eq!(hub.messages(&a, None, 100).unwrap().len(), 5);
        // Pages: after a sequence, at most `limit`.
        let page = hub.messages(&a, Some(sequences[1]), 2).unwrap();
        assert_eq!(
            page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            sequences[2..4]
        );
        assert!(hub.messages(&a, Some(u64::MAX), 2).unwrap().is_empty());
        // Case does not make another queue.
        assert!(hub
            .remove_message(&RegistrationId::from("DEV-A"), sequences[0])
            .unwrap());
        assert_eq!(hub.messages(&a, None, 100).unwrap().len(), 4);
        assert_eq!(hub.clear_messages(&a).unwrap(), 4);
        assert_eq!(hub.messages(&a, None, 100).unwrap().len(), 0);
        assert_eq!(hub.messages(&ab, None, 100).unwrap().len(), 5);
    }

    #[tokio::test]
    async fn twins_and_queues_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = RegistrationId::from("dev-1");
        {
            let store = SledStore::open(dir.path()).unwrap();
            let twin = Twin::initial("dev-1", None);
            store.hub().put_twin(&twin).unwrap();
            store.hub().push_message(&id, &message(7)).unwrap();
            store
                .hub()
                .put_device_registration("custom", &RegistrationId::from("reg-1"))
                .unwrap();
            store.durable().await.unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let hub = store.hub();
        assert_eq!(
            hub.twin(&id).unwrap().map(|t| t.device_id),
            Some("dev-1".into())
        );
        assert_eq!(hub.scan_twins().count(), 1);
        assert_eq!(hub.messages(&id, None, 10).unwrap()[0].1, message(7));
        assert_eq!(
            hub.device_registration("CUSTOM").unwrap(),
            Some(RegistrationId::from("reg-1"))
        );
        assert!(hub.remove_twin(&id).unwrap());
        assert!(hub.twin(&id).unwrap().is_none());
    }

    #[tokio::test]
    async fn concurrent_writes_share_flushes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut tasks = Vec::new();
            for i in 0..50 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    store
                        .put_registration(&RegistrationState::new(
                            format!("Dev-{i}").into(),
                            RegistrationStatus::Assigned,
                        ))
                        .unwrap();
                    store.durable().await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let flushes = store.flush_count();
            assert!(
                (1..50).contains(&flushes),
                "50 writes took {flushes} flushes"
            );
        }
        // The flusher may hold the database for the length of a flush after the last
        // handle is gone; wait for the lock to be released.
        let mut reopened = SledStore::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reopened = SledStore::open(dir.path());
        }
        let store = reopened.unwrap();
        assert_eq!(store.registrations().unwrap().len(), 50);
        assert!(store.registration(&"DEV-7".into()).unwrap().is_some());
    }
}
