//! QEMU's TLS for the data streams: a `tls-creds-x509` object per migration, used by the RAM
//! migration (`tls-creds`, `tls-hostname`), the destination's NBD server and the source's NBD
//! clients. Present unchanged from QEMU 7.0 (NBD `tls-hostname`, TLS over unix sockets) to the
//! current release.

use std::path::Path;

use serde_json::json;
use tracing::debug;

use crate::dataplane::tls::{Endpoint, StreamCredentials, TlsError, SERVER_NAME};
use crate::qmp::QmpClient;

use super::error::QemuError;
use super::storage::qemu_id;

/// A credentials object inside a QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCreds {
    /// The object id, `kmr-tls-<migration>`.
    pub id: String,
    /// Which end this QEMU is.
    pub endpoint: Endpoint,
}

impl TlsCreds {
    /// The object of migration `migration_id` on `endpoint`'s QEMU (what [`add`] creates).
    pub fn of(migration_id: &str, endpoint: Endpoint) -> Self {
        Self { id: qemu_id("kmr-tls-", migration_id), endpoint }
    }

    /// The name the client checks in the server's certificate; `None` on the server.
    pub fn hostname(&self) -> Option<&'static str> {
        (self.endpoint == Endpoint::Client).then_some(SERVER_NAME)
    }
}

/// Creates the credentials object of migration `migration_id` for `endpoint` in QEMU. The
/// files are written into a new private directory `scratch` (this process's view), whose open
/// descriptor goes to QEMU with `add-fd`; QEMU reads the files through `/proc/self/fd/N` when
/// the object is created, so the path works whatever mount namespace QEMU runs in (Kata's
/// QEMU on the host, the agent in its container). The descriptor and the directory are removed
/// again whatever happened.
///
/// # Errors
/// [`QemuError::TlsFiles`] or [`QemuError::TlsCreds`] (QEMU refused the credentials).
pub async fn add(
    qmp: &QmpClient,
    scratch: &Path,
    migration_id: &str,
    endpoint: Endpoint,
    creds: &StreamCredentials,
) -> Result<TlsCreds, QemuError> {
    let object = TlsCreds::of(migration_id, endpoint);
    // A directory left by an agent that died between writing and removing it goes first.
    let _ = std::fs::remove_dir_all(scratch);
    let added = match creds.write_dir(scratch, endpoint) {
        Ok(()) => load(qmp, scratch, &object).await,
        Err(e) => Err(QemuError::TlsFiles(e)),
    };
    let removed = std::fs::remove_dir_all(scratch);
    added?;
    if let Err(source) = removed {
        // The key must not stay on disk: undo rather than go on.
        remove(qmp, &object).await;
        return Err(QemuError::TlsFiles(TlsError::Write { path: scratch.display().to_string(), source }));
    }
    debug!(id = %object.id, endpoint = endpoint.as_str(), "stream TLS credentials added");
    Ok(object)
}

/// `add-fd` of the directory, `object-add` through `/proc/self/fd/N`, `remove-fd`.
async fn load(qmp: &QmpClient, dir: &Path, object: &TlsCreds) -> Result<(), QemuError> {
    let refused = |source| QemuError::TlsCreds { id: object.id.clone(), source };
    let handle = std::fs::File::open(dir)
        .map_err(|source| QemuError::TlsFiles(TlsError::Write { path: dir.display().to_string(), source }))?;
    let info = qmp
        .execute_with_fd("add-fd", Some(json!({ "opaque": format!("katamaran {}", object.id) })), &handle)
        .await
        .map_err(refused)?;
    drop(handle);
    let added = match info["fd"].as_i64() {
        Some(fd) => qmp
            .execute(
                "object-add",
                Some(json!({
                    "qom-type": "tls-creds-x509",
                    "id": object.id,
                    "dir": format!("/proc/self/fd/{fd}"),
                    "endpoint": object.endpoint.as_str(),
                    "verify-peer": true,
                })),
            )
            .await
            .map(|_| ())
            .map_err(refused),
        None => Err(QemuError::TlsFiles(TlsError::Invalid(format!("add-fd answered {info}")))),
    };
    // The descriptor goes whatever happened: QEMU read the files, or never will.
    if let Some(set) = info["fdset-id"].as_i64() {
        if let Err(e) = qmp.execute("remove-fd", Some(json!({ "fdset-id": set }))).await {
            debug!(error = %e, "cannot remove the credentials directory's descriptor from QEMU");
        }
    }
    added
}

/// Makes the RAM migration use `creds` (and, on the client, check the server's name), or, with
/// `None`, no TLS: a QEMU keeps its migration parameters, so a VM that arrived over TLS would
/// otherwise try it again on a plain migration.
///
/// # Errors
/// [`QemuError::SetParameters`].
pub async fn use_for_migration(qmp: &QmpClient, creds: Option<&TlsCreds>) -> Result<(), QemuError> {
    let parameters = match creds {
        Some(c) => {
            let mut p = json!({ "tls-creds": c.id });
            if let Some(name) = c.hostname() {
                p["tls-hostname"] = json!(name);
            }
            p
        }
        None => json!({ "tls-creds": "", "tls-hostname": "" }),
    };
    let shown = parameters.to_string();
    qmp.execute("migrate-set-parameters", Some(parameters))
        .await
        .map_err(|source| QemuError::SetParameters { parameters: shown, source })?;
    Ok(())
}

/// Takes the credentials out of the migration parameters and deletes the object. Best effort
/// (the QEMU may be gone): failures are logged.
pub async fn remove(qmp: &QmpClient, creds: &TlsCreds) {
    if let Err(e) = use_for_migration(qmp, None).await {
        debug!(error = %e, "cannot reset the migration's TLS parameters");
    }
    if let Err(e) = qmp.execute("object-del", Some(json!({ "id": creds.id }))).await {
        debug!(id = %creds.id, error = %e, "cannot delete the stream TLS credentials");
    }
}
