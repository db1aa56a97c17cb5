//! Device registration: attestation, enrollments, answers, issuance, re-provisioning, retirement, throttling, TPM and cloud hubs.
//!
//! One test binary per area: each binary links the whole workspace, so few of them keep
//! the build small and quick.

mod attacks;
mod cbor;
mod cloud_hubs;
mod crl;
mod https;
mod issuance;
mod provisioning;
mod reprovisioning;
mod retirement;
mod throttling;
mod tpm;
mod websocket;
