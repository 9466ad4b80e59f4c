//! Recovering the packets a stopped source VM never read.
//!
//! Between QEMU's STOP and the route swap (tens of microseconds to a few milliseconds), packets
//! still reach the source sandbox and queue in its tap; QEMU stops reading the tap when the VM
//! stops and never reads it again after a completed migration. They would be lost. After the
//! migration completed, katamaran borrows QEMU's tap queue descriptors (`pidfd_getfd`, Linux
//! ≥ 5.6, needs ptrace rights over QEMU — root), reads every queued frame without blocking, and
//! sends the IP packets out again from the node, where the VM's address now routes to the
//! destination. They arrive late (reordered), not lost. The controlled switchover keeps this
//! queue empty where it can: after the route swap it waits ([`TapWatch`]) until the VM has read
//! what its tap holds before it stops the VM.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Frames taken from one tap's queues.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drained {
    /// IP packets (IPv4 or IPv6, starting at the IP header), in queue order per queue.
    pub packets: Vec<Vec<u8>>,
    /// Frames that were not IP (ARP, LLDP): dropped, they mean nothing to another node.
    pub other_frames: usize,
    /// Queue descriptors found for the tap.
    pub queues: usize,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, a descriptor number in that process and flags; it
    // duplicates the descriptor into this process or returns -1. No memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface name and flags a tun descriptor is attached to.
fn tun_iff(fd: &OwnedFd) -> io::Result<(String, libc::c_short)> {
    // SAFETY: `ifreq` is a plain C struct; all-zero bytes are valid for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills one `struct ifreq`; `req` is a valid, exclusively borrowed ifreq
    // and `fd` is open for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel NUL-terminates ifr_name within IFNAMSIZ, and `req` outlives the borrow.
    let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: TUNGETIFF sets the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((name, flags))
}

fn vnet_hdr_len(fd: &OwnedFd) -> io::Result<usize> {
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int; `len` is a valid, exclusively borrowed int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// One of a process's queue descriptors on a tap, duplicated into this process.
struct TapQueue {
    /// The descriptor's number in the process.
    number: RawFd,
    /// The duplicate (same open file description: same queue, same flags).
    fd: OwnedFd,
    /// `TUNGETIFF` flags.
    flags: libc::c_short,
}

/// Every descriptor process `pid` holds on `tap` (`/proc/<pid>/fd`, `pidfd_getfd`).
fn process_tap_queues(pid: u32, tap: &str) -> io::Result<Vec<TapQueue>> {
    let pidfd = pidfd_open(pid)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if target.as_os_str() != "/dev/net/tun" {
            continue;
        }
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        let fd = pidfd_getfd(&pidfd, number)?;
        let Ok((name, flags)) = tun_iff(&fd) else { continue };
        if name == tap {
            out.push(TapQueue { number, fd, flags });
        }
    }
    Ok(out)
}

/// Whether frames wait, unread, in a running VM's tap: its QEMU's queue descriptors, borrowed
/// and polled without reading (so the VM still gets every frame).
///
/// The controlled switchover uses it between the route swap and the stop: what the VM has not
/// read when it stops can only be recovered after the move ([`drain_process_tap`]), behind the
/// packets the destination held, out of order.
#[derive(Debug)]
pub struct TapWatch {
    queues: Vec<OwnedFd>,
}

impl TapWatch {
    /// Borrows the queue descriptors process `pid` holds on `tap`.
    ///
    /// # Errors
    /// When the process cannot be inspected, or holds no descriptor on `tap` (`NotFound`).
    pub fn open(pid: u32, tap: &str) -> io::Result<Self> {
        let queues: Vec<OwnedFd> = process_tap_queues(pid, tap)?.into_iter().map(|q| q.fd).collect();
        if queues.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} holds no queue of {tap}"),
            ));
        }
        Ok(Self { queues })
    }

    /// Whether any queue holds a frame (a poll that does not wait).
    ///
    /// # Errors
    /// When `poll` fails.
    pub fn pending(&self) -> io::Result<bool> {
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        let n =
            libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `fds` is a valid array of `n` pollfd structures that outlives the call; a zero
        // timeout never blocks.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fds.iter().any(|p| p.revents & libc::POLLIN != 0))
    }
}

