//! A real TPM through the TSS2 ESAPI (`tss-esapi` 7, on the system's tpm2-tss), as the
//! Azure TPM clients use one: the endorsement key persisted at 0x81010001 (made from the
//! TCG default RSA 2048 template when missing), the storage root key at 0x81000001 (an
//! RSA 2048 restricted decryption key with AES-128-CFB), and the key of the last
//! activation at 0x81000100, replacing the one before. Any TCTI: `device:/dev/tpmrm0`,
//! `swtpm:host=127.0.0.1,port=2321`, ...
//!
//! Built with the `tpm` feature only (it links libtss2-esys).

use std::str::FromStr;
use std::sync::Mutex;

use tss_esapi::abstraction::{ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, MaxBuffer, Private, Public, RsaExponent, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

/// Where the Azure TPM clients keep their keys.
pub const EK_HANDLE: u32 = 0x8101_0001;
pub const SRK_HANDLE: u32 = 0x8100_0001;
pub const KEY_HANDLE: u32 = 0x8100_0100;

/// A TPM opened through a TCTI.
pub struct EsapiTpm {
    context: Mutex<Context>,
    endorsement_key: Vec<u8>,
    storage_root_key: Vec<u8>,
}

fn failed(what: &str) -> impl Fn(tss_esapi::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// TPM2B_PUBLIC of `public`: its TPMT_PUBLIC with the size in front.
fn tpm2b_public(public: &Public) -> Result<Vec<u8>, String> {
    let area = public.marshall().map_err(failed("marshal a public area"))?;
    let size = u16::try_from(area.len()).map_err(|_| "a public area over 64 KiB".to_owned())?;
    let mut bytes = size.to_be_bytes().to_vec();
    bytes.extend_from_slice(&area);
    Ok(bytes)
}

/// The bytes of a TPM2B after its size.
fn body(tpm2b: &[u8]) -> &[u8] {
    tpm2b.get(2..).unwrap_or_default()
}

impl EsapiTpm {
    /// Opens the TPM at `tcti`; makes and persists its EK and SRK when they are missing.
    pub fn open(tcti: &str) -> Result<EsapiTpm, String> {
        let conf = TctiNameConf::from_str(tcti).map_err(failed("TCTI"))?;
        let mut context = Context::new(conf).map_err(failed("open the TPM"))?;
        let ek = persistent_key(&mut context, EK_HANDLE, |ctx| {
            ek::create_ek_object_2(
                ctx,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                None,
            )
        })?;
        let srk = persistent_key(&mut context, SRK_HANDLE, |ctx| {
            let template = tss_esapi::utils::create_restricted_decryption_rsa_public(
                SymmetricDefinitionObject::AES_128_CFB,
                RsaKeyBits::Rsa2048,
                RsaExponent::default(),
            )?;
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
                    .map(|made| made.key_handle)
            })
        })?;
        let (ek_public, _, _) = context.read_public(ek).map_err(failed("read the EK"))?;
        let (srk_public, _, _) = context.read_public(srk).map_err(failed("read the SRK"))?;
        Ok(EsapiTpm {
            endorsement_key: tpm2b_public(&ek_public)?,
            storage_root_key: tpm2b_public(&srk_public)?,
            context: Mutex::new(context),
        })
    }

    fn context(&self) -> std::sync::MutexGuard<'_, Context> {
        self.context.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The key persisted at `handle`, made with `make` and persisted there when missing.
fn persistent_key(
    context: &mut Context,
    handle: u32,
    make: impl FnOnce(&mut Context) -> tss_esapi::Result<KeyHandle>,
) -> Result<KeyHandle, String> {
    if let Some(found) = persisted(context, handle)? {
        return Ok(found.into());
    }
    let made = make(context).map_err(failed("make a primary key"))?;
    let persistent = Persistent::Persistent(
        PersistentTpmHandle::new(handle).map_err(failed("a persistent handle"))?,
    );
    let kept = context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(Provision::Owner, made.into(), persistent)
        })
        .map_err(failed("persist a key"))?;
    let _ = context.flush_context(made.into());
    Ok(kept.into())
}

