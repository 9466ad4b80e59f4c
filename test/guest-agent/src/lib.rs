//! `katamaran-guest`: the lab guest's agent, one static std-only binary run by the guest's init.
//!
//! | subcommand     | what it does                                                          |
//! |----------------|-----------------------------------------------------------------------|
//! | `udp-echo`     | echoes datagrams verbatim (the probe's other end), IPv4 + IPv6        |
//! | `http`         | `GET /` → `{"instance", "uptime_ms", "hostname", "disk_records", …}`  |
//! | `disk-writer`  | durable, sequence-numbered, checksummed records at a steady rate      |
//! | `disk-check`   | verifies a disk log (in the guest or on a host raw image)             |
//! | `disk-compare` | a source log must be a byte-identical prefix of the destination's     |
//! | `dirty-mem`    | keeps guest memory dirty for migration benchmarks                     |
//!
//! The record format is in [`record`]; the checker's rules in [`check`].

pub mod args;
pub mod check;
pub mod crc32;
pub mod dirty;
pub mod json;
pub mod net;
pub mod record;
pub mod sys;
pub mod writer;
