//! Registration at cloud hubs: every assignment to a linked hub with a connection
//! string, and every retirement or re-enabling of a device assigned to one, becomes an
//! operation in that hub's outbox, written with the registration record and made
//! durable in the same flush. The broker's worker for the hub (`edgedps::cloud`) takes
//! the operations in order, sends them to the hub's service API and reports each attempt
//! here; the record's `hubRegistration` and an event follow every change of state.
//!
//! The connection strings are kept apart from the hub records (`hub_secrets`): the
//! retained `dps/hubs/{hostName}` record says only that one is set, and its policy name.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use edgedps_policies::cloud::{self as policy, ConnectionString, Credentials};
use edgedps_policies::validation::Invalid;
use edgedps_topics::admin::{AttestationType, LinkedHub, RecordKind};
use edgedps_topics::cloud::{
    outbox_result_topic, CredentialsShown, DeviceStatus, HubAction, HubOperation, HubRegistration,
    HubRegistrationMode, HubRegistrationState, OutboxEntry, OutboxReport, OutboxRequest, TwinBody,
    TwinWrite,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::events::{RegistrationEvent, RegistrationOutcome};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::{RegistrationState, Substatus};

use crate::standing::Standing;
use crate::{lock, read, timestamp_now, write, Attested, EnrollmentSource, Error, Publication};
use crate::{Responder, StoreError};

/// Operations an operator's outbox request lists, of each kind.
const LISTED: usize = 100;

/// The cloud hubs' credentials, the workers' wake-ups, the registers waiting for a hub,
/// and what each hub's worker has done.
#[derive(Default)]
pub(crate) struct CloudHubs {
    /// Connection strings by lower-case host name: the configuration's, then the
    /// operators'.
    credentials: RwLock<BTreeMap<String, ConnectionString>>,
    /// Wakes the worker of a hub (by lower-case host name) when it has work.
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Wakes the broker when a hub may need a worker it has not started.
    hubs_changed: Arc<Notify>,
    /// Registers waiting for their operation (`registration = "before_answer"`).
    waiters: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    counters: Mutex<BTreeMap<String, Arc<HubCounters>>>,
    /// Hubs given operations whose flush has not run yet: their workers are woken after
    /// it, so that a worker never reads a record older than its operation.
    enqueued: Mutex<std::collections::BTreeSet<String>>,
}

#[derive(Default)]
struct HubCounters {
    attempts: AtomicU64,
    failures: AtomicU64,
    done: AtomicU64,
}

/// Where and how to reach a hub's service API.
#[derive(Debug, Clone)]
pub struct HubTarget {
    pub host_name: String,
    /// `host:port` to dial; `{hostName}:443` when not set.
    pub service_address: Option<String>,
    pub credentials: ConnectionString,
}

/// What one attempt at an operation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done,
    /// Tried again later; the reason is kept on the record.
    Retry(String),
    /// Refused for good; an operator must act (and may retry).
    Failed(String),
}

/// One hub's outbox, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    pub hub: String,
    pub pending: u64,
    pub failed: u64,
    pub attempts: u64,
    pub failures: u64,
    pub done: u64,
}

/// A register that waits for its hub.
pub(crate) struct HubWait {
    sequence: u64,
    receiver: oneshot::Receiver<Result<(), String>>,
}

impl CloudHubs {
    pub(crate) fn new(configured: &BTreeMap<String, ConnectionString>) -> CloudHubs {
        let hubs = CloudHubs::default();
        *write(&hubs.credentials) = configured
            .iter()
            .map(|(host, c)| (host.to_ascii_lowercase(), c.clone()))
            .collect();
        hubs
    }

    fn any(&self) -> bool {
        !read(&self.credentials).is_empty()
    }

    fn has_credentials(&self, host_name: &str) -> bool {
        read(&self.credentials).contains_key(&host_name.to_ascii_lowercase())
    }

    fn waker(&self, host_name: &str) -> Arc<Notify> {
        lock(&self.wakers)
            .entry(host_name.to_ascii_lowercase())
            .or_default()
            .clone()
    }

