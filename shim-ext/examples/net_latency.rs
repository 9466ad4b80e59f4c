//! Route replace latency through a namespace thread — the cutover's STOP
//! reaction (decision 4).
//!
//! ```text
//! cargo run --release -p katamaran-shim-ext --example net_latency [-- ITERATIONS]
//! ```
//!
//! Needs root. Creates a scratch namespace with a veth pair, then replaces a
//! /32 ITERATIONS times (default 1000), alternating between `dev` and
//! `via … onlink` so that every replace changes the route. Prints the median,
//! p99 and max of the time the kernel took (measured on the namespace thread)
//! and of the round trip seen by a caller on a multi-thread runtime.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use katamaran::net::{create_netns, remove_netns, IpPrefix, NetOps, NetnsHandle, RouteSpec, VethSpec};

const WARMUP: usize = 50;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = remove_netns(&self.0) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<38} median {:>7.1} µs   p99 {:>7.1} µs   max {:>7.1} µs   (n={})",
        pick(0.5).as_secs_f64() * 1e6,
        pick(0.99).as_secs_f64() * 1e6,
        pick(1.0).as_secs_f64() * 1e6,
        samples.len()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: needs root");
        return Ok(());
    }
    let iterations: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("ITERATIONS must be a number")?,
        None => 1000,
    };

    let scratch = Scratch(PathBuf::from(format!("/run/netns/kt-latency-{}", std::process::id())));
    create_netns(&scratch.0)?;
    let h = NetnsHandle::open(&scratch.0)?;
    h.create_veth(&VethSpec { name: "lat0".into(), peer: "lat1".into(), peer_netns: None }).await?;
    let lat0 = h.link("lat0").await?.id;
    let lat1 = h.link("lat1").await?.id;
    h.set_link_up(&lat0, true).await?;
    h.set_link_up(&lat1, true).await?;
    h.add_address(&lat0, "10.81.0.1/24".parse()?).await?;

    let vm: IpPrefix = "10.81.1.5/32".parse()?;
    let routes =
        [RouteSpec::dev(vm, lat0.clone()), RouteSpec::via_onlink(vm, "10.81.0.2".parse()?, lat1.clone())];
    let mut on_thread = Vec::with_capacity(iterations);
    let mut round_trip = Vec::with_capacity(iterations);
    for i in 0..WARMUP + iterations {
        let start = Instant::now();
        let timing = h.replace_route(&routes[i % 2]).await?;
        let rt = start.elapsed();
        if i >= WARMUP {
            on_thread.push(timing.elapsed);
            round_trip.push(rt);
        }
    }
    let last = h.routes(vm).await?;
    anyhow::ensure!(last.len() == 1, "expected one route to {vm}, found {last:?}");

    println!("route replace of {vm}, {iterations} iterations after {WARMUP} warm-up:");
    summary("netlink on the namespace thread", on_thread);
    summary("round trip from a multi-thread runtime", round_trip);
    drop(h);
    Ok(())
}
