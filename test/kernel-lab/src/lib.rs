//! The kernel lab: proof, with katamaran's own netlink code, that the production network path —
//! `sch_plug` holding a migrating VM's packets, IPIP/GRE/ip6ip6/ip6gre tunnels carrying them to
//! the destination node, the STOP → route swap / RESUME → plug release cutover — works on a
//! kernel that has those modules (Debian's cloud kernel), booted under QEMU.
//!
//! ```text
//!  host: cargo nextest run -p katamaran-kernel-lab
//!    └─ tests/kernel_lab.rs
//!         ├─ hack/kernel-lab/build.sh   guest image (+ modules) + static runner + static suite
//!         └─ hack/kernel-lab/run.sh     qemu -accel tcg … → console log, exit status
//!              └─ VM /init: insmod, mounts, `katamaran-kernel-lab --suite …`, poweroff -f
//!                   └─ this crate's binary: checks::ALL → KERNEL-LAB-CHECK lines,
//!                      KERNEL-LAB-RESULT {json}
//! ```
//!
//! Everything runs in network namespaces the checks create and remove ([`lab::Node`]); the
//! only traffic generator is the lab's probe library (`katamaran-probe`). See
//! `docs/KERNEL-LAB.md` for what is proven and the numbers of a run.

pub mod checks;
pub mod echo;
pub mod error;
pub mod lab;
pub mod report;
pub mod topo;
