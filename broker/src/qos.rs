//! What rumqttd's router does not carry: the published QoS, and when a message expires.
//!
//! MQTT (3.1.1 3.8.4, 5 3.8.4) delivers a message at the lower of the QoS it was
//! published with and the QoS of the matching subscription. rumqttd's router delivers at
//! the subscription's QoS: it overwrites the stored message's QoS with the filter's. So
//! every message enters the router with its published QoS in a user property of our own
//! (removed from what clients send, so that none can forge it), and the session takes
//! it off on the way out and delivers at the lower QoS, settling with the router itself
//! what the router still expects (`session/settling.rs`).
//!
//! MQTT 5's Message Expiry Interval (3.3.2.3.3): a message not yet delivered when it
//! expires is not delivered, and one delivered late carries what is left of its
//! interval. The router keeps neither clock nor count; the deadline travels the same way.

use rumqttd::protocol::PublishProperties;

/// The user properties; a client's own properties of these names are dropped.
const TAG: &str = "$edgedps/qos";
const EXPIRES: &str = "$edgedps/expires";
const RETAINED: &str = "$edgedps/retained";

/// `properties` with the published QoS and, when the message has an expiry interval,
/// its deadline (Unix milliseconds) recorded; forged records dropped.
pub fn tag(
    properties: Option<PublishProperties>,
    qos: u8,
    retained: bool,
) -> Option<PublishProperties> {
    let mut properties = properties.unwrap_or_default();
    properties
        .user_properties
        .retain(|(name, _)| name != TAG && name != EXPIRES && name != RETAINED);
    properties
        .user_properties
        .push((TAG.to_owned(), qos.min(2).to_string()));
    if retained {
        // The router clears RETAIN on what it delivers live; MQTT 5's Retain As
        // Published needs it.
        properties
            .user_properties
            .push((RETAINED.to_owned(), "1".to_owned()));
    }
    if let Some(seconds) = properties.message_expiry_interval {
        let deadline = now_ms().saturating_add(u64::from(seconds) * 1000);
        properties
            .user_properties
            .push((EXPIRES.to_owned(), deadline.to_string()));
    }
    Some(properties)
}

/// Takes the retained mark off `properties`: whether the message was published with
/// RETAIN set.
pub fn was_retained(properties: &mut Option<PublishProperties>) -> bool {
    let Some(props) = properties.as_mut() else {
        return false;
    };
    let before = props.user_properties.len();
    props.user_properties.retain(|(name, _)| name != RETAINED);
    let retained = props.user_properties.len() != before;
    if *props == PublishProperties::default() {
        *properties = None;
    }
    retained
}

/// Takes the deadline off `properties` and sets the interval to what is left of it;
/// false when the message has expired.
pub fn unexpired(properties: &mut Option<PublishProperties>) -> bool {
    let Some(props) = properties.as_mut() else {
        return true;
    };
    let Some(position) = props
        .user_properties
        .iter()
        .position(|(name, _)| name == EXPIRES)
    else {
        return true;
    };
    let (_, value) = props.user_properties.remove(position);
    let Ok(deadline) = value.parse::<u64>() else {
        return true;
    };
    let now = now_ms();
    if now >= deadline {
        return false;
    }
    let left = (deadline - now).div_ceil(1000);
    props.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
    true
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Takes the published QoS off `properties` (`None` if it has none: delivered as the
/// router sends it). Properties left empty become `None` again.
pub fn untag(properties: &mut Option<PublishProperties>) -> Option<u8> {
    let props = properties.as_mut()?;
    let position = props
        .user_properties
        .iter()
        .position(|(name, _)| name == TAG)?;
    let (_, value) = props.user_properties.remove(position);
    if *props == PublishProperties::default() {
        *properties = None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_round_trips_and_leaves_nothing_behind() {
        let mut tagged = tag(None, 1, false);
        assert_eq!(untag(&mut tagged), Some(1));
        assert_eq!(tagged, None);
        let with_user = PublishProperties {
            user_properties: vec![("a".into(), "b".into())],
            ..Default::default()
        };
        let mut tagged = tag(Some(with_user.clone()), 2, true);
        assert!(was_retained(&mut tagged));
        assert_eq!(untag(&mut tagged), Some(2));
        assert_eq!(tagged, Some(with_user));
    }

    #[test]
    fn an_expiry_interval_travels_as_a_deadline() {
        let with_expiry = PublishProperties {
            message_expiry_interval: Some(60),
            ..Default::default()
        };
        let mut tagged = tag(Some(with_expiry), 1, false);
        assert!(unexpired(&mut tagged));
        assert_eq!(untag(&mut tagged), Some(1));
        let left = tagged.and_then(|p| p.message_expiry_interval);
        assert!(matches!(left, Some(59..=60)), "{left:?}");
        let gone = PublishProperties {
            user_properties: vec![(EXPIRES.into(), "1".into())],
            ..Default::default()
        };
        assert!(!unexpired(&mut Some(gone)));
    }

    #[test]
    fn a_forged_tag_is_replaced() {
        let forged = PublishProperties {
            user_properties: vec![(TAG.into(), "2".into())],
            ..Default::default()
        };
        let mut tagged = tag(Some(forged), 0, false);
        assert_eq!(untag(&mut tagged), Some(0));
        assert_eq!(tagged, None);
    }
}
