//! MQTT framing over rumqttd's protocol codec (3.1.1 and 5).
//!
//! rumqttd decodes and encodes the packets. Two gaps are filled here: the protocol
//! version is read from the CONNECT before choosing a decoder, and a PUBLISH's QoS and
//! packet id (private fields in rumqttd's `Publish`) are read from the frame and set
//! through rumqttd's public internal-format constructor.

use crate::Error;
use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{
    self, v4, v5, ConnectReturnCode, Packet, Protocol, Publish, PublishProperties, QoS,
    SubscribeReasonCode,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// The first subscription options byte of a SUBSCRIBE body with reserved bits set (bits
/// 2 to 7 in MQTT 3.1.1, 6 and 7 in MQTT 5), which rumqttd's decoder ignores. A body too
/// short to read is left to the decoder, which refuses it.
fn reserved_subscription_options(body: &[u8], version: Version) -> Option<u8> {
    let mut at = 2; // packet id
    let reserved = match version {
        Version::V4 => 0b1111_1100,
        Version::V5 => {
            // Properties: a variable byte integer length, then that many bytes.
            let mut length = 0usize;
            for shift in 0..4 {
                let byte = *body.get(at)?;
                at += 1;
                length |= usize::from(byte & 0x7f) << (7 * shift);
                if byte & 0x80 == 0 {
                    break;
                }
            }
            at += length;
            0b1100_0000
        }
    };
    while at < body.len() {
        let len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
        let options = *body.get(at + 2 + len)?;
        if options & reserved != 0 {
            return Some(options);
        }
        at += 3 + len;
    }
    None
}

/// QoS and packet id of a PUBLISH, read from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishMeta {
    pub qos: u8,
    pub pkid: u16,
}

/// A decoded packet, with the PUBLISH details rumqttd keeps private.
#[derive(Debug)]
pub struct Frame {
    pub packet: Packet,
    pub publish: Option<PublishMeta>,
}

/// Reads the protocol level of a CONNECT at the start of `buf`; `Ok(None)` until the
/// bytes are there.
pub fn detect_version(buf: &[u8], max_packet_size: usize) -> Result<Option<Version>, Error> {
    let header = match v4::check(buf.iter(), max_packet_size) {
        Ok(header) => header,
        Err(protocol::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if header.byte1 >> 4 != 1 {
        return Err(Error::NotConnect);
    }
    let body = &buf[header.fixed_header_len..header.frame_length()];
    // protocol name (2-byte length + "MQTT"), then the level.
    if body.len() < 7 || &body[..6] != b"\x00\x04MQTT" {
        return Err(Error::Mqtt(protocol::Error::InvalidProtocol));
    }
    match body[6] {
        4 => Ok(Some(Version::V4)),
        5 => Ok(Some(Version::V5)),
        level => Err(Error::UnsupportedLevel(level)),
    }
}

pub struct Codec {
    pub version: Version,
    max_packet_size: usize,
}

impl Codec {
    pub fn new(version: Version, max_packet_size: usize) -> Codec {
        Codec {
            version,
            max_packet_size,
        }
    }

    /// Takes one packet off `buf`; `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        let header = match v4::check(buf.iter(), self.max_packet_size) {
            Ok(header) => header,
            Err(protocol::Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Packets only a server sends: rumqttd's MQTT 5 decoder reaches `unreachable!()`
        // on some of them (found by fuzzing), and no client may send them anyway.
        let kind = header.byte1 >> 4;
        if matches!(kind, 2 | 9 | 11 | 13) {
            return Err(Error::Mqtt(protocol::Error::InvalidPacketType(kind)));
        }
        // The fixed header's low nibble is fixed for every type but PUBLISH (MQTT 3.1.1
        // and 5, 2.1.3); rumqttd does not look, and a packet that breaks it is malformed.
        let flags = header.byte1 & 0x0f;
        let expected = match kind {
            3 => flags,
            6 | 8 | 10 => 0b0010,
            _ => 0,
        };
        if flags != expected {
            return Err(Error::ReservedFlags { kind, flags });
        }
        if kind == 1 {
            // CONNECT flags: bit 0 is reserved (3.1.2.3). After the protocol name
            // (length-prefixed) and the level.
            let body = &buf[header.fixed_header_len..header.frame_length()];
            let name = body
                .get(..2)
                .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            if let Some(flags) = body.get(2 + name + 1) {
                if flags & 1 != 0 {
                    return Err(Error::ReservedFlags {
                        kind,
                        flags: *flags,
                    });
                }
            }
        }
        if kind == 8 {
            let body = &buf[header.fixed_header_len..header.frame_length()];
            if let Some(options) = reserved_subscription_options(body, self.version) {
                return Err(Error::ReservedOptions(options));
            }
        }
        let publish = if header.byte1 >> 4 == 3 {
            let qos = (header.byte1 >> 1) & 0b11;
            let start = header.fixed_header_len;
            let frame = &buf[start..header.frame_length()];
            let pkid = if qos > 0 && frame.len() >= 2 {
                let topic_len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
                frame
                    .get(2 + topic_len..4 + topic_len)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(0)
            } else {
                0
            };
            Some(PublishMeta { qos, pkid })
        } else {
            None
        };
        let packet = match self.version {
            Version::V4 => v4::V4.read_mut(buf, self.max_packet_size)?,
            Version::V5 => v5::V5.read_mut(buf, self.max_packet_size)?,
        };
        Ok(Some(Frame { packet, publish }))
    }

    pub fn encode(&self, packet: Packet, out: &mut BytesMut) -> Result<(), Error> {
        match self.version {
            Version::V4 => v4::V4.write(packet, out)?,
            Version::V5 => v5::V5.write(packet, out)?,
        };
        Ok(())
    }

    /// A CONNACK refusal in the code space of this version.
    pub fn refusal_code(&self, refusal: ConnectRefusal) -> ConnectReturnCode {
        match (self.version, refusal) {
            (_, ConnectRefusal::BadClientId) => ConnectReturnCode::ClientIdentifierNotValid,
            (_, ConnectRefusal::BadCredentials) => ConnectReturnCode::BadUserNamePassword,
            (_, ConnectRefusal::NotAuthorized) => ConnectReturnCode::NotAuthorized,
            (Version::V4, ConnectRefusal::Unavailable) => ConnectReturnCode::ServiceUnavailable,
            (Version::V5, ConnectRefusal::Unavailable) => ConnectReturnCode::ServerUnavailable,
        }
    }

    /// A SUBACK failure in the code space of this version.
    pub fn subscribe_refused(&self) -> SubscribeReasonCode {
        match self.version {
            Version::V4 => SubscribeReasonCode::Failure,
            Version::V5 => SubscribeReasonCode::NotAuthorized,
        }
    }

    pub fn subscribe_granted(&self, qos: u8) -> SubscribeReasonCode {
        let qos = if qos >= 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        match (self.version, qos) {
            (Version::V4, qos) => SubscribeReasonCode::Success(qos),
            (Version::V5, QoS::AtMostOnce) => SubscribeReasonCode::QoS0,
            (Version::V5, _) => SubscribeReasonCode::QoS1,
        }
    }

    /// Properties to pass on with a forwarded publish: only MQTT 5 has them.
    pub fn properties(&self, properties: Option<PublishProperties>) -> Option<PublishProperties> {
        match self.version {
            Version::V4 => None,
            Version::V5 => properties,
        }
    }
}

/// CONNACK refusals, independent of the protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    BadClientId,
    BadCredentials,
    NotAuthorized,
    Unavailable,
}

impl ConnectRefusal {
    /// The refusal's name in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ConnectRefusal::BadClientId => "bad_client_id",
            ConnectRefusal::BadCredentials => "bad_credentials",
            ConnectRefusal::NotAuthorized => "not_authorized",
            ConnectRefusal::Unavailable => "unavailable",
        }
    }
}

