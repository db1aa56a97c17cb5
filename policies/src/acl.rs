//! Topic ACLs for what a session passes to the router (DESIGN: roles and listeners).
//!
//! `$dps/` topics never reach this check: the session answers them itself. A device may
//! use `devices/{deviceId}/#` once it is provisioned, and nothing else; an operator may
//! use any topic the router carries.

/// Who a session is, for the ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A device; `device_id` is set once it is assigned.
    Device { device_id: Option<String> },
    /// A process with the operator role (the `local` listener by default).
    Operator,
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

/// May this role publish to `topic` (outside `$dps/`)?
pub fn may_publish(role: &Role, topic: &str) -> bool {
    match role {
        Role::Operator => !topic.starts_with('$'),
        Role::Device {
            device_id: Some(id),
        } => wildcard_free(id) && device_prefix_ok(id, topic),
        Role::Device { device_id: None } => false,
    }
}

/// May this role subscribe to `filter` (outside `$dps/`)?
pub fn may_subscribe(role: &Role, filter: &str) -> bool {
    match role {
        Role::Operator => !filter.starts_with('$'),
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
}
