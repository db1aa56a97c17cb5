//! The gateway's MQTT broker (issue 10): sessions on the local listener that are not DPS
//! sessions get MQTT 3.1.1 semantics: QoS 0, 1 and 2 both ways at the lower of the
//! published and the granted QoS, wills, persistent sessions, assigned client ids and
//! takeover. Each test asserts what arrives, with which QoS, and what does not.

use std::time::Duration;

use edgedps_tests::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An MQTT 3.1.1 client on the local listener, connected (CONNACK read).
async fn client(server: &Server, id: &str, clean: bool) -> (AsyncClient, EventLoop, bool) {
    let mut options = MqttOptions::new(id, "127.0.0.1", server.local_port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let session_present =
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => ack.session_present,
            other => panic!("{id}: no CONNACK: {other:?}"),
        };
    (client, eventloop, session_present)
}

/// Subscribes and returns the SUBACK's codes.
async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filter: &str,
    qos: QoS,
) -> Vec<rumqttc::SubscribeReasonCode> {
    client.subscribe(filter, qos).await.expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return ack.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }
}

/// The publishes that arrive within `wait` (acknowledging them as rumqttc does).
async fn publishes_within(eventloop: &mut EventLoop, wait: Duration) -> Vec<Publish> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return received,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => received.push(p),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
        }
    }
}

/// Keeps a publisher's event loop turning until `done` sees the packet it waits for.
async fn drive_until(eventloop: &mut EventLoop, what: &str, done: impl Fn(&Packet) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(packet))) if done(&packet) => return,
            Ok(Ok(_)) => {}
            other => panic!("no {what}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_publish_is_delivered_once_at_qos_2_and_completes() {
    let server = Server::start().await;
    let (sub, mut sub_loop, _) = client(&server, "q2-sub", true).await;
    let granted = subscribe(&sub, &mut sub_loop, "app/q2", QoS::ExactlyOnce).await;
    assert_eq!(
        granted,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    let (publisher, mut pub_loop, _) = client(&server, "q2-pub", true).await;
    publisher
        .publish("app/q2", QoS::ExactlyOnce, false, "once")
        .await
        .unwrap();
    // PUBREC, then (rumqttc sends PUBREL) PUBCOMP.
    drive_until(&mut pub_loop, "PUBCOMP", |p| {
        matches!(p, Packet::PubComp(_))
    })
    .await;
    let received = publishes_within(&mut sub_loop, Duration::from_secs(2)).await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].qos, QoS::ExactlyOnce);
    assert_eq!(&received[0].payload[..], b"once");
    assert!(!received[0].dup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_qos_is_the_lower_of_published_and_granted() {
    let server = Server::start().await;
    let (at_1, mut at_1_loop, _) = client(&server, "min-1", true).await;
    subscribe(&at_1, &mut at_1_loop, "app/min", QoS::AtLeastOnce).await;
    let (at_0, mut at_0_loop, _) = client(&server, "min-0", true).await;
    subscribe(&at_0, &mut at_0_loop, "app/min", QoS::AtMostOnce).await;
    let (publisher, mut pub_loop, _) = client(&server, "min-pub", true).await;
    publisher
        .publish("app/min", QoS::ExactlyOnce, false, "two")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBCOMP", |p| {
        matches!(p, Packet::PubComp(_))
    })
    .await;
    publisher
        .publish("app/min", QoS::AtMostOnce, false, "zero")
        .await
        .unwrap();
    tokio::spawn(async move { publishes_within(&mut pub_loop, Duration::from_secs(3)).await });
    let one = publishes_within(&mut at_1_loop, Duration::from_secs(2)).await;
    let zero = publishes_within(&mut at_0_loop, Duration::from_secs(1)).await;
    let qos_of = |list: &[Publish]| -> Vec<(Vec<u8>, QoS)> {
        list.iter().map(|p| (p.payload.to_vec(), p.qos)).collect()
    };
    assert_eq!(
        qos_of(&one),
        vec![
            (b"two".to_vec(), QoS::AtLeastOnce),
            (b"zero".to_vec(), QoS::AtMostOnce)
        ]
    );
    assert_eq!(
        qos_of(&zero),
        vec![
            (b"two".to_vec(), QoS::AtMostOnce),
            (b"zero".to_vec(), QoS::AtMostOnce)
        ]
    );
}

