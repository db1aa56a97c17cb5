//! The events of the operator plane (`dps/events/...`) as they are published, for the
//! status page: the last [`KEPT`] of them, and a live feed. Taken from the publisher
//! before the router's interest filter, so the page sees events no MQTT client
//! subscribes to.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// Events kept for a page that opens.
pub const KEPT: usize = 100;

/// One event: its topic and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    pub topic: Arc<str>,
    pub body: Arc<str>,
}

pub struct EventFeed {
    recent: Mutex<VecDeque<FeedEvent>>,
    live: broadcast::Sender<FeedEvent>,
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed {
            recent: Mutex::new(VecDeque::with_capacity(KEPT)),
            // A page that falls this far behind misses events (and is told so).
            live: broadcast::channel(256).0,
        }
    }
}

impl EventFeed {
    /// Takes a publication if it is an event.
    pub fn offer(&self, topic: &str, payload: &[u8]) {
        if !topic.starts_with(edgedps_topics::events::EVENTS_PREFIX) {
            return;
        }
        let event = FeedEvent {
            topic: topic.into(),
            body: String::from_utf8_lossy(payload).into(),
        };
        {
            let mut recent = crate::session::lock(&self.recent);
            if recent.len() == KEPT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No page open: nobody to tell.
        let _ = self.live.send(event);
    }

    /// The kept events, oldest first.
    pub fn recent(&self) -> Vec<FeedEvent> {
        crate::session::lock(&self.recent).iter().cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_are_kept_and_only_the_last_hundred() {
        let feed = EventFeed::default();
        let mut live = feed.subscribe();
        feed.offer("dps/enrollments/dev-1", b"{}");
        for i in 0..KEPT + 5 {
            feed.offer(&format!("dps/events/registrations/dev-{i}"), b"{}");
        }
        let recent = feed.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(&*recent[0].topic, "dps/events/registrations/dev-5");
        assert_eq!(
            live.try_recv().map(|e| e.topic.to_string()).ok().as_deref(),
            Some("dps/events/registrations/dev-0")
        );
    }
}
