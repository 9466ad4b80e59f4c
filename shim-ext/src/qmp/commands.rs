//! Typed convenience calls for the commands katamaran uses.

use std::os::fd::AsFd;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::client::QmpClient;
use super::error::QmpError;
use super::types::{CommandInfo, MigrationCapabilityStatus, MigrationInfo, QemuVersion, StatusInfo};

impl QmpClient {
    async fn typed<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|source| QmpError::UnexpectedReply { command: command.to_owned(), source })
    }

    /// `query-status`: whether the VM runs and its run state.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`], or [`QmpError::UnexpectedReply`].
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.typed("query-status", None).await
    }

    /// `query-version`.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`], or [`QmpError::UnexpectedReply`].
    pub async fn query_version(&self) -> Result<QemuVersion, QmpError> {
        self.typed("query-version", None).await
    }

    /// `query-migrate`: the state and statistics of the current or last migration.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`], or [`QmpError::UnexpectedReply`].
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.typed("query-migrate", None).await
    }

    /// `query-migrate-capabilities`: every capability this QEMU knows and whether it is on.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`], or [`QmpError::UnexpectedReply`].
    pub async fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>, QmpError> {
        self.typed("query-migrate-capabilities", None).await
    }

    /// `query-commands`: the names of every command this QEMU accepts.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`], or [`QmpError::UnexpectedReply`].
    pub async fn query_commands(&self) -> Result<Vec<String>, QmpError> {
        let commands: Vec<CommandInfo> = self.typed("query-commands", None).await?;
        Ok(commands.into_iter().map(|command| command.name).collect())
    }

    /// `stop`: pauses the vCPUs. QEMU emits `STOP`, which is queued on the event channel before
    /// this returns.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`].
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resumes the vCPUs. QEMU emits `RESUME`.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`].
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `getfd`: hands `fd` to QEMU under `name` (e.g. for `migrate` with `fd:NAME`).
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute_with_fd`].
    pub async fn getfd(&self, name: &str, fd: impl AsFd) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd).await.map(drop)
    }

    /// `closefd`: makes QEMU close a descriptor it received with `getfd`.
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`]; QEMU answers `GenericError` for an unknown name.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": name }))).await.map(drop)
    }
}
