//! Traffic control, run on a namespace thread: Kata's tcfilter model (ingress
//! qdisc + u32 match-all `mirred egress redirect`) and the plug.

use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcStats2};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use super::error::{is_unsupported_errno, nl_io, Error, Result};
use super::netns::Ctx;
use super::nl;
use super::plug::{action_code, plug_message, TCQ_PLUG_BUFFER, TCQ_PLUG_LIMIT};
use super::types::{Feature, LinkId, PlugAction, QdiscInfo, QdiscParent, QdiscStats};

/// `ETH_P_ALL` (`include/uapi/linux/if_ether.h`); tc carries the protocol in
/// network byte order in the low 16 bits of `tcm_info`.
const ETH_P_ALL: u16 = 0x0003;

/// Filter preference; one filter per ingress qdisc, so any fixed value works.
const REDIRECT_PREF: u16 = 1;

/// `tcm_ifindex` is a C `int`; kernel ifindexes are positive ints.
fn tc_index(link: &LinkId) -> i32 {
    i32::try_from(link.index).unwrap_or(i32::MAX)
}

fn parent_handle(parent: QdiscParent) -> TcHandle {
    match parent {
        QdiscParent::Root => TcHandle::ROOT,
        QdiscParent::Ingress => TcHandle::INGRESS,
    }
}

/// `tc qdisc add dev DEV ingress` (handle `ffff:`).
pub(crate) async fn add_ingress(ctx: &Ctx, link: &LinkId) -> Result<()> {
    let mut qd = ctx.nl.qdisc();
    qd.add(tc_index(link))
        .ingress()
        .execute()
        .await
        .map_err(|e| Error::AddIngress { link: link.clone(), source: nl_io(e) })
}

