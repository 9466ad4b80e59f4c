//! The netlink room: links, routes, tunnels, qdiscs and namespace threads —
//! the only place in the engine that makes network syscalls.
//!
//! This module has no migration policy; the engine decides *what* to do and
//! calls it through the [`NetOps`] trait:
//!
//! ```text
//!  engine (any tokio runtime)            namespace thread (one per netns)
//!  ──────────────────────────            ────────────────────────────────
//!  net.replace_route(&spec).await ─job─▶ setns()'d once at start
//!                                        current-thread runtime:
//!                                          rtnetlink connection task
//!                                          job: RTM_NEWROUTE ─▶ kernel
//!            ◀──────────── oneshot ────── ack (+ on-thread Timing)
//! ```
//!
//! - [`NetnsHandle`] is the real implementation (decision 2): a dedicated
//!   thread per namespace, so no namespace is ever held across an `.await`
//!   of a multi-thread runtime, and the connection and its requests share a
//!   thread (~9 µs per route replace rather than ~85 µs).
//! - [`Recording`] is the fake for engine tests: it records [`NetOp`]s.
//! - The plug (decision 3) is a raw `kind=plug` qdisc; size it with
//!   [`plug_limit_bytes`].
//! - [`NetOps::probe`] tells whether the kernel has sch_plug and the tunnel
//!   kinds; operations that need a missing one fail with
//!   [`Error::Unsupported`] so the engine can fall back (decision 7: route
//!   mode, `txqueuelen` buffering) with a warning.
//! - Validation ([`validate_ifname`], [`validate_netns_path`],
//!   [`validate_route`], [`validate_tunnel`]) is pure and runs before any
//!   request.

mod error;
mod links;
mod netns;
mod nl;
mod ops;
mod plug;
mod probe;
mod recording;
mod routes;
mod tap;
pub mod tapdrain;
mod tc;
mod tunnel;
mod types;
mod validate;

pub use error::{Error, Result};
pub use netns::{create_netns, create_netns_in, remove_netns, NetnsHandle};
pub use ops::{NetOp, NetOps};
pub use plug::{
    plug_limit_bytes, plug_qopt, MAX_PLUG_LIMIT_BYTES, MIN_PLUG_LIMIT_BYTES, TCQ_PLUG_BUFFER, TCQ_PLUG_LIMIT,
    TCQ_PLUG_RELEASE_INDEFINITE, TCQ_PLUG_RELEASE_ONE,
};
pub use probe::probe;
pub use recording::{fake_link, Recording};
pub use types::{
    Feature, IpPrefix, LinkId, LinkInfo, MacAddr, NeighbourInfo, NeighbourSpec, OperState, ParseMacError,
    ParsePrefixError, PathTo, PlugAction, QdiscInfo, QdiscParent, QdiscStats, RouteInfo, RouteSpec, TapSpec,
    Timing, TunDetails, TunnelDetails, TunnelMode, TunnelSpec, VethSpec,
};
pub use validate::{
    validate_host_prefix, validate_ifname, validate_netns_path, validate_route, validate_tunnel, NetnsRoots,
    MAX_IFNAME_LEN,
};
