//! Revocation lists and retirement bodies from operators: reading a CRL body (PEM or
//! DER, with certificates), verifying it against a trusted CA, and checking bytes as a
//! presented chain against a verified list never panic.
#![no_main]
use std::sync::OnceLock;

use edgedps_policies::revocation::{read_body, revoked_in, RevocationList};
use edgedps_topics::admin::RetireRequest;
use edgedps_topics::encoding::Encoding;
use libfuzzer_sys::fuzz_target;

/// A CA and a list it signed, made once per run.
fn trusted() -> &'static (Vec<u8>, RevocationList) {
    static CA: OnceLock<(Vec<u8>, RevocationList)> = OnceLock::new();
    CA.get_or_init(|| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fuzz CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        let issuer = rcgen::Issuer::new(params, key);
        let now = time::OffsetDateTime::now_utc();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(7u64),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("CRL");
        let der = cert.der().to_vec();
        let list = RevocationList::verify(crl.der(), &[], &[&der]).expect("verifies");
        (der, list)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ca, list) = trusted();
    if let Ok(body) = read_body(data) {
        let _ = RevocationList::verify(&body.crl, &body.certificates, &[ca]);
        let _ = RevocationList::reload(&body.crl, ca);
    }
    let _ = RevocationList::verify(data, &[data.to_vec()], &[ca, data]);
    let _ = revoked_in([list], &[data.to_vec(), ca.clone()]);
    let _ = Encoding::Json.decode::<RetireRequest>(data);
    let _ = Encoding::Cbor.decode::<RetireRequest>(data);
});
