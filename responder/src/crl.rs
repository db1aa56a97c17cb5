//! Certificate revocation lists written by operators (PROTOCOL B, `dps/crls/{name}`): a
//! list is accepted only when its signature verifies against a CA edgedps trusts (an
//! X.509 group's signing certificate, or one sent with it that chains to one); the
//! sessions it revokes are cut at once.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use edgedps_policies::revocation::{self, RevocationList};
use edgedps_policies::validation;
use edgedps_topics::admin::{AdminOutcome, Effects, RecordKind, Retirement};

use crate::admin::{bad, Applied};
use crate::sessions::Scope;
use crate::store::CrlRecord;
use crate::{count, read, write, Error, Publication, Responder};

impl Responder {
    /// Verifies a revocation list, stores it, and cuts the sessions it revokes.
    pub(crate) async fn put_crl(
        &self,
        name: &str,
        body: &[u8],
        publish: &mut Vec<Publication>,
    ) -> Result<Applied, Error> {
        validation::record_name(name)?;
        let sent = revocation::read_body(body).map_err(|e| bad(e.to_string()))?;
        let trusted: Vec<Vec<u8>> = read(&self.groups)
            .values()
            .flat_map(|entry| entry.signing_der.iter().cloned())
            .collect();
        let trusted: Vec<&[u8]> = trusted.iter().map(Vec::as_slice).collect();
        let list = RevocationList::verify(&sent.crl, &sent.certificates, &trusted)
            .map_err(|e| bad(e.to_string()))?;
        let record = CrlRecord {
            name: name.to_owned(),
            crl: sent.crl,
            issuer_certificate: list.issuer_certificate.clone(),
            sent_certificates: sent.certificates,
        };
        let existed = read(&self.crls).contains_key(name);
        self.store.put_crl(&record)?;
        self.store.durable().await?;
        let issuer = list.issuer().to_vec();
        let revoked = count(list.len());
        write(&self.crls).insert(name.to_owned(), list);
        self.written();
        publish.push(Publication {
            topic: RecordKind::Crl.record_topic(name),
            payload: crl_pem(&record),
            retain: true,
        });
        let closed = self.cut_off(&[Scope::Issuer(&issuer)], None).await;
        Ok(Applied {
            etag: None,
            outcome: if existed {
                AdminOutcome::Updated
            } else {
                AdminOutcome::Created
            },
            retirement: Some(Retirement::Revoked),
            status: None,
            effects: Effects {
                sessions_closed: Some(closed),
                revoked_certificates: Some(revoked),
                ..Effects::default()
            },
        })
    }
}

/// A revocation list as its retained record shows it: PEM, with the certificates the
/// operator sent with it.
pub(crate) fn crl_pem(record: &CrlRecord) -> Vec<u8> {
    let mut text = pem_block("X509 CRL", &record.crl);
    for cert in &record.sent_certificates {
        text.push_str(&pem_block("CERTIFICATE", cert));
    }
    text.into_bytes()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}
