//! The subset of QEMU's command line the stand-in reads.
//!
//! QEMU's syntax: `-name value` pairs and bare flags, a leading `--` equivalent to `-`. The
//! stand-in must accept every command line katamaran's destination rewrite produces from a
//! Kata-shaped source, so it skips what it does not model instead of refusing it; it only
//! refuses what it cannot honour (a QMP endpoint that is not a unix server socket, a tap it
//! cannot name).

use std::path::PathBuf;

use crate::Error;

/// QEMU options that take no argument (the ones a Kata command line and the lab use).
const FLAGS: &[&str] = &[
    "daemonize",
    "S",
    "nodefaults",
    "nographic",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "enable-kvm",
    "no-hpet",
    "no-acpi",
    "snapshot",
];

/// What the stand-in takes from its command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args {
    /// Unix sockets to serve QMP on (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Vec<PathBuf>,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `-daemonize`: fork, let the parent exit once the sockets exist.
    pub daemonize: bool,
    /// `-S`: do not start the VM by itself.
    pub start_paused: bool,
    /// `-incoming defer` (the only incoming form katamaran uses).
    pub incoming: bool,
    /// The tap opened by name (`-netdev tap,…,ifname=NAME`).
    pub tap: Option<String>,
    /// The guest NIC's MAC (`-device virtio-net…,mac=…`).
    pub mac: Option<[u8; 6]>,
    /// Guest RAM in bytes (`-m`; QEMU's default is 128 MiB).
    pub ram_bytes: u64,
    /// `-name` (the first option of it).
    pub name: Option<String>,
}

/// QEMU's default RAM size.
pub const DEFAULT_RAM: u64 = 128 << 20;

