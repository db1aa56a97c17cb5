//! Device and operator topic parsing: never panics, and a parsed request's rid is a
//! substring of the topic (echoed byte for byte).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(topic) = std::str::from_utf8(data) {
        if let Ok(request) = edgedps_topics::dps::parse_request(topic) {
            assert!(topic.contains(request.rid()));
            let _ = edgedps_topics::dps::response_topic(200, request.rid(), Some(1));
        }
        let _ = edgedps_topics::admin::parse_topic(topic);
    }
});
