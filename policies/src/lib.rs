//! Pure decisions of edgedps: is this SAS token good (`sas`), does this certificate
//! chain belong to this enrollment (`x509`), which hub gets this device (`allocation`),
//! may this session use this topic (`acl`). Values in, verdict out; no IO, no clock
//! (callers pass the time).

pub mod acl;
pub mod allocation;
pub mod sas;
pub mod x509;
