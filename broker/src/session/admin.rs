//! PROTOCOL B: an operator's write under `dps/` (a retained record, or a retirement),
//! applied by the responder. PUBACK first: the result arrives on its own topic.

use tokio::io::{AsyncRead, AsyncWrite};

use edgedps_policies::acl::Role;
use edgedps_topics::admin::AdminTopic;
use edgedps_topics::encoding::Encoding;

use super::{Close, Session};
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
        let answer = match admin {
            AdminTopic::Record { kind, id } => {
                self.puback(meta)?;
                self.flush().await?;
                responder
                    .apply_admin(&self.client_id, kind, &id, body, encoding)
                    .await
            }
            AdminTopic::Retire { registration_id } => {
                self.puback(meta)?;
                self.flush().await?;
                responder
                    .retire(
                        &self.shared.router,
                        &self.client_id,
                        &registration_id,
                        body,
                        encoding,
                    )
                    .await
            }
            AdminTopic::Output | AdminTopic::Unknown => {
                return Err(Close::Denied(format!(
                    "`{topic}` is not an operator record (enrollments, enrollment-groups, hubs, registrations, crls) nor dps/admin/retire/{{registrationId}}"
                )))
            }
        };
        self.publish(answer.publish).await;
        Ok(())
    }
}
