//! TPM attestation's software side (`edgedps_policies::tpm`) against a real, independent
//! TPM: swtpm driven by the stock tpm2-tools. The key names edgedps computes are the
//! TPM's, and a credential edgedps makes is activated by that TPM only for the storage
//! key it names, only when untouched.

use edgedps_policies::tpm::{self, PublicArea};
use edgedps_tests::tpm::SoftwareTpm;

#[test]
fn a_credential_made_in_software_is_activated_by_the_tpm_it_was_made_for() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let ek_bytes = std::fs::read(soft.path("ek.pub")).unwrap();
    let srk_bytes = std::fs::read(soft.path("srk.pub")).unwrap();
    assert_eq!(ek_bytes.len(), 316, "the EK the SDKs send");
    let ek = PublicArea::parse(&ek_bytes).expect("the TPM's EK reads");
    ek.check_endorsement_key()
        .expect("the TCG default EK is accepted");
    let srk = PublicArea::parse(&srk_bytes).expect("the TPM's SRK reads");
    // Names as the TPM computes them.
    let srk_name = srk.name().unwrap();
    assert_eq!(srk_name, std::fs::read(soft.path("srk.name")).unwrap());
    assert_eq!(tpm::registration_id(&ek_bytes).len(), 52);
    // The enrollment an operator would write for this TPM is accepted.
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    tpm::check_enrollment(
        &tpm::registration_id(&ek_bytes),
        &b64(&ek_bytes),
        Some(&b64(&srk_bytes)),
    )
    .expect("the TPM's own keys enroll");

    let secret = b"0123456789abcdef";
    let credential = tpm::make_credential(&ek, &srk_name, secret, &random).unwrap();
    assert_eq!(
        soft.activate(&credential.id_object, &credential.encrypted_secret),
        Ok(secret.to_vec())
    );

    // Made for another object's name: the TPM refuses (integrity).
    let other = tpm::make_credential(&ek, &ek.name().unwrap(), secret, &random).unwrap();
    let refused = soft
        .activate(&other.id_object, &other.encrypted_secret)
        .unwrap_err();
    assert!(
        refused.contains("integrity") || refused.contains("0x1df") || refused.contains("Esys"),
        "{refused}"
    );
    // A flipped byte of the encrypted credential: refused.
    let mut flipped = credential.id_object.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(soft
        .activate(&flipped, &credential.encrypted_secret)
        .is_err());
    // Another TPM's endorsement key: this TPM cannot open it.
    let stranger = SoftwareTpm::start();
    stranger.make_keys();
    let their_ek = PublicArea::parse(&std::fs::read(stranger.path("ek.pub")).unwrap()).unwrap();
    let theirs = tpm::make_credential(&their_ek, &srk_name, secret, &random).unwrap();
    assert!(soft
        .activate(&theirs.id_object, &theirs.encrypted_secret)
        .is_err());
}

#[test]
fn an_hmac_key_duplicated_in_software_is_imported_by_the_tpm_and_signs_as_it_should() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let srk = PublicArea::parse(&std::fs::read(soft.path("srk.pub")).unwrap()).unwrap();
    let key = [0x5au8; 32];
    let inner = [0x17u8; 16];
    let dup = tpm::duplicate_hmac_key(&srk, &key, &inner, &random).unwrap();
    assert_eq!(
        dup.public.len(),
        50,
        "the identity key's TPM2B_PUBLIC the SDKs read"
    );
    let data = b"0ne00000001%2Fregistrations%2Fdev-1\n1796626393";
    let signed = soft
        .import_and_hmac(
            &dup.public,
            &dup.duplicate,
            &dup.encrypted_seed,
            &inner,
            data,
        )
        .expect("the TPM imports, loads and signs with the key");
    let expected = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), data);
    assert_eq!(signed, expected.as_ref());
    // With another inner key the TPM refuses the import.
    let refused = soft.import_and_hmac(
        &dup.public,
        &dup.duplicate,
        &dup.encrypted_seed,
        &[0u8; 16],
        data,
    );
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn an_authentication_key_is_activated_imported_and_signs_sas_tokens_in_the_tpm() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let ek = PublicArea::parse(&std::fs::read(soft.path("ek.pub")).unwrap()).unwrap();
    let srk = PublicArea::parse(&std::fs::read(soft.path("srk.pub")).unwrap()).unwrap();
    let key = [0xa5u8; 32];
    let blob = tpm::activation_blob(&ek, &srk, &key, &random).unwrap();
    assert_eq!(blob.len(), 766, "the size both SDKs parse");
    let [credential, secret, duplicate, seed, public, uri] = tpm::activation_parts(&blob).unwrap();
    assert_eq!(
        [
            credential.len(),
            secret.len(),
            duplicate.len(),
            seed.len(),
            public.len(),
            uri.len()
        ],
        [54, 258, 144, 258, 50, 2]
    );
    // As the SDKs do: ActivateCredential gives the inner key, Import + Load the HMAC key.
    let inner = soft.activate(credential, secret).expect("activated");
    assert_eq!(inner.len(), 16);
    let sr = "0ne00000001%2Fregistrations%2Fdev-1\n1796626393";
    let signed = soft
        .import_and_hmac(public, duplicate, seed, &inner, sr.as_bytes())
        .expect("imported, loaded, signed");
    let expected = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        sr.as_bytes(),
    );
    assert_eq!(signed, expected.as_ref());
}
