//! The servers a load-generator run measures, started as child processes on loopback so
//! that their CPU time and memory can be read from /proc.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::{free_port, wait_for_port, ChildProcess};

/// Starts `edgedps serve` with a scratch data directory; returns it, its device and
/// local ports, and the CA of its development certificate. With `websocket`, the
/// device port returned is a `[listeners.websocket]`'s (MQTT over WebSocket).
pub async fn spawn_server(
    exe: &Path,
    dir: &Path,
    websocket: bool,
) -> Result<(ChildProcess, u16, u16, PathBuf), String> {
    let (devices, local) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let mut config = format!(
        "id_scope = \"0ne00000001\"\ndata_dir = \"{}\"\n[listeners.devices]\nbind = \"127.0.0.1:{devices}\"\n[listeners.local]\nbind = \"127.0.0.1:{local}\"\nanonymous = true\n[log]\nlevel = \"info\"\n[[certificate_authorities]]\nname = \"gateway\"\n",
        dir.join("data").display()
    );
    let websocket_port = if websocket {
        let port = free_port().map_err(|e| e.to_string())?;
        config.push_str(&format!(
            "[listeners.websocket]\nbind = \"127.0.0.1:{port}\"\n"
        ));
        Some(port)
    } else {
        None
    };
    let path = dir.join("edgedps.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("edgedps.log")).map_err(|e| e.to_string())?;
    // EDGEDPS_LOADGEN_WRAPPER runs the server under a profiler, e.g.
    // "valgrind --tool=massif --massif-out-file=/tmp/massif.out".
    let child = wrapped(exe, "EDGEDPS_LOADGEN_WRAPPER")
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let child = ChildProcess(child);
    wait_for_port(devices).await?;
    wait_for_port(local).await?;
    if let Some(port) = websocket_port {
        wait_for_port(port).await?;
    }
    Ok((
        child,
        websocket_port.unwrap_or(devices),
        local,
        dir.join("data/tls/dev-ca.pem"),
    ))
}

/// Starts `edgedps bench-server` with the same certificate as the server in `dir`.
pub async fn spawn_baseline(exe: &Path, dir: &Path) -> Result<(ChildProcess, u16), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let tls = dir.join("data/tls");
    // EDGEDPS_LOADGEN_BASELINE_WRAPPER: the same for the baseline.
    let child = wrapped(exe, "EDGEDPS_LOADGEN_BASELINE_WRAPPER")
        .args([
            "bench-server",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--cert",
        ])
        .arg(tls.join("server-fullchain.pem"))
        .arg("--key")
        .arg(tls.join("server.key"))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the baseline: {e}"))?;
    let child = ChildProcess(child);
    wait_for_port(port).await?;
    Ok((child, port))
}

/// A command that runs `exe`, under the program and arguments in the environment
/// variable `wrapper` when it is set (a profiler).
fn wrapped(exe: &Path, wrapper: &str) -> Command {
    let wrapper = std::env::var(wrapper).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    }
}
