//! Raw rtnetlink requests for what rtnetlink's request builders do not cover
//! (attributes they cannot set, e.g. the plug's raw `TCA_OPTIONS`).

use std::io;

use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

/// Sends `msg` with `NLM_F_REQUEST | NLM_F_ACK | flags` and waits for the ack.
pub(crate) async fn ack(nl: &rtnetlink::Handle, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut resp = nl.clone().request(req).map_err(io::Error::other)?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            // A zero code is an ack (only seen if acks are forwarded).
            if e.code.is_some() {
                return Err(e.to_io());
            }
        }
    }
    Ok(())
}

/// Sends `msg` as a dump request and collects the inner messages.
pub(crate) async fn dump(
    nl: &rtnetlink::Handle,
    msg: RouteNetlinkMessage,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut resp = nl.clone().request(req).map_err(io::Error::other)?;
    let mut out = Vec::new();
    while let Some(m) = resp.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(inner) => out.push(inner),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
            _ => {}
        }
    }
    Ok(out)
}
