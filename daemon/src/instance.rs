//! One twilld per state dir: two would fight over the lease and the device, and run two IPAM
//! indexes and GCs over one set of files. An flock on `<state-dir>/lock`, held for the process's
//! lifetime (the kernel drops it when the process dies, however it dies).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub const LOCK_FILE: &str = "lock";

/// Held while twilld runs.
pub struct InstanceLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot lock {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "another twilld (pid {holder}) is running with this state dir: it holds the lock {path}"
    )]
    Held { path: PathBuf, holder: String },
}

/// Takes the lock, or names who holds it. Our pid goes into the file, for the next one to name.
pub fn lock(state_dir: &Path) -> Result<InstanceLock, LockError> {
    let path = state_dir.join(LOCK_FILE);
    let io = |err| LockError::Io {
        path: path.clone(),
        err,
    };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let mut f: &File = &lock;
            f.set_len(0)
                .and_then(|_| f.rewind())
                .and_then(|_| writeln!(f, "{}", std::process::id()))
                .map_err(io)?;
            Ok(InstanceLock { _lock: lock })
        }
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => pid.to_string(),
                Err(_) => "unknown".into(),
            };
            Err(LockError::Held { path, holder })
        }
        Err((_, e)) => Err(io(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_file() {
        let d = std::env::temp_dir().join(format!("twill-instance-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let held = lock(&d).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join(LOCK_FILE)).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = lock(&d).err().expect("a second lock must fail");
        let msg = e.to_string();
        assert!(
            msg.contains(&d.join(LOCK_FILE).display().to_string())
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(held);
        let again = lock(&d).unwrap();
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
