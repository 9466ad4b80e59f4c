//! The bare-QEMU baseline: the same guest moved by a minimal QMP sequence, with no cutover.
//!
//! Same lab, same guest, same QEMU settings as katamaran (capabilities `events`,
//! `auto-converge`, `pause-before-switchover` for local disks; `downtime-limit` 25 ms;
//! bandwidth uncapped) and the same transport: a TCP connection between the node namespaces,
//! handed to both QEMUs as an fd (`getfd`, `fd:` URIs) — for NBD too. What is missing is
//! everything katamaran adds: no destination prepared by an agent, no authenticated streams,
//! no relay, no forward at STOP, no hold on the destination tap. The router's routes move
//! after the destination's RESUME with one `ip -batch` (as `hack/naive-migrate.sh` does, like a
//! CNI that learns of the move afterwards), so every packet sent between STOP and that switch
//! is lost.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use katamaran::migration::qemu::list_disks;
use katamaran::qmp::{EventReceiver, QmpClient, QmpConfig, QmpEvent};
use katamaran_e2e::netns::in_netns;
use katamaran_e2e::{Lab, Node};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::cases::{Case, Storage};
use crate::guest::{self, ID, IP, IP6, NODE_B_V6, PROBE_TARGET};
use crate::katamaran_run::{mb_per_s, record_probe};
use crate::report::{m, Run};
use crate::RunConfig;

/// Runs one bare-QEMU migration of `case`; a failure is recorded in the returned run.
pub fn run(rt: &Runtime, cfg: &RunConfig, case: &Case, n: u32) -> Run {
    let mut run = Run::new(n, guest::load_1m());
    if let Err(e) = measure(rt, cfg, case, &mut run) {
        run.ok = false;
        run.error = Some(format!("{e:#}"));
    }
    run
}

/// Connections made before the clock starts (katamaran's data listener also exists before its
/// migration does).
struct Sockets {
    /// RAM: node-a end, node-b end.
    ram: (TcpStream, TcpStream),
    /// NBD (local storage): the listening socket for the destination's NBD server, and one
    /// connection to it from node-a per disk.
    nbd: Option<(TcpListener, Vec<TcpStream>)>,
}

fn connect_from_a(lab: &Lab, addr: std::net::SocketAddr) -> anyhow::Result<TcpStream> {
    in_netns(&lab.netns(Node::A.name()), move || Ok(TcpStream::connect(addr)))?
        .with_context(|| format!("connect from node-a to {addr}"))
}

fn listen_on_b(lab: &Lab) -> anyhow::Result<TcpListener> {
    let addr = (Node::B.addr_v4(), 0);
    in_netns(&lab.netns(Node::B.name()), move || Ok(TcpListener::bind(addr)))?.context("listen on node-b")
}

fn sockets(lab: &Lab, case: &Case) -> anyhow::Result<Sockets> {
    let listener = listen_on_b(lab)?;
    let a = connect_from_a(lab, listener.local_addr()?)?;
    let (b, _) = listener.accept().context("accept the RAM connection on node-b")?;
    let nbd = match case.storage {
        Storage::Shared => None,
        Storage::Local => {
            let l = listen_on_b(lab)?;
            // Completed by the kernel's backlog; QEMU's NBD server accepts it once started.
            let c = connect_from_a(lab, l.local_addr()?)?;
            Some((l, vec![c]))
        }
    };
    Ok(Sockets { ram: (a, b), nbd })
}

