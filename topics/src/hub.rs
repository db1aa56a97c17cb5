//! Topics of the gateway as the device's hub (PROTOCOL E): the IoT Hub device side
//! (`$iothub/...` and `devices/{deviceId}/messages/...`) and the operator side
//! (`hub/...`).
//!
//! Requests arrive on `$iothub/twin/GET/?$rid={rid}`,
//! `$iothub/twin/PATCH/properties/reported/?$rid={rid}` and (answers to direct methods)
//! `$iothub/methods/res/{status}/?$rid={rid}`. As with DPS, the request id is opaque and
//! echoed byte for byte, and query keys the SDKs add are ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Prefix of every IoT Hub device topic edgedps answers in process.
pub const IOTHUB_PREFIX: &str = "$iothub/";
/// Where a device reads the answers to its twin requests.
pub const TWIN_RESPONSE_FILTER: &str = "$iothub/twin/res/#";
/// Where a device reads changes to its desired properties.
pub const DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
/// Where a device reads direct method calls.
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";
/// Where a device reads the answers to its certificate renewals (PROTOCOL F).
pub const CREDENTIALS_FILTER: &str = "$iothub/credentials/res/#";

const TWIN_GET_PATH: &str = "$iothub/twin/GET/";
const TWIN_REPORTED_PATH: &str = "$iothub/twin/PATCH/properties/reported/";
const METHOD_RESPONSE_PREFIX: &str = "$iothub/methods/res/";
const ISSUE_CERTIFICATE_PATH: &str = "$iothub/credentials/POST/issueCertificate/";

/// The operator plane's twin records and writes: `hub/twins/{deviceId}[/desired|/tags]`.
pub const TWINS_PREFIX: &str = "hub/twins/";
/// Method calls from operators: `hub/methods/{deviceId}/{correlationId}`.
pub const METHODS_PREFIX: &str = "hub/methods/";
/// Answers to method calls: `hub/methods/responses/{correlationId}`.
pub const METHOD_RESPONSES_PREFIX: &str = "hub/methods/responses/";

/// The longest a method call may wait for its answer, and its default (IoT Hub's).
pub const MAX_METHOD_TIMEOUT_SECONDS: u64 = 300;
pub const DEFAULT_METHOD_TIMEOUT_SECONDS: u64 = 30;

/// A request a hub device published under `$iothub/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubRequest {
    /// Read the whole twin.
    TwinGet { rid: String },
    /// Patch the reported properties (the body is the patch).
    TwinReported { rid: String },
    /// The answer to direct method call `rid` (the body is the method's result).
    MethodResponse { status: u16, rid: String },
    /// A certificate renewal (PROTOCOL F; the body is an [`IssueCertificateRequest`]).
    IssueCertificate { rid: String },
}

