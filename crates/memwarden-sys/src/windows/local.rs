//! The local socket on Windows: not yet (a named pipe, with handles passed by
//! `DuplicateHandle` into the peer, in the port). Binding and connecting answer unsupported;
//! the stream types exist so the code above compiles unchanged, and none is ever made.

use super::shm::SharedHandle;
use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn unsupported() -> std::io::Error {
    crate::unsupported_io("the local socket")
}

/// Who is at the other end of a local stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<u32>,
}

#[derive(Debug)]
pub struct LocalListener(Infallible);

impl LocalListener {
    pub fn bind(_path: &Path) -> std::io::Result<LocalListener> {
        Err(unsupported())
    }

    pub async fn accept(&self) -> std::io::Result<LocalStream> {
        match self.0 {}
    }
}

#[derive(Debug)]
pub struct LocalStream(Infallible);

impl LocalStream {
    pub async fn connect(_path: &Path) -> std::io::Result<LocalStream> {
        Err(unsupported())
    }

    pub fn pair_for_child() -> std::io::Result<(LocalStream, std::process::Stdio)> {
        Err(unsupported())
    }

    pub fn peer_cred(&self) -> std::io::Result<PeerCred> {
        match self.0 {}
    }

    pub fn into_split(self) -> (LocalReadHalf, LocalWriteHalf) {
        match self.0 {}
    }
}

#[derive(Debug)]
pub struct LocalReadHalf(Infallible);

impl LocalReadHalf {
    pub fn reunite(self, _write: LocalWriteHalf) -> std::io::Result<LocalStream> {
        match self.0 {}
    }
}

#[derive(Debug)]
pub struct LocalWriteHalf(Infallible);

impl LocalWriteHalf {
    pub async fn send_with_handles(&self, _data: &[u8], _handles: &[SharedHandle]) -> std::io::Result<usize> {
        match self.0 {}
    }
}

macro_rules! never_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
                match self.0 {}
            }
        }
    };
}

macro_rules! never_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
                match self.0 {}
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.0 {}
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.0 {}
            }
        }
    };
}

never_read!(LocalStream);
never_read!(LocalReadHalf);
never_write!(LocalStream);
never_write!(LocalWriteHalf);
