//! Pure decisions of edgedps: which enrollment accepts this CONNECT (`attestation`),
//! is this SAS token good (`sas`), does this certificate chain belong to this enrollment
//! (`x509`), which hub gets this device (`allocation`), what a register makes of its
//! record (`reprovision`), may this device use its hub now (`access`), may this session
//! use this topic (`acl`), is this certificate revoked (`revocation`), may this operator
//! write be stored (`validation`), what a twin patch makes of a twin (`twin`), which
//! call a device's method answer belongs to (`methods`), may this certificate signing
//! request be signed and what is issued for it (`issuance`), does this password match its
//! hash (`password`), the private keys of PEM files in every form (`keys`), and what a cloud hub is told of a device and what its answers mean (`cloud`), and a TPM's keys read and challenged (`tpm`). Values in, verdict out; no IO, no clock (callers pass the time).

pub mod access;
pub mod acl;
pub mod allocation;
pub mod attestation;
pub mod cloud;
pub mod issuance;
pub mod keys;
pub mod methods;
pub mod password;
pub mod reprovision;
pub mod revocation;
pub mod sas;
pub mod tpm;
pub mod twin;
pub mod validation;
pub mod x509;

#[cfg(test)]
mod test_pki;
