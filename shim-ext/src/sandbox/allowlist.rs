//! What the destination runs from a QEMU command line that arrives over the network: an
//! allowlist of the options and properties Kata emits, and where their paths may point.
//!
//! The command line of a migration source reaches the destination in PrepareIncoming, and the
//! destination runs it as root, so it is untrusted input. Everything not listed here is refused
//! with an error naming the option (and the property): a monitor on stdio or a serial port
//! (`migrate exec:` runs commands), a host block device, a chardev or a 9p share onto an arbitrary
//! path, code loading (`-plugin`), configuration files (`-readconfig`), helpers (`-netdev
//! bridge`, `script=`), user networking, an `-incoming` chosen by the source.
//!
//! Paths come in three kinds:
//! - **state** paths, which QEMU creates or writes (QMP and chardev sockets, the pid file, the
//!   log, serial output): only under the incoming sandbox's own state directory;
//! - **file** paths, which QEMU opens (kernel, initrd, firmware, disk images, a file-backed
//!   memory image): under the node's allowed roots (Kata's install directories by default), the
//!   state directory, or one of the disk images katamaran created;
//! - two fixed host files and directories: `/dev/urandom` and `/dev/random` for `rng-random`,
//!   `/dev/shm` and `/dev/hugepages` (exactly: QEMU creates an unlinked file inside) for
//!   `memory-backend-file`. Nothing else under `/dev`, `/proc` or `/sys` is ever accepted.
//!
//! Path checks are lexical: absolute paths only, no `..` component, no comma or space (QEMU
//! splits some path options into lists), compared component by
//! component with the roots. Roots must therefore be directories only root can write (a symlink
//! placed inside a root is trusted like the root). Values that are not paths (ids, sizes, MACs,
//! CPU models) are restricted to `[A-Za-z0-9_.:+@-]`, so no path can hide in them.
//!
//! To accept something new that Kata emits, add its option to [`check`] (or its device driver
//! to [`DEVICE_DRIVERS`], its object type to [`object_keys`], its property to the key list of
//! its option), with the reason in a comment, and a line to the fixtures in the tests.

use std::path::{Component, Path, PathBuf};

use super::cmdline::{split_opts, QemuArg, QemuCmdline};
use super::Error;

/// Kata's install directories (`/opt/kata` for kata-deploy, the distribution packages' share
/// directory): the kernel, initrd, guest image and firmware live there.
pub const KATA_FILE_ROOTS: &[&str] = &["/opt/kata", "/usr/share/kata-containers"];

/// Extra file roots, colon-separated (like `PATH`), for nodes whose guest images live elsewhere
/// (the lab keeps them in the repository and its shared disks under its own root).
pub const ROOTS_ENV: &str = "KATAMARAN_ALLOWED_ROOTS";

/// Device drivers the destination creates: the virtio devices, PCI(e) topology and helpers Kata's
/// runtime emits (`govmm/qemu/qemu.go`). Host-device passthrough (`vfio-*`), `loader` (reads a host
/// file into the guest) and anything with a host backend not listed here are absent on purpose.
pub const DEVICE_DRIVERS: &[&str] = &[
    "nvdimm",
    "pci-bridge",
    "pcie-pci-bridge",
    "pcie-root-port",
    "pvpanic",
    "pvpanic-pci",
    "pxb-pcie",
    "scsi-hd",
    "vhost-user-blk-pci",
    "vhost-user-fs-pci",
    "vhost-vsock-pci",
    "virtconsole",
    "virtio-9p-pci",
    "virtio-balloon-pci",
    "virtio-blk-pci",
    "virtio-net-pci",
    "virtio-rng-pci",
    "virtio-scsi-pci",
    "virtio-serial-pci",
    "virtserialport",
    "x3130-upstream",
    "xio3130-downstream",
];

/// Where the paths of a command line may point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdlinePolicy {
    /// Directories QEMU may create and write files in (sockets, pid file, logs).
    pub state_roots: Vec<PathBuf>,
    /// Directories (or single files) QEMU may open: kernel, initrd, firmware, disk images.
    pub file_roots: Vec<PathBuf>,
}

