//! Pure packet accounting: from what was sent and what came back, in arrival order, to the counts
//! of a [`Report`](crate::Report). No clocks or sockets here, so every rule is tested on synthetic
//! sequences.

use crate::report::{ns_to_ms, Counts, LossRun, Percentiles};

/// One reply as the receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Sequence number the reply carried.
    pub seq: u64,
    /// Arrival time in ns since the counting start.
    pub recv_ns: u64,
}

/// Accounts a run.
///
/// `send_ns[i]` is when sequence number `i` was sent (ns since the counting start, non-decreasing);
/// `arrivals` are the replies in the order they arrived. Rules:
/// - `received` counts distinct sequence numbers; every further reply of one is `duplicated`;
/// - a first reply is `reordered` when a higher sequence number came back before it;
/// - `longest_gap_ms` is the longest interval without a reply while packets were outstanding:
///   between consecutive replies, from the first send to the first reply, and from the last
///   reply to the last send (packets sent after the last reply were all lost);
/// - the loss timeline is every maximal run of sequence numbers that never came back, with
///   their send times.
///
/// Replies carrying a sequence number that was never sent are ignored.
pub fn account(send_ns: &[u64], arrivals: &[Arrival]) -> Counts {
    let sent = send_ns.len() as u64;
    let mut seen = vec![false; send_ns.len()];
    let mut received = 0u64;
    let mut duplicated = 0u64;
    let mut reordered = 0u64;
    let mut highest: Option<u64> = None;
    let mut rtts = Vec::with_capacity(arrivals.len());
    let mut longest_gap_ns = 0u64;
    let mut last_reply_ns = send_ns.first().copied().unwrap_or(0);

    for a in arrivals {
        let Some(slot) = usize::try_from(a.seq).ok().and_then(|i| seen.get_mut(i)) else {
            continue;
        };
        longest_gap_ns = longest_gap_ns.max(a.recv_ns.saturating_sub(last_reply_ns));
        last_reply_ns = last_reply_ns.max(a.recv_ns);
        if *slot {
            duplicated += 1;
            continue;
        }
        *slot = true;
        received += 1;
        if highest.is_some_and(|h| a.seq < h) {
            reordered += 1;
        }
        highest = Some(highest.map_or(a.seq, |h| h.max(a.seq)));
        if let Some(&sent_at) = send_ns.get(a.seq as usize) {
            rtts.push(a.recv_ns.saturating_sub(sent_at));
        }
    }
    if let Some(&last_send) = send_ns.last() {
        longest_gap_ns = longest_gap_ns.max(last_send.saturating_sub(last_reply_ns));
    }

    Counts {
        sent,
        received,
        lost: sent - received,
        duplicated,
        reordered,
        longest_gap_ms: ns_to_ms(longest_gap_ns),
        rtt_ms: Percentiles::from_ns(&mut rtts),
        loss_timeline: loss_runs(send_ns, &seen),
    }
}

