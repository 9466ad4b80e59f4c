//! QEMU's own option table: every command-line option of the QEMU versions katamaran supports and
//! whether it takes an argument.
//!
//! Written by hand from QEMU's `qemu-options.hx` (each `DEF(name, HAS_ARG | 0, …)` entry) for
//! QEMU 7.2 (Debian 12) and 10.x (Kata 3.27+): the union of both, so a command line from either
//! version splits the way QEMU itself splits it. An option is in the table whatever target
//! architecture it belongs to (`-no-acpi` is x86-only, `-prom-env` SPARC/PPC-only): the table
//! decides how argv splits into options, not whether an option is accepted — that is the
//! allowlist's job (`super::allowlist`).
//!
//! Options added after 7.2 (`-run-with`, `-one-insn-per-tb`, `-perfmap`, `-jitdump`, `-shim`) and
//! options removed before 10.x (`-singlestep`, `-no-hpet`, `-no-acpi`, `-chroot`, `-runas`,
//! `-async-teardown`, `-win2k-hack`, …) are all here; no option changed its arity between them.
//! To support a newer QEMU, add the `DEF` entries its `qemu-options.hx` gained, keeping the order.

/// Whether a QEMU option consumes the next word of argv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// `DEF(…, 0, …)`: a flag such as `-daemonize`.
    Flag,
    /// `DEF(…, HAS_ARG, …)`: the next word is its argument, whatever it looks like.
    Arg,
}

use Arity::{Arg, Flag};

/// Every option name (without dashes) with its arity, sorted by name (byte order) for lookup.
pub const QEMU_OPTIONS: &[(&str, Arity)] = &[
    ("D", Arg),
    ("L", Arg),
    ("M", Arg),
    ("S", Flag),
    ("accel", Arg),
    ("acpitable", Arg),
    ("action", Arg),
    ("add-fd", Arg),
    ("append", Arg),
    ("async-teardown", Flag),
    ("audio", Arg),
    ("audio-help", Flag),
    ("audiodev", Arg),
    ("bios", Arg),
    ("blockdev", Arg),
    ("boot", Arg),
    ("cdrom", Arg),
    ("chardev", Arg),
    ("chroot", Arg),
    ("compat", Arg),
    ("cpu", Arg),
    ("d", Arg),
    ("daemonize", Flag),
    ("debugcon", Arg),
    ("device", Arg),
    ("dfilter", Arg),
    ("display", Arg),
    ("drive", Arg),
    ("dtb", Arg),
    ("dump-vmstate", Arg),
    ("echr", Arg),
    ("enable-kvm", Flag),
    ("enable-sync-profile", Flag),
    ("fda", Arg),
    ("fdb", Arg),
    ("fsdev", Arg),
    ("full-screen", Flag),
    ("fw_cfg", Arg),
    ("g", Arg),
    ("gdb", Arg),
    ("global", Arg),
    ("h", Flag),
    ("hda", Arg),
    ("hdb", Arg),
    ("hdc", Arg),
    ("hdd", Arg),
    ("help", Flag),
    ("icount", Arg),
    ("incoming", Arg),
    ("initrd", Arg),
    ("iscsi", Arg),
    ("jitdump", Flag),
    ("k", Arg),
    ("kernel", Arg),
    ("loadvm", Arg),
    ("m", Arg),
    ("machine", Arg),
    ("mem-path", Arg),
    ("mem-prealloc", Flag),
    ("mon", Arg),
    ("monitor", Arg),
    ("msg", Arg),
    ("mtdblock", Arg),
    ("name", Arg),
    ("net", Arg),
    ("netdev", Arg),
    ("nic", Arg),
    ("no-acpi", Flag),
    ("no-fd-bootchk", Flag),
    ("no-hpet", Flag),
    ("no-reboot", Flag),
    ("no-shutdown", Flag),
    ("no-user-config", Flag),
    ("nodefaults", Flag),
    ("nographic", Flag),
    ("numa", Arg),
    ("object", Arg),
    ("old-param", Flag),
    ("one-insn-per-tb", Flag),
    ("only-migratable", Flag),
    ("option-rom", Arg),
    ("overcommit", Arg),
    ("parallel", Arg),
    ("perfmap", Flag),
    ("pflash", Arg),
    ("pidfile", Arg),
    ("plugin", Arg),
    ("portrait", Flag),
    ("preconfig", Flag),
    ("prom-env", Arg),
    ("qmp", Arg),
    ("qmp-pretty", Arg),
    ("qtest", Arg),
    ("qtest-log", Arg),
    ("readconfig", Arg),
    ("rotate", Arg),
    ("rtc", Arg),
    ("run-with", Arg),
    ("runas", Arg),
    ("s", Flag),
    ("sandbox", Arg),
    ("sd", Arg),
    ("seed", Arg),
    ("semihosting", Flag),
    ("semihosting-config", Arg),
    ("serial", Arg),
    ("set", Arg),
    ("shim", Arg),
    ("singlestep", Flag),
    ("smbios", Arg),
    ("smp", Arg),
    ("snapshot", Flag),
    ("spice", Arg),
    ("tpmdev", Arg),
    ("trace", Arg),
    ("usb", Flag),
    ("usbdevice", Arg),
    ("uuid", Arg),
    ("version", Flag),
    ("vga", Arg),
    ("virtfs", Arg),
    ("vnc", Arg),
    ("watchdog-action", Arg),
    ("win2k-hack", Flag),
    ("xen-attach", Flag),
    ("xen-domid", Arg),
    ("xen-domid-restrict", Flag),
];

/// The arity of `name` (without dashes), or `None` when neither QEMU 7.2 nor 10.x knows it.
pub fn arity(name: &str) -> Option<Arity> {
    QEMU_OPTIONS.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| QEMU_OPTIONS[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for pair in QEMU_OPTIONS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
    }

    #[test]
    fn arities_match_qemu() {
        let table = [
            ("machine", Some(Arg)),
            ("incoming", Some(Arg)),
            ("qmp", Some(Arg)),
            ("D", Some(Arg)),
            ("run-with", Some(Arg)),
            ("shim", Some(Arg)),
            ("daemonize", Some(Flag)),
            ("nographic", Some(Flag)),
            ("no-user-config", Some(Flag)),
            ("S", Some(Flag)),
            ("s", Some(Flag)),
            ("one-insn-per-tb", Some(Flag)),
            ("memory", None),
            ("", None),
            ("-machine", None),
        ];
        for (name, want) in table {
            assert_eq!(arity(name), want, "{name}");
        }
    }
}
