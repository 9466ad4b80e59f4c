//! What the running QEMU offers, asked rather than assumed from its version.
//!
//! Kata ships QEMU 10.2 or 11.0 while Debian 12 has 7.2 (DESIGN.md, "Facts established"); the
//! sequences of this module check the commands and capabilities they use against this record
//! before sending anything, so a missing feature is reported by name with the QEMU version
//! instead of surfacing as an opaque error halfway through a migration.
//!
//! `query-qmp-schema` (200 KB on 7.2) is not fetched: everything the sequences depend on is
//! visible in `query-commands` and `query-migrate-capabilities`, and the one argument shape
//! that could differ — `nbd-server-start`'s `addr` — is still the legacy `SocketAddressLegacy`
//! on every QEMU from 7.2 to the current release.

use std::collections::{BTreeMap, BTreeSet};

use crate::qmp::{MigrationCapabilityStatus, QemuVersion, QmpClient};

use super::error::QemuError;

/// The commands and migration capabilities of one QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFeatures {
    version: QemuVersion,
    commands: BTreeSet<String>,
    /// Capability → currently enabled.
    capabilities: BTreeMap<String, bool>,
    /// The guest runs under KVM (`query-kvm`), not TCG.
    kvm: bool,
}

impl QemuFeatures {
    /// Asks QEMU: `query-version`, `query-commands`, `query-migrate-capabilities`.
    ///
    /// # Errors
    ///
    /// [`QemuError::Discover`] if a query fails.
    pub async fn discover(qmp: &QmpClient) -> Result<Self, QemuError> {
        let (version, commands, capabilities) =
            futures::try_join!(qmp.query_version(), qmp.query_commands(), qmp.query_migrate_capabilities())
                .map_err(|source| QemuError::Discover { source })?;
        let features = Self::from_parts(version, commands, &capabilities);
        // Only to pick the pre-copy strategy: a QEMU that does not answer counts as TCG, the
        // cautious reading (see `iterates_safely`).
        let kvm = if features.has_command("query-kvm") {
            qmp.execute("query-kvm", None)
                .await
                .ok()
                .and_then(|v| v.get("enabled").and_then(serde_json::Value::as_bool))
                .unwrap_or(false)
        } else {
            false
        };
        Ok(features.with_kvm(kvm))
    }

    /// The same record for a guest that runs under KVM (`true`) or TCG.
    #[must_use]
    pub fn with_kvm(mut self, kvm: bool) -> Self {
        self.kvm = kvm;
        self
    }

    /// Whether the guest runs under KVM (as `query-kvm` said at discovery).
    pub fn kvm(&self) -> bool {
        self.kvm
    }

    /// Whether QEMU's dirty tracking holds across dirty-bitmap syncs, so pre-copy may iterate
    /// (many syncs) before the switchover. Under TCG, QEMU before 9.0 cleared the dirty bits of
    /// word-aligned ranges without re-arming the TCG TLB: stores through an already-dirty TLB
    /// entry after a sync never reached the bitmap, and the destination got stale pages (fixed
    /// in 9.0: `cpu_physical_memory_sync_dirty_bitmap` calls
    /// `cpu_physical_memory_dirty_bits_cleared`). Measured in the lab: the guest's kernel
    /// panicked on the destination after 14 of 18 iterated moves on Debian 12's 7.2, after none
    /// of 4 on 10.0. KVM keeps its own dirty log and was never affected.
    pub fn iterates_safely(&self) -> bool {
        self.kvm || self.version.at_least(9, 0)
    }

    /// Builds the record from already-fetched replies.
    pub fn from_parts(
        version: QemuVersion,
        commands: impl IntoIterator<Item = String>,
        capabilities: &[MigrationCapabilityStatus],
    ) -> Self {
        Self {
            version,
            commands: commands.into_iter().collect(),
            capabilities: capabilities
                .iter()
                .map(|status| (status.capability.as_str().to_owned(), status.state))
                .collect(),
            kvm: false,
        }
    }

