//! TPM attestation, the service side in software (TPM 2.0 Part 1, "Credential
//! Protection"): a TPM's public areas read and checked, its registration id, object
//! names, KDFa, and MakeCredential, which only the TPM holding the endorsement key can
//! undo (ActivateCredential) and only while the storage key named in it is loaded.
//!
//! Randomness is the caller's (`ring::rand::SecureRandom`), so that every function here
//! is deterministic given its inputs and tested with vectors.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::hmac;
use rsa::rand_core::{CryptoRng, RngCore};
use rsa::{BigUint, Oaep, RsaPublicKey};

/// TPM_ALG_RSA, TPM_ALG_KEYEDHASH, TPM_ALG_SHA256, TPM_ALG_AES, TPM_ALG_NULL.
const ALG_RSA: u16 = 0x0001;
const ALG_KEYEDHASH: u16 = 0x0008;
const ALG_SHA256: u16 = 0x000b;
const ALG_AES: u16 = 0x0006;
const ALG_NULL: u16 = 0x0010;
const ALG_XOR: u16 = 0x000a;
const ALG_CFB: u16 = 0x0043;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("TPM public area: {0}")]
    Malformed(String),
    #[error("endorsement key: {0}")]
    BadEndorsementKey(String),
    #[error("TPM crypto: {0}")]
    Crypto(String),
}

fn malformed(what: impl Into<String>) -> TpmError {
    TpmError::Malformed(what.into())
}

/// A reader of TPM marshalled data (big-endian).
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u16(&mut self, what: &str) -> Result<u16, TpmError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, TpmError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TpmError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| malformed(format!("ends inside {what}")))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// A TPM2B: a u16 size and that many bytes.
    fn sized(&mut self, what: &str) -> Result<&'a [u8], TpmError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

/// The parameters of an RSA key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaParameters {
    /// The symmetric algorithm of a storage key (or an EK): (algorithm, key bits, mode).
    pub symmetric: Option<(u16, u16, u16)>,
    pub key_bits: u16,
    /// 0 in the area means 65537.
    pub exponent: u32,
    pub modulus: Vec<u8>,
}

/// A TPMT_PUBLIC, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicArea {
    /// The marshalled TPMT_PUBLIC (without the TPM2B size): what its name hashes.
    pub marshalled: Vec<u8>,
    pub kind: u16,
    pub name_alg: u16,
    pub attributes: u32,
    pub rsa: Option<RsaParameters>,
}

impl PublicArea {
    /// Reads a TPM2B_PUBLIC (as `tpm.endorsementKey` and `storageRootKey` carry them).
    pub fn parse(tpm2b: &[u8]) -> Result<PublicArea, TpmError> {
        let mut outer = Reader {
            bytes: tpm2b,
            at: 0,
        };
        let inner = outer.sized("TPM2B_PUBLIC")?;
        if outer.at != tpm2b.len() {
            return Err(malformed(format!(
                "{} bytes after the TPM2B_PUBLIC",
                tpm2b.len() - outer.at
            )));
        }
        let mut r = Reader {
            bytes: inner,
            at: 0,
        };
        let kind = r.u16("type")?;
        let name_alg = r.u16("nameAlg")?;
        let attributes = r.u32("objectAttributes")?;
        r.sized("authPolicy")?;
        let rsa = match kind {
            ALG_RSA => {
                let alg = r.u16("symmetric")?;
                let symmetric = match alg {
                    ALG_NULL => None,
                    _ => Some((alg, r.u16("symmetric keyBits")?, r.u16("symmetric mode")?)),
                };
                let scheme = r.u16("scheme")?;
                if scheme != ALG_NULL {
                    r.u16("scheme hashAlg")?;
                }
                let key_bits = r.u16("keyBits")?;
                let exponent = r.u32("exponent")?;
                let modulus = r.sized("unique")?.to_vec();
                Some(RsaParameters {
                    symmetric,
                    key_bits,
                    exponent,
                    modulus,
                })
            }
            ALG_KEYEDHASH => {
                let scheme = r.u16("scheme")?;
                match scheme {
                    ALG_NULL => {}
                    ALG_XOR => {
                        r.u16("scheme hashAlg")?;
                        r.u16("scheme kdf")?;
                    }
                    _ => {
                        r.u16("scheme hashAlg")?;
                    }
                }
                r.sized("unique")?;
                None
            }
            other => return Err(malformed(format!("object type 0x{other:04x} is not read"))),
        };
        if r.at != inner.len() {
            return Err(malformed(format!(
                "{} bytes after the TPMT_PUBLIC",
                inner.len() - r.at
            )));
        }
        Ok(PublicArea {
            marshalled: inner.to_vec(),
            kind,
            name_alg,
            attributes,
            rsa,
        })
    }

