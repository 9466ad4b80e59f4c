//! Mapping between the engine's types and the wire types of `katamaran.v1`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use katamaran_protos::protobuf::{EnumOrUnknown, MessageField};
use katamaran_protos::v1 as pb;

use crate::dataplane::tls::StreamCredentials;
use crate::migration::events::{self, ErrorKind, Event, Phase, Role};
use crate::migration::options::{MigrationOptions, OptionsError, StorageMode, TunnelMode};

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn from_ms(v: u64, default: Duration) -> Duration {
    if v == 0 {
        default
    } else {
        Duration::from_millis(v)
    }
}

/// Options for the wire.
pub fn options_to_proto(o: &MigrationOptions) -> pb::MigrationOptions {
    let mut p = pb::MigrationOptions::new();
    p.shared_storage = o.storage == StorageMode::Shared;
    p.downtime_limit_ms = ms(o.downtime_limit);
    p.auto_downtime = o.auto_downtime;
    p.max_bandwidth_bytes_per_second = o.max_bandwidth.unwrap_or(0);
    p.multifd_channels = o.multifd_channels.map_or(0, u32::from);
    p.auto_converge = o.auto_converge;
    p.tunnel_mode = EnumOrUnknown::new(match o.tunnel_mode {
        TunnelMode::Auto => pb::TunnelMode::TUNNEL_MODE_UNSPECIFIED,
        TunnelMode::Ipip => pb::TunnelMode::TUNNEL_MODE_IPIP,
        TunnelMode::Gre => pb::TunnelMode::TUNNEL_MODE_GRE,
        TunnelMode::Ip6ip6 => pb::TunnelMode::TUNNEL_MODE_IP6IP6,
        TunnelMode::Ip6gre => pb::TunnelMode::TUNNEL_MODE_IP6GRE,
        TunnelMode::Route => pb::TunnelMode::TUNNEL_MODE_ROUTE,
    });
    p.tunnel_idle_timeout_ms = ms(o.tunnel_idle_timeout);
    p.plug_limit_bytes = o.plug_limit.map_or(0, u64::from);
    p.storage_timeout_ms = ms(o.storage_timeout);
    p.ram_timeout_ms = ms(o.ram_timeout);
    p.plain_streams = o.plain_streams;
    p
}

fn invalid(field: &'static str, detail: impl Into<String>) -> OptionsError {
    OptionsError::Invalid { field, detail: detail.into() }
}

/// Options from the wire; zero values take the engine defaults. Range checks happen in
/// [`MigrationOptions::validate`].
///
/// # Errors
/// [`OptionsError::Invalid`] for values that do not fit the typed options.
pub fn options_from_proto(p: &pb::MigrationOptions) -> Result<MigrationOptions, OptionsError> {
    let d = MigrationOptions::default();
    let tunnel_mode = match p.tunnel_mode.enum_value() {
        Ok(pb::TunnelMode::TUNNEL_MODE_UNSPECIFIED) => TunnelMode::Auto,
        Ok(pb::TunnelMode::TUNNEL_MODE_IPIP) => TunnelMode::Ipip,
        Ok(pb::TunnelMode::TUNNEL_MODE_GRE) => TunnelMode::Gre,
        Ok(pb::TunnelMode::TUNNEL_MODE_IP6IP6) => TunnelMode::Ip6ip6,
        Ok(pb::TunnelMode::TUNNEL_MODE_IP6GRE) => TunnelMode::Ip6gre,
        Ok(pb::TunnelMode::TUNNEL_MODE_ROUTE) => TunnelMode::Route,
        Err(v) => return Err(invalid("tunnel-mode", format!("unknown value {v}"))),
    };
    let multifd_channels = match p.multifd_channels {
        0 => None,
        n => Some(u8::try_from(n).map_err(|_| invalid("multifd-channels", format!("{n} is above 255")))?),
    };
    let plug_limit = match p.plug_limit_bytes {
        0 => None,
        n => Some(u32::try_from(n).map_err(|_| invalid("plug-limit", format!("{n} bytes is above 4 GiB")))?),
    };
    Ok(MigrationOptions {
        storage: if p.shared_storage { StorageMode::Shared } else { StorageMode::Local },
        downtime_limit: from_ms(p.downtime_limit_ms, d.downtime_limit),
        auto_downtime: p.auto_downtime,
        max_bandwidth: (p.max_bandwidth_bytes_per_second != 0).then_some(p.max_bandwidth_bytes_per_second),
        multifd_channels,
        auto_converge: p.auto_converge,
        tunnel_mode,
        tunnel_idle_timeout: from_ms(p.tunnel_idle_timeout_ms, d.tunnel_idle_timeout),
        plug_limit,
        storage_timeout: from_ms(p.storage_timeout_ms, d.storage_timeout),
        ram_timeout: from_ms(p.ram_timeout_ms, d.ram_timeout),
        plain_streams: p.plain_streams,
    })
}