    fn counters(&self, host_name: &str) -> Arc<HubCounters> {
        lock(&self.counters)
            .entry(host_name.to_ascii_lowercase())
            .or_default()
            .clone()
    }

    /// Wakes the hub's worker (the supervisor starts one for every hub with credentials,
    /// and is told when credentials are written).
    fn wake(&self, host_name: &str) {
        self.waker(host_name).notify_one();
    }

    /// After the flush that made `host_name`'s new operation durable.
    fn wake_after_flush(&self, host_name: &str) {
        lock(&self.enqueued).insert(host_name.to_ascii_lowercase());
    }

    fn wake_flushed(&self) {
        let hubs = std::mem::take(&mut *lock(&self.enqueued));
        for hub in hubs {
            self.wake(&hub);
        }
    }
}

impl Responder {
    /// Waits until every write so far is on disk, then wakes the workers of hubs given
    /// operations meanwhile.
    pub(crate) async fn durable(&self) -> Result<(), Error> {
        self.store.durable().await?;
        self.cloud.wake_flushed();
        Ok(())
    }

    /// Puts every write so far on disk (a shutdown's last step).
    pub async fn flush(&self) -> Result<(), Error> {
        self.durable().await
    }

    /// Loads the connection strings operators wrote (they override the configuration's).
    pub(crate) fn load_hub_secrets(&self) -> Result<(), Error> {
        let mut credentials = write(&self.cloud.credentials);
        for hub in read(&self.hubs).keys() {
            if let Some(text) = self.store.cloud().hub_secret(hub)? {
                let parsed = ConnectionString::parse_for(&text, hub).map_err(|e| {
                    Error::Store(StoreError::Decode {
                        tree: "hub_secrets",
                        key: hub.clone(),
                        reason: e.to_string(),
                    })
                })?;
                credentials.insert(hub.to_ascii_lowercase(), parsed);
            }
        }
        Ok(())
    }

    /// Is any hub registered at through an outbox?
    pub(crate) fn any_cloud_hub(&self) -> bool {
        self.cloud.any()
    }

    /// The hubs a worker should serve: those with credentials or operations waiting.
    pub fn cloud_hubs(&self) -> Result<Vec<String>, Error> {
        let mut hubs: Vec<String> = read(&self.cloud.credentials).keys().cloned().collect();
        for hub in self.store.cloud().hubs_with_operations()? {
            if !hubs.contains(&hub) {
                hubs.push(hub);
            }
        }
        Ok(hubs)
    }

    /// Notified when a hub may need a worker (credentials written, work enqueued).
    pub fn cloud_hubs_changed(&self) -> Arc<Notify> {
        self.cloud.hubs_changed.clone()
    }

    /// Notified when `host_name`'s outbox has new work.
    pub fn outbox_waker(&self, host_name: &str) -> Arc<Notify> {
        self.cloud.waker(host_name)
    }

    /// How to reach `host_name`'s service API, while it is linked with credentials.
    pub fn hub_target(&self, host_name: &str) -> Option<HubTarget> {
        let credentials = read(&self.cloud.credentials)
            .get(&host_name.to_ascii_lowercase())
            .cloned()?;
        let hub = self.linked_hub(host_name)?;
        Some(HubTarget {
            host_name: hub.host_name,
            service_address: hub.service_address,
            credentials,
        })
    }

    /// A linked hub by name, any case: an operator's link wins over the configuration's.
    fn linked_hub(&self, host_name: &str) -> Option<LinkedHub> {
        let same = |h: &&LinkedHub| h.host_name.eq_ignore_ascii_case(host_name);
        if let Some(hub) = read(&self.hubs).values().find(same) {
            return Some(hub.clone());
        }
        self.settings.hubs.iter().find(same).cloned()
    }

    /// The oldest operation of `host_name`'s outbox.
    pub fn next_hub_operation(&self, host_name: &str) -> Result<Option<HubOperation>, Error> {
        Ok(self
            .store
            .cloud()
            .operations(host_name, false, 1)?
            .into_iter()
            .next())
    }

