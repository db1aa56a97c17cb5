//! The MQTT decode path of a session: version detection, then packets until the
//! bytes run out or an error closes the session. Never panics, never loops.
#![no_main]
use bytes::BytesMut;
use edgedps::codec::{detect_version, Codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = 4096;
    let mut buf = BytesMut::from(data);
    let version = match detect_version(&buf, max) {
        Ok(Some(v)) => v,
        _ => return,
    };
    let mut codec = Codec::new(version, max);
    for _ in 0..1000 {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
});
