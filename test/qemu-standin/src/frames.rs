//! What the stand-in's "guest" does with a frame from its tap: answer ARP, ping and UDP echo
//! (port 7, the lab guest's echo), in IPv4 and IPv6. Pure functions over byte slices.
//!
//! Replies go back to the frame's source MAC, so the guest needs no neighbour table; ARP
//! requests are all answered (only the node's veth, through the sandbox's mirred redirect, is on
//! the tap's segment, and it asks only for the guest).

/// The UDP port echoed (RFC 862).
pub const ECHO_PORT: u16 = 7;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_RARP: u16 = 0x8035;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// What a frame asked of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A UDP echo request: the reply.
    Echo(Vec<u8>),
    /// ARP or ping: the reply.
    Other(Vec<u8>),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The guest's answer to `frame`, if any; `mac` is the guest NIC's address.
pub fn respond(frame: &[u8], mac: [u8; 6]) -> Option<Answer> {
    let src: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let reply_eth = |ethertype: u16, payload: &[u8]| {
        let mut out = Vec::with_capacity(ETH_HLEN + payload.len());
        out.extend_from_slice(&src);
        out.extend_from_slice(&mac);
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(payload);
        out
    };
    let payload = frame.get(ETH_HLEN..)?;
    match be16(frame, 12)? {
        ETHERTYPE_ARP => arp_reply(payload, mac).map(|p| Answer::Other(reply_eth(ETHERTYPE_ARP, &p))),
        ETHERTYPE_IPV4 => ipv4(payload).map(|(echo, p)| wrap(echo, reply_eth(ETHERTYPE_IPV4, &p))),
        ETHERTYPE_IPV6 => ipv6(payload).map(|(echo, p)| wrap(echo, reply_eth(ETHERTYPE_IPV6, &p))),
        _ => None,
    }
}

fn wrap(echo: bool, frame: Vec<u8>) -> Answer {
    if echo {
        Answer::Echo(frame)
    } else {
        Answer::Other(frame)
    }
}

/// An ARP request (Ethernet/IPv4) → the reply saying the target IP is at `mac`.
fn arp_reply(p: &[u8], mac: [u8; 6]) -> Option<Vec<u8>> {
    // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request).
    if p.len() < 28 || be16(p, 0)? != 1 || be16(p, 2)? != ETHERTYPE_IPV4 || p[4] != 6 || p[5] != 4 {
        return None;
    }
    if be16(p, 6)? != 1 {
        return None;
    }
    let (sha, spa, tpa) = (&p[8..14], &p[14..18], &p[24..28]);
    if spa == tpa {
        return None; // a gratuitous ARP announces, it asks nothing
    }
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&p[0..6]);
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(&mac);
    out.extend_from_slice(tpa);
    out.extend_from_slice(sha);
    out.extend_from_slice(spa);
    Some(out)
}

