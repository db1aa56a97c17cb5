//! Re-provisioning (PROTOCOL A6): `reprovisionPolicy` decides, at every register of a
//! device already assigned, whether its hub is evaluated again and whether its data
//! (the twin) moves with it or is reset to the enrollment's initial twin.

use edgedps_device::provision::register;
use edgedps_tests::*;
use serde_json::{json, Value};

/// An enrollment on hub-a with a twin, registered once; hub-b linked afterwards.
async fn assigned_on_hub_a(policy: Value) -> (Server, Operator, String, Value) {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = new_key();
    let mut enrollment = symmetric_enrollment("mover", &key);
    enrollment["iotHubs"] = json!(["hub-a.example.net"]);
    enrollment["initialTwin"] = json!({"properties": {"desired": {"interval": 10}}});
    if !policy.is_null() {
        enrollment["reprovisionPolicy"] = policy;
    }
    operator
        .put("dps/enrollments/mover", enrollment.clone())
        .await;
    let first = register(&server.device("mover", sas(&key)), None)
        .await
        .expect("registers");
    assert_eq!(first.assigned_hub(), Some("hub-a.example.net"));
    let state = &first.body["registrationState"];
    assert_eq!(state["substatus"], "initialAssignment");
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["interval"],
        10
    );
    operator
        .put("dps/hubs/hub-b.example.net", json!({"allocationWeight": 1}))
        .await;
    (server, operator, key, enrollment)
}

/// Moves the enrollment to hub-b with a new twin, then registers again.
async fn moved(
    server: &Server,
    operator: &mut Operator,
    key: &str,
    mut enrollment: Value,
) -> Value {
    enrollment["iotHubs"] = json!(["hub-b.example.net"]);
    enrollment["initialTwin"] = json!({"properties": {"desired": {"interval": 99}}});
    operator.put("dps/enrollments/mover", enrollment).await;
    let again = register(&server.device("mover", sas(key)), None)
        .await
        .expect("registers again");
    assert_eq!(again.status_word(), Some("assigned"), "{}", again.body);
    again.body["registrationState"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_new_hub_takes_the_device_with_its_data() {
    let (server, mut operator, key, enrollment) = assigned_on_hub_a(Value::Null).await;
    let state = moved(&server, &mut operator, &key, enrollment).await;
    assert_eq!(state["assignedHub"], "hub-b.example.net", "{state}");
    assert_eq!(state["substatus"], "deviceDataMigrated", "{state}");
    // The device's data migrated: the twin it had, not the enrollment's new one.
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["interval"], 10,
        "{state}"
    );
    assert_eq!(state["payload"], state["initialTwin"], "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_policy_gives_the_enrollments_initial_twin() {
    let policy = json!({"updateHubAssignment": true, "migrateDeviceData": false});
    let (server, mut operator, key, enrollment) = assigned_on_hub_a(policy.clone()).await;
    let state = moved(&server, &mut operator, &key, enrollment.clone()).await;
    assert_eq!(state["assignedHub"], "hub-b.example.net", "{state}");
    assert_eq!(state["substatus"], "deviceDataReset", "{state}");
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["interval"], 99,
        "{state}"
    );
    assert_eq!(
        state["payload"]["properties"]["desired"]["interval"], 99,
        "{state}"
    );

    // On the same hub, a changed initial twin resets the device's data too.
    let mut same_hub = enrollment;
    same_hub["iotHubs"] = json!(["hub-b.example.net"]);
    same_hub["initialTwin"] = json!({"properties": {"desired": {"interval": 7}}});
    operator.put("dps/enrollments/mover", same_hub).await;
    let again = register(&server.device("mover", sas(&key)), None)
        .await
        .expect("registers");
    let state = &again.body["registrationState"];
    assert_eq!(state["assignedHub"], "hub-b.example.net", "{state}");
    assert_eq!(state["substatus"], "deviceDataReset", "{state}");
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["interval"], 7,
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_policy_keeps_the_hub_when_the_enrollment_moves() {
    let policy = json!({"updateHubAssignment": false, "migrateDeviceData": true});
    let (server, mut operator, key, enrollment) = assigned_on_hub_a(policy).await;
    let before = register(&server.device("mover", sas(&key)), None)
        .await
        .expect("registers");
    let state = moved(&server, &mut operator, &key, enrollment).await;
    assert_eq!(state["assignedHub"], "hub-a.example.net", "{state}");
    assert_eq!(state["substatus"], "initialAssignment", "{state}");
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["interval"], 10,
        "{state}"
    );
    // Nothing about the assignment changed: the same record, etag included.
    assert_eq!(
        state["etag"], before.body["registrationState"]["etag"],
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_evaluation_happens_at_every_register_not_only_after_a_write() {
    // The enrollment never changes; a hub linked later wins some devices by hashing,
    // and their next register moves them there.
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/spread",
            symmetric_group("spread", &group_key),
        )
        .await;
    let ids: Vec<String> = (0..24).map(|i| format!("spread-{i}")).collect();
    let config = |id: &str| {
        let key = edgedps_policies::sas::derive_device_key(&group_key, id).expect("key");
        server.device(id, sas(&key))
    };
    for id in &ids {
        let first = register(&config(id), None).await.expect("registers");
        assert_eq!(first.assigned_hub(), Some("hub-a.example.net"));
    }
    operator
        .put("dps/hubs/hub-b.example.net", json!({"allocationWeight": 1}))
        .await;
    let mut moved = 0;
    for id in &ids {
        let again = register(&config(id), None).await.expect("registers");
        let state = &again.body["registrationState"];
        if state["assignedHub"] == "hub-b.example.net" {
            moved += 1;
            assert_eq!(state["substatus"], "deviceDataMigrated", "{state}");
        } else {
            assert_eq!(state["substatus"], "initialAssignment", "{state}");
        }
    }
    // Rendezvous hashing with equal weights: about half move, never none or all.
    assert!((1..24).contains(&moved), "{moved} of 24 moved");
}
