//! Root-only files holding keys: a 0700 directory with 0600 files, each created new (an
//! existing file is never replaced) and synced.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (0700; its parents too with `recursive`, else it must not exist) and writes
/// each `(name, body)` into it as a new 0600 file.
///
/// # Errors
/// The path that failed and why.
pub fn write(dir: &Path, recursive: bool, files: &[(&str, &str)]) -> Result<(), (PathBuf, std::io::Error)> {
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(dir)
        .map_err(|e| (dir.to_owned(), e))?;
    for (name, body) in files {
        let path = dir.join(name);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(body.as_bytes()).and_then(|()| f.sync_all()));
        written.map_err(|e| (path, e))?;
    }
    Ok(())
}
