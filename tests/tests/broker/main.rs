//! The MQTT broker: 3.1.1 and 5 semantics, sessions, ACLs, the local IoT Hub, HTTP, the status page and the load generator.
//!
//! One test binary per area: each binary links the whole workspace, so few of them keep
//! the build small and quick.

mod acl;
mod http;
mod hub;
mod hub_protocol;
mod loadgen;
mod mqtt;
mod mqtt5;
mod paho;
mod sessions;
mod status_page;
