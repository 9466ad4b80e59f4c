//! katamaran's migration engine.
//!
//! | module | what it owns |
//! |---|---|
//! | [`qmp`] | the QMP client: handshake, commands, events, deadlines — no migration policy |
//! | [`net`] | netlink (links, routes, tunnels, qdiscs) and netns threads — the only syscall room |

pub mod net;
pub mod qmp;
