//! Secrets stay where they are (docs/security.md, promise 5): a whole run of the real
//! binary at the most verbose log level, then every log line, every message it
//! published (results, events, retained records, also after a restart) and every answer
//! a device got, and what the HTTP listener shows (metrics, the status page) is searched
//! for every secret the run handled: enrollment and group
//! keys, derived device keys, SAS tokens and their signatures, private keys, and keys an
//! operator pasted into the wrong field.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use edgedps_device::provision::register;
use edgedps_policies::sas;
use edgedps_tests::*;
use rumqttc::{Event, Packet};
use serde_json::{json, Value};

/// Every message a subscriber to `#` receives, as text.
type Seen = Arc<Mutex<Vec<String>>>;

fn watch(mut operator: Operator) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok(event) = operator.eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let text = format!("{} {}", p.topic, String::from_utf8_lossy(&p.payload));
                sink.lock().unwrap().push(text);
            }
        }
    });
    (seen, task)
}

async fn watcher(local_port: u16) -> (Seen, tokio::task::JoinHandle<()>) {
    let mut operator = Operator::connect(local_port).await;
    operator.subscribe("#").await;
    watch(operator)
}

fn now() -> u64 {
    edgedps_responder::unix_now()
}

fn token(key: &str, registration_id: &str, expiry: u64) -> String {
    sas::sign(key, ID_SCOPE, registration_id, expiry).unwrap()
}

fn username(registration_id: &str) -> String {
    format!("{ID_SCOPE}/registrations/{registration_id}/api-version=2019-03-31")
}

/// The strings that must never be seen for one key: itself, its bytes in hex, and the
/// bytes as Rust's Debug prints a slice.
fn key_forms(key: &str) -> Vec<String> {
    let mut forms = vec![key.to_owned()];
    if let Ok(bytes) = BASE64.decode(key) {
        forms.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
        forms.push(format!("{bytes:?}").trim_matches(['[', ']']).to_owned());
    }
    forms
}

/// A token, its signature as sent (URL-encoded) and decoded.
fn token_forms(token: &str) -> Vec<String> {
    let sig = token
        .split('&')
        .find_map(|field| field.strip_prefix("sig="))
        .unwrap_or_default();
    let decoded = sig
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=");
    vec![token.to_owned(), sig.to_owned(), decoded]
}

