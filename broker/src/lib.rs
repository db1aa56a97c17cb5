//! edgedps: an MQTT broker for edge gateways with an Azure-DPS-compatible provisioning
//! service inside. This crate owns the sockets: configuration, TLS, MQTT sessions over
//! rumqttd's codec, and the embedded rumqttd router. The decisions live in
//! `edgedps-policies`, the state in `edgedps-responder`.

pub mod allocators;
pub mod authorities;
pub mod baseline;
pub mod cloud;
pub mod codec;
pub mod config;
pub mod devcert;
pub mod device_api;
pub mod dollar;
mod error;
pub mod feed;
pub mod http;
pub mod interest;
pub mod metrics;
pub mod operators;
pub mod probe;
pub mod qos;
pub mod router;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod websocket;

pub use config::Config;
pub use error::Error;
pub use server::{start, Running};
