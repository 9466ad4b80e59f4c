//! The `katamaran.v1.Migration` ttrpc service: protobuf messages, the async client and the
//! async server trait, generated at build time from `katamaran/v1/migration.proto`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use katamaran_protos::v1::{InspectRequest, MigrationClient};
//! use katamaran_protos::ttrpc;
//!
//! # async fn example() -> Result<(), ttrpc::Error> {
//! let client = MigrationClient::connect("unix:///run/katamaran/sandboxes/abc.sock").await?;
//! let mut req = InspectRequest::new();
//! req.sandbox_id = "abc".into();
//! let sandbox = client.inspect(ttrpc::context::with_duration(Duration::from_secs(5)), &req).await?;
//! println!("{} runs QEMU {}", sandbox.id, sandbox.qemu_version);
//! # Ok(())
//! # }
//! ```
//!
//! A server implements [`v1::Migration`] (with [`macro@async_trait`]) and registers
//! [`v1::create_migration`] on a
//! [`ttrpc::r#async::Server`](ttrpc::asynchronous::Server). The crate re-exports `ttrpc`,
//! `protobuf` and `async_trait` so users build against exactly the versions the generated
//! code was made for.
//!
//! `docs/PROTOCOL.md` describes the RPCs, the event sequence and the error mapping.

pub use async_trait::async_trait;
pub use protobuf;
pub use protobuf_json_mapping;
pub use ttrpc;

// The generated files allow `clippy::all` themselves; these two come from our workspace lints.
// The client and handler types have no `Debug`, and descriptor lookups `unwrap()` names that
// are compiled into the same file, so they cannot miss.
#[allow(missing_debug_implementations, clippy::unwrap_used)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/katamaran_v1.rs"));
}

/// Version 1 of the protocol (`package katamaran.v1`).
pub mod v1 {
    pub use crate::generated::migration::*;
    pub use crate::generated::migration_ttrpc::{create_migration, Migration, MigrationClient};

    /// Fully qualified service name, the key under which [`create_migration`] registers it.
    pub const SERVICE_NAME: &str = "katamaran.v1.Migration";

