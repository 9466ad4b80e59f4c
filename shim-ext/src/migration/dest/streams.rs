//! The authenticated streams of one incoming migration: NBD relays per drive, the RAM stream
//! handed to QEMU, and the control stream — which may reconnect (a source delivering its
//! decision after a restart or a cut link), the newest connection being the current one.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::dataplane::{relay, Expected};
use crate::migration::ctl::{self, Ctl, CtlError, CtlMsg, CtlSender, Heartbeat};
use crate::migration::error::EngineError;
use crate::migration::qemu::{compute, storage, EventBus, NbdExports};
use crate::qmp::QmpClient;

/// What the control stream tells the receiver.
#[derive(Debug)]
pub enum CtlEvent {
    /// A control connection was authenticated (the first, or a reconnect).
    Connected,
    /// A message (storage hand-off is handled here and not passed on).
    Msg(CtlMsg),
    /// The current connection ended.
    Lost(CtlError),
}

/// Sends on the current control connection; clones share it.
#[derive(Debug, Clone, Default)]
pub struct CtlOut(Arc<Mutex<Option<CtlSender>>>);

impl CtlOut {
    /// Queues `msg` on the current connection.
    ///
    /// # Errors
    /// [`CtlError::Closed`] when no connection is up.
    pub fn send(&self, msg: CtlMsg) -> Result<(), CtlError> {
        let sender = self.0.lock().ok().and_then(|s| s.clone()).ok_or(CtlError::Closed)?;
        sender.send(msg)
    }

    /// Sends `msg` on the current connection and waits (at most `limit`) until it was written.
    ///
    /// # Errors
    /// [`CtlError::Closed`] when no connection is up or the write did not happen in time.
    pub async fn deliver(&self, msg: CtlMsg, limit: Duration) -> Result<(), CtlError> {
        let sender = self.0.lock().ok().and_then(|s| s.clone()).ok_or(CtlError::Closed)?;
        sender.deliver(msg, limit).await
    }

    fn set(&self, sender: Option<CtlSender>) {
        if let Ok(mut s) = self.0.lock() {
            *s = sender;
        }
    }
}

/// What the stream acceptors of one incoming migration work with.
pub(super) struct Streams {
    pub(super) qmp: QmpClient,
    pub(super) bus: EventBus,
    pub(super) nbd: Option<NbdExports>,
    pub(super) state_dir: PathBuf,
    pub(super) multifd: bool,
    pub(super) drives: Vec<String>,
    pub(super) ctl_in: mpsc::UnboundedSender<CtlEvent>,
    pub(super) ctl_out: CtlOut,
    pub(super) heartbeat: Heartbeat,
}

/// Aborts the tasks it holds when dropped: the acceptors die with [`serve`], so nothing keeps
/// the incoming QEMU's single-client QMP connection once the migration ended.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Serves the streams until aborted.
pub(super) async fn serve(mut expected: Expected, streams: Streams) {
    let Streams { qmp, bus, nbd, state_dir, multifd, drives, ctl_in, ctl_out, heartbeat } = streams;
    let mut children = AbortOnDrop(Vec::new());
    for drive in drives {
        let key = format!("nbd:{drive}");
        let sock = state_dir.join("nbd.sock");
        // One acceptor per drive; each connection relays to QEMU's NBD server.
        let Some(mut rx) = expected.take_stream(&key) else { continue };
        let acceptor = tokio::spawn(async move {
            while let Some(tcp) = rx.recv().await {
                let sock = sock.clone();
                tokio::spawn(async move {
                    match UnixStream::connect(&sock).await {
                        Ok(unix) => {
                            let _ = relay::relay(tcp, unix).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "NBD server unreachable"),
                    }
                });
            }
        });
        children.0.push(acceptor.abort_handle());
    }
    if let Some(rx) = expected.take_stream(ctl::STREAM) {
        let task = tokio::spawn(serve_ctl(rx, qmp.clone(), bus.clone(), nbd, ctl_in, ctl_out, heartbeat));
        children.0.push(task.abort_handle());
    }
    // RAM.
    if let Some(mut rx) = expected.take_stream("ram") {
        if multifd {
            let sock = state_dir.join("ram.sock");
            match compute::start_incoming(&qmp, &format!("unix:{}", sock.display())).await {
                Ok(()) => {
                    let acceptor = tokio::spawn(async move {
                        while let Some(tcp) = rx.recv().await {
                            let sock = sock.clone();
                            tokio::spawn(async move {
                                if let Ok(unix) = UnixStream::connect(&sock).await {
                                    let _ = relay::relay(tcp, unix).await;
                                }
                            });
                        }
                    });
                    children.0.push(acceptor.abort_handle());
                }
                Err(e) => tracing::error!(error = %e, "migrate-incoming failed"),
            }
        } else if let Some(tcp) = rx.recv().await {
            let result = async {
                let std = tcp.into_std().map_err(EngineError::io("detach the RAM stream"))?;
                qmp.getfd("kmr-ram", std.as_fd()).await?;
                drop(std);
                compute::start_incoming(&qmp, "fd:kmr-ram").await?;
                Ok::<(), EngineError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot start the incoming RAM stream");
            }
        }
    }
    // Stay registered (late NBD reconnects, control reconnects) until the migration ends and
    // aborts this task.
    std::future::pending::<()>().await;
    drop(expected);
}

/// Every control connection in turn; the newest replaces the current one.
async fn serve_ctl(
    mut rx: mpsc::UnboundedReceiver<tokio::net::TcpStream>,
    qmp: QmpClient,
    bus: EventBus,
    nbd: Option<NbdExports>,
    out: mpsc::UnboundedSender<CtlEvent>,
    ctl_out: CtlOut,
    heartbeat: Heartbeat,
) {
    let mut current: Option<Ctl> = None;
    loop {
        let event = tokio::select! {
            stream = rx.recv() => {
                let Some(stream) = stream else { return };
                let c = Ctl::new(stream, heartbeat);
                ctl_out.set(Some(c.sender()));
                current = Some(c);
                let _ = out.send(CtlEvent::Connected);
                continue;
            }
            msg = async {
                match current.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            } => msg,
        };
        match event {
            Ok(CtlMsg::StorageDone) => {
                let reply = match &nbd {
                    Some(e) => match storage::stop_exports(&qmp, &bus, e, Duration::from_secs(30)).await {
                        Ok(()) => CtlMsg::StorageReleased,
                        Err(err) => CtlMsg::StorageError(err.to_string()),
                    },
                    None => CtlMsg::StorageReleased,
                };
                let _ = ctl_out.send(reply);
            }
            Ok(m) => {
                let _ = out.send(CtlEvent::Msg(m));
            }
            Err(e) => {
                ctl_out.set(None);
                current = None;
                let _ = out.send(CtlEvent::Lost(e));
            }
        }
    }
}
