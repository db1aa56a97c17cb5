//! A full disk: writes fail with a clear error (admin 500, device 500000), the service
//! stays up, and nothing acknowledged before is lost. Uses a small tmpfs (needs root,
//! which the test environment has; a failed mount fails the test).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use edgedps_device::provision::register;
use edgedps_responder::Store;
use edgedps_tests::*;
use rumqttc::{MqttOptions, Packet, QoS};

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_clearly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&data)
        .status()
        .expect("mount runs");
    assert!(
        status.success(),
        "mounting a tmpfs failed (the test needs root)"
    );
    let _tmpfs = Tmpfs(data.clone());
    let (devices_port, local_port) = free_ports();
    let mut process = Process::start(dir.path(), devices_port, local_port, "").await;

    let mut options = MqttOptions::new("filler", "127.0.0.1", local_port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) =
        subscribed(options, "dps/admin/results/#", QoS::AtLeastOnce).await;
    // Devices assigned while there is room.
    let group_key = new_key();
    let mut operator = Operator::connect(local_port).await;
    operator
        .put(
            "dps/enrollment-groups/cramped",
            symmetric_group("cramped", &group_key),
        )
        .await;
    let mut assigned = BTreeSet::new();
    for i in 0..5 {
        let id = format!("early-{i}");
        let key = edgedps_policies::sas::derive_device_key(&group_key, &id).unwrap();
        let outcome = register(&device_config(devices_port, &id, sas(&key)), None)
            .await
            .unwrap();
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        assigned.insert(id);
    }

    let filler = "x".repeat(16 * 1024);
    let mut acknowledged = BTreeSet::new();
    let mut refusal = None;
    for i in 0..2_000 {
        let id = format!("fill-{i}");
        let mut body = symmetric_enrollment(&id, &new_key());
        body["initialTwin"] = serde_json::json!({"tags": {"filler": filler}});
        client
            .publish(
                format!("dps/enrollments/{id}"),
                QoS::AtLeastOnce,
                true,
                serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap();
        let topic = format!("dps/admin/results/enrollments/{id}");
        let Ok(Packet::Publish(p)) = edgedps_device::provision::wait_for(
            &mut eventloop,
            "result",
            |p| matches!(p, Packet::Publish(p) if p.topic == topic),
        )
        .await
        else {
            panic!("no result for {id}: the service stalled or died on a full disk");
        };
        let result: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        if result["ok"] == true {
            acknowledged.insert(id);
        } else {
            refusal = Some(result);
            break;
        }
    }
    let refusal = refusal.expect("4 MiB filled without a refusal");
    assert_eq!(refusal["errorCode"], 500, "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap_or_default()
            .contains("store"),
        "{refusal}"
    );
    assert!(!acknowledged.is_empty());

    // Devices registering now: assigned while a record still fits, then refused with
    // the store's reason: 500000 at the register, or, once the store's writes have
    // failed (sled then fails its reads too), the CONNECT refused as server
    // unavailable; never `assigned` without the record on disk.
    let mut refused = false;
    for i in 0..200 {
        let id = format!("late-{i}");
        let key = edgedps_policies::sas::derive_device_key(&group_key, &id).unwrap();
        match register(&device_config(devices_port, &id, sas(&key)), None).await {
            Ok(outcome) if outcome.status_word() == Some("assigned") => {
                assigned.insert(id);
            }
            Ok(failed) => {
                assert_eq!(failed.status, 500, "{}", failed.body);
                assert_eq!(failed.body["errorCode"], 500000, "{}", failed.body);
                let message = failed.body["message"].as_str().unwrap_or_default();
                assert!(message.contains("store"), "{message}");
                refused = true;
                break;
            }
            Err(edgedps_device::DeviceError::Refused(
                rumqttc::ConnectReturnCode::ServiceUnavailable,
            )) => {
                let client_id = format!("client_id={id}");
                let line = log_line(dir.path(), |l| {
                    l.contains("connect refused") && l.contains(&client_id)
                })
                .await
                .unwrap_or_else(|log| {
                    let tail: Vec<_> = log.lines().rev().take(20).collect();
                    panic!("no audit line for {id}; the log ends: {tail:#?}")
                });
                assert!(line.contains("store"), "not the store's reason: {line}");
                refused = true;
                break;
            }
            Err(other) => panic!("{id}: {other:?}"),
        }
    }
    assert!(refused, "a full disk still assigned 200 devices");

    // Still up: the operator connection works and the process lives.
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "edgedps died on a full disk"
    );

    // Space is freed; the store opens and holds everything acknowledged.
    process.kill();
    let status = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let store = edgedps_responder::SledStore::open(&data.join("store")).expect("store opens");
    let stored: BTreeSet<String> = store
        .enrollments()
        .unwrap()
        .into_iter()
        .map(|e| e.registration_id.to_string())
        .collect();
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "lost after a full disk: {lost:?}");
    let registered: BTreeSet<String> = store
        .registrations()
        .unwrap()
        .into_iter()
        .map(|r| r.registration_id.to_string())
        .collect();
    let lost: Vec<_> = assigned.difference(&registered).collect();
    assert!(
        lost.is_empty(),
        "assigned devices lost after a full disk: {lost:?}"
    );
    eprintln!(
        "{} writes and {} registrations acknowledged before the disk filled; all kept",
        acknowledged.len(),
        assigned.len()
    );
}
