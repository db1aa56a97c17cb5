//! Which of the server's own messages somebody listens to.
//!
//! The responder's results and events (`dps/admin/results/...`, `dps/events/...`) are
//! not retained, and its records (`dps/registrations/...`, ...) are not kept by the
//! router (subscriptions read them from the store, `session/records.rs`): a broker
//! drops a message that is not retained and matches no subscription. Handing such a
//! message to rumqttd's router anyway costs a wake-up of the router thread and, for
//! every new topic (one per device), memory the router keeps forever (BENCHMARKS.md,
//! issue 11). So the sessions count here the
//! filters that could match such a message (first level `dps`, `+` or `#`, shared or
//! not), and [`Interest::matches`] tells the publisher whether to hand it over.
//!
//! A filter is counted before the router has it and forgotten after the router has
//! dropped it (`session/subscriptions.rs`), so a message is never dropped here that a
//! subscription could still take: the only error is publishing one nobody gets.

use std::collections::HashMap;
use std::sync::RwLock;

/// The filters that may match the server's own messages, with how many session
/// subscriptions hold each.
#[derive(Debug, Default)]
pub struct Interest {
    filters: RwLock<HashMap<String, usize>>,
}

impl Interest {
    /// A session subscribed to `filter` (as the client wrote it).
    pub fn add(&self, filter: &str) {
        if concerns_the_server(filter) {
            let mut filters = self.filters.write().unwrap_or_else(|p| p.into_inner());
            *filters.entry(filter.to_owned()).or_default() += 1;
        }
    }

    /// A session gave up its subscription to `filter`.
    pub fn remove(&self, filter: &str) {
        if concerns_the_server(filter) {
            let mut filters = self.filters.write().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = filters.get_mut(filter) {
                *count -= 1;
                if *count == 0 {
                    filters.remove(filter);
                }
            }
        }
    }

    /// Whether some subscription matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        let filters = self.filters.read().unwrap_or_else(|p| p.into_inner());
        filters
            .keys()
            .any(|filter| crate::dollar::matches(topic, filter))
    }
}

/// Whether `filter` could match a topic under `dps/`.
fn concerns_the_server(filter: &str) -> bool {
    let first = crate::dollar::unshared(filter)
        .split('/')
        .next()
        .unwrap_or_default();
    matches!(first, "dps" | "+" | "#")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_filters_that_may_match_the_server_s_topics_count() {
        let interest = Interest::default();
        let event = "dps/events/registrations/dev-1";
        assert!(!interest.matches(event));
        interest.add("sensors/#");
        assert!(!interest.matches(event));
        for filter in [
            "#",
            "+/events/#",
            "dps/events/registrations/+",
            "$share/ops/dps/#",
        ] {
            interest.add(filter);
            assert!(interest.matches(event), "{filter}");
            interest.remove(filter);
            assert!(!interest.matches(event), "{filter} removed");
        }
        assert!(interest.filters.read().unwrap().is_empty());
    }

    #[test]
    fn a_filter_held_by_two_sessions_counts_until_both_let_go() {
        let interest = Interest::default();
        interest.add("dps/events/#");
        interest.add("dps/events/#");
        interest.remove("dps/events/#");
        assert!(interest.matches("dps/events/acl/x"));
        interest.remove("dps/events/#");
        assert!(!interest.matches("dps/events/acl/x"));
        assert!(!interest.matches("dps/results/enrollments/x"));
        // A filter never added is not taken away from another.
        interest.add("dps/results/#");
        interest.remove("dps/events/#");
        assert!(interest.matches("dps/results/enrollments/x"));
    }
}
