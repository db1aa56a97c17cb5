//! Certificates issued at registration (PROTOCOL F): a device sends a certificate
//! signing request with its register; an enrollment with a
//! `clientCertificateIssuancePolicy` gets it signed by the gateway's CA, in both
//! response modes; every bad request is a 400 (400004) with the reason and changes
//! nothing; the chain verifies with `openssl verify`. Keys as operators make them: every
//! PEM key file edgedps reads (certificate authorities, the device and operator
//! listeners, the signing CA `edgedps manufacture` imports) in PKCS#8, SEC1 and PKCS#1,
//! made by the stock `openssl` tool.

use std::path::PathBuf;

use base64::Engine;
use edgedps_device::credentials::{chain_pem, issued_chain, CertificateRequest};
use edgedps_device::provision::register;
use edgedps_tests::*;
use serde_json::{json, Value};

/// A server whose `gateway` authority is generated in its data directory.
async fn issuing_server(accept_then_poll: bool) -> Server {
    Server::start_with(|config| {
        config.always_accept_then_poll = accept_then_poll;
        config.certificate_authorities = vec![edgedps::config::CertificateAuthorityConfig {
            name: "gateway".into(),
            cert: None,
            key: None,
            validity_days: 30,
        }];
    })
    .await
}

/// Enrolls `id` (symmetric key) with an issuance policy naming `authority`, if any.
async fn enroll(operator: &mut Operator, id: &str, authority: Option<&str>) -> String {
    let key = new_key();
    let mut enrollment = symmetric_enrollment(id, &key);
    if let Some(name) = authority {
        enrollment["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": name});
    }
    operator
        .put(&format!("dps/enrollments/{id}"), enrollment)
        .await;
    key
}

/// `openssl verify` accepts `leaf` (DER) as a client certificate of the CA in `ca_file`.
fn openssl_verifies(ca_file: &std::path::Path, leaf: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let leaf_file = dir.path().join("leaf.pem");
    std::fs::write(&leaf_file, chain_pem(&[leaf.to_vec()])).unwrap();
    let (ca, leaf) = (ca_file.to_string_lossy(), leaf_file.to_string_lossy());
    openssl(["verify", "-purpose", "sslclient", "-CAfile", &ca, &leaf]);
}

/// Registers `id` with `csr`: the status and the answer.
async fn register_with(server: &Server, id: &str, key: &str, csr: &str) -> (u16, Value) {
    let mut config = server.device(id, sas(key));
    config.csr = Some(csr.to_owned());
    let outcome = register(&config, None).await.expect("an answer");
    (outcome.status, outcome.body)
}

#[tokio::test]
async fn a_device_gets_a_certificate_chained_to_the_gateway_ca_in_both_modes() {
    for accept_then_poll in [false, true] {
        let server = issuing_server(accept_then_poll).await;
        let mut operator = server.operator().await;
        let mut events = server.operator().await;
        events.subscribe("dps/events/registrations/#").await;
        let key = enroll(&mut operator, "issued-1", Some("gateway")).await;
        let request = CertificateRequest::new("issued-1").unwrap();
        let (status, answer) = register_with(&server, "issued-1", &key, &request.csr).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "assigned");
        let chain = issued_chain(&answer).expect("issuedCertificateChain");
        assert_eq!(chain.len(), 2, "leaf and the gateway CA");
        // Plain base64 strings, no escapes.
        let raw =
            serde_json::to_string(&answer["registrationState"]["issuedCertificateChain"]).unwrap();
        assert!(!raw.contains("\\/"), "{raw}");

        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let cn = leaf.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "issued-1");
        let ca_file = server.dir.path().join("data/ca/gateway/ca.pem");
        assert_eq!(
            chain[1],
            edgedps_policies::x509::pem_der(&std::fs::read_to_string(&ca_file).unwrap()).unwrap()
        );
        // The stock tool agrees: a client certificate of the gateway CA.
        openssl_verifies(&ca_file, &chain[0]);

        // Recorded: on the registration record (without the chain) and in the event.
        let thumbprint = edgedps_policies::x509::thumbprint(&chain[0]);
        let record = server
            .running
            .responder
            .registration_record("issued-1")
            .expect("store")
            .expect("record");
        assert_eq!(record.issued_certificates.len(), 1);
        assert_eq!(record.issued_certificates[0].sha256_thumbprint, thumbprint);
        assert_eq!(
            record.issued_certificates[0].certificate_authority,
            "gateway"
        );
        assert!(record.issued_certificate_chain.is_none());
        let (_, event) = events
            .next_publish("dps/events/registrations/issued-1")
            .await
            .expect("event");
        let event: Value = serde_json::from_slice(&event).unwrap();
        assert_eq!(
            event["issuedCertificate"]["sha256Thumbprint"], thumbprint,
            "{event}"
        );

        // Registering again with a new request: a second certificate, both recorded.
        let again = CertificateRequest::new("issued-1").unwrap();
        let (status, answer) = register_with(&server, "issued-1", &key, &again.csr).await;
        assert_eq!(status, 200, "{answer}");
        let second = issued_chain(&answer).expect("chain");
        assert_ne!(second[0], chain[0]);
        let record = server
            .running
            .responder
            .registration_record("issued-1")
            .unwrap()
            .unwrap();
        assert_eq!(record.issued_certificates.len(), 2);
    }
}

