//! Pure checks applied before anything reaches the kernel, so that a bad
//! request fails with a message naming the field instead of an `EINVAL`.

use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::error::{Error, Result};
use super::types::{IpPrefix, RouteSpec, TunnelSpec};

/// `IFNAMSIZ` minus the terminating NUL (`include/uapi/linux/if.h`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Checks a name the way the kernel's `dev_valid_name()` does: 1–15 bytes,
/// not `.` or `..`, no `/`, `:`, whitespace or NUL.
///
/// # Errors
/// [`Error::InvalidIfName`] naming the rule that failed.
pub fn validate_ifname(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are reserved")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains(':') {
        Some("contains ':' (alias syntax)")
    } else if name.chars().any(|c| c.is_whitespace() || c == '\0') {
        Some("contains whitespace or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidIfName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Where network namespace files may live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRoots {
    /// Directories holding bind-mounted namespace files (`ip netns`, CNI).
    pub dirs: Vec<PathBuf>,
    /// The procfs mount, for `<proc>/<pid>/ns/net`; `None` forbids pid paths.
    pub proc: Option<PathBuf>,
}

impl Default for NetnsRoots {
    /// `/var/run/netns` and `/run/netns` (iproute2's and CNI's), and `/proc`.
    fn default() -> Self {
        Self {
            dirs: vec![PathBuf::from("/var/run/netns"), PathBuf::from("/run/netns")],
            proc: Some(PathBuf::from("/proc")),
        }
    }
}

/// Checks that `path` names a namespace file directly under one of
/// `roots.dirs`, or is `<roots.proc>/<pid>/ns/net`. Purely lexical: it does
/// not touch the filesystem, so symlinks are not resolved.
///
/// # Errors
/// [`Error::InvalidNetnsPath`] naming the rule that failed.
pub fn validate_netns_path(path: &Path, roots: &NetnsRoots) -> Result<()> {
    let fail = |reason| Err(Error::InvalidNetnsPath { path: path.to_owned(), reason });
    if !path.is_absolute() {
        return fail("not absolute");
    }
    // On the raw bytes: `Path::components` silently drops interior `.`.
    if path.as_os_str().as_bytes().split(|b| *b == b'/').any(|seg| seg == b"." || seg == b"..") {
        return fail("contains '.' or '..'");
    }
    for dir in &roots.dirs {
        if let Ok(rest) = path.strip_prefix(dir) {
            let mut parts = rest.components();
            return match (parts.next(), parts.next()) {
                (Some(Component::Normal(_)), None) => Ok(()),
                (None, _) => fail("names the directory, not a namespace in it"),
                _ => fail("nested below the namespace directory"),
            };
        }
    }
    if let Some(proc_root) = &roots.proc {
        if let Ok(rest) = path.strip_prefix(proc_root) {
            let parts: Vec<_> = rest.components().collect();
            return match parts.as_slice() {
                [Component::Normal(pid), Component::Normal(ns), Component::Normal(net)]
                    if *ns == "ns" && *net == "net" =>
                {
                    let pid = pid.to_string_lossy();
                    if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                        Ok(())
                    } else {
                        fail("the process id is not a number")
                    }
                }
                _ => fail("not of the form <proc>/<pid>/ns/net"),
            };
        }
    }
    fail("outside the allowed namespace roots")
}

/// Checks that `prefix` is a host prefix: /32 for IPv4, /128 for IPv6 — a VM
/// moves one address, never a subnet.
///
/// # Errors
/// [`Error::InvalidRoute`] when it is shorter.
pub fn validate_host_prefix(prefix: IpPrefix) -> Result<()> {
    if prefix.is_host() {
        Ok(())
    } else {
        Err(Error::InvalidRoute { dest: prefix, reason: "not a host prefix (/32 for IPv4, /128 for IPv6)" })
    }
}

/// Checks a route: host destination, gateway in the destination's family,
/// and `onlink` only with a gateway.
///
/// # Errors
/// [`Error::InvalidRoute`] naming the rule, or [`Error::InvalidIfName`] for
/// the device name.
pub fn validate_route(route: &RouteSpec) -> Result<()> {
    validate_host_prefix(route.dest)?;
    validate_ifname(&route.dev.name)?;
    if let Some(gw) = route.gateway {
        if !same_family(gw, route.dest.addr()) {
            return Err(Error::InvalidRoute {
                dest: route.dest,
                reason: "gateway is not in the destination's address family",
            });
        }
    } else if route.onlink {
        return Err(Error::InvalidRoute { dest: route.dest, reason: "onlink needs a gateway" });
    }
    Ok(())
}

