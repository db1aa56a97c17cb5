//! Device and operator topic parsing: never panics, a parsed request's rid is a
//! substring of the topic (echoed byte for byte), and the device side reads back the
//! response topic the service writes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(topic) = std::str::from_utf8(data) {
        if let Ok(request) = edgedps_topics::dps::parse_request(topic) {
            assert!(topic.contains(request.rid()));
            let response = edgedps_topics::dps::response_topic(200, request.rid(), Some(1));
            if !request.rid().contains('&') {
                let read = edgedps_topics::dps::parse_response_topic(&response);
                assert_eq!(read.map(|r| (r.status, r.retry_after)), Some((200, Some(1))));
            }
        }
        let _ = edgedps_topics::dps::parse_response_topic(topic);
        let _ = edgedps_topics::admin::parse_topic(topic);
        let _ = edgedps_topics::admin::result_topic_of(topic);
    }
});