#[tokio::test]
async fn bad_requests_are_refused_with_400004_and_nothing_is_recorded() {
    let server = issuing_server(false).await;
    let mut operator = server.operator().await;
    let key = enroll(&mut operator, "refused-1", Some("gateway")).await;
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let good = CertificateRequest::new("refused-1").unwrap();
    let mut tampered = base64::engine::general_purpose::STANDARD
        .decode(&good.csr)
        .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let ed25519 = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "refused-1");
        b64(params.serialize_request(&key).unwrap().der())
    };
    let certificate = b64(&edgedps_policies::x509::pem_der(&pki().server_ca.pem).unwrap());
    let cases = [
        ("not base64", "%%%".to_owned(), "not base64"),
        ("not DER", b64(b"hello"), "not a DER"),
        ("a certificate, not a request", certificate, "not a DER"),
        (
            "a signature that does not verify",
            b64(&tampered),
            "signature",
        ),
        ("a weak key", ed25519, "P-256"),
        (
            "another device's name",
            CertificateRequest::new("someone-else").unwrap().csr,
            "registration id",
        ),
    ];
    for (case, csr, says) in cases {
        let (status, answer) = register_with(&server, "refused-1", &key, &csr).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert_eq!(answer["errorCode"], 400004, "{case}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{case}: {message}");
    }
    assert!(
        server
            .running
            .responder
            .registration_record("refused-1")
            .unwrap()
            .is_none(),
        "no registration was recorded"
    );

    // An enrollment without an issuance policy: the request is refused, not ignored.
    let plain_key = enroll(&mut operator, "no-policy", None).await;
    let request = CertificateRequest::new("no-policy").unwrap();
    let (status, answer) = register_with(&server, "no-policy", &plain_key, &request.csr).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["message"]
        .as_str()
        .unwrap_or_default()
        .contains("clientCertificateIssuancePolicy"));

    // A policy naming an authority the gateway does not have is refused at the write.
    let mut enrollment = symmetric_enrollment("unknown-ca", &new_key());
    enrollment["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": "other"});
    let result = operator
        .write(
            "dps/enrollments/unknown-ca",
            &serde_json::to_vec(&enrollment).unwrap(),
        )
        .await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["errorCode"], 400);
    assert!(result["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`other`"));
}

/// A server with the `gateway` authority and the local hub (`localhost`) only.
async fn issuing_hub_server() -> Server {
    Server::start_with(|config| {
        config.hubs.clear();
        config.local_hub = Some(edgedps::config::LocalHubConfig::named("localhost"));
        config.certificate_authorities = vec![edgedps::config::CertificateAuthorityConfig {
            name: "gateway".into(),
            cert: None,
            key: None,
            validity_days: 30,
        }];
    })
    .await
}

/// The device credential of an issued chain and its key.
fn issued_auth(chain: &[Vec<u8>], request: &CertificateRequest) -> DeviceAuth {
    DeviceAuth::X509 {
        chain_pem: chain_pem(chain).into_bytes(),
        key_pem: request.key_pem.clone().into_bytes(),
    }
}

