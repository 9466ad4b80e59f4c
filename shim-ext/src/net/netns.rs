//! Namespace threads (decision 2).
//!
//! A [`NetnsHandle`] owns one OS thread that `setns()`'d into the target
//! network namespace and runs a current-thread tokio runtime holding its own
//! rtnetlink connection. Requests from any runtime (or none) travel over an
//! unbounded channel as boxed jobs and are answered on a oneshot. The
//! connection task and the requests share that thread: a route replace costs
//! ~9 µs there against ~85 µs when a multi-thread runtime bounces between
//! threads, and no namespace switch is ever held across an `.await` of the
//! caller.
//!
//! Jobs run one after another in arrival order, so a caller that awaits each
//! operation sees them applied in program order.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

use nix::sched::{setns, unshare, CloneFlags};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::error::{errno_io, Error, Result};
use super::validate::{validate_netns_path, NetnsRoots};

/// The process's own network namespace (that of its main thread).
const SELF_NETNS: &str = "/proc/self/ns/net";

/// What a job gets on the namespace thread.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    /// rtnetlink handle whose connection task runs on this thread.
    pub(crate) nl: rtnetlink::Handle,
    /// The namespace path, for error messages.
    pub(crate) path: Arc<PathBuf>,
}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce(Ctx) -> LocalFuture + Send>;

/// A handle on a network namespace thread. Cloning shares the thread; it
/// ends when the last clone is dropped, and that drop waits for the jobs
/// already queued to finish and the thread to exit (so the namespace is no
/// longer pinned by it afterwards).
///
/// All [`NetOps`](super::NetOps) operations are implemented on it.
#[derive(Clone, Debug)]
pub struct NetnsHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: Arc<PathBuf>,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once queued jobs ran.
        self.jobs.take();
        let handle = self.thread.get_mut().ok().and_then(|h| h.take());
        if let Some(handle) = handle {
            // A job that captured the last clone drops it on the thread
            // itself; joining there would deadlock.
            if std::thread::current().id() != self.thread_id && handle.join().is_err() {
                warn!(netns = %self.path.display(), "network namespace thread panicked");
            }
        }
    }
}

impl NetnsHandle {
    /// Starts a thread in the namespace at `path` (validated against
    /// [`NetnsRoots::default`]).
    ///
    /// Blocks the caller until the thread has entered the namespace and
    /// opened its netlink socket (well under a millisecond), so that failures
    /// are reported here.
    ///
    /// # Errors
    /// [`Error::InvalidNetnsPath`], [`Error::OpenNetns`], [`Error::EnterNetns`],
    /// [`Error::SpawnThread`], [`Error::StartRuntime`], [`Error::NetlinkSocket`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_in(path, &NetnsRoots::default())
    }

    /// Like [`NetnsHandle::open`] with other allowed roots.
    ///
    /// # Errors
    /// As [`NetnsHandle::open`].
    pub fn open_in(path: impl AsRef<Path>, roots: &NetnsRoots) -> Result<Self> {
        let path = path.as_ref();
        validate_netns_path(path, roots)?;
        Self::spawn(path.to_owned())
    }

    /// A thread in the process's own (node/host) namespace.
    ///
    /// # Errors
    /// As [`NetnsHandle::open`].
    pub fn current() -> Result<Self> {
        Self::spawn(PathBuf::from(SELF_NETNS))
    }

    /// The namespace path this handle was opened with.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn spawn(path: PathBuf) -> Result<Self> {
        let ns = File::open(&path).map_err(|source| Error::OpenNetns { path: path.clone(), source })?;
        let path = Arc::new(path);
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<()>>(1);
        let thread_path = Arc::clone(&path);
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || thread_main(ns, thread_path, jobs_rx, ready_tx))
            .map_err(|source| Error::SpawnThread { path: path.to_path_buf(), source })?;
        let thread_id = thread.thread().id();
        let started = ready_rx.recv().unwrap_or_else(|_| Err(Error::ThreadGone { path: path.to_path_buf() }));
        if let Err(e) = started {
            // The thread returns right after reporting; reap it.
            let _ = thread.join();
            return Err(e);
        }
        debug!(netns = %path.display(), "network namespace thread started");
        Ok(Self {
            inner: Arc::new(Inner { path, jobs: Some(jobs_tx), thread: Mutex::new(Some(thread)), thread_id }),
        })
    }

    /// Runs `job` on the namespace thread with its rtnetlink handle and
    /// returns its result.
    pub(crate) async fn call<T, F, Fut>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let boxed: Job = Box::new(move |ctx| {
            Box::pin(async move {
                // The caller may have gone away; nothing to do then.
                let _ = tx.send(job(ctx).await);
            })
        });
        let gone = || Error::ThreadGone { path: self.inner.path.to_path_buf() };
        self.inner.jobs.as_ref().ok_or_else(gone)?.send(boxed).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Runs a blocking closure on the namespace thread, e.g. to bind a socket
    /// or spawn a process inside the namespace (both inherit the thread's
    /// namespace). It holds up the thread's other work, so keep it short.
    ///
    /// # Errors
    /// [`Error::ThreadGone`] if the thread ended or `f` panicked.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.call(move |_ctx| async move { Ok(f()) }).await
    }
}

