//! Operators (DESIGN: roles and listeners): who connects to the `local` and `operators`
//! listeners, and with which role. An operator proves who they are with a password,
//! checked against its argon2 hash, or with a client certificate whose CN is
//! configured (the TLS handshake has already checked the certificate against
//! `[listeners.operators] client_ca`). The status page asks the same question over HTTP.
//!
//! Bad passwords are answered slowly on purpose (argon2), and a source address that
//! gives [`MAX_FAILURES`] of them within [`FAILURE_WINDOW`] is refused without a check
//! until the window has passed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgedps_policies::password;
use tokio::sync::Semaphore;

use crate::config::{OperatorConfig, OperatorRole};

/// Bad passwords from one address before it is refused without a check.
pub const MAX_FAILURES: u32 = 5;
/// How long failures are remembered, and an address refused.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond, the oldest record is forgotten.
const MAX_TRACKED: usize = 4096;
/// Password checks at once: each costs argon2's memory (19 MiB) and tens of ms of CPU.
const VERIFYING_AT_ONCE: usize = 2;

/// An operator who proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub name: String,
    pub role: OperatorRole,
}

/// Why an operator was refused; each is a CONNACK "not authorized" and an audit line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no credentials, and this listener takes no anonymous clients")]
    Anonymous,
    #[error("unknown operator or wrong password")]
    BadPassword,
    #[error("too many bad passwords from this address; refused without a check for up to {}s", FAILURE_WINDOW.as_secs())]
    Throttled,
    #[error("client certificate with CN `{0}` is no configured operator")]
    UnknownCertificate(String),
}

impl Refusal {
    /// The refusal's name in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Anonymous => "anonymous",
            Refusal::BadPassword => "bad_password",
            Refusal::Throttled => "throttled",
            Refusal::UnknownCertificate(_) => "unknown_certificate",
        }
    }
}

enum Proof {
    Password(String),
    Certificate,
}

struct Entry {
    role: OperatorRole,
    proof: Proof,
}

struct Failures {
    count: u32,
    since: Instant,
}

pub struct Operators {
    by_name: HashMap<String, Entry>,
    by_cn: HashMap<String, String>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    verifying: Semaphore,
    /// Checked for unknown names, so that a refusal takes as long for them.
    decoy: Option<String>,
}

impl Operators {
    pub fn new(configs: &[OperatorConfig]) -> Operators {
        let mut by_name = HashMap::new();
        let mut by_cn = HashMap::new();
        for operator in configs {
            let proof = match (&operator.password_hash, &operator.certificate_cn) {
                (Some(hash), _) => Proof::Password(hash.clone()),
                (None, Some(cn)) => {
                    by_cn.insert(cn.clone(), operator.name.clone());
                    Proof::Certificate
                }
                // Refused by the configuration's validation.
                (None, None) => continue,
            };
            by_name.insert(
                operator.name.clone(),
                Entry {
                    role: operator.role,
                    proof,
                },
            );
        }
        let has_passwords = by_name
            .values()
            .any(|e| matches!(e.proof, Proof::Password(_)));
        Operators {
            by_name,
            by_cn,
            failures: Mutex::new(HashMap::new()),
            verifying: Semaphore::new(VERIFYING_AT_ONCE),
            decoy: has_passwords
                .then(|| password::hash(b"edgedps decoy").ok())
                .flatten(),
        }
    }

    /// Are any operators configured?
    pub fn any(&self) -> bool {
        !self.by_name.is_empty()
    }

    /// The operator a client certificate's CN names.
    pub fn by_certificate(&self, cn: &str) -> Result<Authenticated, Refusal> {
        let name = self
            .by_cn
            .get(cn)
            .ok_or_else(|| Refusal::UnknownCertificate(cn.to_owned()))?;
        let role = self
            .by_name
            .get(name)
            .map(|e| e.role)
            .ok_or_else(|| Refusal::UnknownCertificate(cn.to_owned()))?;
        Ok(Authenticated {
            name: name.clone(),
            role,
        })
    }

