//! A small `--flag value` parser: the agent stays std-only, and its subcommands take a handful of
//! flags each.

use std::str::FromStr;
use std::time::Duration;

/// Why the command line was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    /// A flag this subcommand does not know.
    #[error("unknown option `{0}`")]
    Unknown(String),
    /// A flag that needs a value came last.
    #[error("option `--{0}` needs a value")]
    MissingValue(String),
    /// A switch was given a value with `=`.
    #[error("option `--{0}` takes no value")]
    UnexpectedValue(String),
    /// A required flag is absent.
    #[error("option `--{0}` is required")]
    Required(String),
    /// A value did not parse.
    #[error("option `--{flag}`: `{value}` is not {expected}")]
    Invalid {
        /// The flag.
        flag: String,
        /// What was given.
        value: String,
        /// What was expected, with an article ("a number").
        expected: &'static str,
    },
}

/// One accepted flag: its name without dashes and whether it takes a value.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Name without the leading `--`.
    pub name: &'static str,
    /// `true` for `--name VALUE`, `false` for a switch.
    pub takes_value: bool,
}

/// A flag taking a value.
pub const fn value(name: &'static str) -> Spec {
    Spec { name, takes_value: true }
}

/// A switch.
pub const fn switch(name: &'static str) -> Spec {
    Spec { name, takes_value: false }
}

/// Parsed flags, in command-line order (a repeated flag keeps its last value for [`Args::get`]).
#[derive(Debug, Default)]
pub struct Args {
    flags: Vec<(&'static str, Option<String>)>,
}

impl Args {
    /// Parses `args` (without the program and subcommand) against `specs`.
    ///
    /// # Errors
    /// [`ArgError`] for an unknown flag, a missing value, or a value given to a switch.
    pub fn parse(args: &[String], specs: &[Spec]) -> Result<Self, ArgError> {
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(body) = arg.strip_prefix("--") else {
                return Err(ArgError::Unknown(arg.clone()));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| ArgError::Unknown(arg.clone()))?;
            let value = match (spec.takes_value, inline) {
                (true, Some(v)) => Some(v),
                (true, None) => {
                    Some(it.next().cloned().ok_or_else(|| ArgError::MissingValue(name.to_owned()))?)
                }
                (false, Some(_)) => return Err(ArgError::UnexpectedValue(name.to_owned())),
                (false, None) => None,
            };
            flags.push((spec.name, value));
        }
        Ok(Self { flags })
    }

    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.iter().rev().find(|(n, _)| *n == name).and_then(|(_, v)| v.as_deref())
    }

    /// Whether the switch `name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| *n == name)
    }

    /// The value of `name`, or an error when absent.
    ///
    /// # Errors
    /// [`ArgError::Required`] when the flag is absent.
    pub fn required(&self, name: &str) -> Result<&str, ArgError> {
        self.get(name).ok_or_else(|| ArgError::Required(name.to_owned()))
    }

    /// The value of `name` parsed as `T`, or `default` when absent.
    ///
    /// # Errors
    /// [`ArgError::Invalid`] when the value does not parse.
    pub fn parse_or<T: FromStr>(
        &self,
        name: &str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ArgError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| ArgError::Invalid {
                flag: name.to_owned(),
                value: v.to_owned(),
                expected,
            }),
        }
    }

    /// The value of `name` as a duration (`10s`, `500ms`, `2m`, or plain seconds), if given.
    ///
    /// # Errors
    /// [`ArgError::Invalid`] when the value is not a duration.
    pub fn duration(&self, name: &str) -> Result<Option<Duration>, ArgError> {
        self.get(name)
            .map(|v| {
                parse_duration(v).ok_or_else(|| ArgError::Invalid {
                    flag: name.to_owned(),
                    value: v.to_owned(),
                    expected: "a duration like 10s, 500ms or 2m",
                })
            })
            .transpose()
    }
}

/// Parses `10s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let s = text.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(value * scale).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    const SPECS: &[Spec] = &[value("port"), value("rate"), switch("json")];

    #[test]
    fn parses_values_switches_and_inline_values() {
        let a = Args::parse(&strings(&["--port", "7", "--json", "--rate=50"]), SPECS).unwrap();
        assert_eq!(a.get("port"), Some("7"));
        assert!(a.has("json"));
        assert_eq!(a.parse_or("rate", 1u32, "a number"), Ok(50));
        assert_eq!(a.parse_or("missing", 9u32, "a number"), Ok(9));
        assert_eq!(a.required("nope"), Err(ArgError::Required("nope".into())));
    }

    #[test]
    fn rejects_unknown_missing_and_invalid() {
        assert_eq!(
            Args::parse(&strings(&["--bogus"]), SPECS).unwrap_err(),
            ArgError::Unknown("--bogus".into())
        );
        assert_eq!(Args::parse(&strings(&["stray"]), SPECS).unwrap_err(), ArgError::Unknown("stray".into()));
        assert_eq!(
            Args::parse(&strings(&["--port"]), SPECS).unwrap_err(),
            ArgError::MissingValue("port".into())
        );
        assert_eq!(
            Args::parse(&strings(&["--json=1"]), SPECS).unwrap_err(),
            ArgError::UnexpectedValue("json".into())
        );
        let a = Args::parse(&strings(&["--port", "x"]), SPECS).unwrap();
        assert!(matches!(a.parse_or("port", 0u16, "a port"), Err(ArgError::Invalid { .. })));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5 days"), None);
    }
}
