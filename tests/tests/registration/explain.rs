//! `dps/admin/explain/{registrationId}` (PROTOCOL B): what a registration would do now
//! and why, for each way a device can match (individual, group, blocked, disabled,
//! unknown), checked against what a real registration then does; explaining changes
//! nothing.

use edgedps_device::provision::register;
use edgedps_tests::*;
use serde_json::{json, Value};

fn considered<'a>(explanation: &'a Value, id: &str) -> &'a Value {
    explanation["considered"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("{id} not considered: {explanation}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_which_enrollment_and_hub_and_the_registration_agrees() {
    let server = Server::start_with(|config| {
        config.hubs = vec![
            edgedps::config::HubConfig::named("hub-a.example.net"),
            edgedps::config::HubConfig::named("hub-b.example.net"),
        ];
    })
    .await;
    let mut operator = server.operator().await;
    let pki = pki();

    // Unknown: nothing enrolled.
    let unknown = operator.explain("nobody", b"").await;
    assert_eq!(unknown["ok"], true, "{unknown}");
    assert_eq!(unknown["outcome"], "unknown", "{unknown}");
    assert!(
        unknown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no enrollment")),
        "{unknown}"
    );

    // Individual: its enrollment, its hubs with weights and scores, its twin.
    let key = new_key();
    let mut enrollment = symmetric_enrollment("solo", &key);
    enrollment["initialTwin"] = json!({"tags": {"room": 7}});
    operator.put("dps/enrollments/solo", enrollment).await;
    let solo = operator.explain("solo", b"").await;
    assert_eq!(solo["outcome"], "individual", "{solo}");
    assert_eq!(solo["attestation"], "symmetricKey", "{solo}");
    assert_eq!(considered(&solo, "solo")["matches"], true);
    let allocation = &solo["allocation"];
    assert_eq!(allocation["policy"], "hashed", "{solo}");
    let candidates = allocation["candidates"].as_array().expect("candidates");
    assert_eq!(candidates.len(), 2, "{solo}");
    let best = candidates
        .iter()
        .max_by(|a, b| {
            a["hashScore"]
                .as_f64()
                .partial_cmp(&b["hashScore"].as_f64())
                .expect("score")
        })
        .expect("a best");
    assert_eq!(best["chosen"], true, "{solo}");
    assert_eq!(allocation["hub"], best["hostName"], "{solo}");
    assert!(
        allocation["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("hashed: highest score")),
        "{solo}"
    );
    assert_eq!(solo["initialTwin"]["tags"]["room"], 7, "{solo}");
    // Explaining wrote nothing.
    assert!(server
        .running
        .responder
        .registration_record("solo")
        .expect("store")
        .is_none());
    let outcome = register(&server.device("solo", sas(&key)), None)
        .await
        .expect("registers");
    assert_eq!(
        outcome.assigned_hub(),
        allocation["hub"].as_str(),
        "{}",
        outcome.body
    );
    let recorded = server.record("solo");
    assert_eq!(
        recorded["allocation"]["reason"], allocation["reason"],
        "{recorded}"
    );
    let again = operator.explain("solo", b"").await;
    assert_eq!(again["currentHub"], allocation["hub"], "{again}");

    // Group, by the device's certificate chain; the other groups say why not.
    operator
        .put(
            "dps/enrollment-groups/fleet",
            x509_group("fleet", &pki.device_root.pem),
        )
        .await;
    let mut other = symmetric_group("keys", &new_key());
    other["iotHubs"] = json!(["hub-b.example.net"]);
    operator.put("dps/enrollment-groups/keys", other).await;
    let device = pki.device_intermediate.device("truck-1");
    let chain = format!("{}{}", device.cert_pem, pki.device_intermediate.pem);
    let truck = operator.explain("truck-1", chain.as_bytes()).await;
    assert_eq!(truck["outcome"], "group", "{truck}");
    assert_eq!(truck["enrollment"], "group:fleet", "{truck}");
    assert_eq!(truck["attestation"], "x509", "{truck}");
    assert_eq!(considered(&truck, "fleet")["matches"], true, "{truck}");
    assert!(
        truck["considered"]
            .as_array()
            .expect("list")
            .iter()
            .all(|c| c["id"] != "keys"),
        "an X.509 device is not looked at by symmetric-key groups: {truck}"
    );
    let outcome = register(
        &server.device("truck-1", x509(&device, &[&pki.device_intermediate])),
        None,
    )
    .await
    .expect("registers");
    assert_eq!(
        outcome.assigned_hub(),
        truck["allocation"]["hub"].as_str(),
        "{}",
        outcome.body
    );
    // A chain of another CA matches nothing, and says so.
    let rogue = pki.rogue_root.device("truck-9");
    let refused = operator.explain("truck-9", rogue.cert_pem.as_bytes()).await;
    assert_eq!(refused["outcome"], "unknown", "{refused}");

    // Blocked: a disabled individual enrollment (of another credential) blocks the
    // group's device.
    let mut block = symmetric_enrollment("truck-1", &new_key());
    block["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollments/truck-1", block).await;
    let blocked = operator.explain("truck-1", chain.as_bytes()).await;
    assert_eq!(blocked["outcome"], "blocked", "{blocked}");
    assert!(
        blocked["reason"]
            .as_str()
            .is_some_and(|r| r.contains("`disabled`")),
        "{blocked}"
    );
    let outcome = register(
        &server.device("truck-1", x509(&device, &[&pki.device_intermediate])),
        None,
    )
    .await
    .expect("answered");
    assert_eq!(outcome.status_word(), Some("disabled"), "{}", outcome.body);

    // Disabled: the group itself.
    let group_key = new_key();
    let mut disabled = symmetric_group("off", &group_key);
    disabled["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollment-groups/off", disabled).await;
    operator.write("dps/enrollment-groups/keys", b"").await;
    let off = operator
        .explain("off-1", br#"{"attestation": "symmetricKey"}"#)
        .await;
    assert_eq!(off["outcome"], "disabled", "{off}");
    assert_eq!(off["enrollment"], "group:off", "{off}");
    let outcome = register(&server.member(&group_key, "off-1"), None)
        .await
        .expect("answered");
    assert_eq!(outcome.status_word(), Some("disabled"), "{}", outcome.body);

    // A bad body is answered with its reason, not dropped.
    let bad = operator
        .explain("solo", b"{\"attestation\": \"smoke\"}")
        .await;
    assert_eq!(bad["ok"], false, "{bad}");
    assert_eq!(bad["errorCode"], 400, "{bad}");
    let bad = operator
        .explain(
            "solo",
            b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
        )
        .await;
    assert_eq!(bad["ok"], false, "{bad}");
}
