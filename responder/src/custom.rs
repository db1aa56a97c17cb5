//! Custom allocation (PROTOCOL C): the request edgedps sends an enrollment's allocator
//! (Azure's `AllocationRequest`), the checks on its answer, and what it becomes.
//!
//! The responder opens no sockets: the broker lends it an [`Outside`] that carries the
//! request to a webhook or an MQTT allocator and brings the answer's bytes back. Every
//! failure (a timeout, an error, an answer that is not JSON or names a hub that was not
//! offered) is an `AllocationError::Custom`, which completes the registration as
//! `failed` with 400207 and the reason.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use edgedps_policies::allocation::{self, AllocationError};
use edgedps_policies::attestation::{Attested, EnrollmentSource};
use edgedps_policies::validation::{redact_enrollment, redact_group};
use edgedps_topics::admin::{AllocationPolicy, AttestationType, CustomAllocationDefinition};
use edgedps_topics::allocation::{
    AllocationRecord, CustomAllocationAnswer, CustomAllocationRequest, DeviceRuntimeContext,
};

use crate::standing::Standing;
use crate::{read, Publication, Responder};

/// A boxed future, as the broker's allocators return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the responder asks of the broker around it.
pub trait Outside: Send + Sync {
    /// Sends `request` (JSON) to the allocator `definition` names and returns its
    /// answer's body, or why there is none. The responder bounds the whole call.
    fn ask_allocator(
        &self,
        definition: &CustomAllocationDefinition,
        request: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>>;

    /// Publishes what a registration that completed in the background produced (its
    /// record and event), as a register's answer would have.
    fn publish(&self, publications: Vec<Publication>);
}

/// What a custom allocator decided.
pub(crate) struct CustomOutcome {
    pub hub: String,
    pub initial_twin: Option<Value>,
    pub payload: Option<Value>,
    pub record: AllocationRecord,
}

impl Responder {
    /// Lends the responder the broker's allocators and publisher. Once; later calls are
    /// ignored.
    pub fn attach(&self, outside: Arc<dyn Outside>) {
        let _ = self.outside.set(outside);
    }

    /// Asks the custom allocator of `definition` where `device` goes.
    pub(crate) async fn custom_allocate(
        &self,
        device: &Attested,
        standing: &Standing,
        definition: &CustomAllocationDefinition,
        iot_hubs: &[String],
        payload: Option<&Value>,
    ) -> Result<CustomOutcome, AllocationError> {
        let failed = |reason: String| AllocationError::Custom(reason);
        let outside = self
            .outside
            .get()
            .ok_or_else(|| failed("no custom allocator can be reached from here".into()))?;
        let linked = self.linked_hubs();
        let candidates = allocation::candidates(iot_hubs, &linked);
        if candidates.is_empty() {
            return Err(AllocationError::NoHub);
        }
        let request = self.allocation_request(device, standing, &candidates, payload);
        let body = crate::to_json(&request);
        let who = match (&definition.webhook_url, &definition.mqtt_allocator) {
            (_, Some(name)) => format!("MQTT allocator `{name}`"),
            _ => "webhook".to_owned(),
        };
        let started = Instant::now();
        let timeout = self.settings.custom_allocation_timeout;
        let answer =
            match tokio::time::timeout(timeout, outside.ask_allocator(definition, body)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(reason)) => return Err(failed(format!("{who}: {reason}"))),
                Err(_) => {
                    return Err(failed(format!(
                        "{who} did not answer within {} ms",
                        timeout.as_millis()
                    )))
                }
            };
        let answer: CustomAllocationAnswer = serde_json::from_slice(&answer).map_err(|e| {
            failed(format!(
                "{who} answered something that is not an allocation (JSON with iotHubHostName): {e}"
            ))
        })?;
        let hub = allocation::custom_answer(&answer.iot_hub_host_name, &candidates)
            .map_err(|e| match e {
                AllocationError::Custom(reason) => failed(format!("{who}: {reason}")),
                other => other,
            })?
            .to_owned();
        if answer.initial_twin.as_ref().is_some_and(|t| !t.is_object()) {
            return Err(failed(format!(
                "{who} answered an initialTwin that is not a JSON object"
            )));
        }
        let elapsed = started.elapsed();
        self.custom_latency.record(elapsed);
        let record = AllocationRecord {
            policy: AllocationPolicy::Custom,
            hub: Some(hub.clone()),
            reason: format!(
                "custom: {who} answered {hub} in {}",
                allocation::milliseconds(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
            ),
        };
        Ok(CustomOutcome {
            hub,
            initial_twin: answer.initial_twin,
            payload: answer.payload,
            record,
        })
    }

    /// Azure's request: the enrollment without keys, the device, the hubs offered.
    fn allocation_request(
        &self,
        device: &Attested,
        standing: &Standing,
        candidates: &[&edgedps_topics::admin::LinkedHub],
        payload: Option<&Value>,
    ) -> CustomAllocationRequest {
        let (individual_enrollment, enrollment_group) = match &device.source {
            EnrollmentSource::Individual => (
                standing
                    .individual
                    .clone()
                    .map(redact_enrollment)
                    .and_then(|e| serde_json::to_value(e).ok()),
                None,
            ),
            EnrollmentSource::Group(id) => (
                None,
                read(&self.groups)
                    .get(id)
                    .map(|entry| redact_group(entry.group.clone()))
                    .and_then(|g| serde_json::to_value(g).ok()),
            ),
        };
        let current = standing.registration.as_ref().filter(|r| r.is_assigned());
        let certificate = device
            .certificate
            .as_ref()
            .and_then(|c| c.chain.first())
            .and_then(|leaf| edgedps_policies::x509::describe(leaf).ok())
            .and_then(|info| serde_json::to_value(info).ok());
        let (x509, symmetric_key, tpm) = match device.kind {
            AttestationType::X509 => (
                Some(serde_json::json!({ "clientCertificate": certificate })),
                None,
                None,
            ),
            AttestationType::SymmetricKey => (None, Some(serde_json::json!({})), None),
            AttestationType::Tpm => (None, None, Some(serde_json::json!({}))),
        };
        CustomAllocationRequest {
            individual_enrollment,
            enrollment_group,
            device_runtime_context: DeviceRuntimeContext {
                registration_id: device.registration_id.to_string(),
                current_iot_hub_host_name: current.and_then(|r| r.assigned_hub.clone()),
                current_device_id: current.and_then(|r| r.device_id.clone()),
                x509,
                symmetric_key,
                tpm,
                payload: payload.cloned(),
            },
            linked_hubs: candidates.iter().map(|h| h.host_name.clone()).collect(),
        }
    }
}
