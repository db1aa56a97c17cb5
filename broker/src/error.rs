//! The broker's one error type: what stops edgedps from starting (configuration, data
//! directory, TLS files, the development certificate, a listener, the store) and what
//! ends a connection's MQTT (malformed or unsupported packets). The responder's errors
//! become CONNACK codes in `session/connect.rs`; these become log lines and exit codes.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("configuration: {key}: {message}")]
    InvalidConfig { key: &'static str, message: String },
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("{path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("development certificate in {dir}: {reason}")]
    DevCertFile { dir: String, reason: String },
    #[error("development certificate: {0}")]
    DevCert(#[from] rcgen::Error),
    #[error("listener {name} on {addr}: {reason}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("router link: {0}")]
    Router(String),
    #[error(transparent)]
    Responder(#[from] edgedps_responder::Error),
    #[error(transparent)]
    Store(#[from] edgedps_responder::StoreError),

    #[error("malformed MQTT: {0}")]
    Mqtt(#[from] rumqttd::protocol::Error),
    #[error("first packet is not a CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
    #[error("reserved flags {flags:#06b} set on packet type {kind}")]
    ReservedFlags { kind: u8, flags: u8 },
    #[error("reserved bits set in subscription options {0:#010b}")]
    ReservedOptions(u8),
}
