//! The enrollment store: sled trees with CBOR values (DESIGN: store).
//!
//! Trees: `enrollments` and `registrations` keyed by lower-case registration id,
//! `groups` by group id, `hubs` by host name, `crls` by the name an operator gave. A write is acknowledged only after a flush
//! that covers it; writes that arrive together share one flush (group commit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use edgedps_topics::admin::{Enrollment, EnrollmentGroup, LinkedHub};
use edgedps_topics::registration::RegistrationState;

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

/// Flush progress shared between writers and the flusher task.
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
    wake: Notify,
    closed: AtomicBool,
    state: watch::Sender<FlushState>,
}

struct Inner {
    db: sled::Db,
    enrollments: sled::Tree,
    groups: sled::Tree,
    hubs: sled::Tree,
    registrations: sled::Tree,
    crls: sled::Tree,
    commit: Arc<GroupCommit>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.commit.closed.store(true, Ordering::SeqCst);
        self.commit.wake.notify_one();
    }
}

/// A handle on the store; cheap to clone. The database closes (and its directory lock
/// is released) when the last handle is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store in `path` and starts its flusher task; call from
    /// inside a tokio runtime.
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
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
            db,
            commit: Arc::new(GroupCommit {
                requested: AtomicU64::new(0),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                state,
            }),
        });
        tokio::spawn(flusher(Arc::downgrade(&inner), inner.commit.clone()));
        Ok(Store { inner })
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let ticket = self.inner.commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.inner.commit.state.subscribe();
        self.inner.commit.wake.notify_one();
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

    /// How many disk flushes have run: less than the writes when they share flushes.
    pub fn flush_count(&self) -> u64 {
        self.inner.commit.state.borrow().flushes
    }

    pub fn enrollment(&self, registration_id: &str) -> Result<Option<Enrollment>, StoreError> {
        get(
            &self.inner.enrollments,
            "enrollments",
            &registration_id.to_ascii_lowercase(),
        )
    }

    pub fn put_enrollment(&self, e: &Enrollment) -> Result<(), StoreError> {
        put(
            &self.inner.enrollments,
            &e.registration_id.to_ascii_lowercase(),
            e,
        )
    }

    pub fn remove_enrollment(&self, registration_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .enrollments
            .remove(registration_id.to_ascii_lowercase())?
            .is_some())
    }

    pub fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError> {
        all(&self.inner.enrollments, "enrollments")
    }

    pub fn put_group(&self, g: &EnrollmentGroup) -> Result<(), StoreError> {
        put(&self.inner.groups, &g.enrollment_group_id, g)
    }

    pub fn remove_group(&self, group_id: &str) -> Result<bool, StoreError> {
        Ok(self.inner.groups.remove(group_id)?.is_some())
    }

    pub fn groups(&self) -> Result<Vec<EnrollmentGroup>, StoreError> {
        all(&self.inner.groups, "groups")
    }

    pub fn put_hub(&self, h: &LinkedHub) -> Result<(), StoreError> {
        put(&self.inner.hubs, &h.host_name, h)
    }

    pub fn remove_hub(&self, host_name: &str) -> Result<bool, StoreError> {
        Ok(self.inner.hubs.remove(host_name)?.is_some())
    }

    pub fn hubs(&self) -> Result<Vec<LinkedHub>, StoreError> {
        all(&self.inner.hubs, "hubs")
    }

    pub fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<RegistrationState>, StoreError> {
        get(
            &self.inner.registrations,
            "registrations",
            &registration_id.to_ascii_lowercase(),
        )
    }

    pub fn put_registration(&self, r: &RegistrationState) -> Result<(), StoreError> {
        put(
            &self.inner.registrations,
            &r.registration_id.to_ascii_lowercase(),
            r,
        )
    }

    pub fn remove_registration(&self, registration_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .registrations
            .remove(registration_id.to_ascii_lowercase())?
            .is_some())
    }

    pub fn registrations(&self) -> Result<Vec<RegistrationState>, StoreError> {
        all(&self.inner.registrations, "registrations")
    }

    pub fn put_crl(&self, record: &CrlRecord) -> Result<(), StoreError> {
        put(&self.inner.crls, &record.name, record)
    }

    pub fn remove_crl(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.inner.crls.remove(name)?.is_some())
    }

    pub fn crls(&self) -> Result<Vec<CrlRecord>, StoreError> {
        all(&self.inner.crls, "crls")
    }
}

async fn flusher(store: Weak<Inner>, commit: Arc<GroupCommit>) {
    loop {
        commit.wake.notified().await;
        if commit.closed.load(Ordering::SeqCst) {
            return;
        }
        let target = commit.requested.load(Ordering::SeqCst);
        if commit.state.borrow().flushed >= target {
            continue;
        }
        let Some(db) = store.upgrade().map(|inner| inner.db.clone()) else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || db.flush()).await;
        let outcome = match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("flush task: {e}")),
        };
        commit.state.send_modify(|state| match outcome {
            Ok(()) => {
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

fn all<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|item| {
            let (key, bytes) = item?;
            decode(name, &key, &bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writes_share_flushes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut tasks = Vec::new();
            for i in 0..50 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    store
                        .put_registration(&RegistrationState {
                            registration_id: format!("Dev-{i}"),
                            status: "assigned".into(),
                            ..Default::default()
                        })
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
        let mut reopened = Store::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reopened = Store::open(dir.path());
        }
        let store = reopened.unwrap();
        assert_eq!(store.registrations().unwrap().len(), 50);
        assert!(store.registration("DEV-7").unwrap().is_some());
    }
}