impl CmdlinePolicy {
    /// Checks every option of `cmd` against the allowlist and every path against the roots.
    ///
    /// # Errors
    /// [`Error::OptionRefused`] or [`Error::PropertyRefused`] for the first option or property
    /// that is not allowed, naming it.
    pub fn validate(&self, cmd: &QemuCmdline) -> Result<(), Error> {
        check(cmd, Roots { state: Some(&self.state_roots), file: Some(&self.file_roots) })
    }
}

/// The file roots a node allows by default: Kata's install directories and those in
/// [`ROOTS_ENV`]. Entries that are relative, contain `..` or are `/` are ignored with a warning.
pub fn default_allowed_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = KATA_FILE_ROOTS.iter().map(PathBuf::from).collect();
    if let Some(extra) = std::env::var_os(ROOTS_ENV) {
        for root in std::env::split_paths(&extra).filter(|p| !p.as_os_str().is_empty()) {
            if lexically_clean(&root) && root != Path::new("/") {
                roots.push(root);
            } else {
                tracing::warn!(root = %root.display(), "{ROOTS_ENV}: ignoring a root that is not a clean absolute directory");
            }
        }
    }
    roots
}

/// Checks a command line as the source sent it, before the rewrite: every option allowlisted and
/// every property allowed, state paths under `state_roots` (the source's state directories),
/// file paths absolute without `..` but not yet compared with the roots (the rewrite replaces the
/// source's local disks). Options the rewrite drops (monitors, the pid file) are checked here.
/// [`super::IncomingRewrite::apply`] runs it first; a request handler can run it before it
/// prepares anything, so most refusals come before the first resource exists.
///
/// # Errors
/// [`Error::OptionRefused`] or [`Error::PropertyRefused`] naming the first refused option.
pub fn check_source(cmd: &QemuCmdline, state_roots: &[PathBuf]) -> Result<(), Error> {
    check(cmd, Roots { state: Some(state_roots), file: None })
}

/// The roots a pass compares paths with; `None` checks paths lexically only.
#[derive(Debug, Clone, Copy)]
struct Roots<'a> {
    state: Option<&'a [PathBuf]>,
    file: Option<&'a [PathBuf]>,
}

fn check(cmd: &QemuCmdline, roots: Roots<'_>) -> Result<(), Error> {
    for arg in &cmd.args {
        check_arg(arg, roots)?;
    }
    Ok(())
}

/// `key=value` parts (`None` for a bare `key`).
type Props<'v> = Vec<(&'v str, Option<&'v str>)>;

/// What a property value may be.
#[derive(Debug, Clone, Copy)]
enum Val {
    /// `[A-Za-z0-9_.:+@-]*`: ids, sizes, booleans, MACs, names.
    Plain,
    /// A file descriptor number Kata passed (the rewrite drops it).
    Fd,
    /// Colon-separated file descriptor numbers.
    Fds,
    /// One of these exact values.
    OneOf(&'static [&'static str]),
    /// A path QEMU creates or writes.
    State,
    /// A path QEMU opens.
    File,
    /// `memory-backend-file`'s `mem-path`: `/dev/shm`, `/dev/hugepages` or a file path.
    MemPath,
}

const ON_OFF: Val = Val::Plain;
const NO_SCRIPT: Val = Val::OneOf(&["no", ""]);
const RNG_SOURCES: &[&str] = &["/dev/urandom", "/dev/random"];
const MEMORY_DIRS: &[&str] = &["/dev/shm", "/dev/hugepages"];
const HOST_TREES: &[&str] = &["/dev", "/proc", "/sys"];

struct Ctx<'a> {
    option: &'a str,
    roots: Roots<'a>,
}

