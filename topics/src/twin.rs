//! A device twin (PROTOCOL E, the gateway as the device's hub): tags, desired and
//! reported properties, each property section with its `$version`.
//!
//! The shapes only: what a device's twin GET answers, what the operator plane's
//! `hub/twins/{deviceId}` record holds. Patches are checked and applied in
//! `edgedps_policies::twin`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The key IoT Hub gives a property section's version.
pub const VERSION_KEY: &str = "$version";

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
    pub fn body(&self) -> Value {
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
    pub fn device_body(&self) -> Value {
        serde_json::json!({
            "desired": self.desired.body(),
            "reported": self.reported.body(),
        })
    }

    /// The operator plane's record (`hub/twins/{deviceId}`): the whole twin, as IoT
    /// Hub's service API shows it.
    pub fn record_body(&self) -> Value {
        serde_json::json!({
            "deviceId": self.device_id,
            "tags": self.tags,
            "properties": {
                "desired": self.desired.body(),
                "reported": self.reported.body(),
            },
        })
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
            twin.device_body(),
            json!({"desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}})
        );
        assert_eq!(
            twin.record_body(),
            json!({"deviceId": "dev-1", "tags": {"site": "a"}, "properties": {
                "desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}}})
        );
        let bare = Twin::initial("dev-2", None);
        assert_eq!(
            bare.device_body(),
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
        // Not objects where objects belong: nothing taken over.
        let odd = Twin::initial("dev-3", Some(&json!({"tags": 5, "properties": []})));
        assert!(odd.tags.is_empty() && odd.desired.properties.is_empty());
    }
}
