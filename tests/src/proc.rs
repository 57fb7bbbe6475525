//! A process the lab manages: either a child it spawned, or one it adopted by pid from a saved
//! lab state (started by an earlier, since exited, lab CLI process).

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::netns::is_dead;
use crate::wait::wait_until;

const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How an adopted process is recognised again: its pid and its start time (in clock ticks
/// since boot, /proc/<pid>/stat field 22), so a recycled pid is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl ProcId {
    pub fn of(pid: u32) -> ProcId {
        ProcId {
            pid,
            start_time: start_time(pid),
        }
    }

    /// True while this very process (not a later one with the same pid) lives.
    pub fn alive(&self) -> bool {
        if is_dead(self.pid as i32) {
            return false;
        }
        match self.start_time {
            Some(t) => start_time(self.pid) == Some(t),
            None => true,
        }
    }
}

/// The start time of a process, None if it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces and ')').
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts with field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub enum Proc {
    Child(Child),
    Adopted(ProcId),
}

impl Proc {
    pub fn id(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => p.pid,
        }
    }

    pub fn proc_id(&self) -> ProcId {
        match self {
            Proc::Child(c) => ProcId::of(c.id()),
            Proc::Adopted(p) => *p,
        }
    }

    /// Some once the process has exited (a child is reaped). An adopted process is not ours to
    /// reap, so its exit status is unknown and reported as success.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten(),
            Proc::Adopted(p) => (!p.alive()).then(|| ExitStatus::from_raw(0)),
        }
    }

    /// Send a signal (nothing if it is already gone).
    pub fn signal(&mut self, sig: Signal) -> nix::Result<()> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.id() as i32), sig)
    }

    /// SIGKILL and wait until it is gone (reaped if it is our child).
    pub fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted(p) => {
                if p.alive() {
                    let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
                    let _ = wait_until(KILL_TIMEOUT, || !p.alive());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_itself_and_not_a_recycled_pid() {
        let me = ProcId::of(std::process::id());
        assert!(me.start_time.is_some());
        assert!(me.alive());
        let other = ProcId {
            start_time: me.start_time.map(|t| t + 1),
            ..me
        };
        assert!(!other.alive());
    }
}
