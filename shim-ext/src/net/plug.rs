//! `sch_plug` (decision 3): the destination tap's root qdisc that holds every
//! packet redirected to the paused VM and releases them when it runs.
//!
//! netlink-packet-route has no typed builder for `plug`, so the request is a
//! plain `RTM_NEWQDISC` with `TCA_KIND = "plug"` and a raw `TCA_OPTIONS`
//! payload: `struct tc_plug_qopt { int action; __u32 limit; }` in native byte
//! order (`include/uapi/linux/pkt_sched.h`). The kernel's `plug_init()` sets
//! `throttled = true`, so a new plug buffers at once and only `limit` is read
//! at creation; `plug_change()` acts on `action`.

use std::time::Duration;

use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::packet_core::DefaultNla;

use super::types::PlugAction;

/// `TCQ_PLUG_BUFFER`: start buffering (a new epoch).
pub const TCQ_PLUG_BUFFER: i32 = 0;
/// `TCQ_PLUG_RELEASE_ONE`: release the packets of the previous epoch.
pub const TCQ_PLUG_RELEASE_ONE: i32 = 1;
/// `TCQ_PLUG_RELEASE_INDEFINITE`: release everything and stop holding.
pub const TCQ_PLUG_RELEASE_INDEFINITE: i32 = 2;
/// `TCQ_PLUG_LIMIT`: only change the byte limit.
pub const TCQ_PLUG_LIMIT: i32 = 3;

/// `TCA_OPTIONS` (`include/uapi/linux/rtnetlink.h`).
const TCA_OPTIONS: u16 = 2;

/// The qdisc kind string.
pub const PLUG_KIND: &str = "plug";

/// Floor of [`plug_limit_bytes`]: a tap's default `txqueuelen` (1000) of
/// full-size Ethernet frames (1514 bytes). Without a plug the tap ring already
/// holds that much, so a plug never holds less than the path did without it.
pub const MIN_PLUG_LIMIT_BYTES: u32 = 1000 * 1514;

/// Ceiling of [`plug_limit_bytes`]: held packets are kernel memory pinned per
/// migrating VM (an skb's truesize is up to about twice its length for small
/// packets), so a mistaken rate must not pin gigabytes.
pub const MAX_PLUG_LIMIT_BYTES: u32 = 256 << 20;

/// `struct tc_plug_qopt` as the kernel reads it: `int action` then
/// `__u32 limit`, native endian, 8 bytes, no padding.
pub fn plug_qopt(action: i32, limit: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&action.to_ne_bytes());
    out[4..].copy_from_slice(&limit.to_ne_bytes());
    out
}

/// The `TCQ_PLUG_*` code of an action.
pub fn action_code(action: PlugAction) -> i32 {
    match action {
        PlugAction::Buffer => TCQ_PLUG_BUFFER,
        PlugAction::ReleaseOne => TCQ_PLUG_RELEASE_ONE,
        PlugAction::ReleaseIndefinite => TCQ_PLUG_RELEASE_INDEFINITE,
    }
}

/// How many bytes the plug must hold so a blackout loses nothing.
///
/// The plug receives every packet sent to the VM between the source's STOP
/// (the route moves into the tunnel) and the release after the destination's
/// RESUME, so it needs `rate × size × blackout`, times `headroom` for bursts
/// above the average rate and for blackouts longer than the estimate (TCG
/// runs measured 115–280 ms at a 300 ms limit). `headroom` below 1 (or NaN)
/// counts as 1. The result is clamped to
/// [`MIN_PLUG_LIMIT_BYTES`]..=[`MAX_PLUG_LIMIT_BYTES`].
///
/// Why not a small fixed limit: 32 KiB is about 21 full-size frames; a
/// 1000 pps stream during a 300 ms blackout brings 300 packets, so such a
/// plug drops over 90% of them. `avg_packet_bytes` is counted as the kernel
/// does (`skb->len`, including the 14-byte Ethernet header).
pub fn plug_limit_bytes(
    packet_rate_pps: u64,
    avg_packet_bytes: u32,
    worst_blackout: Duration,
    headroom: f64,
) -> u32 {
    let headroom = if headroom.is_nan() || headroom < 1.0 { 1.0 } else { headroom };
    // f64 keeps the product exact far beyond any real rate and saturates
    // instead of overflowing.
    let bytes =
        packet_rate_pps as f64 * f64::from(avg_packet_bytes) * worst_blackout.as_secs_f64() * headroom;
    if bytes >= f64::from(MAX_PLUG_LIMIT_BYTES) {
        return MAX_PLUG_LIMIT_BYTES;
    }
    // In range of u32 here: 0 <= bytes < MAX.
    let bytes = bytes.ceil() as u32;
    bytes.clamp(MIN_PLUG_LIMIT_BYTES, MAX_PLUG_LIMIT_BYTES)
}

