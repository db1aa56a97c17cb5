//! Crash safety: edgedps is killed with SIGKILL at random moments while devices register,
//! an operator writes enrollments and another retires devices; after each restart every
//! registration a device was told `assigned`, every write reported `ok`, and every
//! retirement reported `ok` (a disabled individual enrollment, a `deregistered` record)
//! is still there.
//!
//! `EDGEDPS_CRASH_KILLS` sets the number of kills (default 20).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgedps_device::provision::{register, wait_for};
use edgedps_policies::sas::derive_device_key;
use edgedps_responder::Store;
use edgedps_tests::*;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, Packet, QoS};

/// An operator subscribed to `results`; `None` once the server is gone.
async fn operator(port: u16, name: String, results: &str) -> Option<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(name, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(results, QoS::AtLeastOnce).await.ok()?;
    wait_for(&mut eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await
        .ok()?;
    Some((client, eventloop))
}

/// Publishes `body` to `topic` and waits for the result on `result_topic`; `None` once
/// the server is gone.
async fn write_for_result(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    (topic, body, retain): (String, Vec<u8>, bool),
    result_topic: &str,
) -> Option<serde_json::Value> {
    client
        .publish(topic, QoS::AtLeastOnce, retain, body)
        .await
        .ok()?;
    match wait_for(
        eventloop,
        "result",
        |p| matches!(p, Packet::Publish(p) if p.topic == result_topic),
    )
    .await
    {
        Ok(Packet::Publish(p)) => Some(serde_json::from_slice(&p.payload).unwrap_or_default()),
        _ => None,
    }
}

/// Writes enrollments one by one until the connection breaks; records those reported ok.
async fn write_until_killed(port: u16, prefix: String, acknowledged: Arc<Mutex<BTreeSet<String>>>) {
    let name = format!("crash-writer-{prefix}");
    let Some((client, mut eventloop)) = operator(port, name, "dps/admin/results/#").await else {
        return;
    };
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let body = serde_json::to_vec(&symmetric_enrollment(&id, &new_key())).unwrap_or_default();
        let write = (format!("dps/enrollments/{id}"), body, true);
        let result_topic = format!("dps/admin/results/enrollments/{id}");
        match write_for_result(&client, &mut eventloop, write, &result_topic).await {
            Some(result) if result["ok"] == true => {
                acknowledged.lock().unwrap().insert(id);
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// Retires devices that were assigned, one by one, until the connection breaks;
/// records the retirements asked for and those reported ok.
async fn retire_until_killed(
    port: u16,
    name: String,
    assigned: Arc<Mutex<BTreeSet<String>>>,
    asked: Arc<Mutex<BTreeSet<String>>>,
    retired: Arc<Mutex<BTreeSet<String>>>,
) {
    let name = format!("crash-retirer-{name}");
    let Some((client, mut eventloop)) = operator(port, name, "dps/admin/results/retire/#").await
    else {
        return;
    };
    loop {
        let next = {
            let asked = asked.lock().unwrap();
            assigned
                .lock()
                .unwrap()
                .iter()
                .find(|id| !asked.contains(*id))
                .cloned()
        };
        let Some(id) = next else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        asked.lock().unwrap().insert(id.clone());
        let retire = (
            format!("dps/admin/retire/{id}"),
            br#"{"reason":"crash test"}"#.to_vec(),
            false,
        );
        let result_topic = format!("dps/admin/results/retire/{id}");
        match write_for_result(&client, &mut eventloop, retire, &result_topic).await {
            Some(result) => {
                assert_ne!(result["ok"], false, "retirement of {id} refused: {result}");
                retired.lock().unwrap().insert(id);
            }
            None => return,
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
    let asked = Arc::new(Mutex::new(BTreeSet::new()));
    let retired = Arc::new(Mutex::new(BTreeSet::new()));
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for kill in 0..kills {
        let mut process = Process::start(dir.path(), devices_port, local_port, "").await;
        let mut tasks = vec![
            tokio::spawn(write_until_killed(
                local_port,
                format!("w{kill}"),
                written.clone(),
            )),
            tokio::spawn(retire_until_killed(
                local_port,
                format!("r{kill}"),
                assigned.clone(),
                asked.clone(),
                retired.clone(),
            )),
        ];
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
    let retired = retired.lock().unwrap().clone();
    let asked = asked.lock().unwrap().clone();
    assert!(
        written.len() > kills && assigned.len() > kills && retired.len() > kills,
        "too little load: {} writes, {} registrations, {} retirements",
        written.len(),
        assigned.len(),
        retired.len()
    );

    // The server starts on the store after the last kill; then, stopped, the store opens
    // cleanly and holds everything that was acknowledged.
    {
        let _process = Process::start(dir.path(), devices_port, local_port, "").await;
    }
    let store =
        edgedps_responder::SledStore::open(&dir.path().join("data/store")).expect("store opens");
    let stored = store.enrollments().expect("enrollments readable");
    let enrollments: BTreeSet<String> = stored
        .iter()
        .map(|e| e.registration_id.key().into_owned())
        .collect();
    let blocked: BTreeSet<String> = stored
        .iter()
        .filter(|e| {
            e.settings.provisioning_status == edgedps_topics::admin::ProvisioningStatus::Disabled
        })
        .map(|e| e.registration_id.key().into_owned())
        .collect();
    let records = store.registrations().expect("registrations readable");
    let with_status = |status: &str| -> BTreeSet<String> {
        records
            .iter()
            .filter(|r| r.status == status)
            .map(|r| r.registration_id.key().into_owned())
            .collect()
    };
    let deregistered = with_status("deregistered");
    // A retired device's record says `deregistered` (a retirement whose result the kill
    // cut off may have happened too); every other assigned one says `assigned`.
    let registrations: BTreeSet<String> = with_status("assigned")
        .into_iter()
        .chain(deregistered.intersection(&asked).cloned())
        .collect();
    let lost_retirements: Vec<_> = retired
        .iter()
        .filter(|id| !blocked.contains(*id) || !deregistered.contains(*id))
        .collect();
    assert!(
        lost_retirements.is_empty(),
        "acknowledged retirements lost: {lost_retirements:?}"
    );
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
        "{kills} kills: {} acknowledged writes, {} registrations and {} retirements all survived",
        written.len(),
        assigned.len(),
        retired.len()
    );
}
