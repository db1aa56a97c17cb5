//! Direct method calls waiting for their answers (PROTOCOL E): which operator call a
//! device's answer belongs to. A call is filed under a request id of the server's;
//! only the device it went to can answer it, once; a call answered or given up is
//! forgotten. At most `limit` calls wait at a time.

use std::collections::HashMap;

/// The calls waiting for their devices' answers.
#[derive(Debug)]
pub struct PendingCalls {
    calls: HashMap<String, Call>,
    limit: usize,
}

#[derive(Debug)]
struct Call {
    /// The device's key (its id without case).
    device: String,
    correlation_id: String,
}

/// `limit` calls wait already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMany(pub usize);

impl PendingCalls {
    pub fn new(limit: usize) -> PendingCalls {
        PendingCalls {
            calls: HashMap::new(),
            limit,
        }
    }

    /// Files call `rid`, sent to `device` for the operator's `correlation_id`.
    pub fn start(&mut self, rid: &str, device: &str, correlation_id: &str) -> Result<(), TooMany> {
        if self.calls.len() >= self.limit {
            return Err(TooMany(self.limit));
        }
        self.calls.insert(
            rid.to_owned(),
            Call {
                device: device.to_ascii_lowercase(),
                correlation_id: correlation_id.to_owned(),
            },
        );
        Ok(())
    }

    /// `device` answered `rid`: the correlation id of its call, unless no call of that
    /// device waits under that id.
    pub fn answer(&mut self, rid: &str, device: &str) -> Option<String> {
        let call = self.calls.get(rid)?;
        if !call.device.eq_ignore_ascii_case(device) {
            return None;
        }
        self.calls.remove(rid).map(|call| call.correlation_id)
    }

    /// Gives up call `rid` (timed out, or never sent): its correlation id, if it was
    /// still waiting.
    pub fn give_up(&mut self, rid: &str) -> Option<String> {
        self.calls.remove(rid).map(|call| call.correlation_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_called_device_answers_and_only_once() {
        let mut calls = PendingCalls::new(2);
        calls.start("r1", "Dev-1", "c1").unwrap();
        assert_eq!(calls.answer("r1", "dev-2"), None, "another device");
        assert_eq!(calls.answer("r9", "dev-1"), None, "unknown id");
        assert_eq!(calls.answer("r1", "DEV-1"), Some("c1".into()));
        assert_eq!(calls.answer("r1", "dev-1"), None, "answered already");
        assert_eq!(calls.give_up("r1"), None, "nothing to time out");
    }

    #[test]
    fn a_call_given_up_takes_no_answer_and_the_limit_holds() {
        let mut calls = PendingCalls::new(2);
        calls.start("r1", "dev-1", "c1").unwrap();
        calls.start("r2", "dev-1", "c2").unwrap();
        assert_eq!(calls.start("r3", "dev-1", "c3"), Err(TooMany(2)));
        assert_eq!(calls.give_up("r1"), Some("c1".into()));
        assert_eq!(calls.answer("r1", "dev-1"), None);
        calls.start("r3", "dev-1", "c3").unwrap();
    }
}