fn measure(rt: &Runtime, cfg: &RunConfig, case: &Case, run: &mut Run) -> anyhow::Result<()> {
    let mut lab = guest::lab_up()?;
    let src_paths = guest::start(&lab, case, &cfg.guest)?;
    lab.sandbox(Node::B, ID, IP, Some(IP6))?;
    let started = Instant::now();
    lab.vm(Node::B, ID, &guest::vm_options(case, true))?;
    run.set(m::DST_START_MS, Some(started.elapsed().as_secs_f64() * 1e3));
    let dst_paths = lab.paths(Node::B, ID)?;
    let socks = sockets(&lab, case)?;
    let batch = lab.scratch_path("converge.batch");
    std::fs::write(
        &batch,
        format!(
            "route replace {IP}/32 via {} proto static\nroute replace {IP6}/128 via {NODE_B_V6} proto static\n",
            Node::B.addr_v4()
        ),
    )?;
    let router = lab.netns("router");

    let probe = lab.spawn_probe(PROBE_TARGET, case.rate_pps)?;
    std::thread::sleep(cfg.before);
    let migrated = rt.block_on(migrate(
        &src_paths.extra_monitor,
        &dst_paths.extra_monitor,
        &socks,
        &router,
        &batch,
        cfg.timeout,
    ));
    std::thread::sleep(cfg.after);
    let report = probe.stop(Duration::from_secs(15)).context("the probe did not report")?;
    record_probe(run, &report);
    let t = migrated?;
    guest::record_health(run, &dst_paths.console, case);
    run.set(m::TOTAL_MS, Some(t.total.as_secs_f64() * 1e3));
    if let Some((d, bytes)) = t.storage {
        run.set(m::STORAGE_MS, Some(d.as_secs_f64() * 1e3));
        run.set(m::STORAGE_MB_S, mb_per_s(bytes, d));
    }
    run.set(m::RAM_MS, Some(t.ram.as_secs_f64() * 1e3));
    run.set(m::RAM_MB_S, t.qemu_total.and_then(|q| mb_per_s(t.ram_bytes, q)));
    run.set(m::RAM_MIB, Some(t.ram_bytes as f64 / f64::from(1u32 << 20)));
    run.set(m::QEMU_TOTAL_MS, t.qemu_total.map(|d| d.as_secs_f64() * 1e3));
    run.set(m::DOWNTIME_MS, t.downtime.map(|d| d.as_secs_f64() * 1e3));
    let span = |a: SystemTime, b: SystemTime| b.duration_since(a).ok().map(|d| d.as_secs_f64() * 1e3);
    run.set(m::STOP_TO_RESUME_MS, span(t.stop, t.resume));
    run.set(m::RESUME_TO_ROUTE_MS, span(t.resume, t.routed));
    run.set(m::BLACKOUT_MS, span(t.stop, t.routed));
    run.ok = true;
    drop(socks);
    lab.down()?;
    Ok(())
}

/// One QEMU's monitor and every event it has sent so far.
struct Qemu {
    qmp: QmpClient,
    events: EventReceiver,
    seen: Vec<QmpEvent>,
    role: &'static str,
}

impl Qemu {
    async fn connect(path: &Path, role: &'static str) -> anyhow::Result<Self> {
        let (qmp, events) = QmpClient::connect(path, &QmpConfig::default())
            .await
            .with_context(|| format!("QMP of the {role}"))?;
        Ok(Self { qmp, events, seen: Vec::new(), role })
    }

    async fn cmd(&self, command: &str, args: Value) -> anyhow::Result<Value> {
        let args = if args.is_null() { None } else { Some(args) };
        self.qmp.execute(command, args).await.with_context(|| format!("{} on the {}", command, self.role))
    }

    async fn getfd(&self, name: &str, fd: impl std::os::fd::AsFd) -> anyhow::Result<()> {
        self.qmp.getfd(name, fd).await.with_context(|| format!("getfd {name} on the {}", self.role))
    }

    /// The first event (already seen or still to come) that `pred` accepts.
    async fn wait(
        &mut self,
        what: &str,
        deadline: tokio::time::Instant,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> anyhow::Result<QmpEvent> {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return Ok(e.clone());
        }
        loop {
            let e = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("the {}'s QMP connection ended while waiting for {what}", self.role),
                Err(_) => bail!("no {what} from the {} in time", self.role),
            };
            self.seen.push(e.clone());
            if pred(&e) {
                return Ok(e);
            }
        }
    }
}

fn is_migration(e: &QmpEvent, status: &str) -> bool {
    e.name == "MIGRATION" && e.data_str("status") == Some(status)
}

fn job_event(e: &QmpEvent, name: &str, job: &str) -> bool {
    e.name == name && e.data_str("device") == Some(job)
}

/// What one bare migration measured.
struct Timeline {
    total: Duration,
    storage: Option<(Duration, u64)>,
    ram: Duration,
    ram_bytes: u64,
    downtime: Option<Duration>,
    qemu_total: Option<Duration>,
    stop: SystemTime,
    resume: SystemTime,
    routed: SystemTime,
}

