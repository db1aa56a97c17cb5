//! The edgedps wire contract, without IO: the device topics of Azure DPS over MQTT
//! (`dps`), the CONNECT username and registration ids (`identity`), the request and
//! response bodies (`registration`), the operator plane (`admin`), how hubs are
//! allocated, custom allocators' bodies and explanations (`allocation`), the events
//! edgedps publishes about both (`events`), a device's twin (`twin`), the hub side's
//! topics (`hub`) and registration at cloud hubs (`cloud`).
//!
//! Nothing here touches a socket or a clock: every function takes values and returns
//! values, so the contract is tested with plain `#[test]`s.

pub mod admin;
pub mod allocation;
pub mod cloud;
pub mod dps;
pub mod encoding;
pub mod events;
pub mod hub;
pub mod identity;
pub mod registration;
pub mod twin;

pub use dps::{DeviceRequest, TopicError};
pub use identity::{
    parse_username, valid_registration_id, RegistrationId, Username, UsernameError,
};

/// The etag of a record (enrollment, group, hub, registration): random bytes, URL-safe
/// base64, in double quotes, as DPS writes them. Every etag edgedps issues is made here.
pub fn etag(random: &[u8]) -> String {
    use base64::Engine;
    format!(
        "\"{}\"",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}
