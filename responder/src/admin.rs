//! Operator writes on the retained `dps/` records (PROTOCOL B).
//!
//! Every write is validated before it touches the store, checked against the stored
//! etag when it carries one, made durable, republished as the retained record, and
//! answered on `dps/admin/results/{kind}/{id}`. The retained copy never carries
//! symmetric keys; a later write that omits the keys keeps the stored ones.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use edgedps_policies::x509;
use edgedps_topics::admin::{
    codes, AdminResult, AllocationPolicy, Attestation, AttestationType, CertificatePair,
    Enrollment, EnrollmentGroup, EnrollmentSettings, LinkedHub, RecordKind,
};
use edgedps_topics::identity;

use crate::registration::to_json;
use crate::{read, timestamp_now, write, GroupEntry, Responder};

type Rejection = (u16, String);

impl Responder {
    /// Applies one write of an operator. An empty body deletes the record.
    pub async fn apply_admin(&self, kind: RecordKind, id: &str, body: &[u8]) -> AdminResult {
        let outcome = if body.is_empty() {
            self.delete(kind, id).await
        } else if body.len() > self.settings.max_admin_body {
            Err(bad(format!(
                "body of {} bytes is larger than limits.max_enrollment_body_size ({})",
                body.len(),
                self.settings.max_admin_body
            )))
        } else {
            self.upsert(kind, id, body).await
        };
        let result = match outcome {
            Ok(etag) => AdminResult {
                ok: true,
                etag,
                error_code: None,
                message: None,
            },
            Err((code, message)) => {
                tracing::warn!(kind = kind.segment(), id, code, %message, "admin write rejected");
                AdminResult {
                    ok: false,
                    etag: None,
                    error_code: Some(code),
                    message: Some(message),
                }
            }
        };
        self.publish(kind.result_topic(id), to_json(&result), false)
            .await;
        result
    }

    /// Publishes every stored record as a retained message (at start-up).
    pub async fn republish(&self) -> Result<usize, crate::Error> {
        let mut count = 0;
        for e in self.store.enrollments()? {
            self.publish(
                RecordKind::Enrollment.record_topic(&e.registration_id),
                to_json(&redact_enrollment(e)),
                true,
            )
            .await;
            count += 1;
        }
        let groups: Vec<EnrollmentGroup> = read(&self.groups)
            .values()
            .map(|entry| entry.group.clone())
            .collect();
        for g in groups {
            self.publish(
                RecordKind::EnrollmentGroup.record_topic(&g.enrollment_group_id),
                to_json(&redact_group(g)),
                true,
            )
            .await;
            count += 1;
        }
        for h in self.linked_hubs() {
            self.publish(
                RecordKind::Hub.record_topic(&h.host_name),
                to_json(&h),
                true,
            )
            .await;
            count += 1;
        }
        for r in self.store.registrations()? {
            self.publish(
                RecordKind::Registration.record_topic(&r.registration_id),
                to_json(&r),
                true,
            )
            .await;
            count += 1;
        }
        Ok(count)
    }

