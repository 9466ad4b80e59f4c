//! The engine decides between the production path and its fallbacks (decision 7) with
//! [`katamaran::net::probe`]; on the lab kernel it must find every feature.

use std::time::Instant;

use katamaran::net::{self, Feature};

use crate::error::{CheckError, Result};
use crate::report::{chain, Metrics};

/// Probes every [`Feature`]; fails naming the missing ones.
///
/// # Errors
/// [`CheckError::Unexpected`] listing each feature the probe did not find and why.
pub async fn run(m: &mut Metrics) -> Result<()> {
    let mut missing = Vec::new();
    for what in Feature::ALL {
        let started = Instant::now();
        let found = net::probe(what).await;
        m.ms(&probe_key(what), started.elapsed());
        if let Err(e) = found {
            missing.push(format!("{what} ({})", chain(&e)));
        }
    }
    m.count("present", (Feature::ALL.len() - missing.len()) as u64);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CheckError::Unexpected(format!("the probe misses {}", missing.join(", "))))
    }
}

/// `probe_plug`, `probe_ip6gre`, …: how long the scratch-namespace probe took.
fn probe_key(what: Feature) -> String {
    let short = match what {
        Feature::Plug => "plug",
        Feature::Ipip => "ipip",
        Feature::Gre => "gre",
        Feature::Ip6Tnl => "ip6tnl",
        Feature::Ip6Gre => "ip6gre",
    };
    format!("probe_{short}")
}
