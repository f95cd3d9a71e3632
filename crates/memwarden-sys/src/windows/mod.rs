//! The Windows side of the platform seam: the same API as `../unix/`, answering "unsupported"
//! (`SysError::Unsupported`, `io::ErrorKind::Unsupported`) until the Windows port (Direct3D 12,
//! `VirtualAlloc`, named pipes with `DuplicateHandle`, process handles,
//! `GlobalMemoryStatusEx`). It exists so that port is additive and CI's
//! `cargo check --target x86_64-pc-windows-gnu` keeps the seam honest.

pub mod fs;
pub mod local;
pub(crate) mod mem;
pub mod process;
pub(crate) mod shm;
pub mod status;
