//! Server-side latency of registrations (request in, answer ready, record durable), as
//! a fixed histogram of 100 µs buckets: recording is one atomic add, no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKET_US: u64 = 100;
const BUCKETS: usize = 1000; // up to 100 ms; slower ones land in the last bucket

pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
    sum_us: AtomicU64,
}

/// Percentiles in microseconds (bucket upper bounds, so at most 100 µs high).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index = usize::try_from(us / BUCKET_US)
            .unwrap_or(BUCKETS)
            .min(BUCKETS - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// For an exporter: the count, the sum in seconds, and how many fell at or under each
    /// of `bounds` (seconds, ascending; a multiple of 100 µs is exact) and not under the
    /// one before, the last entry being everything above (`f64::INFINITY`).
    pub fn export(&self, bounds: &[f64]) -> (u64, f64, Vec<(f64, u64)>) {
        let mut out: Vec<(f64, u64)> = bounds
            .iter()
            .chain(std::iter::once(&f64::INFINITY))
            .map(|b| (*b, 0))
            .collect();
        let mut count = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            count += n;
            // The bucket's upper edge; the last bucket holds everything slower.
            let edge = if i + 1 == BUCKETS {
                f64::INFINITY
            } else {
                ((i as u64 + 1) * BUCKET_US) as f64 / 1e6
            };
            if let Some(slot) = out.iter_mut().find(|(bound, _)| edge <= *bound + 1e-9) {
                slot.1 += n;
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (count, sum, out)
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let at = |q: f64| {
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return (i as u64 + 1) * BUCKET_US;
                }
            }
            0
        };
        LatencySummary {
            count,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: self.max_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let h = LatencyHistogram::default();
        for i in 0..100u64 {
            h.record(Duration::from_micros(i * 100 + 50));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_us, 5000);
        assert_eq!(s.p99_us, 9900);
        assert_eq!(s.max_us, 9950);
        h.record(Duration::from_secs(3));
        assert_eq!(h.summary().max_us, 3_000_000);
    }

    #[test]
    fn export_sums_the_buckets_under_each_bound() {
        let h = LatencyHistogram::default();
        for us in [50, 150, 950, 1000, 4000, 250_000] {
            h.record(Duration::from_micros(us));
        }
        let (count, sum, buckets) = h.export(&[0.001, 0.005]);
        assert_eq!(count, 6);
        assert!((sum - 0.25615).abs() < 1e-9, "{sum}");
        assert_eq!(buckets, vec![(0.001, 3), (0.005, 2), (f64::INFINITY, 1)]);
    }
}
