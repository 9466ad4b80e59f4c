//! Persistent taps through `/dev/net/tun` — the only `unsafe` of this module.
//!
//! A tap belongs to the network namespace of the thread that issues
//! `TUNSETIFF`, so [`create_persistent_tap`] must run on a namespace thread
//! (it is called from jobs of [`NetnsHandle`](super::NetnsHandle)).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::error::{Error, Result};
use super::types::TapSpec;
use super::validate::validate_ifname;

/// The clone device of the tun driver.
const TUN_DEVICE: &str = "/dev/net/tun";

/// `ifr_flags` for `TUNSETIFF` (`include/uapi/linux/if_tun.h`): always
/// `IFF_TAP | IFF_NO_PI` (QEMU's tap backend never uses packet info), plus
/// `IFF_VNET_HDR` / `IFF_MULTI_QUEUE` as requested.
pub(crate) fn tap_flags(spec: &TapSpec) -> libc::c_short {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if spec.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    if spec.multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    // All four flags fit in 16 bits (highest is IFF_VNET_HDR = 0x4000).
    flags as libc::c_short
}

/// Creates the tap `spec.name` in the calling thread's network namespace and
/// marks it persistent, then closes the descriptor: the device stays, with no
/// queue attached, until QEMU opens it with the same flags.
///
/// # Errors
/// [`Error::InvalidIfName`], [`Error::OpenTun`], [`Error::TapSetIff`] (e.g.
/// `EBUSY` when a device of that name exists with other flags) or
/// [`Error::TapPersist`].
pub(crate) fn create_persistent_tap(spec: &TapSpec) -> Result<()> {
    validate_ifname(&spec.name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(|source| Error::OpenTun { name: spec.name.clone(), source })?;

    // SAFETY: `ifreq` is a plain C struct (a char array and a union of
    // integers, sockaddrs and a pointer); all-zero bytes are a valid value
    // for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // validate_ifname guaranteed 1..=15 bytes without NUL, so the name and
    // its terminating zero (already there from `zeroed`) fit IFNAMSIZ.
    for (dst, src) in req.ifr_name.iter_mut().zip(spec.name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = tap_flags(spec);

    // SAFETY: `tun` is an open descriptor of /dev/net/tun that outlives the
    // call; TUNSETIFF reads and writes one `struct ifreq`, and `req` is a
    // properly aligned, initialised, exclusively borrowed `ifreq`.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(Error::TapSetIff { name: spec.name.clone(), source: io::Error::last_os_error() });
    }

    // SAFETY: TUNSETPERSIST takes its argument by value (an int flag cast to
    // unsigned long), no memory is passed; `tun` is open and attached by the
    // successful TUNSETIFF above.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(Error::TapPersist { name: spec.name.clone(), source: io::Error::last_os_error() });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kata_flags_are_the_four_qemu_uses() {
        let f = tap_flags(&TapSpec::kata("tap0_kata")) as i32;
        assert_eq!(f, 0x0002 | 0x1000 | 0x4000 | 0x0100);
        let plain = TapSpec { name: "tap1".into(), multi_queue: false, vnet_hdr: false };
        assert_eq!(tap_flags(&plain) as i32, 0x0002 | 0x1000);
    }

    #[test]
    fn invalid_name_is_refused_before_any_syscall() {
        let e = create_persistent_tap(&TapSpec::kata("way-too-long-tap-name")).unwrap_err();
        assert!(matches!(e, Error::InvalidIfName { .. }), "{e}");
    }
}
