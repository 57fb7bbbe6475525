//! Who is at the other end of a CNI connection: its uid (only root may drive pod networking)
//! and its root directory, through which a CNI_NETNS path visible only in its mount namespace
//! is found.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixStream;

pub struct Peer {
    pub uid: u32,
    root: Option<PeerRoot>,
}

/// The plugin's root directory, held open: paths below [`PeerRoot::path`] stay valid while a
/// clone of it lives.
#[derive(Clone)]
pub struct PeerRoot(Arc<OwnedFd>);

impl PeerRoot {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }
}

impl Peer {
    /// Reads the peer's credentials and, for a root peer, opens its root at once.
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let root = match cred.pid() {
            Some(pid) if cred.uid() == 0 && pid > 0 => open_root(stream, pid),
            _ => None,
        };
        Ok(Peer {
            uid: cred.uid(),
            root: root.map(|fd| PeerRoot(Arc::new(fd))),
        })
    }

    pub fn root(&self) -> Option<PeerRoot> {
        self.root.clone()
    }
}

/// `/proc/<pid>/root`, opened now rather than when CNI_NETNS is looked up: the plugin may be
/// killed meanwhile (its runtime's timeout) and its pid reused. `pid` is the one SO_PEERCRED
/// recorded at connect, still reported after the plugin is gone. The pidfd from SO_PEERPIDFD
/// (Linux 6.5) names the plugin itself: if it still exists after the open, the pid was not
/// reused and the root is the plugin's; if it is gone, nothing is looked through. Without
/// SO_PEERPIDFD (older kernels) only the moments since connect remain open to reuse.
fn open_root(stream: &UnixStream, pid: i32) -> Option<OwnedFd> {
    let pidfd = match peer_pidfd(stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pid, error = %e, "the CNI plugin is gone; not looking through its pid");
            return None;
        }
    };
    let path = std::ffi::CString::new(format!("/proc/{pid}/root")).ok()?;
    // SAFETY: open(2) of a C string; the fd is owned at once.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    let root = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(pidfd) = pidfd {
        // SAFETY: signal 0 only checks that the process exists (a zombie still holds its pid).
        let alive = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
        if !alive {
            tracing::warn!(
                pid,
                "the CNI plugin exited before its root was opened; not looking through its pid"
            );
            return None;
        }
    }
    Some(root)
}

/// The peer's pidfd; None where the kernel has no SO_PEERPIDFD; an error when the peer is gone.
fn peer_pidfd(stream: &UnixStream) -> std::io::Result<Option<OwnedFd>> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of the size it is told.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) => Ok(None),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Stdio};

    #[test]
    fn a_root_peer_is_looked_through_its_own_root() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, _b) = UnixStream::pair().unwrap();
            let peer = Peer::of(&a).unwrap();
            assert_eq!(peer.uid, 0);
            let root = peer.root().expect("the root of a live root peer");
            assert!(root.path().join("proc/self").exists());
        });
    }

    const ROLE: &str = "TWILL_PEER_TEST_ROLE";
    const ME: &str = "cni::peer::tests::peer_roles";

    /// The processes of `a_reused_pid_is_not_looked_through` run this test binary with `ROLE`
    /// set, to play their part; in a normal run it does nothing.
    #[test]
    fn peer_roles() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        if let Some(sock) = role.strip_prefix("connect:") {
            // The plugin: connects, then is gone.
            std::os::unix::net::UnixStream::connect(sock).unwrap();
        } else if let Some(dir) = role.strip_prefix("chroot:") {
            // The process that gets the plugin's pid, with a root of its own; waits to be killed.
            nix::unistd::chroot(dir).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(120));
        } else if role == "reuse" {
            reuse_scenario();
        }
    }

    fn role(r: String) -> Command {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", ME, "--test-threads", "1", "--nocapture"])
            .env(ROLE, r)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// Runs as pid 1 of a pid namespace of its own, where the next pid can be chosen
    /// (ns_last_pid) without touching the machine's.
    fn reuse_scenario() {
        let dir = std::env::temp_dir().join(format!("twill-peer-reuse-{}", rand::random::<u32>()));
        std::fs::create_dir_all(dir.join("qroot")).unwrap();
        std::fs::write(dir.join("qroot/marker-q"), "").unwrap();
        let sock = dir.join("cni.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut plugin = role(format!("connect:{}", sock.display())).spawn().unwrap();
        let plugin_pid = plugin.id();
        assert!(plugin.wait().unwrap().success());
        let (conn, _) = listener.accept().unwrap();
        // Another process takes the plugin's pid.
        std::fs::write("/proc/sys/kernel/ns_last_pid", (plugin_pid - 1).to_string()).unwrap();
        let mut other = role(format!("chroot:{}", dir.join("qroot").display()))
            .spawn()
            .unwrap();
        assert_eq!(other.id(), plugin_pid, "the pid was not reused");
        let via_pid = format!("/proc/{plugin_pid}/root/marker-q");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !Path::new(&via_pid).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the other process never chrooted"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Looking through /proc/<peer pid>/root now would look through the other process.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let root = rt.block_on(async {
            conn.set_nonblocking(true).unwrap();
            let s = UnixStream::from_std(conn).unwrap();
            Peer::of(&s).unwrap().root()
        });
        let looked_through = root.is_some_and(|r| r.path().join("marker-q").exists());
        let _ = other.kill();
        let _ = other.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            !looked_through,
            "looked through the process that took over the plugin's pid"
        );
        println!("reuse scenario done");
    }

    /// The plugin gone and its pid taken by another process before twilld looks at the peer:
    /// twilld must not look through that process's root for CNI_NETNS.
    #[test]
    fn a_reused_pid_is_not_looked_through() {
        let out = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", ME, "--test-threads", "1", "--nocapture"])
            .env(ROLE, "reuse")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("reuse scenario done"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
