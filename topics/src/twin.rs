//! A device twin (PROTOCOL E, the gateway as the device's hub): tags, desired and
//! reported properties, each property section with its `$version`, and the one
//! serialiser every twin document goes through.
//!
//! The shapes only: what a device's twin GET answers, what the operator plane's
//! `hub/twins/{deviceId}` record holds. Patches are checked and applied in
//! `edgedps_policies::twin`.
//!
//! Key order: IoT Hub writes a section's properties first, then `$metadata`, then
//! `$version`, and some device clients depend on it (the Embedded C SDK's twin sample
//! reads a desired patch until it meets `$version`). A `serde_json::Map` sorts its
//! keys, which puts `$version` first, so no twin document is written from a bare
//! `Value`: [`TwinDocument`] (and [`ordered`] for a twin inside another body) writes
//! every object with the properties first and IoT Hub's `$` keys last.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// The key IoT Hub gives a property section's version.
pub const VERSION_KEY: &str = "$version";
/// The key IoT Hub gives a section's metadata (service-side documents).
pub const METADATA_KEY: &str = "$metadata";

/// A twin document (a whole twin, a section, a patch) as IoT Hub writes it: in every
/// object the properties first, in key order, then other `$` keys, then `$metadata`,
/// then `$version`.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinDocument(Value);

impl TwinDocument {
    pub fn new(value: Value) -> TwinDocument {
        TwinDocument(value)
    }

    /// The document's content, for reading (its order is the `Map`'s, not the wire's).
    pub fn as_value(&self) -> &Value {
        &self.0
    }
}

impl Serialize for TwinDocument {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Ordered(&self.0).serialize(serializer)
    }
}

/// For `#[serde(serialize_with = ...)]` on a field that holds a twin (a registration's
/// `initialTwin`): the same order as [`TwinDocument`].
pub fn ordered<S: Serializer>(twin: &Option<Value>, serializer: S) -> Result<S::Ok, S::Error> {
    twin.as_ref().map(Ordered).serialize(serializer)
}

/// Where a key goes in an object of a twin document.
fn rank(key: &str) -> u8 {
    match key {
        VERSION_KEY => 3,
        METADATA_KEY => 2,
        _ if key.starts_with('$') => 1,
        _ => 0,
    }
}

struct Ordered<'a>(&'a Value);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(object) => {
                let mut map = serializer.serialize_map(Some(object.len()))?;
                if object.keys().all(|key| rank(key) == 0) {
                    // Properties only (most objects): the map's order, nothing to sort.
                    for (key, value) in object {
                        map.serialize_entry(key, &Ordered(value))?;
                    }
                } else {
                    let mut entries: Vec<(&String, &Value)> = object.iter().collect();
                    // Stable: within a rank, the map's own order.
                    entries.sort_by_key(|(key, _)| rank(key));
                    for (key, value) in entries {
                        map.serialize_entry(key, &Ordered(value))?;
                    }
                }
                map.end()
            }
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Ordered(item))?;
                }
                seq.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// One property section (desired or reported): its properties and their version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub properties: Map<String, Value>,
    /// Starts at 1; every accepted patch adds one.
    pub version: u64,
}

impl Section {
    fn new(properties: Map<String, Value>) -> Section {
        Section {
            properties,
            version: 1,
        }
    }

    /// The section as devices see it: its properties and `"$version"`.
    fn with_version(&self) -> Value {
        let mut body = self.properties.clone();
        body.insert(VERSION_KEY.to_owned(), Value::from(self.version));
        Value::Object(body)
    }
}

/// A device's twin as edgedps keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Twin {
    pub device_id: String,
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
}

impl Twin {
    /// A new device's twin: the enrollment's `initialTwin` (`{"tags": {..},
    /// "properties": {"desired": {..}}}`), both sections at version 1. Keys that IoT
    /// Hub reserves (`$version`, `$metadata`, ...) are not taken over.
    pub fn initial(device_id: &str, initial_twin: Option<&Value>) -> Twin {
        let object = |value: Option<&Value>| -> Map<String, Value> {
            match value {
                Some(Value::Object(map)) => map
                    .iter()
                    .filter(|(key, _)| !key.starts_with('$'))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
                _ => Map::new(),
            }
        };
        let tags = object(initial_twin.and_then(|t| t.get("tags")));
        let desired = object(
            initial_twin
                .and_then(|t| t.get("properties"))
                .and_then(|p| p.get("desired")),
        );
        Twin {
            device_id: device_id.to_owned(),
            tags,
            desired: Section::new(desired),
            reported: Section::new(Map::new()),
        }
    }