impl Ctx<'_> {
    fn refuse(&self, reason: impl Into<String>) -> Error {
        Error::OptionRefused { option: self.option.to_owned(), reason: reason.into() }
    }

    /// A refused property, or the whole value when `property` is empty.
    fn refuse_prop(&self, property: &str, reason: impl Into<String>) -> Error {
        if property.is_empty() {
            return self.refuse(reason);
        }
        Error::PropertyRefused {
            option: self.option.to_owned(),
            property: property.to_owned(),
            reason: reason.into(),
        }
    }

    /// Checks `key=value` (or a bare `key`) against `allowed`.
    fn prop(&self, key: &str, value: Option<&str>, allowed: &[(&str, Val)]) -> Result<(), Error> {
        let Some((_, val)) = allowed.iter().find(|(k, _)| *k == key) else {
            return Err(self.refuse_prop(key, "not an allowed property"));
        };
        self.value(key, value.unwrap_or_default(), *val)
    }

    fn value(&self, key: &str, v: &str, val: Val) -> Result<(), Error> {
        match val {
            Val::Plain if plain(v) => Ok(()),
            Val::Plain => {
                Err(self.refuse_prop(key, format!("value {v:?} has characters outside [A-Za-z0-9_.:+@-]")))
            }
            Val::Fd if digits(v) => Ok(()),
            Val::Fds if v.split(':').all(digits) => Ok(()),
            Val::Fd | Val::Fds => {
                Err(self.refuse_prop(key, format!("{v:?} is not a file descriptor number")))
            }
            Val::OneOf(set) if set.contains(&v) => Ok(()),
            Val::OneOf(set) => Err(self.refuse_prop(key, format!("{v:?} is not one of {set:?}"))),
            Val::State => self.state_path(key, v),
            Val::File => self.file_path(key, v),
            Val::MemPath if MEMORY_DIRS.contains(&v) => Ok(()),
            Val::MemPath => self.file_path(key, v),
        }
    }

    fn clean_path<'p>(&self, key: &str, v: &'p str) -> Result<&'p Path, Error> {
        let path = Path::new(v);
        if !lexically_clean(path) {
            return Err(self.refuse_prop(key, format!("{v:?} is not an absolute path without '..'")));
        }
        // QEMU reads some whole-value paths as lists (`-initrd` holds multiboot modules separated
        // by commas, a module's arguments after a space): one path is one plain word.
        if v.chars().any(|c| c == ',' || c.is_whitespace() || c.is_control()) {
            return Err(self.refuse_prop(key, format!("{v:?} holds a comma, a space or a control character")));
        }
        Ok(path)
    }

    fn state_path(&self, key: &str, v: &str) -> Result<(), Error> {
        let path = self.clean_path(key, v)?;
        match self.roots.state {
            Some(roots) if !under_any(path, roots) => {
                Err(self.refuse_prop(key, format!("{v} is outside the sandbox's state directory")))
            }
            _ => Ok(()),
        }
    }

    fn file_path(&self, key: &str, v: &str) -> Result<(), Error> {
        let path = self.clean_path(key, v)?;
        if HOST_TREES.iter().any(|t| path.starts_with(t)) {
            return Err(self.refuse_prop(key, format!("{v} is a host device or kernel file")));
        }
        match self.roots.file {
            Some(roots)
                if !under_any(path, roots) && !under_any(path, self.roots.state.unwrap_or_default()) =>
            {
                Err(self.refuse_prop(key, format!("{v} is outside the allowed roots {roots:?}")))
            }
            _ => Ok(()),
        }
    }

    /// `kind,key=value,…` where the kind is the first part or `kind_key=`; returns the kind and
    /// the remaining properties.
    fn kind_and_props<'v>(&self, value: &'v [String], kind_key: &str) -> Result<(&'v str, Props<'v>), Error> {
        let mut kind = None;
        let mut props = Vec::new();
        for (i, part) in value.iter().enumerate() {
            match part.split_once('=') {
                None if i == 0 => kind = Some(part.as_str()),
                Some((k, v)) if k == kind_key && kind.is_none() => kind = Some(v),
                Some((k, v)) => props.push((k, Some(v))),
                None => props.push((part.as_str(), None)),
            }
        }
        let kind = kind.ok_or_else(|| self.refuse(format!("names no {kind_key}")))?;
        Ok((kind, props))
    }

    fn props(&self, props: &[(&str, Option<&str>)], allowed: &[(&str, Val)]) -> Result<(), Error> {
        props.iter().try_for_each(|(k, v)| self.prop(k, *v, allowed))
    }

    /// Every property plain, whatever its key (devices, CPU models, NUMA: no paths possible).
    fn all_plain(&self, props: &[(&str, Option<&str>)]) -> Result<(), Error> {
        for (k, v) in props {
            if !plain(k) {
                return Err(self.refuse_prop(k, "not a property name"));
            }
            self.value(k, v.unwrap_or_default(), Val::Plain)?;
        }
        Ok(())
    }
}

