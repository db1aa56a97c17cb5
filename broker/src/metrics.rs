//! Prometheus metrics (`/metrics`), with the `prometheus-client` crate: one registry per
//! running edgedps, no global. Sessions count what they see as it happens (counters,
//! histograms, the live-session gauge); what the store holds is read when scraped (a
//! collector over the responder).
//!
//! Every name starts with `edgedps_`; docs/operators.md lists them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use edgedps_responder::{LatencyHistogram, Responder, StoreCounts};

/// Seconds: from a millisecond to ten seconds.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds: store flushes and writes are faster.
const STORE_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrationLabels {
    /// `register` or `poll`.
    pub request: &'static str,
    /// `assigned`, `not_assigned` (disabled or failed), `accepted` (202, in progress),
    /// `throttled`, `refused` (other 4xx), `error` (5xx).
    pub outcome: &'static str,
    /// `x509`, `symmetric_key`, `tpm`.
    pub attestation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `device`, `hub_device`, `admin`, `reader`, `anonymous`.
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    /// `register`, `poll`, `twin`, `operator_password`.
    pub request: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminLabels {
    /// The record kind's topic segment (`enrollments`, `enrollment-groups`, ...) or
    /// `retire`.
    pub kind: &'static str,
    /// `applied` or `rejected`.
    pub outcome: &'static str,
}

/// The metrics of one running edgedps.
pub struct Metrics {
    registry: Registry,
    /// The store's counts, shared by scrapes and the status page.
    counts: Arc<Recent<StoreCounts>>,
    registrations: Family<RegistrationLabels, Counter>,
    connect_refusals: Family<RefusalLabels, Counter>,
    throttled: Family<ThrottleLabels, Counter>,
    sessions: Family<RoleLabels, Gauge>,
    admin_writes: Family<AdminLabels, Counter>,
    handshake: Histogram,
    connect: Histogram,
    register: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn histogram(buckets: &[f64]) -> Histogram {
    Histogram::new(buckets.iter().copied())
}

impl Metrics {
    pub fn new(responder: Arc<Responder>) -> Metrics {
        let mut registry = Registry::with_prefix("edgedps");
        let registrations = Family::<RegistrationLabels, Counter>::default();
        registry.register(
            "registrations",
            "Device registration requests answered, by request, outcome and attestation",
            registrations.clone(),
        );
        let connect_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "connect_refusals",
            "CONNECTs refused, by listener and reason",
            connect_refusals.clone(),
        );
        let throttled = Family::<ThrottleLabels, Counter>::default();
        registry.register(
            "throttled",
            "Requests answered 429 (or refused unchecked) for going over a rate limit",
            throttled.clone(),
        );
        let sessions = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "sessions",
            "MQTT sessions connected now, by role",
            sessions.clone(),
        );
        let admin_writes = Family::<AdminLabels, Counter>::default();
        registry.register(
            "admin_writes",
            "Operator writes under dps/, by record kind and outcome",
            admin_writes.clone(),
        );
        let handshake = histogram(&LATENCY_BUCKETS);
        registry.register_with_unit(
            "tls_handshake",
            "TLS handshakes that completed, from the ClientHello read",
            Unit::Seconds,
            handshake.clone(),
        );
        let connect = histogram(&LATENCY_BUCKETS);
        registry.register_with_unit(
            "connect",
            "From an established connection to the CONNACK",
            Unit::Seconds,
            connect.clone(),
        );
        let register = histogram(&LATENCY_BUCKETS);
        registry.register_with_unit(
            "register",
            "Device registration requests, from the request read to the answer ready (durable)",
            Unit::Seconds,
            register.clone(),
        );
        let counts: Arc<Recent<StoreCounts>> = Arc::default();
        registry.register_collector(Box::new(StoreCollector {
            responder,
            counts: counts.clone(),
        }));
        Metrics {
            registry,
            counts,
            registrations,
            connect_refusals,
            throttled,
            sessions,
            admin_writes,
            handshake,
            connect,
            register,
        }
    }

    /// What the store holds, at most [`COUNTS_KEPT`] old (counting walks the store: call
    /// off the runtime's threads).
    pub fn store_counts(&self, responder: &Responder) -> Arc<StoreCounts> {
        recent_counts(&self.counts, responder)
    }

    /// The Prometheus text exposition of everything now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }

    pub fn handshake(&self, took: Duration) {
        self.handshake.observe(took.as_secs_f64());
    }

    pub fn connect(&self, took: Duration) {
        self.connect.observe(took.as_secs_f64());
    }

    pub fn connect_refused(&self, listener: &'static str, reason: &'static str) {
        self.connect_refusals
            .get_or_create(&RefusalLabels { listener, reason })
            .inc();
    }

    /// A register or poll answered with `status`.
    pub fn registration(
        &self,
        request: &'static str,
        attestation: &'static str,
        status: u16,
        assigned: bool,
        took: Option<Duration>,
    ) {
        let outcome = match status {
            200 if assigned => "assigned",
            200 => "not_assigned",
            202 => "accepted",
            429 => "throttled",
            400..=499 => "refused",
            _ => "error",
        };
        self.registrations
            .get_or_create(&RegistrationLabels {
                request,
                outcome,
                attestation,
            })
            .inc();
        if status == 429 {
            self.throttled(request);
        }
        if let Some(took) = took {
            self.register.observe(took.as_secs_f64());
        }
    }

    pub fn throttled(&self, request: &'static str) {
        self.throttled
            .get_or_create(&ThrottleLabels { request })
            .inc();
    }

    pub fn admin_write(&self, kind: &'static str, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.admin_writes
            .get_or_create(&AdminLabels { kind, outcome })
            .inc();
    }

    /// A session of `role` is connected until the guard is dropped.
    pub fn session(self: &Arc<Self>, role: &'static str) -> SessionGuard {
        self.sessions.get_or_create(&RoleLabels { role }).inc();
        SessionGuard {
            metrics: self.clone(),
            role,
        }
    }
}

