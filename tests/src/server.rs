//! edgedps started in process, on port 0 of 127.0.0.1, with its own data directory.

use std::path::Path;

use rumqttc::{AsyncClient, EventLoop, QoS};

use edgedps_topics::admin::RecordKind;
use edgedps_topics::dps;

use crate::{device_config, new_key, pki, sas, symmetric_group, Operator, ID_SCOPE};
use edgedps_device::provision::{DeviceAuth, DeviceConfig, Outcome};

/// An edgedps started in process with its own data directory.
pub struct Server {
    pub running: edgedps::Running,
    pub dir: tempfile::TempDir,
    pub devices_port: u16,
    pub local_port: u16,
}

/// Writes the server certificate into `dir` and returns a config using it, ports 0.
pub fn test_config(dir: &Path) -> edgedps::Config {
    let pki = pki();
    let cert = dir.join("server-fullchain.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &pki.server.cert_pem).expect("write cert");
    std::fs::write(&key, &pki.server.key_pem).expect("write key");
    let mut config = edgedps::Config {
        data_dir: dir.join("data"),
        id_scope: ID_SCOPE.into(),
        ..Default::default()
    };
    if let Some(devices) = config.listeners.devices.as_mut() {
        devices.bind = "127.0.0.1:0".parse().expect("addr");
        devices.tls_cert = Some(cert);
        devices.tls_key = Some(key);
    }
    if let Some(local) = config.listeners.local.as_mut() {
        local.bind = "127.0.0.1:0".parse().expect("addr");
        local.anonymous = true;
    }
    config.hubs = vec![edgedps::config::HubConfig::named("hub-a.example.net")];
    config
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut edgedps::Config)) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let running = edgedps::start(config).await.expect("edgedps starts");
        let devices_port = running.devices_addr.map(|a| a.port()).unwrap_or_default();
        let local_port = running.local_addr.map(|a| a.port()).unwrap_or_default();
        Server {
            running,
            dir,
            devices_port,
            local_port,
        }
    }

    pub async fn operator(&self) -> Operator {
        Operator::connect(self.local_port).await
    }

    pub fn device(&self, registration_id: &str, auth: DeviceAuth) -> DeviceConfig {
        device_config(self.devices_port, registration_id, auth)
    }

    /// A device of a symmetric-key group, its key derived from `group_key`.
    pub fn member(&self, group_key: &str, registration_id: &str) -> DeviceConfig {
        let key = edgedps_policies::sas::derive_device_key(group_key, registration_id)
            .expect("derived key");
        self.device(registration_id, sas(&key))
    }

    /// Registers a device of a symmetric-key group (with `payload`); its answer.
    pub async fn register_member(
        &self,
        group_key: &str,
        registration_id: &str,
        payload: Option<serde_json::Value>,
    ) -> Outcome {
        edgedps_device::provision::register(&self.member(group_key, registration_id), payload)
            .await
            .unwrap_or_else(|e| panic!("{registration_id} got no answer: {e}"))
    }

    /// The registration record of `registration_id` as stored, as JSON.
    pub fn record(&self, registration_id: &str) -> serde_json::Value {
        let record = self
            .running
            .responder
            .registration_record(registration_id)
            .expect("store")
            .unwrap_or_else(|| panic!("{registration_id} has no record"));
        serde_json::to_value(record).expect("json")
    }
}

impl Server {
    /// Enrolls a symmetric-key group `group` and registers `count` of its devices at
    /// once; returns each device's outcome.
    pub async fn register_group_devices(
        &self,
        operator: &mut Operator,
        group: &str,
        count: usize,
    ) -> Vec<Outcome> {
        let group_key = new_key();
        operator
            .put(
                &RecordKind::EnrollmentGroup.record_topic(group),
                symmetric_group(group, &group_key),
            )
            .await;
        let mut tasks = Vec::new();
        for i in 0..count {
            let config = self.member(&group_key, &format!("{group}-{i}"));
            tasks.push(tokio::spawn(async move {
                edgedps_device::provision::register(&config, None).await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("task").expect("registers"));
        }
        outcomes
    }
}

impl Server {
    /// A device connected (MQTT 3.1.1, SAS with `key`) and subscribed to its responses.
    pub async fn listening(&self, registration_id: &str, key: &str) -> (AsyncClient, EventLoop) {
        let (client, eventloop) =
            edgedps_device::provision::connect(&self.device(registration_id, sas(key)))
                .await
                .expect("the device connects");
        client
            .subscribe(dps::RESPONSE_FILTER, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        (client, eventloop)
    }

    /// MQTT 5 options for a device with a SAS token of `key`, over TLS to the device
    /// listener.
    pub fn mqtt5_options(&self, registration_id: &str, key: &str) -> rumqttc::v5::MqttOptions {
        let config = self.device(registration_id, sas(key));
        let token = edgedps_policies::sas::sign(
            key,
            ID_SCOPE,
            registration_id,
            edgedps_responder::unix_now() + 600,
        )
        .expect("token");
        let mut options =
            rumqttc::v5::MqttOptions::new(registration_id, "localhost", self.devices_port);
        options.set_credentials(config.username(), token);
        let tls =
            edgedps_device::tls::client_config(&config.server_ca_pem, None).expect("client TLS");
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        options
    }
}
