//! CBOR bodies (PROTOCOL C), register and operator: decoding never panics, never
//! recurses without bound, and what decodes re-encodes.
#![no_main]
use edgedps_topics::admin::{Enrollment, EnrollmentGroup, LinkedHub};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::registration::RegisterRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cbor = Encoding::Cbor;
    // The register path: the body read straight from CBOR.
    if let Ok(request) = RegisterRequest::parse(data, cbor) {
        assert!(matches!(
            request.payload,
            None | Some(serde_json::Value::Object(_))
        ));
    }
    // What decodes re-encodes.
    if let Ok(document) = cbor.decode::<serde_json::Value>(data) {
        let again = cbor.encode(&document);
        assert!(cbor.decode::<serde_json::Value>(&again).is_ok());
    }
    // The operator path: records straight from CBOR.
    if let Ok(e) = cbor.decode::<Enrollment>(data) {
        let _ = cbor.encode(&e);
    }
    if let Ok(g) = cbor.decode::<EnrollmentGroup>(data) {
        let _ = cbor.encode(&g);
    }
    let _ = cbor.decode::<LinkedHub>(data);
});
