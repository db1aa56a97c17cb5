//! What a TPM registration costs the server, in CPU: the challenge (MakeCredential and
//! the duplicated key: two RSA-OAEP encryptions) made twice per registration (the
//! challenge, then the hub key), and the token check. For BENCHMARKS.md:
//! `cargo run --release -p edgedps-policies --example tpm_cost`.

use std::time::Instant;

use base64::Engine;
use edgedps_policies::tpm::{self, PublicArea};

/// An RSA 2048 key in the TCG default EK template's shape (a real modulus is not needed
/// to encrypt; the cost is the same).
fn area(modulus_byte: u8) -> Vec<u8> {
    let mut t = Vec::new();
    for v in [0x0001u16, 0x000b] {
        t.extend_from_slice(&v.to_be_bytes());
    }
    t.extend_from_slice(&0x000300b2u32.to_be_bytes());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(&[0x83; 32]);
    for v in [0x0006u16, 128, 0x0043, 0x0010, 2048] {
        t.extend_from_slice(&v.to_be_bytes());
    }
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&256u16.to_be_bytes());
    let mut modulus = vec![modulus_byte; 256];
    modulus[0] |= 0x80;
    modulus[255] |= 1;
    t.extend_from_slice(&modulus);
    let mut out = (t.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&t);
    out
}

fn main() {
    let random = ring::rand::SystemRandom::new();
    let ek = PublicArea::parse(&area(0xc5)).expect("an EK");
    let srk = PublicArea::parse(&area(0xa7)).expect("an SRK");
    let rounds = 500;
    let started = Instant::now();
    for _ in 0..rounds {
        tpm::activation_blob(&ek, &srk, &[7u8; 32], &random).expect("a blob");
    }
    let blob = started.elapsed() / rounds;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let token = edgedps_policies::sas::sign(&key, "0ne00000001", "dev-1", 4_000_000_000).unwrap();
    let started = Instant::now();
    for _ in 0..rounds * 20 {
        let parsed = edgedps_policies::sas::SasToken::parse(&token).unwrap();
        parsed
            .verify("0ne00000001", "dev-1", &[&key], 1_800_000_000)
            .unwrap();
    }
    let verify = started.elapsed() / (rounds * 20);
    println!("activation blob (challenge or hub key): {blob:?} each");
    println!("token verification: {verify:?}");
    println!(
        "per TPM registration (2 blobs + 1 verification): {:?}",
        blob * 2 + verify
    );
}