    /// The object's name: `nameAlg || H(TPMT_PUBLIC)` (SHA-256 only).
    pub fn name(&self) -> Result<Vec<u8>, TpmError> {
        if self.name_alg != ALG_SHA256 {
            return Err(malformed(format!(
                "nameAlg 0x{:04x}: only SHA-256 is read",
                self.name_alg
            )));
        }
        let mut name = ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(
            ring::digest::digest(&ring::digest::SHA256, &self.marshalled).as_ref(),
        );
        Ok(name)
    }

    /// The RSA parameters of a storage key a credential or a duplicate can be made for
    /// (SHA-256 names, AES-128-CFB); `None` for any other key.
    pub fn storage_key(&self) -> Option<&RsaParameters> {
        self.rsa.as_ref().filter(|rsa| {
            self.name_alg == ALG_SHA256 && rsa.symmetric == Some((ALG_AES, 128, ALG_CFB))
        })
    }

    /// An endorsement key edgedps can challenge: RSA 2048, SHA-256 names, AES-128-CFB.
    pub fn check_endorsement_key(&self) -> Result<&RsaParameters, TpmError> {
        let bad = |why: String| TpmError::BadEndorsementKey(why);
        let rsa = self
            .rsa
            .as_ref()
            .ok_or_else(|| bad(format!("type 0x{:04x}, not RSA", self.kind)))?;
        if rsa.key_bits != 2048 || rsa.modulus.len() != 256 {
            return Err(bad(format!(
                "RSA {} bits ({} modulus bytes), not 2048",
                rsa.key_bits,
                rsa.modulus.len()
            )));
        }
        if self.name_alg != ALG_SHA256 {
            return Err(bad(format!("nameAlg 0x{:04x}, not SHA-256", self.name_alg)));
        }
        if rsa.symmetric != Some((ALG_AES, 128, ALG_CFB)) {
            return Err(bad(format!(
                "symmetric {:?}, not AES-128-CFB",
                rsa.symmetric
            )));
        }
        Ok(rsa)
    }
}

/// The registration id of a TPM: the lower-case, unpadded base32 of SHA-256 over its
/// endorsement key's TPM2B_PUBLIC (size prefix included), as the Azure SDKs derive it.
pub fn registration_id(endorsement_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, endorsement_key);
    data_encoding::BASE32_NOPAD
        .encode(digest.as_ref())
        .to_ascii_lowercase()
}

/// A TPM individual enrollment's keys, checked: the endorsement key (base64 TPM2B_PUBLIC)
/// must be one edgedps can challenge and name `registration_id` (its base32, any case),
/// and the storage root key, when given, a storage key a duplicate can be made to.
pub fn check_enrollment(
    registration_id: &str,
    endorsement_key: &str,
    storage_root_key: Option<&str>,
) -> Result<(PublicArea, Option<PublicArea>), TpmError> {
    use base64::Engine;
    let decode = |what: &str, b64: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| TpmError::BadEndorsementKey(format!("{what} is not base64")))
    };
    let ek_bytes = decode("endorsementKey", endorsement_key)?;
    let ek = PublicArea::parse(&ek_bytes)?;
    ek.check_endorsement_key()?;
    let derived = self::registration_id(&ek_bytes);
    if !derived.eq_ignore_ascii_case(registration_id) {
        return Err(TpmError::BadEndorsementKey(format!(
            "the registration id of this endorsement key is `{derived}`, not `{registration_id}`"
        )));
    }
    let srk = match storage_root_key {
        None => None,
        Some(b64) => {
            let srk = PublicArea::parse(&decode("storageRootKey", b64)?)?;
            if srk.storage_key().is_none() {
                return Err(TpmError::Malformed(
                    "storageRootKey is not an RSA storage key with SHA-256 and AES-128-CFB".into(),
                ));
            }
            Some(srk)
        }
    };
    Ok((ek, srk))
}