/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev TO` — Kata's tcfilter, one direction.
pub(crate) async fn add_redirect(ctx: &Ctx, from: &LinkId, to: &LinkId) -> Result<()> {
    let err = |e| Error::AddRedirect { from: from.clone(), to: to.clone(), source: nl_io(e) };
    let req = ctx
        .nl
        .traffic_filter(tc_index(from))
        .add()
        .parent(u32::from(TcHandle::INGRESS.major) << 16)
        .priority(REDIRECT_PREF)
        .protocol(ETH_P_ALL.to_be())
        .redirect(to.index)
        .map_err(err)?;
    req.execute().await.map_err(err)
}

/// `tc qdisc del dev DEV root|ingress`.
pub(crate) async fn delete_qdisc(ctx: &Ctx, link: &LinkId, parent: QdiscParent) -> Result<()> {
    let mut msg = TcMessage::with_index(tc_index(link));
    msg.header.parent = parent_handle(parent);
    if parent == QdiscParent::Ingress {
        msg.header.handle = TcHandle { major: 0xffff, minor: 0 };
    }
    nl::ack(&ctx.nl, RouteNetlinkMessage::DelQueueDiscipline(msg), 0)
        .await
        .map_err(|source| Error::DeleteQdisc { link: link.clone(), parent, source })
}

/// The qdisc at `parent` of `link`, if one was configured (the kernel's
/// default root qdisc has handle 0 and is reported too, e.g. `noqueue`).
pub(crate) async fn get_qdisc(ctx: &Ctx, link: &LinkId, parent: QdiscParent) -> Result<Option<QdiscInfo>> {
    let msgs =
        nl::dump(&ctx.nl, RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(tc_index(link))))
            .await
            .map_err(|source| Error::GetQdisc { link: link.clone(), parent, source })?;
    let want = parent_handle(parent);
    Ok(msgs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q)
            if q.header.index == tc_index(link) && q.header.parent == want =>
        {
            Some(qdisc_info(q))
        }
        _ => None,
    }))
}

/// Kind and counters of a qdisc reply; `TCA_STATS2` wins over the legacy
/// `TCA_STATS` when both are present.
pub(crate) fn qdisc_info(msg: &TcMessage) -> QdiscInfo {
    let mut kind = String::new();
    let mut legacy = None;
    let mut modern = None;
    for a in &msg.attributes {
        match a {
            TcAttribute::Kind(k) => kind = k.clone(),
            TcAttribute::Stats(s) => {
                legacy = Some(QdiscStats {
                    qlen: s.qlen,
                    backlog_bytes: s.backlog,
                    drops: s.drops,
                    packets: s.packets,
                })
            }
            TcAttribute::Stats2(list) => {
                let mut st = QdiscStats::default();
                for s in list {
                    match s {
                        TcStats2::Queue(q) => {
                            st.qlen = q.qlen;
                            st.backlog_bytes = q.backlog;
                            st.drops = q.drops;
                        }
                        TcStats2::Basic(b) => st.packets = b.packets,
                        _ => {}
                    }
                }
                modern = Some(st);
            }
            _ => {}
        }
    }
    QdiscInfo { kind, stats: modern.or(legacy).unwrap_or_default() }
}

/// Maps a plug failure: an unknown qdisc kind means the kernel lacks sch_plug.
fn plug_err(source: std::io::Error, other: impl FnOnce(std::io::Error) -> Error) -> Error {
    match source.raw_os_error() {
        Some(errno) if is_unsupported_errno(Feature::Plug, errno) => {
            Error::Unsupported { what: Feature::Plug, source }
        }
        _ => other(source),
    }
}

/// `tc qdisc add dev DEV root plug limit N` — buffering from the first packet.
pub(crate) async fn install_plug(ctx: &Ctx, link: &LinkId, limit_bytes: u32) -> Result<()> {
    let msg = plug_message(tc_index(link), TCQ_PLUG_BUFFER, limit_bytes);
    nl::ack(&ctx.nl, RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_CREATE | NLM_F_EXCL).await.map_err(
        |source| plug_err(source, |source| Error::InstallPlug { link: link.clone(), limit_bytes, source }),
    )
}

/// `tc qdisc change dev DEV root plug {buffer|release_one|release_indefinite}`.
pub(crate) async fn plug_action(ctx: &Ctx, link: &LinkId, action: PlugAction) -> Result<()> {
    // plug_change() ignores `limit` unless the action is TCQ_PLUG_LIMIT.
    let msg = plug_message(tc_index(link), action_code(action), 0);
    nl::ack(&ctx.nl, RouteNetlinkMessage::NewQueueDiscipline(msg), 0)
        .await
        .map_err(|source| Error::PlugAction { link: link.clone(), action, source })
}

/// `tc qdisc change dev DEV root plug limit N`.
pub(crate) async fn set_plug_limit(ctx: &Ctx, link: &LinkId, limit_bytes: u32) -> Result<()> {
    let msg = plug_message(tc_index(link), TCQ_PLUG_LIMIT, limit_bytes);
    nl::ack(&ctx.nl, RouteNetlinkMessage::NewQueueDiscipline(msg), 0)
        .await
        .map_err(|source| Error::SetPlugLimit { link: link.clone(), limit_bytes, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use netlink_packet_route::tc::{TcStats, TcStatsBasic, TcStatsQueue};

    #[test]
    fn qdisc_info_prefers_stats2() {
        let mut msg = TcMessage::with_index(3);
        let mut legacy = TcStats::default();
        legacy.qlen = 1;
        legacy.drops = 1;
        let mut queue = TcStatsQueue::default();
        queue.qlen = 7;
        queue.backlog = 7 * 1514;
        queue.drops = 2;
        let mut basic = TcStatsBasic::default();
        basic.packets = 40;
        msg.attributes = vec![
            TcAttribute::Kind("plug".into()),
            TcAttribute::Stats2(vec![TcStats2::Basic(basic), TcStats2::Queue(queue)]),
            TcAttribute::Stats(legacy),
        ];
        let info = qdisc_info(&msg);
        assert_eq!(info.kind, "plug");
        assert_eq!(info.stats, QdiscStats { qlen: 7, backlog_bytes: 7 * 1514, drops: 2, packets: 40 });
        msg.attributes.retain(|a| !matches!(a, TcAttribute::Stats2(_)));
        assert_eq!(qdisc_info(&msg).stats.qlen, 1);
    }

    #[test]
    fn unknown_qdisc_kind_is_unsupported() {
        let e = plug_err(std::io::Error::from_raw_os_error(libc::ENOENT), |source| Error::GetQdisc {
            link: LinkId { index: 1, name: "x".into() },
            parent: QdiscParent::Root,
            source,
        });
        assert!(matches!(e, Error::Unsupported { what: Feature::Plug, .. }), "{e}");
        let e = plug_err(std::io::Error::from_raw_os_error(libc::EEXIST), |source| Error::InstallPlug {
            link: LinkId { index: 1, name: "x".into() },
            limit_bytes: 1,
            source,
        });
        assert!(matches!(e, Error::InstallPlug { .. }), "{e}");
    }
}
