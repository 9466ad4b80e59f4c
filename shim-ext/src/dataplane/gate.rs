//! A listening TCP socket that QEMU accepts on itself and that the kernel opens to named peers
//! only: the destination's NBD server, reached without a relay.
//!
//! QEMU's NBD server only accepts connections on a listening socket, so an authenticated
//! connection cannot be handed to it as the RAM stream is. Instead the destination agent makes
//! the listening socket in the node's namespace and gives it to QEMU (`getfd`, SocketAddress
//! `fd`), and a classic BPF socket filter on it drops every segment whose source is not an
//! admitted `address:port`. The source agent binds its socket first, names the port on the
//! authenticated control stream, and connects only once the destination admitted it; the
//! destination takes the address from that control stream's peer. Nothing else completes a TCP
//! handshake with the socket: a SYN from elsewhere is dropped before the listener sees it. An
//! accepted connection keeps the filter it was accepted under, so its later segments must come
//! from the same peer too.
//!
//! ```text
//!  ldh [0]            source port (a TCP socket's filter sees the packet from the TCP header)
//!  jeq #port          else next peer
//!  ld  [net + 12]     IPv4 source (IPv6: four words from net + 8)
//!  jeq #address       → accept, else next peer
//!  …
//!  ret #0             drop
//!  ret #-1            accept
//! ```

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::socket::{bind, getsockname, listen, Backlog, SockaddrStorage};

use super::{io_err, Error};

/// The most peers one gate admits: a migration admits one per local disk, and the filter's
/// jumps (8 bits) reach over at most 25 IPv6 peers.
pub const MAX_ADMITTED: usize = 24;

// Classic BPF opcodes (linux/bpf_common.h) and the ancillary offset of the network header
// (linux/filter.h), which a socket filter needs to read addresses ahead of the TCP header.
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_ABS: u16 = 0x20;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const SKF_NET_OFF: i32 = -0x10_0000;

/// The listening socket and the peers it admits.
#[derive(Debug)]
pub struct Gate {
    socket: OwnedFd,
    local: SocketAddr,
    capacity: usize,
    admitted: Mutex<Vec<SocketAddr>>,
}

impl Gate {
    /// Turns `socket` (a new TCP socket of `ip`'s family, made where it must listen) into a gate
    /// bound to `ip` on a port the kernel picks, listening, admitting no one yet; at most
    /// `capacity` peers may be admitted later. The filter is in place before the socket listens.
    ///
    /// # Errors
    /// [`Error::Io`] naming the step; [`Error::Gate`] for a capacity over [`MAX_ADMITTED`].
    pub fn open(socket: OwnedFd, ip: IpAddr, capacity: usize) -> Result<Self, Error> {
        if capacity == 0 || capacity > MAX_ADMITTED {
            return Err(Error::Gate(format!("a gate admits 1 to {MAX_ADMITTED} peers, not {capacity}")));
        }
        attach(&socket, &program(&[])).map_err(io_err("gate: attach the filter"))?;
        // Accepted connections inherit these: QEMU's side of a stream whose peer vanished ends
        // within the bound a paused guest waits.
        super::bound_dead_peer(&socket);
        let addr = SockaddrStorage::from(SocketAddr::new(ip, 0));
        bind(socket.as_raw_fd(), &addr).map_err(|e| io_err(format!("gate: bind {ip}"))(e.into()))?;
        let backlog = Backlog::new(i32::try_from(capacity).unwrap_or(i32::MAX))
            .map_err(|e| io_err("gate: backlog")(e.into()))?;
        listen(&socket, backlog).map_err(|e| io_err("gate: listen")(e.into()))?;
        let local: SockaddrStorage =
            getsockname(socket.as_raw_fd()).map_err(|e| io_err("gate: local address")(e.into()))?;
        let local = to_socket_addr(&local).ok_or_else(|| Error::Gate("gate: not an IP socket".into()))?;
        Ok(Self { socket, local, capacity, admitted: Mutex::new(Vec::new()) })
    }