    /// The answer to a device's twin GET: `{"desired": {.., "$version": n},
    /// "reported": {.., "$version": m}}`.
    pub fn device_body(&self) -> TwinDocument {
        TwinDocument(serde_json::json!({
            "desired": self.desired.with_version(),
            "reported": self.reported.with_version(),
        }))
    }

    /// The operator plane's record (`hub/twins/{deviceId}`): the whole twin, as IoT
    /// Hub's service API shows it.
    pub fn record_body(&self) -> TwinDocument {
        TwinDocument(serde_json::json!({
            "deviceId": self.device_id,
            "tags": self.tags,
            "properties": {
                "desired": self.desired.with_version(),
                "reported": self.reported.with_version(),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_new_twin_is_the_enrollment_s_initial_twin_at_version_one() {
        let initial = json!({
            "tags": {"site": "a"},
            "properties": {"desired": {"interval": 30, "$version": 7, "$metadata": {}}}
        });
        let twin = Twin::initial("dev-1", Some(&initial));
        assert_eq!(
            twin.device_body().as_value(),
            &json!({"desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}})
        );
        assert_eq!(
            twin.record_body().as_value(),
            &json!({"deviceId": "dev-1", "tags": {"site": "a"}, "properties": {
                "desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}}})
        );
        let bare = Twin::initial("dev-2", None);
        assert_eq!(
            bare.device_body().as_value(),
            &json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
        // Not objects where objects belong: nothing taken over.
        let odd = Twin::initial("dev-3", Some(&json!({"tags": 5, "properties": []})));
        assert!(odd.tags.is_empty() && odd.desired.properties.is_empty());
    }

    fn json(document: &TwinDocument) -> String {
        serde_json::to_string(document).expect("JSON")
    }

    #[test]
    fn version_is_written_after_the_properties_as_iot_hub_writes_it() {
        let mut twin = Twin::initial(
            "dev-1",
            Some(
                &json!({"tags": {"site": "a"}, "properties": {"desired": {"device_count": 100, "zone": "b"}}}),
            ),
        );
        twin.desired.version = 2;
        twin.reported.properties.insert("fw".into(), json!("1.0"));
        assert_eq!(
            json(&twin.device_body()),
            r#"{"desired":{"device_count":100,"zone":"b","$version":2},"reported":{"fw":"1.0","$version":1}}"#
        );
        assert_eq!(
            json(&twin.record_body()),
            r#"{"deviceId":"dev-1","properties":{"desired":{"device_count":100,"zone":"b","$version":2},"reported":{"fw":"1.0","$version":1}},"tags":{"site":"a"}}"#
        );
        // An empty section is its version alone.
        let bare = Twin::initial("dev-2", None);
        assert_eq!(
            json(&bare.device_body()),
            r#"{"desired":{"$version":1},"reported":{"$version":1}}"#
        );
    }

    #[test]
    fn in_every_object_metadata_and_version_come_last_and_nothing_is_lost() {
        let document = TwinDocument::new(json!({
            "$version": 4,
            "$metadata": {"$lastUpdated": "t", "$lastUpdatedVersion": 4, "a": {"$lastUpdated": "t"}},
            "a": {"$version": 1, "b": [{"$version": 2, "c": null}]},
            "$other": true,
            "z": 1,
        }));
        assert_eq!(
            json(&document),
            concat!(
                r#"{"a":{"b":[{"c":null,"$version":2}],"$version":1},"z":1,"$other":true,"#,
                r#""$metadata":{"a":{"$lastUpdated":"t"},"$lastUpdated":"t","$lastUpdatedVersion":4},"#,
                r#""$version":4}"#
            )
        );
        let back: Value = serde_json::from_str(&json(&document)).expect("JSON");
        assert_eq!(&back, document.as_value());
    }

    #[test]
    fn a_field_holding_a_twin_is_written_in_the_same_order() {
        #[derive(Serialize)]
        struct Answer {
            #[serde(serialize_with = "ordered")]
            twin: Option<Value>,
        }
        let answer = Answer {
            twin: Some(json!({"properties": {"desired": {"$version": 1, "x": 1}}})),
        };
        assert_eq!(
            serde_json::to_string(&answer).expect("JSON"),
            r#"{"twin":{"properties":{"desired":{"x":1,"$version":1}}}}"#
        );
        let none = Answer { twin: None };
        assert_eq!(
            serde_json::to_string(&none).expect("JSON"),
            r#"{"twin":null}"#
        );
    }
}
