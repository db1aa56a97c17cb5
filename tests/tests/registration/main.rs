//! Device registration: attestation, enrollments, answers, allocation, issuance, re-provisioning, retirement, throttling, TPM and cloud hubs.
//!
//! One test binary per area: each binary links the whole workspace, so few of them keep
//! the build small and quick.

mod allocation;
mod attacks;
mod cbor;
mod cloud_hubs;
mod crl;
mod explain;
mod group_limits;
mod https;
mod issuance;
mod provisioning;
mod reprovisioning;
mod retirement;
mod throttling;
mod tpm;
mod websocket;
