//! Certificate renewal over a hub connection (PROTOCOL F): a device of the local hub
//! sends a new certificate signing request on
//! `$iothub/credentials/POST/issueCertificate/`; the authority of its enrollment's
//! issuance policy signs it, the registration record keeps it (on disk before the
//! answer), and the device gets `202` then `200` with the chain. `replace` retires
//! older certificates: `*` at once, a request id once the new certificate is used.

use edgedps_policies::issuance::check_csr;
use edgedps_topics::admin::EnrollmentSettings;
use edgedps_topics::hub::{
    codes, CredentialError, CredentialErrorInfo, IssueCertificateRequest, RenewalAccepted,
};
use edgedps_topics::identity::RegistrationId;
use edgedps_topics::registration::RegistrationState;

use crate::{read, timestamp_at, timestamp_now, to_json, unix_now, Error, Responder};

/// How long a renewal's operation is said to last (it completes at once).
const OPERATION_SECONDS: i64 = 60;
/// Errors of renewals for another device.
const FORBIDDEN: u32 = 403_001;

/// One answer on `$iothub/credentials/res/{status}/?$rid=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialAnswer {
    pub status: u16,
    /// JSON.
    pub body: Vec<u8>,
}

impl Responder {
    /// A renewal from the hub session of `device_id`: its answers, in order.
    pub async fn renew_certificate(
        &self,
        device_id: &str,
        rid: &str,
        body: &[u8],
    ) -> Vec<CredentialAnswer> {
        match self.renewal(device_id, rid, body).await {
            Ok(answers) => answers,
            Err(refusal) => vec![self.credential_error(refusal, rid)],
        }
    }

    async fn renewal(
        &self,
        device_id: &str,
        rid: &str,
        body: &[u8],
    ) -> Result<Vec<CredentialAnswer>, Refusal> {
        let request: IssueCertificateRequest = serde_json::from_slice(body).map_err(|e| {
            Refusal::bad(
                "InvalidRequest",
                format!(
                    "the body is not {{\"id\", \"csr\", \"replace\"?}}: {}",
                    edgedps_topics::encoding::without_values(&e.to_string())
                ),
            )
        })?;
        if !request.id.eq_ignore_ascii_case(device_id) {
            return Err(Refusal {
                status: 403,
                code: FORBIDDEN,
                kind: "DeviceIdMismatch",
                message: format!(
                    "`id` names `{}`; this connection is device `{device_id}`",
                    request.id
                ),
            });
        }
        if let Some(wait) = self
            .throttle
            .admit_twin_request(&RegistrationId::from(device_id), std::time::Instant::now())
            .err()
        {
            return Err(Refusal {
                status: 429,
                code: codes::THROTTLED,
                kind: "Throttled",
                message: format!("too many requests; retry in {wait} s"),
            });
        }
        let checked = check_csr(&request.csr, &RegistrationId::from(device_id))
            .map_err(|e| Refusal::bad("InvalidCsr", e.to_string()))?;
        let _one_at_a_time = self.hub_writes.lock().await;
        let mut record = self
            .registration_of_device(device_id)
            .map_err(Refusal::internal)?
            .ok_or_else(|| {
                Refusal::bad("NotRegistered", "the device has no registration".into())
            })?;
        let settings = self.settings_of(&record).map_err(Refusal::internal)?;
        let policy = settings
            .and_then(|s| s.client_certificate_issuance_policy)
            .ok_or_else(|| {
                Refusal::bad(
                    "NoIssuancePolicy",
                    "the device's enrollment has no clientCertificateIssuancePolicy".into(),
                )
            })?;
        let ca = self
            .settings
            .certificate_authorities
            .get(&policy.certificate_authority_name)
            .cloned()
            .ok_or_else(|| {
                Refusal::bad(
                    "NoIssuancePolicy",
                    format!(
                        "certificate authority `{}` is not configured on this gateway",
                        policy.certificate_authority_name
                    ),
                )
            })?;
        let device = record
            .device_id
            .clone()
            .unwrap_or_else(|| device_id.to_owned());
        let (mut issued, chain) = self
            .issue(&checked, &ca, &device)
            .map_err(Refusal::internal)?;
        issued.request_id = Some(rid.to_owned());
        match request.replace.as_deref() {
            Some("*") => {
                for older in &mut record.issued_certificates {
                    older.revoked = true;
                }
            }
            Some(earlier) => issued.replaces = Some(earlier.to_owned()),
            None => {}
        }
        record.issued_certificates.push(issued);
        record.last_updated_date_time_utc = Some(timestamp_now());
        record.etag = Some(self.new_etag());
        self.store
            .put_registration(&record)
            .map_err(|e| Refusal::internal(e.into()))?;
        self.store
            .durable()
            .await
            .map_err(|e| Refusal::internal(e.into()))?;
        let accepted = RenewalAccepted {
            correlation_id: self.random_token(12),
            operation_expires: timestamp_at(
                i64::try_from(unix_now()).unwrap_or(i64::MAX) + OPERATION_SECONDS,
            ),
        };
        Ok(vec![
            CredentialAnswer {
                status: 202,
                body: to_json(&accepted),
            },
            CredentialAnswer {
                status: 200,
                body: to_json(&chain),
            },
        ])
    }

    /// The enrollment settings a registration record came through.
    fn settings_of(&self, record: &RegistrationState) -> Result<Option<EnrollmentSettings>, Error> {
        Ok(match record.enrollment_group_id() {
            Some(group) => read(&self.groups)
                .get(group)
                .map(|entry| entry.group.settings.clone()),
            None => self
                .store
                .enrollment(&record.registration_id)?
                .map(|e| e.settings),
        })
    }

    fn credential_error(&self, refusal: Refusal, rid: &str) -> CredentialAnswer {
        let retry_after = (refusal.status == 429 || refusal.status >= 500).then_some(1);
        CredentialAnswer {
            status: refusal.status,
            body: to_json(&CredentialError {
                error_code: refusal.code,
                message: refusal.message.clone(),
                tracking_id: self.random_token(12),
                timestamp_utc: timestamp_now(),
                retry_after,
                info: CredentialErrorInfo {
                    credential_error: Some(refusal.kind.to_owned()),
                    credential_message: Some(refusal.message),
                    request_id: Some(rid.to_owned()),
                    ..CredentialErrorInfo::default()
                },
            }),
        }
    }
}

/// Why a renewal is refused.
struct Refusal {
    status: u16,
    code: u32,
    kind: &'static str,
    message: String,
}

impl Refusal {
    fn bad(kind: &'static str, message: String) -> Refusal {
        Refusal {
            status: 400,
            code: codes::BAD_FORMAT,
            kind,
            message,
        }
    }

    fn internal(error: Error) -> Refusal {
        tracing::error!(%error, "certificate renewal failed");
        Refusal {
            status: 500,
            code: codes::INTERNAL,
            kind: "Internal",
            message: "the gateway could not issue the certificate; try again".into(),
        }
    }
}
