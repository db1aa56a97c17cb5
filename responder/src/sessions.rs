//! The registry of live device sessions (PROTOCOL B, "Retirement").
//!
//! Every attested device session is entered here for as long as it lives, reachable by
//! registration id, by the enrollment group that attested it, by the thumbprint of its
//! leaf certificate and by the issuers of its certificates. An admin write that takes a
//! device out of service finds the sessions it touches here and cuts them: the cut is
//! a flag the session checks before every use of its rights, and a wake-up for its task,
//! which then closes the connection (MQTT 5: DISCONNECT 0x98 first).
//!
//! Ordering: a session enters the registry before it reads the state its rights come
//! from, and a write changes that state before it looks for sessions here. So either
//! the session reads the new state, or the write finds the session.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use edgedps_policies::access::OutOfService;
use edgedps_topics::identity::RegistrationId;

use crate::{lock, Attested};

/// Why a live session was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A write took the device out of service (the access rule says why).
    OutOfService(OutOfService),
    /// Its registration record was cleared.
    Deregistered,
    /// It was retired in one step.
    Retired,
    /// Its standing could not be read after a write (store error): closed to be safe.
    Unverifiable,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::OutOfService(reason) => f.write_str(reason.reason()),
            Cut::Deregistered => f.write_str("the registration record was cleared"),
            Cut::Retired => f.write_str("the device was retired"),
            Cut::Unverifiable => f.write_str("the device's standing could not be read"),
        }
    }
}

/// One live device session.
pub struct LiveSession {
    id: u64,
    device: Attested,
    cut: OnceLock<Cut>,
    wake: Notify,
}

impl LiveSession {
    pub fn device(&self) -> &Attested {
        &self.device
    }

    /// Set once the session has been cut; from then on it has no rights at all.
    pub fn cut(&self) -> Option<Cut> {
        self.cut.get().copied()
    }

    /// Resolves when the session is cut.
    pub async fn cut_off(&self) -> Cut {
        loop {
            let woken = self.wake.notified();
            if let Some(cut) = self.cut() {
                return cut;
            }
            woken.await;
        }
    }

    /// Cuts the session and wakes it to close; true the first time.
    pub fn close(&self, why: Cut) -> bool {
        let first = self.revoke(why);
        if first {
            self.wake();
        }
        first
    }

    /// Cuts the session without waking it: it has no rights from now on (every packet
    /// and delivery checks), and closes when woken or when it next hears anything.
    /// True the first time.
    pub fn revoke(&self, why: Cut) -> bool {
        self.cut.set(why).is_ok()
    }

    /// Wakes a session that was cut, so that it closes its connection.
    pub fn wake(&self) {
        self.wake.notify_waiters();
        // A permit, in case the session is not waiting right now.
        self.wake.notify_one();
    }
}