    async fn upsert(
        &self,
        kind: RecordKind,
        id: &str,
        body: &[u8],
    ) -> Result<Option<String>, Rejection> {
        match kind {
            RecordKind::Enrollment => {
                let mut e: Enrollment = parse_body(body)?;
                if !e.registration_id.eq_ignore_ascii_case(id) {
                    return Err(bad(format!(
                        "registrationId `{}` is not the topic's `{id}`",
                        e.registration_id
                    )));
                }
                validate_registration_id(&e.registration_id)?;
                if let Some(device_id) = &e.device_id {
                    if !identity::valid_registration_id(device_id) {
                        return Err(bad(format!("deviceId `{device_id}` is not valid")));
                    }
                }
                let stored = self.store.enrollment(id).map_err(internal)?;
                let old = stored.as_ref().map(|s| (&s.settings, &s.attestation));
                keep_stored_keys(&mut e.attestation, old.map(|o| o.1));
                validate_attestation(&e.attestation, false)?;
                validate_settings(&e.settings)?;
                let etag = self.stamp(&mut e.settings, old.map(|o| o.0))?;
                self.store.put_enrollment(&e).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                let topic = kind.record_topic(&e.registration_id);
                self.publish(topic, to_json(&redact_enrollment(e)), true).await;
                Ok(Some(etag))
            }
            RecordKind::EnrollmentGroup => {
                let mut g: EnrollmentGroup = parse_body(body)?;
                if g.enrollment_group_id != id {
                    return Err(bad(format!(
                        "enrollmentGroupId `{}` is not the topic's `{id}`",
                        g.enrollment_group_id
                    )));
                }
                validate_registration_id(id)?;
                let stored = read(&self.groups).get(id).map(|entry| entry.group.clone());
                let old = stored.as_ref().map(|s| (&s.settings, &s.attestation));
                keep_stored_keys(&mut g.attestation, old.map(|o| o.1));
                validate_attestation(&g.attestation, true)?;
                validate_settings(&g.settings)?;
                let etag = self.stamp(&mut g.settings, old.map(|o| o.0))?;
                let entry = GroupEntry::new(g.clone()).map_err(bad)?;
                self.store.put_group(&g).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                write(&self.groups).insert(id.to_owned(), entry);
                self.publish(kind.record_topic(id), to_json(&redact_group(g)), true)
                    .await;
                Ok(Some(etag))
            }
            RecordKind::Hub => {
                let mut hub: LinkedHub = parse_body(body)?;
                if hub.host_name.is_empty() {
                    hub.host_name = id.to_owned();
                }
                if hub.host_name != id {
                    return Err(bad(format!(
                        "hostName `{}` is not the topic's `{id}`",
                        hub.host_name
                    )));
                }
                if !valid_host_name(id) {
                    return Err(bad(format!("`{id}` is not a host name")));
                }
                if hub.allocation_weight > 1000 {
                    return Err(bad("allocationWeight must be 0 to 1000".into()));
                }
                let stored_etag = read(&self.hubs).get(id).and_then(|h| h.etag.clone());
                check_etag(hub.etag.as_deref(), stored_etag.as_deref())?;
                let etag = format!("\"{}\"", self.random_token(12));
                hub.etag = Some(etag.clone());
                self.store.put_hub(&hub).map_err(internal)?;
                self.store.durable().await.map_err(internal)?;
                write(&self.hubs).insert(id.to_owned(), hub.clone());
                self.publish(kind.record_topic(id), to_json(&hub), true).await;
                Ok(Some(etag))
            }
            RecordKind::Registration => Err((
                codes::FORBIDDEN,
                "registration records are written by edgedps; publish an empty retained message to deregister".into(),
            )),
        }
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<Option<String>, Rejection> {
        let existed = match kind {
            RecordKind::Enrollment => self.store.remove_enrollment(id).map_err(internal)?,
            RecordKind::EnrollmentGroup => {
                let existed = self.store.remove_group(id).map_err(internal)?;
                write(&self.groups).remove(id);
                existed
            }
            RecordKind::Hub => {
                if self.settings.hubs.iter().any(|h| h.host_name == id) {
                    return Err((
                        codes::FORBIDDEN,
                        format!("hub `{id}` is linked in the configuration file; remove it there"),
                    ));
                }
                let existed = self.store.remove_hub(id).map_err(internal)?;
                write(&self.hubs).remove(id);
                existed
            }
            RecordKind::Registration => self.store.remove_registration(id).map_err(internal)?,
        };
        if existed {
            self.store.durable().await.map_err(internal)?;
        }
        // Clear the retained record either way, so subscribers agree with the store.
        self.publish(kind.record_topic(id), Vec::new(), true).await;
        if existed {
            Ok(None)
        } else {
            Err((codes::NOT_FOUND, format!("no {} `{id}`", kind.segment())))
        }
    }

    /// Checks the etag of a write against the stored record, then sets a new etag and
    /// the timestamps. Returns the new etag.
    fn stamp(
        &self,
        settings: &mut EnrollmentSettings,
        stored: Option<&EnrollmentSettings>,
    ) -> Result<String, Rejection> {
        check_etag(
            settings.etag.as_deref(),
            stored.and_then(|s| s.etag.as_deref()),
        )?;
        let now = timestamp_now();
        let etag = format!("\"{}\"", self.random_token(12));
        settings.etag = Some(etag.clone());
        settings.created_date_time_utc = Some(
            stored
                .and_then(|s| s.created_date_time_utc.clone())
                .unwrap_or_else(|| now.clone()),
        );
        settings.last_updated_date_time_utc = Some(now);
        Ok(etag)
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| bad(format!("body is not a valid record: {e}")))
}

fn bad(message: String) -> Rejection {
    (codes::BAD_REQUEST, message)
}

fn internal(e: impl std::fmt::Display) -> Rejection {
    (codes::INTERNAL, format!("internal error: {e}"))
}

fn check_etag(sent: Option<&str>, stored: Option<&str>) -> Result<(), Rejection> {
    match (sent, stored) {
        (None, _) | (Some("*"), _) => Ok(()),
        (Some(sent), Some(stored)) if sent == stored => Ok(()),
        (Some(sent), stored) => Err((
            codes::PRECONDITION_FAILED,
            format!(
                "etag {sent} does not match the stored {}",
                stored.unwrap_or("(none: the record does not exist)")
            ),
        )),
    }
}

fn validate_registration_id(id: &str) -> Result<(), Rejection> {
    if identity::valid_registration_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "`{id}` is not a valid id (1-128 of a-z A-Z 0-9 - . _ :)"
        )))
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_settings(settings: &EnrollmentSettings) -> Result<(), Rejection> {
    match settings.allocation_policy {
        Some(AllocationPolicy::GeoLatency) | Some(AllocationPolicy::Custom) => return Err(bad(
            "allocationPolicy geoLatency and custom are not supported yet; use hashed or static"
                .into(),
        )),
        Some(AllocationPolicy::Static) if settings.iot_hubs.len() != 1 => {
            return Err(bad(
                "allocationPolicy static needs exactly one hub in iotHubs".into(),
            ))
        }
        _ => {}
    }
    if let Some(hub) = settings.iot_hubs.iter().find(|h| !valid_host_name(h)) {
        return Err(bad(format!("iotHubs entry `{hub}` is not a host name")));
    }
    if let Some(twin) = &settings.initial_twin {
        if !twin.is_object() {
            return Err(bad("initialTwin must be a JSON object".into()));
        }
    }
    Ok(())
}

