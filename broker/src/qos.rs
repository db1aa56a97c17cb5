//! What rumqttd's router does not carry: the published QoS, the published RETAIN flag,
//! and when a message expires.
//!
//! MQTT (3.1.1 3.8.4, 5 3.8.4) delivers a message at the lower of the QoS it was
//! published with and the QoS of the matching subscription. rumqttd's router delivers at
//! the subscription's QoS: it overwrites the stored message's QoS with the filter's. It
//! also clears RETAIN on live deliveries, which MQTT 5's Retain As Published needs, and
//! keeps no clock for MQTT 5's Message Expiry Interval (3.3.2.3.3: a message not yet
//! delivered when it expires is not delivered; one delivered late carries what is left
//! of its interval). So a message enters the router with these in one user property of
//! our own (removed from what clients send, so that none can forge it), and the session
//! takes it off on the way out (`session/link.rs`, `session/settling.rs`).
//!
//! Most messages need none: a message without the property was published at QoS 0,
//! without RETAIN and without expiry, so the retained record of a million devices and
//! every event carry nothing extra.

use rumqttd::protocol::PublishProperties;

/// The user property: `{qos}[r][;{deadline in Unix milliseconds}]`.
const NAME: &str = "$edgedps";

/// What a message carried through the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    /// The QoS it was published with.
    pub qos: u8,
    /// It was published with RETAIN set.
    pub retained: bool,
    /// Its Message Expiry Interval ran out.
    pub expired: bool,
    /// When it expires, in Unix milliseconds (MQTT 5 Message Expiry Interval).
    pub deadline: Option<u64>,
}

/// `properties` for the router: the published QoS, RETAIN flag and expiry deadline
/// recorded when there is anything to record; a client's forged record dropped.
pub fn tag(
    properties: Option<PublishProperties>,
    qos: u8,
    retained: bool,
) -> Option<PublishProperties> {
    let mut properties = properties;
    if let Some(props) = properties.as_mut() {
        props.user_properties.retain(|(name, _)| name != NAME);
    }
    let expiry = properties.as_ref().and_then(|p| p.message_expiry_interval);
    if qos == 0 && !retained && expiry.is_none() {
        return properties;
    }
    let mut record = qos.min(2).to_string();
    if retained {
        record.push('r');
    }
    if let Some(seconds) = expiry {
        let deadline = now_ms().saturating_add(u64::from(seconds) * 1000);
        record.push(';');
        record.push_str(&deadline.to_string());
    }
    let mut props = properties.unwrap_or_default();
    props.user_properties.push((NAME.to_owned(), record));
    Some(props)
}

/// Takes the record off `properties` (left `None` when nothing else is in them) and
/// sets an expiry interval to what is left of it.
pub fn take(properties: &mut Option<PublishProperties>) -> Carried {
    let mut carried = Carried {
        qos: 0,
        retained: false,
        expired: false,
        deadline: None,
    };
    let Some(props) = properties.as_mut() else {
        return carried;
    };
    let Some(position) = props
        .user_properties
        .iter()
        .position(|(name, _)| name == NAME)
    else {
        return carried;
    };
    let (_, record) = props.user_properties.remove(position);
    let (flags, deadline) = record.split_once(';').unwrap_or((&record, ""));
    carried.qos = flags
        .get(..1)
        .and_then(|q| q.parse().ok())
        .unwrap_or_default();
    carried.retained = flags.ends_with('r');
    if let Ok(deadline) = deadline.parse::<u64>() {
        carried.deadline = Some(deadline);
        carried.expired = !left_until(properties, deadline);
    }
    if properties.as_ref() == Some(&PublishProperties::default()) {
        *properties = None;
    }
    carried
}

/// Sets the Message Expiry Interval of a message that expires at `deadline` (Unix
/// milliseconds) to what is left of it; false once it has run out.
pub fn left_until(properties: &mut Option<PublishProperties>, deadline: u64) -> bool {
    let now = now_ms();
    if now >= deadline {
        return false;
    }
    let left = (deadline - now).div_ceil(1000);
    properties
        .get_or_insert_with(Default::default)
        .message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
    true
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_qos_0_message_carries_nothing() {
        assert_eq!(tag(None, 0, false), None);
        let mut none = None;
        assert_eq!(
            take(&mut none),
            Carried {
                qos: 0,
                retained: false,
                expired: false,
                deadline: None
            }
        );
    }

    #[test]
    fn the_record_round_trips_and_leaves_nothing_behind() {
        let mut tagged = tag(None, 1, false);
        assert_eq!(take(&mut tagged).qos, 1);
        assert_eq!(tagged, None);
        let with_user = PublishProperties {
            user_properties: vec![("a".into(), "b".into())],
            ..Default::default()
        };
        let mut tagged = tag(Some(with_user.clone()), 2, true);
        let carried = take(&mut tagged);
        assert_eq!((carried.qos, carried.retained), (2, true));
        assert_eq!(tagged, Some(with_user));
        // A retained QoS 0 record (the operator plane's) carries only that.
        let mut record = tag(None, 0, true);
        assert_eq!(
            take(&mut record),
            Carried {
                qos: 0,
                retained: true,
                expired: false,
                deadline: None
            }
        );
    }

    #[test]
    fn an_expiry_interval_travels_as_a_deadline() {
        let with_expiry = PublishProperties {
            message_expiry_interval: Some(60),
            ..Default::default()
        };
        let mut tagged = tag(Some(with_expiry), 1, false);
        let carried = take(&mut tagged);
        assert!(!carried.expired);
        assert_eq!(carried.qos, 1);
        let left = tagged.and_then(|p| p.message_expiry_interval);
        assert!(matches!(left, Some(59..=60)), "{left:?}");
        let gone = PublishProperties {
            user_properties: vec![(NAME.into(), "0;1".into())],
            ..Default::default()
        };
        assert!(take(&mut Some(gone)).expired);
    }

    #[test]
    fn a_forged_record_is_replaced_or_dropped() {
        let forged = PublishProperties {
            user_properties: vec![(NAME.into(), "2r".into())],
            ..Default::default()
        };
        assert_eq!(
            tag(Some(forged.clone()), 0, false),
            Some(PublishProperties::default())
        );
        let mut tagged = tag(Some(forged), 1, false);
        assert_eq!(
            take(&mut tagged),
            Carried {
                qos: 1,
                retained: false,
                expired: false,
                deadline: None
            }
        );
    }
}
