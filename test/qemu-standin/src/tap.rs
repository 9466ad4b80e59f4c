//! Opening a tap by name, as QEMU's `-netdev tap,ifname=…` does.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::Error;

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Attaches to the existing tap `name` (in the calling thread's network namespace): plain
/// frames, no packet information, no virtio-net header. A tap created multi-queue only accepts
/// queue attachments, so that is tried second.
///
/// # Errors
/// [`Error::Tap`] naming the tap.
pub fn open(name: &str) -> Result<File, Error> {
    let fail = |e: std::io::Error| Error::Tap(name.to_owned(), e);
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(fail(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let mut last = None;
    for extra in [0, libc::IFF_MULTI_QUEUE] {
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(fail)?;
        // SAFETY: `ifreq` is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE all fit in the 16-bit flags field.
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | extra) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which lives for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc == 0 {
            return Ok(file);
        }
        last = Some(std::io::Error::last_os_error());
    }
    Err(fail(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))))
}
