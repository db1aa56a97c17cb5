//! Twin patches (PROTOCOL E): is this patch acceptable, and what does the twin become.
//!
//! A patch is a JSON object applied as IoT Hub applies it: objects merge key by key,
//! `null` removes a key, anything else replaces. A patch that is not an object, nests
//! deeper than [`MAX_DEPTH`], is larger than [`MAX_PATCH_BYTES`], uses a key IoT Hub
//! reserves (`$...`) or would grow its section past [`MAX_SECTION_BYTES`] is refused
//! with the reason, and the twin is left as it was.

use serde_json::{Map, Value};

use edgedps_topics::twin::{Section, Twin, TwinDocument, VERSION_KEY};

/// The largest patch accepted, in bytes of its JSON.
pub const MAX_PATCH_BYTES: usize = 32 * 1024;
/// The largest section (tags, desired or reported) a patch may leave, in bytes of JSON.
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// How deep objects and arrays may nest in a patch, the patch itself being level 1.
pub const MAX_DEPTH: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("the patch is not JSON: {0}")]
    NotJson(String),
    #[error("the patch must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error("the patch is {0} bytes; at most {MAX_PATCH_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the patch nests {0} levels deep; at most {MAX_DEPTH} are accepted")]
    TooDeep(usize),
    #[error("key `{0}` is not allowed: keys may not be empty or begin with `$`")]
    ReservedKey(String),
    #[error("the patch would make the section {0} bytes; at most {MAX_SECTION_BYTES} are kept")]
    SectionTooLarge(usize),
}

/// Parses and checks a patch body.
pub fn parse(body: &[u8]) -> Result<Map<String, Value>, PatchError> {
    if body.len() > MAX_PATCH_BYTES {
        return Err(PatchError::TooLarge(body.len()));
    }
    // serde_json's own recursion limit (128) bounds the parse; the depth rule is ours.
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        PatchError::NotJson(edgedps_topics::encoding::without_values(&e.to_string()))
    })?;
    let Value::Object(patch) = value else {
        return Err(PatchError::NotAnObject(kind(&value)));
    };
    let depth = depth_of_object(&patch);
    if depth > MAX_DEPTH {
        return Err(PatchError::TooDeep(depth));
    }
    check_keys(&patch)?;
    Ok(patch)
}

/// Applies a reported-properties patch (a device's); the new reported `$version`.
pub fn patch_reported(twin: &mut Twin, patch: &Map<String, Value>) -> Result<u64, PatchError> {
    apply_to_section(&mut twin.reported, patch)
}

/// Applies a desired-properties patch (an operator's). Returns the notification the
/// device's `$iothub/twin/PATCH/properties/desired/` subscription gets: the patch as
/// sent (its `null`s included) with the new `"$version"`.
pub fn patch_desired(
    twin: &mut Twin,
    patch: &Map<String, Value>,
) -> Result<TwinDocument, PatchError> {
    let version = apply_to_section(&mut twin.desired, patch)?;
    let mut notification = patch.clone();
    notification.insert(VERSION_KEY.to_owned(), Value::from(version));
    Ok(TwinDocument::new(Value::Object(notification)))
}

/// Applies a tags patch (an operator's). Tags carry no version.
pub fn patch_tags(twin: &mut Twin, patch: &Map<String, Value>) -> Result<(), PatchError> {
    let mut tags = twin.tags.clone();
    merge(&mut tags, patch);
    check_size(&tags)?;
    twin.tags = tags;
    Ok(())
}

fn apply_to_section(section: &mut Section, patch: &Map<String, Value>) -> Result<u64, PatchError> {
    let mut properties = section.properties.clone();
    merge(&mut properties, patch);
    check_size(&properties)?;
    section.properties = properties;
    section.version += 1;
    Ok(section.version)
}

/// JSON merge: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

fn check_size(section: &Map<String, Value>) -> Result<(), PatchError> {
    let bytes = serde_json::to_vec(section)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > MAX_SECTION_BYTES {
        return Err(PatchError::SectionTooLarge(bytes));
    }
    Ok(())
}

fn check_keys(object: &Map<String, Value>) -> Result<(), PatchError> {
    for (key, value) in object {
        if key.is_empty() || key.starts_with('$') {
            return Err(PatchError::ReservedKey(key.clone()));
        }
        check_value_keys(value)?;
    }
    Ok(())
}

fn check_value_keys(value: &Value) -> Result<(), PatchError> {
    match value {
        Value::Object(object) => check_keys(object),
        Value::Array(items) => items.iter().try_for_each(check_value_keys),
        _ => Ok(()),
    }
}