/// Counts a session in `edgedps_sessions` while it lives.
pub struct SessionGuard {
    metrics: Arc<Metrics>,
    role: &'static str,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics
            .sessions
            .get_or_create(&RoleLabels { role: self.role })
            .dec();
    }
}

/// How long the store's counts are reused: counting walks every record (about half a
/// second of a core for 100,000 registrations, BENCHMARKS.md), so scrapes and page loads
/// that come closer together share one count.
pub const COUNTS_KEPT: Duration = Duration::from_secs(5);

/// A value computed at most once per [`COUNTS_KEPT`].
pub struct Recent<T> {
    kept: std::sync::Mutex<Option<(std::time::Instant, Arc<T>)>>,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            kept: std::sync::Mutex::new(None),
        }
    }
}

impl<T> Recent<T> {
    /// The kept value if it is recent, else `make`'s (kept). Callers that come while one
    /// counts wait for its count instead of counting again.
    pub fn get<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<Arc<T>, E> {
        let mut kept = crate::session::lock(&self.kept);
        if let Some((at, value)) = kept.as_ref() {
            if at.elapsed() < COUNTS_KEPT {
                return Ok(value.clone());
            }
        }
        let value = Arc::new(make()?);
        *kept = Some((std::time::Instant::now(), value.clone()));
        Ok(value)
    }
}

/// The store's counts kept in `counts`, counted again when they are old.
fn recent_counts(counts: &Recent<StoreCounts>, responder: &Responder) -> Arc<StoreCounts> {
    counts
        .get(|| Ok::<_, std::convert::Infallible>(responder.store_counts()))
        .unwrap_or_default()
}

/// What the store holds and how fast it writes, read at each scrape (the counts at most
/// [`COUNTS_KEPT`] old).
struct StoreCollector {
    responder: Arc<Responder>,
    counts: Arc<Recent<StoreCounts>>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HubLabels {
    hub: String,
}

fn encode_latency(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    latency: &LatencyHistogram,
) -> Result<(), std::fmt::Error> {
    let (count, sum, buckets) = latency.export(&STORE_BUCKETS);
    let metric = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram);
    metric?.encode_histogram::<KindLabels>(sum, count, &buckets, None)
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.responder.store_stats();
        let counts = recent_counts(&self.counts, &self.responder);
        {
            let mut family = encoder.encode_descriptor(
                "store_records",
                "Records in the store by kind: the operator plane's retained records, and the local hub's twins",
                None,
                MetricType::Gauge,
            )?;
            for (kind, count) in &counts.records {
                let labels = KindLabels { kind };
                ConstGauge::new(*count as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        ConstGauge::new(counts.queued_messages as i64).encode(encoder.encode_descriptor(
            "c2d_queued_messages",
            "Cloud-to-device messages waiting for devices of the local hub",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(size) = stats.size_on_disk {
            ConstGauge::new(size as i64).encode(encoder.encode_descriptor(
                "store_size",
                "The store's size on disk",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?)?;
        }
        if let Some(flush) = stats.flush_latency {
            encode_latency(
                &mut encoder,
                "store_flush",
                "Store flushes to disk (one covers every write before it)",
                flush,
            )?;
        }
        if let Some(write) = stats.write_latency {
            encode_latency(
                &mut encoder,
                "store_write",
                "How long a write waited until it was on disk",
                write,
            )?;
        }
        let outboxes = self.responder.outbox_stats();
        type Value = fn(&edgedps_responder::OutboxStats) -> u64;
        let families: [(&str, &str, MetricType, Value); 5] = [
            (
                "hub_outbox_pending",
                "Operations waiting in a cloud hub's outbox",
                MetricType::Gauge,
                |s| s.pending,
            ),
            (
                "hub_outbox_failed",
                "Operations a cloud hub refused for good (until an operator retries them)",
                MetricType::Gauge,
                |s| s.failed,
            ),
            (
                "hub_operation_attempts",
                "Attempts at outbox operations (each sends one to three requests to the hub)",
                MetricType::Counter,
                |s| s.attempts,
            ),
            (
                "hub_operation_failures",
                "Outbox operations a cloud hub refused for good",
                MetricType::Counter,
                |s| s.failures,
            ),
            (
                "hub_operations_done",
                "Outbox operations a cloud hub took",
                MetricType::Counter,
                |s| s.done,
            ),
        ];
        for (name, help, kind, value) in families {
            let counter = matches!(kind, MetricType::Counter);
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for stats in &outboxes {
                let labels = HubLabels {
                    hub: stats.hub.clone(),
                };
                let sample = family.encode_family(&labels)?;
                match counter {
                    true => ConstCounter::new(value(stats)).encode(sample)?,
                    false => ConstGauge::new(value(stats) as i64).encode(sample)?,
                }
            }
        }
        ConstCounter::new(self.responder.twin_updates()).encode(encoder.encode_descriptor(
            "twin_updates",
            "Twin changes written (reported by devices, desired and tags by operators)",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_value_is_reused_then_made_again() {
        let recent = Recent::<u32>::default();
        let mut made = 0;
        for _ in 0..3 {
            let value = recent
                .get(|| {
                    made += 1;
                    Ok::<_, ()>(made)
                })
                .unwrap();
            assert_eq!(*value, 1);
        }
        // A failure is not kept.
        let fresh = Recent::<u32>::default();
        assert!(fresh.get(|| Err::<u32, _>("no")).is_err());
        assert_eq!(*fresh.get(|| Ok::<_, ()>(7)).unwrap(), 7);
    }
}