/// KDFa (SP 800-108 counter mode, HMAC-SHA-256): `bits` of key from `key`, `label`
/// (one NUL appended) and the two contexts.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut context = hmac::Context::with_key(&key);
        context.update(&counter.to_be_bytes());
        context.update(label.as_bytes());
        context.update(&[0]);
        context.update(context_u);
        context.update(context_v);
        context.update(&bits.to_be_bytes());
        out.extend_from_slice(context.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// A TPM2B of `bytes`.
pub fn tpm2b(bytes: &[u8]) -> Result<Vec<u8>, TpmError> {
    let size = u16::try_from(bytes.len())
        .map_err(|_| TpmError::Crypto(format!("{} bytes do not fit a TPM2B", bytes.len())))?;
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    Ok(out)
}

/// AES-128-CFB with a zero IV, in place.
fn aes_cfb(key: &[u8], data: &mut [u8]) -> Result<(), TpmError> {
    let encryptor = cfb_mode::Encryptor::<Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|e| TpmError::Crypto(format!("AES key: {e}")))?;
    encryptor.encrypt(data);
    Ok(())
}

/// `seed` encrypted to `key` with RSA-OAEP-SHA-256 and `label` (with its NUL).
fn encrypt_seed(
    key: &RsaParameters,
    label: &str,
    seed: &[u8],
    random: &dyn ring::rand::SecureRandom,
) -> Result<Vec<u8>, TpmError> {
    let exponent = match key.exponent {
        0 => 65537,
        e => e,
    };
    let public = RsaPublicKey::new(
        BigUint::from_bytes_be(&key.modulus),
        BigUint::from(exponent),
    )
    .map_err(|e| TpmError::Crypto(format!("RSA key: {e}")))?;
    let mut rng = RingRng(random);
    public
        .encrypt(
            &mut rng,
            Oaep::new_with_label::<sha2::Sha256, _>(label),
            seed,
        )
        .map_err(|e| TpmError::Crypto(format!("RSA-OAEP: {e}")))
}

/// What MakeCredential makes: the TPM2B_ID_OBJECT and the TPM2B_ENCRYPTED_SECRET, in the
/// order ActivateCredential takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub id_object: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// TPM2_MakeCredential in software: `credential` (at most 32 bytes) sealed to the TPM of
/// `endorsement_key` for the object named `object_name` (the storage key that will
/// activate it), with a fresh 32-byte seed from `random`.
pub fn make_credential(
    endorsement_key: &PublicArea,
    object_name: &[u8],
    credential: &[u8],
    random: &dyn ring::rand::SecureRandom,
) -> Result<Credential, TpmError> {
    let ek = endorsement_key.check_endorsement_key()?;
    if credential.len() > 32 {
        return Err(TpmError::Crypto(format!(
            "a credential holds at most 32 bytes, not {}",
            credential.len()
        )));
    }
    let mut seed = [0u8; 32];
    random
        .fill(&mut seed)
        .map_err(|_| TpmError::Crypto("no randomness".into()))?;
    let encrypted_seed = encrypt_seed(ek, "IDENTITY\0", &seed, random)?;
    Ok(Credential {
        id_object: id_object(&seed, object_name, credential)?,
        encrypted_secret: tpm2b(&encrypted_seed)?,
    })
}

/// The TPM2B_ID_OBJECT of a credential under `seed` (the part of MakeCredential that is
/// not the RSA encryption: deterministic, and checked with vectors).
pub fn id_object(seed: &[u8], object_name: &[u8], credential: &[u8]) -> Result<Vec<u8>, TpmError> {
    let sym_key = kdfa(seed, "STORAGE", object_name, &[], 128);
    let mut encrypted = tpm2b(credential)?;
    aes_cfb(&sym_key, &mut encrypted)?;
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &hmac_key);
    let mut context = hmac::Context::with_key(&key);
    context.update(&encrypted);
    context.update(object_name);
    let integrity = context.sign();
    let mut id = tpm2b(integrity.as_ref())?;
    id.extend_from_slice(&encrypted);
    tpm2b(&id)
}

/// An HMAC key duplicated to a storage key (TPM2_Duplicate in software, inner and outer
/// wrapper), as TPM2_Import takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The key's TPM2B_PUBLIC: KEYEDHASH, HMAC-SHA-256, `sign|noDA|userWithAuth`.
    pub public: Vec<u8>,
    /// The TPM2B_PRIVATE: outer HMAC, then the doubly wrapped sensitive area.
    pub duplicate: Vec<u8>,
    /// The TPM2B_ENCRYPTED_SECRET: the outer wrapper's seed, RSA-OAEP to the parent.
    pub encrypted_seed: Vec<u8>,
}