/// Stream credentials for the wire.
pub fn stream_tls_to_proto(c: &StreamCredentials) -> pb::StreamTls {
    let mut p = pb::StreamTls::new();
    p.ca_pem = c.ca_pem.clone();
    p.cert_pem = c.cert_pem.clone();
    p.key_pem = c.key_pem.clone();
    p
}

/// Stream credentials from the wire, unchecked ([`StreamCredentials::validate`] checks them).
pub fn stream_tls_from_proto(p: &pb::StreamTls) -> StreamCredentials {
    StreamCredentials { ca_pem: p.ca_pem.clone(), cert_pem: p.cert_pem.clone(), key_pem: p.key_pem.clone() }
}

/// Phase for the wire.
pub fn phase_to_proto(p: Phase) -> pb::Phase {
    match p {
        Phase::Preparing => pb::Phase::PHASE_PREPARING,
        Phase::Storage => pb::Phase::PHASE_STORAGE,
        Phase::Ram => pb::Phase::PHASE_RAM,
        Phase::Cutover => pb::Phase::PHASE_CUTOVER,
        Phase::Forwarding => pb::Phase::PHASE_FORWARDING,
        Phase::Completed => pb::Phase::PHASE_COMPLETED,
        Phase::Failed => pb::Phase::PHASE_FAILED,
        Phase::Cancelled => pb::Phase::PHASE_CANCELLED,
    }
}

/// Role for the wire.
pub fn role_to_proto(r: Role) -> pb::Role {
    match r {
        Role::Source => pb::Role::ROLE_SOURCE,
        Role::Destination => pb::Role::ROLE_DESTINATION,
    }
}

/// Error kind for the wire.
pub fn error_kind_to_proto(k: ErrorKind) -> pb::ErrorKind {
    match k {
        ErrorKind::InvalidArgument => pb::ErrorKind::ERROR_KIND_INVALID_ARGUMENT,
        ErrorKind::NotFound => pb::ErrorKind::ERROR_KIND_NOT_FOUND,
        ErrorKind::FailedPrecondition => pb::ErrorKind::ERROR_KIND_FAILED_PRECONDITION,
        ErrorKind::Qemu => pb::ErrorKind::ERROR_KIND_QEMU,
        ErrorKind::Network => pb::ErrorKind::ERROR_KIND_NETWORK,
        ErrorKind::Storage => pb::ErrorKind::ERROR_KIND_STORAGE,
        ErrorKind::Timeout => pb::ErrorKind::ERROR_KIND_TIMEOUT,
        ErrorKind::Cancelled => pb::ErrorKind::ERROR_KIND_CANCELLED,
        ErrorKind::Internal => pb::ErrorKind::ERROR_KIND_INTERNAL,
    }
}

