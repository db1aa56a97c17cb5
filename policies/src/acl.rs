//! Topic ACLs for what a session passes to the router (DESIGN: roles and listeners).
//!
//! `$dps/` topics never reach this check: the session answers them itself. A device may
//! use `devices/{deviceId}/#` once it is provisioned, and nothing else. An operator (a
//! full MQTT session) may use any topic, `$`-topics included, but `$dps/` (the device
//! protocol's) and `$SYS` (the server's: edgedps publishes none); it may subscribe to
//! shared subscriptions `$share/{group}/{filter}` of what it may subscribe to. A reader
//! (an operator with the `reader` role) subscribes as an operator and publishes nothing.

/// Who a session is, for the ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A device; `device_id` is set once it is assigned.
    Device { device_id: Option<String> },
    /// A process with the operator role, `admin` (the `local` listener by default).
    Operator,
    /// An operator with the `reader` role: reads and watches, writes nothing.
    Reader,
}

fn device_prefix_ok(device_id: &str, path: &str) -> bool {
    match path.strip_prefix("devices/") {
        Some(rest) => {
            rest == device_id
                || rest
                    .strip_prefix(device_id)
                    .is_some_and(|tail| tail.starts_with('/'))
        }
        None => false,
    }
}

fn wildcard_free(device_id: &str) -> bool {
    !device_id.is_empty() && !device_id.contains(['+', '#', '/'])
}

/// Topics reserved to the server: `$dps/` and `$SYS`.
fn reserved(topic: &str) -> bool {
    topic.starts_with("$dps/") || topic == "$dps" || topic == "$SYS" || topic.starts_with("$SYS/")
}

/// May this role publish to `topic` (outside `$dps/`)?
pub fn may_publish(role: &Role, topic: &str) -> bool {
    match role {
        Role::Operator => !reserved(topic) && !topic.starts_with("$share/"),
        Role::Device {
            device_id: Some(id),
        } => wildcard_free(id) && device_prefix_ok(id, topic),
        Role::Device { device_id: None } | Role::Reader => false,
    }
}

/// May this role subscribe to `filter` (outside `$dps/`)?
pub fn may_subscribe(role: &Role, filter: &str) -> bool {
    match role {
        Role::Operator | Role::Reader => match filter.strip_prefix("$share/") {
            Some(shared) => match shared.split_once('/') {
                Some((group, inner)) => {
                    !group.is_empty()
                        && !group.contains(['+', '#'])
                        && !inner.starts_with("$share/")
                        && !reserved(inner)
                }
                None => false,
            },
            None => !reserved(filter),
        },
        Role::Device {
            device_id: Some(id),
        } => {
            // The device id level itself must be literal: `devices/+/..` would read
            // other devices' traffic.
            wildcard_free(id) && device_prefix_ok(id, filter)
        }
        Role::Device { device_id: None } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Role {
        Role::Device {
            device_id: Some(id.into()),
        }
    }

    #[test]
    fn device_may_use_its_own_topics() {
        let role = device("dev-1");
        assert!(may_publish(&role, "devices/dev-1/messages/events/"));
        assert!(may_subscribe(&role, "devices/dev-1/#"));
        assert!(may_subscribe(&role, "devices/dev-1/messages/devicebound/+"));
    }

    #[test]
    fn device_may_not_touch_other_devices_or_the_operator_plane() {
        let role = device("dev-1");
        for filter in [
            "devices/dev-2/#",
            "devices/dev-10/#",
            "devices/dev-1x/#",
            "devices/+/#",
            "devices/#",
            "#",
            "+/dev-1/#",
            "dps/#",
            "dps/enrollments/dev-1",
            "$SYS/#",
        ] {
            assert!(!may_subscribe(&role, filter), "{filter}");
            assert!(!may_publish(&role, filter), "{filter}");
        }
    }

    #[test]
    fn a_reader_subscribes_like_an_operator_and_publishes_nothing() {
        for filter in [
            "dps/#",
            "dps/events/#",
            "hub/twins/+",
            "devices/+/messages/events/#",
            "#",
        ] {
            assert!(may_subscribe(&Role::Reader, filter), "{filter}");
        }
        for topic in [
            "dps/enrollments/dev-1",
            "hub/twins/dev-1/desired",
            "devices/dev-1/messages/devicebound/",
            "app/x",
        ] {
            assert!(!may_publish(&Role::Reader, topic), "{topic}");
        }
        assert!(!may_subscribe(&Role::Reader, "$SYS/#"));
    }

    #[test]
    fn unprovisioned_device_may_use_nothing() {
        let role = Role::Device { device_id: None };
        assert!(!may_publish(&role, "devices/dev-1/x"));
        assert!(!may_subscribe(&role, "devices/dev-1/#"));
    }

    #[test]
    fn operator_may_use_any_router_topic() {
        assert!(may_subscribe(&Role::Operator, "#"));
        assert!(may_publish(&Role::Operator, "devices/dev-1/x"));
        assert!(!may_subscribe(&Role::Operator, "$SYS/#"));
    }

    #[test]
    fn operator_may_use_dollar_topics_and_shared_subscriptions_but_not_the_servers() {
        let op = Role::Operator;
        assert!(may_publish(&op, "$app/status"));
        assert!(may_subscribe(&op, "$app/#"));
        assert!(may_subscribe(&op, "$share/workers/jobs/+"));
        assert!(may_subscribe(&op, "$share/workers/$app/#"));
        for reserved in ["$SYS/broker/load", "$SYS", "$dps/registrations/res/#"] {
            assert!(!may_publish(&op, reserved), "{reserved}");
            assert!(!may_subscribe(&op, reserved), "{reserved}");
        }
        assert!(!may_subscribe(&op, "$share/workers/$SYS/#"));
        assert!(!may_subscribe(&op, "$share//jobs"));
        assert!(!may_subscribe(&op, "$share/w+/jobs"));
        assert!(!may_subscribe(&op, "$share/workers"));
        assert!(!may_publish(&op, "$share/workers/jobs"));
    }
}
