//! The attack matrix (docs/security.md): each attempt is refused, and a bystander
//! device provisions normally afterwards.

use std::time::Duration;

use edgedps_device::provision::{register, DeviceError};
use edgedps_tests::*;
use rumqttc::ConnectReturnCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn refused(result: Result<Outcome, DeviceError>, what: &str) {
    match result {
        Err(DeviceError::Refused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized, "{what}")
        }
        other => panic!("{what}: expected CONNACK 5, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misused_certificates_are_refused_for_a_group() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let pki = pki();
    operator
        .put(
            "dps/enrollment-groups/fleet",
            x509_group("fleet", &pki.device_root.pem),
        )
        .await;
    let other_intermediate = pki.device_root.intermediate("another intermediate");
    let cases: Vec<(&str, Identity, Vec<&Ca>)> = vec![
        ("self-signed leaf", self_signed("atk-1"), vec![]),
        (
            "leaf of a rogue CA with the same name",
            pki.rogue_root.device("atk-2"),
            vec![],
        ),
        (
            "chain through the wrong intermediate",
            pki.device_intermediate.device("atk-3"),
            vec![&other_intermediate],
        ),
        (
            "expired leaf",
            pki.device_root.leaf("atk-4", |p| {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }),
            vec![],
        ),
        (
            "not yet valid leaf",
            pki.device_root.leaf("atk-5", |p| {
                p.not_before = rcgen::date_time_ymd(2090, 1, 1);
                p.not_after = rcgen::date_time_ymd(2091, 1, 1);
            }),
            vec![],
        ),
        (
            "CA certificate used as a leaf",
            pki.device_root.leaf("atk-6", |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
            vec![],
        ),
        (
            "leaf for servers only (no clientAuth)",
            pki.device_root.leaf("atk-7", |p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            }),
            vec![],
        ),
    ];
    for (i, (what, identity, chain)) in cases.into_iter().enumerate() {
        let id = format!("atk-{}", i + 1);
        refused(
            register(&server.device(&id, x509(&identity, &chain)), None).await,
            what,
        );
    }
    // A good member of the same group still gets in, and so does a bystander.
    let member = pki.device_root.device("atk-ok");
    let outcome = register(&server.device("atk-ok", x509(&member, &[])), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
    bystander_provisions(&server, &mut operator).await;
}

/// Sends raw bytes after a valid CONNECT on the local listener and returns whether the
/// server closed the connection within two seconds.
async fn closes_after(server: &Server, bytes: &[u8]) -> bool {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let connect = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'r', b'w',
    ];
    stream.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    stream.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mqtt_closes_the_session_and_nothing_else() {
    let server = Server::start_with(|c| c.limits.max_packet_size = 32 * 1024).await;
    let mut operator = server.operator().await;
    let mut big_topic = vec![0x30];
    let topic_len = 64 * 1024 - 1;
    let remaining = 2 + topic_len + 1;
    let mut x = remaining;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        big_topic.push(byte);
        if x == 0 {
            break;
        }
    }
    big_topic.extend_from_slice(&(topic_len as u16).to_be_bytes());
    big_topic.extend(std::iter::repeat_n(b'a', topic_len));
    big_topic.push(b'x');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "remaining length of five bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "topic that is not UTF-8",
            vec![0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x'],
        ),
        ("reserved packet type 0", vec![0x00, 0x00]),
        ("reserved packet type 15", vec![0xf0, 0x00]),
        (
            "QoS 3 publish",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        ("subscribe with no filter", vec![0x82, 0x02, 0x00, 0x01]),
        (
            "subscribe with reserved flags 0000",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        (
            "unsubscribe with reserved flags 0000",
            vec![0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
        ),
        ("pingreq with reserved flags", vec![0xc1, 0x00]),
        ("disconnect with reserved flags", vec![0xe3, 0x00]),
        (
            "subscribe with reserved bits in its options",
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0xf0],
        ),
        (
            "a second CONNECT",
            vec![
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'r', b'w',
            ],
        ),
        ("64 KiB topic over the packet limit", big_topic),
    ];
    for (what, bytes) in cases {
        assert!(
            closes_after(&server, &bytes).await,
            "{what} did not close the session"
        );
    }
    // A first CONNECT with the reserved flag bit set: closed without a CONNACK.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let connect = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 2, b'r', b'x',
    ];
    stream.write_all(&connect).await.unwrap();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a CONNECT with the reserved flag was answered: {read:?} {buf:02x?}"
    );
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_register_bodies_get_400004() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("bodies").await;
    let (client, mut eventloop) = server.listening("bodies", &key).await;
    for (i, body) in [
        &b"{"[..],
        b"[1,2]",
        b"\"text\"",
        br#"{"payload": 5}"#,
        br#"{"registrationId": "someone-else"}"#,
        b"\xff\xfe",
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("$dps/registrations/PUT/iotdps-register/?$rid=b{i}");
        let answer = ask(&client, &mut eventloop, &topic, body.to_vec()).await;
        assert_eq!(answer.status, 400, "body {i}");
        let answer: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(answer["errorCode"], 400004, "body {i}: {answer}");
    }
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_cbor_register_bodies_get_400004_in_cbor() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("cbor-bodies").await;
    let (client, mut eventloop) = server.listening("cbor-bodies", &key).await;
    let mut trailing = cbor(&serde_json::json!({"registrationId": "cbor-bodies"}));
    trailing.push(0xff);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a map cut short", vec![0xa1, 0x6e]),
        ("reserved additional information", vec![0xa1, 0x1d]),
        ("a break outside an indefinite item", vec![0xa1, 0xff]),
        (
            "2^64 entries",
            vec![0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "a text of 2^32 bytes",
            vec![0xa1, 0x7a, 0xff, 0xff, 0xff, 0xff, 0x61],
        ),
        ("nested past the recursion limit", vec![0xa1; 5_000]),
        ("bytes after the item", trailing),
        ("integer keys", vec![0xa1, 0x01, 0x02]),
        ("a byte-string payload", {
            let mut body = vec![0xa1, 0x67];
            body.extend_from_slice(b"payload");
            body.extend_from_slice(&[0x42, 0x01, 0x02]);
            body
        }),
        (
            "payload not a map",
            cbor(&serde_json::json!({"payload": 5})),
        ),
        (
            "another registrationId",
            cbor(&serde_json::json!({"registrationId": "someone-else"})),
        ),
    ];
    for (i, (what, body)) in cases.into_iter().enumerate() {
        let topic = format!("$dps/registrations/PUT/iotdps-register/?$rid=c{i}");
        let answer = ask(&client, &mut eventloop, &topic, body).await;
        assert_eq!(answer.status, 400, "{what}");
        let answer = from_cbor(&answer.body);
        assert_eq!(answer["errorCode"], 400004, "{what}: {answer}");
        assert!(answer["message"].is_string(), "{what}: {answer}");
    }
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_stop_a_thousand_devices() {
    // Fewer handshake slots than slow clients: they must not hold slots.
    let server = Server::start_with(|c| {
        c.limits.handshake_timeout_ms = 3_000;
        c.limits.max_handshakes = 64;
    })
    .await;
    let mut operator = server.operator().await;
    let port = server.devices_port;
    // 600 slow clients: silent; a TLS record header and nothing more; a ClientHello
    // dripped one byte every 300 ms.
    let mut slow = Vec::new();
    for i in 0..600 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        if i % 3 == 1 {
            stream
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    let drip = tokio::spawn({
        let drippers: Vec<usize> = (0..600).filter(|i| i % 3 == 2).collect();
        let mut streams: Vec<_> = drippers.iter().rev().map(|&i| slow.remove(i)).collect();
        async move {
            let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00];
            for step in 0..12 {
                let byte = hello.get(step).copied().unwrap_or(0x01);
                for stream in &mut streams {
                    let _ = stream.write_all(&[byte]).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            streams
        }
    });
    // 1,000 devices provision meanwhile, 100 at a time.
    let started = std::time::Instant::now();
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/besieged",
            symmetric_group("besieged", &group_key),
        )
        .await;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let id = format!("besieged-{i}");
        let key = edgedps_policies::sas::derive_device_key(&group_key, &id).unwrap();
        let config = server.device(&id, sas(&key));
        let limit = limit.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            register(&config, None).await
        }));
    }
    for task in tasks {
        let outcome = task.await.unwrap().unwrap();
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    }
    eprintln!(
        "1,000 devices assigned in {:?} beside 600 slow clients",
        started.elapsed()
    );
    // Every slow client is closed at the handshake deadline.
    let mut slow = slow;
    slow.extend(drip.await.unwrap());
    tokio::time::sleep(Duration::from_millis(3_500).saturating_sub(started.elapsed())).await;
    let mut buf = [0u8; 8];
    for stream in &mut slow {
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a slow client was not closed at the deadline: {read:?}"
        );
    }
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_does_not_stop_provisioning() {
    let server = Server::start_with(|c| c.limits.handshake_timeout_ms = 3_000).await;
    let mut operator = server.operator().await;
    let port = server.devices_port;
    // 2,000 connections opened as fast as possible: most close at once, 500 stay open
    // (and are closed by the server at the handshake deadline).
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..2_000 {
            if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                if i % 4 == 0 {
                    held.push(stream);
                }
            }
        }
        held
    });
    for outcome in server
        .register_group_devices(&mut operator, "flooded", 50)
        .await
    {
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    }
    let held = flood.await.unwrap();
    assert!(!held.is_empty());
    drop(held);
    // Still serving afterwards.
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_decisions_are_events_without_secrets() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("audited").await;
    let mut watcher = server.operator().await;
    watcher.subscribe("dps/events/attestation/#").await;
    let forged_key = new_key();
    refused(
        register(&server.device("audited", sas(&forged_key)), None).await,
        "forged key",
    );
    register(&server.device("audited", sas(&key)), None)
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some((topic, payload)) = watcher.next_publish("dps/events/attestation/").await {
        assert_eq!(topic, "dps/events/attestation/audited");
        let text = String::from_utf8_lossy(&payload).into_owned();
        for secret in [
            key.as_str(),
            forged_key.as_str(),
            "SharedAccessSignature",
            "sig=",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        events.push(serde_json::from_str::<serde_json::Value>(&text).unwrap());
        if events.len() == 2 {
            break;
        }
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["outcome"], "refused");
    assert!(
        events[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("signature"),
        "{}",
        events[0]
    );
    assert_eq!(events[1]["outcome"], "accepted");
    assert_eq!(events[1]["attestation"], "symmetricKey");
}