    /// Records an attempt at `operation`: done and failed ones leave the outbox (failed
    /// ones for `hub_failed`, where an operator may retry them); retried ones stay with
    /// their count and reason. The record's `hubRegistration` follows, durably; what to
    /// publish is returned.
    pub async fn hub_operation_attempted(
        &self,
        mut operation: HubOperation,
        attempt: Attempt,
    ) -> Result<Vec<Publication>, Error> {
        let counters = self.cloud.counters(&operation.hub);
        counters.attempts.fetch_add(1, Ordering::Relaxed);
        operation.attempts = operation.attempts.saturating_add(1);
        let outbox = self.store.cloud();
        let state = match &attempt {
            Attempt::Done => {
                counters.done.fetch_add(1, Ordering::Relaxed);
                operation.last_error = None;
                outbox.remove_operation(&operation.hub, operation.sequence, false)?;
                HubRegistrationState::Done
            }
            Attempt::Retry(reason) => {
                operation.last_error = Some(reason.clone());
                outbox.put_operation(&operation, false)?;
                HubRegistrationState::Pending
            }
            Attempt::Failed(reason) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                operation.last_error = Some(reason.clone());
                outbox.put_operation(&operation, true)?;
                outbox.remove_operation(&operation.hub, operation.sequence, false)?;
                HubRegistrationState::Failed
            }
        };
        match &attempt {
            Attempt::Done => {
                tracing::info!(hub = %operation.hub, registration_id = %operation.registration_id, action = ?operation.action, attempts = operation.attempts, "hub has the device")
            }
            Attempt::Retry(reason) => {
                tracing::warn!(hub = %operation.hub, registration_id = %operation.registration_id, attempts = operation.attempts, %reason, "hub operation will be tried again")
            }
            Attempt::Failed(reason) => {
                tracing::error!(hub = %operation.hub, registration_id = %operation.registration_id, action = ?operation.action, %reason, "hub refused the operation; `edgedps admin hub-outbox --retry` sends it again")
            }
        }
        let registration = operation.registration(state, timestamp_now());
        let record = self.set_hub_registration(&operation, registration.clone())?;
        self.durable().await?;
        let finished = match attempt {
            Attempt::Done => Some(Ok(())),
            Attempt::Failed(reason) => Some(Err(reason)),
            Attempt::Retry(_) => None,
        };
        if let Some(outcome) = finished {
            if let Some(waiter) = lock(&self.cloud.waiters).remove(&operation.sequence) {
                let _ = waiter.send(outcome);
            }
        }
        let mut publish = Vec::with_capacity(2);
        if let Some(record) = record {
            publish.push(Publication::record(
                RecordKind::Registration.record_topic(record.registration_id.as_str()),
                &record,
            ));
        }
        publish.push(hub_event(&operation, registration));
        Ok(publish)
    }

    /// Sets `hubRegistration` on the device's record while it still describes
    /// `operation` (a newer register or retirement has its own). The record if changed.
    fn set_hub_registration(
        &self,
        operation: &HubOperation,
        registration: HubRegistration,
    ) -> Result<Option<RegistrationState>, Error> {
        let mut changed = false;
        let record = self.store.update_registration(
            &operation.registration_id,
            &mut |mut record: RegistrationState| {
                let ours = record
                    .hub_registration
                    .as_ref()
                    .is_some_and(|h| h.sequence == operation.sequence);
                if !ours {
                    return None;
                }
                record.hub_registration = Some(registration.clone());
                changed = true;
                Some(record)
            },
        )?;
        Ok(record.filter(|_| changed))
    }

    /// At a register whose record is being written (`state`, not yet stored): the
    /// operation that brings its cloud hub up to date, enqueued (durable with the
    /// record's flush), and `state.hubRegistration` set. What the register waits for
    /// when the hub says `before_answer`.
    pub(crate) fn register_at_hub(
        &self,
        device: &Attested,
        standing: &Standing,
        state: &mut RegistrationState,
        changed: bool,
    ) -> Result<Option<HubWait>, Error> {
        let (Some(hub), Some(device_id)) = (state.assigned_hub.clone(), state.device_id.clone())
        else {
            return Ok(None);
        };
        if !self.cloud.has_credentials(&hub) || self.is_local_hub(&hub) {
            return Ok(None);
        }
        let old = standing.registration.as_ref().filter(|r| r.is_assigned());
        if !changed {
            // The record stands: send again only what the hub does not have yet.
            match state.hub_registration.as_ref().map(|h| h.state) {
                Some(HubRegistrationState::Done | HubRegistrationState::Pending) => {
                    return Ok(None)
                }
                Some(HubRegistrationState::Failed) | None => {}
            }
        }
        let twin_now = TwinBody::of(state.initial_twin.as_ref());
        let twin = match old {
            Some(old) if changed && old.assigned_hub.as_deref() != Some(hub.as_str()) => {
                match (state.substatus, old.assigned_hub.as_deref()) {
                    (Some(Substatus::DeviceDataMigrated), Some(from)) => {
                        self.migrated_twin(from, &device_id, twin_now)?
                    }
                    _ => TwinWrite::Replace(twin_now),
                }
            }
            // Same hub: the twin is written again only when the policy reset it, or when
            // the hub never had the device from us.
            Some(old) if changed => {
                let never = old.hub_registration.is_none();
                match state.substatus == Some(Substatus::DeviceDataReset) || never {
                    true => TwinWrite::Replace(twin_now),
                    false => {
                        return self.enqueue_register(device, standing, state, hub, device_id, None)
                    }
                }
            }
            _ => TwinWrite::Replace(twin_now),
        };
        self.enqueue_register(device, standing, state, hub, device_id, Some(twin))
    }

    fn enqueue_register(
        &self,
        device: &Attested,
        standing: &Standing,
        state: &mut RegistrationState,
        hub: String,
        device_id: String,
        twin: Option<TwinWrite>,
    ) -> Result<Option<HubWait>, Error> {
        let credentials = self.credentials_of(device, standing, state);
        let Some(identity) =
            policy::identity(&device_id, device.kind, &credentials, DeviceStatus::Enabled)
        else {
            tracing::warn!(registration_id = %device.registration_id, %hub, "the hub's registry cannot be told of this device's attestation; register it at the hub yourself");
            return Ok(None);
        };
        let sequence = self.enqueue(
            state,
            &hub,
            device_id,
            HubAction::Register,
            Some(identity),
            twin,
        )?;
        let before_answer = self
            .linked_hub(&hub)
            .is_some_and(|h| h.registration == HubRegistrationMode::BeforeAnswer);
        let wait = before_answer.then(|| {
            let (sender, receiver) = oneshot::channel();
            lock(&self.cloud.waiters).insert(sequence, sender);
            HubWait { sequence, receiver }
        });
        Ok(wait)
    }

    /// Appends an operation for `record`'s device to `hub`'s outbox (durable with the
    /// caller's flush, its worker woken after it) and marks the record `pending` with
    /// it. The operation's sequence.
    fn enqueue(
        &self,
        record: &mut RegistrationState,
        hub: &str,
        device_id: String,
        action: HubAction,
        identity: Option<edgedps_topics::cloud::DeviceIdentity>,
        twin: Option<TwinWrite>,
    ) -> Result<u64, Error> {
        let mut operation = HubOperation {
            hub: hub.to_owned(),
            sequence: 0,
            registration_id: record.registration_id.clone(),
            device_id,
            action,
            identity,
            twin,
            attempts: 0,
            last_error: None,
            enqueued_at: timestamp_now(),
        };
        self.store.cloud().enqueue(&mut operation)?;
        record.hub_registration = Some(
            operation.registration(HubRegistrationState::Pending, operation.enqueued_at.clone()),
        );
        self.cloud.wake_after_flush(hub);
        Ok(operation.sequence)
    }

    /// The device's data for a hub it moved to: read at the hub it left when that one
    /// is a cloud hub with credentials, copied from the local twin when it left this
    /// gateway, else the record's.
    fn migrated_twin(
        &self,
        from: &str,
        device_id: &str,
        recorded: TwinBody,
    ) -> Result<TwinWrite, Error> {
        if self.is_local_hub(from) {
            let twin = self.store.hub().twin(&RegistrationId::from(device_id))?;
            return Ok(TwinWrite::Replace(match twin {
                Some(twin) => TwinBody::of(Some(twin.record_body().as_value())),
                None => recorded,
            }));
        }
        if self.cloud.has_credentials(from) {
            return Ok(TwinWrite::Migrate {
                from: from.to_owned(),
                fallback: recorded,
            });
        }
        Ok(TwinWrite::Replace(recorded))
    }

    /// What the hub's registry must hold for the device to connect as it attested.
    fn credentials_of(
        &self,
        device: &Attested,
        standing: &Standing,
        state: &RegistrationState,
    ) -> Credentials {
        let mut credentials = Credentials {
            issued: state
                .issued_certificates
                .iter()
                .filter(|c| !c.revoked)
                .map(|c| c.sha256_thumbprint.clone())
                .collect(),
            ..Credentials::default()
        };
        match (&device.source, device.kind) {
            (EnrollmentSource::Group(group), AttestationType::SymmetricKey) => {
                let groups = read(&self.groups);
                let keys = groups
                    .get(group)
                    .and_then(|g| g.group.attestation.symmetric_key.clone());
                let derive = |key: &Option<String>| {
                    key.as_deref().and_then(|k| {
                        edgedps_policies::sas::derive_device_key(k, device.registration_id.as_str())
                            .ok()
                    })
                };
                if let Some(keys) = keys {
                    credentials.symmetric_keys =
                        derive(&keys.primary_key).map(|p| (p, derive(&keys.secondary_key)));
                }
            }
            (EnrollmentSource::Individual, AttestationType::SymmetricKey) => {
                let enrollment = self
                    .store
                    .enrollment(&device.registration_id)
                    .ok()
                    .flatten();
                if let Some(keys) = enrollment.and_then(|e| e.attestation.symmetric_key) {
                    credentials.symmetric_keys =
                        keys.primary_key.map(|p| (p, keys.secondary_key.clone()));
                }
            }
            (EnrollmentSource::Group(_), AttestationType::X509) => {
                credentials.certificate_authority = true;
            }
            (EnrollmentSource::Individual, AttestationType::X509) => {
                let leaf = device
                    .certificate
                    .as_ref()
                    .and_then(|c| c.chain.first())
                    .map(|der| edgedps_policies::x509::thumbprint(der));
                let enrolled = standing
                    .individual
                    .as_ref()
                    .map(|e| edgedps_policies::validation::enrolled_thumbprints(&e.attestation))
                    .unwrap_or_default();
                credentials.thumbprints = leaf.into_iter().collect();
                for print in enrolled {
                    if !credentials.thumbprints.contains(&print) {
                        credentials.thumbprints.push(print);
                    }
                }
            }
            (_, AttestationType::Tpm) => {
                // Written by this register before the hub is told (`tpm.rs`).
                match self.store.device_key(&device.registration_id) {
                    Ok(key) => credentials.symmetric_keys = key.map(|k| (k, None)),
                    Err(e) => {
                        tracing::warn!(registration_id = %device.registration_id, error = %e, "cannot read the device's hub key")
                    }
                }
            }
        }
        credentials
    }

    /// A register that waits for its hub (`before_answer`): `Err` with the reason when
    /// the hub refused the device or did not answer in time.
    pub(crate) async fn wait_for_hub(&self, wait: HubWait) -> Result<(), String> {
        let timeout = self.settings.hub_answer_timeout;
        let outcome = tokio::time::timeout(timeout, wait.receiver).await;
        lock(&self.cloud.waiters).remove(&wait.sequence);
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the hub's worker stopped".into()),
            Err(_) => Err(format!(
                "the hub did not take the device within {} s (it stays in the outbox)",
                timeout.as_secs_f32()
            )),
        }
    }

    /// A device taken out of service (`Disable`) or back in (`Enable`): its identity at
    /// its cloud hub follows, by an operation enqueued now (durable with the caller's
    /// flush). Sets `record.hubRegistration`; false when the hub is not a cloud hub with
    /// credentials.
    pub(crate) fn hub_status_changed(
        &self,
        record: &mut RegistrationState,
        action: HubAction,
    ) -> Result<bool, Error> {
        let (Some(hub), Some(device_id)) = (record.assigned_hub.clone(), record.device_id.clone())
        else {
            return Ok(false);
        };
        if !self.cloud.has_credentials(&hub) || self.is_local_hub(&hub) {
            return Ok(false);
        }
        self.enqueue(record, &hub, device_id, action, None, None)?;
        Ok(true)
    }

    /// As [`Responder::hub_status_changed`] for a record that is not being rewritten
    /// otherwise: the record with its new `hubRegistration` is stored (not yet flushed)
    /// and returned for publishing.
    pub(crate) fn hub_status_of(
        &self,
        registration_id: &RegistrationId,
        action: HubAction,
    ) -> Result<Option<RegistrationState>, Error> {
        let Some(mut record) = self.store.registration(registration_id)? else {
            return Ok(None);
        };
        if !record.is_assigned() || !self.hub_status_changed(&mut record, action)? {
            return Ok(None);
        }
        record.etag = Some(self.new_etag());
        self.store.put_registration(&record)?;
        Ok(Some(record))
    }

    /// The connection string of a hub record being written: checked, stored apart, and
    /// shown on the record only as set. An empty one removes it; none keeps the stored.
    pub(crate) fn hub_credentials_written(&self, hub: &mut LinkedHub) -> Result<(), Error> {
        let host = hub.host_name.clone();
        match hub.connection_string.take() {
            Some(text) if text.trim().is_empty() => {
                self.store.cloud().remove_hub_secret(&host)?;
                write(&self.cloud.credentials).remove(&host.to_ascii_lowercase());
                if let Some(configured) = self.settings.hub_credentials.get(&host) {
                    write(&self.cloud.credentials)
                        .insert(host.to_ascii_lowercase(), configured.clone());
                }
            }
            Some(text) => {
                let parsed = ConnectionString::parse_for(&text, &host).map_err(|e| {
                    Error::Invalid(Invalid::BadRequest(format!("connectionString: {e}")))
                })?;
                self.store.cloud().put_hub_secret(&host, &parsed.expose())?;
                write(&self.cloud.credentials).insert(host.to_ascii_lowercase(), parsed);
                self.cloud.hubs_changed.notify_one();
            }
            None => {}
        }
        hub.credentials = self.credentials_shown(&host);
        Ok(())
    }

    /// What a hub record shows of the hub's credentials.
    pub(crate) fn credentials_shown(&self, host_name: &str) -> Option<CredentialsShown> {
        read(&self.cloud.credentials)
            .get(&host_name.to_ascii_lowercase())
            .map(|c| CredentialsShown {
                shared_access_key_name: c.key_name.clone(),
            })
    }

    /// An unlinked hub's connection string goes with it (the configuration's stays).
    pub(crate) fn hub_unlinked(&self, host_name: &str) -> Result<(), Error> {
        self.store.cloud().remove_hub_secret(host_name)?;
        write(&self.cloud.credentials).remove(&host_name.to_ascii_lowercase());
        self.cloud.wake(host_name);
        Ok(())
    }

    /// Each hub's outbox, for metrics.
    pub fn outbox_stats(&self) -> Vec<OutboxStats> {
        let hubs = self.cloud_hubs().unwrap_or_default();
        hubs.into_iter()
            .map(|hub| {
                let (pending, failed) = self.store.cloud().operation_counts(&hub);
                let counters = self.cloud.counters(&hub);
                OutboxStats {
                    pending,
                    failed,
                    attempts: counters.attempts.load(Ordering::Relaxed),
                    failures: counters.failures.load(Ordering::Relaxed),
                    done: counters.done.load(Ordering::Relaxed),
                    hub,
                }
            })
            .collect()
    }

    /// `dps/admin/hub-outbox/{hostName}`: the hub's outbox, and with `{"retry": true}`
    /// its failed operations sent again (those whose record has moved on are dropped).
    /// The answer for `dps/admin/results/hub-outbox/{hostName}`.
    pub async fn hub_outbox(
        &self,
        operator: &str,
        host_name: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> Publication {
        let report = match self.hub_outbox_inner(host_name, body, encoding).await {
            Ok(report) => report,
            Err(e) => OutboxReport {
                host_name: host_name.to_owned(),
                ok: false,
                message: Some(e.to_string()),
                credentials: self.cloud.has_credentials(host_name),
                pending: 0,
                failed: 0,
                retried: None,
                superseded: None,
                operations: Vec::new(),
            },
        };
        if report.retried.is_some() {
            tracing::info!(target: "edgedps::audit", operator, hub = host_name, retried = report.retried, superseded = report.superseded, "hub outbox retried");
        }
        Publication::message(outbox_result_topic(host_name), encoding.encode(&report))
    }

    async fn hub_outbox_inner(
        &self,
        host_name: &str,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<OutboxReport, Error> {
        self.within_body_limit(body)?;
        let request = if body.iter().all(u8::is_ascii_whitespace) {
            OutboxRequest::default()
        } else {
            encoding.decode::<OutboxRequest>(body).map_err(|e| {
                crate::admin::bad(format!(
                    "body is not an outbox request ({{\"retry\": true}}): {e}"
                ))
            })?
        };
        if self.linked_hub(host_name).is_none()
            && !self
                .cloud_hubs()?
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host_name))
        {
            return Err(Error::NotFound(format!("no linked hub `{host_name}`")));
        }
        let outbox = self.store.cloud();
        let (mut retried, mut superseded) = (None, None);
        if request.retry {
            let (mut sent, mut dropped) = (0, 0);
            for mut operation in outbox.operations(host_name, true, usize::MAX)? {
                outbox.remove_operation(&operation.hub, operation.sequence, true)?;
                let old = operation.sequence;
                operation.attempts = 0;
                operation.last_error = None;
                let record = self.store.registration(&operation.registration_id)?;
                let current = record
                    .and_then(|r| r.hub_registration)
                    .is_some_and(|h| h.sequence == old);
                if !current {
                    dropped += 1;
                    continue;
                }
                outbox.enqueue(&mut operation)?;
                let pending =
                    operation.registration(HubRegistrationState::Pending, timestamp_now());
                self.store
                    .update_registration(&operation.registration_id, &mut |mut r| {
                        let ours = r
                            .hub_registration
                            .as_ref()
                            .is_some_and(|h| h.sequence == old);
                        ours.then(|| {
                            r.hub_registration = Some(pending.clone());
                            r
                        })
                    })?;
                sent += 1;
            }
            self.durable().await?;
            self.cloud.wake(host_name);
            retried = Some(sent);
            superseded = Some(dropped);
        }
        let failed = outbox.operations(host_name, true, LISTED)?;
        let pending = outbox.operations(host_name, false, LISTED)?;
        let (pending_count, failed_count) = outbox.operation_counts(host_name);
        let operations = failed
            .iter()
            .map(|op| OutboxEntry::of(op, HubRegistrationState::Failed))
            .chain(
                pending
                    .iter()
                    .map(|op| OutboxEntry::of(op, HubRegistrationState::Pending)),
            )
            .collect();
        Ok(OutboxReport {
            host_name: host_name.to_owned(),
            ok: true,
            message: None,
            credentials: self.cloud.has_credentials(host_name),
            pending: pending_count,
            failed: failed_count,
            retried,
            superseded,
            operations,
        })
    }
}

/// The event of a change of a device's registration at its hub.
fn hub_event(operation: &HubOperation, registration: HubRegistration) -> Publication {
    let event = RegistrationEvent {
        registration_id: operation.registration_id.to_string(),
        outcome: RegistrationOutcome::HubRegistration,
        request: None,
        enrollment_group_id: None,
        assigned_hub: Some(operation.hub.clone()),
        error_code: None,
        message: registration.last_error.clone(),
        issued_certificate: None,
        hub_registration: Some(registration),
        allocation: None,
        timestamp_utc: timestamp_now(),
    };
    Publication::event(event.topic(), &event)
}

/// How long a register waits for a `before_answer` hub by default.
pub const HUB_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