/// An engine event for the wire.
pub fn event_to_proto(migration_id: &str, role: Role, e: &Event) -> pb::MigrationEvent {
    let mut p = pb::MigrationEvent::new();
    p.migration_id = migration_id.to_owned();
    p.role = EnumOrUnknown::new(role_to_proto(role));
    p.phase = EnumOrUnknown::new(phase_to_proto(e.phase));
    p.timestamp_unix_nanos = unix_nanos(e.timestamp);
    p.message = e.message.clone();
    p.sequence = e.sequence;
    if let Some(drives) = &e.storage {
        let mut s = pb::StorageProgress::new();
        s.drives = drives.iter().map(drive_to_proto).collect();
        p.storage = MessageField::some(s);
    }
    if let Some(r) = &e.ram {
        let mut m = pb::RamProgress::new();
        m.transferred_bytes = r.transferred_bytes;
        m.remaining_bytes = r.remaining_bytes;
        m.total_bytes = r.total_bytes;
        m.dirty_pages_rate = r.dirty_pages_rate;
        m.iteration = r.iteration;
        m.throughput_bytes_per_second = r.throughput_bytes_per_second;
        m.expected_downtime_ms = r.expected_downtime_ms;
        m.page_size_bytes = r.page_size_bytes;
        p.ram = MessageField::some(m);
    }
    if let Some(c) = &e.cutover {
        let mut m = pb::CutoverTimes::new();
        m.stop_unix_nanos = c.stop_unix_nanos;
        m.resume_unix_nanos = c.resume_unix_nanos;
        m.route_swapped_unix_nanos = c.route_swapped_unix_nanos;
        m.plug_released_unix_nanos = c.plug_released_unix_nanos;
        m.route_swap_latency_nanos = c.stop_to_route_swap_nanos;
        m.plug_release_latency_nanos = c.resume_to_plug_release_nanos;
        m.downtime_ms = c.downtime_ms;
        p.cutover = MessageField::some(m);
    }
    if let Some(o) = &e.outcome {
        let mut m = pb::MigrationResult::new();
        m.success = o.error.is_none();
        if let Some((kind, msg)) = &o.error {
            m.error_kind = EnumOrUnknown::new(error_kind_to_proto(*kind));
            m.error_message = msg.clone();
        }
        m.total_ms = o.total_ms;
        m.downtime_ms = o.downtime_ms;
        m.plug_dropped_packets = o.plug_dropped_packets;
        p.result = MessageField::some(m);
    }
    p
}

fn drive_to_proto(d: &events::DriveProgress) -> pb::DriveProgress {
    let mut p = pb::DriveProgress::new();
    p.drive_id = d.drive_id.clone();
    p.total_bytes = d.total_bytes;
    p.done_bytes = d.done_bytes;
    p.ready = d.ready;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip() {
        let o = MigrationOptions {
            storage: StorageMode::Shared,
            downtime_limit: Duration::from_millis(40),
            auto_downtime: true,
            max_bandwidth: Some(1 << 30),
            multifd_channels: Some(4),
            auto_converge: false,
            tunnel_mode: TunnelMode::Ip6gre,
            tunnel_idle_timeout: Duration::from_secs(5),
            plug_limit: Some(1 << 20),
            storage_timeout: Duration::from_secs(60),
            ram_timeout: Duration::from_secs(120),
            plain_streams: true,
        };
        assert_eq!(options_from_proto(&options_to_proto(&o)).expect("back"), o);
        assert!(
            !options_from_proto(&pb::MigrationOptions::new()).expect("zero").plain_streams,
            "TLS by default"
        );
        let defaults = options_from_proto(&pb::MigrationOptions::new()).expect("zero");
        assert_eq!(defaults.downtime_limit, Duration::from_millis(25), "zero means engine default");
        assert_eq!(defaults.tunnel_mode, TunnelMode::Auto);
        let mut big = pb::MigrationOptions::new();
        big.multifd_channels = 300;
        assert!(options_from_proto(&big).expect_err("too many").to_string().contains("multifd-channels"));
    }

    #[test]
    fn terminal_event_carries_the_result() {
        let mut e = Event::new(Phase::Failed, "destination QEMU exited");
        e.sequence = 7;
        e.outcome = Some(events::Outcome {
            error: Some((ErrorKind::Qemu, "QEMU exited with status 1".into())),
            total_ms: 1200,
            downtime_ms: 0,
            plug_dropped_packets: 0,
        });
        let p = event_to_proto("m1", Role::Destination, &e);
        assert_eq!(p.phase.enum_value(), Ok(pb::Phase::PHASE_FAILED));
        assert_eq!(p.role.enum_value(), Ok(pb::Role::ROLE_DESTINATION));
        assert_eq!(p.sequence, 7);
        assert!(!p.result.success);
        assert_eq!(p.result.error_kind.enum_value(), Ok(pb::ErrorKind::ERROR_KIND_QEMU));
        assert_eq!(p.result.error_message, "QEMU exited with status 1");
    }
}
