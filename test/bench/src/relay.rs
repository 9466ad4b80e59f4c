//! The data plane's cost: the same bytes from node-a to node-b as a direct TCP stream, as TCP
//! into a gate (a listening socket on node-b whose filter admits the one port node-a bound:
//! the shape of an NBD stream, whose two QEMUs hold its ends themselves), and through a relay
//! at each end (unix → relay → authenticated TCP → relay → unix: a multifd channel on QEMU
//! 7.2) — on a multi-thread runtime like the agent's.
//!
//! Sockets are created on threads that entered the node's namespace and keep it; the data
//! moves on whatever thread runs them.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use katamaran::dataplane::gate::Gate;
use katamaran::dataplane::listener::connect;
use katamaran::dataplane::relay::{relay, Relayed};
use katamaran::dataplane::{DataListener, Secret, StreamKey};
use katamaran_e2e::netns::in_netns;
use katamaran_e2e::{Lab, Node};
use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
use tokio::runtime::Runtime;

use crate::report::RelayResult;

/// The writer's and the reader's buffer: large, as QEMU's own writes are.
const CHUNK: usize = 1 << 20;
const STEP: Duration = Duration::from_secs(20);

/// Measures `runs` samples of each path, alternating, `bytes` per sample.
///
/// # Errors
/// When a stream cannot be set up or carries the wrong byte count.
pub fn measure(lab: &Lab, rt: &Runtime, bytes: u64, runs: u32) -> anyhow::Result<RelayResult> {
    let mut out = RelayResult {
        bytes,
        path: "node-a → node-b over the lab's veths and bridge".into(),
        ..RelayResult::default()
    };
    let per_gib = |cpu: Duration| cpu.as_secs_f64() / (bytes as f64 / f64::from(1u32 << 30));
    for i in 0..runs {
        let (rate, cpu) = with_cpu(|| direct(lab, bytes))?;
        out.direct_mb_s.push(rate);
        out.direct_cpu_s_per_gib.push(per_gib(cpu));
        let (rate, cpu) = with_cpu(|| gated(lab, bytes))?;
        out.gated_mb_s.push(rate);
        out.gated_cpu_s_per_gib.push(per_gib(cpu));
        let (rate, cpu) = with_cpu(|| relayed(lab, rt, bytes, i))?;
        out.relay_mb_s.push(rate);
        out.relay_cpu_s_per_gib.push(per_gib(cpu));
    }
    Ok(out)
}

/// `/proc` reports process times in USER_HZ, which is 100 on every Linux architecture that
/// exposes it to user space.
const USER_HZ: f64 = 100.0;

/// User + system CPU time of this process so far (every thread, including finished ones).
fn process_cpu() -> Option<Duration> {
    stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime from a `/proc/PID/stat` line.
fn stat_cpu(stat: &str) -> Option<Duration> {
    // Fields after the parenthesised command name (which may hold spaces and parentheses):
    // state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

/// Runs `f` and returns its result with the CPU time the process spent meanwhile (the
/// benchmark's only busy threads are the stream's writer, reader and relays).
fn with_cpu<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let before = process_cpu().context("cannot read /proc/self/stat")?;
    let value = f()?;
    let after = process_cpu().context("cannot read /proc/self/stat")?;
    Ok((value, after.saturating_sub(before)))
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// Reads to EOF; returns the byte count and when EOF came.
fn drain(mut r: impl Read) -> std::io::Result<(u64, Instant)> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf)? {
            0 => return Ok((n, Instant::now())),
            k => n += k as u64,
        }
    }
}

/// Writes `bytes` and closes the write side; returns when the writing started.
fn fill(mut w: impl Write, bytes: u64) -> std::io::Result<Instant> {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[..k])?;
        left -= k as u64;
    }
    w.flush()?;
    Ok(start)
}

fn join_reader(h: JoinHandle<std::io::Result<(u64, Instant)>>) -> anyhow::Result<(u64, Instant)> {
    match h.join() {
        Ok(r) => Ok(r.context("the reader failed")?),
        Err(_) => bail!("the reader thread panicked"),
    }
}

fn direct(lab: &Lab, bytes: u64) -> anyhow::Result<f64> {
    let addr: SocketAddr = (Node::B.addr_v4(), 0).into();
    let listener = in_netns(&lab.netns(Node::B.name()), move || Ok(TcpListener::bind(addr)))??;
    let target = listener.local_addr()?;
    let reader = std::thread::spawn(move || {
        let (conn, _) = listener.accept()?;
        drain(conn)
    });
    let conn = in_netns(&lab.netns(Node::A.name()), move || Ok(TcpStream::connect(target)))??;
    let start = fill(&conn, bytes).context("direct stream: write")?;
    conn.shutdown(Shutdown::Write)?;
    let (got, end) = join_reader(reader)?;
    if got != bytes {
        bail!("direct stream carried {got} of {bytes} bytes");
    }
    Ok(mb_s(bytes, end.duration_since(start)))
}