fn depth_of_object(object: &Map<String, Value>) -> usize {
    1 + object.values().map(depth_of).max().unwrap_or(0)
}

fn depth_of(value: &Value) -> usize {
    match value {
        Value::Object(object) => depth_of_object(object),
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin() -> Twin {
        Twin::initial(
            "dev-1",
            Some(
                &json!({"tags": {"site": "a"}, "properties": {"desired": {"interval": 30, "mode": {"a": 1, "b": 2}}}}),
            ),
        )
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn a_reported_patch_merges_removes_with_null_and_counts_versions() {
        let mut twin = twin();
        let v = patch_reported(
            &mut twin,
            &object(json!({"fw": "1.0", "net": {"rssi": -70, "ssid": "x"}})),
        )
        .unwrap();
        assert_eq!(v, 2);
        let v = patch_reported(
            &mut twin,
            &object(json!({"net": {"ssid": null}, "fw": "1.1"})),
        )
        .unwrap();
        assert_eq!(v, 3);
        assert_eq!(
            twin.device_body().as_value()["reported"],
            json!({"fw": "1.1", "net": {"rssi": -70}, "$version": 3})
        );
        // Desired untouched.
        assert_eq!(twin.desired.version, 1);
    }

    #[test]
    fn a_desired_patch_notifies_with_its_nulls_and_the_new_version() {
        let mut twin = twin();
        let note = patch_desired(
            &mut twin,
            &object(json!({"interval": null, "mode": {"b": 3}})),
        )
        .unwrap();
        assert_eq!(
            note.as_value(),
            &json!({"interval": null, "mode": {"b": 3}, "$version": 2})
        );
        // The device reads the patch up to `$version`: it comes last.
        assert_eq!(
            serde_json::to_string(&note).unwrap(),
            r#"{"interval":null,"mode":{"b":3},"$version":2}"#
        );
        assert_eq!(
            twin.device_body().as_value()["desired"],
            json!({"mode": {"a": 1, "b": 3}, "$version": 2})
        );
        patch_tags(&mut twin, &object(json!({"site": null, "floor": 2}))).unwrap();
        assert_eq!(twin.tags, object(json!({"floor": 2})));
    }

    #[test]
    fn bad_patches_are_refused_with_a_reason() {
        assert!(matches!(
            parse(b"[1, 2]"),
            Err(PatchError::NotAnObject("an array"))
        ));
        assert!(matches!(
            parse(b"null"),
            Err(PatchError::NotAnObject("null"))
        ));
        assert!(matches!(parse(b"{\"a\": "), Err(PatchError::NotJson(_))));
        assert_eq!(
            parse(br#"{"$version": 3}"#),
            Err(PatchError::ReservedKey("$version".into()))
        );
        assert_eq!(
            parse(br#"{"a": [{"$x": 1}]}"#),
            Err(PatchError::ReservedKey("$x".into()))
        );
        assert_eq!(
            parse(br#"{"": 1}"#),
            Err(PatchError::ReservedKey(String::new()))
        );
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_PATCH_BYTES));
        assert!(matches!(
            parse(big.as_bytes()),
            Err(PatchError::TooLarge(_))
        ));
        // Ten levels pass, eleven do not (the patch itself is level 1).
        let nested = |levels: usize| format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels));
        assert!(parse(nested(10).as_bytes()).is_ok());
        assert_eq!(parse(nested(11).as_bytes()), Err(PatchError::TooDeep(11)));
        let arrays = format!("{{\"a\":{}1{}}}", "[".repeat(10), "]".repeat(10));
        assert_eq!(parse(arrays.as_bytes()), Err(PatchError::TooDeep(11)));
    }

    #[test]
    fn a_patch_that_would_grow_a_section_too_far_changes_nothing() {
        let mut twin = twin();
        let chunk = "x".repeat(20 * 1024);
        patch_reported(&mut twin, &object(json!({"a": chunk}))).unwrap();
        let before = twin.clone();
        let refused = patch_reported(&mut twin, &object(json!({"b": chunk})));
        assert!(matches!(refused, Err(PatchError::SectionTooLarge(_))));
        assert_eq!(twin, before);
    }

    #[test]
    fn an_object_replaces_a_value_and_a_value_replaces_an_object() {
        let mut target = object(json!({"a": 1, "b": {"c": 2}}));
        merge(&mut target, &object(json!({"a": {"x": 1}, "b": 5})));
        assert_eq!(Value::Object(target), json!({"a": {"x": 1}, "b": 5}));
    }
}
