//! The stock Azure IoT Node.js clients over HTTPS (azure-iot-provisioning-device 1.9.1
//! with its HTTP transport 1.9.1; azure-iot-security-tpm 1.9.3, -symmetric-key 1.8.2,
//! -x509 1.7.12), unmodified, against `[listeners.https]`: a TPM device on swtpm
//! (where tss.js finds one, 127.0.0.1:2323) challenged, assigned, signing in at the
//! local hub with the key it was given, polled in 202 mode, re-registered and cut off;
//! symmetric-key and X.509 devices provisioned.

use std::net::SocketAddr;
use std::time::Duration;

use edgedps_tests::hub::{HubDevice, LOCAL};
use edgedps_tests::node::run_node;
use edgedps_tests::tpm::SoftwareTpm;
use edgedps_tests::*;
use serde_json::{json, Value};

/// The Node TPM client looks for its TPM on this port only.
static PORT_2323: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server whose hub is itself, with the HTTPS device API; 202 first if `poll`.
async fn server(poll: bool) -> (Server, u16) {
    let server = Server::start_with(|config| {
        config.hubs.clear();
        config.local_hub = Some(edgedps::config::LocalHubConfig::named(LOCAL));
        config.listeners.https = Some(edgedps::config::HttpsListener {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_cert: None,
            tls_key: None,
        });
        config.always_accept_then_poll = poll;
        // The Node client polls after Retry-After seconds (2 s without one).
        config.retry_after_seconds = 0;
    })
    .await;
    let port = server.running.https_addr.expect("https").port();
    (server, port)
}

fn request(port: u16, kind: &str) -> Value {
    json!({"kind": kind, "host": "localhost", "port": port, "idScope": ID_SCOPE,
        "ca": pki().server_ca.pem})
}

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_node_tpm_client_provisions_over_https_and_its_key_opens_the_local_hub() {
    let _port = PORT_2323.lock().await;
    let soft = SoftwareTpm::start_on(2323);
    // The factory read-out: `edgedps manufacture tpm` persists the EK and SRK where the
    // stock client looks and writes the enrollment.
    let out = tempfile::tempdir().unwrap();
    let read = std::process::Command::new(edgedps_binary())
        .args(["manufacture", "tpm", "--tcti"])
        .arg(format!("swtpm:host=127.0.0.1,port={}", soft.port))
        .args(["--initial-twin", r#"{"tags": {"line": "node"}}"#, "--out"])
        .arg(out.path())
        .env("TSS2_LOG", "all+none")
        .output()
        .expect("edgedps manufacture tpm runs");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let id = String::from_utf8_lossy(&read.stdout)
        .split('\t')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let enrollment: Value =
        serde_json::from_slice(&std::fs::read(out.path().join(format!("{id}.json"))).unwrap())
            .unwrap();
    // The stock client reads the same EK and derives the same id.
    let mut readout = request(0, "tpm");
    readout["readout"] = json!(true);
    let sdk = run_node(&readout, LIMIT).await;
    assert_eq!(sdk["ok"], true, "{sdk}");
    assert_eq!(sdk["registrationId"], id.as_str(), "the SDK's id is ours");
    assert_eq!(
        sdk["endorsementKey"],
        enrollment["attestation"]["tpm"]["endorsementKey"]
    );

    for poll in [false, true] {
        let (server, port) = server(poll).await;
        let mut operator = server.operator().await;
        operator
            .put(&format!("dps/enrollments/{id}"), enrollment.clone())
            .await;
        let mut ask = request(port, "tpm");
        ask["hubResource"] = json!(edgedps_policies::sas::hub_resource(LOCAL, &id));
        operator.subscribe("dps/events/#").await;
        let answer = run_node(&ask, LIMIT).await;
        if answer["ok"] != true {
            while let Some((topic, event)) = operator.next_publish("dps/events/").await {
                eprintln!("{topic}: {}", String::from_utf8_lossy(&event));
            }
        }
        assert_eq!(answer["ok"], true, "202 first: {poll}: {answer}");
        assert_eq!(
            answer["registrationId"],
            id.as_str(),
            "the SDK's id is the EK's"
        );
        let result = &answer["result"]["registrationState"];
        assert_eq!(result["assignedHub"], LOCAL, "{answer}");
        assert!(result.get("symmetricKey").is_none(), "{answer}");
        assert_eq!(result["deviceId"], id.as_str());
        assert!(result["tpm"]["authenticationKey"].is_string(), "{answer}");

        // The hub key the TPM took in signs a hub token the local hub accepts.
        let sig = answer["hubSignature"].as_str().expect("signed");
        let token = format!(
            "SharedAccessSignature sr={}&sig={}&se={}",
            ask["hubResource"].as_str().unwrap(),
            percent_encoding::utf8_percent_encode(sig, percent_encoding::NON_ALPHANUMERIC),
            answer["expiry"]
        );
        let mut hub = HubDevice::connect_token(server.devices_port, &id, &token, false).await;
        hub.subscribe("$iothub/twin/res/#").await;
        let (status, _, twin) = hub.twin("GET", b"").await;
        assert_eq!(status, 200, "{twin}");

        if poll {
            continue;
        }
        // Registered again (the TPM's persisted key is replaced by the same hub key).
        let again = run_node(&ask, LIMIT).await;
        assert_eq!(again["ok"], true, "{again}");
        assert_eq!(
            again["result"]["registrationState"]["substatus"], "initialAssignment",
            "{again}"
        );
        // Retired: the hub session is closed and the token no longer opens the hub.
        let retired = operator.retire(&id, b"").await;
        assert_eq!(retired["ok"], true, "{retired}");
        assert!(hub.closed().await, "the hub session is cut off");
        let refused = connack_refusal(
            server.devices_port,
            &id,
            &edgedps_tests::hub::hub_username(LOCAL, &id),
            &token,
        )
        .await;
        assert!(refused.is_some(), "a retired TPM device's hub CONNECT");
        let after = run_node(&ask, LIMIT).await;
        assert_eq!(
            after["ok"], false,
            "a retired TPM device does not provision: {after}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_node_http_client_provisions_symmetric_key_and_x509_devices() {
    let (server, port) = server(false).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("node-sym-1").await;
    let mut ask = request(port, "symmetricKey");
    ask["registrationId"] = json!("node-sym-1");
    ask["key"] = json!(key);
    let answer = run_node(&ask, LIMIT).await;
    assert_eq!(answer["ok"], true, "{answer}");
    // For these the SDK gives the registration state (for TPM, the whole answer).
    assert_eq!(answer["result"]["assignedHub"], LOCAL, "{answer}");
    // A wrong key: the SDK's error, not a registration.
    ask["key"] = json!(new_key());
    let refused = run_node(&ask, LIMIT).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["status"], 401, "{refused}");

    let device = pki().device_root.device("node-x509-1");
    operator
        .put(
            "dps/enrollment-groups/node-x509",
            x509_group("node-x509", &pki().device_root.pem),
        )
        .await;
    let mut ask = request(port, "x509");
    ask["registrationId"] = json!("node-x509-1");
    ask["cert"] = json!(device.cert_pem);
    ask["privateKey"] = json!(device.key_pem);
    let answer = run_node(&ask, LIMIT).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        answer["result"]["x509"]["enrollmentGroupId"], "node-x509",
        "{answer}"
    );
}
