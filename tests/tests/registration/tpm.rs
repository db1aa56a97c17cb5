//! TPM attestation's software side (`edgedps_policies::tpm`) against a real, independent
//! TPM: swtpm driven by the stock tpm2-tools. The key names edgedps computes are the
//! TPM's, and a credential edgedps makes is activated by that TPM only for the storage
//! key it names, only when untouched.

use edgedps_policies::tpm::{self, PublicArea};
use edgedps_tests::tpm::SoftwareTpm;

#[test]
fn a_credential_made_in_software_is_activated_by_the_tpm_it_was_made_for() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let ek_bytes = std::fs::read(soft.path("ek.pub")).unwrap();
    let srk_bytes = std::fs::read(soft.path("srk.pub")).unwrap();
    assert_eq!(ek_bytes.len(), 316, "the EK the SDKs send");
    let ek = PublicArea::parse(&ek_bytes).expect("the TPM's EK reads");
    ek.check_endorsement_key()
        .expect("the TCG default EK is accepted");
    let srk = PublicArea::parse(&srk_bytes).expect("the TPM's SRK reads");
    // Names as the TPM computes them.
    let srk_name = srk.name().unwrap();
    assert_eq!(srk_name, std::fs::read(soft.path("srk.name")).unwrap());
    assert_eq!(tpm::registration_id(&ek_bytes).len(), 52);
    // The enrollment an operator would write for this TPM is accepted.
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    tpm::check_enrollment(
        &tpm::registration_id(&ek_bytes),
        &b64(&ek_bytes),
        Some(&b64(&srk_bytes)),
    )
    .expect("the TPM's own keys enroll");

    let secret = b"0123456789abcdef";
    let credential = tpm::make_credential(&ek, &srk_name, secret, &random).unwrap();
    assert_eq!(
        soft.activate_credential(&credential.id_object, &credential.encrypted_secret),
        Ok(secret.to_vec())
    );

    // Made for another object's name: the TPM refuses (integrity).
    let other = tpm::make_credential(&ek, &ek.name().unwrap(), secret, &random).unwrap();
    let refused = soft
        .activate_credential(&other.id_object, &other.encrypted_secret)
        .unwrap_err();
    assert!(
        refused.contains("integrity") || refused.contains("0x1df") || refused.contains("Esys"),
        "{refused}"
    );
    // A flipped byte of the encrypted credential: refused.
    let mut flipped = credential.id_object.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(soft
        .activate_credential(&flipped, &credential.encrypted_secret)
        .is_err());
    // Another TPM's endorsement key: this TPM cannot open it.
    let stranger = SoftwareTpm::start();
    stranger.make_keys();
    let their_ek = PublicArea::parse(&std::fs::read(stranger.path("ek.pub")).unwrap()).unwrap();
    let theirs = tpm::make_credential(&their_ek, &srk_name, secret, &random).unwrap();
    assert!(soft
        .activate_credential(&theirs.id_object, &theirs.encrypted_secret)
        .is_err());
}

#[test]
fn an_hmac_key_duplicated_in_software_is_imported_by_the_tpm_and_signs_as_it_should() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let srk = PublicArea::parse(&std::fs::read(soft.path("srk.pub")).unwrap()).unwrap();
    let key = [0x5au8; 32];
    let inner = [0x17u8; 16];
    let dup = tpm::duplicate_hmac_key(&srk, &key, &inner, &random).unwrap();
    assert_eq!(
        dup.public.len(),
        50,
        "the identity key's TPM2B_PUBLIC the SDKs read"
    );
    let data = b"0ne00000001%2Fregistrations%2Fdev-1\n1796626393";
    let signed = soft
        .import_and_hmac(
            &dup.public,
            &dup.duplicate,
            &dup.encrypted_seed,
            &inner,
            data,
        )
        .expect("the TPM imports, loads and signs with the key");
    let expected = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), data);
    assert_eq!(signed, expected.as_ref());
    // With another inner key the TPM refuses the import.
    let refused = soft.import_and_hmac(
        &dup.public,
        &dup.duplicate,
        &dup.encrypted_seed,
        &[0u8; 16],
        data,
    );
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn an_authentication_key_is_activated_imported_and_signs_sas_tokens_in_the_tpm() {
    let random = ring::rand::SystemRandom::new();
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let ek = PublicArea::parse(&std::fs::read(soft.path("ek.pub")).unwrap()).unwrap();
    let srk = PublicArea::parse(&std::fs::read(soft.path("srk.pub")).unwrap()).unwrap();
    let key = [0xa5u8; 32];
    let blob = tpm::activation_blob(&ek, &srk, &key, &random).unwrap();
    assert_eq!(blob.len(), 766, "the size both SDKs parse");
    let [credential, secret, duplicate, seed, public, uri] = tpm::activation_parts(&blob).unwrap();
    assert_eq!(
        [
            credential.len(),
            secret.len(),
            duplicate.len(),
            seed.len(),
            public.len(),
            uri.len()
        ],
        [54, 258, 144, 258, 50, 2]
    );
    // As the SDKs do: ActivateCredential gives the inner key, Import + Load the HMAC key.
    let inner = soft
        .activate_credential(credential, secret)
        .expect("activated");
    assert_eq!(inner.len(), 16);
    let sr = "0ne00000001%2Fregistrations%2Fdev-1\n1796626393";
    let signed = soft
        .import_and_hmac(public, duplicate, seed, &inner, sr.as_bytes())
        .expect("imported, loaded, signed");
    let expected = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        sr.as_bytes(),
    );
    assert_eq!(signed, expected.as_ref());
}