impl HubRequest {
    pub fn rid(&self) -> &str {
        match self {
            HubRequest::TwinGet { rid }
            | HubRequest::TwinReported { rid }
            | HubRequest::MethodResponse { rid, .. }
            | HubRequest::IssueCertificate { rid } => rid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubTopicError {
    #[error("`{0}` is not an IoT Hub topic edgedps serves")]
    UnknownTopic(String),
    #[error("request topic has no $rid")]
    MissingRid,
    #[error("method response status `{0}` is not a number")]
    BadStatus(String),
    #[error("`{0}` is not a device id")]
    BadDeviceId(String),
    #[error("`{0}` is not a method call topic: hub/methods/{{deviceId}}/{{correlationId}}")]
    BadMethodTopic(String),
}

/// Parses a device's `$iothub/...` publish.
pub fn parse_request(topic: &str) -> Result<HubRequest, HubTopicError> {
    let (path, query) = topic
        .split_once('?')
        .ok_or_else(|| HubTopicError::UnknownTopic(topic.to_owned()))?;
    let rid = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("$rid="))
        .ok_or(HubTopicError::MissingRid)?
        .to_owned();
    match path {
        TWIN_GET_PATH => Ok(HubRequest::TwinGet { rid }),
        TWIN_REPORTED_PATH => Ok(HubRequest::TwinReported { rid }),
        ISSUE_CERTIFICATE_PATH => Ok(HubRequest::IssueCertificate { rid }),
        _ => {
            let status = path
                .strip_prefix(METHOD_RESPONSE_PREFIX)
                .and_then(|rest| rest.strip_suffix('/'))
                .ok_or_else(|| HubTopicError::UnknownTopic(topic.to_owned()))?;
            let status = status
                .parse()
                .map_err(|_| HubTopicError::BadStatus(status.to_owned()))?;
            Ok(HubRequest::MethodResponse { status, rid })
        }
    }
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}][&retry-after={s}]`.
pub fn twin_response_topic(
    status: u16,
    rid: &str,
    version: Option<u64>,
    retry_after: Option<u32>,
) -> String {
    let mut topic = format!("$iothub/twin/res/{status}/?$rid={rid}");
    if let Some(version) = version {
        topic.push_str(&format!("&$version={version}"));
    }
    if let Some(seconds) = retry_after {
        topic.push_str(&format!("&retry-after={seconds}"));
    }
    topic
}

/// `$iothub/credentials/res/{status}/?$rid={rid}`.
pub fn credentials_response_topic(status: u16, rid: &str) -> String {
    format!("$iothub/credentials/res/{status}/?$rid={rid}")
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`.
pub fn desired_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{method}/?$rid={rid}`.
pub fn method_request_topic(method: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{method}/?$rid={rid}")
}

/// The cloud-to-device filter with `+` for the device id, as the Embedded C SDK
/// subscribes it (`AZ_IOT_HUB_CLIENT_C2D_SUBSCRIBE_TOPIC`). IoT Hub reads the `+` as the
/// subscribing device: it never reaches another device's messages.
pub const DEVICEBOUND_ANY_ID_FILTER: &str = "devices/+/messages/devicebound/#";

/// The two spellings of a device's cloud-to-device subscription that IoT Hub accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceboundFilter {
    /// `devices/{deviceId}/messages/devicebound/#`, the device's own id (any case).
    Own,
    /// [`DEVICEBOUND_ANY_ID_FILTER`].
    AnyId,
}

/// Whether `filter` is device `device_id`'s cloud-to-device subscription, and which
/// spelling. `None` for any other filter, another device's included.
pub fn devicebound_subscription(filter: &str, device_id: &str) -> Option<DeviceboundFilter> {
    if filter.eq_ignore_ascii_case(DEVICEBOUND_ANY_ID_FILTER) {
        return Some(DeviceboundFilter::AnyId);
    }
    let id = filter
        .strip_prefix("devices/")?
        .strip_suffix("/messages/devicebound/#")?;
    // Device ids compare without case, as registration ids do.
    (!device_id.is_empty() && id.eq_ignore_ascii_case(device_id)).then_some(DeviceboundFilter::Own)
}

/// The topic a cloud-to-device message reaches its device on.
pub fn devicebound_topic(device_id: &str, property_bag: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/{property_bag}")
}

/// The property bag a cloud-to-device message reaches its device with: IoT Hub's
/// system properties first (`$.mid`, the message id, unless the operator gave one, and
/// `$.to`), then the operator's bag as written. The message id stays with the message:
/// a device that gets it twice (at least once) can tell.
pub fn devicebound_bag(operator_bag: &str, device_id: &str, message_id: &str) -> String {
    let has = |wanted: &str| {
        operator_bag.split('&').any(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            percent_encoding::percent_decode_str(key).decode_utf8_lossy() == wanted
        })
    };
    let mut bag = String::new();
    if !has("$.mid") {
        let id = percent_encoding::utf8_percent_encode(message_id, BAG_VALUE);
        bag.push_str(&format!("%24.mid={id}&"));
    }
    if !has("$.to") {
        bag.push_str(&format!(
            "%24.to=%2Fdevices%2F{device_id}%2Fmessages%2FdeviceBound&"
        ));
    }
    bag.push_str(operator_bag);
    if bag.ends_with('&') {
        bag.pop();
    }
    bag
}

/// What a value in a property bag may not hold as it is.
const BAG_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A cloud-to-device message topic: the device id and the property bag (everything
/// after `devicebound/`, possibly empty). `None` for any other topic.
pub fn parse_devicebound(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device_id, rest) = rest.split_once('/')?;
    let bag = rest.strip_prefix("messages/devicebound")?;
    let bag = match bag {
        "" => "",
        _ => bag.strip_prefix('/')?,
    };
    (crate::valid_registration_id(device_id)).then_some((device_id, bag))
}

/// What an operator publishes under `hub/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorWrite {
    /// A desired-properties patch: `hub/twins/{deviceId}/desired`.
    Desired { device_id: String },
    /// A tags patch: `hub/twins/{deviceId}/tags`.
    Tags { device_id: String },
    /// The twin record itself, `hub/twins/{deviceId}`: written by edgedps only.
    Record { device_id: String },
    /// A direct method call: `hub/methods/{deviceId}/{correlationId}`.
    Invoke {
        device_id: String,
        correlation_id: String,
    },
}

