//! The Unix (Linux) side of the platform seam: system calls through `rustix`'s safe wrappers.
//! Each module has a twin of the same API in `../windows/`.

pub mod fs;
pub mod local;
pub(crate) mod mem;
pub mod process;
pub(crate) mod shm;
pub mod status;

/// The errno and the OS's text for a failed call (the text `std::io::Error` gives, so error
/// messages read as they did with libc).
pub(crate) fn errno_text(e: rustix::io::Errno) -> (i32, String) {
    (e.raw_os_error(), std::io::Error::from(e).to_string())
}