fn check_arg(arg: &QemuArg, roots: Roots<'_>) -> Result<(), Error> {
    let option = arg.name.as_str();
    let cx = Ctx { option, roots };
    let value = arg.value.as_deref().unwrap_or_default();
    let parts = split_opts(value);
    let whole = |val: Val| cx.value("", value, val);
    match option {
        // Flags Kata emits: no argument, no host effect beyond the process itself.
        "daemonize" | "S" | "nographic" | "nodefaults" | "no-user-config" | "no-reboot" | "no-shutdown"
        | "enable-kvm" => Ok(()),
        // A VM that itself arrived by migration carries `-incoming defer` (the rewrite replaces
        // it); any channel named here is refused.
        "incoming" if value == "defer" => Ok(()),
        "incoming" => Err(cx.refuse("the destination chooses its own incoming channel")),
        "name" => {
            let (first, props) = positional(&parts);
            cx.value("", first, Val::Plain)?;
            cx.props(&props, &[("guest", Val::Plain), ("process", Val::Plain), ("debug-threads", ON_OFF)])
        }
        "uuid" | "cpu" | "smp" | "m" | "numa" | "rtc" | "overcommit" | "sandbox" => {
            // Numbers, names and on/off switches only.
            let (first, props) = positional(&parts);
            cx.value("", first, Val::Plain)?;
            cx.all_plain(&props)
        }
        "machine" | "accel" => {
            let (first, props) = positional(&parts);
            cx.value("type", first, Val::Plain)?;
            cx.props(&props, MACHINE_KEYS)
        }
        "vga" | "display" => whole(Val::OneOf(&["none"])),
        "global" => check_global(&cx, &parts),
        "kernel" | "initrd" | "bios" | "pflash" => whole(Val::File),
        // Guest-only text: the kernel command line never reaches a host parser.
        "append" => Ok(()),
        "pidfile" | "D" => whole(Val::State),
        "qmp" | "qmp-pretty" | "monitor" => check_monitor(&cx, value),
        "mon" => {
            let (first, props) = positional(&parts);
            cx.value("chardev", first, Val::Plain)?;
            cx.props(
                &props,
                &[
                    ("chardev", Val::Plain),
                    ("mode", Val::OneOf(&["control", "readline"])),
                    ("pretty", ON_OFF),
                ],
            )
        }
        "serial" => check_serial(&cx, value),
        "chardev" => {
            let (kind, props) = cx.kind_and_props(&parts, "backend")?;
            if kind != "socket" {
                return Err(cx.refuse(format!("chardev backend {kind:?} is not allowed (only unix sockets)")));
            }
            cx.props(&props, CHARDEV_KEYS)
        }
        "netdev" => {
            let (kind, props) = cx.kind_and_props(&parts, "type")?;
            match kind {
                "tap" => cx.props(&props, TAP_KEYS),
                "vhost-user" => cx.props(
                    &props,
                    &[
                        ("id", Val::Plain),
                        ("chardev", Val::Plain),
                        ("vhostforce", ON_OFF),
                        ("queues", Val::Plain),
                    ],
                ),
                other => {
                    Err(cx.refuse(format!("netdev type {other:?} is not allowed (only tap and vhost-user)")))
                }
            }
        }
        "device" => {
            let (driver, props) = cx.kind_and_props(&parts, "driver")?;
            if !DEVICE_DRIVERS.contains(&driver) {
                return Err(cx.refuse(format!("device driver {driver:?} is not allowed")));
            }
            cx.all_plain(&props)
        }
        "object" => {
            let (kind, props) = cx.kind_and_props(&parts, "qom-type")?;
            let keys =
                object_keys(kind).ok_or_else(|| cx.refuse(format!("object type {kind:?} is not allowed")))?;
            cx.props(&props, keys)
        }
        "drive" => {
            let props: Vec<(&str, Option<&str>)> = parts
                .iter()
                .map(|p| p.split_once('=').map_or((p.as_str(), None), |(k, v)| (k, Some(v))))
                .collect();
            cx.props(&props, DRIVE_KEYS)
        }
        "blockdev" => check_blockdev(&cx, value),
        "fsdev" => {
            let (kind, props) = cx.kind_and_props(&parts, "fsdriver")?;
            if kind != "local" {
                return Err(cx.refuse(format!("fsdev driver {kind:?} is not allowed (only local)")));
            }
            cx.props(&props, FSDEV_KEYS)
        }
        other => Err(Error::OptionRefused {
            option: other.to_owned(),
            reason: "not an option the destination runs from a migration source".into(),
        }),
    }
}