async fn migrate(
    src_qmp: &Path,
    dst_qmp: &Path,
    socks: &Sockets,
    router_ns: &str,
    batch: &Path,
    timeout: Duration,
) -> anyhow::Result<Timeline> {
    let mut src = Qemu::connect(src_qmp, "source").await?;
    let mut dst = Qemu::connect(dst_qmp, "destination").await?;
    let local = socks.nbd.is_some();
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let cap = |c: &str, on: bool| json!({ "capability": c, "state": on });
    dst.cmd("migrate-set-capabilities", json!({ "capabilities": [cap("events", true)] })).await?;
    src.cmd(
        "migrate-set-capabilities",
        json!({ "capabilities": [
            cap("events", true), cap("auto-converge", true), cap("pause-before-switchover", local)
        ] }),
    )
    .await?;
    src.cmd("migrate-set-parameters", json!({ "downtime-limit": 25, "max-bandwidth": i64::MAX })).await?;

    let mut jobs = Vec::new();
    let mut storage = None;
    if let Some((listener, conns)) = &socks.nbd {
        dst.getfd("bench-nbd", listener).await?;
        dst.cmd("nbd-server-start", json!({ "addr": { "type": "fd", "data": { "str": "bench-nbd" } } }))
            .await?;
        for (i, d) in list_disks(&dst.qmp).await?.iter().enumerate() {
            dst.cmd(
                "block-export-add",
                json!({ "type": "nbd", "id": format!("bench-export-{i}"), "node-name": d.node_name,
                        "name": d.drive_id, "writable": true }),
            )
            .await?;
        }
        let disks = list_disks(&src.qmp).await?;
        if disks.len() != conns.len() {
            bail!("the source has {} disks, the benchmark connected {}", disks.len(), conns.len());
        }
        for (i, (d, conn)) in disks.iter().zip(conns).enumerate() {
            let (fd, node, job) =
                (format!("bench-nbd-{i}"), format!("bench-target-{i}"), format!("bench-mirror-{i}"));
            src.getfd(&fd, conn).await?;
            src.cmd(
                "blockdev-add",
                json!({ "driver": "nbd", "node-name": node, "server": { "type": "fd", "str": fd },
                        "export": d.drive_id }),
            )
            .await?;
            src.cmd(
                "blockdev-mirror",
                json!({ "job-id": job, "device": d.node_name, "target": node, "sync": "full" }),
            )
            .await?;
            jobs.push(job);
        }
        let mut bytes = 0;
        for job in &jobs {
            let ready =
                src.wait("BLOCK_JOB_READY", deadline, |e| job_event(e, "BLOCK_JOB_READY", job)).await?;
            bytes += ready.data.get("len").and_then(Value::as_u64).unwrap_or(0);
        }
        storage = Some((t0.elapsed(), bytes));
    }

    let ram_start = Instant::now();
    dst.getfd("bench-ram", &socks.ram.1).await?;
    dst.cmd("migrate-incoming", json!({ "uri": "fd:bench-ram" })).await?;
    src.getfd("bench-ram", &socks.ram.0).await?;
    src.cmd("migrate", json!({ "uri": "fd:bench-ram" })).await?;
    if local {
        // The order that keeps every guest write: settle the mirrors while the VM is paused,
        // stop the destination's NBD server before it may run, then let QEMU finish.
        src.wait("pre-switchover", deadline, |e| is_migration(e, "pre-switchover")).await?;
        for job in &jobs {
            src.cmd("block-job-cancel", json!({ "device": job })).await?;
            src.wait("BLOCK_JOB_COMPLETED", deadline, |e| job_event(e, "BLOCK_JOB_COMPLETED", job)).await?;
        }
        dst.cmd("nbd-server-stop", Value::Null).await?;
        src.cmd("migrate-continue", json!({ "state": "pre-switchover" })).await?;
    }
    let stop = src.wait("STOP", deadline, |e| e.name == "STOP").await?;
    let ram = stop.received_instant.saturating_duration_since(ram_start);
    let resume = dst.wait("RESUME", deadline, |e| e.name == "RESUME").await?;
    let status = tokio::process::Command::new("ip")
        .args(["-n", router_ns, "-batch"])
        .arg(batch)
        .status()
        .await
        .context("cannot run ip -batch in the router")?;
    let routed = SystemTime::now();
    let total = t0.elapsed();
    if !status.success() {
        bail!("ip -batch in the router failed ({status})");
    }
    src.wait("MIGRATION completed", deadline, |e| is_migration(e, "completed")).await?;
    let info = src.qmp.query_migrate().await.context("query-migrate on the source")?;
    Ok(Timeline {
        total,
        storage,
        ram,
        ram_bytes: info.ram.and_then(|r| r.transferred).unwrap_or(0),
        downtime: info.downtime,
        qemu_total: info.total_time,
        stop: stop.qemu_timestamp.unwrap_or(stop.received_at),
        resume: resume.qemu_timestamp.unwrap_or(resume.received_at),
        routed,
    })
}
