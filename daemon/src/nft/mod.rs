//! Every nftables change twilld makes goes through here: scripts are sent with `nft -f -`, so
//! one script is one kernel transaction (all of it or nothing), and listings are read back as
//! JSON with `nft -j`. The nft binary is the interface the nftables project documents and keeps
//! stable (kube-proxy, Calico and netavark drive it the same way).
//!
//! `TableWriter` owns one table: it remembers what it last gave the kernel, sends only the
//! difference, and restores the table when someone else changed it.

pub mod iptables;
pub mod model;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use model::{Summary, Table};

/// An nft run that takes longer is stuck (a held lock, a huge table); give up on it.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of our recent nft processes to remember, to tell our changes from others'.
const RECENT_PIDS: usize = 64;

/// Pids of twilld's latest nft and iptables processes, whichever part of twilld ran them (the
/// firewall and the policy engine each have their own `Nft`): their changes are ours (see
/// `is_ours`). iptables-nft writes through nftables too (it may recreate its base chains
/// while only listing them).
static RECENT: Mutex<VecDeque<u32>> = Mutex::new(VecDeque::new());
fn lock_recent() -> std::sync::MutexGuard<'static, VecDeque<u32>> {
    RECENT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns one of twilld's nft or iptables runs, remembered as ours.
fn spawn_ours(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        let mut recent = lock_recent();
        if recent.len() == RECENT_PIDS {
            recent.pop_front();
        }
        recent.push_back(pid);
    }
    Ok(child)
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft is not installed (looked in PATH and /usr/sbin): install the nftables package")]
    NotInstalled,
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft timed out after {0:?}")]
    Timeout(Duration),
    /// nft refused the script: its own message, which names the line.
    #[error("nft refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("nft printed JSON that does not parse: {0}")]
    BadJson(serde_json::Error),
}

/// Runs the nft binary. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Nft {
    bin: PathBuf,
}

impl Nft {
    /// Finds `nft` in PATH, then in /usr/sbin and /sbin (PATH under sudo or cron may lack them).
    pub fn find() -> Result<Nft, NftError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join("nft"))
            .find(|p| p.is_file())
            .map(|bin| Nft { bin })
            .ok_or(NftError::NotInstalled)
    }

    /// Runs `script` as one transaction (`nft -f -`).
    pub async fn run(&self, what: &str, script: &str) -> Result<(), NftError> {
        self.exec(what, &["-f", "-"], Some(script)).await.map(drop)
    }

    /// Whether the kernel and nft would take `script` (`nft --check`: nothing is changed).
    pub async fn accepts(&self, script: &str) -> bool {
        self.exec("check", &["--check", "-f", "-"], Some(script))
            .await
            .is_ok()
    }

    /// `nft -j <args>` parsed, e.g. `["list", "table", "ip", "twill-masq"]`. A missing table is
    /// `Ok(None)`.
    pub async fn list_json(&self, args: &[&str]) -> Result<Option<serde_json::Value>, NftError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        match self.exec(&args.join(" "), &full, None).await {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(NftError::BadJson),
            Err(NftError::Refused { message, .. }) if message.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a change to the ruleset made by process `pid` was one of ours.
    /// The kernel names the writing *thread*: twilld's own netlink writes (set elements) come
    /// from its worker threads, so any thread of this process counts.
    pub fn is_ours(&self, pid: u32) -> bool {
        pid == std::process::id()
            || lock_recent().contains(&pid)
            || std::path::Path::new(&format!("/proc/self/task/{pid}")).exists()
    }

    async fn exec(
        &self,
        what: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Vec<u8>, NftError> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn_ours(&mut cmd).map_err(NftError::Spawn)?;
        let run = async {
            if let (Some(mut pipe), Some(script)) = (child.stdin.take(), stdin) {
                pipe.write_all(script.as_bytes())
                    .await
                    .map_err(NftError::Spawn)?;
            }
            child.wait_with_output().await.map_err(NftError::Spawn)
        };
        let out = tokio::time::timeout(NFT_TIMEOUT, run)
            .await
            .map_err(|_| NftError::Timeout(NFT_TIMEOUT))??;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let message = String::from_utf8_lossy(&out.stderr);
        // nft's errors quote the offending line: the first lines say enough.
        let message: String = message.lines().take(6).collect::<Vec<_>>().join(" | ");
        Err(NftError::Refused {
            what: what.to_string(),
            message,
        })
    }
}

