//! The printer-column strings of a status: a pure function of the phase and the figures.

use super::status::{Downtime, Phase, Progress, Summary};

/// The strings `kubectl get mig` shows for a migration in `phase` with these figures.
///
/// Downtime: the guest pause once measured, QEMU's downtime failing that, and during storage
/// and RAM the downtime QEMU expects, marked `~`. Progress: the share of the phase's bytes sent
/// (rounded down, so 100% means nothing left), with the RAM pass; 100% once cut over.
pub fn summarize(phase: Phase, progress: Option<&Progress>, downtime: Option<&Downtime>) -> Summary {
    let measured = downtime.and_then(|d| d.guest_pause_microseconds.or(d.qemu_microseconds));
    let expected = match phase {
        Phase::Storage | Phase::Ram => progress.and_then(|p| p.expected_downtime_microseconds),
        _ => None,
    };
    let downtime = match (measured, expected) {
        (Some(us), _) => format_micros(us),
        (None, Some(us)) => format!("~{}", format_micros(us)),
        (None, None) => String::new(),
    };
    let progress = match (phase, progress) {
        (Phase::Storage | Phase::Ram, Some(p)) if p.bytes_total > 0 => {
            let sent = (p.bytes_total - p.bytes_remaining).clamp(0, p.bytes_total);
            let percent = i128::from(sent) * 100 / i128::from(p.bytes_total);
            if phase == Phase::Ram && p.iteration > 0 {
                format!("{percent}% pass {}", p.iteration)
            } else {
                format!("{percent}%")
            }
        }
        (Phase::Forwarding | Phase::Completed, _) => "100%".to_owned(),
        _ => String::new(),
    };
    Summary { downtime, progress }
}

/// `640µs`, `3.1ms`, `12.3ms`, `1.24s`: three significant figures at most.
pub fn format_micros(us: i64) -> String {
    let us = us.max(0);
    match us {
        0..=999 => format!("{us}µs"),
        1_000..=9_999 => trim(format!("{:.1}", us as f64 / 1e3), "ms"),
        10_000..=999_999 => format!("{}ms", us / 1_000),
        1_000_000..=9_999_999 => trim(format!("{:.2}", us as f64 / 1e6), "s"),
        _ => format!("{:.1}s", us as f64 / 1e6),
    }
}

fn trim(number: String, unit: &str) -> String {
    let n = if number.contains('.') { number.trim_end_matches('0').trim_end_matches('.') } else { &number };
    format!("{n}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(total: i64, remaining: i64, iteration: i64, expected: Option<i64>) -> Progress {
        Progress {
            bytes_transferred: total - remaining,
            bytes_remaining: remaining,
            bytes_total: total,
            iteration,
            dirty_bytes_per_second: None,
            expected_downtime_microseconds: expected,
        }
    }

    #[test]
    fn columns_for_each_phase() {
        let ram = progress(1000, 370, 3, Some(25_000));
        let disk = progress(1000, 999, 0, None);
        let measured = Downtime { qemu_microseconds: Some(3_000), guest_pause_microseconds: Some(3_140) };
        let qemu_only = Downtime { qemu_microseconds: Some(115_000), guest_pause_microseconds: None };
        type Case<'a> = (Phase, Option<Progress>, Option<&'a Downtime>, &'a str, &'a str);
        let table: Vec<Case<'_>> = vec![
            (Phase::Pending, None, None, "", ""),
            (Phase::Preparing, None, None, "", ""),
            (Phase::Storage, Some(disk.clone()), None, "", "0%"),
            (Phase::Ram, Some(ram.clone()), None, "~25ms", "63% pass 3"),
            (Phase::Ram, Some(progress(1000, 0, 0, None)), None, "", "100%"),
            (Phase::Ram, Some(progress(0, 0, 0, None)), None, "", ""),
            (Phase::Ram, Some(progress(1000, 5000, 1, None)), None, "", "0% pass 1"),
            (Phase::Cutover, Some(ram.clone()), None, "", ""),
            (Phase::Forwarding, None, Some(&measured), "3.1ms", "100%"),
            (Phase::Completed, Some(ram.clone()), Some(&measured), "3.1ms", "100%"),
            (Phase::Completed, None, Some(&qemu_only), "115ms", "100%"),
            (Phase::Failed, Some(ram.clone()), None, "", ""),
            (Phase::Cancelled, None, None, "", ""),
        ];
        for (phase, p, d, downtime, prog) in table {
            let s = summarize(phase, p.as_ref(), d);
            assert_eq!((s.downtime.as_str(), s.progress.as_str()), (downtime, prog), "{phase}");
        }
    }

    #[test]
    fn micros_read_like_the_result_table() {
        let table = [
            (0, "0µs"),
            (341, "341µs"),
            (3_000, "3ms"),
            (3_140, "3.1ms"),
            (12_345, "12ms"),
            (436_800, "436ms"),
        ];
        for (us, want) in table {
            assert_eq!(format_micros(us), want, "{us}");
        }
        assert_eq!(format_micros(1_240_000), "1.24s");
        assert_eq!(format_micros(12_500_000), "12.5s");
        assert_eq!(format_micros(-5), "0µs");
    }
}
