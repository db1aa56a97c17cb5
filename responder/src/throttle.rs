//! Throttling (PROTOCOL A5, A6): per-device poll and registration windows and a global
//! registration rate. Above them the device gets `429` with `retry-after`, as DPS does,
//! instead of the service falling over during a reconnect storm.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgedps_topics::identity::RegistrationId;

use crate::lock;

/// The limits; the defaults follow DPS.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// At most this many polls per device in `poll_window`.
    pub polls_per_device: usize,
    pub poll_window: Duration,
    /// At most this many registrations per device in `register_window`.
    pub registrations_per_device: usize,
    pub register_window: Duration,
    /// Registrations per second over all devices (a token bucket of one second).
    pub registrations_per_second: u32,
    /// At most this many twin requests (GET and reported patches) per device of the
    /// local hub in `twin_window`: each patch costs a share of a disk flush.
    pub twin_requests_per_device: usize,
    pub twin_window: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            polls_per_device: 5,
            poll_window: Duration::from_secs(10),
            registrations_per_device: 10,
            register_window: Duration::from_secs(60),
            registrations_per_second: 10_000,
            twin_requests_per_device: 100,
            twin_window: Duration::from_secs(10),
        }
    }
}

/// A sliding window of recent events per key.
struct Windows {
    events: HashMap<RegistrationId, VecDeque<Instant>>,
    limit: usize,
    window: Duration,
    last_prune: Instant,
}

impl Windows {
    fn new(limit: usize, window: Duration) -> Windows {
        Windows {
            events: HashMap::new(),
            limit,
            window,
            last_prune: Instant::now(),
        }
    }

    /// Records an event for `key`, or says how long until one is allowed.
    fn admit(&mut self, key: &RegistrationId, now: Instant) -> Result<(), Duration> {
        if now.duration_since(self.last_prune) > self.window {
            // Keeps memory bounded by the devices active in one window.
            let window = self.window;
            self.events
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
            self.last_prune = now;
        }
        let queue = self.events.entry(key.clone()).or_default();
        while queue
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            queue.pop_front();
        }
        if queue.len() >= self.limit {
            let oldest = queue.front().copied().unwrap_or(now);
            return Err(self.window.saturating_sub(now.duration_since(oldest)));
        }
        queue.push_back(now);
        Ok(())
    }
}

/// A token bucket: `capacity` at most, refilled at `rate` per second.
pub(crate) struct Bucket {
    tokens: f64,
    capacity: f64,
    rate: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(capacity: f64, rate: f64, now: Instant) -> Bucket {
        let capacity = capacity.max(1.0);
        Bucket {
            tokens: capacity,
            capacity,
            rate: rate.max(f64::MIN_POSITIVE),
            updated: now,
        }
    }

    /// Takes a token, or says how long until there is one.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

pub struct Throttle {
    polls: Mutex<Windows>,
    registrations: Mutex<Windows>,
    global: Mutex<Bucket>,
    twin_requests: Mutex<Windows>,
}

impl Throttle {
    pub fn new(limits: &RateLimits) -> Throttle {
        let rate = f64::from(limits.registrations_per_second);
        Throttle {
            polls: Mutex::new(Windows::new(limits.polls_per_device, limits.poll_window)),
            registrations: Mutex::new(Windows::new(
                limits.registrations_per_device,
                limits.register_window,
            )),
            // One second of the rate.
            global: Mutex::new(Bucket::new(rate, rate.max(1.0), Instant::now())),
            twin_requests: Mutex::new(Windows::new(
                limits.twin_requests_per_device,
                limits.twin_window,
            )),
        }
    }

    /// `Err(seconds)` to send as `retry-after` (at least 1).
    pub fn admit_poll(&self, registration_id: &RegistrationId, now: Instant) -> Result<(), u32> {
        lock(&self.polls)
            .admit(registration_id, now)
            .map_err(whole_seconds)
    }

    /// A twin request of a device of the local hub.
    pub fn admit_twin_request(&self, device_id: &RegistrationId, now: Instant) -> Result<(), u32> {
        lock(&self.twin_requests)
            .admit(device_id, now)
            .map_err(whole_seconds)
    }

    pub fn admit_registration(
        &self,
        registration_id: &RegistrationId,
        now: Instant,
    ) -> Result<(), u32> {
        lock(&self.global).admit(now).map_err(whole_seconds)?;
        lock(&self.registrations)
            .admit(registration_id, now)
            .map_err(whole_seconds)
    }
}

pub(crate) fn whole_seconds(wait: Duration) -> u32 {
    u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixth_poll_in_ten_seconds_is_throttled_until_the_first_expires() {
        let throttle = Throttle::new(&RateLimits::default());
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(
                throttle.admit_poll(&"dev".into(), t0 + Duration::from_secs(i)),
                Ok(())
            );
        }
        assert_eq!(
            throttle.admit_poll(&"dev".into(), t0 + Duration::from_secs(5)),
            Err(5)
        );
        // Other devices are not affected.
        assert_eq!(
            throttle.admit_poll(&"other".into(), t0 + Duration::from_secs(5)),
            Ok(())
        );
        assert_eq!(
            throttle.admit_poll(&"dev".into(), t0 + Duration::from_secs(10)),
            Ok(())
        );
    }

    #[test]
    fn global_rate_answers_retry_after() {
        let limits = RateLimits {
            registrations_per_second: 3,
            ..RateLimits::default()
        };
        let throttle = Throttle::new(&limits);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(
                throttle.admit_registration(&format!("d{i}").into(), t0),
                Ok(())
            );
        }
        assert_eq!(throttle.admit_registration(&"d3".into(), t0), Err(1));
        assert_eq!(
            throttle.admit_registration(&"d3".into(), t0 + Duration::from_millis(400)),
            Ok(())
        );
    }

    #[test]
    fn per_device_registrations_are_bounded() {
        let limits = RateLimits {
            registrations_per_device: 2,
            ..RateLimits::default()
        };
        let throttle = Throttle::new(&limits);
        let t0 = Instant::now();
        assert!(throttle.admit_registration(&"dev".into(), t0).is_ok());
        assert!(throttle.admit_registration(&"dev".into(), t0).is_ok());
        assert_eq!(throttle.admit_registration(&"dev".into(), t0), Err(60));
    }

    #[test]
    fn idle_devices_are_forgotten() {
        let throttle = Throttle::new(&RateLimits::default());
        let t0 = Instant::now();
        for i in 0..100 {
            throttle.admit_poll(&format!("d{i}").into(), t0).unwrap();
        }
        throttle
            .admit_poll(&"late".into(), t0 + Duration::from_secs(11))
            .unwrap();
        assert_eq!(lock(&throttle.polls).events.len(), 1);
    }
}
