//! The real binary restarted: enrollments and registrations survive, and the stored
//! state is shown again on the records' topics.

use edgedps_device::provision::register;
use edgedps_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_and_registrations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let key = new_key();
    let group_key = new_key();
    let first = {
        let mut process = Process::start(dir.path(), devices_port, local_port, "").await;
        let mut operator = Operator::connect(local_port).await;
        operator
            .put(
                "dps/enrollments/survivor",
                symmetric_enrollment("survivor", &key),
            )
            .await;
        operator
            .put(
                "dps/enrollment-groups/lasting",
                symmetric_group("lasting", &group_key),
            )
            .await;
        let outcome = register(&device_config(devices_port, "survivor", sas(&key)), None)
            .await
            .unwrap();
        assert_eq!(outcome.status_word(), Some("assigned"));
        // SIGKILL: nothing gets a chance to flush on the way out.
        process.kill();
        outcome
    };

    let _process = Process::start(dir.path(), devices_port, local_port, "").await;
    let mut watcher = Operator::connect(local_port).await;
    watcher.subscribe("dps/enrollments/#").await;
    let (topic, payload) = watcher
        .next_publish("dps/enrollments/")
        .await
        .expect("the enrollment is republished as retained");
    assert_eq!(topic, "dps/enrollments/survivor");
    let body: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(body["registrationId"], "survivor");
    watcher.subscribe("dps/enrollment-groups/#").await;
    let (topic, _) = watcher
        .next_publish("dps/enrollment-groups/")
        .await
        .expect("the group is republished");
    assert_eq!(topic, "dps/enrollment-groups/lasting");

    // The registration survived: re-registering is idempotent across the restart.
    let again = register(&device_config(devices_port, "survivor", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(
        again.body["registrationState"]["etag"],
        first.body["registrationState"]["etag"]
    );
    assert_eq!(again.assigned_hub(), first.assigned_hub());
    // The group still admits its devices.
    let member_key = edgedps_policies::sas::derive_device_key(&group_key, "member-after").unwrap();
    let member = register(
        &device_config(devices_port, "member-after", sas(&member_key)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(member.status_word(), Some("assigned"));
}
