//! Topics that begin with `$` (MQTT 3.1.1 4.7.2, 5 4.7.2) through rumqttd's router.
//!
//! The specification lets clients use such topics, and says that a filter beginning with
//! a wildcard (`#`, `+/...`) never matches them. rumqttd's router matches no topic that
//! begins with `$` at all. So a `$`-topic enters the router behind a prefix no client
//! can send (U+0000, which MQTT forbids in topics and which the session refuses), and
//! so does a filter that names one; on the way out the prefix comes off, and a message
//! reaches the client only if one of its own `$`-filters matches it (the router would
//! also hand it over for the client's `#`).

use std::borrow::Cow;

/// What a `$`-topic or `$`-filter is prefixed with in the router.
const PREFIX: char = '\0';

/// A client's topic as the router carries it.
pub fn to_router_topic(topic: &str) -> Cow<'_, str> {
    if topic.starts_with('$') {
        Cow::Owned(format!("{PREFIX}{topic}"))
    } else {
        Cow::Borrowed(topic)
    }
}

/// The group and the inner filter of a shared subscription (`$share/{group}/{filter}`).
pub fn shared(filter: &str) -> Option<(&str, &str)> {
    filter
        .strip_prefix("$share/")
        .and_then(|shared| shared.split_once('/'))
}

/// The filter a subscription matches with: the inner one of a shared subscription.
pub fn unshared(filter: &str) -> &str {
    shared(filter).map_or(filter, |(_, inner)| inner)
}

/// A client's filter as the router takes it; in a shared subscription
/// (`$share/{group}/{filter}`) the inner filter.
pub fn to_router_filter(filter: &str) -> Cow<'_, str> {
    if let Some((group, inner)) = shared(filter) {
        return match to_router_topic(inner) {
            Cow::Borrowed(_) => Cow::Borrowed(filter),
            Cow::Owned(inner) => Cow::Owned(format!("$share/{group}/{inner}")),
        };
    }
    to_router_topic(filter)
}

/// A router topic as the client knows it, and whether it is a `$`-topic.
pub fn from_router_topic(topic: &[u8]) -> (&[u8], bool) {
    match topic.split_first() {
        Some((0, rest)) => (rest, true),
        _ => (topic, false),
    }
}

/// Whether a client topic or filter holds U+0000, which MQTT forbids (and which would
/// reach into the router's `$` namespace).
pub fn forbidden(text: &str) -> bool {
    text.contains(PREFIX)
}

/// MQTT topic matching of a client's topic against one of its filters (the inner filter
/// of a shared subscription); a `$`-topic is matched only by filters that begin with
/// the same `$` level.
pub fn matches(topic: &str, filter: &str) -> bool {
    let filter = unshared(filter);
    // rumqttd's matcher never matches a topic that begins with `$`; such a topic can
    // only be matched by a filter that begins with the same `$`, so both lose it.
    match (topic.strip_prefix('$'), filter.strip_prefix('$')) {
        (Some(topic), Some(filter)) => rumqttd::protocol::matches(topic, filter),
        (Some(_), None) => false,
        (None, _) => rumqttd::protocol::matches(topic, filter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_topics_and_filters_are_prefixed_and_come_back() {
        assert_eq!(to_router_topic("a/b"), "a/b");
        let routed = to_router_topic("$app/x");
        assert_eq!(routed, "\0$app/x");
        assert_eq!(from_router_topic(routed.as_bytes()), (&b"$app/x"[..], true));
        assert_eq!(from_router_topic(b"a/b"), (&b"a/b"[..], false));
        assert_eq!(to_router_filter("$share/g/$app/#"), "$share/g/\0$app/#");
        assert_eq!(to_router_filter("$share/g/jobs/+"), "$share/g/jobs/+");
        assert!(forbidden("a\0b"));
    }

    #[test]
    fn wildcards_at_the_first_level_never_match_dollar_topics() {
        assert!(!matches("$app/x", "#"));
        assert!(!matches("$app/x", "+/x"));
        assert!(matches("$app/x", "$app/#"));
        assert!(matches("$app/x", "$app/+"));
        assert!(matches("$app/x", "$app/x"));
        assert!(matches("$app", "$app/#"));
        assert!(!matches("$app/x/y", "$app/+"));
        assert!(!matches("$other/x", "$app/#"));
        assert!(matches("$app/x", "$share/g/$app/#"));
        assert!(matches("app/x", "#"));
        assert!(matches("app/x", "+/x"));
        assert!(!matches("app/x/y", "+/x"));
    }
}
