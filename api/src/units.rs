//! The textual units of the Migration spec: durations (`25ms`, `1.5s`, `30m`) and byte rates
//! (`500Mi`, `1G`). Each has a schema pattern the API server enforces and a parser that accepts
//! exactly what the pattern lets through, so an object the server admitted always parses.

use std::time::Duration;

/// The schema pattern of a duration: a decimal number and one unit among `us`, `ms`, `s`, `m`,
/// `h`. A subset of Go's `time.ParseDuration`, so CEL's `duration()` reads every admitted value.
pub const DURATION_PATTERN: &str = r"^[0-9]{1,9}(\.[0-9]{1,9})?(us|ms|s|m|h)$";

/// The schema pattern of a byte rate: a positive integer and an optional Kubernetes quantity
/// suffix, decimal (`k`, `M`, `G`) or binary (`Ki`, `Mi`, `Gi`); at most nine digits, so every
/// admitted value fits in a `u64` (999999999Gi is about 2^60).
pub const BANDWIDTH_PATTERN: &str = r"^[1-9][0-9]{0,8}(k|M|G|Ki|Mi|Gi)?$";

/// A value that does not match its pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    /// Not a duration of the accepted form.
    #[error("{0:?} is not a duration such as 25ms, 1.5s, 30m (units: us, ms, s, m, h)")]
    Duration(String),
    /// Not a byte rate of the accepted form.
    #[error("{0:?} is not a byte rate such as 500Mi or 1G (suffixes: k, M, G, Ki, Mi, Gi)")]
    Bandwidth(String),
}

/// Parses a duration matching [`DURATION_PATTERN`], exactly (no floating point).
///
/// # Errors
/// [`UnitsError::Duration`] when `s` does not match the pattern.
pub fn parse_duration(s: &str) -> Result<Duration, UnitsError> {
    let bad = || UnitsError::Duration(s.to_owned());
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let unit_nanos: u128 = match unit {
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |d: &str, max: usize| d.len() <= max && d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole, 9) || !digits_ok(fraction, 9) || number.ends_with('.') {
        return Err(bad());
    }
    let whole: u128 = whole.parse().map_err(|_| bad())?;
    let mut nanos = whole * unit_nanos;
    if !fraction.is_empty() {
        let scale = 10u128.pow(u32::try_from(fraction.len()).map_err(|_| bad())?);
        let fraction: u128 = fraction.parse().map_err(|_| bad())?;
        nanos += fraction * unit_nanos / scale;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad())?;
    let sub = u32::try_from(nanos % 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// Formats a duration the way [`parse_duration`] reads it back: a whole number of the largest
/// unit that divides it (`25ms`, `1500ms`, `30m`), else a decimal (`1.0005s`); exact to the
/// microsecond.
pub fn format_duration(d: Duration) -> String {
    let micros = d.as_micros();
    for (unit, per) in [("h", 3_600_000_000u128), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1_000)] {
        if micros >= per && micros.is_multiple_of(per) {
            return format!("{}{unit}", micros / per);
        }
    }
    if micros >= 1_000_000 {
        return trim_decimal(micros, 1_000_000, "s");
    }
    if micros >= 1_000 {
        return trim_decimal(micros, 1_000, "ms");
    }
    format!("{micros}us")
}

fn trim_decimal(value: u128, per: u128, unit: &str) -> String {
    let width = per.ilog10() as usize;
    let frac = format!("{:0width$}", value % per);
    format!("{}.{}{unit}", value / per, frac.trim_end_matches('0'))
}

/// Parses a byte rate matching [`BANDWIDTH_PATTERN`] into bytes per second.
///
/// # Errors
/// [`UnitsError::Bandwidth`] when `s` does not match the pattern.
pub fn parse_bandwidth(s: &str) -> Result<u64, UnitsError> {
    let bad = || UnitsError::Bandwidth(s.to_owned());
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(bad()),
    };
    if number.is_empty() || number.len() > 9 || number.starts_with('0') {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(multiplier).ok_or_else(bad)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_exactly() {
        let ms = Duration::from_millis;
        let table = [
            ("25ms", ms(25)),
            ("0ms", Duration::ZERO),
            ("1.5s", ms(1500)),
            ("100us", Duration::from_micros(100)),
            ("0.25ms", Duration::from_micros(250)),
            ("30m", Duration::from_secs(1800)),
            ("2h", Duration::from_secs(7200)),
            ("999999999h", Duration::from_secs(999_999_999 * 3600)),
        ];
        for (s, want) in table {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        for bad in
            ["", "25", "ms", "1.s", ".5s", "-5ms", "5 ms", "1e3ms", "5sec", "1m30s", "µs", "1234567890s"]
        {
            assert_eq!(parse_duration(bad), Err(UnitsError::Duration(bad.into())), "{bad}");
        }
    }

    #[test]
    fn durations_format_back() {
        for s in ["25ms", "1500ms", "30m", "2h", "100us", "1.25ms", "90s", "1.000001s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(parse_duration("1.5s").unwrap()), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_micros(3_100)), "3.1ms");
    }

    #[test]
    fn bandwidths_follow_kubernetes_quantities() {
        let table = [
            ("1", 1),
            ("500Mi", 500 << 20),
            ("500M", 500_000_000),
            ("1Gi", 1 << 30),
            ("1G", 1_000_000_000),
            ("125000000", 125_000_000),
            ("999999999Gi", 999_999_999 << 30),
            ("10k", 10_000),
        ];
        for (s, want) in table {
            assert_eq!(parse_bandwidth(s), Ok(want), "{s}");
        }
        for bad in
            ["", "0", "0M", "012", "lots", "1.5G", "500m", "1K", "1GB", "1Gi/s", "-1", "1T", "1234567890"]
        {
            assert_eq!(parse_bandwidth(bad), Err(UnitsError::Bandwidth(bad.into())), "{bad}");
        }
    }

    /// The parsers accept exactly what the schema patterns accept: every string up to four
    /// characters over the patterns' alphabet, matched with a real regex engine.
    #[test]
    fn parsers_and_patterns_agree() {
        let duration = regex::Regex::new(DURATION_PATTERN).unwrap();
        let bandwidth = regex::Regex::new(BANDWIDTH_PATTERN).unwrap();
        let alphabet = ['0', '1', '9', '.', 'u', 'm', 's', 'h', 'k', 'M', 'G', 'i', 'T', '-'];
        let mut frontier = vec![String::new()];
        let mut checked = 0;
        for _ in 0..=4 {
            for s in &frontier {
                assert_eq!(parse_duration(s).is_ok(), duration.is_match(s), "duration {s:?}");
                assert_eq!(parse_bandwidth(s).is_ok(), bandwidth.is_match(s), "bandwidth {s:?}");
                checked += 1;
            }
            frontier = frontier.iter().flat_map(|s| alphabet.map(|c| format!("{s}{c}"))).collect();
        }
        assert!(checked > 40_000, "{checked}");
        for long in ["123456789.123456789h", "999999999Gi", "1234567890ms", "1234567890k"] {
            assert_eq!(parse_duration(long).is_ok(), duration.is_match(long), "{long}");
            assert_eq!(parse_bandwidth(long).is_ok(), bandwidth.is_match(long), "{long}");
        }
    }
}
