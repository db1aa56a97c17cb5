//! Device side of edgedps: a DPS provisioning client over rumqttc, speaking the same
//! MQTT protocol as the stock Azure device SDKs (PROTOCOL A); an operator client for the
//! `dps/` topics; certificates for manufacturing (`manufacture`), the operational
//! credential (`credentials`, `bundle`) and the hub connection that renews it (`hub`);
//! and the load generator.

pub mod admin;
pub mod admin_cli;
pub mod bundle;
pub mod credentials;
mod error;
pub mod hub;
pub mod loadgen;
pub mod manufacture;
pub mod process;
pub mod provision;
pub mod tls;
pub mod tpm;

pub use error::DeviceError;
pub use provision::{register, DeviceAuth, DeviceConfig, Outcome};