    impl MigrationClient {
        /// Connects to a service endpoint such as `unix:///run/katamaran/sandboxes/<id>.sock`.
        ///
        /// # Errors
        ///
        /// Returns an error if the address is malformed or the connection is refused.
        pub async fn connect(address: &str) -> ttrpc::Result<Self> {
            Ok(Self::new(ttrpc::r#async::Client::connect(address).await?))
        }
    }

    impl Phase {
        /// Whether a migration in this phase has ended (no further events follow).
        #[must_use]
        pub fn is_terminal(self) -> bool {
            matches!(self, Phase::PHASE_COMPLETED | Phase::PHASE_FAILED | Phase::PHASE_CANCELLED)
        }

        /// Whether Cancel still stops a migration in this phase. From the cutover on, the VM is
        /// stopped on the source and its state is on its way, so the migration runs to its end.
        #[must_use]
        pub fn is_cancellable(self) -> bool {
            matches!(
                self,
                Phase::PHASE_UNSPECIFIED | Phase::PHASE_PREPARING | Phase::PHASE_STORAGE | Phase::PHASE_RAM
            )
        }
    }

    impl ErrorKind {
        /// The ttrpc status code an RPC returns for a failure of this kind.
        ///
        /// Engine failures (QEMU, network, storage) have no status code of their own: they are
        /// `INTERNAL` on the wire, and the `ErrorKind` travels in the terminal event's result.
        #[must_use]
        pub fn ttrpc_code(self) -> ttrpc::Code {
            use ttrpc::Code;
            match self {
                ErrorKind::ERROR_KIND_INVALID_ARGUMENT => Code::INVALID_ARGUMENT,
                ErrorKind::ERROR_KIND_NOT_FOUND => Code::NOT_FOUND,
                ErrorKind::ERROR_KIND_FAILED_PRECONDITION => Code::FAILED_PRECONDITION,
                ErrorKind::ERROR_KIND_TIMEOUT => Code::DEADLINE_EXCEEDED,
                ErrorKind::ERROR_KIND_CANCELLED => Code::CANCELLED,
                ErrorKind::ERROR_KIND_UNSPECIFIED
                | ErrorKind::ERROR_KIND_QEMU
                | ErrorKind::ERROR_KIND_NETWORK
                | ErrorKind::ERROR_KIND_STORAGE
                | ErrorKind::ERROR_KIND_INTERNAL => Code::INTERNAL,
            }
        }

        /// A ttrpc error with this kind's status code and `message`, for a service to return.
        #[must_use]
        pub fn rpc_error(self, message: impl ToString) -> ttrpc::Error {
            ttrpc::Error::RpcStatus(ttrpc::get_status(self.ttrpc_code(), message))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use protobuf::{Enum, EnumOrUnknown, Message};

    use super::v1::*;

    fn rich_event() -> MigrationEvent {
        let mut event = MigrationEvent::new();
        event.migration_id = "mig-1".into();
        event.role = Role::ROLE_SOURCE.into();
        event.phase = Phase::PHASE_FAILED.into();
        event.timestamp_unix_nanos = 1_700_000_000_123_456_789;
        event.message = "RAM did not converge".into();
        event.sequence = 17;

        let mut drive = DriveProgress::new();
        drive.drive_id = "drive-0".into();
        drive.total_bytes = 192 << 20;
        drive.done_bytes = 96 << 20;
        drive.ready = true;
        event.storage.mut_or_insert_default().drives.push(drive);

        let ram = event.ram.mut_or_insert_default();
        ram.transferred_bytes = 1;
        ram.remaining_bytes = 2;
        ram.total_bytes = 3;
        ram.dirty_pages_rate = 4;
        ram.iteration = 5;
        ram.throughput_bytes_per_second = u64::MAX;
        ram.expected_downtime_ms = 7;
        ram.page_size_bytes = 4096;

        let cutover = event.cutover.mut_or_insert_default();
        cutover.stop_unix_nanos = 10;
        cutover.resume_unix_nanos = 20;
        cutover.route_swapped_unix_nanos = 11;
        cutover.plug_released_unix_nanos = 21;
        cutover.route_swap_latency_nanos = 1;
        cutover.plug_release_latency_nanos = 1;
        cutover.downtime_ms = 115;

        let result = event.result.mut_or_insert_default();
        result.success = false;
        result.error_kind = ErrorKind::ERROR_KIND_TIMEOUT.into();
        result.error_message = "RAM phase exceeded 60s".into();
        result.total_ms = 60_000;
        result.downtime_ms = 0;
        result.plug_dropped_packets = 3;
        event
    }

    #[test]
    fn event_encodes_and_decodes_unchanged() {
        let event = rich_event();
        let bytes = event.write_to_bytes().unwrap();
        let decoded = MigrationEvent::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(decoded.result.error_kind.enum_value(), Ok(ErrorKind::ERROR_KIND_TIMEOUT));
        assert_eq!(decoded.storage.drives[0].done_bytes, 96 << 20);
        assert_eq!(decoded.ram.throughput_bytes_per_second, u64::MAX);
    }

    #[test]
    fn options_encode_and_decode_unchanged() {
        let mut options = MigrationOptions::new();
        options.shared_storage = true;
        options.downtime_limit_ms = 300;
        options.auto_downtime = true;
        options.max_bandwidth_bytes_per_second = 1 << 30;
        options.multifd_channels = 4;
        options.auto_converge = true;
        options.tunnel_mode = TunnelMode::TUNNEL_MODE_IP6GRE.into();
        options.tunnel_idle_timeout_ms = 30_000;
        options.plug_limit_bytes = 4 << 20;
        options.storage_timeout_ms = 120_000;
        options.ram_timeout_ms = 600_000;
        let decoded = MigrationOptions::parse_from_bytes(&options.write_to_bytes().unwrap()).unwrap();
        assert_eq!(decoded, options);
    }

    #[test]
    fn unset_fields_are_unspecified_and_encode_to_nothing() {
        let event = MigrationEvent::new();
        assert_eq!(event.role.enum_value(), Ok(Role::ROLE_UNSPECIFIED));
        assert_eq!(event.phase.enum_value(), Ok(Phase::PHASE_UNSPECIFIED));
        assert!(event.result.is_none());
        assert_eq!(event.result.error_kind.enum_value(), Ok(ErrorKind::ERROR_KIND_UNSPECIFIED));
        assert_eq!(MigrationOptions::new().tunnel_mode.enum_value(), Ok(TunnelMode::TUNNEL_MODE_UNSPECIFIED));
        assert_eq!(Sandbox::new().run_state.enum_value(), Ok(VmRunState::VM_RUN_STATE_UNSPECIFIED));
        assert_eq!(CancelResponse::new().phase.enum_value(), Ok(Phase::PHASE_UNSPECIFIED));
        assert!(event.write_to_bytes().unwrap().is_empty());

        // A peer that sends nothing at all decodes to the same defaults.
        let decoded = MigrationStatus::parse_from_bytes(&[]).unwrap();
        assert_eq!(decoded.role.enum_value(), Ok(Role::ROLE_UNSPECIFIED));
        assert_eq!(decoded.phase.enum_value(), Ok(Phase::PHASE_UNSPECIFIED));
    }

    #[test]
    fn every_enum_has_unspecified_at_zero() {
        assert_eq!(Role::from_i32(0), Some(Role::ROLE_UNSPECIFIED));
        assert_eq!(Phase::from_i32(0), Some(Phase::PHASE_UNSPECIFIED));
        assert_eq!(TunnelMode::from_i32(0), Some(TunnelMode::TUNNEL_MODE_UNSPECIFIED));
        assert_eq!(ErrorKind::from_i32(0), Some(ErrorKind::ERROR_KIND_UNSPECIFIED));
        assert_eq!(VmRunState::from_i32(0), Some(VmRunState::VM_RUN_STATE_UNSPECIFIED));
    }

    #[test]
    fn enum_values_from_a_newer_peer_survive_decoding() {
        let mut event = MigrationEvent::new();
        event.phase = EnumOrUnknown::from_i32(42);
        event.migration_id = "m".into();
        let decoded = MigrationEvent::parse_from_bytes(&event.write_to_bytes().unwrap()).unwrap();
        assert_eq!(decoded.phase.value(), 42);
        assert_eq!(decoded.phase.enum_value(), Err(42));
        assert_eq!(decoded.migration_id, "m");
    }

    #[test]
    fn terminal_phases() {
        let terminal: Vec<Phase> = Phase::VALUES.iter().copied().filter(|p| p.is_terminal()).collect();
        assert_eq!(terminal, [Phase::PHASE_COMPLETED, Phase::PHASE_FAILED, Phase::PHASE_CANCELLED]);
    }

    #[test]
    fn only_phases_before_the_cutover_are_cancellable() {
        for phase in Phase::VALUES {
            let before_cutover = (phase.value()) < Phase::PHASE_CUTOVER.value();
            assert_eq!(phase.is_cancellable(), before_cutover, "{phase:?}");
            assert!(!(phase.is_cancellable() && phase.is_terminal()), "{phase:?}");
        }
    }

    #[test]
    fn error_kinds_map_to_ttrpc_codes() {
        use ttrpc::Code;
        let table = [
            (ErrorKind::ERROR_KIND_UNSPECIFIED, Code::INTERNAL),
            (ErrorKind::ERROR_KIND_INVALID_ARGUMENT, Code::INVALID_ARGUMENT),
            (ErrorKind::ERROR_KIND_NOT_FOUND, Code::NOT_FOUND),
            (ErrorKind::ERROR_KIND_FAILED_PRECONDITION, Code::FAILED_PRECONDITION),
            (ErrorKind::ERROR_KIND_QEMU, Code::INTERNAL),
            (ErrorKind::ERROR_KIND_NETWORK, Code::INTERNAL),
            (ErrorKind::ERROR_KIND_STORAGE, Code::INTERNAL),
            (ErrorKind::ERROR_KIND_TIMEOUT, Code::DEADLINE_EXCEEDED),
            (ErrorKind::ERROR_KIND_CANCELLED, Code::CANCELLED),
            (ErrorKind::ERROR_KIND_INTERNAL, Code::INTERNAL),
        ];
        assert_eq!(table.len(), ErrorKind::VALUES.len(), "every kind is in the table");
        for (kind, code) in table {
            assert_eq!(kind.ttrpc_code(), code, "{kind:?}");
            let ttrpc::Error::RpcStatus(status) = kind.rpc_error("boom") else {
                panic!("{kind:?} did not give an RPC status");
            };
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "boom");
        }
    }

    #[test]
    fn service_name_matches_the_registration_key() {
        struct Nothing;
        impl Migration for Nothing {}
        let services = create_migration(std::sync::Arc::new(Nothing));
        assert_eq!(services.keys().collect::<Vec<_>>(), [SERVICE_NAME]);
    }
}
