//! Crash safety: edgedps is killed with SIGKILL at random moments while devices register
//! and an operator writes enrollments; after each restart every registration a device
//! was told `assigned`, and every write reported `ok`, is still there.
//!
//! `EDGEDPS_CRASH_KILLS` sets the number of kills (default 20).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgedps_device::provision::{register, wait_for};
use edgedps_policies::sas::derive_device_key;
use edgedps_tests::*;
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};

/// Writes enrollments one by one until the connection breaks; records those reported ok.
async fn write_until_killed(port: u16, prefix: String, acknowledged: Arc<Mutex<BTreeSet<String>>>) {
    let mut options = MqttOptions::new(format!("crash-writer-{prefix}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    if client
        .subscribe("dps/admin/results/#", QoS::AtLeastOnce)
        .await
        .is_err()
        || wait_for(&mut eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await
            .is_err()
    {
        return;
    }
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let body = serde_json::to_vec(&symmetric_enrollment(&id, &new_key())).unwrap_or_default();
        if client
            .publish(
                format!("dps/enrollments/{id}"),
                QoS::AtLeastOnce,
                true,
                body,
            )
            .await
            .is_err()
        {
            return;
        }
        let result_topic = format!("dps/admin/results/enrollments/{id}");
        match wait_for(
            &mut eventloop,
            "result",
            |p| matches!(p, Packet::Publish(p) if p.topic == result_topic),
        )
        .await
        {
            Ok(Packet::Publish(p)) => {
                let result: serde_json::Value =
                    serde_json::from_slice(&p.payload).unwrap_or_default();
                if result["ok"] == true {
                    acknowledged.lock().unwrap().insert(id);
                }
            }
            _ => return,
        }
    }
}

/// Registers new group devices until the server goes away; records those assigned.
async fn register_until_killed(
    port: u16,
    prefix: String,
    group_key: String,
    assigned: Arc<Mutex<BTreeSet<String>>>,
) {
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let key = derive_device_key(&group_key, &id).unwrap_or_default();
        match register(&device_config(port, &id, sas(&key)), None).await {
            Ok(outcome) if outcome.status_word() == Some("assigned") => {
                assigned.lock().unwrap().insert(id.to_ascii_lowercase());
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_killed() {
    let kills: usize = std::env::var("EDGEDPS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let group_key = new_key();
    {
        let _process = Process::start(dir.path(), devices_port, local_port, "").await;
        let mut operator = Operator::connect(local_port).await;
        operator
            .put(
                "dps/enrollment-groups/crash",
                symmetric_group("crash", &group_key),
            )
            .await;
    }
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let assigned = Arc::new(Mutex::new(BTreeSet::new()));
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for kill in 0..kills {
        let mut process = Process::start(dir.path(), devices_port, local_port, "").await;
        let mut tasks = vec![tokio::spawn(write_until_killed(
            local_port,
            format!("w{kill}"),
            written.clone(),
        ))];
        for lane in 0..4 {
            tasks.push(tokio::spawn(register_until_killed(
                devices_port,
                format!("d{kill}x{lane}"),
                group_key.clone(),
                assigned.clone(),
            )));
        }
        // xorshift: a different moment each time, reproducible run to run.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(100 + seed % 400)).await;
        process.kill();
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
    let written = written.lock().unwrap().clone();
    let assigned = assigned.lock().unwrap().clone();
    assert!(
        written.len() > kills && assigned.len() > kills,
        "too little load: {} writes, {} registrations",
        written.len(),
        assigned.len()
    );

    // The server starts on the store after the last kill; then, stopped, the store opens
    // cleanly and holds everything that was acknowledged.
    {
        let _process = Process::start(dir.path(), devices_port, local_port, "").await;
    }
    let store =
        edgedps_responder::Store::open(&dir.path().join("data/store")).expect("store opens");
    let enrollments: BTreeSet<String> = store
        .enrollments()
        .expect("enrollments readable")
        .into_iter()
        .map(|e| e.registration_id.to_ascii_lowercase())
        .collect();
    let registrations: BTreeSet<String> = store
        .registrations()
        .expect("registrations readable")
        .into_iter()
        .filter(|r| r.status == "assigned")
        .map(|r| r.registration_id.to_ascii_lowercase())
        .collect();
    let lost_writes: Vec<_> = written
        .iter()
        .map(|id| id.to_ascii_lowercase())
        .filter(|id| !enrollments.contains(id))
        .collect();
    let lost_registrations: Vec<_> = assigned.difference(&registrations).collect();
    assert!(
        lost_writes.is_empty(),
        "acknowledged writes lost: {lost_writes:?}"
    );
    assert!(
        lost_registrations.is_empty(),
        "assigned registrations lost: {lost_registrations:?}"
    );
    eprintln!(
        "{kills} kills: {} acknowledged writes and {} registrations all survived",
        written.len(),
        assigned.len()
    );
}