/// What `TableWriter::check` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The kernel has the table as last applied.
    InSync,
    /// It did not (gone, or changed by someone else); it has been applied again.
    Restored,
    /// Nothing to check: the table is not managed (never applied, or removed).
    Unmanaged,
}

/// Keeps one table as desired.
pub struct TableWriter {
    nft: Nft,
    /// What the kernel was last given; None before the first apply (the kernel may hold an
    /// older version from a previous twilld, so the first apply replaces the table).
    applied: Option<Table>,
}

impl TableWriter {
    pub fn new(nft: Nft) -> Self {
        TableWriter { nft, applied: None }
    }

    pub fn applied(&self) -> Option<&Table> {
        self.applied.as_ref()
    }

    /// The kernel holds `t` now: it was changed another way (netlink element operations).
    pub fn assume(&mut self, t: Table) {
        self.applied = Some(t);
    }

    /// The kernel's table is not known any more (a transaction around this writer failed
    /// after `assume`): the next apply writes the whole table.
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// The kernel's table `family name` as JSON (for counters), None when it is missing.
    pub async fn listing(&self) -> Result<Option<serde_json::Value>, NftError> {
        let Some(t) = &self.applied else {
            return Ok(None);
        };
        let fam = t.family.to_string();
        self.nft.list_json(&["list", "table", &fam, &t.name]).await
    }

    /// Makes the kernel hold `desired`: the difference to the last apply in one transaction, or
    /// the whole table when there was none (or the difference was refused).
    pub async fn apply(&mut self, desired: &Table) -> Result<(), NftError> {
        let what = format!("table {}", desired.id());
        match &self.applied {
            Some(old) => {
                let Some(script) = desired.render_diff(old) else {
                    return Ok(());
                };
                if let Err(e) = self.nft.run(&what, &script).await {
                    // The kernel's table is not what we think (someone changed it): replace it.
                    tracing::warn!(table = %desired.id(), error = %e, "incremental update refused; replacing the table");
                    self.nft.run(&what, &desired.render_replace()).await?;
                }
            }
            None => self.nft.run(&what, &desired.render_replace()).await?,
        }
        self.applied = Some(desired.clone());
        Ok(())
    }

    /// Deletes the table `family name` if the kernel has it (also one a previous twilld left).
    pub async fn remove(&mut self, family: model::Family, name: &str) -> Result<(), NftError> {
        let id = format!("{family} {name}");
        // `add` first: deleting a missing table is an error, and this stays one transaction.
        self.nft
            .run(
                &format!("removal of table {id}"),
                &format!("add table {id}\ndelete table {id}\n"),
            )
            .await?;
        self.applied = None;
        Ok(())
    }

    /// Compares the kernel's table with the last apply (by shape: see `Summary`); applies the
    /// whole table again when it differs.
    pub async fn check(&mut self) -> Result<Check, NftError> {
        let Some(want) = &self.applied else {
            return Ok(Check::Unmanaged);
        };
        let fam = want.family.to_string();
        let listing = self
            .nft
            .list_json(&["list", "table", &fam, &want.name])
            .await?;
        let have = listing
            .as_ref()
            .and_then(|l| Summary::from_listing(l, want.family, &want.name));
        if have.as_ref() == Some(&want.summary()) {
            return Ok(Check::InSync);
        }
        tracing::warn!(table = %want.id(), found = ?have, "nftables table changed by someone else; restoring it");
        let what = format!("table {}", want.id());
        self.nft.run(&what, &want.render_replace()).await?;
        Ok(Check::Restored)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_by_any_thread_of_ours_are_ours_others_are_not() {
        let nft = Nft {
            bin: PathBuf::from("/usr/sbin/nft"),
        };
        assert!(nft.is_ours(std::process::id()));
        // The kernel reports the writing thread's id (set elements are written from workers).
        let live = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            s.spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() as u32 }).unwrap();
                let _ = done_rx.recv();
            });
            let t = rx.recv().unwrap();
            let ours = nft.is_ours(t);
            done_tx.send(()).unwrap();
            ours
        });
        assert!(live, "a live worker thread's change is ours");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(
            !nft.is_ours(child.id()),
            "another process's change is not ours"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_process_twilld_spawns_for_nftables_is_ours() {
        let nft = Nft {
            bin: PathBuf::from("/usr/sbin/nft"),
        };
        let mut child =
            spawn_ours(tokio::process::Command::new("true").kill_on_drop(true)).unwrap();
        let pid = child.id().unwrap();
        assert!(nft.is_ours(pid));
        child.wait().await.unwrap();
    }
}
