//! The local socket on Unix: a Unix stream socket whose lines may carry descriptors
//! (`SCM_RIGHTS`, protocol version 2), the daemon's listener for attached clients, and the
//! socketpair a supervised worker gets as its stdin.

use super::shm::{BorrowedHandle, SharedHandle};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Sends `data` on a (non-blocking) Unix stream socket with `fds` as one `SCM_RIGHTS` control
/// message; returns how many bytes went (the rest is sent without descriptors). `WouldBlock`
/// when the socket is full, so an async caller retries when it is writable. The standard
/// library's `send_vectored_with_ancillary` is unstable; this is one `sendmsg`.
pub fn send_with_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    if data.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "descriptors need at least one byte"));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("the descriptors do not fit their control message"));
    }
    // MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = sendmsg(socket, &[IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)?;
    Ok(n)
}

/// Receives into `buf` from a Unix stream socket, with the descriptors of any `SCM_RIGHTS`
/// control message (at most 16) that arrives on it, each closed on exec: the bytes read (0 at
/// end of stream) and the descriptors. The counterpart of [`send_with_fds`], for Rust peers of
/// the daemon's socket (protocol version 2); blocking or not as the socket is. More than 16
/// descriptors at once is an error after the bytes were consumed: the caller must then close
/// the connection (its stream is out of step).
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: usize = 16;
    // Room for exactly MAX_FDS (the kernel truncates more, with MSG_CTRUNC): `cmsg_space!` adds
    // slack to align an unaligned buffer, which would fit a few more; the aligned part of it,
    // `cmsg_aligned_space!` long, does not.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let exact = rustix::cmsg_aligned_space!(ScmRights(MAX_FDS));
    let start = space.as_ptr().align_offset(std::mem::align_of::<usize>()).min(space.len() - exact);
    let mut control = RecvAncillaryBuffer::new(&mut space[start..start + exact]);
    let msg = recvmsg(socket, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(std::io::Error::other(format!("more than {MAX_FDS} descriptors arrived at once")));
    }
    Ok((msg.bytes, fds))
}

/// Who is at the other end of a local stream, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<u32>,
}

/// The daemon's listening socket for attached clients.
#[derive(Debug)]
pub struct LocalListener(tokio::net::UnixListener);

impl LocalListener {
    /// Listens on `path` (which must not exist).
    pub fn bind(path: &Path) -> std::io::Result<LocalListener> {
        tokio::net::UnixListener::bind(path).map(LocalListener)
    }

    /// The next connection.
    pub async fn accept(&self) -> std::io::Result<LocalStream> {
        self.0.accept().await.map(|(s, _)| LocalStream(s))
    }
}

/// One connection on the local socket.
#[derive(Debug)]
pub struct LocalStream(tokio::net::UnixStream);

impl LocalStream {
    pub async fn connect(path: &Path) -> std::io::Result<LocalStream> {
        tokio::net::UnixStream::connect(path).await.map(LocalStream)
    }

    /// A connected pair: ours (async, for the daemon) and the child's end, to be its stdin, so
    /// the daemon's lines to a supervised worker can carry descriptors. Must be called inside
    /// a tokio runtime.
    pub fn pair_for_child() -> std::io::Result<(LocalStream, std::process::Stdio)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        Ok((LocalStream(ours), std::process::Stdio::from(OwnedFd::from(theirs))))
    }

    /// The peer's credentials, from the kernel.
    pub fn peer_cred(&self) -> std::io::Result<PeerCred> {
        let c = self.0.peer_cred()?;
        Ok(PeerCred { uid: c.uid(), gid: c.gid(), pid: c.pid().map(|p| p as u32) })
    }

    pub fn into_split(self) -> (LocalReadHalf, LocalWriteHalf) {
        let (r, w) = self.0.into_split();
        (LocalReadHalf(r), LocalWriteHalf(w))
    }
}

/// The reading half of a [`LocalStream`].
#[derive(Debug)]
pub struct LocalReadHalf(tokio::net::unix::OwnedReadHalf);

impl LocalReadHalf {
    /// The stream again, from the halves it was split into.
    pub fn reunite(self, write: LocalWriteHalf) -> std::io::Result<LocalStream> {
        self.0.reunite(write.0).map(LocalStream).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The writing half of a [`LocalStream`]; its lines may carry handles.
#[derive(Debug)]
pub struct LocalWriteHalf(tokio::net::unix::OwnedWriteHalf);

impl LocalWriteHalf {
    /// Sends the start of `data` with `handles` riding on it (one `sendmsg`); returns how many
    /// bytes went, the caller writes the rest as plain bytes.
    pub async fn send_with_handles(&self, data: &[u8], handles: &[SharedHandle]) -> std::io::Result<usize> {
        let sock = self.0.as_ref();
        let borrowed: Vec<BorrowedHandle<'_>> = handles.iter().map(|h| h.as_fd()).collect();
        loop {
            sock.writable().await?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || send_with_fds(sock.as_fd(), data, &borrowed)) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.0).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
    };
}

delegate_read!(LocalStream);
delegate_read!(LocalReadHalf);
delegate_write!(LocalStream);
delegate_write!(LocalWriteHalf);

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors sent with a line arrive with its first bytes and name the same files.
    #[test]
    fn descriptors_sent_with_a_line_are_received_with_it() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let dir = std::env::temp_dir();
        let files: Vec<std::fs::File> = (0..2).map(|_| std::fs::File::open(&dir).expect("open")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let sent = send_with_fds(a.as_fd(), b"line\n", &borrowed).expect("send");
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"line\n");
        assert_eq!(fds.len(), 2);
        let inode = std::fs::metadata(&dir).expect("stat").ino();
        for fd in fds {
            assert_eq!(std::fs::File::from(fd).metadata().expect("fstat").ino(), inode);
        }
        // Plain bytes: no descriptors.
        std::io::Write::write_all(&mut &a, b"x").expect("write");
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((n, fds.len()), (1, 0));
    }

    /// More descriptors than a receive takes is an error, not a silent loss.
    #[test]
    fn too_many_descriptors_at_once_is_an_error() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let files: Vec<std::fs::File> =
            (0..17).map(|_| std::fs::File::open(std::env::temp_dir()).expect("open")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(a.as_fd(), b"x", &borrowed).expect("send");
        let mut buf = [0u8; 8];
        let e = recv_with_fds(b.as_fd(), &mut buf).expect_err("truncated");
        assert!(e.to_string().contains("more than 16"), "{e}");
    }
}