    /// Where the gate listens.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The listening socket, for QEMU.
    #[must_use]
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Lets `peer` (its address and source port) connect, once the filter is replaced; peers
    /// admitted earlier stay admitted. Admitting a peer twice counts once.
    ///
    /// # Errors
    /// [`Error::Gate`] for a peer of the other family, a port 0, or a full gate; [`Error::Io`]
    /// when the kernel refuses the filter.
    pub fn admit(&self, peer: SocketAddr) -> Result<(), Error> {
        if peer.is_ipv4() != self.local.is_ipv4() || peer.port() == 0 {
            return Err(Error::Gate(format!("gate on {} cannot admit {peer}", self.local)));
        }
        let mut admitted = self.admitted.lock().map_err(|_| Error::Gate("gate state poisoned".into()))?;
        if admitted.contains(&peer) {
            return Ok(());
        }
        if admitted.len() >= self.capacity {
            return Err(Error::Gate(format!(
                "gate on {} already admitted {} peer(s)",
                self.local, self.capacity
            )));
        }
        let mut next = admitted.clone();
        next.push(peer);
        attach(&self.socket, &program(&next)).map_err(io_err("gate: replace the filter"))?;
        *admitted = next;
        Ok(())
    }
}

fn to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k }
}

/// The network header's byte `offset` as a classic BPF absolute offset.
fn net(offset: i32) -> u32 {
    // Negative offsets are how classic BPF names the ancillary areas; the kernel reads k as signed.
    (SKF_NET_OFF + offset) as u32
}