#[tokio::test]
async fn an_issued_certificate_is_a_credential_on_both_connects_until_retired() {
    use edgedps_tests::hub::{hub_connect_with_certificate, LOCAL};
    let server = issuing_hub_server().await;
    let mut operator = server.operator().await;
    let key = enroll(&mut operator, "cred-1", Some("gateway")).await;
    let other_key = enroll(&mut operator, "cred-2", Some("gateway")).await;
    let request = CertificateRequest::new("cred-1").unwrap();
    let (status, answer) = register_with(&server, "cred-1", &key, &request.csr).await;
    assert_eq!(status, 200, "{answer}");
    let chain = issued_chain(&answer).unwrap();
    let other_request = CertificateRequest::new("cred-2").unwrap();
    let (_, other_answer) = register_with(&server, "cred-2", &other_key, &other_request.csr).await;
    let other_chain = issued_chain(&other_answer).unwrap();

    // The DPS CONNECT: the device registers again with its issued certificate.
    let outcome = register(
        &server.device("cred-1", issued_auth(&chain, &request)),
        None,
    )
    .await
    .expect("an answer");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(outcome.body["registrationState"]["assignedHub"], LOCAL);
    // The hub CONNECT.
    assert_eq!(
        hub_connect_with_certificate(&server, "cred-1", issued_auth(&chain, &request)).await,
        None
    );
    // Another device's issued certificate is not this device's credential.
    assert_eq!(
        hub_connect_with_certificate(&server, "cred-1", issued_auth(&other_chain, &other_request))
            .await,
        Some(rumqttc::ConnectReturnCode::NotAuthorized)
    );

    // Retired: its certificates are revoked.
    let result = operator.retire("cred-1", b"{}").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["revokedCertificates"], 1, "{result}");
    assert_eq!(
        hub_connect_with_certificate(&server, "cred-1", issued_auth(&chain, &request)).await,
        Some(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    let refused = register(
        &server.device("cred-1", issued_auth(&chain, &request)),
        None,
    )
    .await;
    assert!(
        refused.as_ref().map_or(true, |o| o.status != 200),
        "{refused:?}"
    );
    // The other device's certificate still works.
    assert_eq!(
        hub_connect_with_certificate(&server, "cred-2", issued_auth(&other_chain, &other_request))
            .await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_works_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let config = "[[certificate_authorities]]\nname = \"gateway\"\n";
    let mut process = Process::start(dir.path(), devices_port, local_port, config).await;
    let mut operator = Operator::connect(local_port).await;
    let key = enroll(&mut operator, "restarted-1", Some("gateway")).await;
    let request = CertificateRequest::new("restarted-1").unwrap();
    let mut device = device_config(devices_port, "restarted-1", sas(&key));
    device.csr = Some(request.csr.clone());
    let outcome = register(&device, None).await.expect("an answer");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    let chain = issued_chain(&outcome.body).unwrap();
    drop(operator);

    process.kill();
    let _process = Process::start(dir.path(), devices_port, local_port, config).await;
    let again = register(
        &device_config(devices_port, "restarted-1", issued_auth(&chain, &request)),
        None,
    )
    .await
    .expect("an answer");
    assert_eq!(again.status, 200, "{}", again.body);
}

/// A renewal on `device`'s hub session: each answer's status and JSON body.
async fn renew(
    device: &mut edgedps_tests::hub::HubDevice,
    rid: &str,
    body: Value,
) -> Vec<(u16, Value)> {
    device
        .send(
            &format!("$iothub/credentials/POST/issueCertificate/?$rid={rid}"),
            &serde_json::to_vec(&body).unwrap(),
        )
        .await;
    let mut answers = Vec::new();
    while let Some(answer) = device.next_publish("$iothub/credentials/res/").await {
        let rest = answer
            .topic
            .strip_prefix("$iothub/credentials/res/")
            .unwrap();
        let (status, query) = rest.split_once("/?").unwrap();
        assert_eq!(query, format!("$rid={rid}"), "{}", answer.topic);
        let status: u16 = status.parse().unwrap();
        answers.push((status, serde_json::from_slice(&answer.payload).unwrap()));
        if status != 202 {
            break;
        }
    }
    answers
}

/// The chain of a renewal's `200`, DER.
fn renewed_chain(answers: &[(u16, Value)]) -> Vec<Vec<u8>> {
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].0, 202);
    assert!(
        answers[0].1["correlationId"].is_string() && answers[0].1["operationExpires"].is_string()
    );
    assert_eq!(answers[1].0, 200);
    answers[1]
        .1
        .as_array()
        .expect("a bare array")
        .iter()
        .map(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.as_str().unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_device_renews_its_certificate_over_its_hub_connection_and_replace_is_honoured() {
    use edgedps_tests::hub::{hub_connect_with_certificate, HubDevice};
    let server = issuing_hub_server().await;
    let mut operator = server.operator().await;
    let key = enroll(&mut operator, "renew-1", Some("gateway")).await;
    let first = CertificateRequest::new("renew-1").unwrap();
    let (status, answer) = register_with(&server, "renew-1", &key, &first.csr).await;
    assert_eq!(status, 200, "{answer}");
    let first_chain = issued_chain(&answer).unwrap();
    let works = |chain: Vec<Vec<u8>>, request: &CertificateRequest| {
        let auth = issued_auth(&chain, request);
        let server = &server;
        async move {
            hub_connect_with_certificate(server, "renew-1", auth)
                .await
                .is_none()
        }
    };

    let mut device = HubDevice::connect(&server, "renew-1", &key).await;
    device.subscribe("$iothub/credentials/res/#").await;
    // r1: a new certificate; the first one still works.
    let second = CertificateRequest::new("renew-1").unwrap();
    let answers = renew(
        &mut device,
        "r1",
        json!({"id": "renew-1", "csr": second.csr}),
    )
    .await;
    let second_chain = renewed_chain(&answers);
    assert_eq!(second_chain.len(), 2);
    assert!(
        works(second_chain.clone(), &second).await,
        "the renewed certificate"
    );
    assert!(
        works(first_chain.clone(), &first).await,
        "no replace: the first stays"
    );

    // r2 replaces r1's certificate: once the new one is used.
    let third = CertificateRequest::new("renew-1").unwrap();
    let answers = renew(
        &mut device,
        "r2",
        json!({"id": "renew-1", "csr": third.csr, "replace": "r1"}),
    )
    .await;
    let third_chain = renewed_chain(&answers);
    assert!(
        works(second_chain.clone(), &second).await,
        "not replaced before use"
    );
    assert!(
        works(third_chain.clone(), &third).await,
        "the new one, used"
    );
    assert!(
        !works(second_chain.clone(), &second).await,
        "replaced once the new one was used"
    );

    // r3 replaces every earlier certificate at once.
    let fourth = CertificateRequest::new("renew-1").unwrap();
    let answers = renew(
        &mut device,
        "r3",
        json!({"id": "renew-1", "csr": fourth.csr, "replace": "*"}),
    )
    .await;
    let fourth_chain = renewed_chain(&answers);
    assert!(!works(first_chain, &first).await, "`*`: at once");
    assert!(!works(third_chain, &third).await, "`*`: at once");
    assert!(works(fourth_chain, &fourth).await);

    // Refusals: another device's id (403), a bad request (400).
    let other = CertificateRequest::new("someone").unwrap();
    let answers = renew(
        &mut device,
        "r4",
        json!({"id": "someone", "csr": other.csr}),
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].0, 403, "{answers:?}");
    assert_eq!(answers[0].1["info"]["credentialError"], "DeviceIdMismatch");
    assert_eq!(answers[0].1["info"]["requestId"], "r4");
    let answers = renew(&mut device, "r5", json!({"id": "renew-1", "csr": "AAAA"})).await;
    assert_eq!(answers[0].0, 400, "{answers:?}");
    assert_eq!(answers[0].1["errorCode"], 400004);
    let answers = renew(&mut device, "r6", json!({"csr": "AAAA"})).await;
    assert_eq!(answers[0].0, 400, "{answers:?}");
    let record = server
        .running
        .responder
        .registration_record("renew-1")
        .unwrap()
        .unwrap();
    assert_eq!(
        record.issued_certificates.len(),
        4,
        "refusals issue nothing"
    );
}

#[tokio::test]
async fn our_device_client_provisions_from_its_bundle_keeps_its_certificate_and_renews_it() {
    use edgedps_device::bundle::{provision_with_certificate, Bundle};
    use edgedps_device::manufacture::batch::{run, BatchArgs, BatchAttestation};
    use edgedps_tests::hub::{hub_connect_with_certificate, LOCAL};
    let server = issuing_hub_server().await;
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust.pem");
    std::fs::write(&trust, &pki().server_ca.pem).unwrap();
    let group_key_file = dir.path().join("group.key");
    std::fs::write(&group_key_file, new_key()).unwrap();
    // A batch of two, enrolled with an issuance policy (the manufacturing tool, as a
    // library).
    let args = BatchArgs {
        count: 2,
        id_prefix: "agent-".into(),
        out: dir.path().join("batch"),
        attestation: BatchAttestation::SymmetricKey,
        ca: None,
        group_key_file: Some(group_key_file),
        id_scope: ID_SCOPE.into(),
        host: LOCAL.into(),
        port: server.devices_port,
        trust,
        years: 10,
        resume: false,
        enroll: true,
        group_id: None,
        issuance_policy: Some("gateway".into()),
        operator: ([127, 0, 0, 1], server.local_port).into(),
    };
    let manifest = run(&args).await.expect("batch made and enrolled");
    assert_eq!(manifest.len(), 2);

    let bundle = Bundle::open(&dir.path().join("batch/agent-00001")).unwrap();
    assert!(bundle.operational_auth().unwrap().is_none());
    let outcome = provision_with_certificate(&bundle)
        .await
        .expect("provisioned");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    let issued = bundle.operational_auth().unwrap().expect("kept");
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(dir.path().join("batch/agent-00001/operational.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // It connects to its hub with the certificate, and renews over that connection.
    let trust_pem = bundle.trust().unwrap();
    let mut hub = edgedps_device::hub::connect(
        LOCAL,
        server.devices_port,
        "agent-00001",
        &issued,
        &trust_pem,
    )
    .await
    .expect("hub CONNECT with the issued certificate");
    let leaf = match &issued {
        DeviceAuth::X509 { chain_pem, .. } => {
            edgedps_policies::x509::pem_to_der(std::str::from_utf8(chain_pem).unwrap()).unwrap()
        }
        _ => unreachable!("an issued certificate"),
    };
    assert!(!edgedps_device::hub::due_for_renewal(&leaf, 0.3), "fresh");
    assert!(
        edgedps_device::hub::due_for_renewal(&leaf, 1.1),
        "more than its lifetime"
    );
    let renewed = hub.renew(Some("*")).await.expect("renewed");
    bundle
        .store_operational(&renewed.chain, &renewed.key_pem)
        .unwrap();
    let now_issued = bundle.operational_auth().unwrap().unwrap();
    assert_eq!(
        hub_connect_with_certificate(&server, "agent-00001", now_issued).await,
        None,
        "the renewed certificate"
    );
    assert_eq!(
        hub_connect_with_certificate(&server, "agent-00001", issued).await,
        Some(rumqttc::ConnectReturnCode::NotAuthorized),
        "replaced with `*`"
    );
}

/// `cert` and `key` PEM written into `dir` as `{name}.pem` and `{name}.key`.
fn write_pair(dir: &std::path::Path, name: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn certificate_authorities_with_keys_in_every_form_issue_certificates() {
    let files = tempfile::tempdir().unwrap();
    let mut authorities = Vec::new();
    let mut ca_files = Vec::new();
    for (name, form) in [
        ("pkcs8", KeyForm::Pkcs8),
        ("sec1", KeyForm::Sec1),
        ("pkcs1", KeyForm::Pkcs1),
    ] {
        let (cert, key) = form.openssl_ca(&format!("edgedps test {name} CA"));
        let (cert_path, key_path) = write_pair(files.path(), name, &cert, &key);
        ca_files.push((name, cert_path.clone()));
        authorities.push(edgedps::config::CertificateAuthorityConfig {
            name: name.into(),
            cert: Some(cert_path),
            key: Some(key_path),
            validity_days: 30,
        });
    }
    let server = Server::start_with(|config| config.certificate_authorities = authorities).await;
    let mut operator = server.operator().await;
    for (name, ca_file) in &ca_files {
        let id = format!("issued-by-{name}");
        let key = enroll(&mut operator, &id, Some(name)).await;
        let request = CertificateRequest::new(&id).unwrap();
        let (status, answer) = register_with(&server, &id, &key, &request.csr).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let chain = issued_chain(&answer).expect("issuedCertificateChain");
        let ca_pem = std::fs::read_to_string(ca_file).unwrap();
        assert_eq!(chain[1], edgedps_policies::x509::pem_der(&ca_pem).unwrap());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        // Signed with the CA's own kind of key.
        let signature = leaf.signature_algorithm.algorithm.to_id_string();
        let expected = match *name {
            "pkcs1" => "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
            _ => "1.2.840.10045.4.3.2",         // ecdsa-with-SHA256
        };
        assert_eq!(signature, expected, "{name}");
        openssl_verifies(ca_file, &chain[0]);
    }
}

#[tokio::test]
async fn a_key_edgedps_cannot_read_stops_the_start_naming_the_file_and_the_forms() {
    let files = tempfile::tempdir().unwrap();
    let (cert, _) = KeyForm::Sec1.openssl_ca("edgedps test CA");
    // An encrypted PKCS#8 key, and a key of another CA.
    let encrypted = files.path().join("encrypted.key");
    let out = encrypted.to_string_lossy();
    openssl([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-aes256",
        "-pass",
        "pass:secret",
        "-out",
        &out,
    ]);
    let (_, other_key) = KeyForm::Pkcs1.openssl_ca("another CA");
    let (cert_path, other_path) = write_pair(files.path(), "ca", &cert, &other_key);
    for (key, expected) in [
        (
            &encrypted,
            "no private key in a form edgedps reads (PKCS#8 (BEGIN PRIVATE KEY), SEC1 (BEGIN EC \
             PRIVATE KEY) or PKCS#1 (BEGIN RSA PRIVATE KEY)); the file holds: ENCRYPTED PRIVATE KEY",
        ),
        (&other_path, "the key does not belong to the certificate"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.certificate_authorities = vec![edgedps::config::CertificateAuthorityConfig {
            name: "factory".into(),
            cert: Some(cert_path.clone()),
            key: Some(key.clone()),
            validity_days: 30,
        }];
        let refused = match edgedps::start(config).await {
            Ok(_) => panic!("started with {}", key.display()),
            Err(e) => e.to_string(),
        };
        assert!(refused.contains(expected), "{refused}");
        assert!(refused.contains(&key.display().to_string()), "{refused}");
    }
    // A listener's key too.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    if let Some(devices) = config.listeners.devices.as_mut() {
        devices.tls_key = Some(encrypted.clone());
    }
    let refused = match edgedps::start(config).await {
        Ok(_) => panic!("started with an encrypted listener key"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("ENCRYPTED PRIVATE KEY"), "{refused}");
    assert!(
        refused.contains(&encrypted.display().to_string()),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_keys_in_every_form_serve_devices_and_operators() {
    use edgedps::config::{OperatorConfig, OperatorListener, OperatorRole};
    let operator_ca = Ca::root("edgedps test operator CA");
    for form in KeyForm::ALL {
        let files = tempfile::tempdir().unwrap();
        // The server's key as openssl wrote it; its certificate from the test CA.
        let server_key = form.openssl_key();
        let signing = edgedps_policies::keys::key_pair(server_key.as_bytes()).expect("readable");
        let chain = pki().server_ca.server_chain(&signing);
        let (cert_path, key_path) = write_pair(files.path(), "server", &chain, &server_key);
        let client_ca = files.path().join("operator-ca.pem");
        std::fs::write(&client_ca, &operator_ca.pem).unwrap();
        let server = Server::start_with(|config| {
            if let Some(devices) = config.listeners.devices.as_mut() {
                devices.tls_cert = Some(cert_path.clone());
                devices.tls_key = Some(key_path.clone());
            }
            config.listeners.operators = Some(OperatorListener {
                bind: "127.0.0.1:0".parse().unwrap(),
                tls_cert: Some(cert_path.clone()),
                tls_key: Some(key_path.clone()),
                client_ca: Some(client_ca.clone()),
            });
            config.operators = vec![OperatorConfig {
                name: "carol".into(),
                role: OperatorRole::Admin,
                password_hash: None,
                certificate_cn: Some("ops-carol".into()),
            }];
        })
        .await;

        // A remote operator over TLS, its own client key in the same form.
        let client_key = form.openssl_key();
        let client_signing = edgedps_policies::keys::key_pair(client_key.as_bytes()).unwrap();
        let client_cert = operator_ca.leaf_for("ops-carol", &client_signing, |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        });
        let tls = edgedps_device::tls::client_config(
            pki().server_ca.pem.as_bytes(),
            Some((client_cert.as_bytes(), client_key.as_bytes())),
        )
        .expect("client TLS with the key as openssl wrote it");
        let port = server
            .running
            .operators_addr
            .expect("operator listener")
            .port();
        let mut operator = Operator::connect_with(port, |options| {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        })
        .await
        .unwrap_or_else(|e| panic!("{form:?}: operator over TLS: {e}"));
        let id = format!("keyed-{form:?}").to_lowercase();
        let device_key = new_key();
        let result = operator
            .put(
                &format!("dps/enrollments/{id}"),
                symmetric_enrollment(&id, &device_key),
            )
            .await;
        assert_eq!(result["ok"], true, "{form:?}: {result}");

        // A device over the device listener.
        let outcome = register(&server.device(&id, sas(&device_key)), None)
            .await
            .unwrap_or_else(|e| panic!("{form:?}: device over TLS: {e}"));
        assert_eq!(outcome.status, 200, "{form:?}: {}", outcome.body);
        assert_eq!(outcome.body["status"], "assigned");
    }
}

#[tokio::test]
async fn manufacture_imports_a_signing_ca_with_a_key_in_any_form_and_its_devices_provision() {
    use edgedps_device::bundle::Bundle;
    use edgedps_device::manufacture::batch::{run, BatchArgs, BatchAttestation};
    use edgedps_device::manufacture::ca::{self, CaArgs};
    let server = Server::start().await;
    for form in KeyForm::ALL {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = form.openssl_ca(&format!("edgedps test factory {form:?}"));
        let (cert_path, key_path) = write_pair(dir.path(), "factory", &cert, &key);
        let out = dir.path().join("ca");
        ca::run(&CaArgs {
            out: out.clone(),
            name: "unused".into(),
            import_cert: Some(cert_path.clone()),
            import_key: Some(key_path),
            import_root: None,
        })
        .unwrap_or_else(|e| panic!("{form:?}: import: {e}"));
        let trust = dir.path().join("trust.pem");
        std::fs::write(&trust, &pki().server_ca.pem).unwrap();
        let prefix = format!("factory-{form:?}-").to_lowercase();
        let args = BatchArgs {
            count: 2,
            id_prefix: prefix.clone(),
            out: dir.path().join("batch"),
            attestation: BatchAttestation::X509,
            ca: Some(out),
            group_key_file: None,
            id_scope: ID_SCOPE.into(),
            host: "localhost".into(),
            port: server.devices_port,
            trust,
            years: 1,
            resume: false,
            enroll: true,
            group_id: None,
            issuance_policy: None,
            operator: ([127, 0, 0, 1], server.local_port).into(),
        };
        let manifest = run(&args)
            .await
            .unwrap_or_else(|e| panic!("{form:?}: batch: {e}"));
        assert_eq!(manifest.len(), 2);
        let id = format!("{prefix}00001");
        let bundle = Bundle::open(&dir.path().join("batch").join(&id)).unwrap();
        let device_pem =
            std::fs::read_to_string(dir.path().join("batch").join(&id).join("device.pem")).unwrap();
        openssl_verifies(
            &cert_path,
            &edgedps_policies::x509::pem_der(&device_pem).unwrap(),
        );
        let config = bundle
            .device_config(bundle.factory_auth().unwrap())
            .unwrap();
        let outcome = register(&config, None).await.expect("an answer");
        assert_eq!(outcome.status, 200, "{form:?}: {}", outcome.body);
        assert_eq!(outcome.body["status"], "assigned", "{}", outcome.body);
    }
}