/// Parses an operator's publish under `hub/twins/` or `hub/methods/` (not the method
/// responses, which edgedps writes and anyone may read). `None` for other topics.
pub fn parse_operator_topic(topic: &str) -> Option<Result<OperatorWrite, HubTopicError>> {
    if let Some(rest) = topic.strip_prefix(TWINS_PREFIX) {
        let (device_id, what) = match rest.split_once('/') {
            Some((id, what)) => (id, Some(what)),
            None => (rest, None),
        };
        let write = |device_id: String| match what {
            None => Ok(OperatorWrite::Record { device_id }),
            Some("desired") => Ok(OperatorWrite::Desired { device_id }),
            Some("tags") => Ok(OperatorWrite::Tags { device_id }),
            Some(_) => Err(HubTopicError::UnknownTopic(topic.to_owned())),
        };
        if !crate::valid_registration_id(device_id) {
            return Some(Err(HubTopicError::BadDeviceId(device_id.to_owned())));
        }
        return Some(write(device_id.to_owned()));
    }
    if topic.starts_with(METHOD_RESPONSES_PREFIX) {
        return None;
    }
    let rest = topic.strip_prefix(METHODS_PREFIX)?;
    let parsed = match rest.split('/').collect::<Vec<_>>()[..] {
        [device_id, correlation_id] if !correlation_id.is_empty() => {
            if crate::valid_registration_id(device_id) {
                Ok(OperatorWrite::Invoke {
                    device_id: device_id.to_owned(),
                    correlation_id: correlation_id.to_owned(),
                })
            } else {
                Err(HubTopicError::BadDeviceId(device_id.to_owned()))
            }
        }
        _ => Err(HubTopicError::BadMethodTopic(topic.to_owned())),
    };
    Some(parsed)
}

/// `hub/twins/{deviceId}`: the retained twin record.
pub fn twin_record_topic(device_id: &str) -> String {
    format!("{TWINS_PREFIX}{device_id}")
}

/// `dps/admin/results/twins/{deviceId}`: the outcome of an operator's twin patch.
pub fn twin_result_topic(device_id: &str) -> String {
    format!("dps/admin/results/twins/{device_id}")
}

/// `hub/methods/responses/{correlationId}`.
pub fn method_response_topic(correlation_id: &str) -> String {
    format!("{METHOD_RESPONSES_PREFIX}{correlation_id}")
}

/// An operator's method call (the body of `hub/methods/{deviceId}/{correlationId}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MethodCall {
    pub method_name: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub response_timeout_in_seconds: Option<u64>,
    /// Accepted for IoT Hub's service API; the device is either connected or not.
    #[serde(default)]
    pub connect_timeout_in_seconds: Option<u64>,
}

impl MethodCall {
    /// Checks the call: a method name that fits in a topic level, a timeout in range.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.method_name;
        if name.is_empty() || name.len() > 128 {
            return Err("methodName must be 1 to 128 characters".into());
        }
        if name.contains(['/', '+', '#', '?', '\0']) {
            return Err("methodName may not contain `/`, `+`, `#`, `?` or NUL".into());
        }
        match self.response_timeout_in_seconds {
            Some(t) if !(5..=MAX_METHOD_TIMEOUT_SECONDS).contains(&t) => Err(format!(
                "responseTimeoutInSeconds must be 5 to {MAX_METHOD_TIMEOUT_SECONDS}"
            )),
            _ => Ok(()),
        }
    }

    pub fn timeout_seconds(&self) -> u64 {
        self.response_timeout_in_seconds
            .unwrap_or(DEFAULT_METHOD_TIMEOUT_SECONDS)
    }
}

/// The answer to a method call, on `hub/methods/responses/{correlationId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    pub status: u16,
    pub payload: Value,
}

/// The body of an error on a `$iothub/.../res/{status}` topic, and of a failed method
/// call, as IoT Hub writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubError {
    pub error_code: u32,
    pub message: String,
    pub tracking_id: String,
    pub timestamp_utc: String,
}

/// IoT Hub's error codes for what edgedps answers.
pub mod codes {
    pub const BAD_FORMAT: u32 = 400_004;
    pub const DEVICE_NOT_ONLINE: u32 = 404_103;
    pub const DEVICE_NOT_FOUND: u32 = 404_001;
    pub const QUEUE_FULL: u32 = 403_002;
    pub const TIMEOUT: u32 = 504_101;
    pub const THROTTLED: u32 = 429_001;
    pub const INTERNAL: u32 = 500_001;
}