/// Checks a tunnel: valid name, both endpoints in the family of its mode
/// (IPv4 for ipip/gre, IPv6 for ip6ip6/ip6gre), and not unspecified.
///
/// # Errors
/// [`Error::InvalidTunnel`] naming the rule, or [`Error::InvalidIfName`].
pub fn validate_tunnel(spec: &TunnelSpec) -> Result<()> {
    validate_ifname(&spec.name)?;
    let fail = |reason| Err(Error::InvalidTunnel { name: spec.name.clone(), mode: spec.mode, reason });
    let want_v6 = spec.mode.outer_is_ipv6();
    for addr in [spec.local, spec.remote] {
        if addr.is_ipv6() != want_v6 {
            return fail(if want_v6 {
                "endpoints must be IPv6 for this mode"
            } else {
                "endpoints must be IPv4 for this mode"
            });
        }
        if addr.is_unspecified() {
            return fail("an endpoint is the unspecified address");
        }
    }
    if spec.local == spec.remote {
        return fail("local and remote are the same address");
    }
    Ok(())
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::net::types::{LinkId, TunnelMode};

    #[test]
    fn ifname_table() {
        let cases: &[(&str, bool)] = &[
            ("eth0", true),
            ("tap0_kata", true),
            ("a", true),
            ("abcdefghijklmno", true),   // 15 bytes
            ("abcdefghijklmnop", false), // 16 bytes
            ("", false),
            (".", false),
            ("..", false),
            ("...", true),
            ("a/b", false),
            ("eth0:1", false),
            ("eth 0", false),
            ("eth\t0", false),
            ("eth\n", false),
            ("eth\0", false),
            ("ééééééé", true),   // 14 bytes
            ("éééééééé", false), // 16 bytes: the limit is bytes, not chars
        ];
        for (name, ok) in cases {
            assert_eq!(validate_ifname(name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn netns_path_table_default_roots() {
        let roots = NetnsRoots::default();
        let cases: &[(&str, bool)] = &[
            ("/var/run/netns/cni-1234", true),
            ("/run/netns/web-0", true),
            ("/proc/1/ns/net", true),
            ("/proc/4242/ns/net", true),
            ("/proc/self/ns/net", false),
            ("/proc/12a/ns/net", false),
            ("/proc/1/ns/mnt", false),
            ("/proc/1/ns/net/x", false),
            ("/proc/1/ns", false),
            ("/run/netns", false),
            ("/run/netns/", false),
            ("/run/netns/a/b", false),
            ("/run/netns/../../etc/passwd", false),
            ("/run/netns/./x", false),
            ("run/netns/x", false),
            ("/etc/netns/x", false),
            ("/run/netnsX/x", false),
            ("/tmp/x", false),
        ];
        for (path, ok) in cases {
            assert_eq!(validate_netns_path(Path::new(path), &roots).is_ok(), *ok, "{path}");
        }
    }

    #[test]
    fn netns_path_custom_roots() {
        let roots = NetnsRoots { dirs: vec![PathBuf::from("/tmp/k-test")], proc: None };
        assert!(validate_netns_path(Path::new("/tmp/k-test/ns1"), &roots).is_ok());
        assert!(validate_netns_path(Path::new("/run/netns/ns1"), &roots).is_err());
        let e = validate_netns_path(Path::new("/proc/1/ns/net"), &roots).unwrap_err();
        assert!(e.to_string().contains("outside the allowed"), "{e}");
    }

    fn dev() -> LinkId {
        LinkId { index: 3, name: "tnl0".into() }
    }

    #[test]
    fn route_family_table() {
        let p = |s: &str| s.parse::<IpPrefix>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases = [
            (RouteSpec::dev(p("10.0.0.5/32"), dev()), true),
            (RouteSpec::dev(p("fd00::5/128"), dev()), true),
            (RouteSpec::dev(p("10.0.0.0/24"), dev()), false),
            (RouteSpec::dev(p("fd00::/64"), dev()), false),
            (RouteSpec::via_onlink(p("10.0.0.5/32"), ip("192.168.1.2"), dev()), true),
            (RouteSpec::via_onlink(p("10.0.0.5/32"), ip("fd00::2"), dev()), false),
            (RouteSpec::via_onlink(p("fd00::5/128"), ip("fe80::1"), dev()), true),
            (RouteSpec::via_onlink(p("fd00::5/128"), ip("10.0.0.1"), dev()), false),
            (RouteSpec { onlink: true, ..RouteSpec::dev(p("10.0.0.5/32"), dev()) }, false),
            (RouteSpec::dev(p("10.0.0.5/32"), LinkId { index: 1, name: "bad/name".into() }), false),
        ];
        for (route, ok) in cases {
            assert_eq!(validate_route(&route).is_ok(), ok, "{route:?}");
        }
    }

    #[test]
    fn tunnel_family_table() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t = |mode, local: &str, remote: &str| TunnelSpec {
            name: "kt0".into(),
            mode,
            local: ip(local),
            remote: ip(remote),
            ttl: 64,
        };
        let cases = [
            (t(TunnelMode::Ipip, "192.0.2.1", "192.0.2.2"), true),
            (t(TunnelMode::Gre, "192.0.2.1", "192.0.2.2"), true),
            (t(TunnelMode::Ip6ip6, "2001:db8::1", "2001:db8::2"), true),
            (t(TunnelMode::Ip6gre, "2001:db8::1", "2001:db8::2"), true),
            (t(TunnelMode::Ipip, "2001:db8::1", "2001:db8::2"), false),
            (t(TunnelMode::Gre, "192.0.2.1", "2001:db8::2"), false),
            (t(TunnelMode::Ip6ip6, "192.0.2.1", "192.0.2.2"), false),
            (t(TunnelMode::Ip6gre, "2001:db8::1", "192.0.2.2"), false),
            (t(TunnelMode::Ipip, "0.0.0.0", "192.0.2.2"), false),
            (t(TunnelMode::Ipip, "192.0.2.1", "192.0.2.1"), false),
        ];
        for (spec, ok) in cases {
            assert_eq!(validate_tunnel(&spec).is_ok(), ok, "{spec:?}");
        }
    }
}