/// A connection of the local listener that sent `connect` (raw bytes) and got a
/// CONNACK accepting it.
async fn accepted_raw(server: &Server, connect: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    stream.write_all(connect).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    stream
}

/// An MQTT 3.1.1 CONNECT with a will on `will_topic` (QoS 1) and the given keep-alive.
fn connect_with_will(client_id: &str, keep_alive: u16, will_topic: &str, will: &str) -> Vec<u8> {
    connect_with_will_flags(client_id, keep_alive, will_topic, will, false)
}

/// As [`connect_with_will`], with Will Retain set when `retain`.
fn connect_with_will_flags(
    client_id: &str,
    keep_alive: u16,
    will_topic: &str,
    will: &str,
    retain: bool,
) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    // Clean session, will flag, will QoS 1, will retain.
    body.push(0x02 | 0x04 | 0x08 | if retain { 0x20 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    for field in [client_id.as_bytes(), will_topic.as_bytes(), will.as_bytes()] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_keep_alive_expires_and_not_after_a_disconnect() {
    let server = Server::start().await;
    let (watcher, mut watch_loop, _) = client(&server, "will-watcher", true).await;
    subscribe(&watcher, &mut watch_loop, "app/will/#", QoS::AtLeastOnce).await;

    // Silent after its CONNECT: closed after 1.5 keep-alives, and its will goes out.
    let _silent = accepted_raw(
        &server,
        &connect_with_will("will-silent", 1, "app/will/silent", "gone"),
    )
    .await;
    let wills = publishes_within(&mut watch_loop, Duration::from_secs(4)).await;
    assert_eq!(wills.len(), 1, "{wills:?}");
    assert_eq!(wills[0].topic, "app/will/silent");
    assert_eq!(&wills[0].payload[..], b"gone");
    assert_eq!(wills[0].qos, QoS::AtLeastOnce);

    // Dropped without DISCONNECT: the will goes out.
    let dropped = accepted_raw(
        &server,
        &connect_with_will("will-dropped", 60, "app/will/dropped", "lost"),
    )
    .await;
    drop(dropped);
    let wills = publishes_within(&mut watch_loop, Duration::from_secs(2)).await;
    assert_eq!(wills.len(), 1, "{wills:?}");
    assert_eq!(wills[0].topic, "app/will/dropped");

    // A normal DISCONNECT: no will.
    let mut polite = accepted_raw(
        &server,
        &connect_with_will("will-polite", 60, "app/will/polite", "bye"),
    )
    .await;
    polite.write_all(&[0xe0, 0x00]).await.unwrap();
    let wills = publishes_within(&mut watch_loop, Duration::from_secs(2)).await;
    assert!(
        wills.is_empty(),
        "a will after a normal DISCONNECT: {wills:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_error_sends_the_will_and_will_retain_keeps_it() {
    let server = Server::start().await;
    let (watcher, mut watch_loop, _) = client(&server, "broken-watcher", true).await;
    subscribe(&watcher, &mut watch_loop, "app/broken/#", QoS::AtLeastOnce).await;
    let mut broken = accepted_raw(
        &server,
        &connect_with_will_flags("will-broken", 60, "app/broken/status", "offline", true),
    )
    .await;
    // Packet type 0 is reserved: a protocol error, the server closes the connection.
    broken.write_all(&[0x00, 0x00]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), broken.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection stays open after a protocol error"
    );
    let wills = publishes_within(&mut watch_loop, Duration::from_secs(2)).await;
    assert_eq!(wills.len(), 1, "{wills:?}");
    assert_eq!(
        (&wills[0].payload[..], wills[0].qos, wills[0].retain),
        (&b"offline"[..], QoS::AtLeastOnce, false),
        "live delivery: RETAIN 0 (MQTT 3.1.1 3.3.1.3)"
    );
    // Retained: a later subscriber gets it, with RETAIN set.
    let (late, mut late_loop, _) = client(&server, "broken-late", true).await;
    subscribe(&late, &mut late_loop, "app/broken/#", QoS::AtLeastOnce).await;
    let retained = publishes_within(&mut late_loop, Duration::from_secs(2)).await;
    assert_eq!(retained.len(), 1, "{retained:?}");
    assert!(retained[0].retain);
    assert_eq!(&retained[0].payload[..], b"offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_keeps_its_subscriptions_and_queues_messages_while_offline() {
    let server = Server::start().await;
    let (keeper, mut keep_loop, present) = client(&server, "keeper", false).await;
    assert!(!present, "a first connection has no session");
    subscribe(&keeper, &mut keep_loop, "app/persist", QoS::AtLeastOnce).await;
    disconnect(&keeper, &mut keep_loop).await;

    let (publisher, mut pub_loop, _) = client(&server, "persist-pub", true).await;
    for n in 0..3 {
        publisher
            .publish("app/persist", QoS::AtLeastOnce, false, format!("m{n}"))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }

    // Back with clean session 0: the session is there, and the queued messages arrive
    // without a new SUBSCRIBE.
    let (_keeper, mut keep_loop, present) = client(&server, "keeper", false).await;
    assert!(present, "SessionPresent is 1 on resume");
    let queued = publishes_within(&mut keep_loop, Duration::from_secs(3)).await;
    let payloads: Vec<&[u8]> = queued.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, vec![&b"m0"[..], b"m1", b"m2"]);
    assert!(queued.iter().all(|p| p.qos == QoS::AtLeastOnce));
    drop(keep_loop);

    // A clean session discards it.
    let (_fresh, _fresh_loop, present) = client(&server, "keeper", true).await;
    assert!(!present);
}

/// Disconnects `client` and lets its event loop run out.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Waits until `done` holds, at most ten seconds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_session_keeps_its_newest_messages_up_to_its_limit_and_counts_the_rest() {
    let server = Server::start_with(|config| config.limits.max_queued_messages = 5).await;
    let offline = server.running.offline.clone();
    let (away, mut away_loop, _) = client(&server, "bounded", false).await;
    subscribe(&away, &mut away_loop, "app/bounded", QoS::ExactlyOnce).await;
    disconnect(&away, &mut away_loop).await;
    eventually("the session is offline", || offline.holds("bounded")).await;

    let (publisher, mut pub_loop, _) = client(&server, "bounded-pub", true).await;
    // QoS 0 is not kept for an absent client, and does not push anything out. Sent
    // first: the router has routed it before it acknowledges the next publish.
    publisher
        .publish("app/bounded", QoS::AtMostOnce, false, "zero")
        .await
        .unwrap();
    for n in 0..8 {
        let qos = if n % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        publisher
            .publish("app/bounded", qos, false, format!("m{n}"))
            .await
            .unwrap();
        // One at a time: a QoS 2 message enters the router's log at its PUBREL.
        drive_until(&mut pub_loop, "PUBACK or PUBCOMP", |p| {
            matches!(p, Packet::PubAck(_) | Packet::PubComp(_))
        })
        .await;
    }
    tokio::spawn(async move { publishes_within(&mut pub_loop, Duration::from_secs(10)).await });
    eventually("three dropped", || offline.dropped() == 3).await;

    let (_back, mut back_loop, present) = client(&server, "bounded", false).await;
    assert!(present);
    let queued = publishes_within(&mut back_loop, Duration::from_secs(2)).await;
    let got: Vec<(String, QoS, bool)> = queued
        .iter()
        .map(|p| {
            (
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.qos,
                p.dup,
            )
        })
        .collect();
    let expected: Vec<(String, QoS, bool)> = (3..8)
        .map(|n| {
            let qos = if n % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            (format!("m{n}"), qos, false)
        })
        .collect();
    assert_eq!(got, expected, "the five newest, in order, once");
    assert_eq!(offline.sessions(), 0);
    assert_eq!(offline.dropped(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_offline_session_limit_the_one_away_longest_ends() {
    let server = Server::start_with(|config| config.limits.max_offline_sessions = 1).await;
    let offline = server.running.offline.clone();
    for id in ["first-away", "second-away"] {
        let (away, mut away_loop, _) = client(&server, id, false).await;
        subscribe(&away, &mut away_loop, "app/away", QoS::AtLeastOnce).await;
        disconnect(&away, &mut away_loop).await;
        eventually("it is offline", || offline.holds(id)).await;
    }
    eventually("only the second is kept", || {
        offline.sessions() == 1 && !offline.holds("first-away")
    })
    .await;
    let (_first, _first_loop, present) = client(&server, "first-away", false).await;
    assert!(!present, "the session away the longest ended");
    let (_second, _second_loop, present) = client(&server, "second-away", false).await;
    assert!(present, "the other is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_is_assigned_with_a_clean_session_and_refused_without() {
    let server = Server::start().await;
    for (clean, expected) in [(true, [0x20, 2, 0, 0]), (false, [0x20, 2, 0, 2])] {
        let mut stream = TcpStream::connect(("127.0.0.1", server.local_port))
            .await
            .unwrap();
        let flags = if clean { 0x02 } else { 0x00 };
        stream
            .write_all(&[
                0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30, 0, 0,
            ])
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, expected, "clean session {clean}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let server = Server::start().await;
    let (_first, mut first_loop, _) = client(&server, "twice", true).await;
    let (second, mut second_loop, _) = client(&server, "twice", true).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if first_loop.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the first connection was not closed");
    // The second one works.
    subscribe(&second, &mut second_loop, "app/twice", QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_below_the_subscription_qos_are_settled_with_the_router() {
    // More messages than the router keeps in flight per session: had a downgraded
    // delivery not been settled with the router, the later ones would never come.
    const COUNT: usize = 150;
    let server = Server::start().await;
    let (at_2, mut at_2_loop, _) = client(&server, "settle-2", true).await;
    subscribe(&at_2, &mut at_2_loop, "app/settle", QoS::ExactlyOnce).await;
    let (publisher, mut pub_loop, _) = client(&server, "settle-pub", true).await;
    let driving = tokio::spawn(async move {
        publishes_within(&mut pub_loop, Duration::from_secs(15)).await;
    });
    let publishing = tokio::spawn(async move {
        for n in 0..COUNT {
            let qos = if n % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            publisher
                .publish("app/settle", qos, false, n.to_string())
                .await
                .unwrap();
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut received = Vec::new();
    while received.len() < COUNT {
        match tokio::time::timeout_at(deadline, at_2_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => received.push(p),
            Ok(Ok(_)) => {}
            other => panic!("after {} of {COUNT}: {other:?}", received.len()),
        }
    }
    for (n, p) in received.iter().enumerate() {
        assert_eq!(&p.payload[..], n.to_string().as_bytes());
        let expected = if n % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        assert_eq!(p.qos, expected, "message {n}");
    }
    publishing.await.unwrap();
    driving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_delivered_on_subscribe_replaced_and_cleared() {
    let server = Server::start().await;
    let (publisher, mut pub_loop, _) = client(&server, "ret-pub", true).await;
    let driving = tokio::spawn(async move {
        publishes_within(&mut pub_loop, Duration::from_secs(20)).await;
    });
    publisher
        .publish("app/ret/a", QoS::AtLeastOnce, true, "first")
        .await
        .unwrap();
    publisher
        .publish("app/ret/a", QoS::AtLeastOnce, true, "second")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // On subscribe: the latest retained message, with RETAIN set.
    let (sub, mut sub_loop, _) = client(&server, "ret-sub", true).await;
    subscribe(&sub, &mut sub_loop, "app/ret/#", QoS::AtLeastOnce).await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    let seen: Vec<(&[u8], bool)> = got.iter().map(|p| (&p.payload[..], p.retain)).collect();
    assert_eq!(seen, vec![(&b"second"[..], true)]);

    // Delivered to an existing subscription: RETAIN is 0 (MQTT 3.1.1 3.3.1.3).
    publisher
        .publish("app/ret/a", QoS::AtLeastOnce, true, "third")
        .await
        .unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    let seen: Vec<(&[u8], bool)> = got.iter().map(|p| (&p.payload[..], p.retain)).collect();
    assert_eq!(seen, vec![(&b"third"[..], false)]);

    // An empty retained message clears it: a new subscriber gets nothing.
    publisher
        .publish("app/ret/a", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (late, mut late_loop, _) = client(&server, "ret-late", true).await;
    subscribe(&late, &mut late_loop, "app/ret/#", QoS::AtLeastOnce).await;
    let got = publishes_within(&mut late_loop, Duration::from_secs(1)).await;
    assert!(got.is_empty(), "{got:?}");
    driving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_deliveries_at_once() {
    let server = Server::start().await;
    let (sub, mut sub_loop, _) = client(&server, "unsub-sub", true).await;
    subscribe(&sub, &mut sub_loop, "app/unsub", QoS::AtLeastOnce).await;
    sub.unsubscribe("app/unsub").await.unwrap();
    drive_until(&mut sub_loop, "UNSUBACK", |p| {
        matches!(p, Packet::UnsubAck(_))
    })
    .await;
    let (publisher, mut pub_loop, _) = client(&server, "unsub-pub", true).await;
    publisher
        .publish("app/unsub", QoS::AtLeastOnce, false, "late")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert!(got.is_empty(), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_routed_but_never_matched_by_a_first_level_wildcard() {
    let server = Server::start().await;
    let (everything, mut everything_loop, _) = client(&server, "dollar-all", true).await;
    subscribe(&everything, &mut everything_loop, "#", QoS::AtLeastOnce).await;
    let (plus, mut plus_loop, _) = client(&server, "dollar-plus", true).await;
    subscribe(&plus, &mut plus_loop, "+/status", QoS::AtLeastOnce).await;
    let (dollar, mut dollar_loop, _) = client(&server, "dollar-own", true).await;
    subscribe(&dollar, &mut dollar_loop, "$app/#", QoS::AtLeastOnce).await;
    let (publisher, mut pub_loop, _) = client(&server, "dollar-pub", true).await;
    publisher
        .publish("$app/status", QoS::AtLeastOnce, false, "up")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    // `$SYS` is the server's: refused, and the session stays.
    publisher
        .publish("$SYS/broker/x", QoS::AtLeastOnce, false, "forged")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    publisher
        .publish("app/status", QoS::AtLeastOnce, false, "plain")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;

    let topics = |list: Vec<Publish>| -> Vec<(String, Vec<u8>)> {
        list.into_iter()
            .map(|p| (p.topic, p.payload.to_vec()))
            .collect()
    };
    let got = topics(publishes_within(&mut dollar_loop, Duration::from_secs(1)).await);
    assert_eq!(got, vec![("$app/status".to_string(), b"up".to_vec())]);
    // `#` also sees the operator plane (`dps/`: the retained hub, the refusal's event).
    let mut got = topics(publishes_within(&mut everything_loop, Duration::from_secs(1)).await);
    got.retain(|(topic, _)| !topic.starts_with("dps/"));
    assert_eq!(got, vec![("app/status".to_string(), b"plain".to_vec())]);
    let got = topics(publishes_within(&mut plus_loop, Duration::from_secs(1)).await);
    assert_eq!(got, vec![("app/status".to_string(), b"plain".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gives_each_message_to_one_member() {
    const COUNT: usize = 20;
    let server = Server::start().await;
    let (a, mut a_loop, _) = client(&server, "share-a", true).await;
    subscribe(&a, &mut a_loop, "$share/workers/jobs/+", QoS::AtLeastOnce).await;
    let (b, mut b_loop, _) = client(&server, "share-b", true).await;
    subscribe(&b, &mut b_loop, "$share/workers/jobs/+", QoS::AtLeastOnce).await;
    let (publisher, mut pub_loop, _) = client(&server, "share-pub", true).await;
    let driving = tokio::spawn(async move {
        publishes_within(&mut pub_loop, Duration::from_secs(10)).await;
    });
    for n in 0..COUNT {
        publisher
            .publish(format!("jobs/{n}"), QoS::AtLeastOnce, false, n.to_string())
            .await
            .unwrap();
    }
    let (got_a, got_b) = tokio::join!(
        publishes_within(&mut a_loop, Duration::from_secs(3)),
        publishes_within(&mut b_loop, Duration::from_secs(3))
    );
    let mut all: Vec<String> = got_a
        .iter()
        .chain(got_b.iter())
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    all.sort_by_key(|n| n.parse::<usize>().unwrap_or_default());
    let expected: Vec<String> = (0..COUNT).map(|n| n.to_string()).collect();
    assert_eq!(all, expected, "each message once, to one member");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both members served"
    );
    driving.abort();
}

/// A bare MQTT 3.1.1 client over a socket (rumqttc's packet codec, no state machine):
/// the storm test decides itself what to acknowledge and when to drop the connection.
struct Bare {
    stream: TcpStream,
    buffer: bytes::BytesMut,
}

impl Bare {
    async fn connect(port: u16, client_id: &str, clean: bool) -> (Bare, bool) {
        use rumqttc::mqttbytes::v4::{Connect, Packet as P};
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut bare = Bare {
            stream,
            buffer: bytes::BytesMut::new(),
        };
        let mut connect = Connect::new(client_id);
        connect.clean_session = clean;
        connect.keep_alive = 60;
        bare.send(P::Connect(connect)).await;
        match bare.next().await {
            Some(P::ConnAck(ack)) => {
                assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
                (bare, ack.session_present)
            }
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    async fn send(&mut self, packet: rumqttc::mqttbytes::v4::Packet) {
        let mut out = bytes::BytesMut::new();
        packet.write(&mut out, 1 << 20).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next packet, or `None` after 5 s of silence or a closed connection.
    async fn next(&mut self) -> Option<rumqttc::mqttbytes::v4::Packet> {
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut self.buffer, 1 << 20) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet: {e}"),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// The storm: a subscriber that stops acknowledging a third of the way in and comes
/// back, either after its connection was lost (`takeover` false) or by connecting again
/// while the first connection is still open.
async fn storm(takeover: bool) {
    use rumqttc::mqttbytes::v4::{Packet as P, PubAck, PubComp, PubRec, Subscribe};
    use std::collections::{BTreeMap, HashSet};
    const COUNT: usize = 400;
    let server = Server::start().await;
    let (mut sub, _) = Bare::connect(server.local_port, "storm-sub", false).await;
    sub.send(P::Subscribe(Subscribe::new("storm/#", QoS::ExactlyOnce)))
        .await;
    assert!(matches!(sub.next().await, Some(P::SubAck(_))));

    let (publisher, mut pub_loop, _) = client(&server, "storm-pub", true).await;
    let driving = tokio::spawn(async move {
        publishes_within(&mut pub_loop, Duration::from_secs(60)).await;
    });
    let publishing = tokio::spawn(async move {
        for n in 0..COUNT {
            let (topic, qos) = if n % 2 == 0 {
                ("storm/q1", QoS::AtLeastOnce)
            } else {
                ("storm/q2", QoS::ExactlyOnce)
            };
            publisher
                .publish(topic, qos, false, n.to_string())
                .await
                .unwrap();
        }
    });

    // What the application saw: every QoS 1 message at least once; every QoS 2 message
    // once, a redelivery (DUP, the same packet id, before its PUBREL) being the same one.
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let mut qos2_held: HashSet<u16> = HashSet::new();
    let mut resent_with_dup = 0;
    let mut dropped = false;
    let mut unacknowledged = None;
    let mut received = 0;
    while seen.len() < COUNT {
        let Some(packet) = sub.next().await else {
            let missing: Vec<usize> = (0..COUNT).filter(|n| !seen.contains_key(n)).collect();
            panic!(
                "the subscriber heard nothing more after {} of {COUNT}: missing {missing:?}, \
                 {unacknowledged:?} left unacknowledged",
                seen.len()
            );
        };
        match packet {
            P::Publish(p) => {
                received += 1;
                let n: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
                if p.dup {
                    resent_with_dup += 1;
                }
                let new = match p.qos {
                    QoS::ExactlyOnce => qos2_held.insert(p.pkid),
                    _ => true,
                };
                if new {
                    *seen.entry(n).or_default() += 1;
                }
                // A third of the way in: drop the connection with a QoS 2 message
                // received but not acknowledged, then come back.
                if !dropped && received > COUNT / 3 && p.qos == QoS::ExactlyOnce {
                    dropped = true;
                    unacknowledged = Some((p.pkid, n));
                    // The connection is lost (the socket closes) and the client comes
                    // back, or it comes back while the first connection is open.
                    if !takeover {
                        drop(sub);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let (resumed, present) =
                        Bare::connect(server.local_port, "storm-sub", false).await;
                    assert!(present, "SessionPresent on resume");
                    sub = resumed;
                    continue;
                }
                match p.qos {
                    QoS::AtLeastOnce => sub.send(P::PubAck(PubAck::new(p.pkid))).await,
                    QoS::ExactlyOnce => sub.send(P::PubRec(PubRec::new(p.pkid))).await,
                    QoS::AtMostOnce => {}
                }
            }
            P::PubRel(rel) => {
                qos2_held.remove(&rel.pkid);
                sub.send(P::PubComp(PubComp::new(rel.pkid))).await;
            }
            _ => {}
        }
    }
    publishing.await.unwrap();
    driving.abort();
    assert!(dropped);
    let missing: Vec<usize> = (0..COUNT).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let doubled: Vec<usize> = seen
        .iter()
        .filter(|(n, times)| *n % 2 == 1 && **times > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        doubled.is_empty(),
        "QoS 2 messages delivered twice: {doubled:?} ({unacknowledged:?} was left unacknowledged)"
    );
    assert!(
        resent_with_dup > 0,
        "the in-flight message came back with DUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_1_and_2_storm_survives_a_subscriber_that_drops_and_resumes() {
    storm(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_1_and_2_storm_survives_a_takeover_by_the_same_client() {
    storm(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_its_dollar_subscriptions() {
    let server = Server::start().await;
    let (keeper, mut keep_loop, _) = client(&server, "dollar-keeper", false).await;
    subscribe(&keeper, &mut keep_loop, "$app/kept", QoS::AtLeastOnce).await;
    disconnect(&keeper, &mut keep_loop).await;
    let (publisher, mut pub_loop, _) = client(&server, "dollar-keeper-pub", true).await;
    publisher
        .publish("$app/kept", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let (_keeper, mut keep_loop, present) = client(&server, "dollar-keeper", false).await;
    assert!(present);
    let got = publishes_within(&mut keep_loop, Duration::from_secs(2)).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, vec![&b"while away"[..]]);
    assert_eq!(got[0].topic, "$app/kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_get_the_message_at_the_highest_granted_qos() {
    let server = Server::start().await;
    let (sub, mut sub_loop, _) = client(&server, "overlap-sub", true).await;
    subscribe(&sub, &mut sub_loop, "app/ov/#", QoS::AtMostOnce).await;
    subscribe(&sub, &mut sub_loop, "app/ov/x", QoS::AtLeastOnce).await;
    let (publisher, mut pub_loop, _) = client(&server, "overlap-pub", true).await;
    publisher
        .publish("app/ov/x", QoS::AtLeastOnce, false, "both")
        .await
        .unwrap();
    drive_until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    // MQTT 3.3.5 / 5 3.3.4: at least one copy at the highest QoS of the matching
    // subscriptions; a further copy per subscription is allowed.
    assert!(!got.is_empty() && got.len() <= 2, "{got:?}");
    assert!(got.iter().all(|p| &p.payload[..] == b"both"));
    assert!(got.iter().any(|p| p.qos == QoS::AtLeastOnce), "{got:?}");
}