/// `RTM_NEWQDISC` body for a root plug on `ifindex` holding up to `limit`
/// bytes. The handle is left 0 so the kernel allocates one.
pub(crate) fn plug_message(ifindex: i32, action: i32, limit: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex);
    msg.header.parent = TcHandle::ROOT;
    msg.attributes.push(TcAttribute::Kind(PLUG_KIND.to_owned()));
    // Not `TcAttribute::Options`: that nests attributes, while sch_plug reads
    // the bare struct as the attribute's payload.
    msg.attributes.push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, plug_qopt(action, limit).to_vec())));
    msg
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, NlasIterator};

    #[test]
    fn qopt_layout_matches_the_c_struct() {
        let bytes = plug_qopt(TCQ_PLUG_RELEASE_INDEFINITE, 0x0102_0304);
        #[cfg(target_endian = "little")]
        assert_eq!(bytes, [2, 0, 0, 0, 4, 3, 2, 1]);
        #[cfg(target_endian = "big")]
        assert_eq!(bytes, [0, 0, 0, 2, 1, 2, 3, 4]);
        assert_eq!(plug_qopt(TCQ_PLUG_LIMIT, 0)[..4], 3i32.to_ne_bytes());
        assert_eq!(action_code(PlugAction::Buffer), 0);
        assert_eq!(action_code(PlugAction::ReleaseOne), 1);
        assert_eq!(action_code(PlugAction::ReleaseIndefinite), 2);
    }

    #[test]
    fn plug_message_carries_kind_and_raw_options() {
        let msg = plug_message(7, TCQ_PLUG_BUFFER, 1_500_000);
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // struct tcmsg: family(1) pad(3) ifindex(4) handle(4) parent(4) info(4)
        assert_eq!(i32::from_ne_bytes(buf[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(buf[12..16].try_into().unwrap()), 0xFFFF_FFFF);
        let mut kind = None;
        let mut options = None;
        for nla in NlasIterator::new(&buf[20..]) {
            let nla = nla.unwrap();
            match nla.kind() {
                1 => kind = Some(nla.value().to_vec()),
                2 => options = Some(nla.value().to_vec()),
                other => panic!("unexpected attribute {other}"),
            }
        }
        assert_eq!(kind.unwrap(), b"plug\0");
        assert_eq!(options.unwrap(), plug_qopt(TCQ_PLUG_BUFFER, 1_500_000));
    }

    #[test]
    fn sizing_table() {
        let ms = Duration::from_millis;
        let cases = [
            // light load: the floor wins
            (1_000, 1514, ms(300), 2.0, MIN_PLUG_LIMIT_BYTES),
            (0, 1514, ms(300), 2.0, MIN_PLUG_LIMIT_BYTES),
            (1_000, 1514, Duration::ZERO, 2.0, MIN_PLUG_LIMIT_BYTES),
            // 10k pps of full frames for 300 ms, doubled
            (10_000, 1514, ms(300), 2.0, 9_084_000),
            // headroom below 1 is ignored
            (10_000, 1500, ms(1000), 0.5, 15_000_000),
            (10_000, 1500, ms(1000), f64::NAN, 15_000_000),
            // fractional bytes round up
            (3, 1_000_001, ms(1000), 1.0, 3_000_003),
            // an absurd rate is capped, never wraps
            (100_000, 1514, ms(1000), 2.0, MAX_PLUG_LIMIT_BYTES),
            (u64::MAX, u32::MAX, Duration::MAX, f64::INFINITY, MAX_PLUG_LIMIT_BYTES),
        ];
        for (pps, size, blackout, headroom, want) in cases {
            assert_eq!(
                plug_limit_bytes(pps, size, blackout, headroom),
                want,
                "{pps} pps × {size} B × {blackout:?} × {headroom}"
            );
        }
    }

    #[test]
    fn small_fixed_limit_is_far_below_a_real_blackout() {
        // 32 KiB holds 21 full frames; 1000 pps for 300 ms brings 300.
        assert_eq!(32 * 1024 / 1514, 21);
        let need = plug_limit_bytes(1_000, 1514, Duration::from_millis(300), 1.0);
        assert!(need >= 300 * 1514);
        assert!(need > 32 * 1024 * 13);
    }
}
