//! katamaran's migration engine.
//!
//! | module | what it owns |
//! |---|---|
//! | [`qmp`] | the QMP client: handshake, commands, events, deadlines — no migration policy |
//! | [`migration`] | the state machine (source, destination, storage, compute, cutover) and its pure decisions |
//! | [`net`] | netlink (links, routes, tunnels, qdiscs) and netns threads — the only syscall room |
//! | [`sandbox`] | discovery: OCI bundle, Kata run dir, command-line capture and rewrite |

pub mod migration;
pub mod net;
pub mod qmp;
pub mod sandbox;