/// Splits `first,key=value,…` where the first part may be positional.
fn positional(parts: &[String]) -> (&str, Props<'_>) {
    let mut first = "";
    let mut props = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        match part.split_once('=') {
            None if i == 0 => first = part,
            Some((k, v)) => props.push((k, Some(v))),
            None => props.push((part.as_str(), None)),
        }
    }
    (first, props)
}

const MACHINE_KEYS: &[(&str, Val)] = &[
    ("type", Val::Plain),
    ("accel", Val::Plain),
    ("nvdimm", ON_OFF),
    ("kernel_irqchip", Val::Plain),
    ("kernel-irqchip", Val::Plain),
    ("memory-backend", Val::Plain),
    ("smm", ON_OFF),
    ("vmport", ON_OFF),
    ("hpet", ON_OFF),
    ("pic", ON_OFF),
    ("pit", ON_OFF),
    ("sata", ON_OFF),
    ("usb", ON_OFF),
    ("i8042", ON_OFF),
    ("dump-guest-core", ON_OFF),
    ("mem-merge", ON_OFF),
    ("graphics", ON_OFF),
    ("gic-version", Val::Plain),
    ("iommu", ON_OFF),
    ("highmem", ON_OFF),
    // -accel's own properties.
    ("thread", Val::Plain),
    ("tb-size", Val::Plain),
    ("kvm-shadow-mem", Val::Plain),
    ("dirty-ring-size", Val::Plain),
];

const CHARDEV_KEYS: &[(&str, Val)] = &[
    ("id", Val::Plain),
    ("path", Val::State),
    ("server", ON_OFF),
    ("wait", ON_OFF),
    ("nowait", ON_OFF),
    ("fd", Val::Fd),
    ("reconnect", Val::Plain),
    ("reconnect-ms", Val::Plain),
];

const TAP_KEYS: &[(&str, Val)] = &[
    ("id", Val::Plain),
    ("fd", Val::Fd),
    ("fds", Val::Fds),
    ("vhost", ON_OFF),
    ("vhostfd", Val::Fd),
    ("vhostfds", Val::Fds),
    ("vhostforce", ON_OFF),
    ("ifname", Val::Plain),
    ("script", NO_SCRIPT),
    ("downscript", NO_SCRIPT),
    ("queues", Val::Plain),
    ("vnet_hdr", ON_OFF),
    ("sndbuf", Val::Plain),
    ("poll-us", Val::Plain),
];

const DRIVE_KEYS: &[(&str, Val)] = &[
    ("id", Val::Plain),
    ("file", Val::File),
    ("if", Val::OneOf(&["none"])),
    // Raw only: an image format with a header (qcow2) can name a backing file anywhere.
    ("format", Val::OneOf(&["raw"])),
    ("aio", Val::OneOf(&["threads", "native", "io_uring"])),
    ("cache", Val::OneOf(&["none", "writeback", "writethrough", "directsync", "unsafe"])),
    ("readonly", ON_OFF),
    ("read-only", ON_OFF),
    ("discard", Val::Plain),
    ("detect-zeroes", Val::Plain),
    ("werror", Val::Plain),
    ("rerror", Val::Plain),
    ("cache.direct", ON_OFF),
    ("cache.no-flush", ON_OFF),
    ("locking", Val::Plain),
    ("file.locking", Val::Plain),
];

const BLOCKDEV_KEYS: &[(&str, Val)] = &[
    ("driver", Val::OneOf(&["raw", "file"])),
    ("node-name", Val::Plain),
    ("filename", Val::File),
    ("file", Val::Plain),
    ("file.driver", Val::OneOf(&["file"])),
    ("file.filename", Val::File),
    ("file.node-name", Val::Plain),
    ("file.aio", Val::OneOf(&["threads", "native", "io_uring"])),
    ("file.locking", Val::Plain),
    ("file.cache.direct", ON_OFF),
    ("aio", Val::OneOf(&["threads", "native", "io_uring"])),
    ("locking", Val::Plain),
    ("read-only", ON_OFF),
    ("auto-read-only", ON_OFF),
    ("discard", Val::Plain),
    ("detect-zeroes", Val::Plain),
    ("cache.direct", ON_OFF),
    ("cache.no-flush", ON_OFF),
];

