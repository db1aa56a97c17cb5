//! Register bodies: never panic; an accepted payload is an object or absent.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = edgedps_topics::registration::RegisterRequest::parse(
        data,
        edgedps_topics::encoding::Encoding::Json,
    ) {
        assert!(matches!(
            request.payload,
            None | Some(serde_json::Value::Object(_))
        ));
    }
});
