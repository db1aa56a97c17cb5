//! Body encodings (PROTOCOL C): JSON, and CBOR for the devices and operators that ask for
//! it, with the same field names.
//!
//! A body is CBOR when its first byte starts a CBOR map (major type 5: `0xa0` to `0xbf`,
//! which no JSON text starts with) or when its MQTT 5 content type is
//! `application/cbor`. Errors quote no values from the body (see [`without_values`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const CBOR_CONTENT_TYPE: &str = "application/cbor";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Json,
    Cbor,
}

impl Encoding {
    /// The encoding of a body, from its MQTT 5 content type or its first byte.
    pub fn detect(body: &[u8], content_type: Option<&str>) -> Encoding {
        let declared = content_type.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case(CBOR_CONTENT_TYPE))
        });
        if declared || body.first().is_some_and(|b| (0xa0..=0xbf).contains(b)) {
            Encoding::Cbor
        } else {
            Encoding::Json
        }
    }

    /// Decodes a whole body (trailing bytes are an error, as in JSON). The error names
    /// positions, fields and expected types, never a value from the body.
    pub fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Json => {
                serde_json::from_slice(body).map_err(|e| without_values(&e.to_string()))
            }
            Encoding::Cbor => {
                let mut rest = body;
                let value =
                    ciborium::from_reader(&mut rest).map_err(|e| cbor_error(e, body.len()))?;
                if rest.is_empty() {
                    Ok(value)
                } else {
                    Err(format!(
                        "{} bytes after the CBOR item at byte {}",
                        rest.len(),
                        body.len() - rest.len()
                    ))
                }
            }
        }
    }

    /// Encodes one of our own values. Both encoders fail only on maps with non-string
    /// keys or writer errors, neither of which our types or a `Vec` can produce.
    pub fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            Encoding::Json => serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
            Encoding::Cbor => {
                let mut out = Vec::new();
                match ciborium::into_writer(value, &mut out) {
                    Ok(()) => out,
                    Err(_) => vec![0xa0],
                }
            }
        }
    }
}

fn cbor_error(error: ciborium::de::Error<std::io::Error>, len: usize) -> String {
    use ciborium::de::Error;
    match error {
        Error::Io(_) => format!("the CBOR item ends past the body ({len} bytes)"),
        Error::Syntax(offset) => format!("CBOR syntax error at byte {offset}"),
        Error::Semantic(Some(offset), message) => {
            format!("{} at byte {offset}", without_values(&message))
        }
        Error::Semantic(None, message) => without_values(&message),
        Error::RecursionLimitExceeded => "CBOR nested too deeply".into(),
    }
}

/// serde's messages quote the offending value (`invalid type: string "..."`,
/// ``unknown variant `...` ``). A key pasted into the wrong field would then travel to
/// results, events and logs, so values are cut out; field names, expected types and
/// positions stay.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    if let Some(after) = rest.strip_prefix("unknown variant `") {
        match after.rfind("`, expected") {
            Some(end) => {
                out.push_str("unknown variant");
                rest = &after[end + 1..];
            }
            None => return "unknown variant".into(),
        }
    }
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // A quoted value, as serde writes it (Debug escaping): skip to its closing quote.
        out.push_str("\"…\"");
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn cbor(value: &Value) -> Vec<u8> {
        Encoding::Cbor.encode(value)
    }

    #[test]
    fn detected_by_first_byte_or_content_type() {
        let map = cbor(&json!({"registrationId": "d"}));
        assert_eq!(Encoding::detect(&map, None), Encoding::Cbor);
        assert_eq!(Encoding::detect(&[0xbf, 0xff], None), Encoding::Cbor);
        assert_eq!(Encoding::detect(b"{}", None), Encoding::Json);
        assert_eq!(Encoding::detect(b" {}", None), Encoding::Json);
        assert_eq!(Encoding::detect(b"", None), Encoding::Json);
        // A CBOR array or text is not a body in CBOR: it is malformed JSON.
        assert_eq!(Encoding::detect(&[0x80], None), Encoding::Json);
        assert_eq!(
            Encoding::detect(b"", Some("application/cbor")),
            Encoding::Cbor
        );
        assert_eq!(
            Encoding::detect(b"{}", Some("Application/CBOR; charset=x")),
            Encoding::Cbor
        );
        assert_eq!(
            Encoding::detect(b"{}", Some("application/json")),
            Encoding::Json
        );
    }

    #[test]
    fn same_field_names_both_ways() {
        let value = json!({"registrationId": "d", "payload": {"a": [1, 2.5, null, true]}});
        let decoded: Value = Encoding::Cbor.decode(&cbor(&value)).unwrap();
        assert_eq!(decoded, value);
    }

    #[test]
    fn malformed_cbor_is_an_error_without_values() {
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA==";
        let mut trailing = cbor(&json!({"a": 1}));
        trailing.push(0x00);
        let cases: Vec<Vec<u8>> = vec![
            vec![0xa1],             // a map of one entry, then nothing
            vec![0xa1, 0x61],       // a key cut short
            vec![0xa1, 0x1c, 0x00], // reserved additional information
            vec![0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // 2^64 entries
            vec![0xa1; 10_000],     // nested past the recursion limit
            trailing,
            cbor(&json!({"registrationId": 5})),
            cbor(&json!({"registrationId": secret, "payload": secret})),
        ];
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            registration_id: Option<String>,
            payload: Option<serde_json::Map<String, Value>>,
        }
        for body in cases {
            let error = Encoding::Cbor.decode::<Body>(&body).unwrap_err();
            assert!(!error.contains(secret), "{error}");
            assert!(!error.is_empty());
        }
        let error = Encoding::Cbor
            .decode::<Body>(&cbor(&json!({"registrationId": "d", "payload": secret})))
            .unwrap_err();
        assert!(error.contains("expected map"), "{error}");
    }

    #[test]
    fn json_errors_quote_no_values() {
        let message = without_values(
            r#"invalid type: string "a\"b\\c-SECRET", expected u32 at line 1 column 9"#,
        );
        assert_eq!(
            message,
            r#"invalid type: string "…", expected u32 at line 1 column 9"#
        );
        let message = without_values("unknown variant `SECRET`, expected `x509` or `tpm`");
        assert_eq!(message, "unknown variant, expected `x509` or `tpm`");
    }
}
