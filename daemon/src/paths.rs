//! Directories twilld creates files in by name (the CNI socket, the subnet file): only root may
//! be able to change them. In a directory others can write, a symlink swapped in between our
//! check and our use would make twilld chmod or truncate any file on the node.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{dir}: {err}")]
    Io { dir: PathBuf, err: io::Error },
    #[error(
        "{dir} is owned by uid {uid}, not root: only root may control the directory of {what}"
    )]
    NotRoot {
        dir: PathBuf,
        uid: u32,
        what: String,
    },
    #[error("{dir} is writable by group or others (mode {mode:o}): only root may write the directory of {what}")]
    Writable {
        dir: PathBuf,
        mode: u32,
        what: String,
    },
}

/// `path`'s directory, created (mode 0755, whatever the umask lets through beyond that) if
/// missing, and checked: it must belong to root and be writable by root alone; so must every
/// directory above it, except that a sticky one (like /tmp) may be writable by all, since
/// others cannot rename or remove root's entries in it.
pub fn private_parent(path: &Path) -> Result<PathBuf, PathError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|err| PathError::Io {
            dir: dir.clone(),
            err,
        })?;
    let real = std::fs::canonicalize(&dir).map_err(|err| PathError::Io {
        dir: dir.clone(),
        err,
    })?;
    let what = path.display().to_string();
    for (i, d) in real.ancestors().enumerate() {
        let m = std::fs::metadata(d).map_err(|err| PathError::Io {
            dir: d.to_path_buf(),
            err,
        })?;
        if m.uid() != 0 {
            return Err(PathError::NotRoot {
                dir: d.to_path_buf(),
                uid: m.uid(),
                what,
            });
        }
        let mode = m.permissions().mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && (i == 0 || !sticky) {
            return Err(PathError::Writable {
                dir: d.to_path_buf(),
                mode,
                what,
            });
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("twill-paths-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn root_only_dirs_pass_and_are_created() {
        let d = tmp("ok");
        let sock = d.join("run/twill/cni.sock");
        assert_eq!(private_parent(&sock).unwrap(), d.join("run/twill"));
        assert!(d.join("run/twill").is_dir());
        // /tmp itself is sticky and world-writable: fine above the directory, not as it.
        assert!(private_parent(&d.join("subnet.env")).is_ok());
        let e = private_parent(Path::new("/tmp/x.sock")).unwrap_err();
        assert!(matches!(e, PathError::Writable { .. }), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn dirs_others_can_write_or_own_are_refused() {
        let d = tmp("bad");
        let open = d.join("open");
        fs::create_dir_all(&open).unwrap();
        for mode in [0o777, 0o775, 0o757, 0o1777] {
            fs::set_permissions(&open, fs::Permissions::from_mode(mode)).unwrap();
            let e = private_parent(&open.join("cni.sock")).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&open.display().to_string()) && msg.contains("writable"),
                "{mode:o}: {msg}"
            );
        }
        // An open directory higher up is as bad (it could be renamed away), unless sticky.
        let below = open.join("below");
        fs::create_dir_all(&below).unwrap();
        fs::set_permissions(&below, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_parent(&below.join("cni.sock")).is_err());
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(private_parent(&below.join("cni.sock")).is_ok());
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        // Owned by someone else.
        nix::unistd::chown(&below, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = private_parent(&below.join("subnet.env")).unwrap_err();
        assert!(matches!(e, PathError::NotRoot { uid: 65534, .. }), "{e}");
        assert!(e.to_string().contains("uid 65534"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    const ROLE: &str = "TWILL_PATHS_TEST_DIR";

    /// Run by `created_dirs_pass_under_a_loose_umask` in a process with umask 0002.
    #[test]
    fn create_under_umask_role() {
        if let Ok(d) = std::env::var(ROLE) {
            private_parent(&Path::new(&d).join("run/twill/cni.sock")).unwrap();
        }
    }

    /// Directories twilld creates itself are root's alone even under a umask that would leave
    /// them group-writable (which twilld would then refuse).
    #[test]
    fn created_dirs_pass_under_a_loose_umask() {
        let d = tmp("umask");
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "umask 0002 && exec \"$0\" --exact paths::tests::create_under_umask_role --test-threads 1",
            ])
            .arg(std::env::current_exe().unwrap())
            .env(ROLE, &d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mode = fs::metadata(d.join("run/twill"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
        fs::remove_dir_all(d).unwrap();
    }
}