/// The object at persistent `handle`, if there is one.
fn persisted(context: &mut Context, handle: u32) -> Result<Option<ObjectHandle>, String> {
    let tpm_handle = TpmHandle::Persistent(
        PersistentTpmHandle::new(handle).map_err(failed("a persistent handle"))?,
    );
    Ok(context.tr_from_tpm_public(tpm_handle).ok())
}

impl super::TpmDevice for EsapiTpm {
    fn endorsement_key(&self) -> Vec<u8> {
        self.endorsement_key.clone()
    }

    fn storage_root_key(&self) -> Vec<u8> {
        self.storage_root_key.clone()
    }

    fn activate(&self, blob: &[u8]) -> Result<(), String> {
        let [credential, secret, duplicate, seed, public, _] =
            edgedps_policies::tpm::activation_parts(blob).map_err(|e| e.to_string())?;
        let mut context = self.context();
        let ek: KeyHandle = persisted(&mut context, EK_HANDLE)?
            .ok_or("no EK at 0x81010001")?
            .into();
        let srk: KeyHandle = persisted(&mut context, SRK_HANDLE)?
            .ok_or("no SRK at 0x81000001")?
            .into();
        // ActivateCredential: the SRK with a password, the EK with PolicySecret(endorsement).
        let session = context
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(failed("start a policy session"))?
            .ok_or("no policy session")?;
        let policy = PolicySession::try_from(session).map_err(failed("a policy session"))?;
        let activated = context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .and_then(|_| {
                let id_object = IdObject::try_from(body(credential).to_vec())?;
                let secret = EncryptedSecret::try_from(body(secret).to_vec())?;
                context.execute_with_sessions(
                    (Some(AuthSession::Password), Some(session), None),
                    |ctx| ctx.activate_credential(srk, ek, id_object, secret),
                )
            });
        let _ = context.flush_context(tss_esapi::handles::SessionHandle::from(session).into());
        let inner = activated.map_err(failed("ActivateCredential"))?;
        // Import and Load the HMAC key under the SRK, then persist it where the last was.
        let public = Public::unmarshall(body(public)).map_err(failed("the key's public area"))?;
        let loaded = context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                let private = ctx.import(
                    srk.into(),
                    Some(Data::try_from(inner.value().to_vec())?),
                    public.clone(),
                    Private::try_from(body(duplicate).to_vec())?,
                    EncryptedSecret::try_from(body(seed).to_vec())?,
                    SymmetricDefinitionObject::AES_128_CFB,
                )?;
                ctx.load(srk, private, public)
            })
            .map_err(failed("Import and Load"))?;
        let persistent = Persistent::Persistent(
            PersistentTpmHandle::new(KEY_HANDLE).map_err(failed("a persistent handle"))?,
        );
        // The handle is looked up without a session (TR_FromTPMPublic takes none).
        let old = persisted(&mut context, KEY_HANDLE)?;
        let kept = context.execute_with_session(Some(AuthSession::Password), |ctx| {
            if let Some(old) = old {
                ctx.evict_control(Provision::Owner, old, persistent)?;
            }
            ctx.evict_control(Provision::Owner, loaded.into(), persistent)
        });
        let _ = context.flush_context(loaded.into());
        kept.map(|_| ()).map_err(failed("persist the key"))
    }

    fn hmac(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut context = self.context();
        let key = persisted(&mut context, KEY_HANDLE)?.ok_or("no key activated yet")?;
        let buffer = MaxBuffer::try_from(data.to_vec()).map_err(failed("data to sign"))?;
        context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.hmac(key, buffer, HashingAlgorithm::Sha256)
            })
            .map(|digest| digest.value().to_vec())
            .map_err(failed("HMAC"))
    }
}
