//! Where the twill binaries (twilld, the `twill` CNI plugin) are, building them when needed.
//!
//! twill-tests does not depend on the daemon crate (cargo cannot depend on a binary), so the
//! binaries are built with `cargo build` once per test process, serialised across processes
//! by a file lock. With TWILL_BIN_DIR set, the binaries there are used as they are.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

pub const TWILLD: &str = "twilld";
pub const CNI_PLUGIN: &str = "twill";

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate is inside the workspace")
        .to_path_buf()
}

/// The cargo target directory: CARGO_TARGET_DIR (relative to the workspace) or <workspace>/target.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_dir().join(d),
        None => workspace_dir().join("target"),
    }
}

/// TWILL_BIN_DIR if set, else the debug profile directory of the target dir.
pub fn default_bin_dir() -> PathBuf {
    match std::env::var_os("TWILL_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => target_dir().join("debug"),
    }
}

/// Make sure the binaries in `dir` exist and, for the default directory, are up to date.
pub fn ensure_built(dir: &Path) -> Result<()> {
    let own_build =
        std::env::var_os("TWILL_BIN_DIR").is_none() && dir == target_dir().join("debug");
    if own_build {
        static BUILD: OnceLock<Result<(), String>> = OnceLock::new();
        BUILD
            .get_or_init(|| cargo_build().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!(e))?;
    }
    for name in [TWILLD, CNI_PLUGIN] {
        let p = dir.join(name);
        if !p.is_file() {
            bail!(
                "{} is missing (set TWILL_BIN_DIR or build the workspace)",
                p.display()
            );
        }
    }
    Ok(())
}

/// `cargo build -p twill-daemon -p twill-cni`; a no-op when up to date, so it runs once per
/// process to keep tests from silently using a stale daemon.
fn cargo_build() -> Result<()> {
    let target = target_dir();
    std::fs::create_dir_all(&target)?;
    let lock_path = target.join(".twill-tests-build.lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("lock {}: {e}", lock_path.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", "twill-daemon", "-p", "twill-cni"])
        .current_dir(workspace_dir())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .context("run cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build -p twill-daemon -p twill-cni failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
