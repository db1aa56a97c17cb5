//! SAS token parsing and verification: never panics, and nothing but a token signed
//! with the key verifies.
#![no_main]
use libfuzzer_sys::fuzz_target;

const KEY: &str = "VGhpcyBpcyBhIHRlc3Qga2V5IGZvciBkb2NzIG9ubHkhIQ==";

fuzz_target!(|data: &[u8]| {
    if let Ok(password) = std::str::from_utf8(data) {
        if let Ok(token) = edgedps_policies::sas::SasToken::parse(password) {
            let verdict = token.verify("0ne00000001", "dev-1", &[KEY], 1_800_000_000);
            if verdict.is_ok() {
                // Only possible with the real signature over this very sr and se.
                let resigned =
                    edgedps_policies::sas::sign_resource(KEY, &token.resource(), token.expiry());
                assert!(resigned.is_ok());
            }
        }
    }
});