/// A stream into a gate on node-b from the one node-a port it admitted, as the NBD path runs:
/// the reader plays the destination QEMU's NBD server, accepting on the gate itself.
fn gated(lab: &Lab, bytes: u64) -> anyhow::Result<f64> {
    let new_socket = || socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None);
    let b_ip = IpAddr::V4(Node::B.addr_v4());
    let open = move || -> anyhow::Result<Gate> { Ok(Gate::open(new_socket()?, b_ip, 1)?) };
    let gate = in_netns(&lab.netns(Node::B.name()), move || Ok(open()))??;
    let target = gate.local_addr();
    // The source's socket is bound before it is admitted, as the engine's is.
    let bound = move || -> anyhow::Result<TcpStream> {
        let s = new_socket()?;
        bind(s.as_raw_fd(), &SockaddrStorage::from(SocketAddr::from((Node::A.addr_v4(), 0))))?;
        Ok(TcpStream::from(s))
    };
    let client = in_netns(&lab.netns(Node::A.name()), move || Ok(bound()))??;
    gate.admit(client.local_addr()?)?;
    let listener = TcpListener::from(gate.as_fd().try_clone_to_owned()?);
    let reader = std::thread::spawn(move || {
        let (conn, _) = listener.accept()?;
        drain(conn)
    });
    connect_bound(&client, target).context("gated stream: connect")?;
    let start = fill(&client, bytes).context("gated stream: write")?;
    client.shutdown(Shutdown::Write)?;
    let (got, end) = join_reader(reader)?;
    drop(gate);
    if got != bytes {
        bail!("gated stream carried {got} of {bytes} bytes");
    }
    Ok(mb_s(bytes, end.duration_since(start)))
}

/// Connects the bound `client` to `to`, blocking.
fn connect_bound(client: &TcpStream, to: SocketAddr) -> std::io::Result<()> {
    nix::sys::socket::connect(client.as_raw_fd(), &SockaddrStorage::from(to)).map_err(std::io::Error::from)
}

/// The stream through a relay at each end.
fn relayed(lab: &Lab, rt: &Runtime, bytes: u64, sample: u32) -> anyhow::Result<f64> {
    let dir = lab.scratch_path("relay");
    std::fs::create_dir_all(&dir)?;
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let migration = format!("bench-relay-{sample}");
    let secret = Secret::generate()?;
    let key = StreamKey::new(&migration, "nbd:drive-0")?;

    // Destination: the node's data listener, bound inside node-b.
    let h = rt.handle().clone();
    let bind: SocketAddr = (Node::B.addr_v4(), 0).into();
    let listener = in_netns(&lab.netns(Node::B.name()), move || Ok(h.block_on(DataListener::bind(bind))))??;
    let mut expected = listener.expect(&migration, secret.clone(), &["nbd:drive-0"])?;
    // Source: the authenticated connection is made from node-a before the clock starts (the
    // listener queues it for `accept`).
    let h = rt.handle().clone();
    let addr = listener.local_addr();
    let tcp =
        in_netns(&lab.netns(Node::A.name()), move || Ok(h.block_on(connect(addr, &secret, &key, STEP))))??;
    // The reader plays the destination QEMU: behind a relay and a unix socket.
    let reader_listener = UnixListener::bind(&dst_sock)?;
    let reader = std::thread::spawn(move || {
        let (conn, _) = reader_listener.accept()?;
        drain(conn)
    });
    let dst_relay = {
        let dst_sock = dst_sock.clone();
        rt.spawn(async move {
            let tcp = expected.accept("nbd:drive-0", STEP).await?;
            let unix = tokio::net::UnixStream::connect(&dst_sock).await?;
            anyhow::Ok(relay(tcp, unix).await?)
        })
    };

    let src_listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&src_sock)?
    };
    let src_relay = rt.spawn(async move {
        let (unix, _) = src_listener.accept().await?;
        anyhow::Ok(relay(unix, tcp).await?)
    });

    // The writer plays the source QEMU's NBD client.
    let conn = UnixStream::connect(&src_sock)?;
    let start = fill(&conn, bytes).context("relayed stream: write")?;
    conn.shutdown(Shutdown::Write)?;
    let (got, end) = join_reader(reader)?;
    drop(conn);
    let counts = |r: Result<anyhow::Result<Relayed>, tokio::task::JoinError>, side: &str| match r {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.context(format!("{side} relay"))),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{side} relay task"))),
    };
    let (a, b) = rt.block_on(async {
        let a = tokio::time::timeout(STEP, src_relay).await.context("source relay did not end")?;
        let b = tokio::time::timeout(STEP, dst_relay).await.context("destination relay did not end")?;
        anyhow::Ok((a, b))
    })?;
    let a = counts(a, "source")?;
    let b = counts(b, "destination")?;
    drop(listener);
    remove_dir(&dir);
    if got != bytes || a.a_to_b != bytes || b.a_to_b != bytes {
        bail!("relayed stream carried {got} of {bytes} bytes (relays: {} and {})", a.a_to_b, b.a_to_b);
    }
    Ok(mb_s(bytes, end.duration_since(start)))
}

fn remove_dir(dir: &Path) {
    // Best effort: the directory lives under the lab root, which `down` removes anyway.
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_from_a_stat_line() {
        let line = "4242 (katamaran (x) bench) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(stat_cpu(line), Some(Duration::from_millis(2870)));
        assert_eq!(stat_cpu("4242 (x) S 1 2"), None, "truncated");
        assert_eq!(stat_cpu("garbage"), None);
    }
}