fn thread_main(
    ns: File,
    path: Arc<PathBuf>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: std_mpsc::SyncSender<Result<()>>,
) {
    let fail = |e: Error| {
        let _ = ready.send(Err(e));
    };
    if let Err(e) = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET) {
        return fail(Error::EnterNetns { path: path.to_path_buf(), source: errno_io(e) });
    }
    drop(ns);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(source) => return fail(Error::StartRuntime { path: path.to_path_buf(), source }),
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // The socket takes the namespace of the thread that creates it: this one.
        let (conn, nl, _) = match rtnetlink::new_connection() {
            Ok(c) => c,
            Err(source) => return fail(Error::NetlinkSocket { path: path.to_path_buf(), source }),
        };
        tokio::task::spawn_local(conn);
        if ready.send(Ok(())).is_err() {
            return;
        }
        let ctx = Ctx { nl, path };
        while let Some(job) = jobs.recv().await {
            // A panicking job only loses its own reply (the oneshot sender
            // is dropped); the thread keeps serving.
            if tokio::task::spawn_local(job(ctx.clone())).await.is_err() {
                warn!(netns = %ctx.path.display(), "a network namespace job panicked");
            }
        }
    });
}

/// Creates a named network namespace at `path` the way `ip netns add` does:
/// an empty file bind-mounted over the namespace of a thread that
/// `unshare(CLONE_NEWNET)`'d. The namespace lives until [`remove_netns`].
///
/// The mount is made in the caller's mount namespace; a node agent running in
/// a pod needs the directory shared with the host (`mountPropagation:
/// Bidirectional`) for others to see it.
///
/// # Errors
/// [`Error::InvalidNetnsPath`] (validated against [`NetnsRoots::default`]),
/// [`Error::CreateNetns`] naming the failed step (`EEXIST` if it exists).
pub fn create_netns(path: &Path) -> Result<()> {
    create_netns_in(path, &NetnsRoots::default())
}

/// Like [`create_netns`] with other allowed roots.
///
/// # Errors
/// As [`create_netns`].
pub fn create_netns_in(path: &Path, roots: &NetnsRoots) -> Result<()> {
    validate_netns_path(path, roots)?;
    if roots.proc.as_ref().is_some_and(|p| path.starts_with(p)) {
        return Err(Error::InvalidNetnsPath {
            path: path.to_owned(),
            reason: "a process's namespace cannot be created",
        });
    }
    let err = |step, source| Error::CreateNetns { path: path.to_owned(), step, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("create the directory", e))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| err("create the mount point", e))?;

    // A short-lived thread carries the new namespace: unsharing on a caller's
    // thread would move that thread (maybe a runtime worker) out of its own.
    let target = path.to_owned();
    let mounted = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> Result<(), (&'static str, std::io::Error)> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ("unshare", errno_io(e)))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ("bind mount", errno_io(e)))
        })
        .map_err(|e| err("spawn a thread", e))?
        .join()
        .unwrap_or_else(|_| Err(("join the thread", std::io::Error::other("thread panicked"))));
    if let Err((step, source)) = mounted {
        let _ = std::fs::remove_file(path);
        return Err(err(step, source));
    }
    debug!(netns = %path.display(), "network namespace created");
    Ok(())
}

/// Removes a named namespace made by [`create_netns`] (or `ip netns add`):
/// lazy unmount, then unlink. Succeeds if it is already gone. The namespace
/// itself is freed once no thread, process or descriptor uses it.
///
/// # Errors
/// [`Error::RemoveNetns`] naming the failed step.
pub fn remove_netns(path: &Path) -> Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (half-created); ENOENT: already gone.
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::RemoveNetns { path: path.to_owned(), step: "unmount", source: errno_io(e) })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::RemoveNetns { path: path.to_owned(), step: "unlink", source }),
    }
    debug!(netns = %path.display(), "network namespace removed");
    Ok(())
}
