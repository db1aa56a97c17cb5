//! Device topics of Azure DPS over MQTT (PROTOCOL A3).
//!
//! Requests arrive on `$dps/registrations/{METHOD}/{operation}/?{query}`; responses go
//! out on `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`. The request id
//! is opaque and echoed byte for byte; the operation id may arrive URL-encoded.

use percent_encoding::percent_decode_str;

/// The only subscription a device may hold under `$dps/`.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// Prefix shared by every DPS topic.
pub const DPS_PREFIX: &str = "$dps/";

/// Prefix of every response topic.
pub const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

const REGISTER_PATH: &str = "$dps/registrations/PUT/iotdps-register/";
const POLL_PATH: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";

/// A request a device published under `$dps/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `PUT iotdps-register`: start (or repeat) a registration.
    Register { rid: String },
    /// `GET iotdps-get-operationstatus`: poll an operation.
    Poll { rid: String, operation_id: String },
}

impl DeviceRequest {
    /// The request id to echo in the response.
    pub fn rid(&self) -> &str {
        match self {
            DeviceRequest::Register { rid } | DeviceRequest::Poll { rid, .. } => rid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("not a DPS request topic: {0}")]
    UnknownTopic(String),
    #[error("request topic has no $rid")]
    MissingRid,
    #[error("poll topic has no operationId")]
    MissingOperationId,
    #[error("operationId is not valid UTF-8 after URL decoding")]
    BadOperationId,
}

/// Parses a device request topic. Query keys may come in any order; unknown keys are
/// ignored, as the SDKs add their own over time.
pub fn parse_request(topic: &str) -> Result<DeviceRequest, TopicError> {
    let (path, query) = topic
        .split_once('?')
        .ok_or_else(|| TopicError::UnknownTopic(topic.to_owned()))?;
    let mut rid = None;
    let mut operation_id = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "$rid" => rid = Some(value),
            "operationId" => operation_id = Some(value),
            _ => {}
        }
    }
    let rid = rid.ok_or(TopicError::MissingRid)?.to_owned();
    match path {
        REGISTER_PATH => Ok(DeviceRequest::Register { rid }),
        POLL_PATH => {
            let raw = operation_id.ok_or(TopicError::MissingOperationId)?;
            let operation_id = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| TopicError::BadOperationId)?
                .into_owned();
            if operation_id.is_empty() {
                return Err(TopicError::MissingOperationId);
            }
            Ok(DeviceRequest::Poll { rid, operation_id })
        }
        _ => Err(TopicError::UnknownTopic(topic.to_owned())),
    }
}

/// The device side: the topic of a register request.
pub fn register_topic(rid: &str) -> String {
    format!("{REGISTER_PATH}?$rid={rid}")
}

/// The device side: the topic of a poll for `operation_id` (as the service gave it).
pub fn poll_topic(rid: &str, operation_id: &str) -> String {
    format!("{POLL_PATH}?$rid={rid}&operationId={operation_id}")
}

/// A response topic, read by the device side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub rid: String,
    pub retry_after: Option<u32>,
}

/// Reads `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`; `None` for
/// any other topic.
pub fn parse_response_topic(topic: &str) -> Option<Response> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = rest.split_once("/?")?;
    let mut response = Response {
        status: status.parse().ok()?,
        rid: String::new(),
        retry_after: None,
    };
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("$rid", rid)) => response.rid = rid.to_owned(),
            Some(("retry-after", seconds)) => response.retry_after = seconds.parse().ok(),
            _ => {}
        }
    }
    Some(response)
}

/// Formats a response topic: `$rid` first, `retry-after` (whole seconds) when given.
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    let mut topic = String::with_capacity(40 + rid.len());
    topic.push_str(RESPONSE_PREFIX);
    topic.push_str(&status.to_string());
    topic.push_str("/?$rid=");
    topic.push_str(rid);
    if let Some(seconds) = retry_after {
        topic.push_str("&retry-after=");
        topic.push_str(&seconds.to_string());
    }
    topic
}

