//! `katamaran::service::bind_socket`: the socket is 0600, directories it creates are 0700, and
//! a directory it did not create keeps its mode (issue: `--socket /tmp/x.sock` chmodded /tmp).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use katamaran::service::{bind_socket, ServeError};

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn an_existing_directory_keeps_its_mode_and_the_socket_is_0600() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o755, 0o1777, 0o750] {
        set_mode(dir.path(), mode);
        let socket = dir.path().join("agent.sock");
        let listener = bind_socket(&socket).unwrap();
        assert_eq!(mode_of(dir.path()), mode, "the directory it did not create is unchanged");
        assert_eq!(mode_of(&socket), 0o600);
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
    }
}

#[tokio::test]
async fn directories_it_creates_are_0700_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let socket = dir.path().join("a/b/agent.sock");
    let _listener = bind_socket(&socket).unwrap();
    assert_eq!(mode_of(dir.path()), 0o755);
    assert_eq!(mode_of(&dir.path().join("a")), 0o700);
    assert_eq!(mode_of(&dir.path().join("a/b")), 0o700);
    assert_eq!(mode_of(&socket), 0o600);
}

#[tokio::test]
async fn a_directory_others_can_write_without_the_sticky_bit_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o777);
    let socket = dir.path().join("agent.sock");
    let err = bind_socket(&socket).unwrap_err();
    assert!(
        matches!(&err, ServeError::Socket { why, .. } if why.contains("without the sticky bit")),
        "{err}"
    );
    assert_eq!(mode_of(dir.path()), 0o777);
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let live = bind_socket(&socket).unwrap();
    let err = bind_socket(&socket).unwrap_err();
    assert!(err.to_string().contains("another server is listening on it"), "{err}");
    drop(live); // the file stays: stale
    assert!(socket.exists());
    let _again = bind_socket(&socket).unwrap();
    assert_eq!(mode_of(&socket), 0o600);
}