/// `sign | noDA | userWithAuth`: importable (neither fixedTPM nor fixedParent), used with
/// an empty password, as the Azure SDKs sign with it.
const HMAC_KEY_ATTRIBUTES: u32 = 0x0004_0440;
const ALG_HMAC: u16 = 0x0005;

/// Duplicates `key` (an HMAC-SHA-256 key of 32 bytes) to `parent` (a storage key:
/// RSA 2048 with AES-128-CFB), its sensitive area also wrapped with `inner_key`
/// (AES-128-CFB, the credential the TPM activates first).
pub fn duplicate_hmac_key(
    parent: &PublicArea,
    key: &[u8; 32],
    inner_key: &[u8; 16],
    random: &dyn ring::rand::SecureRandom,
) -> Result<Duplicate, TpmError> {
    let rsa = parent.storage_key().ok_or_else(|| {
        TpmError::Crypto("the storage key is not RSA with SHA-256 and AES-128-CFB".into())
    })?;
    let mut seed_value = [0u8; 32];
    let mut seed = [0u8; 32];
    random
        .fill(&mut seed_value)
        .and_then(|()| random.fill(&mut seed))
        .map_err(|_| TpmError::Crypto("no randomness".into()))?;
    let encrypted_seed = tpm2b(&encrypt_seed(rsa, "DUPLICATE\0", &seed, random)?)?;
    let (public, duplicate) = wrapped_hmac_key(key, inner_key, &seed_value, &seed)?;
    Ok(Duplicate {
        public,
        duplicate,
        encrypted_seed,
    })
}

/// The public area and the TPM2B_PRIVATE of `key` under `seed_value` and the outer
/// `seed` (the deterministic part of [`duplicate_hmac_key`]).
pub fn wrapped_hmac_key(
    key: &[u8; 32],
    inner_key: &[u8; 16],
    seed_value: &[u8; 32],
    seed: &[u8; 32],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let sha256 = |parts: &[&[u8]]| {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        parts.iter().for_each(|p| context.update(p));
        context.finish()
    };
    let unique = sha256(&[seed_value, key]);
    let mut area = Vec::with_capacity(48);
    area.extend_from_slice(&ALG_KEYEDHASH.to_be_bytes());
    area.extend_from_slice(&ALG_SHA256.to_be_bytes());
    area.extend_from_slice(&HMAC_KEY_ATTRIBUTES.to_be_bytes());
    area.extend_from_slice(&tpm2b(&[])?);
    area.extend_from_slice(&ALG_HMAC.to_be_bytes());
    area.extend_from_slice(&ALG_SHA256.to_be_bytes());
    area.extend_from_slice(&tpm2b(unique.as_ref())?);
    let public = tpm2b(&area)?;
    let name = PublicArea::parse(&public)?.name()?;
    // TPMT_SENSITIVE: type, authValue (empty), seedValue, the key.
    let mut sensitive = ALG_KEYEDHASH.to_be_bytes().to_vec();
    sensitive.extend_from_slice(&tpm2b(&[])?);
    sensitive.extend_from_slice(&tpm2b(seed_value)?);
    sensitive.extend_from_slice(&tpm2b(key)?);
    let sensitive = tpm2b(&sensitive)?;
    // Inner wrapper: integrity, then AES-CFB under the inner key.
    let inner_integrity = sha256(&[&sensitive, &name]);
    let mut wrapped = tpm2b(inner_integrity.as_ref())?;
    wrapped.extend_from_slice(&sensitive);
    aes_cfb(inner_key, &mut wrapped)?;
    // Outer wrapper: AES-CFB under a key from the seed, then its HMAC.
    let sym_key = kdfa(seed, "STORAGE", &name, &[], 128);
    aes_cfb(&sym_key, &mut wrapped)?;
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &hmac_key);
    let mut context = hmac::Context::with_key(&hmac_key);
    context.update(&wrapped);
    context.update(&name);
    let mut private = tpm2b(context.sign().as_ref())?;
    private.extend_from_slice(&wrapped);
    Ok((public, tpm2b(&private)?))
}