/// The filter admitting exactly `peers` (all of one family): per peer, its source port, then
/// each 32-bit word of its address; a mismatch jumps to the next peer, the last to "drop".
fn program(peers: &[SocketAddr]) -> Vec<libc::sock_filter> {
    let words = |p: &SocketAddr| -> (i32, Vec<u32>) {
        match p.ip() {
            IpAddr::V4(a) => (12, vec![u32::from(a)]),
            IpAddr::V6(a) => {
                let o = a.octets();
                (8, o.chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
        }
    };
    let block = |p: &SocketAddr| 2 + 2 * words(p).1.len();
    let drop_at: usize = peers.iter().map(block).sum();
    let accept_at = drop_at + 1;
    // Distances stay within u8: MAX_ADMITTED IPv6 blocks of 10 instructions each.
    let rel = |from: usize, to: usize| u8::try_from(to - from - 1).unwrap_or(u8::MAX);
    let mut out = Vec::with_capacity(accept_at + 1);
    for p in peers {
        let base = out.len();
        let next = base + block(p);
        out.push(stmt(BPF_LD | BPF_H | BPF_ABS, 0));
        out.push(jeq(u32::from(p.port()), 0, rel(base + 1, next)));
        let (offset, ws) = words(p);
        for (j, w) in ws.iter().enumerate() {
            out.push(stmt(BPF_LD | BPF_W | BPF_ABS, net(offset + 4 * j as i32)));
            let at = out.len();
            let last = j + 1 == ws.len();
            out.push(jeq(*w, if last { rel(at, accept_at) } else { 0 }, rel(at, next)));
        }
    }
    out.push(stmt(BPF_RET | BPF_K, 0));
    out.push(stmt(BPF_RET | BPF_K, u32::MAX));
    out
}

/// Attaches (or atomically replaces) the socket filter `prog` on `socket`.
fn attach(socket: &OwnedFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::other("filter too long"))?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr().cast_mut() };
    // SAFETY: `fprog` points at `len` initialised instructions that outlive the call (the
    // kernel copies the program), and the option length is the struct's size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
    use std::time::Duration;

    use katamaran_test_skip::{skip, Tier};
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

    fn tcp_socket(v6: bool) -> OwnedFd {
        let family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket")
    }

    /// A client socket bound to an ephemeral port of `ip`, not yet connected.
    fn bound_client(ip: IpAddr) -> (OwnedFd, SocketAddr) {
        let s = tcp_socket(ip.is_ipv6());
        bind(s.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(ip, 0))).expect("bind client");
        let local: SockaddrStorage = getsockname(s.as_raw_fd()).expect("getsockname");
        (s, to_socket_addr(&local).expect("ip"))
    }

    /// Connects the bound `socket` to `to`; `None` if the handshake did not complete `within`.
    async fn connect_within(socket: OwnedFd, to: SocketAddr, within: Duration) -> Option<TcpStream> {
        let std = TcpStream::from(socket);
        std.set_nonblocking(true).expect("nonblocking");
        let sock = tokio::net::TcpSocket::from_std_stream(std);
        let stream = tokio::time::timeout(within, sock.connect(to)).await.ok()?.expect("connect");
        let std = stream.into_std().expect("std");
        std.set_nonblocking(false).expect("blocking");
        Some(std)
    }

    fn listener_of(gate: &Gate) -> TcpListener {
        TcpListener::from(gate.as_fd().try_clone_to_owned().expect("dup"))
    }

    async fn admits_only_the_named_peer(ip: IpAddr) {
        let gate = Gate::open(tcp_socket(ip.is_ipv6()), ip, 2).expect("gate");
        let to = gate.local_addr();
        assert_eq!(to.ip(), ip);
        assert_ne!(to.port(), 0);

        // Nobody is admitted yet: the SYN is dropped, the connection never completes.
        let (early, _) = bound_client(ip);
        assert!(
            connect_within(early, to, Duration::from_millis(300)).await.is_none(),
            "a peer nobody admitted got in"
        );

        let (client, from) = bound_client(ip);
        let (other, _) = bound_client(ip);
        gate.admit(from).expect("admit");
        let mut stream =
            connect_within(client, to, Duration::from_secs(5)).await.expect("the admitted peer connects");
        // Another port of the same address stays out.
        assert!(
            connect_within(other, to, Duration::from_millis(300)).await.is_none(),
            "an unadmitted port got in"
        );

        let (mut accepted, seen) = listener_of(&gate).accept().expect("accept");
        assert_eq!(seen, from, "the one connection accepted is the admitted peer's");
        stream.write_all(b"nbd").expect("write");
        let mut got = [0u8; 3];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"nbd");
    }

    #[tokio::test]
    async fn admits_only_the_named_ipv4_peer() {
        admits_only_the_named_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    }

    fn ipv6_loopback() -> bool {
        let there = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
        if !there {
            skip(Tier::Ipv6, "no IPv6 loopback on this machine");
        }
        there
    }

    #[tokio::test]
    async fn admits_only_the_named_ipv6_peer() {
        if !ipv6_loopback() {
            return;
        }
        admits_only_the_named_peer(IpAddr::V6(Ipv6Addr::LOCALHOST)).await;
    }

    #[test]
    fn refuses_other_families_port_zero_and_more_than_its_capacity() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let gate = Gate::open(tcp_socket(false), ip, 1).expect("gate");
        let v6: SocketAddr = (Ipv6Addr::LOCALHOST, 4000).into();
        assert!(matches!(gate.admit(v6), Err(Error::Gate(_))));
        assert!(matches!(gate.admit((ip, 0).into()), Err(Error::Gate(_))));
        gate.admit((ip, 4000).into()).expect("first");
        gate.admit((ip, 4000).into()).expect("the same peer again");
        let full = gate.admit((ip, 4001).into()).expect_err("over capacity");
        assert!(full.to_string().contains("already admitted 1"), "{full}");
        for bad in [0, MAX_ADMITTED + 1] {
            let e = Gate::open(tcp_socket(false), ip, bad).expect_err("capacity");
            assert!(e.to_string().contains(&bad.to_string()), "{e}");
        }
    }

    #[test]
    fn the_largest_program_keeps_its_jumps_in_range() {
        let peers: Vec<SocketAddr> =
            (0..MAX_ADMITTED).map(|i| SocketAddr::from((Ipv6Addr::LOCALHOST, 1000 + i as u16))).collect();
        let prog = program(&peers);
        assert_eq!(prog.len(), MAX_ADMITTED * 10 + 2);
        for (i, ins) in prog.iter().enumerate() {
            if ins.code == BPF_JMP | BPF_JEQ | BPF_K {
                for off in [ins.jt, ins.jf] {
                    assert!(i + 1 + usize::from(off) < prog.len(), "jump from {i} out of the program");
                }
            }
        }
        // The kernel accepts it.
        if !ipv6_loopback() {
            return;
        }
        let gate = Gate::open(tcp_socket(true), IpAddr::V6(Ipv6Addr::LOCALHOST), MAX_ADMITTED).expect("gate");
        for p in peers {
            gate.admit(p).expect("the kernel takes the filter");
        }
    }
}
