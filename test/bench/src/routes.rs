//! The cutover's route swap two ways: katamaran's in-process netlink (`NetnsHandle` +
//! `NetOps::replace_route`, a namespace thread with its own connection) against one
//! `ip route replace` process per change, as a shell-driven tool does it.
//!
//! Both replace the same /32 in the lab's node-a namespace, alternating between two routes so
//! that every replace changes something (an identical replace is a no-op in the kernel).

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use katamaran::net::{IpPrefix, NetOps, NetnsHandle, RouteSpec, VethSpec};
use katamaran_e2e::{Lab, Node};
use tokio::runtime::Runtime;

use crate::report::RouteResult;

const WARMUP: usize = 20;
const PREFIX: &str = "10.81.1.5/32";
const GATEWAY: &str = "10.81.0.2";
// Short names that cannot collide with the lab's (eth0, kmr<hash>).
const LINK_A: &str = "kbench0";
const LINK_B: &str = "kbench1";

/// Measures `netlink_n` netlink replaces and `spawn_n` spawned ones.
///
/// # Errors
/// When the namespace cannot be prepared or a replace fails.
pub fn measure(lab: &Lab, rt: &Runtime, netlink_n: usize, spawn_n: usize) -> anyhow::Result<RouteResult> {
    let ns = lab.netns(Node::A.name());
    let mut out = RouteResult::default();
    rt.block_on(async {
        let h = NetnsHandle::open(format!("/run/netns/{ns}"))?;
        h.create_veth(&VethSpec { name: LINK_A.into(), peer: LINK_B.into(), peer_netns: None }).await?;
        let a = h.link(LINK_A).await?.id;
        let b = h.link(LINK_B).await?.id;
        h.set_link_up(&a, true).await?;
        h.set_link_up(&b, true).await?;
        h.add_address(&a, "10.81.0.1/24".parse()?).await?;
        let vm: IpPrefix = PREFIX.parse()?;
        let routes = [RouteSpec::dev(vm, a.clone()), RouteSpec::via_onlink(vm, GATEWAY.parse()?, b.clone())];
        for i in 0..WARMUP + netlink_n {
            let started = Instant::now();
            let timing = h.replace_route(&routes[i % 2]).await?;
            let round_trip = started.elapsed();
            if i >= WARMUP {
                out.netlink_us.push(round_trip.as_secs_f64() * 1e6);
                out.netlink_on_thread_us.push(timing.elapsed.as_secs_f64() * 1e6);
            }
        }
        anyhow::Ok(())
    })?;
    let variants: [&[&str]; 2] = [
        &["route", "replace", PREFIX, "dev", LINK_A],
        &["route", "replace", PREFIX, "via", GATEWAY, "dev", LINK_B, "onlink"],
    ];
    for i in 0..WARMUP + spawn_n {
        let started = Instant::now();
        let status = Command::new("ip")
            .args(["-n", &ns])
            .args(variants[i % 2])
            .stdin(Stdio::null())
            .status()
            .context("cannot run ip")?;
        let took = started.elapsed();
        if !status.success() {
            bail!("ip route replace failed ({status})");
        }
        if i >= WARMUP {
            out.spawn_us.push(took.as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}