/// The `authenticationKey` Azure's TPM clients activate: an HMAC key for the TPM of
/// `endorsement_key`, loadable only under `storage_key`. A fresh inner key is sealed
/// to the EK (MakeCredential, bound to the storage key's name), and the HMAC key is
/// duplicated to the storage key under that inner key. Layout (766 bytes with RSA 2048
/// keys): TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET (to the EK), TPM2B_PRIVATE (the
/// duplicate), TPM2B_ENCRYPTED_SECRET (to the storage key), TPM2B_PUBLIC (the HMAC key),
/// an empty TPM2B_DATA (the clients read its size).
pub fn activation_blob(
    endorsement_key: &PublicArea,
    storage_key: &PublicArea,
    key: &[u8; 32],
    random: &dyn ring::rand::SecureRandom,
) -> Result<Vec<u8>, TpmError> {
    // 16 bytes: the C client imports with AES-128 whatever the size.
    let mut inner_key = [0u8; 16];
    random
        .fill(&mut inner_key)
        .map_err(|_| TpmError::Crypto("no randomness".into()))?;
    let credential = make_credential(endorsement_key, &storage_key.name()?, &inner_key, random)?;
    let duplicate = duplicate_hmac_key(storage_key, key, &inner_key, random)?;
    let mut blob = credential.id_object;
    blob.extend_from_slice(&credential.encrypted_secret);
    blob.extend_from_slice(&duplicate.duplicate);
    blob.extend_from_slice(&duplicate.encrypted_seed);
    blob.extend_from_slice(&duplicate.public);
    blob.extend_from_slice(&tpm2b(&[])?);
    Ok(blob)
}

/// The parts of an [`activation_blob`], in order (a client's reading of it).
pub fn activation_parts(blob: &[u8]) -> Result<[&[u8]; 6], TpmError> {
    let mut r = Reader { bytes: blob, at: 0 };
    let mut parts: [&[u8]; 6] = [&[]; 6];
    for (i, what) in ["credential", "secret", "duplicate", "seed", "public", "uri"]
        .iter()
        .enumerate()
    {
        let start = r.at;
        r.sized(what)?;
        parts[i] = &blob[start..r.at];
    }
    if r.at != blob.len() {
        return Err(malformed(format!(
            "{} bytes after the activation blob",
            blob.len() - r.at
        )));
    }
    Ok(parts)
}

/// `ring`'s system randomness as the `rand_core` generator the `rsa` crate asks for.
struct RingRng<'a>(&'a dyn ring::rand::SecureRandom);

impl RngCore for RingRng<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_be_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_be_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // Fails only without an entropy source; try_fill_bytes reports it.
        let _ = self.try_fill_bytes(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.0.fill(dest).map_err(|_| {
            rsa::rand_core::Error::from(
                std::num::NonZeroU32::new(1).unwrap_or(std::num::NonZeroU32::MIN),
            )
        })
    }
}