/// A cloud-to-device message waiting in its device's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// The property bag the operator's topic carried (URL-encoded `k=v&...`, may be
    /// empty); the device gets it on its own topic.
    pub property_bag: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Unix seconds.
    pub enqueued: u64,
    /// Unix seconds after which it is dropped undelivered.
    pub expires: u64,
}

/// A certificate renewal's body (PROTOCOL F).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueCertificateRequest {
    /// The device id: the session's own.
    pub id: String,
    /// Base64 of the DER PKCS#10 request.
    pub csr: String,
    /// `*`: every certificate issued before stops working now; a request id: the one
    /// that request got stops working once the new one is used.
    #[serde(default)]
    pub replace: Option<String>,
}

/// The `202` of a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewalAccepted {
    pub correlation_id: String,
    pub operation_expires: String,
}

/// The error body of a renewal (`$iothub/credentials/res/{4xx|5xx}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialError {
    pub error_code: u32,
    pub message: String,
    pub tracking_id: String,
    pub timestamp_utc: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after: Option<u32>,
    pub info: CredentialErrorInfo,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialErrorInfo {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub operation_expires: Option<String>,
}

/// The outcome of an operator's twin patch, on `dps/admin/results/twins/{deviceId}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinResult {
    pub ok: bool,
    /// The desired properties' new `$version` (desired patches).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_requests_of_the_sdks_parse() {
        assert_eq!(
            parse_request("$iothub/twin/GET/?$rid=1"),
            Ok(HubRequest::TwinGet { rid: "1".into() })
        );
        assert_eq!(
            parse_request("$iothub/twin/PATCH/properties/reported/?$rid=a-b&$version=3"),
            Ok(HubRequest::TwinReported { rid: "a-b".into() })
        );
        assert_eq!(
            parse_request("$iothub/methods/res/200/?$rid=7f"),
            Ok(HubRequest::MethodResponse {
                status: 200,
                rid: "7f".into()
            })
        );
        assert_eq!(
            parse_request("$iothub/twin/GET/"),
            Err(HubTopicError::UnknownTopic("$iothub/twin/GET/".into()))
        );
        assert_eq!(
            parse_request("$iothub/twin/GET/?x=1"),
            Err(HubTopicError::MissingRid)
        );
        assert_eq!(
            parse_request("$iothub/methods/res/ok/?$rid=1"),
            Err(HubTopicError::BadStatus("ok".into()))
        );
        assert_eq!(
            parse_request("$iothub/credentials/POST/issueCertificate/?$rid=9"),
            Ok(HubRequest::IssueCertificate { rid: "9".into() })
        );
        assert!(matches!(
            parse_request("$iothub/credentials/POST/other/?$rid=1"),
            Err(HubTopicError::UnknownTopic(_))
        ));
    }

    #[test]
    fn answers_are_where_the_sdks_look() {
        assert_eq!(
            twin_response_topic(204, "5", Some(3), None),
            "$iothub/twin/res/204/?$rid=5&$version=3"
        );
        assert_eq!(
            twin_response_topic(400, "5", None, None),
            "$iothub/twin/res/400/?$rid=5"
        );
        assert_eq!(
            twin_response_topic(429, "5", None, Some(2)),
            "$iothub/twin/res/429/?$rid=5&retry-after=2"
        );
        assert_eq!(
            desired_topic(2),
            "$iothub/twin/PATCH/properties/desired/?$version=2"
        );
        assert_eq!(
            method_request_topic("reboot", "1"),
            "$iothub/methods/POST/reboot/?$rid=1"
        );
    }

    #[test]
    fn devicebound_topics() {
        assert_eq!(
            parse_devicebound("devices/dev-1/messages/devicebound/a=1&b=2"),
            Some(("dev-1", "a=1&b=2"))
        );
        assert_eq!(
            parse_devicebound("devices/dev-1/messages/devicebound"),
            Some(("dev-1", ""))
        );
        assert_eq!(
            parse_devicebound("devices/dev-1/messages/devicebound/"),
            Some(("dev-1", ""))
        );
        assert_eq!(parse_devicebound("devices/dev-1/messages/events/x"), None);
        assert_eq!(
            parse_devicebound("devices/dev-1/messages/deviceboundx"),
            None
        );
        assert_eq!(parse_devicebound("devices/+/messages/devicebound/"), None);
        assert_eq!(
            devicebound_topic("dev-1", "k=v"),
            "devices/dev-1/messages/devicebound/k=v"
        );
    }

    #[test]
    fn a_device_subscribes_its_own_messages_by_id_or_with_plus_and_no_one_else_s() {
        use DeviceboundFilter::*;
        for (filter, expected) in [
            ("devices/dev-1/messages/devicebound/#", Some(Own)),
            ("devices/DEV-1/messages/devicebound/#", Some(Own)),
            ("devices/+/messages/devicebound/#", Some(AnyId)),
            ("devices/dev-2/messages/devicebound/#", None),
            ("devices/dev-1x/messages/devicebound/#", None),
            ("devices/dev/messages/devicebound/#", None),
            ("devices/#", None),
            ("devices/+/messages/#", None),
            ("devices/+/messages/devicebound/+", None),
            ("devices/dev-1/messages/devicebound/+", None),
            ("devices/dev-1/+/devicebound/#", None),
            ("+/+/messages/devicebound/#", None),
            ("devices//messages/devicebound/#", None),
        ] {
            assert_eq!(
                devicebound_subscription(filter, "dev-1"),
                expected,
                "{filter}"
            );
        }
        assert_eq!(
            devicebound_subscription("devices//messages/devicebound/#", ""),
            None
        );
    }

    #[test]
    fn a_devicebound_bag_gets_a_message_id_and_its_address_unless_it_has_them() {
        assert_eq!(
            devicebound_bag("n=1&%24.ct=text%2Fplain", "dev-1", "m1"),
            "%24.mid=m1&%24.to=%2Fdevices%2Fdev-1%2Fmessages%2FdeviceBound&n=1&%24.ct=text%2Fplain"
        );
        assert_eq!(
            devicebound_bag("", "dev-1", "m/2"),
            "%24.mid=m%2F2&%24.to=%2Fdevices%2Fdev-1%2Fmessages%2FdeviceBound"
        );
        // The operator's own id and address are kept, spelled either way.
        assert_eq!(
            devicebound_bag("$.mid=mine&%24.to=x", "dev-1", "m1"),
            "$.mid=mine&%24.to=x"
        );
    }

    #[test]
    fn operator_writes_parse() {
        assert_eq!(
            parse_operator_topic("hub/twins/dev-1/desired"),
            Some(Ok(OperatorWrite::Desired {
                device_id: "dev-1".into()
            }))
        );
        assert_eq!(
            parse_operator_topic("hub/twins/dev-1/tags"),
            Some(Ok(OperatorWrite::Tags {
                device_id: "dev-1".into()
            }))
        );
        assert_eq!(
            parse_operator_topic("hub/twins/dev-1"),
            Some(Ok(OperatorWrite::Record {
                device_id: "dev-1".into()
            }))
        );
        assert!(matches!(
            parse_operator_topic("hub/twins/dev-1/other"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_operator_topic("hub/twins/+/desired"),
            Some(Err(HubTopicError::BadDeviceId(_)))
        ));
        assert_eq!(
            parse_operator_topic("hub/methods/dev-1/c-1"),
            Some(Ok(OperatorWrite::Invoke {
                device_id: "dev-1".into(),
                correlation_id: "c-1".into()
            }))
        );
        assert!(matches!(
            parse_operator_topic("hub/methods/dev-1"),
            Some(Err(HubTopicError::BadMethodTopic(_)))
        ));
        assert_eq!(parse_operator_topic("hub/methods/responses/c-1"), None);
        assert_eq!(parse_operator_topic("devices/dev-1/x"), None);
    }

    #[test]
    fn method_calls_are_checked() {
        let call: MethodCall =
            serde_json::from_str(r#"{"methodName": "reboot", "payload": {"delay": 1}}"#).unwrap();
        assert_eq!(call.check(), Ok(()));
        assert_eq!(call.timeout_seconds(), 30);
        for bad in [
            r#"{"methodName": ""}"#,
            r#"{"methodName": "a/b"}"#,
            r#"{"methodName": "a", "responseTimeoutInSeconds": 1}"#,
            r#"{"methodName": "a", "responseTimeoutInSeconds": 301}"#,
        ] {
            let call: MethodCall = serde_json::from_str(bad).unwrap();
            assert!(call.check().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MethodCall>(r#"{"method": "a"}"#).is_err());
    }
}
