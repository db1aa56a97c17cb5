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