/// Takes every frame queued on `tap` in process `pid`'s tap descriptors.
///
/// Call only once the process will never read the tap again (a completed outgoing migration).
/// Descriptors in blocking mode are skipped rather than risk hanging.
///
/// # Errors
/// When the process cannot be inspected (`/proc/<pid>/fd`, pidfd_open, pidfd_getfd).
pub fn drain_process_tap(pid: u32, tap: &str) -> io::Result<Drained> {
    let mut out = Drained::default();
    for TapQueue { number: num, fd, flags } in process_tap_queues(pid, tap)? {
        // SAFETY: F_GETFL takes no argument beyond the descriptor, which is open.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 || fl & libc::O_NONBLOCK == 0 {
            tracing::warn!(tap, fd = num, "tap queue is in blocking mode; not draining it");
            continue;
        }
        let hdr = if flags & (libc::IFF_VNET_HDR as libc::c_short) != 0 { vnet_hdr_len(&fd)? } else { 0 };
        out.queues += 1;
        let mut buf = vec![0u8; 65_536 + 64];
        loop {
            // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes and `fd` is open.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                break;
            }
            let (vnet, frame) = buf[..n].split_at(hdr.min(n));
            let mut frame = frame.to_vec();
            if !complete_checksum(vnet, &mut frame) {
                out.other_frames += 1;
                continue;
            }
            match ip_payload(&frame) {
                Some(p) => out.packets.push(p.to_vec()),
                None => out.other_frames += 1,
            }
        }
    }
    Ok(out)
}

/// `struct virtio_net_hdr` flag: the checksum from `csum_start` on is left to the receiver.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// Finishes what the tap left to its reader (`include/uapi/linux/virtio_net.h`): with
/// `NEEDS_CSUM`, the L4 checksum field holds only the pseudo-header sum, and the ones'-complement
/// sum from `csum_start` to the end must be folded into it. Returns `false` for frames that
/// cannot be sent as they are (segmentation offload, bad offsets).
pub fn complete_checksum(vnet: &[u8], frame: &mut [u8]) -> bool {
    let [flags, gso_type, ..] = *vnet else { return true };
    if gso_type != 0 {
        return false;
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return true;
    }
    let (Some(start), Some(offset)) = (
        vnet.get(6..8).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))),
        vnet.get(8..10).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))),
    ) else {
        return false;
    };
    let field = start + offset;
    if field + 2 > frame.len() || start > frame.len() {
        return false;
    }
    let mut sum: u32 = 0;
    for chunk in frame[start..].chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// The IP packet inside an Ethernet frame (one VLAN tag allowed), or `None` for other frames.
pub fn ip_payload(frame: &[u8]) -> Option<&[u8]> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    if ethertype == 0x8100 {
        off += 4;
        ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    let payload = frame.get(off + 2..)?;
    let version = payload.first()? >> 4;
    match (ethertype, version) {
        (0x0800, 4) | (0x86dd, 6) => Some(payload),
        _ => None,
    }
}

