//! CONNECT username and registration id rules: never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(username) = edgedps_topics::identity::parse_username(text) {
            assert!(text.starts_with(username.id_scope));
        }
        let _ = edgedps_topics::identity::valid_registration_id(text);
    }
});