/// The base64 lines of a PEM private key.
fn pem_forms(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_events_retained_records_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let pki = pki();
    let http_port = edgedps_device::process::free_port().expect("a free port");
    // A cloud hub with a connection string in a file: its policy key and every token
    // signed with it are secrets too.
    let hub = edgedps_tests::iothub::FakeHub::start("secret-hub.example.net").await;
    let config = format!(
        "{}[log]\nformat = \"json\"\n[http]\nbind = \"127.0.0.1:{http_port}\"\n",
        hub.config_toml(dir.path(), "")
    );
    let config = config.as_str();
    let env = [("RUST_LOG", "trace")];
    let mut process = Process::start_env(dir.path(), devices_port, local_port, config, &env).await;
    let (seen, watching) = watcher(local_port).await;
    let mut operator = Operator::connect(local_port).await;
    let mut secrets: Vec<String> = Vec::new();
    let mut answers: Vec<String> = Vec::new();

    // Enrollments: keys in, some written twice, once without keys.
    let (primary, secondary, group_key) = (new_key(), new_key(), new_key());
    let member_key = sas::derive_device_key(&group_key, "secret-member").unwrap();
    for key in [&primary, &secondary, &group_key, &member_key] {
        secrets.extend(key_forms(key));
    }
    let individual = json!({
        "registrationId": "secret-sas",
        "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
    });
    operator.put("dps/enrollments/secret-sas", individual).await;
    operator
        .put(
            "dps/enrollments/secret-sas",
            json!({"registrationId": "secret-sas", "attestation": {"type": "symmetricKey", "symmetricKey": {}}}),
        )
        .await;
    operator
        .put(
            "dps/enrollment-groups/secret-group",
            symmetric_group("secret-group", &group_key),
        )
        .await;
    let device = pki.device_root.device("secret-x509");
    secrets.extend(pem_forms(&device.key_pem));
    secrets.extend(pem_forms(&pki.server.key_pem));
    operator
        .put(
            "dps/enrollments/secret-x509",
            x509_enrollment("secret-x509", &device.cert_pem),
        )
        .await;

    // Writes an operator gets wrong, with keys where they do not belong.
    let misplaced: Vec<(String, Value)> = vec![
        (new_key(), json!({"iotHubs": "KEY"})),
        (new_key(), json!({"provisioningStatus": "KEY"})),
        (new_key(), json!({"allocationPolicy": "KEY"})),
        (
            new_key(),
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "KEY", "secondaryKey": 7}}}),
        ),
        (
            new_key(),
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "KEY!", "secondaryKey": "KEY"}}}),
        ),
        (
            new_key(),
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": ["KEY"]}}}),
        ),
        (new_key(), json!({"initialTwin": "KEY"})),
        (new_key(), json!({"deviceId": "KEY"})),
    ];
    for (key, fields) in misplaced {
        secrets.extend(key_forms(&key));
        let mut body = json!({
            "registrationId": "secret-sas",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": primary}},
        });
        for (name, value) in fields.as_object().unwrap() {
            body[name] = serde_json::from_str(&value.to_string().replace("KEY", &key)).unwrap();
        }
        let result = operator
            .write(
                "dps/enrollments/secret-sas",
                &serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert_eq!(result["ok"], false, "{body} was accepted");
        answers.push(result.to_string());
    }
    // Not JSON at all, with a key inside.
    let raw_key = new_key();
    secrets.extend(key_forms(&raw_key));
    let result = operator
        .write(
            "dps/enrollments/secret-sas",
            format!("{{\"registrationId\": \"secret-sas\", \"attestation\": {raw_key}").as_bytes(),
        )
        .await;
    assert_eq!(result["ok"], false);
    answers.push(result.to_string());

    // A device of the cloud hub; a connection string written over the operator plane
    // (for another hub), and a malformed one.
    secrets.extend(key_forms(hub.key()));
    let cloud_key = new_key();
    secrets.extend(key_forms(&cloud_key));
    let mut cloud = symmetric_enrollment("secret-cloud", &cloud_key);
    cloud["iotHubs"] = json!([hub.host_name]);
    operator.put("dps/enrollments/secret-cloud", cloud).await;
    let written_key = new_key();
    secrets.extend(key_forms(&written_key));
    operator
        .put(
            "dps/hubs/secret-other.example.net",
            json!({"connectionString": format!("HostName=secret-other.example.net;SharedAccessKeyName=owner;SharedAccessKey={written_key}")}),
        )
        .await;
    let result = operator
        .write(
            "dps/hubs/secret-other.example.net",
            json!({"connectionString": format!("HostName=secret-other.example.net;SharedAccessKey={written_key}")}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(result["ok"], false, "{result}");
    answers.push(result.to_string());
    let outcome = register(
        &device_config(devices_port, "secret-cloud", sas(&cloud_key)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    answers.push(outcome.body.to_string());
    hub.wait_for(Duration::from_secs(20), "the cloud device", |h| {
        h.twin("secret-cloud")
            .is_some_and(|t| t["properties"]["desired"]["$version"] == 2)
    })
    .await;
    for token in hub.tokens() {
        secrets.extend(token_forms(&token));
    }
    assert!(!hub.tokens().is_empty());

    // Devices that provision: both keys, a derived group key, a certificate.
    for (id, key) in [
        ("secret-sas", &primary),
        ("secret-sas", &secondary),
        ("secret-member", &member_key),
    ] {
        let outcome = register(&device_config(devices_port, id, sas(key)), None)
            .await
            .unwrap();
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        answers.push(outcome.body.to_string());
    }
    let outcome = register(
        &device_config(devices_port, "secret-x509", x509(&device, &[])),
        None,
    )
    .await
    .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
    answers.push(outcome.body.to_string());

    // CONNECTs with tokens, good and bad, and keys sent where a token belongs.
    let valid = token(&primary, "secret-sas", now() + 3600);
    let forged = token(&new_key(), "secret-sas", now() + 3600);
    let expired = token(&primary, "secret-sas", now() - 3600);
    let replayed = token(&member_key, "secret-member", now() + 3600);
    let group_direct = token(&group_key, "secret-member", now() + 3600);
    let truncated = valid[..valid.len() - 30].to_owned();
    for t in [&valid, &forged, &expired, &replayed, &group_direct] {
        secrets.extend(token_forms(t));
    }
    let attempts: Vec<(&str, String, bool)> = vec![
        ("secret-sas", valid.clone(), true),
        ("secret-sas", forged, false),
        ("secret-sas", expired, false),
        ("secret-sas", replayed, false),
        ("secret-member", group_direct, false),
        ("secret-sas", truncated, false),
        ("secret-sas", primary.clone(), false),
        (
            "secret-sas",
            format!("SharedAccessSignature sig={primary}"),
            false,
        ),
        (
            "secret-member",
            format!("SharedAccessSignature sr={group_key}&sig={member_key}&se=1"),
            false,
        ),
    ];
    for (id, password, accepted) in attempts {
        let refusal = connack_refusal(devices_port, id, &username(id), &password).await;
        assert_eq!(refusal.is_none(), accepted, "{id} {password}: {refusal:?}");
    }

    // Retirements.
    let mut disabled = json!({"registrationId": "secret-sas", "attestation": {"type": "symmetricKey", "symmetricKey": {}}});
    disabled["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollments/secret-sas", disabled).await;
    let outcome = register(
        &device_config(devices_port, "secret-sas", sas(&primary)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(outcome.status_word(), Some("disabled"));
    answers.push(outcome.body.to_string());
    assert_eq!(
        operator.write("dps/registrations/secret-member", b"").await["ok"],
        true
    );

    // Everything arrived at the watcher before the process goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the HTTP listener shows: metrics, the status page with its events, the
    // registrations looked up, the counts.
    let base = format!("http://127.0.0.1:{http_port}");
    let mut pages = Vec::new();
    for path in [
        "/metrics",
        "/",
        "/overview",
        "/?registration=secret-sas",
        "/?registration=secret-member",
        "/?registration=secret-x509",
    ] {
        let answer = http("GET", &format!("{base}{path}"), None).await;
        assert_eq!(answer.status, 200, "{path}");
        pages.push(answer.body);
    }
    assert!(
        pages[0].contains("edgedps_registrations_total"),
        "metrics scraped"
    );
    assert!(
        pages[1].contains("dps/events/registrations/secret-member"),
        "the page has the events"
    );
    watching.abort();
    process.kill();
    let first_log = std::fs::read_to_string(dir.path().join("edgedps.log")).unwrap();

    // After a restart: the republished retained records.
    let _process = Process::start_env(dir.path(), devices_port, local_port, config, &env).await;
    let (republished, watching) = watcher(local_port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    watching.abort();
    let second_log = std::fs::read_to_string(dir.path().join("edgedps.log")).unwrap();

    let seen = seen.lock().unwrap().clone();
    let republished = republished.lock().unwrap().clone();
    // The run covered what it claims to: otherwise finding nothing proves nothing.
    let has = |texts: &[String], needle: &str| texts.iter().any(|t| t.contains(needle));
    for needle in [
        "dps/events/attestation/secret-sas",
        "dps/events/admin/enrollments/secret-sas",
        "dps/events/registrations/secret-member",
        "dps/admin/results/enrollments/secret-sas",
        "\"sharedAccessKeyName\":\"owner\"",
        "\"outcome\":\"hubRegistration\"",
        "\"refused\"",
    ] {
        assert!(
            has(&seen, needle),
            "no {needle} among {} messages",
            seen.len()
        );
    }
    for needle in [
        "dps/enrollments/secret-sas",
        "dps/enrollment-groups/secret-group",
    ] {
        assert!(has(&republished, needle), "{needle} not republished");
    }
    for needle in ["TRACE", "DEBUG"] {
        assert!(first_log.contains(needle), "the log has no {needle}");
    }
    // The audit lines are structured: one JSON object each, with the reason.
    let audit: Vec<Value> = first_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "edgedps::audit")
        .map(|line| line["fields"].clone())
        .collect();
    let find = |message: &str, field: &str, value: &str| {
        audit.iter().any(|f| {
            f["message"] == message && f[field].as_str().is_some_and(|v| v.contains(value))
        })
    };
    assert!(
        find("connect accepted", "client_id", "secret-x509"),
        "{audit:?}"
    );
    assert!(find("connect refused", "reason", "expired"), "{audit:?}");
    assert!(
        find("connect refused", "reason", "signature does not match"),
        "{audit:?}"
    );
    assert!(
        find("admin write applied", "retirement", "disabled"),
        "{audit:?}"
    );
    assert!(
        find("admin write applied", "retirement", "deregistered"),
        "{audit:?}"
    );
    assert!(
        find("admin write rejected", "reason", "expected a sequence"),
        "{audit:?}"
    );
    assert!(audit
        .iter()
        .filter(|f| f["message"] == "admin write applied")
        .all(|f| f["operator"].is_string()));

    let places = [
        ("log", vec![first_log, second_log]),
        ("published messages", seen),
        ("retained records after restart", republished),
        ("answers", answers),
        ("metrics and status page", pages),
    ];
    for (place, texts) in &places {
        for text in texts {
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "a secret ({secret}) is in the {place}: {}",
                    excerpt(text, secret)
                );
            }
        }
    }
}

fn excerpt<'a>(text: &'a str, needle: &str) -> &'a str {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(200)
        .map_or(0, |(i, _)| i);
    let end = (at + needle.len() + 200).min(text.len());
    text.get(start..end).unwrap_or(text)
}
