//! The benchmark's cases — guest size, guest workload, storage, probe rate — and `--cases`.
//!
//! A case is named `<mem>m-<idle|dirty>-<shared|local>-<pps>[-plain]`, e.g.
//! `512m-dirty-shared-1000`; `-plain` runs katamaran with unencrypted streams (`--plain-streams`)
//! instead of the default TLS. Bare QEMU always sends plain streams.

use std::fmt;

use serde::Serialize;

/// What the guest does while it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Only the lab's services (UDP echo, HTTP, a disk writer at 50 records/s).
    Idle,
    /// Also `katamaran-guest dirty-mem` over half of the guest's memory.
    Dirty,
}

/// Where the guest's disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// One image both nodes open: no storage phase.
    Shared,
    /// One node-local image: mirrored over NBD before the RAM phase.
    Local,
}

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Case {
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Guest workload.
    pub workload: Workload,
    /// Disk placement.
    pub storage: Storage,
    /// Probe rate, packets per second.
    pub rate_pps: u32,
    /// katamaran's RAM and NBD streams unencrypted (the opt-out), not TLS.
    pub plain_streams: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = match self.workload {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
        };
        let s = match self.storage {
            Storage::Shared => "shared",
            Storage::Local => "local",
        };
        write!(
            f,
            "{}m-{w}-{s}-{}{}",
            self.mem_mib,
            self.rate_pps,
            if self.plain_streams { "-plain" } else { "" }
        )
    }
}

/// Why `--cases` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseError(pub String);

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CaseError {}

impl std::str::FromStr for Case {
    type Err = CaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            CaseError(format!(
                "case {s:?}: {why} (expected <mem>m-<idle|dirty>-<shared|local>-<pps>[-plain])"
            ))
        };
        let (s_case, plain_streams) = match s.strip_suffix("-plain") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let parts: Vec<&str> = s_case.split('-').collect();
        let [mem, workload, storage, rate] = parts.as_slice() else {
            return Err(bad("four parts separated by '-', then optionally -plain"));
        };
        let mem_mib = mem
            .strip_suffix('m')
            .and_then(|m| m.parse::<u32>().ok())
            .filter(|m| *m >= 64)
            .ok_or_else(|| bad("memory like 128m, at least 64"))?;
        let workload = match *workload {
            "idle" => Workload::Idle,
            "dirty" => Workload::Dirty,
            _ => return Err(bad("workload idle or dirty")),
        };
        let storage = match *storage {
            "shared" => Storage::Shared,
            "local" => Storage::Local,
            _ => return Err(bad("storage shared or local")),
        };
        let rate_pps = rate.parse::<u32>().ok().filter(|r| *r > 0).ok_or_else(|| bad("a positive rate"))?;
        Ok(Case { mem_mib, workload, storage, rate_pps, plain_streams })
    }
}

/// Every combination the brief names: 128/512 MiB × idle/dirty × shared/local × 1000/5000 pps.
pub fn matrix() -> Vec<Case> {
    let mut out = Vec::new();
    for mem_mib in [128, 512] {
        for workload in [Workload::Idle, Workload::Dirty] {
            for storage in [Storage::Shared, Storage::Local] {
                for rate_pps in [1000, 5000] {
                    out.push(Case { mem_mib, workload, storage, rate_pps, plain_streams: false });
                }
            }
        }
    }
    out
}

/// The default selection: a base case and one step away from it along each axis — the last
/// two show what TLS costs on RAM and on a mirrored disk — so that the whole run stays near a
/// quarter of an hour on two cores (the full matrix takes about three times as long).
pub fn defaults() -> Vec<Case> {
    let base = Case {
        mem_mib: 128,
        workload: Workload::Idle,
        storage: Storage::Shared,
        rate_pps: 1000,
        plain_streams: false,
    };
    vec![
        base,
        Case { mem_mib: 512, ..base },
        Case { mem_mib: 512, workload: Workload::Dirty, ..base },
        Case { storage: Storage::Local, ..base },
        Case { rate_pps: 5000, ..base },
        Case { mem_mib: 512, workload: Workload::Dirty, plain_streams: true, ..base },
        Case { storage: Storage::Local, plain_streams: true, ..base },
    ]
}

/// Parses `--cases`: `default`, `all`, or a comma-separated list of case names (and of those
/// two words); duplicates are dropped, order is kept.
///
/// # Errors
/// [`CaseError`] naming the first entry that is not a case.
pub fn select(spec: &str) -> Result<Vec<Case>, CaseError> {
    let mut out: Vec<Case> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let add = match item {
            "default" => defaults(),
            "all" => matrix(),
            name => vec![name.parse()?],
        };
        for c in add {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err(CaseError("--cases names no case".into()));
    }
    Ok(out)
}

/// The working set of the dirty workload: half of the guest's memory, which leaves the guest's
/// own services room even in a 128 MiB guest (~95 MiB usable).
pub fn dirty_working_set_mib(mem_mib: u32) -> u32 {
    (mem_mib / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in matrix() {
            assert_eq!(c.to_string().parse::<Case>(), Ok(c), "{c}");
        }
        let c: Case = "512m-dirty-local-5000".parse().expect("valid");
        assert_eq!(
            c,
            Case {
                mem_mib: 512,
                workload: Workload::Dirty,
                storage: Storage::Local,
                rate_pps: 5000,
                plain_streams: false
            }
        );
        let plain: Case = "128m-idle-local-1000-plain".parse().expect("valid");
        assert!(plain.plain_streams && plain.storage == Storage::Local);
        assert_eq!(plain.to_string(), "128m-idle-local-1000-plain");
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        for (bad, why) in [
            ("128-idle-shared-1000", "memory"),
            ("32m-idle-shared-1000", "memory"),
            ("128m-busy-shared-1000", "workload"),
            ("128m-idle-nfs-1000", "storage"),
            ("128m-idle-shared-0", "rate"),
            ("128m-idle-shared", "four parts"),
            ("128m-idle-shared-1000-tls", "four parts"),
        ] {
            let err = bad.parse::<Case>().expect_err(bad).to_string();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn selection_expands_keywords_and_drops_duplicates() {
        assert_eq!(select("default").expect("default"), defaults());
        assert_eq!(select("all").expect("all").len(), 16);
        let picked = select("128m-idle-shared-1000, default,512m-dirty-local-5000").expect("list");
        assert_eq!(picked.len(), defaults().len() + 1);
        assert_eq!(picked[0], defaults()[0]);
        assert_eq!(picked.last().map(ToString::to_string).as_deref(), Some("512m-dirty-local-5000"));
        assert!(select(" , ").is_err());
        assert!(select("default,nonsense").is_err());
    }

    #[test]
    fn defaults_cover_every_axis() {
        let d = defaults();
        assert!(d.iter().any(|c| c.mem_mib == 512));
        assert!(d.iter().any(|c| c.workload == Workload::Dirty));
        assert!(d.iter().any(|c| c.storage == Storage::Local));
        assert!(d.iter().any(|c| c.rate_pps == 5000));
        for c in d.iter().filter(|c| c.plain_streams) {
            assert!(d.contains(&Case { plain_streams: false, ..*c }), "{c} has its TLS twin");
        }
        assert_eq!(dirty_working_set_mib(128), 64);
    }
}
