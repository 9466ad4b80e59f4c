//! The authenticated streams of one incoming migration: the RAM stream handed to QEMU, and the
//! control stream — which may reconnect (a source delivering its decision after a restart or a
//! cut link), the newest connection being the current one — over which the source also has its
//! disk streams admitted to the NBD server's gate.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::dataplane::gate::Gate;
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
    /// The NBD server's listening socket (local disks only).
    pub(super) gate: Option<Arc<Gate>>,
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
    let Streams { qmp, bus, nbd, state_dir, multifd, gate, ctl_in, ctl_out, heartbeat } = streams;
    let mut children = AbortOnDrop(Vec::new());
    if let Some(rx) = expected.take_stream(ctl::STREAM) {
        let disks = Storage { nbd, gate };
        let task = tokio::spawn(serve_ctl(rx, qmp.clone(), bus.clone(), disks, ctl_in, ctl_out, heartbeat));
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
    // Stay registered (control reconnects) until the migration ends and aborts this task.
    std::future::pending::<()>().await;
    drop(expected);
}

/// The local disks' side of the control stream.
struct Storage {
    nbd: Option<NbdExports>,
    /// Dropped (and closed, QEMU's copy being gone with the server) once the exports stop.
    gate: Option<Arc<Gate>>,
}

impl Storage {
    /// Admits `port` of the control stream's peer `peer` to the gate.
    fn admit(&self, peer: Option<SocketAddr>, port: u16) -> CtlMsg {
        let (Some(gate), Some(peer)) = (&self.gate, peer) else {
            return CtlMsg::StorageError("no disk streams are expected now".into());
        };
        // A dual-stack listener sees an IPv4 peer as `::ffff:a.b.c.d`; the gate, on the node's
        // IPv4 address, sees it as itself.
        let from = SocketAddr::new(peer.ip().to_canonical(), port);
        match gate.admit(from) {
            Ok(()) => {
                tracing::debug!(%from, gate = %gate.local_addr(), "disk stream admitted");
                CtlMsg::NbdAdmitted(port)
            }
            Err(e) => CtlMsg::StorageError(e.to_string()),
        }
    }
}

/// Every control connection in turn; the newest replaces the current one.
async fn serve_ctl(
    mut rx: mpsc::UnboundedReceiver<tokio::net::TcpStream>,
    qmp: QmpClient,
    bus: EventBus,
    mut disks: Storage,
    out: mpsc::UnboundedSender<CtlEvent>,
    ctl_out: CtlOut,
    heartbeat: Heartbeat,
) {
    let mut current: Option<Ctl> = None;
    let mut peer: Option<SocketAddr> = None;
    loop {
        let event = tokio::select! {
            stream = rx.recv() => {
                let Some(stream) = stream else { return };
                peer = stream.peer_addr().ok();
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
            Ok(CtlMsg::NbdAdmit(port)) => {
                let _ = ctl_out.send(disks.admit(peer, port));
            }
            Ok(CtlMsg::StorageDone) => {
                let reply = match &disks.nbd {
                    Some(e) => match storage::stop_exports(&qmp, &bus, e, Duration::from_secs(30)).await {
                        Ok(()) => CtlMsg::StorageReleased,
                        Err(err) => CtlMsg::StorageError(err.to_string()),
                    },
                    None => CtlMsg::StorageReleased,
                };
                if matches!(reply, CtlMsg::StorageReleased) {
                    disks.gate = None;
                }
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
