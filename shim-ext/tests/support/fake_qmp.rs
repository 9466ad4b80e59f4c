//! A scripted fake QMP server on a temporary unix socket.
//!
//! A test drives one connection step by step: send lines, expect commands, reply. Every wait
//! has a deadline ([`STEP_DEADLINE`]) so a broken client fails the test instead of hanging it.
//! Descriptors passed with `SCM_RIGHTS` are collected and can be taken with
//! [`FakeConn::take_fd`].

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// How long any single step of a script may wait.
pub const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// The greeting of Debian 12's QEMU, plus an unknown member and an unknown capability.
pub fn greeting() -> Value {
    json!({"QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"},
        "capabilities": ["oob", "future-cap"],
        "future-member": {"x": 1}
    }})
}

/// A listening fake; the socket and its directory go away on drop.
#[derive(Debug)]
pub struct FakeQmp {
    listener: UnixListener,
    path: PathBuf,
    _dir: TempDir,
}

impl FakeQmp {
    /// Binds a fresh socket in a temporary directory.
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind fake QMP socket");
        Self { listener, path, _dir: dir }
    }

    /// The socket path to connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the client's connection.
    pub async fn accept(&self) -> FakeConn {
        let (stream, _) = tokio::time::timeout(STEP_DEADLINE, self.listener.accept())
            .await
            .expect("client connects in time")
            .expect("accept");
        FakeConn { stream, buf: Vec::new(), fds: VecDeque::new() }
    }
}

/// A command as the fake received it.
#[derive(Debug, Clone)]
pub struct ReceivedCommand {
    /// `execute`.
    pub name: String,
    /// `id`, echoed back in replies.
    pub id: Value,
    /// `arguments`, if any.
    pub arguments: Option<Value>,
}

/// One accepted connection.
#[derive(Debug)]
pub struct FakeConn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl FakeConn {
    /// Sends `line` and a newline, verbatim.
    pub async fn send_line(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes()).await;
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        tokio::time::timeout(STEP_DEADLINE, self.stream.write_all(bytes))
            .await
            .expect("client reads in time")
            .expect("write to client");
    }

    /// Sends one JSON message.
    pub async fn send(&mut self, message: Value) {
        self.send_line(&message.to_string()).await;
    }

    /// Sends the greeting, expects `qmp_capabilities` and accepts it.
    pub async fn handshake(&mut self) {
        self.send(greeting()).await;
        let command = self.expect_command("qmp_capabilities").await;
        self.reply(&command, json!({})).await;
    }

    /// Sends an event stamped with the current time.
    pub async fn send_event(&mut self, name: &str, data: Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after epoch");
        self.send(json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        }))
        .await;
    }

    /// Replies to `command` with `value`.
    pub async fn reply(&mut self, command: &ReceivedCommand, value: Value) {
        self.send(json!({"return": value, "id": command.id})).await;
    }

    /// Replies to `command` with an error.
    pub async fn reply_error(&mut self, command: &ReceivedCommand, class: &str, desc: &str) {
        self.send(json!({"error": {"class": class, "desc": desc}, "id": command.id})).await;
    }

    /// Receives the next command, whatever it is.
    pub async fn recv_command(&mut self) -> ReceivedCommand {
        let line = tokio::time::timeout(STEP_DEADLINE, self.read_line())
            .await
            .expect("client sends a command in time")
            .expect("client sends a command before closing");
        let value: Value = serde_json::from_slice(&line).expect("client sends JSON");
        ReceivedCommand {
            name: value["execute"].as_str().expect("command has `execute`").to_owned(),
            id: value.get("id").cloned().expect("command has an id"),
            arguments: value.get("arguments").cloned(),
        }
    }

    /// Receives the next command and checks its name.
    pub async fn expect_command(&mut self, name: &str) -> ReceivedCommand {
        let command = self.recv_command().await;
        assert_eq!(command.name, name, "unexpected command");
        command
    }

    /// The oldest descriptor received with `SCM_RIGHTS` and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Waits until the client closes its end.
    pub async fn expect_eof(&mut self) {
        let line =
            tokio::time::timeout(STEP_DEADLINE, self.read_line()).await.expect("client closes in time");
        assert!(line.is_none(), "expected EOF, got a line");
    }

    /// Closes the connection from the server side, like QEMU exiting.
    pub fn close(self) {
        drop(self);
    }

    /// The next line, or `None` at EOF.
    async fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(newline) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=newline).collect();
                return Some(line);
            }
            if self.fill().await.expect("read from client") == 0 {
                return None;
            }
        }
    }

    /// One `recvmsg`, keeping both bytes and passed descriptors.
    async fn fill(&mut self) -> io::Result<usize> {
        let socket = self.stream.as_raw_fd();
        loop {
            self.stream.readable().await?;
            let mut data = [0_u8; 8192];
            let mut control = nix::cmsg_space!([RawFd; 4]);
            let attempt = self.stream.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut data)];
                let message = recvmsg::<()>(socket, &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in message.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
                Ok((message.bytes, fds))
            });
            match attempt {
                Ok((bytes, fds)) => {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor for us with
                        // SCM_RIGHTS; nothing else owns it.
                        self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                    self.buf.extend_from_slice(&data[..bytes]);
                    return Ok(bytes);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(0),
                Err(error) => return Err(error),
            }
        }
    }
}
