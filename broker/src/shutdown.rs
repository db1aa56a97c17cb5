//! Graceful shutdown (SIGTERM, SIGINT): what every listener and session watches.
//!
//! [`crate::server::Running::shutdown`] starts it: the accept loops stop taking
//! connections, each MQTT session finishes the packet it is handling (a register is
//! answered, durably, as always), tells an MQTT 5 client why (DISCONNECT 0x8B, server
//! shutting down) and closes; each HTTPS connection answers its request in flight and
//! closes. Then the store is flushed.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Set once, never cleared.
#[derive(Debug, Default)]
pub struct Shutdown {
    started: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// Starts the shutdown and wakes everything waiting for it.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Returns once the shutdown has started.
    pub async fn wait(&self) {
        loop {
            // Registered before the check: a start in between still wakes it.
            let notified = self.notify.notified();
            if self.started() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_wakes_and_a_late_one_returns_at_once() {
        let shutdown = Arc::new(Shutdown::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let shutdown = shutdown.clone();
                tokio::spawn(async move { shutdown.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!shutdown.started());
        shutdown.start();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .expect("woken")
                .expect("joined");
        }
        tokio::time::timeout(Duration::from_millis(100), shutdown.wait())
            .await
            .expect("a wait after the start returns at once");
    }
}