impl CryptoRng for RingRng<'_> {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An RSA 2048 EK in the TCG default template's shape, with `modulus`.
    pub(crate) fn ek_area(modulus: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&ALG_RSA.to_be_bytes());
        t.extend_from_slice(&ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&0x000300b2u32.to_be_bytes());
        t.extend_from_slice(&tpm2b(&[0x83; 32]).unwrap());
        t.extend_from_slice(&ALG_AES.to_be_bytes());
        t.extend_from_slice(&128u16.to_be_bytes());
        t.extend_from_slice(&ALG_CFB.to_be_bytes());
        t.extend_from_slice(&ALG_NULL.to_be_bytes());
        t.extend_from_slice(&2048u16.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&tpm2b(modulus).unwrap());
        tpm2b(&t).unwrap()
    }

    #[test]
    fn an_endorsement_key_is_read_named_and_checked() {
        let area = ek_area(&[0xc5; 256]);
        assert_eq!(area.len(), 316, "the size the SDKs send");
        let ek = PublicArea::parse(&area).unwrap();
        let rsa = ek.check_endorsement_key().unwrap();
        assert_eq!(rsa.exponent, 0);
        let name = ek.name().unwrap();
        assert_eq!(&name[..2], &[0x00, 0x0b]);
        assert_eq!(name.len(), 34);
        assert_eq!(registration_id(&area).len(), 52);
        assert_eq!(
            registration_id(&area),
            registration_id(&area).to_ascii_lowercase()
        );
        // Not 2048 bits; truncated; trailing bytes.
        let short = PublicArea::parse(&ek_area(&[0xc5; 128])).unwrap();
        assert!(short
            .check_endorsement_key()
            .unwrap_err()
            .to_string()
            .contains("2048"));
        assert!(PublicArea::parse(&area[..200]).is_err());
        let mut long = area.clone();
        long.push(0);
        assert!(PublicArea::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("after"));
    }

    #[test]
    fn an_enrollment_s_keys_must_name_its_registration_id() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let area = ek_area(&[0xc5; 256]);
        let id = registration_id(&area);
        let (ek, srk) = check_enrollment(&id.to_ascii_uppercase(), &b64(&area), None).unwrap();
        assert_eq!(ek.kind, ALG_RSA);
        assert!(srk.is_none());
        // The EK's template is also a storage key's: accepted as the SRK too.
        assert!(check_enrollment(&id, &b64(&area), Some(&b64(&area)))
            .unwrap()
            .1
            .is_some());
        for (rid, ek, srk, says) in [
            ("other-id", b64(&area), None, "not `other-id`"),
            (id.as_str(), "not base64!".to_owned(), None, "not base64"),
            (id.as_str(), b64(&area[..100]), None, "ends inside"),
            (id.as_str(), b64(&ek_area(&[1; 128])), None, "2048"),
            (
                id.as_str(),
                b64(&area),
                Some("%%%".to_owned()),
                "storageRootKey is not base64",
            ),
        ] {
            let err = check_enrollment(rid, &ek, srk.as_deref())
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn registration_ids_are_the_lower_case_base32_of_the_sha256() {
        // SHA-256("abc") = ba7816bf...; its RFC 4648 base32, lower-cased, unpadded.
        assert_eq!(
            registration_id(b"abc"),
            "xj4bnp4pahh6uqkbidpf3lrceoyagyndsylxvhfucd7wd4qacwwq"
        );
    }

    #[test]
    fn the_identity_key_has_the_public_area_the_sdks_read() {
        let (public, private) = wrapped_hmac_key(&[1; 32], &[2; 16], &[3; 32], &[4; 32]).unwrap();
        // TPM2B size 48, then `0008 000b 00040440 0000 0005 000b 0020 <unique>` (TPM.md).
        assert_eq!(
            public[..16],
            [
                0x00, 0x30, 0x00, 0x08, 0x00, 0x0b, 0x00, 0x04, 0x04, 0x40, 0x00, 0x00, 0x00, 0x05,
                0x00, 0x0b
            ]
        );
        assert_eq!(public[16..18], [0x00, 0x20]);
        let unique = ring::digest::digest(&ring::digest::SHA256, &[[3u8; 32], [1u8; 32]].concat());
        assert_eq!(&public[18..], unique.as_ref());
        // TPM2B_PRIVATE: 2 + (2 + 32 outer HMAC) + 108 wrapped sensitive.
        assert_eq!(private.len(), 144);
        // Deterministic given its seeds; another inner key changes the wrapped part only.
        assert_eq!(
            wrapped_hmac_key(&[1; 32], &[2; 16], &[3; 32], &[4; 32])
                .unwrap()
                .1,
            private
        );
        let other = wrapped_hmac_key(&[1; 32], &[9; 16], &[3; 32], &[4; 32]).unwrap();
        assert_eq!(other.0, public);
        assert_ne!(other.1, private);
    }

    #[test]
    fn kdfa_matches_the_counter_mode_construction() {
        // One block: HMAC(key, 00000001 || "STORAGE\0" || u || v || 00000080), cut to 16.
        let key = [7u8; 32];
        let expected = {
            let k = hmac::Key::new(hmac::HMAC_SHA256, &key);
            let mut m = vec![0, 0, 0, 1];
            m.extend_from_slice(b"STORAGE\0uv");
            m.extend_from_slice(&128u32.to_be_bytes());
            hmac::sign(&k, &m).as_ref()[..16].to_vec()
        };
        assert_eq!(kdfa(&key, "STORAGE", b"u", b"v", 128), expected);
        let long = kdfa(&key, "INTEGRITY", &[], &[], 512);
        assert_eq!(long.len(), 64);
        assert_ne!(long[..32], long[32..]);
    }
}