fn validate_attestation(attestation: &Attestation, group: bool) -> Result<(), Rejection> {
    match attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = attestation
                .symmetric_key
                .as_ref()
                .ok_or_else(|| bad("attestation.symmetricKey is missing".into()))?;
            let primary = keys
                .primary_key
                .as_deref()
                .ok_or_else(|| bad("attestation.symmetricKey.primaryKey is missing".into()))?;
            for (name, key) in [
                ("primaryKey", Some(primary)),
                ("secondaryKey", keys.secondary_key.as_deref()),
            ] {
                if let Some(key) = key {
                    let len = BASE64
                        .decode(key)
                        .map_err(|_| bad(format!("symmetricKey.{name} is not base64")))?
                        .len();
                    if !(16..=64).contains(&len) {
                        return Err(bad(format!(
                            "symmetricKey.{name} must decode to 16 to 64 bytes, not {len}"
                        )));
                    }
                }
            }
            Ok(())
        }
        AttestationType::X509 => {
            let x509 = attestation
                .x509
                .as_ref()
                .ok_or_else(|| bad("attestation.x509 is missing".into()))?;
            let (name, pair) = if group {
                ("signingCertificates", x509.signing_certificates.as_ref())
            } else {
                ("clientCertificates", x509.client_certificates.as_ref())
            };
            let pair = pair.ok_or_else(|| bad(format!("attestation.x509.{name} is missing")))?;
            validate_certificates(name, pair, group)
        }
        AttestationType::Tpm => Err(bad("TPM attestation is not supported yet".into())),
    }
}

fn validate_certificates(name: &str, pair: &CertificatePair, group: bool) -> Result<(), Rejection> {
    let primary = pair
        .primary
        .as_ref()
        .ok_or_else(|| bad(format!("attestation.x509.{name}.primary is missing")))?;
    for (slot, cert) in [
        ("primary", Some(primary)),
        ("secondary", pair.secondary.as_ref()),
    ] {
        let Some(cert) = cert else { continue };
        match (&cert.certificate, &cert.sha256_thumbprint) {
            (Some(pem), None) => {
                let der = x509::pem_to_der(pem)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.certificate: {e}")))?;
                if group {
                    let info = x509::CertificateInfo::read(&der)
                        .map_err(|e| bad(format!("x509.{name}.{slot}: {e}")))?;
                    if !info.is_ca {
                        return Err(bad(format!("x509.{name}.{slot} is not a CA certificate")));
                    }
                }
            }
            (None, Some(print)) if !group => {
                x509::normalize_thumbprint(print)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.sha256Thumbprint: {e}")))?;
            }
            _ => {
                return Err(bad(format!(
                    "x509.{name}.{slot} needs exactly one of certificate{}",
                    if group { "" } else { " or sha256Thumbprint" }
                )))
            }
        }
    }
    Ok(())
}

/// A write that omits the keys of a symmetric-key attestation keeps the stored keys,
/// so the retained (redacted) record can be edited and published back.
fn keep_stored_keys(attestation: &mut Attestation, stored: Option<&Attestation>) {
    let (Some(new), Some(old)) = (
        attestation.symmetric_key.as_mut(),
        stored.and_then(|s| s.symmetric_key.as_ref()),
    ) else {
        return;
    };
    if new.primary_key.is_none() && new.secondary_key.is_none() {
        new.primary_key = old.primary_key.clone();
        new.secondary_key = old.secondary_key.clone();
    }
}

fn redact(attestation: &mut Attestation) {
    if let Some(keys) = attestation.symmetric_key.as_mut() {
        keys.primary_key = None;
        keys.secondary_key = None;
    }
}

fn redact_enrollment(mut e: Enrollment) -> Enrollment {
    redact(&mut e.attestation);
    e
}

fn redact_group(mut g: EnrollmentGroup) -> EnrollmentGroup {
    redact(&mut g.attestation);
    g
}
