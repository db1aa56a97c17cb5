//! Twins (PROTOCOL E): read by devices (GET), patched by devices (reported) and
//! operators (desired, tags). Every change is durable before it is acknowledged, and
//! the retained `hub/twins/{deviceId}` record follows it.
//!
//! A device's twin is made when it is assigned to a local hub, from its registration's
//! initial twin (the enrollment's `initialTwin`), and made again when a
//! re-provisioning resets its data (`migrateDeviceData: false`). A device assigned
//! before twins were kept gets its twin from its registration on first use.

use std::sync::atomic::Ordering;

use edgedps_policies::twin::{self, PatchError};
use edgedps_topics::hub::{self as hub_topics, codes, HubError, TwinResult};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::RegistrationState;
use edgedps_topics::twin::Twin;

use super::HubEvent;
use crate::{timestamp_now, to_json, Error, Publication, Responder};

/// The answer to a device's `$iothub/` request.
#[derive(Debug, Clone, PartialEq)]
pub struct HubAnswer {
    pub status: u16,
    /// JSON.
    pub body: Vec<u8>,
    /// The reported properties' new `$version` (a 204).
    pub version: Option<u64>,
    /// Seconds to wait before asking again (a 429).
    pub retry_after: Option<u32>,
    /// What goes to the router: the twin record after a change.
    pub publish: Vec<Publication>,
}

impl Responder {
    /// The device's twin: the stored one, or the one its registration gives it.
    /// `None` when the local hub does not serve the device.
    fn load_twin(&self, device_id: &str) -> Result<Option<Twin>, Error> {
        let id = RegistrationId::from(device_id);
        if let Some(twin) = self.store.hub().twin(&id)? {
            return Ok(Some(twin));
        }
        Ok(self.local_registration(device_id)?.map(|record| {
            let spelled = record.device_id.as_deref().unwrap_or(device_id);
            Twin::initial(spelled, record.initial_twin.as_ref())
        }))
    }

    /// A device's twin request within its rate, or the 429 that answers it.
    fn twin_throttled(&self, device_id: &str) -> Option<HubAnswer> {
        let id = RegistrationId::from(device_id);
        let wait = self
            .throttle
            .admit_twin_request(&id, std::time::Instant::now())
            .err()?;
        tracing::info!(%device_id, retry_after = wait, "twin request throttled");
        let mut answer = self.hub_error(
            429,
            codes::THROTTLED,
            &format!("too many twin requests; retry in {wait} s"),
        );
        answer.retry_after = Some(wait);
        Some(answer)
    }

    /// `$iothub/twin/GET`: the device's desired and reported properties.
    pub fn twin_get(&self, device_id: &str) -> HubAnswer {
        if let Some(throttled) = self.twin_throttled(device_id) {
            return throttled;
        }
        match self.load_twin(device_id) {
            Ok(Some(twin)) => HubAnswer {
                status: 200,
                body: to_json(&twin.device_body()),
                version: None,
                retry_after: None,
                publish: Vec::new(),
            },
            Ok(None) => self.hub_error(404, codes::DEVICE_NOT_FOUND, "the device has no twin here"),
            Err(e) => self.hub_failure(device_id, &e),
        }
    }

    /// `$iothub/twin/PATCH/properties/reported`: a 204 with the new `$version` once the
    /// patch is on disk, or a 400 with the reason and nothing changed.
    pub async fn twin_reported(&self, device_id: &str, body: &[u8]) -> HubAnswer {
        if let Some(throttled) = self.twin_throttled(device_id) {
            return throttled;
        }
        let patch = match twin::parse(body) {
            Ok(patch) => patch,
            Err(e) => return self.hub_error(400, codes::BAD_FORMAT, &e.to_string()),
        };
        let changed = self
            .change_twin(device_id, |twin| twin::patch_reported(twin, &patch))
            .await;
        match changed {
            Ok(Some((twin, version))) => HubAnswer {
                status: 204,
                body: Vec::new(),
                version: Some(version),
                retry_after: None,
                publish: vec![twin_record(&twin)],
            },
            Ok(None) => self.hub_error(404, codes::DEVICE_NOT_FOUND, "the device has no twin here"),
            Err(TwinWriteError::Patch(e)) => self.hub_error(400, codes::BAD_FORMAT, &e.to_string()),
            Err(TwinWriteError::Store(e)) => self.hub_failure(device_id, &e),
        }
    }

    /// An operator's desired-properties patch (`hub/twins/{deviceId}/desired`): the
    /// result, the twin record, and a notification to the device's live sessions.
    pub async fn twin_desired(&self, device_id: &str, body: &[u8]) -> Vec<Publication> {
        self.operator_patch(device_id, body, |twin, patch| {
            let notification = twin::patch_desired(twin, patch)?;
            let version = twin.desired.version;
            let event = HubEvent::Desired {
                version,
                body: to_json(&notification),
            };
            Ok((Some(version), Some(event)))
        })
        .await
    }

    /// An operator's tags patch (`hub/twins/{deviceId}/tags`): the result and the twin
    /// record. Devices do not see tags.
    pub async fn twin_tags(&self, device_id: &str, body: &[u8]) -> Vec<Publication> {
        self.operator_patch(device_id, body, |twin, patch| {
            twin::patch_tags(twin, patch).map(|()| (None, None))
        })
        .await
    }