mod over_mqtt {
    //! A TPM device end to end over MQTT (PROTOCOL C): our device client on swtpm (driven
    //! by the stock tpm2-tools), against the real listeners and the local hub.

    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine;
    use edgedps_device::provision::register;
    use edgedps_device::tpm::{self as device_tpm, TpmDevice};
    use edgedps_tests::hub::{local_hub_server, HubDevice, LOCAL};
    use edgedps_tests::tpm::SoftwareTpm;
    use edgedps_tests::*;
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet};
    use serde_json::{json, Value};

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A swtpm with its keys, as the device client's TPM.
    fn tpm() -> Arc<SoftwareTpm> {
        let soft = SoftwareTpm::start();
        soft.make_keys();
        Arc::new(soft)
    }

    fn enrollment(tpm: &SoftwareTpm) -> (String, Value) {
        let id = device_tpm::registration_id(tpm);
        let body = json!({"registrationId": id, "attestation": {"type": "tpm",
            "tpm": {"endorsementKey": b64(&tpm.endorsement_key())}}});
        (id, body)
    }

    /// A device session with `password` (no client certificate), subscribed to the
    /// responses; the refusal when the CONNECT is refused.
    async fn session(
        server: &Server,
        id: &str,
        password: &str,
    ) -> Result<(AsyncClient, EventLoop), ConnectReturnCode> {
        let mut options = MqttOptions::new(id, "localhost", server.devices_port);
        let username = format!("{ID_SCOPE}/registrations/{id}/api-version=2019-03-31");
        options.set_credentials(username, password);
        let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
            .expect("client TLS");
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => match ack.code {
                    ConnectReturnCode::Success => break,
                    code => return Err(code),
                },
                Ok(Ok(_)) => {}
                Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => return Err(code),
                other => panic!("no CONNACK: {other:?}"),
            }
        }
        client
            .subscribe(
                edgedps_topics::dps::RESPONSE_FILTER,
                rumqttc::QoS::AtLeastOnce,
            )
            .await
            .expect("subscribe");
        edgedps_device::provision::wait_for(&mut eventloop, "SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await
        .expect("SUBACK");
        Ok((client, eventloop))
    }

    async fn register_body(
        (client, eventloop): &mut (AsyncClient, EventLoop),
        body: Value,
    ) -> (u16, Value) {
        let topic = edgedps_topics::dps::register_topic("1");
        let answer = ask(
            client,
            eventloop,
            &topic,
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        (
            answer.status,
            serde_json::from_slice(&answer.body).expect("JSON"),
        )
    }

    /// A register body carrying `tpm`'s keys.
    fn tpm_body(id: &str, tpm: &SoftwareTpm) -> Value {
        json!({"registrationId": id, "tpm": device_tpm::register_member(tpm)})
    }

    fn dps_token(tpm: &SoftwareTpm, id: &str, expiry: u64) -> String {
        let sr = edgedps_policies::sas::registration_resource(ID_SCOPE, id);
        let token = edgedps_policies::sas::token_signed_by(&sr, expiry, |d| tpm.hmac(d)).unwrap();
        format!("{token}&skn=registration")
    }

    fn now() -> u64 {
        edgedps_responder::unix_now()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tpm_device_provisions_over_mqtt_and_signs_in_at_the_local_hub_with_its_hub_key() {
        let server = local_hub_server(false, |_| {}).await;
        let mut operator = Operator::connect(server.local_port).await;
        let soft = tpm();
        let (id, body) = enrollment(&soft);
        operator.put(&format!("dps/enrollments/{id}"), body).await;
        operator
            .subscribe(&format!("dps/events/registrations/{id}"))
            .await;
        let device: Arc<dyn TpmDevice> = soft.clone();
        let config = server.device(&id, edgedps_device::DeviceAuth::Tpm(device.clone()));
        let outcome = register(&config, None).await.expect("registered");
        assert_eq!(outcome.status, 200, "{}", outcome.body);
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        assert_eq!(outcome.assigned_hub(), Some(LOCAL));
        let state = &outcome.body["registrationState"];
        assert_eq!(state["deviceId"], id.as_str());
        let (_, challenged) = operator
            .next_publish("dps/events/registrations/")
            .await
            .expect("an event");
        let challenged: Value = serde_json::from_slice(&challenged).unwrap();
        assert_eq!(challenged["outcome"], "challenged", "{challenged}");

        // The hub key the answer sealed to this TPM signs its hub token.
        let sr = edgedps_policies::sas::hub_resource(LOCAL, &id);
        let token = device_tpm::token(&device, sr, now() + 600, None)
            .await
            .unwrap();
        let mut hub = HubDevice::connect_token(server.devices_port, &id, &token, false).await;
        hub.subscribe("$iothub/twin/res/#").await;
        let (status, _, twin) = hub.twin("GET", b"").await;
        assert_eq!(status, 200, "{twin}");

        // The key is never published: not in the record, nor in any event.
        let mut watcher = Operator::connect(server.local_port).await;
        watcher.subscribe(&format!("dps/registrations/{id}")).await;
        let (_, record) = watcher
            .next_publish("dps/registrations/")
            .await
            .expect("the record");
        let record = String::from_utf8_lossy(&record).into_owned();
        assert!(record.contains("assigned"), "{record}");
        assert!(!record.contains("authenticationKey"), "{record}");
        assert!(!record.contains(
            &outcome.body["registrationState"]["tpm"]["authenticationKey"]
                .as_str()
                .unwrap()[..20]
        ));

        // Registering again: challenged again, assigned, the same hub key (its token
        // still opens the hub).
        let again = register(&config, None).await.expect("registered again");
        assert_eq!(again.status_word(), Some("assigned"), "{}", again.body);
        drop(hub);
        HubDevice::connect_token(server.devices_port, &id, &token, false).await;

        // Disabled: the hub session is closed and the device learns `disabled`.
        let mut hub = HubDevice::connect_token(server.devices_port, &id, &token, false).await;
        let (id2, mut body) = enrollment(&soft);
        assert_eq!(id2, id);
        body["provisioningStatus"] = json!("disabled");
        operator.put(&format!("dps/enrollments/{id}"), body).await;
        assert!(hub.closed().await, "the hub session is cut off");
        let refused = connack_refusal(
            server.devices_port,
            &id,
            &edgedps_tests::hub::hub_username(LOCAL, &id),
            &token,
        )
        .await;
        assert!(
            refused.is_some(),
            "a disabled device's hub CONNECT is refused"
        );
        let disabled = register(&config, None).await.expect("answered");
        assert_eq!(
            disabled.status_word(),
            Some("disabled"),
            "{}",
            disabled.body
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tpm_refusals_another_tpm_an_old_challenge_an_expired_token_a_bad_body() {
        let server = local_hub_server(false, |_| {}).await;
        let mut operator = Operator::connect(server.local_port).await;
        let soft = tpm();
        let (id, body) = enrollment(&soft);
        operator.put(&format!("dps/enrollments/{id}"), body).await;

        // No `tpm` in the register, or a `tpm` that is not base64: 400004.
        let mut open = session(&server, &id, "")
            .await
            .expect("asks for a challenge");
        let (status, answer) = register_body(&mut open, json!({"registrationId": id})).await;
        assert_eq!(
            (status, answer["errorCode"].as_u64()),
            (400, Some(400004)),
            "{answer}"
        );
        let (status, answer) = register_body(
            &mut open,
            json!({"registrationId": id, "tpm": {"endorsementKey": "%%", "storageRootKey": "%%"}}),
        )
        .await;
        assert_eq!(
            (status, answer["errorCode"].as_u64()),
            (400, Some(400004)),
            "{answer}"
        );

        // Another TPM's endorsement key for this registration id: refused, no challenge.
        let stranger = tpm();
        let (status, answer) = register_body(&mut open, tpm_body(&id, &stranger)).await;
        assert_eq!(
            (status, answer["errorCode"].as_u64()),
            (401, Some(401002)),
            "{answer}"
        );
        assert!(answer.get("authenticationKey").is_none(), "{answer}");

        // The stranger sends the enrolled EK with its own SRK: it gets a challenge, but
        // its TPM cannot take it in.
        let mut spoofed = tpm_body(&id, &stranger);
        spoofed["tpm"]["endorsementKey"] = json!(b64(&soft.endorsement_key()));
        let (status, challenge) = register_body(&mut open, spoofed).await;
        assert_eq!(status, 401, "{challenge}");
        assert!(
            challenge.get("status").is_none(),
            "a challenge has no status: {challenge}"
        );
        assert_eq!(challenge["keyName"], "registration");
        let blob = base64::engine::general_purpose::STANDARD
            .decode(challenge["authenticationKey"].as_str().unwrap())
            .unwrap();
        assert!(
            stranger.activate(&blob).is_err(),
            "another TPM cannot activate it"
        );

        // The right TPM: challenge 1 activated, then challenge 2 sent. A token signed
        // with the key of challenge 1 is refused; with the key of challenge 2 accepted.
        let (status, first) = register_body(&mut open, tpm_body(&id, &soft)).await;
        assert_eq!(status, 401, "{first}");
        let blob = |c: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(c["authenticationKey"].as_str().unwrap())
                .unwrap()
        };
        soft.activate(&blob(&first)).expect("activated");
        let old_token = dps_token(&soft, &id, now() + 600);
        let (status, second) = register_body(&mut open, tpm_body(&id, &soft)).await;
        assert_eq!(status, 401, "{second}");
        assert_eq!(
            session(&server, &id, &old_token).await.err(),
            Some(ConnectReturnCode::NotAuthorized),
            "a token of an earlier challenge"
        );
        soft.activate(&blob(&second)).expect("activated");
        // Past its expiry and the 5 minutes of clock skew allowed.
        let expired = dps_token(&soft, &id, now() - 400);
        assert_eq!(
            session(&server, &id, &expired).await.err(),
            Some(ConnectReturnCode::NotAuthorized),
            "an expired token"
        );
        // An unproven session may not poll.
        let answer = ask(
            &open.0,
            &mut open.1,
            &edgedps_topics::dps::poll_topic("9", "4.abc"),
            Vec::new(),
        )
        .await;
        assert_eq!(answer.status, 401);
        drop(open);

        let token = dps_token(&soft, &id, now() + 600);
        let mut proven = session(&server, &id, &token).await.expect("the right key");
        // The challenge's key is not a hub key.
        let hub_refused = connack_refusal(
            server.devices_port,
            &id,
            &edgedps_tests::hub::hub_username(LOCAL, &id),
            &token,
        )
        .await;
        assert!(hub_refused.is_some(), "a registration token at the hub");
        // Before the device has a hub key, no hub token is accepted.
        let sr = edgedps_policies::sas::hub_resource(LOCAL, &id);
        let hub_token =
            edgedps_policies::sas::token_signed_by(&sr, now() + 600, |d| soft.hmac(d)).unwrap();
        let refused = connack_refusal(
            server.devices_port,
            &id,
            &edgedps_tests::hub::hub_username(LOCAL, &id),
            &hub_token,
        )
        .await;
        assert!(refused.is_some(), "no hub key yet");
        let (status, assigned) = register_body(&mut proven, tpm_body(&id, &soft)).await;
        assert_eq!(status, 200, "{assigned}");
        assert!(assigned["registrationState"]["tpm"]["authenticationKey"].is_string());
        // The hub CONNECT with an empty password is refused.
        let empty = connack_refusal(
            server.devices_port,
            &id,
            &edgedps_tests::hub::hub_username(LOCAL, &id),
            "",
        )
        .await;
        assert!(empty.is_some(), "no token at the hub");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tpm_enrollment_must_name_its_endorsement_key() {
        let server = Server::start().await;
        let mut operator = Operator::connect(server.local_port).await;
        let soft = tpm();
        let (id, body) = enrollment(&soft);
        // Under another registration id; an EK that is not one; a group.
        let mut other = body.clone();
        other["registrationId"] = json!("dev-1");
        let result = operator
            .write(
                "dps/enrollments/dev-1",
                &serde_json::to_vec(&other).unwrap(),
            )
            .await;
        assert_eq!(result["ok"], false, "{result}");
        assert!(
            result["message"].as_str().unwrap().contains(&id),
            "{result}"
        );
        let mut short = body.clone();
        short["attestation"]["tpm"]["endorsementKey"] = json!(b64(&[0, 4, 1, 2, 3, 4]));
        let result = operator
            .write(
                &format!("dps/enrollments/{id}"),
                &serde_json::to_vec(&short).unwrap(),
            )
            .await;
        assert_eq!(result["ok"], false, "{result}");
        let group = json!({"enrollmentGroupId": "g", "attestation": body["attestation"]});
        let result = operator
            .write(
                "dps/enrollment-groups/g",
                &serde_json::to_vec(&group).unwrap(),
            )
            .await;
        assert_eq!(result["ok"], false, "{result}");
        // A device of a symmetric-key enrollment that sends no token is refused at CONNECT.
        operator.enroll("plain-1").await;
        assert_eq!(
            session(&server, "plain-1", "").await.err(),
            Some(ConnectReturnCode::NotAuthorized)
        );
    }
}

mod esapi {
    //! Our device client on a TPM through the ESAPI (tss-esapi), and the factory
    //! read-out, on swtpm: the keys persisted where the Azure clients look, the
    //! registration over MQTT, the hub key persisted in the TPM.

    use std::sync::Arc;

    use edgedps_device::provision::register;
    use edgedps_device::tpm::esapi::EsapiTpm;
    use edgedps_device::tpm::{self as device_tpm, TpmDevice};
    use edgedps_tests::hub::{local_hub_server, HubDevice, LOCAL};
    use edgedps_tests::tpm::SoftwareTpm;
    use edgedps_tests::*;
    use serde_json::Value;

    fn tcti(soft: &SoftwareTpm) -> String {
        format!("swtpm:host=127.0.0.1,port={}", soft.port)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_factory_read_out_enrolls_a_tpm_and_our_client_provisions_it_over_mqtt() {
        let server = local_hub_server(false, |_| {}).await;
        let soft = SoftwareTpm::start();
        let out = tempfile::tempdir().unwrap();
        let operator = format!("127.0.0.1:{}", server.local_port);
        let read_out = || {
            std::process::Command::new(edgedps_binary())
                .args(["manufacture", "tpm", "--tcti", &tcti(&soft), "--enroll"])
                .args([
                    "--operator",
                    &operator,
                    "--initial-twin",
                    r#"{"tags": {"line": "a"}}"#,
                ])
                .arg("--out")
                .arg(out.path())
                .env("TSS2_LOG", "all+none")
                .output()
                .expect("edgedps manufacture tpm runs")
        };
        let output = read_out();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let id = stdout.split('\t').next().unwrap().trim().to_owned();
        assert_eq!(id.len(), 52, "{stdout}");
        let enrollment: Value =
            serde_json::from_slice(&std::fs::read(out.path().join(format!("{id}.json"))).unwrap())
                .unwrap();
        assert_eq!(enrollment["attestation"]["type"], "tpm");
        let manifest = std::fs::read_to_string(out.path().join("manifest.csv")).unwrap();
        assert!(manifest.contains(&id), "{manifest}");
        // Run again: the same keys (persisted), the same enrollment, kept.
        let again = read_out();
        assert!(
            again.status.success(),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);

        // Our client on the same TPM: the id is the enrolled one; it provisions.
        let tpm: Arc<dyn TpmDevice> =
            Arc::new(EsapiTpm::open(&tcti(&soft)).expect("the TPM opens"));
        assert_eq!(device_tpm::registration_id(tpm.as_ref()), id);
        let config = server.device(&id, DeviceAuth::Tpm(tpm.clone()));
        let outcome = register(&config, None).await.expect("registered");
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        assert_eq!(
            outcome.body["registrationState"]["initialTwin"]["tags"]["line"],
            "a"
        );

        // The hub key lives in the TPM (0x81000100): a client opened anew signs with it.
        drop(tpm);
        let reopened: Arc<dyn TpmDevice> = Arc::new(EsapiTpm::open(&tcti(&soft)).unwrap());
        let token = device_tpm::token(
            &reopened,
            edgedps_policies::sas::hub_resource(LOCAL, &id),
            edgedps_responder::unix_now() + 600,
            None,
        )
        .await
        .unwrap();
        let mut hub = HubDevice::connect_token(server.devices_port, &id, &token, false).await;
        hub.subscribe("$iothub/twin/res/#").await;
        let (status, _, twin) = hub.twin("GET", b"").await;
        assert_eq!(status, 200, "{twin}");
    }
}