const FSDEV_KEYS: &[(&str, Val)] = &[
    ("id", Val::Plain),
    ("path", Val::File),
    ("security_model", Val::OneOf(&["none", "mapped-xattr", "mapped-file", "passthrough"])),
    ("multidevs", Val::Plain),
    ("readonly", ON_OFF),
];

/// The properties of each object type Kata creates: guest memory, the entropy source, I/O
/// threads. Secrets, TLS credentials and confidential-guest objects read host files or keys and
/// are not migratable as they are; they are absent.
fn object_keys(kind: &str) -> Option<&'static [(&'static str, Val)]> {
    const MEMORY: &[(&str, Val)] = &[
        ("id", Val::Plain),
        ("size", Val::Plain),
        ("share", ON_OFF),
        ("prealloc", ON_OFF),
        ("prealloc-threads", Val::Plain),
        ("merge", ON_OFF),
        ("dump", ON_OFF),
        ("reserve", ON_OFF),
        ("host-nodes", Val::Plain),
        ("policy", Val::Plain),
    ];
    const FILE: &[(&str, Val)] = &[
        ("id", Val::Plain),
        ("size", Val::Plain),
        ("share", ON_OFF),
        ("prealloc", ON_OFF),
        ("prealloc-threads", Val::Plain),
        ("merge", ON_OFF),
        ("dump", ON_OFF),
        ("reserve", ON_OFF),
        ("host-nodes", Val::Plain),
        ("policy", Val::Plain),
        ("mem-path", Val::MemPath),
        ("readonly", ON_OFF),
        ("discard-data", ON_OFF),
        ("align", Val::Plain),
        ("pmem", ON_OFF),
    ];
    const MEMFD: &[(&str, Val)] = &[
        ("id", Val::Plain),
        ("size", Val::Plain),
        ("share", ON_OFF),
        ("prealloc", ON_OFF),
        ("prealloc-threads", Val::Plain),
        ("merge", ON_OFF),
        ("dump", ON_OFF),
        ("reserve", ON_OFF),
        ("host-nodes", Val::Plain),
        ("policy", Val::Plain),
        ("hugetlb", ON_OFF),
        ("hugetlbsize", Val::Plain),
        ("seal", ON_OFF),
    ];
    const RNG_RANDOM: &[(&str, Val)] = &[("id", Val::Plain), ("filename", Val::OneOf(RNG_SOURCES))];
    const RNG_BUILTIN: &[(&str, Val)] = &[("id", Val::Plain)];
    const IOTHREAD: &[(&str, Val)] = &[
        ("id", Val::Plain),
        ("poll-max-ns", Val::Plain),
        ("poll-grow", Val::Plain),
        ("poll-shrink", Val::Plain),
        ("aio-max-batch", Val::Plain),
        ("thread-pool-min", Val::Plain),
        ("thread-pool-max", Val::Plain),
    ];
    Some(match kind {
        "memory-backend-ram" => MEMORY,
        "memory-backend-file" => FILE,
        "memory-backend-memfd" => MEMFD,
        "rng-random" => RNG_RANDOM,
        "rng-builtin" => RNG_BUILTIN,
        "iothread" => IOTHREAD,
        _ => return None,
    })
}

/// `-global driver.property=value` (or `driver=…,property=…,value=…`) for an allowed device or
/// Kata's `kvm-pit.lost_tick_policy`; the value plain, so it cannot carry a path.
fn check_global(cx: &Ctx<'_>, parts: &[String]) -> Result<(), Error> {
    let (driver, property, value) = match parts {
        [one] => {
            let (dp, v) = one.split_once('=').ok_or_else(|| cx.refuse("expects driver.property=value"))?;
            let (d, p) = dp.split_once('.').ok_or_else(|| cx.refuse("expects driver.property=value"))?;
            (d, p, v)
        }
        _ => {
            let (_, props) = positional(parts);
            let get =
                |k: &str| props.iter().find(|(key, _)| *key == k).and_then(|(_, v)| *v).unwrap_or_default();
            (get("driver"), get("property"), get("value"))
        }
    };
    if !(DEVICE_DRIVERS.contains(&driver) || (driver, property) == ("kvm-pit", "lost_tick_policy")) {
        return Err(cx.refuse_prop(&format!("{driver}.{property}"), "not a global of an allowed device"));
    }
    if !plain(property) {
        return Err(cx.refuse_prop(property, "not a property name"));
    }
    cx.value(property, value, Val::Plain)
}