    /// An operator's patch: `apply` gives the new version for the result and what the
    /// device's live sessions are told, once the change is on disk.
    async fn operator_patch(
        &self,
        device_id: &str,
        body: &[u8],
        apply: impl FnOnce(
            &mut Twin,
            &serde_json::Map<String, serde_json::Value>,
        ) -> Result<(Option<u64>, Option<HubEvent>), PatchError>,
    ) -> Vec<Publication> {
        let patch = match twin::parse(body) {
            Ok(patch) => patch,
            Err(e) => return vec![twin_refused(device_id, 400, &e.to_string())],
        };
        match self
            .change_twin(device_id, |twin| apply(twin, &patch))
            .await
        {
            Ok(Some((twin, (version, event)))) => {
                if let Some(event) = event {
                    self.hub_links
                        .tell(&RegistrationId::from(device_id), &event);
                }
                vec![twin_record(&twin), twin_accepted(device_id, version)]
            }
            Ok(None) => vec![twin_refused(
                device_id,
                404,
                &format!("`{device_id}` is not a device of the local hub"),
            )],
            Err(TwinWriteError::Patch(e)) => vec![twin_refused(device_id, 400, &e.to_string())],
            Err(TwinWriteError::Store(e)) => {
                tracing::error!(%device_id, error = %e, "twin patch not applied: store error");
                vec![twin_refused(device_id, 500, &e.to_string())]
            }
        }
    }

    /// Reads the twin, applies `change`, writes it and waits for the disk. One change
    /// at a time, so that versions count every patch once.
    async fn change_twin<T>(
        &self,
        device_id: &str,
        change: impl FnOnce(&mut Twin) -> Result<T, PatchError>,
    ) -> Result<Option<(Twin, T)>, TwinWriteError> {
        let (twin, out) = {
            let _one_at_a_time = self.hub_writes.lock().await;
            let Some(mut twin) = self.load_twin(device_id)? else {
                return Ok(None);
            };
            let out = change(&mut twin).map_err(TwinWriteError::Patch)?;
            self.store.hub().put_twin(&twin)?;
            (twin, out)
        };
        self.store.durable().await?;
        self.twin_updates.fetch_add(1, Ordering::Relaxed);
        Ok(Some((twin, out)))
    }

    /// After a registration is written (before its flush): a device newly assigned to
    /// a local hub gets its twin, and one whose data was reset gets it anew. The twin
    /// record to publish, if one was made.
    pub(crate) fn twin_registered(
        &self,
        record: &RegistrationState,
        reset: bool,
    ) -> Result<Option<Publication>, Error> {
        let Some(device_id) = record.device_id.as_deref() else {
            return Ok(None);
        };
        let id = RegistrationId::from(device_id);
        let local = record
            .assigned_hub
            .as_deref()
            .is_some_and(|hub| self.is_local_hub(hub));
        if !local {
            if reset && self.store.hub().remove_twin(&id)? {
                return Ok(Some(Publication::cleared(hub_topics::twin_record_topic(
                    device_id,
                ))));
            }
            return Ok(None);
        }
        if !reset && self.store.hub().twin(&id)?.is_some() {
            return Ok(None);
        }
        let twin = Twin::initial(device_id, record.initial_twin.as_ref());
        self.store.hub().put_twin(&twin)?;
        Ok(Some(twin_record(&twin)))
    }

    /// Retirement: the device's twin and queued messages are gone (written, not yet
    /// flushed). The cleared twin record, if there was one.
    pub(crate) fn hub_purged(&self, device_id: &str) -> Result<Option<Publication>, Error> {
        let id = RegistrationId::from(device_id);
        let dropped = self.store.hub().clear_messages(&id)?;
        if dropped > 0 {
            tracing::info!(%device_id, dropped, "retired: its queued cloud-to-device messages are dropped");
        }
        let had_twin = self.store.hub().remove_twin(&id)?;
        Ok(had_twin.then(|| Publication::cleared(hub_topics::twin_record_topic(device_id))))
    }

    /// Every stored twin's record, for the router's retained set at start-up.
    pub fn twin_records(&self) -> Result<Vec<Publication>, Error> {
        self.store
            .hub()
            .scan_twins()
            .map(|twin| Ok(twin_record(&twin?)))
            .collect()
    }

    /// An error answer with IoT Hub's body.
    pub(crate) fn hub_error(&self, status: u16, code: u32, message: &str) -> HubAnswer {
        HubAnswer {
            status,
            body: to_json(&HubError {
                error_code: code,
                message: message.to_owned(),
                tracking_id: self.random_token(12),
                timestamp_utc: timestamp_now(),
            }),
            version: None,
            retry_after: None,
            publish: Vec::new(),
        }
    }

    fn hub_failure(&self, device_id: &str, error: &dyn std::fmt::Display) -> HubAnswer {
        tracing::error!(%device_id, %error, "twin request failed: store error");
        self.hub_error(500, codes::INTERNAL, "the store failed; try again")
    }
}

#[derive(Debug, thiserror::Error)]
enum TwinWriteError {
    #[error("{0}")]
    Patch(PatchError),
    #[error("{0}")]
    Store(#[from] crate::StoreError),
}

impl From<Error> for TwinWriteError {
    fn from(e: Error) -> TwinWriteError {
        match e {
            Error::Store(e) => TwinWriteError::Store(e),
            other => TwinWriteError::Store(crate::StoreError::Flush(other.to_string())),
        }
    }
}

fn twin_record(twin: &Twin) -> Publication {
    Publication::record(
        hub_topics::twin_record_topic(&twin.device_id),
        &twin.record_body(),
    )
}

fn twin_accepted(device_id: &str, version: Option<u64>) -> Publication {
    let result = TwinResult {
        ok: true,
        version,
        error_code: None,
        message: None,
    };
    Publication::event(hub_topics::twin_result_topic(device_id), &result)
}

fn twin_refused(device_id: &str, status: u16, message: &str) -> Publication {
    let result = TwinResult {
        ok: false,
        version: None,
        error_code: Some(status),
        message: Some(message.to_owned()),
    };
    Publication::event(hub_topics::twin_result_topic(device_id), &result)
}
