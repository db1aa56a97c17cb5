//! The outcome of every operator write: its result on `dps/admin/results/...` (in the
//! write's encoding), its audit event on `dps/events/admin/...`, and its line in the
//! audit log (`edgedps::audit`).

use edgedps_topics::admin::{AdminEvent, AdminOutcome, AdminResult, Effects};

use crate::admin::{Applied, Write};
use crate::{timestamp_now, Error, Publication, Responder};

impl Responder {
    /// The result and the audit event of a write, published after what it changed, and
    /// its log line.
    pub(crate) fn report(
        &self,
        write: Write<'_>,
        outcome: Result<Applied, Error>,
        reason: Option<String>,
        publish: &mut Vec<Publication>,
    ) -> AdminResult {
        let mut event = AdminEvent {
            operator: write.operator.to_owned(),
            kind: write.kind.to_owned(),
            id: write.id.to_owned(),
            operation: write.operation,
            outcome: AdminOutcome::Rejected,
            retirement: None,
            provisioning_status: None,
            etag: None,
            error_code: None,
            message: None,
            reason,
            effects: Effects::default(),
            timestamp_utc: timestamp_now(),
        };
        let result = match outcome {
            Ok(applied) => {
                event.outcome = applied.outcome;
                event.retirement = applied.retirement;
                event.provisioning_status = applied.status;
                event.etag = applied.etag.clone();
                event.effects = applied.effects;
                AdminResult {
                    ok: true,
                    etag: applied.etag,
                    error_code: None,
                    message: None,
                    effects: applied.effects,
                }
            }
            Err(error) => {
                let (code, message) = (error.admin_code(), error.to_string());
                event.error_code = Some(code);
                event.message = Some(message.clone());
                AdminResult {
                    ok: false,
                    etag: None,
                    error_code: Some(code),
                    message: Some(message),
                    effects: Effects::default(),
                }
            }
        };
        audit_log(&event);
        publish.push(Publication::message(
            write.result_topic,
            write.encoding.encode(&result),
        ));
        publish.push(Publication::event(write.event_topic, &event));
        result
    }
}

/// One log line per admin write, under the `edgedps::audit` target.
fn audit_log(event: &AdminEvent) {
    let outcome = format!("{:?}", event.outcome).to_lowercase();
    let retirement = event.retirement.map(|r| format!("{r:?}").to_lowercase());
    match event.outcome {
        AdminOutcome::Rejected => tracing::warn!(
            target: "edgedps::audit",
            operator = %event.operator,
            kind = %event.kind,
            id = %event.id,
            operation = ?event.operation,
            %outcome,
            code = event.error_code,
            reason = event.message.as_deref().unwrap_or_default(),
            "admin write rejected"
        ),
        _ => tracing::info!(
            target: "edgedps::audit",
            operator = %event.operator,
            kind = %event.kind,
            id = %event.id,
            operation = ?event.operation,
            %outcome,
            retirement,
            status = ?event.provisioning_status,
            etag = event.etag.as_deref().unwrap_or_default(),
            sessions_closed = event.effects.sessions_closed,
            registrations_deregistered = event.effects.registrations_deregistered,
            retained_messages_purged = event.effects.retained_messages_purged,
            revoked_certificates = event.effects.revoked_certificates,
            reason = event.reason.as_deref(),
            "admin write applied"
        ),
    }
}
