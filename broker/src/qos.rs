//! The published QoS, carried through the router.
//!
//! MQTT (3.1.1 3.8.4, 5 3.8.4) delivers a message at the lower of the QoS it was
//! published with and the QoS of the matching subscription. rumqttd's router delivers at
//! the subscription's QoS: it overwrites the stored message's QoS with the filter's. So
//! every message enters the router with its published QoS in a user property of our own
//! (removed from what clients send, so that none can forge it), and the session takes
//! it off on the way out and delivers at the lower QoS, settling with the router itself
//! what the router still expects (`session/link.rs`).

use rumqttd::protocol::PublishProperties;

/// The user property; a client's own property of that name is dropped.
const TAG: &str = "$edgedps/qos";

/// `properties` with the published QoS recorded (and any forged record dropped).
pub fn tag(properties: Option<PublishProperties>, qos: u8) -> Option<PublishProperties> {
    let mut properties = properties.unwrap_or_default();
    properties.user_properties.retain(|(name, _)| name != TAG);
    properties
        .user_properties
        .push((TAG.to_owned(), qos.min(2).to_string()));
    Some(properties)
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
        let mut tagged = tag(None, 1);
        assert_eq!(untag(&mut tagged), Some(1));
        assert_eq!(tagged, None);
        let with_user = PublishProperties {
            user_properties: vec![("a".into(), "b".into())],
            ..Default::default()
        };
        let mut tagged = tag(Some(with_user.clone()), 2);
        assert_eq!(untag(&mut tagged), Some(2));
        assert_eq!(tagged, Some(with_user));
    }

    #[test]
    fn a_forged_tag_is_replaced() {
        let forged = PublishProperties {
            user_properties: vec![(TAG.into(), "2".into())],
            ..Default::default()
        };
        let mut tagged = tag(Some(forged), 0);
        assert_eq!(untag(&mut tagged), Some(0));
        assert_eq!(tagged, None);
    }
}
