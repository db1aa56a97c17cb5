//! The command line of `edgedps loadgen`.

use serde::Serialize;

/// Command-line arguments of `edgedps loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Devices per round.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Devices provisioning at the same time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// sas (individual), sas-group, x509 (individual), x509-group.
    #[arg(long, default_value = "sas")]
    pub attestation: Attestation,
    /// Rounds against edgedps (and as many against the baseline with --baseline).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Alternate every round with one against the bare TLS server.
    #[arg(long)]
    pub baseline: bool,
    /// Storm: start all devices spread evenly over this many seconds, no concurrency cap.
    #[arg(long)]
    pub arrival_secs: Option<f64>,
    /// Registrations per connection: 1 is a new TLS connection per registration; more
    /// re-register (idempotently) on the same connection, measuring the register path alone.
    #[arg(long, default_value_t = 1)]
    pub registrations_per_connection: u32,
    /// QoS of the register requests (0 or 1).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// After the first round, connect every device again and keep the sessions open to
    /// measure the server memory of an idle session.
    #[arg(long)]
    pub hold: bool,
    /// After the first round, hold every device of it connected, then disable its group
    /// while a bystander group keeps registering; report how fast the sessions close and
    /// what it costs the others (group attestations only).
    #[arg(long)]
    pub cut_off: bool,
    /// With --cut-off: do not watch the held connections close (the load generator's own
    /// work on them competes with the bystanders for the same cores).
    #[arg(long)]
    pub cut_off_unwatched: bool,
    /// Before starting the server, fill its store with this many enrollments (each with
    /// an assigned registration record) and report how long the server takes to start.
    #[arg(long, default_value_t = 0)]
    pub preload: usize,
    /// Every device sends a certificate signing request (made before the round) and
    /// gets a certificate from the server's `gateway` authority (PROTOCOL F).
    #[arg(long)]
    pub csr: bool,
    /// The linked hub is a cloud hub with a connection string (its service API
    /// unreachable): every assignment also writes an outbox operation, in the same flush.
    #[arg(long)]
    pub cloud_hub: bool,
    /// Devices speak MQTT over WebSocket to a `[listeners.websocket]` of the server
    /// (`/$iothub/websocket`); the baseline stays MQTT over TLS.
    #[arg(long)]
    pub websocket: bool,
    /// Every enrollment allocates by `custom`: an MQTT allocator (an operator client of
    /// loadgen's own on the server's local listener) or a webhook (loadgen's own, plain
    /// HTTP on loopback), each answering at once with the linked hub. Compare with a
    /// run without it for the cost of the allocator's round trip.
    #[arg(long)]
    pub custom_allocator: Option<CustomAllocator>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CustomAllocator {
    Mqtt,
    Webhook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attestation {
    Sas,
    SasGroup,
    X509,
    X509Group,
}
