//! The control stream between a source and a destination during one migration: a few
//! newline-terminated words over an authenticated data stream (`ctl`).
//!
//! It carries the one step QEMU's own stream cannot: at `pre-switchover` the source has made the
//! disk mirrors consistent and the destination must stop its NBD exports before its VM may run.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The stream name of the control channel.
pub const STREAM: &str = "ctl";
/// Source → destination: mirrors are complete, release the disks.
pub const STORAGE_DONE: &str = "storage-done";
/// Destination → source: done.
pub const OK: &str = "ok";
/// Source → destination: the caller cancelled; followed by the reason.
pub const CANCEL: &str = "cancel";
/// Destination → source: the VM runs here and the plug is released; packets the source
/// recovers from its tap can go now.
pub const RESUMED: &str = "resumed";
/// The longest line accepted.
const MAX_LINE: u64 = 1024;

/// One side of the control stream.
#[derive(Debug)]
pub struct Ctl {
    reader: BufReader<TcpStream>,
    /// Bytes of a line not yet complete; kept across calls so that [`Ctl::recv`] is
    /// cancellation safe in a `select!`.
    pending: String,
}

/// Control-stream failures.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Reading or writing failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream.
    #[error("control stream closed by the peer")]
    Closed,
    /// The peer sent an overlong line.
    #[error("control stream: line longer than {MAX_LINE} bytes")]
    TooLong,
}

impl Ctl {
    /// Wraps an authenticated stream.
    pub fn new(stream: TcpStream) -> Self {
        Self { reader: BufReader::new(stream), pending: String::new() }
    }

    /// Sends one line.
    ///
    /// # Errors
    /// [`CtlError::Io`].
    pub async fn send(&mut self, line: &str) -> Result<(), CtlError> {
        let w = self.reader.get_mut();
        w.write_all(line.as_bytes()).await?;
        w.write_all(b"\n").await?;
        Ok(())
    }

    /// Receives one line (without the newline). Cancellation safe: a partly read line is kept
    /// for the next call.
    ///
    /// # Errors
    /// [`CtlError::Closed`] at EOF, [`CtlError::TooLong`], [`CtlError::Io`].
    pub async fn recv(&mut self) -> Result<String, CtlError> {
        loop {
            if let Some(i) = self.pending.find('\n') {
                let line = self.pending[..i].to_owned();
                self.pending.drain(..=i);
                return Ok(line);
            }
            let room = (MAX_LINE + 1).saturating_sub(self.pending.len() as u64);
            if room == 0 {
                return Err(CtlError::TooLong);
            }
            let n = (&mut self.reader).take(room).read_line(&mut self.pending).await?;
            if n == 0 {
                return Err(CtlError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_both_ways_and_limits() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = Ctl::new(TcpStream::connect(addr).await.expect("connect"));
            c.send(STORAGE_DONE).await.expect("send");
            c.recv().await.expect("recv")
        });
        let mut s = Ctl::new(l.accept().await.expect("accept").0);
        assert_eq!(s.recv().await.expect("recv"), STORAGE_DONE);
        s.send(OK).await.expect("send");
        assert_eq!(client.await.expect("join"), OK);
        assert!(matches!(s.recv().await, Err(CtlError::Closed)));

        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(&[b'x'; 4000]).await.expect("write");
        });
        let mut s = Ctl::new(l.accept().await.expect("accept").0);
        assert!(matches!(s.recv().await, Err(CtlError::TooLong)));
        client.await.expect("join");
    }
}
