//! Operator passwords: argon2id hashes in the PHC string format
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`), made by `edgedps admin hash-password`
//! and kept in `[[operators]] password_hash`; edgedps keeps no password itself.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Is `hash` a PHC string argon2 can check? The reason when it is not.
pub fn check_hash(hash: &str) -> Result<(), String> {
    PasswordHash::new(hash)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An argon2id hash of `password` with a random salt and the crate's default parameters
/// (19 MiB, 2 passes: tens of milliseconds).
pub fn hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no random bytes for the salt".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Does `password` match `hash`? A hash that is not a PHC string matches nothing.
pub fn verify(password: &[u8], hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_matches_its_password_only_and_is_salted() {
        let one = hash(b"correct horse").unwrap();
        let two = hash(b"correct horse").unwrap();
        assert!(one.starts_with("$argon2id$"), "{one}");
        assert_ne!(one, two);
        assert!(check_hash(&one).is_ok());
        assert!(verify(b"correct horse", &one));
        assert!(verify(b"correct horse", &two));
        assert!(!verify(b"correct horse ", &one));
        assert!(!verify(b"", &one));
        assert!(!verify(b"correct horse", "plain text"));
        assert!(check_hash("plain text").is_err());
    }
}