/// The Internet checksum of `data` (one's complement sum of 16-bit words), starting from `sum`.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 UDP echo or ICMP echo request → (is a UDP echo, the reply's IP packet).
fn ipv4(p: &[u8]) -> Option<(bool, Vec<u8>)> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let total = usize::from(be16(p, 2)?);
    if total < ihl || total > p.len() || be16(p, 6)? & 0x3fff != 0 {
        return None; // truncated or a fragment
    }
    let p = &p[..total];
    let (header, body) = p.split_at(ihl);
    let (echo, body) = match header[9] {
        PROTO_UDP if be16(body, 2)? == ECHO_PORT && body.len() >= 8 => {
            let mut udp = body.to_vec();
            udp[0..2].copy_from_slice(&body[2..4]);
            udp[2..4].copy_from_slice(&body[0..2]);
            udp[6..8].copy_from_slice(&[0, 0]); // IPv4 allows no UDP checksum
            (true, udp)
        }
        PROTO_ICMP if body.first() == Some(&8) && body.len() >= 8 => {
            let mut icmp = body.to_vec();
            icmp[0] = 0;
            icmp[2..4].copy_from_slice(&[0, 0]);
            let sum = checksum(0, &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            (false, icmp)
        }
        _ => return None,
    };
    let mut h = header.to_vec();
    h[8] = 64;
    h[12..16].copy_from_slice(&header[16..20]);
    h[16..20].copy_from_slice(&header[12..16]);
    h[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(0, &h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(&body);
    Some((echo, h))
}

/// An IPv6 UDP echo (no extension headers) or ICMPv6 echo request → the reply.
fn ipv6(p: &[u8]) -> Option<(bool, Vec<u8>)> {
    if p.len() < 40 || p[0] >> 4 != 6 {
        return None;
    }
    let len = usize::from(be16(p, 4)?);
    let body = p.get(40..40 + len)?;
    let (src, dst) = (&p[8..24], &p[24..40]);
    let (echo, proto, mut out, sum_at) = match p[6] {
        PROTO_UDP if be16(body, 2)? == ECHO_PORT && body.len() >= 8 => {
            let mut udp = body.to_vec();
            udp[0..2].copy_from_slice(&body[2..4]);
            udp[2..4].copy_from_slice(&body[0..2]);
            (true, PROTO_UDP, udp, 6)
        }
        PROTO_ICMPV6 if body.first() == Some(&128) && body.len() >= 8 => {
            let mut icmp = body.to_vec();
            icmp[0] = 129;
            (false, PROTO_ICMPV6, icmp, 2)
        }
        _ => return None,
    };
    out[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
    // Pseudo-header: the reply's source (the request's destination) and destination.
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(&u32::try_from(out.len()).ok()?.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    let mut sum = 0u32;
    for c in pseudo.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    let mut c = checksum(sum, &out);
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    out[sum_at..sum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut h = p[..40].to_vec();
    h[7] = 64;
    h[8..24].copy_from_slice(dst);
    h[24..40].copy_from_slice(src);
    h.extend_from_slice(&out);
    Some((echo, h))
}

/// The frame QEMU's `announce-self` sends for a NIC: a broadcast RARP request from its MAC
/// (QEMU's `qemu_announce_self`), which teaches switches where the MAC now is.
pub fn announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, 6, 4, reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const NODE: [u8; 6] = [0xee; 6];

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = GUEST.to_vec();
        f.extend_from_slice(&NODE);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn udp4(dport: u16, data: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + data.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 63, PROTO_UDP, 0, 0, 10, 81, 0, 2, 10, 244, 1, 5];
        ip[2..4].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
        let sum = checksum(0, &ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&u16::try_from(8 + data.len()).expect("small").to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(data);
        eth(ETHERTYPE_IPV4, &ip)
    }

    #[test]
    fn echoes_udp_port_7_back_to_the_sender() {
        let Some(Answer::Echo(r)) = respond(&udp4(7, b"seq 42"), GUEST) else { panic!("no echo") };
        assert_eq!(&r[0..6], &NODE, "back to the sender's MAC");
        assert_eq!(&r[6..12], &GUEST);
        let ip = &r[14..];
        assert_eq!(&ip[12..16], &[10, 244, 1, 5], "from the guest");
        assert_eq!(&ip[16..20], &[10, 81, 0, 2], "to the client");
        assert_eq!(checksum(0, &ip[..20]), 0, "header checksum valid");
        assert_eq!(be16(ip, 20), Some(7));
        assert_eq!(be16(ip, 22), Some(40000));
        assert_eq!(&ip[28..], b"seq 42");
        assert_eq!(respond(&udp4(9, b"x"), GUEST), None, "other ports are not answered");
    }

    #[test]
    fn answers_arp_for_its_address_but_not_announcements() {
        let mut req = vec![0, 1, 8, 0, 6, 4, 0, 1];
        req.extend_from_slice(&NODE);
        req.extend_from_slice(&[10, 244, 1, 1]);
        req.extend_from_slice(&[0; 6]);
        req.extend_from_slice(&[10, 244, 1, 5]);
        let Some(Answer::Other(r)) = respond(&eth(ETHERTYPE_ARP, &req), GUEST) else { panic!("no reply") };
        let a = &r[14..];
        assert_eq!(be16(a, 6), Some(2));
        assert_eq!(&a[8..14], &GUEST);
        assert_eq!(&a[14..18], &[10, 244, 1, 5]);
        assert_eq!(&a[18..24], &NODE);
        let mut garp = req.clone();
        garp[24..28].copy_from_slice(&[10, 244, 1, 1]);
        assert_eq!(respond(&eth(ETHERTYPE_ARP, &garp), GUEST), None);
    }

    #[test]
    fn echoes_udp_over_ipv6_with_a_valid_checksum() {
        let src = [0xfd, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
        let data = b"hello";
        let mut ip = vec![0x60, 0, 0, 0, 0, 13, PROTO_UDP, 63];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0x9c, 0x40, 0, 7, 0, 13, 0, 0]);
        ip.extend_from_slice(data);
        let Some(Answer::Echo(r)) = respond(&eth(ETHERTYPE_IPV6, &ip), GUEST) else { panic!("no echo") };
        let ip = &r[14..];
        assert_eq!(&ip[8..24], &dst);
        assert_eq!(&ip[24..40], &src);
        // Verifying: the sum over pseudo-header and datagram is all ones.
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 13, 0, 0, 0, PROTO_UDP]);
        let mut sum = 0u32;
        for c in pseudo.chunks_exact(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        assert_eq!(checksum(sum, &ip[40..]), 0);
        assert_eq!(&ip[48..], data);
    }

    #[test]
    fn answers_ping() {
        let mut f = udp4(7, &[8, 0, 0, 0, 0, 1, 0, 1, 0xab]);
        // Turn the UDP datagram into an ICMP echo request (same length).
        f[14 + 9] = PROTO_ICMP;
        f[14 + 20..14 + 28].copy_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        let Some(Answer::Other(r)) = respond(&f, GUEST) else { panic!("no reply") };
        assert_eq!(r[14 + 20], 0, "echo reply");
        assert_eq!(checksum(0, &r[14 + 20..]), 0, "ICMP checksum valid");
    }

    #[test]
    fn announce_is_a_broadcast_rarp_from_the_nic() {
        let f = announce(GUEST);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &GUEST);
        assert_eq!(be16(&f, 12), Some(ETHERTYPE_RARP));
        assert_eq!(f.len(), 60);
    }
}
