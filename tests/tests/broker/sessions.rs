//! MQTT session behaviour on the real listeners: MQTT 5, clean_session = 0, deadlines,
//! keep-alive, oversized packets.

use std::time::Duration;

use edgedps_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until EOF or error; returns the bytes read and how long it took.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let start = std::time::Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((all, start.elapsed())),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// A hand-made MQTT 3.1.1 CONNECT: client id `ka`, clean session, the given keep-alive.
fn connect_packet(keep_alive: u16) -> Vec<u8> {
    let mut packet = vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    packet.extend_from_slice(&keep_alive.to_be_bytes());
    packet.extend_from_slice(&[0, 2, b'k', b'a']);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_without_connect_is_closed_at_the_deadline() {
    let server = Server::start_with(|c| {
        c.limits.connect_timeout_ms = 300;
        c.limits.handshake_timeout_ms = 300;
    })
    .await;
    // No CONNECT on the local listener.
    let mut idle = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // No TLS handshake on the device listener.
    let mut stalled = TcpStream::connect(("127.0.0.1", server.devices_port))
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut stalled, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_session_is_closed_after_one_and_a_half_keep_alives() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    stream.write_all(&connect_packet(1)).await.unwrap();
    let (bytes, took) = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("closed");
    assert_eq!(
        &bytes[..4],
        &[0x20, 2, 0, 0],
        "CONNACK accepted, session present 0"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packet_closes_the_session() {
    let server = Server::start_with(|c| c.limits.max_packet_size = 4096).await;
    let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    stream.write_all(&connect_packet(60)).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    // PUBLISH announcing 1 MiB: refused from its header, before the body arrives.
    stream.write_all(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    assert!(read_until_closed(&mut stream, Duration::from_secs(2))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_first_packet_closes_the_connection() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    // A PINGREQ where the CONNECT must be.
    stream.write_all(&[0xc0, 0x00]).await.unwrap();
    let (bytes, _) = read_until_closed(&mut stream, Duration::from_secs(2))
        .await
        .expect("closed");
    assert!(bytes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_device_with_persistent_session_flag_provisions_puback_first() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event};

    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("v5-dev").await;
    let mut options = server.mqtt5_options("v5-dev", &key);
    options.set_clean_start(false);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=v5",
            QoS::AtLeastOnce,
            false,
            "",
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut session_present = None;
    let mut acked = false;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("response in time")
            .expect("connection stays up");
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => session_present = Some(ack.session_present),
            Event::Incoming(Packet::PubAck(_)) => acked = true,
            Event::Incoming(Packet::Publish(p)) => {
                assert!(acked, "PUBACK of the register comes before the response");
                assert_eq!(&p.topic[..], b"$dps/registrations/res/200/?$rid=v5");
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["status"], "assigned");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(session_present, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_live_when_the_suback_arrives() {
    // Operators that subscribe to their results and write at once, while the router
    // is busy with the writes of others: a SUBACK sent before the router applied the
    // subscription loses the first results, and a writer then waits forever.
    let server = Server::start().await;
    let admin = ([127, 0, 0, 1], server.local_port).into();
    for round in 0..6 {
        let records: Vec<_> = (0..1000)
            .map(|i| {
                let id = format!("live-{round}-{i}");
                (
                    format!("dps/enrollments/{id}"),
                    symmetric_enrollment(&id, &new_key()),
                )
            })
            .collect();
        let written = tokio::time::timeout(
            Duration::from_secs(30),
            edgedps_device::admin::write_all(admin, &records),
        )
        .await;
        assert!(matches!(written, Ok(Ok(()))), "round {round}: {written:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_a_silent_client_do_not_keep_it_alive() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    stream.write_all(&connect_packet(1)).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    // SUBSCRIBE pkid 1 to `flood/#` at QoS 0.
    stream
        .write_all(&[
            0x82, 0x0c, 0x00, 0x01, 0x00, 0x07, b'f', b'l', b'o', b'o', b'd', b'/', b'#', 0x00,
        ])
        .await
        .unwrap();
    let mut publisher = server.operator().await;
    let flood = tokio::spawn(async move {
        for _ in 0..100 {
            let _ = publisher
                .client
                .publish("flood/x", rumqttc::QoS::AtMostOnce, false, "tick")
                .await;
            let _ =
                tokio::time::timeout(Duration::from_millis(100), publisher.eventloop.poll()).await;
        }
    });
    let (_, took) = read_until_closed(&mut stream, Duration::from_secs(8))
        .await
        .expect("the silent client is closed although it receives messages");
    assert!(took < Duration::from_secs(5), "{took:?}");
    flood.abort();
}
