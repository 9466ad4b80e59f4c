//! Human durations on the command line: `10s`, `500ms`, `1.5s`, `2m`, `250us`.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDurationError {
    /// The number part is missing or not a number.
    #[error("`{0}` is not a duration: expected a number and a unit, like 10s, 500ms or 2m")]
    NotANumber(String),
    /// The unit is missing or unknown.
    #[error("`{0}` has no known unit: use us, ms, s, m or h")]
    Unit(String),
    /// The value does not fit a `Duration`.
    #[error("`{0}` is out of range")]
    Range(String),
}

/// Parses a number followed by a unit (`us`, `ms`, `s`, `m`, `h`).
///
/// # Errors
/// [`ParseDurationError`] when the number or unit is missing or invalid, or the value is negative
/// or too large.
pub fn parse_duration(text: &str) -> Result<Duration, ParseDurationError> {
    let s = text.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(ParseDurationError::NotANumber(text.to_owned()));
    }
    let value: f64 = num.parse().map_err(|_| ParseDurationError::NotANumber(text.to_owned()))?;
    let secs_per_unit = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(ParseDurationError::Unit(text.to_owned())),
    };
    Duration::try_from_secs_f64(value * secs_per_unit).map_err(|_| ParseDurationError::Range(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("250us", Duration::from_micros(250)),
            ("0s", Duration::ZERO),
            (" 1h ", Duration::from_secs(3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        assert!(matches!(parse_duration("10"), Err(ParseDurationError::Unit(_))));
        assert!(matches!(parse_duration("10 parsecs"), Err(ParseDurationError::Unit(_))));
        assert!(matches!(parse_duration("s"), Err(ParseDurationError::NotANumber(_))));
        assert!(matches!(parse_duration("1.2.3s"), Err(ParseDurationError::NotANumber(_))));
        assert!(matches!(parse_duration("-1s"), Err(ParseDurationError::NotANumber(_))));
        assert!(matches!(parse_duration("99999999999999999999999h"), Err(ParseDurationError::Range(_))));
    }
}
