//! The real `edgedps serve` binary as a child process (crash, restart, full-disk and SDK
//! tests), built once per test binary.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use edgedps_device::process::{free_port, wait_for_port, ChildProcess};

use crate::{pki, ID_SCOPE};

/// The `edgedps` binary of this workspace, built (once per test binary) if needed.
pub fn edgedps_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_edgedps).clone()
}

fn build_edgedps() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/{profile}/deps/test-binary -> target/{profile}/edgedps
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let binary = profile_dir.join("edgedps");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    // With `manufacture tpm`: the tests read swtpm with it.
    command.args([
        "build",
        "-p",
        "edgedps-cli",
        "--bin",
        "edgedps",
        "--features",
        "tpm",
    ]);
    // `cargo test` sets the package's variables for the test; a build script that
    // watches one (ring watches CARGO_MANIFEST_DIR) would rebuild half the tree, and the
    // next `cargo test` would rebuild it back.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name.as_ref(),
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command.status().expect("cargo build runs");
    assert!(status.success(), "building edgedps failed");
    binary
}

/// Two ports free right now on 127.0.0.1 (for the real binary, which needs them in its
/// configuration before it starts).
pub fn free_ports() -> (u16, u16) {
    (
        free_port().expect("a free port"),
        free_port().expect("a free port"),
    )
}

/// The real `edgedps serve` binary, killed (SIGKILL: a crash) when dropped.
pub struct Process {
    pub child: ChildProcess,
    pub devices_port: u16,
    pub local_port: u16,
}

impl Process {
    /// Starts `edgedps serve --config {dir}/edgedps.toml` and waits for both listeners.
    pub async fn start(dir: &Path, devices_port: u16, local_port: u16, extra: &str) -> Process {
        Process::start_env(dir, devices_port, local_port, extra, &[]).await
    }

    /// As [`Process::start`], with environment variables for the process. The log goes
    /// to `{dir}/edgedps.log`, overwritten at each start.
    pub async fn start_env(
        dir: &Path,
        devices_port: u16,
        local_port: u16,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Process {
        let pki = pki();
        std::fs::write(dir.join("server-fullchain.pem"), &pki.server.cert_pem).expect("cert");
        std::fs::write(dir.join("server.key"), &pki.server.key_pem).expect("key");
        let config = format!(
            r#"id_scope = "{ID_SCOPE}"
data_dir = "{data}"
{extra}
[listeners.devices]
bind = "127.0.0.1:{devices_port}"
tls_cert = "{dir}/server-fullchain.pem"
tls_key = "{dir}/server.key"
[listeners.local]
bind = "127.0.0.1:{local_port}"
anonymous = true
[[hubs]]
host_name = "hub-a.example.net"
"#,
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        let path = dir.join("edgedps.toml");
        std::fs::write(&path, config).expect("config");
        let log = std::fs::File::create(dir.join("edgedps.log")).expect("log");
        let child = std::process::Command::new(edgedps_binary())
            .args(["serve", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("edgedps starts");
        let mut process = Process {
            child: ChildProcess(child),
            devices_port,
            local_port,
        };
        for port in [devices_port, local_port] {
            if let Err(e) = wait_for_port(port).await {
                panic!(
                    "edgedps did not listen: {e}: {}",
                    std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default()
                );
            }
        }
        // Another process may hold the port; make sure the listener is ours.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(status)) = process.child.0.try_wait() {
            panic!(
                "edgedps exited ({status}): {}",
                std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default()
            );
        }
        process
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// Waits up to five seconds for a line of `{dir}/edgedps.log` that `wanted` accepts:
/// edgedps writes its log from a background thread, so a line may land just after
/// the answer it explains. The log read last when none arrived.
pub async fn log_line(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(dir.join("edgedps.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| wanted(l)) {
            return Ok(line.to_string());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(log);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
