//! PROTOCOL B: an operator's write under `dps/` (a retained record, or a retirement),
//! applied by the responder. PUBACK first: the result arrives on its own topic.

use tokio::io::{AsyncRead, AsyncWrite};

use edgedps_policies::acl::Role;
use edgedps_topics::admin::AdminTopic;
use edgedps_topics::encoding::Encoding;

use super::{Close, Identity, Session};
use crate::codec;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn admin_write(
        &mut self,
        topic: &str,
        admin: AdminTopic,
        body: &[u8],
        encoding: Encoding,
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        if self.role != Role::Operator {
            return Err(self.denied("publish", topic).await);
        }
        let responder = self.shared.responder.clone();
        let operator = self.operator_name().to_owned();
        let (kind, answer) = match admin {
            AdminTopic::Record { kind, id } => {
                self.puback(meta)?;
                self.flush().await?;
                let answer = responder
                    .apply_admin(&operator, kind, &id, body, encoding)
                    .await;
                (kind.segment(), answer)
            }
            AdminTopic::Retire { registration_id } => {
                self.puback(meta)?;
                self.flush().await?;
                let answer = responder
                    .retire(
                        &self.shared.router,
                        &operator,
                        &registration_id,
                        body,
                        encoding,
                    )
                    .await;
                ("retire", answer)
            }
            AdminTopic::HubOutbox { host_name } => {
                self.puback(meta)?;
                self.flush().await?;
                let answer = responder
                    .hub_outbox(&operator, &host_name, body, encoding)
                    .await;
                self.publish(vec![answer]).await;
                return Ok(());
            }
            AdminTopic::Explain { registration_id } => {
                self.puback(meta)?;
                self.flush().await?;
                let answer = responder.explain(&registration_id, body, encoding);
                self.publish(vec![answer]).await;
                return Ok(());
            }
            AdminTopic::AllocatorResponse {
                name,
                correlation_id,
            } => {
                self.puback(meta)?;
                if !self.shared.allocators.answered(&name, &correlation_id, body) {
                    tracing::warn!(allocator = %name, %correlation_id, operator = %operator, "an MQTT allocator answered a request nobody waits for (late, answered twice, or never asked); ignored");
                }
                return Ok(());
            }
            AdminTopic::Output | AdminTopic::Unknown => {
                return Err(Close::Denied(format!(
                    "`{topic}` is not an operator record (enrollments, enrollment-groups, hubs, registrations, crls), dps/admin/retire/{{registrationId}}, dps/admin/hub-outbox/{{hostName}}, dps/admin/explain/{{registrationId}} nor dps/allocators/{{name}}/responses/{{correlationId}}"
                )))
            }
        };
        self.shared.metrics.admin_write(kind, answer.result.ok);
        self.publish(answer.publish).await;
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Who an operator is, for results and audit lines: the configured name, or the
    /// client id of an anonymous one.
    pub(super) fn operator_name(&self) -> &str {
        match &self.identity {
            Identity::Operator(Some(name)) => name,
            _ => &self.client_id,
        }
    }

    /// A reader's publish: refused (MQTT 5: reason 0x87) and audited. A write of an
    /// operator record also gets its result (403), as any write does, so that the writer
    /// learns why at once.
    pub(super) async fn reader_publish(
        &mut self,
        topic: &str,
        body: &[u8],
        meta: codec::PublishMeta,
    ) -> Result<(), Close> {
        let reason = "the reader role may read and watch, not write";
        self.refused("publish", topic, reason).await;
        self.refuse_publish(meta)?;
        if let Some(AdminTopic::Record { kind, id }) = edgedps_topics::admin::parse_topic(topic) {
            let encoding = Encoding::detect(body, None);
            self.shared.metrics.admin_write(kind.segment(), false);
            let answer = self.shared.responder.refuse_admin(
                self.operator_name(),
                kind,
                &id,
                body,
                encoding,
                reason,
            );
            self.publish(answer.publish).await;
        }
        Ok(())
    }
}
