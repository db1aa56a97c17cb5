//! The operator plane and the process: admin topics and CLI, operators and secrets, restarts, crashes and a full disk.
//!
//! One test binary per area: each binary links the whole workspace, so few of them keep
//! the build small and quick.

mod admin;
mod admin_cli;
mod crash;
mod full_disk;
mod operators;
mod restart;
mod secrets;
mod shutdown;
