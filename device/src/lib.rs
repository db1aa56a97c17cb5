//! Device side of edgedps: a DPS provisioning client over rumqttc, speaking the same
//! MQTT protocol as the stock Azure device SDKs (PROTOCOL A). Used by the tests and,
//! later, by the load generator and the manufacturing tools.

pub mod provision;
pub mod tls;

pub use provision::{register, DeviceAuth, DeviceConfig, DeviceError, Outcome};
