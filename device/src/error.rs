//! The device side's one error type: provisioning (CONNACK refusals, the connection,
//! credentials, answers that are not answers), TLS material, and operator writes.

use rumqttc::ConnectReturnCode;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("connection refused with CONNACK code {0:?}")]
    Refused(ConnectReturnCode),
    #[error("connection: {0}")]
    Connection(String),
    #[error("TLS: PEM: {0}")]
    Pem(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("SAS: {0}")]
    Sas(#[from] edgedps_policies::sas::SasError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("response is not JSON: {0}")]
    BadResponse(String),
    /// An operator write edgedps answered with `ok: false`.
    #[error("write to {topic} refused: {message}")]
    WriteRefused { topic: String, message: String },
    #[error("no result for {0} writes within 60 s")]
    NoResult(usize),
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("certificate renewal refused: {0}")]
    Renewal(String),
    #[error("TPM: {0}")]
    Tpm(String),
}