/// A PUBLISH with the given QoS (0, 1 or 2), packet id, RETAIN and DUP (a redelivery,
/// MQTT 3.3.1.1; QoS 1 and 2 only), built through rumqttd's internal format because its
/// fields are private and its constructor only makes QoS 0 packets. The payload is
/// shared, not copied.
pub fn publish(
    topic: &[u8],
    payload: Bytes,
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Publish {
    let qos = qos.min(2);
    let dup = dup && qos > 0;
    let mut raw = BytesMut::with_capacity(5 + topic.len());
    raw.put_u8(0b0011_0000 | u8::from(retain) | (qos << 1) | (u8::from(dup) << 3));
    raw.put_u16(if qos == 0 { 0 } else { pkid });
    raw.put_u16(topic.len() as u16);
    raw.put_slice(topic);
    let mut publish = Publish::deserialize(raw.freeze());
    publish.payload = payload;
    publish
}

/// The QoS and packet id of a rumqttd `Publish` (its fields are private), read from its
/// internal form without copying its topic or payload.
pub fn qos_and_pkid(publish: &Publish) -> (u8, u16) {
    let mut header = publish.clone();
    header.topic = Bytes::new();
    header.payload = Bytes::new();
    let raw = header.serialize();
    let qos = raw.first().map_or(0, |b| (b >> 1) & 0b11);
    let pkid = raw
        .get(1..3)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    (qos, pkid)
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Buf;

    /// The QoS of a rumqttd `Publish`, from its internal form.
    fn publish_qos(publish: &Publish) -> u8 {
        let raw = publish.serialize();
        raw.chunk().first().map(|b| (b >> 1) & 0b11).unwrap_or(0)
    }

    fn v4_connect() -> BytesMut {
        let mut out = BytesMut::new();
        let connect = protocol::Connect {
            keep_alive: 30,
            client_id: "dev-1".into(),
            clean_session: true,
        };
        v4::V4
            .write(Packet::Connect(connect, None, None, None, None), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn reserved_fixed_header_flags_are_errors() {
        // (version, packet, accepted). Fixed-header flags: SUBSCRIBE, UNSUBSCRIBE and
        // PUBREL need 0010, the rest 0. Subscription options: QoS 1 is fine, bits 6-7
        // are reserved in both versions, bits 2-5 only in 3.1.1 (no local, retain as
        // published, retain handling in 5).
        let flags: [(&[u8], bool); 6] = [
            (&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], false),
            (&[0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], false),
            (&[0xc1, 0x00], false),
            (&[0x42, 0x02, 0x00, 0x01], false),
            (&[0x60, 0x02, 0x00, 0x01], false),
            (&[0xc0, 0x00], true),
        ];
        let options: [(Version, &[u8], bool); 4] = [
            (
                Version::V4,
                &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01],
                true,
            ),
            (
                Version::V5,
                &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x0d],
                true,
            ),
            (
                Version::V4,
                &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x05],
                false,
            ),
            (
                Version::V5,
                &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x41],
                false,
            ),
        ];
        let cases = [Version::V4, Version::V5]
            .into_iter()
            .flat_map(|version| flags.map(|(bytes, ok)| (version, bytes, ok)))
            .chain(options);
        for (version, bytes, accepted) in cases {
            let mut codec = Codec::new(version, 1024);
            let mut buf = BytesMut::from(bytes);
            let decoded = codec.decode(&mut buf);
            assert_eq!(
                decoded.is_ok(),
                accepted,
                "{version:?} {bytes:02x?}: {decoded:?}"
            );
        }
        // The reserved bit of the CONNECT flags.
        let mut connect = v4_connect();
        connect[9] |= 0x01;
        let decoded = Codec::new(Version::V4, 1024).decode(&mut connect);
        assert!(decoded.is_err(), "{decoded:?}");
        let decoded = Codec::new(Version::V4, 1024).decode(&mut v4_connect());
        assert!(decoded.is_ok(), "{decoded:?}");
    }

    #[test]
    fn version_is_read_from_the_connect() {
        let bytes = v4_connect();
        assert_eq!(detect_version(&bytes, 1024).unwrap(), Some(Version::V4));
        assert_eq!(detect_version(&bytes[..3], 1024).unwrap(), None);
        let mut other = bytes.clone();
        other[0] = 0x30;
        assert!(matches!(
            detect_version(&other, 1024),
            Err(Error::NotConnect)
        ));
    }

    #[test]
    fn publish_qos_and_pkid_survive_a_round_trip() {
        let codec = Codec::new(Version::V4, 1024);
        let mut out = BytesMut::new();
        codec
            .encode(
                Packet::Publish(
                    publish(b"a/b", Bytes::from_static(b"hello"), 1, 7, false, false),
                    None,
                ),
                &mut out,
            )
            .unwrap();
        let mut decoder = Codec::new(Version::V4, 1024);
        let frame = decoder.decode(&mut out).unwrap().unwrap();
        assert_eq!(frame.publish, Some(PublishMeta { qos: 1, pkid: 7 }));
        match frame.packet {
            Packet::Publish(p, _) => {
                assert_eq!(&p.topic[..], b"a/b");
                assert_eq!(&p.payload[..], b"hello");
                assert_eq!(publish_qos(&p), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
    }

    #[test]
    fn a_redelivery_at_qos_2_keeps_its_flags_and_shares_its_payload() {
        let payload = Bytes::from(vec![7u8; 1024]);
        let p = publish(b"t", payload.clone(), 2, 9, true, true);
        assert_eq!(qos_and_pkid(&p), (2, 9));
        assert_eq!(p.payload.as_ptr(), payload.as_ptr(), "not copied");
        let raw = p.serialize();
        assert_eq!(raw[0] & 0b1111, 0b1101, "DUP, QoS 2, RETAIN");
        // DUP never on QoS 0.
        let p = publish(b"t", payload, 0, 9, false, true);
        assert_eq!(qos_and_pkid(&p), (0, 0));
        assert_eq!(p.serialize()[0] & 0b1000, 0);
    }

    #[test]
    fn server_only_packets_from_a_client_are_errors_not_panics() {
        // fuzz/artifacts: an MQTT 5 CONNECT followed by a CONNACK made rumqttd panic.
        let crash: &[u8] = &[
            0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00,
            0x02, 0x05, 0x02, 0x00, 0x29, 0x05, 0x00, 0x3c, 0x00, 0x00, 0x02, 0x00, 0x78,
        ];
        for version in [Version::V4, Version::V5] {
            let mut buf = BytesMut::from(crash);
            let mut codec = Codec::new(version, 1024);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            for kind in [2u8, 9, 11, 13] {
                let mut buf = BytesMut::from(&[kind << 4, 0x02, 0x00, 0x01][..]);
                assert!(codec.decode(&mut buf).is_err(), "type {kind}");
            }
        }
    }

    #[test]
    fn oversized_packets_are_refused_before_they_arrive() {
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x7f][..]);
        let mut codec = Codec::new(Version::V4, 1024);
        assert!(codec.decode(&mut buf).is_err());
    }
}