    /// Checks a username and password from `source`.
    pub async fn by_password(
        &self,
        source: IpAddr,
        name: &str,
        password: &[u8],
    ) -> Result<Authenticated, Refusal> {
        if self.throttled(source) {
            return Err(Refusal::Throttled);
        }
        let entry = self.by_name.get(name);
        let (hash, role) = match entry {
            Some(Entry {
                role,
                proof: Proof::Password(hash),
            }) => (Some(hash.clone()), Some(*role)),
            _ => (self.decoy.clone(), None),
        };
        let matches = match hash {
            Some(hash) => {
                let password = password.to_vec();
                let permit = self.verifying.acquire().await;
                let checked =
                    tokio::task::spawn_blocking(move || password::verify(&password, &hash)).await;
                drop(permit);
                checked.unwrap_or(false)
            }
            None => false,
        };
        match (matches, role) {
            (true, Some(role)) => Ok(Authenticated {
                name: name.to_owned(),
                role,
            }),
            _ => {
                self.failed(source);
                Err(Refusal::BadPassword)
            }
        }
    }

    fn throttled(&self, source: IpAddr) -> bool {
        let failures = crate::session::lock(&self.failures);
        failures
            .get(&source)
            .is_some_and(|f| f.count >= MAX_FAILURES && f.since.elapsed() < FAILURE_WINDOW)
    }

    fn failed(&self, source: IpAddr) {
        let mut failures = crate::session::lock(&self.failures);
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&source) {
            failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED {
                let oldest = failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(source).or_insert(Failures {
            count: 0,
            since: Instant::now(),
        });
        if entry.since.elapsed() >= FAILURE_WINDOW {
            *entry = Failures {
                count: 0,
                since: Instant::now(),
            };
        }
        entry.count += 1;
    }
}

/// The CN of a client certificate (DER).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator(name: &str, role: OperatorRole, password: &str) -> OperatorConfig {
        OperatorConfig {
            name: name.into(),
            role,
            password_hash: Some(password::hash(password.as_bytes()).unwrap()),
            certificate_cn: None,
        }
    }

    #[tokio::test]
    async fn passwords_are_checked_and_bad_ones_throttled_per_address() {
        let operators = Operators::new(&[
            operator("alice", OperatorRole::Admin, "correct horse"),
            operator("bob", OperatorRole::Reader, "battery staple"),
        ]);
        let here: IpAddr = "127.0.0.1".parse().unwrap();
        let there: IpAddr = "10.0.0.2".parse().unwrap();
        let alice = operators
            .by_password(here, "alice", b"correct horse")
            .await
            .unwrap();
        assert_eq!(alice.role, OperatorRole::Admin);
        let bob = operators
            .by_password(here, "bob", b"battery staple")
            .await
            .unwrap();
        assert_eq!(bob.role, OperatorRole::Reader);
        // Another's password, an unknown name, an empty password.
        for (name, password) in [
            ("alice", "battery staple"),
            ("mallory", "correct horse"),
            ("alice", ""),
        ] {
            assert_eq!(
                operators
                    .by_password(here, name, password.as_bytes())
                    .await
                    .unwrap_err(),
                Refusal::BadPassword
            );
        }
        for _ in 3..MAX_FAILURES {
            let _ = operators.by_password(here, "alice", b"guess").await;
        }
        // Throttled now, even with the right password; another address is not.
        assert_eq!(
            operators
                .by_password(here, "alice", b"correct horse")
                .await
                .unwrap_err(),
            Refusal::Throttled
        );
        assert!(operators
            .by_password(there, "alice", b"correct horse")
            .await
            .is_ok());
    }

    #[test]
    fn a_certificate_operator_is_found_by_its_cn_only() {
        let operators = Operators::new(&[OperatorConfig {
            name: "robot".into(),
            role: OperatorRole::Reader,
            password_hash: None,
            certificate_cn: Some("ops-robot".into()),
        }]);
        assert_eq!(
            operators.by_certificate("ops-robot").unwrap(),
            Authenticated {
                name: "robot".into(),
                role: OperatorRole::Reader
            }
        );
        assert!(operators.by_certificate("robot").is_err());
    }
}