impl Args {
    /// Parses `argv` without the program name.
    ///
    /// # Errors
    /// [`Error::Usage`] for an option missing its value or a value the stand-in cannot honour.
    pub fn parse<S: AsRef<str>>(argv: &[S]) -> Result<Self, Error> {
        let mut out = Args { ram_bytes: DEFAULT_RAM, ..Args::default() };
        let mut it = argv.iter().map(AsRef::as_ref);
        while let Some(word) = it.next() {
            let Some(name) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
                return Err(Error::Usage(format!("unexpected argument {word:?}")));
            };
            if FLAGS.contains(&name) {
                match name {
                    "daemonize" => out.daemonize = true,
                    "S" => out.start_paused = true,
                    _ => {}
                }
                continue;
            }
            let value = it.next().ok_or_else(|| Error::Usage(format!("-{name} needs a value")))?;
            match name {
                "qmp" => out.qmp.push(qmp_socket(value)?),
                "pidfile" => out.pidfile = Some(PathBuf::from(value)),
                "incoming" if value == "defer" => out.incoming = true,
                "incoming" => {
                    return Err(Error::Usage(format!("-incoming {value}: only `defer` is supported")))
                }
                "netdev" => {
                    let parts = opts(value);
                    if parts.first().map(|k| k.trim_start_matches("type=")) == Some("tap") {
                        out.tap = Some(
                            get(&parts, "ifname")
                                .ok_or_else(|| Error::Usage(format!("-netdev {value}: a tap needs ifname=")))?
                                .to_owned(),
                        );
                    }
                }
                "device" => {
                    let parts = opts(value);
                    if parts.first().is_some_and(|d| d.starts_with("virtio-net")) {
                        if let Some(mac) = get(&parts, "mac") {
                            out.mac = Some(parse_mac(mac)?);
                        }
                    }
                }
                "m" => out.ram_bytes = ram_size(value)?,
                "name" if out.name.is_none() => {
                    out.name = Some(opts(value).first().cloned().unwrap_or_default());
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Splits `a=b,c=d`, QEMU style (`,,` is a literal comma).
fn opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn get<'a>(parts: &'a [String], key: &str) -> Option<&'a str> {
    parts.iter().find_map(|p| p.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

fn qmp_socket(value: &str) -> Result<PathBuf, Error> {
    let parts = opts(value);
    let first = parts.first().map(String::as_str).unwrap_or_default();
    let path = first
        .strip_prefix("unix:")
        .ok_or_else(|| Error::Usage(format!("-qmp {value}: only unix: sockets are supported")))?;
    let server = parts.iter().any(|p| p == "server" || p == "server=on");
    if !server {
        return Err(Error::Usage(format!("-qmp {value}: the stand-in only serves (server=on)")));
    }
    Ok(PathBuf::from(path))
}

/// `-m 512`, `-m 512M`, `-m size=2G,slots=…,maxmem=…` → bytes (a bare number is MiB).
fn ram_size(value: &str) -> Result<u64, Error> {
    let parts = opts(value);
    let size = get(&parts, "size").or(parts.first().map(String::as_str)).unwrap_or_default();
    let bad = || Error::Usage(format!("-m {value}: not a memory size"));
    let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit {
        "" | "M" | "m" => 20,
        "G" | "g" => 30,
        "K" | "k" => 10,
        _ => return Err(bad()),
    };
    n.checked_shl(shift).filter(|b| *b > 0).ok_or_else(bad)
}

/// `aa:bb:cc:dd:ee:ff`.
///
/// # Errors
/// [`Error::Usage`] naming the value.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let mut out = [0u8; 6];
    let mut n = 0;
    for (i, part) in s.split(':').enumerate() {
        let slot = out.get_mut(i).ok_or_else(|| Error::Usage(format!("{s:?} is not a MAC address")))?;
        *slot =
            u8::from_str_radix(part, 16).map_err(|_| Error::Usage(format!("{s:?} is not a MAC address")))?;
        n = i + 1;
    }
    if n != 6 {
        return Err(Error::Usage(format!("{s:?} is not a MAC address")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, Error> {
        Args::parse(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn reads_a_kata_shaped_source_command_line() {
        let a = parse(
            "-name sandbox-abc,debug-threads=on -uuid 1-2 -machine q35,accel=tcg -m 256M,slots=10,maxmem=2G \
             -qmp unix:/run/vc/vm/abc/qmp.sock,server=on,wait=off -qmp unix:/run/vc/vm/abc/extra-monitor.sock,server,nowait \
             -pidfile /run/vc/vm/abc/pid -daemonize -nodefaults -nographic --no-reboot \
             -netdev tap,id=network-0,vhost=off,ifname=tap0_kata,script=no,downscript=no \
             -device driver=virtio-net-pci,netdev=network-0,mac=02:aa:bb:cc:dd:0e,disable-modern=false",
        )
        .expect("parses");
        assert_eq!(a.name.as_deref(), Some("sandbox-abc"));
        assert_eq!(a.ram_bytes, 256 << 20);
        assert_eq!(a.qmp.len(), 2);
        assert_eq!(a.pidfile, Some(PathBuf::from("/run/vc/vm/abc/pid")));
        assert!(a.daemonize && !a.start_paused && !a.incoming);
        assert_eq!(a.tap.as_deref(), Some("tap0_kata"));
        // `driver=virtio-net-pci` is not the first part: no MAC taken from it.
        assert_eq!(a.mac, None);
    }

    #[test]
    fn reads_the_destination_rewrite() {
        let a = parse(
            "-m 128 -netdev tap,id=n0,ifname=tap0_kata,script=no,downscript=no \
             -device virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01 \
             -qmp unix:/s/qmp.sock,server=on,wait=off -pidfile /s/pid -incoming defer -S",
        )
        .expect("parses");
        assert!(a.incoming && a.start_paused && !a.daemonize);
        assert_eq!(a.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(a.ram_bytes, 128 << 20);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (line, names) in [
            ("-qmp tcp:1.2.3.4:5,server=on", "tcp"),
            ("-qmp unix:/x", "server"),
            ("-incoming tcp:0:4444", "defer"),
            ("-netdev tap,id=n0,fd=3", "ifname"),
            ("-m lots", "memory size"),
            ("-pidfile", "needs a value"),
            ("stray", "unexpected"),
        ] {
            let e = parse(line).expect_err(line).to_string();
            assert!(e.contains(names), "{line}: {e}");
        }
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:00:00").is_err());
    }
}
