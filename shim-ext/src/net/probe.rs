//! "Does the kernel have X": try to create it in a scratch namespace.
//!
//! Modules are global, so the answer holds for every namespace; probing in a
//! private, thread-owned namespace leaves nothing behind in the caller's
//! (the namespace and its links vanish when the probe thread exits).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nix::sched::{unshare, CloneFlags};
use tracing::{debug, warn};

use super::error::{errno_io, Error, Result};
use super::links::{get_link, set_state};
use super::netns::Ctx;
use super::tc::install_plug;
use super::tunnel::create_tunnel;
use super::types::{Feature, TunnelMode, TunnelSpec, VethSpec};

/// Endpoints from the documentation ranges (RFC 5737, RFC 3849).
const PROBE_V4: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
const PROBE_V6: (Ipv6Addr, Ipv6Addr) =
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));

/// Tries to create `what` in a scratch namespace.
///
/// # Errors
/// [`Error::Unsupported`] when the kernel lacks it (callers fall back with a
/// warning, decision 7); [`Error::ProbeSetup`] when the scratch namespace or
/// its veth could not be made; the creation error otherwise.
pub async fn probe(what: Feature) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || {
            let _ = tx.send(probe_blocking(what));
        })
        .map_err(|e| Error::ProbeSetup {
            what,
            source: Box::new(Error::SpawnThread { path: "(scratch namespace)".into(), source: e }),
        })?;
    let res = rx.await.unwrap_or_else(|_| {
        Err(Error::ProbeSetup {
            what,
            source: Box::new(Error::ThreadGone { path: "(scratch namespace)".into() }),
        })
    });
    match &res {
        Ok(()) => debug!(%what, "kernel feature present"),
        Err(e) if e.is_unsupported() => warn!(%what, "kernel feature missing"),
        Err(e) => warn!(%what, error = %e, "kernel feature probe failed"),
    }
    res
}

fn setup_err(what: Feature, e: Error) -> Error {
    Error::ProbeSetup { what, source: Box::new(e) }
}

fn probe_blocking(what: Feature) -> Result<()> {
    let scratch = || std::path::PathBuf::from("(scratch namespace)");
    unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| setup_err(what, Error::EnterNetns { path: scratch(), source: errno_io(e) }))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| setup_err(what, Error::StartRuntime { path: scratch(), source }))?;
    rt.block_on(async {
        let (conn, nl, _) = rtnetlink::new_connection()
            .map_err(|source| setup_err(what, Error::NetlinkSocket { path: scratch(), source }))?;
        tokio::spawn(conn);
        let ctx = Ctx { nl, path: std::sync::Arc::new(scratch()) };
        match what {
            Feature::Plug => probe_plug(&ctx).await,
            Feature::Ipip => probe_tunnel(&ctx, TunnelMode::Ipip).await,
            Feature::Gre => probe_tunnel(&ctx, TunnelMode::Gre).await,
            Feature::Ip6Tnl => probe_tunnel(&ctx, TunnelMode::Ip6ip6).await,
            Feature::Ip6Gre => probe_tunnel(&ctx, TunnelMode::Ip6gre).await,
        }
    })
}

async fn probe_plug(ctx: &Ctx) -> Result<()> {
    // veth is the device Kata's netns already relies on; the plug needs a
    // device with a real (non-noqueue-only) transmit path.
    let spec = VethSpec { name: "kprobe0".into(), peer: "kprobe1".into(), peer_netns: None };
    let link = super::links::create_veth(ctx, &spec).await.map_err(|e| setup_err(Feature::Plug, e))?;
    set_state(ctx, &link, true).await.map_err(|e| setup_err(Feature::Plug, e))?;
    install_plug(ctx, &link, super::plug::MIN_PLUG_LIMIT_BYTES).await
}

async fn probe_tunnel(ctx: &Ctx, mode: TunnelMode) -> Result<()> {
    let (local, remote) = if mode.outer_is_ipv6() {
        (IpAddr::V6(PROBE_V6.0), IpAddr::V6(PROBE_V6.1))
    } else {
        (IpAddr::V4(PROBE_V4.0), IpAddr::V4(PROBE_V4.1))
    };
    let spec = TunnelSpec { name: "kprobe-tnl".into(), mode, local, remote, ttl: 64 };
    create_tunnel(ctx, &spec).await?;
    // Read back so a kernel that silently ignored the kind is not "present".
    get_link(ctx, &spec.name).await.map(|_| ())
}
