//! Process watch on Unix: a pidfd per watched process (its exit is seen even after its pid is
//! reused), liveness from `/proc/<pid>/stat`, and this process's user.

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use std::os::fd::OwnedFd;

/// Why a process cannot be watched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("no such process")]
    NoSuchProcess,
    #[error("{0}")]
    Failed(String),
}

/// A watched process (a pidfd): knows when its process exited, even if the pid is reused.
#[derive(Debug)]
pub struct ProcessWatch(OwnedFd);

impl ProcessWatch {
    /// Starts watching `pid`.
    pub fn open(pid: u32) -> Result<ProcessWatch, WatchError> {
        let p = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or(WatchError::NoSuchProcess)?;
        pidfd_open(p, PidfdFlags::empty()).map(ProcessWatch).map_err(|e| match e {
            rustix::io::Errno::SRCH => WatchError::NoSuchProcess,
            e => WatchError::Failed(e.to_string()),
        })
    }

    /// Whether the process exited (a zombie has: a pidfd turns readable when its process exits).
    pub fn exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
    }
}

/// A process that exists and has not exited: a zombie (exited, not yet reaped by its parent)
/// holds no mappings, so it counts as gone.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// This process's real user id.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A process's command name (`/proc/<pid>/comm`), for display.
pub fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}