/// `-qmp`, `-monitor`: a unix socket by path (`unix:PATH` or `unix:path=PATH`) or an inherited
/// fd (`unix:fd=N`, Kata's form; the rewrite drops it), with server/wait switches.
fn check_monitor(cx: &Ctx<'_>, value: &str) -> Result<(), Error> {
    let Some(rest) = value.strip_prefix("unix:") else {
        return Err(cx.refuse(format!("{value:?} is not a unix socket")));
    };
    let parts = split_opts(rest);
    let first = parts.first().map_or("", String::as_str);
    match first.split_once('=') {
        Some(("path", p)) => cx.value("path", p, Val::State)?,
        Some(("fd", fd)) => cx.value("fd", fd, Val::Fd)?,
        Some((k, _)) => return Err(cx.refuse_prop(k, "not an allowed property")),
        None => cx.value("path", first, Val::State)?,
    }
    let props: Vec<(&str, Option<&str>)> = parts
        .iter()
        .skip(1)
        .map(|p| p.split_once('=').map_or((p.as_str(), None), |(k, v)| (k, Some(v))))
        .collect();
    cx.props(&props, &[("server", ON_OFF), ("wait", ON_OFF), ("nowait", ON_OFF)])
}

/// `-serial none`, `chardev:ID` (Kata's legacy serial) or `file:PATH` (a console log in the
/// state directory). A `mon:` multiplexer, stdio, a pty, a network or a pipe are refused.
fn check_serial(cx: &Ctx<'_>, value: &str) -> Result<(), Error> {
    if value == "none" {
        return Ok(());
    }
    if let Some(id) = value.strip_prefix("chardev:") {
        return cx.value("chardev", id, Val::Plain);
    }
    if let Some(path) = value.strip_prefix("file:") {
        return cx.value("file", path, Val::State);
    }
    Err(cx.refuse(format!("serial backend {value:?} is not allowed (none, chardev:ID or file:PATH)")))
}

/// `-blockdev` in keyval or JSON form; JSON is flattened to the dotted keys of the keyval form.
fn check_blockdev(cx: &Ctx<'_>, value: &str) -> Result<(), Error> {
    let mut flat = Vec::new();
    if value.trim_start().starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(value).map_err(|e| cx.refuse(format!("JSON does not parse: {e}")))?;
        flatten("", &json, &mut flat).map_err(|key| cx.refuse_prop(&key, "not a plain value"))?;
    } else {
        for p in split_opts(value) {
            let (k, v) = p.split_once('=').map_or((p.as_str(), ""), |(k, v)| (k, v));
            flat.push((k.to_owned(), v.to_owned()));
        }
    }
    for (k, v) in &flat {
        cx.prop(k, Some(v), BLOCKDEV_KEYS)?;
    }
    Ok(())
}

fn flatten(prefix: &str, json: &serde_json::Value, out: &mut Vec<(String, String)>) -> Result<(), String> {
    match json {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out)?;
            }
            Ok(())
        }
        serde_json::Value::String(s) => {
            out.push((prefix.to_owned(), s.clone()));
            Ok(())
        }
        serde_json::Value::Bool(b) => {
            out.push((prefix.to_owned(), if *b { "on" } else { "off" }.to_owned()));
            Ok(())
        }
        serde_json::Value::Number(n) => {
            out.push((prefix.to_owned(), n.to_string()));
            Ok(())
        }
        _ => Err(prefix.to_owned()),
    }
}

fn plain(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '+' | '@' | '-'))
}

fn digits(v: &str) -> bool {
    !v.is_empty() && v.len() <= 9 && v.chars().all(|c| c.is_ascii_digit())
}

/// Absolute, and no `..` (nor `.`) component: what it names does not depend on what it walks.
pub(crate) fn lexically_clean(path: &Path) -> bool {
    let text = path.as_os_str().as_encoded_bytes();
    path.is_absolute()
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !text.windows(3).any(|w| w == b"/./")
        && !text.ends_with(b"/.")
}

/// `path` is one of `roots` or below one, compared component by component.
pub(crate) fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| lexically_clean(r) && r != Path::new("/") && path.starts_with(r))
}