/// The destination address of an IP packet.
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Sends whole IP packets (headers included) into the calling thread's network namespace, to be
/// routed like any forwarded packet. Returns how many were sent.
///
/// # Errors
/// When a raw socket cannot be opened (needs CAP_NET_RAW).
pub fn reinject(packets: &[Vec<u8>]) -> io::Result<usize> {
    let raw = |family: libc::c_int| -> io::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments; returns a new descriptor or -1. IPPROTO_RAW
        // implies the caller supplies the IP header (IP_HDRINCL / IPV6_HDRINCL).
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let mut v4 = None;
    let mut v6 = None;
    let mut sent = 0;
    for p in packets {
        let ok = match ip_destination(p) {
            Some(IpAddr::V4(dst)) => {
                let fd = match &v4 {
                    Some(fd) => fd,
                    None => v4.insert(raw(libc::AF_INET)?),
                };
                // SAFETY: sockaddr_in is plain data; zeroed is valid, then the fields are set.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
                // SAFETY: `p` is a valid buffer of `p.len()` bytes; `sa` is a valid sockaddr_in
                // whose size is passed; `fd` is an open raw socket.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            Some(IpAddr::V6(dst)) => {
                let fd = match &v6 {
                    Some(fd) => fd,
                    None => v6.insert(raw(libc::AF_INET6)?),
                };
                // SAFETY: sockaddr_in6 is plain data; zeroed is valid, then the fields are set.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = dst.octets();
                // SAFETY: as above, for a sockaddr_in6.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (&sa as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
            None => -1,
        };
        if ok >= 0 {
            sent += 1;
        } else {
            tracing::debug!(error = %io::Error::last_os_error(), "re-sending a drained packet failed");
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_to_ip_packets() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[10, 244, 1, 10]);
        let f = frame(0x0800, &v4);
        assert_eq!(ip_payload(&f), Some(&v4[..]));
        assert_eq!(ip_destination(&v4), Some("10.244.1.10".parse().expect("ip")));
        let mut v6 = vec![0x60u8; 40];
        v6[24..40].copy_from_slice(&"fd00:244::10".parse::<Ipv6Addr>().expect("ip").octets());
        assert_eq!(
            ip_destination(ip_payload(&frame(0x86dd, &v6)).expect("v6")),
            Some("fd00:244::10".parse().expect("ip"))
        );
        let mut tagged = vec![0u8; 12];
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
        tagged.extend_from_slice(&v4);
        assert_eq!(ip_payload(&tagged), Some(&v4[..]), "VLAN tag skipped");
        assert_eq!(ip_payload(&frame(0x0806, &[0u8; 28])), None, "ARP is not forwarded");
        assert_eq!(ip_payload(&frame(0x0800, &[0x60; 20])), None, "version must match the ethertype");
        assert_eq!(ip_payload(&[0u8; 5]), None, "runt frame");
        assert_eq!(ip_destination(&[0x45, 0, 0]), None);
    }

    #[test]
    fn partial_checksums_are_completed() {
        // An IPv4/UDP frame whose UDP checksum field holds the pseudo-header sum only.
        let src = [10, 200, 0, 2];
        let dst = [10, 244, 1, 10];
        let payload = b"seq-0001";
        let udp_len = 8 + payload.len() as u16;
        let mut udp = vec![0x9c, 0x40, 0x00, 0x07];
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let fold = |mut s: u32| {
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            s as u16
        };
        let words = |b: &[u8]| {
            b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum::<u32>()
        };
        let pseudo = words(&src) + words(&dst) + 17 + u32::from(udp_len);
        let expected = !fold(pseudo + words(&udp));
        udp[6..8].copy_from_slice(&fold(pseudo).to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let mut frame = frame(0x0800, &ip);
        let start = frame.len();
        frame.extend_from_slice(&udp);
        let mut vnet = [0u8; 10];
        vnet[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vnet[6..8].copy_from_slice(&(start as u16).to_le_bytes());
        vnet[8..10].copy_from_slice(&6u16.to_le_bytes());
        assert!(complete_checksum(&vnet, &mut frame));
        assert_eq!(u16::from_be_bytes([frame[start + 6], frame[start + 7]]), expected);
        let mut gso = vnet;
        gso[1] = 1;
        assert!(!complete_checksum(&gso, &mut frame), "segmentation offload is not re-sent");
        assert!(complete_checksum(&[0u8; 10], &mut frame), "a full checksum stays");
        let mut bad = vnet;
        bad[6..8].copy_from_slice(&9999u16.to_le_bytes());
        assert!(!complete_checksum(&bad, &mut frame));
    }

    #[test]
    fn missing_process_is_an_error_not_a_panic() {
        assert!(drain_process_tap(4_194_999, "tap0_kata").is_err());
    }
}
