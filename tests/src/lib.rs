//! Test harness for the end-to-end tests: PKI generated once per test binary (`pki`),
//! edgedps started in process on port 0 (`server`) or as the real binary (`process`),
//! an operator client on the local listener (`operator`), and device clients on the TLS
//! listener (`devices`, `live`).

pub mod browser;
pub mod devices;
pub mod dps_http;
pub mod http;
pub mod hub;
pub mod iothub;
pub mod live;
pub mod node;
pub mod operator;
pub mod pki;
pub mod process;
pub mod python;
pub mod server;
pub mod tpm;
pub mod webhook;

pub use devices::*;
pub use edgedps_device::provision::{DeviceAuth, DeviceConfig, Outcome};
pub use http::{http, sample, scrape, HttpAnswer};
pub use operator::*;
pub use pki::*;
pub use process::*;
pub use python::{assert_assigned, hold_port_443, hold_port_8883, python, run_python};
pub use server::*;

pub const ID_SCOPE: &str = "0ne00000001";