/// What a write touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The sessions of one registration id (any case).
    Registration(&'a RegistrationId),
    /// The sessions an enrollment group attested.
    Group(&'a str),
    /// The sessions whose leaf certificate has this SHA-256 thumbprint (upper-case hex).
    Thumbprint(&'a str),
    /// The sessions with a certificate issued by this name (DER).
    Issuer(&'a [u8]),
}

/// Registration ids and thumbprints have one session each, rarely two: a `Vec` is
/// their lightest set. Groups and issuers have thousands: a `HashSet`.
#[derive(Default)]
struct Index {
    sessions: HashMap<u64, Arc<LiveSession>>,
    by_registration: HashMap<RegistrationId, Vec<u64>>,
    by_group: HashMap<String, HashSet<u64>>,
    by_thumbprint: HashMap<String, Vec<u64>>,
    by_issuer: HashMap<Vec<u8>, HashSet<u64>>,
}

/// The keys one session is filed under.
struct Keys {
    registration: RegistrationId,
    group: Option<String>,
    thumbprint: Option<String>,
    issuers: Vec<Vec<u8>>,
}

impl Keys {
    fn of(device: &Attested) -> Keys {
        Keys {
            registration: device.registration_id.clone(),
            group: device.source.group().map(str::to_owned),
            thumbprint: device.certificate.as_ref().map(|c| c.thumbprint.clone()),
            issuers: device
                .certificate
                .as_ref()
                .map(|c| c.issuers.clone())
                .unwrap_or_default(),
        }
    }
}

/// All live device sessions.
#[derive(Default)]
pub struct LiveSessions {
    index: Mutex<Index>,
    next: AtomicU64,
}

/// A session's place in the registry; leaving it (drop) takes the session out.
pub struct Entered {
    registry: Arc<LiveSessions>,
    session: Arc<LiveSession>,
}

impl Entered {
    pub fn session(&self) -> &Arc<LiveSession> {
        &self.session
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.registry.leave(&self.session);
    }
}

impl LiveSessions {
    /// Enters a session that was just attested.
    pub fn enter(self: &Arc<Self>, device: Attested) -> Entered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let keys = Keys::of(&device);
        let session = Arc::new(LiveSession {
            id,
            device,
            cut: OnceLock::new(),
            wake: Notify::new(),
        });
        let mut index = lock(&self.index);
        index.sessions.insert(id, session.clone());
        index
            .by_registration
            .entry(keys.registration)
            .or_default()
            .push(id);
        if let Some(group) = keys.group {
            index.by_group.entry(group).or_default().insert(id);
        }
        if let Some(thumbprint) = keys.thumbprint {
            index.by_thumbprint.entry(thumbprint).or_default().push(id);
        }
        for issuer in keys.issuers {
            index.by_issuer.entry(issuer).or_default().insert(id);
        }
        drop(index);
        Entered {
            registry: self.clone(),
            session,
        }
    }

    fn leave(&self, session: &LiveSession) {
        let keys = Keys::of(&session.device);
        let id = session.id;
        let mut index = lock(&self.index);
        index.sessions.remove(&id);
        unlist(&mut index.by_registration, &keys.registration, id);
        if let Some(group) = &keys.group {
            unfile(&mut index.by_group, group, id);
        }
        if let Some(thumbprint) = &keys.thumbprint {
            unlist(&mut index.by_thumbprint, thumbprint, id);
        }
        for issuer in &keys.issuers {
            unfile(&mut index.by_issuer, issuer, id);
        }
    }

    /// How many device sessions are live.
    pub fn len(&self) -> usize {
        lock(&self.index).sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live sessions any of `scopes` reaches, each once.
    pub fn find(&self, scopes: &[Scope<'_>]) -> Vec<Arc<LiveSession>> {
        let index = lock(&self.index);
        let mut ids = HashSet::new();
        for scope in scopes {
            match scope {
                Scope::Registration(id) => {
                    ids.extend(index.by_registration.get(*id).into_iter().flatten())
                }
                Scope::Group(group) => ids.extend(index.by_group.get(*group).into_iter().flatten()),
                Scope::Thumbprint(print) => {
                    ids.extend(index.by_thumbprint.get(*print).into_iter().flatten())
                }
                Scope::Issuer(issuer) => {
                    ids.extend(index.by_issuer.get(*issuer).into_iter().flatten())
                }
            }
        }
        ids.iter()
            .filter_map(|id| index.sessions.get(id).cloned())
            .collect()
    }
}

fn unlist<K, Q>(map: &mut HashMap<K, Vec<u64>>, key: &Q, id: u64)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(ids) = map.get_mut(key) {
        ids.retain(|filed| *filed != id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

fn unfile<K, Q>(map: &mut HashMap<K, HashSet<u64>>, key: &Q, id: u64)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(ids) = map.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EnrollmentSource;
    use edgedps_topics::admin::AttestationType;

    fn device(id: &str, group: Option<&str>) -> Attested {
        Attested {
            registration_id: id.into(),
            source: match group {
                Some(g) => EnrollmentSource::Group(g.into()),
                None => EnrollmentSource::Individual,
            },
            kind: AttestationType::SymmetricKey,
            certificate: None,
            token_expires: None,
            proven: true,
        }
    }

    #[test]
    fn sessions_are_found_by_registration_and_group_until_they_leave() {
        let registry = Arc::new(LiveSessions::default());
        let a = registry.enter(device("Dev-A", Some("fleet")));
        let b = registry.enter(device("dev-b", Some("fleet")));
        let c = registry.enter(device("dev-c", None));
        assert_eq!(registry.len(), 3);
        assert_eq!(
            registry.find(&[Scope::Registration(&"DEV-a".into())]).len(),
            1
        );
        assert_eq!(registry.find(&[Scope::Group("fleet")]).len(), 2);
        // Overlapping scopes give each session once.
        assert_eq!(
            registry
                .find(&[Scope::Group("fleet"), Scope::Registration(&"dev-b".into())])
                .len(),
            2
        );
        drop(b);
        assert_eq!(registry.find(&[Scope::Group("fleet")]).len(), 1);
        drop((a, c));
        assert!(registry.is_empty());
        assert!(lock(&registry.index).by_group.is_empty());
        assert!(lock(&registry.index).by_registration.is_empty());
    }

    #[tokio::test]
    async fn a_cut_wakes_the_session_once_and_stays() {
        let registry = Arc::new(LiveSessions::default());
        let entered = registry.enter(device("dev-1", None));
        let session = entered.session().clone();
        assert_eq!(session.cut(), None);
        let waiting = tokio::spawn({
            let session = session.clone();
            async move { session.cut_off().await }
        });
        tokio::task::yield_now().await;
        assert!(session.close(Cut::Retired));
        assert!(
            !session.close(Cut::Deregistered),
            "a second cut is not counted"
        );
        assert_eq!(waiting.await.unwrap(), Cut::Retired);
        assert_eq!(session.cut(), Some(Cut::Retired));
        // A session that was cut before it waited sees it at once.
        assert_eq!(session.cut_off().await, Cut::Retired);
    }
}