fn loss_runs(send_ns: &[u64], seen: &[bool]) -> Vec<LossRun> {
    let mut runs = Vec::new();
    let mut start: Option<usize> = None;
    for (i, &got) in seen.iter().enumerate() {
        match (got, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                runs.push(run(send_ns, s, i - 1));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(run(send_ns, s, seen.len() - 1));
    }
    runs
}

fn run(send_ns: &[u64], first: usize, last: usize) -> LossRun {
    LossRun {
        first_seq: first as u64,
        last_seq: last as u64,
        start_ms: ns_to_ms(send_ns[first]),
        end_ms: ns_to_ms(send_ns[last]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// `n` packets sent 1 ms apart starting at 0.
    fn sends(n: u64) -> Vec<u64> {
        (0..n).map(|i| i * MS).collect()
    }

    /// Replies for `seqs` in the given order, each arriving `rtt_ms` after its send, but never
    /// before the previous arrival (a FIFO path).
    fn arrivals(seqs: &[u64], rtt_ms: u64) -> Vec<Arrival> {
        let mut t = 0;
        seqs.iter()
            .map(|&seq| {
                t = (seq * MS + rtt_ms * MS).max(t);
                Arrival { seq, recv_ns: t }
            })
            .collect()
    }

    #[test]
    fn a_clean_run_has_nothing_to_report() {
        let s = sends(100);
        let a = arrivals(&(0..100).collect::<Vec<_>>(), 2);
        let c = account(&s, &a);
        assert_eq!((c.sent, c.received, c.lost, c.duplicated, c.reordered), (100, 100, 0, 0, 0));
        assert!(c.loss_timeline.is_empty());
        // Start edge: first send at 0, first reply at 2 ms; then 1 ms apart.
        assert_eq!(c.longest_gap_ms, 2.0);
        assert_eq!(c.rtt_ms, Percentiles { p50: 2.0, p99: 2.0, max: 2.0 });
    }

    #[test]
    fn lost_ranges_become_the_timeline_and_the_gap() {
        let s = sends(100);
        let got: Vec<u64> = (0..100).filter(|&i| !(10..=19).contains(&i) && i != 50).collect();
        let c = account(&s, &arrivals(&got, 1));
        assert_eq!((c.sent, c.received, c.lost), (100, 89, 11));
        assert_eq!(
            c.loss_timeline,
            vec![
                LossRun { first_seq: 10, last_seq: 19, start_ms: 10.0, end_ms: 19.0 },
                LossRun { first_seq: 50, last_seq: 50, start_ms: 50.0, end_ms: 50.0 },
            ]
        );
        // Reply 9 at 10 ms, reply 20 at 21 ms.
        assert_eq!(c.longest_gap_ms, 11.0);
    }

    #[test]
    fn duplicates_count_once_as_received_and_once_each_as_duplicate() {
        let s = sends(10);
        let c = account(&s, &arrivals(&[0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9], 1));
        assert_eq!((c.received, c.lost, c.duplicated, c.reordered), (10, 0, 3, 0));
    }

    #[test]
    fn reordered_counts_late_first_replies_only() {
        let s = sends(10);
        // 3 overtaken by 4; 7 overtaken by 8 and 9; a late duplicate of 1 is a duplicate only.
        let c = account(&s, &arrivals(&[0, 1, 2, 4, 3, 5, 6, 8, 9, 7, 1], 1));
        assert_eq!((c.received, c.lost, c.duplicated, c.reordered), (10, 0, 1, 2));
    }

    #[test]
    fn tail_loss_extends_the_gap_to_the_last_send() {
        let s = sends(100);
        let got: Vec<u64> = (0..60).collect();
        let c = account(&s, &arrivals(&got, 1));
        assert_eq!(c.lost, 40);
        assert_eq!(
            c.loss_timeline,
            vec![LossRun { first_seq: 60, last_seq: 99, start_ms: 60.0, end_ms: 99.0 }]
        );
        // Last reply (seq 59) at 60 ms, last send at 99 ms.
        assert_eq!(c.longest_gap_ms, 39.0);
    }

    #[test]
    fn head_loss_counts_from_the_first_send() {
        let s = sends(100);
        let got: Vec<u64> = (30..100).collect();
        let c = account(&s, &arrivals(&got, 1));
        assert_eq!(
            c.loss_timeline,
            vec![LossRun { first_seq: 0, last_seq: 29, start_ms: 0.0, end_ms: 29.0 }]
        );
        assert_eq!(c.longest_gap_ms, 31.0);
    }

    #[test]
    fn no_reply_at_all_is_one_gap_over_the_whole_run() {
        let c = account(&sends(50), &[]);
        assert_eq!((c.sent, c.received, c.lost), (50, 0, 50));
        assert_eq!(c.longest_gap_ms, 49.0);
        assert_eq!(c.rtt_ms, Percentiles::default());
        assert_eq!(c.loss_timeline.len(), 1);
    }

    #[test]
    fn nothing_sent_is_an_empty_report() {
        let c = account(&[], &[Arrival { seq: 0, recv_ns: 5 }]);
        assert_eq!(c, Counts::default());
    }

    #[test]
    fn replies_for_unsent_sequence_numbers_are_ignored() {
        let s = sends(3);
        let mut a = arrivals(&[0, 1, 2], 1);
        a.insert(1, Arrival { seq: 7, recv_ns: a[0].recv_ns });
        let c = account(&s, &a);
        assert_eq!((c.received, c.lost, c.duplicated), (3, 0, 0));
    }

    #[test]
    fn rtt_percentiles_come_from_first_replies() {
        let s = sends(100);
        let a: Vec<Arrival> =
            (0..100).map(|i| Arrival { seq: i, recv_ns: i * MS + (i + 1) * 10_000 }).collect();
        let mut with_dup = a.clone();
        with_dup.push(Arrival { seq: 0, recv_ns: 500 * MS });
        let c = account(&s, &with_dup);
        assert_eq!(c.rtt_ms.p50, 0.5);
        assert_eq!(c.rtt_ms.p99, 0.99);
        assert_eq!(c.rtt_ms.max, 1.0);
    }
}