/// True for any topic in the DPS namespace (which never reaches the router).
pub fn is_dps_topic(topic: &str) -> bool {
    topic.starts_with(DPS_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_topic_of_every_sdk_parses() {
        // Python, Node and C SDKs: numeric or uuid rids.
        for (topic, rid) in [
            ("$dps/registrations/PUT/iotdps-register/?$rid=1", "1"),
            (
                "$dps/registrations/PUT/iotdps-register/?$rid=5bb0c9ae-2a1e-4c3b-9e3b-1f6b2a3c4d5e",
                "5bb0c9ae-2a1e-4c3b-9e3b-1f6b2a3c4d5e",
            ),
            ("$dps/registrations/PUT/iotdps-register/?$rid=", ""),
        ] {
            assert_eq!(
                parse_request(topic),
                Ok(DeviceRequest::Register { rid: rid.into() })
            );
        }
    }

    #[test]
    fn poll_topic_decodes_operation_id_and_accepts_any_key_order() {
        let op = "4.d3b1a2c0e5f6a7b8.12345678-1234-1234-1234-123456789abc";
        let plain =
            format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId={op}");
        let encoded = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=4%2Ed3b1a2c0e5f6a7b8%2E12345678-1234-1234-1234-123456789abc";
        let reordered =
            format!("$dps/registrations/GET/iotdps-get-operationstatus/?operationId={op}&$rid=7");
        for topic in [plain.as_str(), encoded, reordered.as_str()] {
            assert_eq!(
                parse_request(topic),
                Ok(DeviceRequest::Poll {
                    rid: "7".into(),
                    operation_id: op.into()
                }),
                "{topic}"
            );
        }
    }

    #[test]
    fn rid_is_echoed_byte_for_byte() {
        let rid = "a%2Fb+c";
        let req = parse_request(&format!(
            "$dps/registrations/PUT/iotdps-register/?$rid={rid}"
        ))
        .unwrap();
        assert_eq!(req.rid(), rid);
        assert_eq!(
            response_topic(200, req.rid(), None),
            "$dps/registrations/res/200/?$rid=a%2Fb+c"
        );
    }

    #[test]
    fn response_topic_puts_rid_first_and_retry_after_last() {
        assert_eq!(
            response_topic(202, "42", Some(1)),
            "$dps/registrations/res/202/?$rid=42&retry-after=1"
        );
        assert_eq!(
            response_topic(401, "x", None),
            "$dps/registrations/res/401/?$rid=x"
        );
    }

    #[test]
    fn device_side_topics_round_trip() {
        assert_eq!(
            parse_request(&register_topic("9")),
            Ok(DeviceRequest::Register { rid: "9".into() })
        );
        assert_eq!(
            parse_request(&poll_topic("10", "4.abc")),
            Ok(DeviceRequest::Poll {
                rid: "10".into(),
                operation_id: "4.abc".into()
            })
        );
        let topic = response_topic(429, "11", Some(3));
        assert_eq!(
            parse_response_topic(&topic),
            Some(Response {
                status: 429,
                rid: "11".into(),
                retry_after: Some(3)
            })
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/abc/?$rid=1"),
            None
        );
        assert_eq!(parse_response_topic("devices/x"), None);
    }

    #[test]
    fn unknown_and_incomplete_topics_are_refused() {
        assert!(matches!(
            parse_request("$dps/registrations/PUT/iotdps-something/?$rid=1"),
            Err(TopicError::UnknownTopic(_))
        ));
        assert!(matches!(
            parse_request("$dps/registrations/PUT/iotdps-register/"),
            Err(TopicError::UnknownTopic(_))
        ));
        assert_eq!(
            parse_request("$dps/registrations/PUT/iotdps-register/?foo=1"),
            Err(TopicError::MissingRid)
        );
        assert_eq!(
            parse_request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1"),
            Err(TopicError::MissingOperationId)
        );
        assert_eq!(
            parse_request(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=%FF"
            ),
            Err(TopicError::BadOperationId)
        );
    }
}
