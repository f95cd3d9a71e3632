//! Process watch on Windows: a process handle opened with `SYNCHRONIZE` (`OpenProcess`), which
//! is signalled when the process exits (`WaitForSingleObject` with no wait), as a pidfd is
//! readable on Linux. Holding the handle keeps the process id from being reused meanwhile.

use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use windows_sys::Win32::Foundation::{ERROR_INVALID_PARAMETER, STILL_ACTIVE, WAIT_OBJECT_0};
use windows_sys::Win32::System::Threading::{
    GetExitCodeProcess, OpenProcess, QueryFullProcessImageNameW, WaitForSingleObject, PROCESS_NAME_WIN32,
    PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
};

/// Why a process cannot be watched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("no such process")]
    NoSuchProcess,
    #[error("{0}")]
    Failed(String),
}

/// A process handle that is signalled once the process has exited.
#[derive(Debug)]
pub struct ProcessWatch(OwnedHandle);

fn open_process(pid: u32) -> Result<OwnedHandle, WatchError> {
    // SAFETY: a plain call; the handle it returns, when not null, is ours to own and close.
    let h = unsafe { OpenProcess(PROCESS_SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if h.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(code) if code == ERROR_INVALID_PARAMETER as i32 => WatchError::NoSuchProcess,
            _ => WatchError::Failed(format!("OpenProcess({pid}): {e}")),
        });
    }
    // SAFETY: `h` is a valid process handle just opened, owned by nobody else.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

impl ProcessWatch {
    pub fn open(pid: u32) -> Result<ProcessWatch, WatchError> {
        open_process(pid).map(ProcessWatch)
    }

    /// Whether the process has exited (a wait of zero on its handle).
    pub fn exited(&self) -> bool {
        // SAFETY: the handle is owned by self and open.
        unsafe { WaitForSingleObject(self.0.as_raw_handle(), 0) == WAIT_OBJECT_0 }
    }
}

/// Whether `pid` names a running process (one that cannot be opened counts as gone, except
/// when access is denied: it is there).
pub fn alive(pid: u32) -> bool {
    match open_process(pid) {
        Ok(h) => {
            let mut code = 0u32;
            // SAFETY: an open process handle and an out-pointer to a local.
            let ok = unsafe { GetExitCodeProcess(h.as_raw_handle(), &mut code) } != 0;
            !ok || code == STILL_ACTIVE as u32
        }
        Err(WatchError::NoSuchProcess) => false,
        Err(WatchError::Failed(_)) => true,
    }
}

/// No Unix users: 0.
pub fn current_uid() -> u32 {
    0
}

/// No Unix users: 0.
pub fn effective_uid() -> u32 {
    0
}

/// The process's executable name without its extension (`python` for `python.exe`), as
/// `/proc/<pid>/comm` gives it on Linux.
pub fn command_name(pid: u32) -> Option<String> {
    let h = open_process(pid).ok()?;
    let mut buf = [0u16; 1024];
    let mut len = buf.len() as u32;
    // SAFETY: an open process handle, a buffer of `len` UTF-16 units and its length.
    let ok = unsafe { QueryFullProcessImageNameW(h.as_raw_handle(), PROCESS_NAME_WIN32, buf.as_mut_ptr(), &mut len) };
    if ok == 0 {
        return None;
    }
    let path = String::from_utf16_lossy(&buf[..len as usize]);
    let file = path.rsplit(['\\', '/']).next().unwrap_or(&path);
    Some(file.strip_suffix(".exe").or_else(|| file.strip_suffix(".EXE")).unwrap_or(file).to_string())
}