    /// The QEMU version.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// Whether QEMU accepts the QMP command `name`.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains(name)
    }

    /// Whether QEMU knows the migration capability `name` (e.g. `"multifd"`).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.contains_key(name)
    }

    /// Whether the capability was enabled when discovered; `None` if QEMU does not know it.
    pub fn capability_enabled(&self, name: &str) -> Option<bool> {
        self.capabilities.get(name).copied()
    }

    /// Every migration capability QEMU knows, as it spells them.
    pub fn capabilities(&self) -> impl Iterator<Item = &str> {
        self.capabilities.keys().map(String::as_str)
    }

    /// Fails unless QEMU accepts the QMP command `name`.
    ///
    /// # Errors
    ///
    /// [`QemuError::MissingCommand`] naming the command and the QEMU version.
    pub fn require_command(&self, name: &str) -> Result<(), QemuError> {
        if self.has_command(name) {
            Ok(())
        } else {
            Err(QemuError::MissingCommand { version: self.version.clone(), command: name.to_owned() })
        }
    }

    /// Fails unless QEMU knows the migration capability `name`.
    ///
    /// # Errors
    ///
    /// [`QemuError::MissingCapability`] naming the capability and the QEMU version.
    pub fn require_capability(&self, name: &str) -> Result<(), QemuError> {
        if self.has_capability(name) {
            Ok(())
        } else {
            Err(QemuError::MissingCapability { version: self.version.clone(), capability: name.to_owned() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::MigrationCapability;

    fn debian_7_2() -> QemuFeatures {
        let version = QemuVersion { major: 7, minor: 2, micro: 22, package: String::new() };
        let capabilities: Vec<MigrationCapabilityStatus> = ["events", "multifd", "future-thing"]
            .into_iter()
            .map(|name| MigrationCapabilityStatus {
                capability: MigrationCapability::from(name),
                state: name == "events",
            })
            .collect();
        QemuFeatures::from_parts(
            version,
            ["migrate".to_owned(), "block-export-add".to_owned()],
            &capabilities,
        )
    }

    #[test]
    fn iteration_is_safe_under_kvm_or_from_qemu_9() {
        let tcg_7_2 = debian_7_2();
        assert!(!tcg_7_2.iterates_safely(), "TCG on 7.2 loses stores across syncs");
        assert!(tcg_7_2.clone().with_kvm(true).iterates_safely(), "KVM keeps its own dirty log");
        let tcg_10 = QemuFeatures::from_parts(
            QemuVersion { major: 10, minor: 0, micro: 2, package: String::new() },
            Vec::<String>::new(),
            &[],
        );
        assert!(tcg_10.iterates_safely());
        let tcg_8_2 = QemuFeatures::from_parts(
            QemuVersion { major: 8, minor: 2, micro: 9, package: String::new() },
            Vec::<String>::new(),
            &[],
        );
        assert!(!tcg_8_2.iterates_safely());
    }

    #[test]
    fn answers_from_what_qemu_listed() {
        let features = debian_7_2();
        assert!(features.has_command("block-export-add"));
        assert!(!features.has_command("nbd-server-add"));
        assert!(features.has_capability("multifd"));
        assert!(features.has_capability("future-thing"), "unknown names are kept verbatim");
        assert_eq!(features.capability_enabled("events"), Some(true));
        assert_eq!(features.capability_enabled("multifd"), Some(false));
        assert_eq!(features.capability_enabled("switchover-ack"), None);
        assert_eq!(features.capabilities().count(), 3);
        features.require_capability("multifd").expect("present");
        features.require_command("migrate").expect("present");
    }

    #[test]
    fn missing_features_are_named_with_the_version() {
        let features = debian_7_2();
        let capability = features.require_capability("switchover-ack").expect_err("missing");
        assert_eq!(
            capability.to_string(),
            "QEMU 7.2.22 does not offer migration capability 'switchover-ack'"
        );
        let command = features.require_command("migrate-pause").expect_err("missing");
        assert_eq!(command.to_string(), "QEMU 7.2.22 does not offer QMP command 'migrate-pause'");
    }
}
