//! The edgedps wire contract, without IO: the device topics of Azure DPS over MQTT
//! (`dps`), the CONNECT username and registration ids (`identity`), the request and
//! response bodies (`registration`), and the operator plane (`admin`).
//!
//! Nothing here touches a socket or a clock: every function takes values and returns
//! values, so the contract is tested with plain `#[test]`s.

pub mod admin;
pub mod dps;
pub mod encoding;
pub mod identity;
pub mod registration;

pub use dps::{DeviceRequest, TopicError};
pub use identity::{parse_username, valid_registration_id, Username, UsernameError};
