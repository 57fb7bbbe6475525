//! A directory made to hang, as on a failing or remote disk: a deterministic way to check that
//! a hung file system stalls only the work that touches it.
//!
//! How: a write to a file in the directory, from a page registered with userfaultfd, makes the
//! kernel take the file's inode lock and then wait for the page, which nobody provides. An unlink
//! of that file then takes the directory's lock and waits for the file's. From then on every
//! listing of the directory, every creation or removal in it and every lookup of a name not yet
//! cached blocks in the kernel (uninterruptible, like a hung disk) until `release`, which
//! provides the page; both helper threads then finish and the file is gone.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait::wait_until;

// linux/userfaultfd.h (ioctl numbers for x86_64 and aarch64 alike).
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const WEDGE_FILE: &str = ".twill-test-wedge";
const SETTLE: Duration = Duration::from_secs(10);

pub struct DirWedge {
    uffd: OwnedFd,
    page: usize,
    page_len: usize,
    threads: Vec<JoinHandle<()>>,
    released: bool,
    file: PathBuf,
}

impl DirWedge {
    /// Hangs `dir` (see the module doc). Returns once the directory is locked.
    pub fn new(dir: &Path) -> Result<DirWedge> {
        let file = dir.join(WEDGE_FILE);
        std::fs::write(&file, b"").with_context(|| format!("create {}", file.display()))?;
        // SAFETY: plain syscalls; every result is checked, the fd is owned at once.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("userfaultfd");
        }
        let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(std::io::Error::last_os_error()).context("UFFDIO_API");
        }
        let page_len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        let mut wedge = DirWedge {
            uffd,
            page: page as usize,
            page_len,
            threads: Vec::new(),
            released: false,
            file: file.clone(),
        };
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: wedge.page as u64,
                len: page_len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        if unsafe { libc::ioctl(wedge.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(std::io::Error::last_os_error()).context("UFFDIO_REGISTER");
        }
        // From here on, dropping `wedge` releases whatever was set up.
        let f = File::options()
            .append(true)
            .open(&file)
            .with_context(|| format!("open {}", file.display()))?;
        let addr = wedge.page;
        wedge.threads.push(std::thread::spawn(move || {
            // SAFETY: a write of one byte from a mapped page; it waits for the page to appear.
            unsafe { libc::write(f.as_raw_fd(), addr as *const libc::c_void, 1) };
        }));
        let mut pfd = libc::pollfd {
            fd: wedge.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // The fault is pending once the uffd is readable: the writer holds the file's lock.
        if unsafe { libc::poll(&mut pfd, 1, SETTLE.as_millis() as i32) } != 1 {
            bail!("the write to {} never faulted", file.display());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let victim = file.clone();
        wedge.threads.push(std::thread::spawn(move || {
            let _ = tx.send(gettid());
            let _ = std::fs::remove_file(&victim);
        }));
        let tid = rx.recv_timeout(SETTLE).context("unlink thread")?;
        wait_until(SETTLE, || thread_state(tid) == Some('D'))
            .with_context(|| format!("the unlink of {} never blocked", file.display()))?;
        Ok(wedge)
    }

    /// Lets the directory go: the page appears, the write and the unlink complete.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let mut zp = UffdioZeropage {
            range: UffdioRange {
                start: self.page as u64,
                len: self.page_len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the range is the registered page. Failing (no fault yet), the write finds
        // the page mapped anyway, or the uffd's close on drop lets it through.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zp) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Drop for DirWedge {
    fn drop(&mut self) {
        self.release();
        // SAFETY: the page mapped in `new`; no thread uses it any more.
        unsafe { libc::munmap(self.page as *mut libc::c_void, self.page_len) };
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The scheduler state of thread `tid` of this process ('R', 'S', 'D', ...), if it exists.
pub fn thread_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Threads of this process in uninterruptible sleep (waiting for a lock or a disk).
pub fn threads_in_d_state() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&tid| thread_state(tid) == Some('D'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wedged_dir_blocks_creation_until_released() {
        let dir = std::env::temp_dir().join(format!("twill-wedge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut wedge = DirWedge::new(&dir).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let f = dir.join("new");
        let t = std::thread::spawn(move || {
            let _ = tx.send(std::fs::write(&f, b"x").is_ok());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "creating a file in a wedged dir went through"
        );
        wedge.release();
        assert!(rx.recv_timeout(SETTLE).unwrap());
        t.join().unwrap();
        assert!(!dir.join(WEDGE_FILE).exists());
        drop(wedge);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
