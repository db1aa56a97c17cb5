//! The stock Azure IoT device SDK for Python against the real binary on 127.0.0.1:8883.
//!
//! One test binary per area: each binary links the whole workspace, so few of them keep
//! the build small and quick.

mod node_http;
mod python_hub;
mod python_manufacture;
mod python_sdk;
