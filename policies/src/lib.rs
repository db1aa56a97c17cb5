//! Pure decisions of edgedps: is this SAS token good (`sas`), does this certificate
//! chain belong to this enrollment (`x509`), which hub gets this device (`allocation`),
//! may this session use this topic (`acl`), may this device use its hub now (`access`),
//! is this certificate revoked (`revocation`). Values in, verdict out; no IO, no clock
//! (callers pass the time).

pub mod access;
pub mod acl;
pub mod allocation;
pub mod revocation;
pub mod sas;
pub mod x509;

#[cfg(test)]
mod test_pki;
