//! A software TPM (swtpm) for one test, on two ports of 127.0.0.1, driven with the stock
//! TPM tools (tpm2-tools): an independent TPM to check edgedps's software side against.
//! Both must be installed (`scripts/test` installs them); a missing one fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running swtpm with a fresh state, stopped when dropped.
pub struct SoftwareTpm {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pid: u32,
}

impl Drop for SoftwareTpm {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

impl SoftwareTpm {
    /// Starts swtpm (`not-need-init,startup-clear`) on a free port and the next one.
    pub fn start() -> SoftwareTpm {
        Self::start_at(None)
    }

    /// Starts swtpm on `port` and the next one: 2323 is where the stock Node TPM client
    /// (tss.js) looks for a TPM when the machine has none.
    pub fn start_on(port: u16) -> SoftwareTpm {
        Self::start_at(Some(port))
    }

    fn start_at(fixed: Option<u16>) -> SoftwareTpm {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..10 {
            let port = match fixed {
                Some(port) => port,
                None => edgedps_device::process::free_port().expect("a free port"),
            };
            let pid_file = dir.path().join("swtpm.pid");
            let status = Command::new("swtpm")
                .arg("socket")
                .args(["--tpmstate", &format!("dir={}", dir.path().display())])
                .arg("--tpm2")
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--flags", "not-need-init,startup-clear", "--daemon"])
                .args(["--pid", &format!("file={}", pid_file.display())])
                .status()
                .expect("swtpm runs (scripts/test installs it)");
            if !status.success() {
                continue;
            }
            let pid = std::fs::read_to_string(&pid_file)
                .expect("swtpm pid file")
                .trim()
                .parse()
                .expect("a pid");
            return SoftwareTpm { dir, port, pid };
        }
        panic!("swtpm did not start (on {fixed:?} or any free port)");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs one tpm2-tools command in the state directory; its stdout. Transient objects
    /// are flushed after it (swtpm holds three).
    pub fn tool(&self, tool: &str, args: &[&str]) -> Result<Vec<u8>, String> {
        let run = |tool: &str, args: &[&str]| {
            Command::new(tool)
                .args(args)
                .current_dir(self.dir.path())
                .env(
                    "TPM2TOOLS_TCTI",
                    format!("swtpm:host=127.0.0.1,port={}", self.port),
                )
                .env("TSS2_LOG", "all+none")
                .output()
                .unwrap_or_else(|e| panic!("{tool} runs (scripts/test installs tpm2-tools): {e}"))
        };
        let out = run(tool, args);
        let _ = run("tpm2_flushcontext", &["-t"]);
        match out.status.success() {
            true => Ok(out.stdout),
            false => Err(format!(
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Makes the endorsement key (TCG default RSA template) and a storage primary:
    /// their TPM2B_PUBLIC files `ek.pub`, `srk.pub`, the SRK's name `srk.name`.
    pub fn make_keys(&self) {
        self.tool(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
        )
        .expect("EK");
        self.tool(
            "tpm2_createprimary",
            &[
                "-C", "o", "-g", "sha256", "-G", "rsa", "-c", "srk.ctx", "-Q",
            ],
        )
        .expect("SRK");
        self.tool(
            "tpm2_readpublic",
            &["-c", "srk.ctx", "-o", "srk.pub", "-n", "srk.name", "-Q"],
        )
        .expect("SRK public");
    }

    /// TPM2_ActivateCredential(SRK, EK) of a credential blob (TPM2B_ID_OBJECT and
    /// TPM2B_ENCRYPTED_SECRET): the secret, or the TPM's refusal.
    pub fn activate_credential(
        &self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, String> {
        // tpm2-tools' credential file: magic, version 1, then the two TPM2Bs.
        let mut blob = 0xBADC_C0DEu32.to_be_bytes().to_vec();
        blob.extend_from_slice(&1u32.to_be_bytes());
        blob.extend_from_slice(id_object);
        blob.extend_from_slice(encrypted_secret);
        write(&self.path("cred.blob"), &blob);
        self.tool(
            "tpm2_startauthsession",
            &["--policy-session", "-S", "session.ctx"],
        )?;
        let activated = self
            .tool("tpm2_policysecret", &["-S", "session.ctx", "-c", "e", "-Q"])
            .and_then(|_| {
                self.tool(
                    "tpm2_activatecredential",
                    &[
                        "-c",
                        "srk.ctx",
                        "-C",
                        "ek.ctx",
                        "-i",
                        "cred.blob",
                        "-o",
                        "out.bin",
                        "-P",
                        "session:session.ctx",
                    ],
                )
            });
        let _ = self.tool("tpm2_flushcontext", &["session.ctx"]);
        let _ = self.tool("tpm2_flushcontext", &["-s"]);
        activated.map(|_| std::fs::read(self.path("out.bin")).unwrap_or_default())
    }
}

impl SoftwareTpm {
    /// TPM2_Import of a duplicated key under the SRK (inner wrapper `inner_key`,
    /// AES-128-CFB), TPM2_Load, then TPM2_HMAC of `data` with it.
    pub fn import_and_hmac(
        &self,
        public: &[u8],
        duplicate: &[u8],
        encrypted_seed: &[u8],
        inner_key: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.import(public, duplicate, encrypted_seed, inner_key)?;
        self.hmac_with_imported(data)
    }

    /// TPM2_Import and TPM2_Load of a duplicated key: it is the key `dup.ctx` holds.
    pub fn import(
        &self,
        public: &[u8],
        duplicate: &[u8],
        encrypted_seed: &[u8],
        inner_key: &[u8],
    ) -> Result<(), String> {
        write(&self.path("dup.pub"), public);
        write(&self.path("dup.dpriv"), duplicate);
        write(&self.path("dup.seed"), encrypted_seed);
        write(&self.path("inner.key"), inner_key);
        self.tool(
            "tpm2_import",
            &[
                "-C",
                "srk.ctx",
                "-u",
                "dup.pub",
                "-i",
                "dup.dpriv",
                "-s",
                "dup.seed",
                "-k",
                "inner.key",
                "-r",
                "dup.priv",
                "-Q",
            ],
        )?;
        self.tool(
            "tpm2_load",
            &[
                "-C", "srk.ctx", "-u", "dup.pub", "-r", "dup.priv", "-c", "dup.ctx", "-Q",
            ],
        )?;
        Ok(())
    }

    /// TPM2_HMAC of `data` with the key last imported.
    pub fn hmac_with_imported(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        write(&self.path("data.bin"), data);
        self.tool(
            "tpm2_hmac",
            &[
                "-c", "dup.ctx", "-g", "sha256", "-o", "hmac.bin", "data.bin",
            ],
        )?;
        Ok(std::fs::read(self.path("hmac.bin")).unwrap_or_default())
    }
}

/// The device client's TPM (`edgedps_device::tpm`), as the Azure TPM clients use one:
/// the keys of [`SoftwareTpm::make_keys`], an activation blob taken in with
/// ActivateCredential, Import and Load, HMAC with the key taken in.
impl edgedps_device::tpm::TpmDevice for SoftwareTpm {
    fn endorsement_key(&self) -> Vec<u8> {
        std::fs::read(self.path("ek.pub")).unwrap_or_default()
    }

    fn storage_root_key(&self) -> Vec<u8> {
        std::fs::read(self.path("srk.pub")).unwrap_or_default()
    }

    fn activate(&self, blob: &[u8]) -> Result<(), String> {
        let [credential, secret, duplicate, seed, public, _] =
            edgedps_policies::tpm::activation_parts(blob).map_err(|e| e.to_string())?;
        let inner = self.activate_credential(credential, secret)?;
        self.import(public, duplicate, seed, &inner)
    }

    fn hmac(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.hmac_with_imported(data)
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write");
}
