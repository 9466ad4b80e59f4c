//! A packet capture in a lab network namespace: what an observer on the node network reads.
//!
//! A thread in the namespace reads every frame from an `AF_PACKET` socket and keeps the TCP
//! payload going from one address to another, reassembled per connection in sequence order
//! (retransmitted bytes once), so a marker split across segments is still found.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;

use crate::{netns, LabError};

/// The TCP streams from one address to another, as captured.
#[derive(Debug, Default)]
pub struct Streams {
    /// Payload bytes per connection (source port, destination port), in sequence order.
    pub connections: HashMap<(u16, u16), Vec<u8>>,
    /// Frames read in all.
    pub frames: u64,
}

impl Streams {
    /// Payload bytes over every connection.
    pub fn bytes(&self) -> usize {
        self.connections.values().map(Vec::len).sum()
    }

    /// How many times `needle` occurs, over every connection.
    pub fn count(&self, needle: &[u8]) -> usize {
        self.connections.values().map(|c| c.windows(needle.len()).filter(|w| *w == needle).count()).sum()
    }
}

/// A running capture; [`Capture::stop`] ends it and returns what it kept.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Streams, LabError>>,
}

/// Per connection: the bytes so far and the sequence number the next byte has.
struct Flow {
    data: Vec<u8>,
    next: u32,
}

impl Capture {
    /// Starts capturing, in network namespace `ns`, IPv4 TCP payload from `from` to `to`.
    ///
    /// # Errors
    /// [`LabError::Capture`] when the socket cannot be opened, [`LabError::Netns`].
    pub fn start(ns: &str, from: Ipv4Addr, to: Ipv4Addr) -> Result<Self, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let name = ns.to_owned();
        let thread = std::thread::spawn(move || {
            netns::in_netns(&name, move || {
                let fd = match open() {
                    Ok(fd) => fd,
                    Err(e) => {
                        let _ = opened_tx.send(Some(e.to_string()));
                        return Ok(Streams::default());
                    }
                };
                let _ = opened_tx.send(None);
                Ok(read_until(&fd, &flag, from, to))
            })
        });
        let failed = |detail: String| LabError::Capture { netns: ns.to_owned(), detail };
        match opened_rx.recv() {
            Ok(None) => Ok(Self { stop, thread }),
            Ok(Some(e)) => Err(failed(format!("packet socket: {e}"))),
            // The thread ended before opening: entering the namespace failed.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(failed("the capture thread ended early".into())),
            },
        }
    }

    /// Stops and returns the streams.
    ///
    /// # Errors
    /// When the capture thread failed.
    pub fn stop(self) -> Result<Streams, LabError> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| LabError::Capture {
            netns: String::new(),
            detail: "the capture thread panicked".into(),
        })?
    }
}

fn open() -> nix::Result<std::os::fd::OwnedFd> {
    let fd =
        socket::socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::EthAll)?;
    // A migration sends ~100 MiB/s through the lab; a deep buffer keeps the reader from dropping.
    socket::setsockopt(&fd, sockopt::RcvBufForce, &(256 << 20))?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
    Ok(fd)
}

fn read_until(fd: &impl AsFd, stop: &AtomicBool, from: Ipv4Addr, to: Ipv4Addr) -> Streams {
    use std::os::fd::AsRawFd;
    let mut flows: HashMap<(u16, u16), Flow> = HashMap::new();
    let mut frames = 0u64;
    let mut buf = vec![0u8; 65_536 + 64];
    while !stop.load(Ordering::SeqCst) {
        let n = match socket::recv(fd.as_fd().as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        };
        frames += 1;
        if let Some((ports, seq, payload)) = tcp_payload(&buf[..n], from, to) {
            flows.entry(ports).or_insert_with(|| Flow { data: Vec::new(), next: seq }).push(seq, payload);
        }
    }
    Streams { connections: flows.into_iter().map(|(k, f)| (k, f.data)).collect(), frames }
}

impl Flow {
    /// Appends a segment: bytes already kept (a retransmission) are skipped; a gap (a frame the
    /// socket missed) is left as it is.
    fn push(&mut self, seq: u32, payload: &[u8]) {
        let behind = self.next.wrapping_sub(seq);
        let skip = if behind < (1 << 31) { behind as usize } else { 0 };
        if skip < payload.len() {
            self.data.extend_from_slice(&payload[skip..]);
            self.next = seq.wrapping_add(payload.len() as u32);
        }
    }
}

/// The ports, sequence number and payload of an Ethernet/IPv4/TCP frame from `from` to `to`.
fn tcp_payload(frame: &[u8], from: Ipv4Addr, to: Ipv4Addr) -> Option<((u16, u16), u32, &[u8])> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], ip[19]);
    if src != from || dst != to {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = ip.get(header..total.min(ip.len()))?;
    let ports = (u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]), u16::from_be_bytes([tcp[2], tcp[3]]));
    let seq = u32::from_be_bytes([*tcp.get(4)?, tcp[5], tcp[6], tcp[7]]);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some((ports, seq, tcp.get(offset..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], dst: [u8; 4], seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let mut tcp = vec![0x10, 0x00, 0x20, 0x00];
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        f.extend(ip);
        f.extend(tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn payload_of_the_wanted_direction_only() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let f = frame(a.octets(), b.octets(), 7, b"hello");
        assert_eq!(tcp_payload(&f, a, b), Some(((0x1000, 0x2000), 7, &b"hello"[..])));
        assert_eq!(tcp_payload(&f, b, a), None, "the other direction");
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(tcp_payload(&arp, a, b), None, "not IPv4");
        assert_eq!(tcp_payload(&f[..30], a, b), None, "truncated");
    }

    #[test]
    fn segments_are_joined_in_order_and_retransmissions_kept_once() {
        let mut flow = Flow { data: Vec::new(), next: u32::MAX - 2 };
        flow.push(u32::MAX - 2, b"KMR-");
        flow.push(u32::MAX - 2, b"KMR-");
        flow.push(1, b"-MARK");
        flow.push(1, b"-MARKER");
        flow.push(8, b"!");
        let s = Streams { connections: HashMap::from([((1, 2), flow.data)]), frames: 5 };
        assert_eq!(s.connections[&(1, 2)], b"KMR--MARKER!", "across the sequence wrap");
        assert_eq!((s.count(b"-MARKER"), s.bytes()), (1, 12));
    }
}
