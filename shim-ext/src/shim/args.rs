//! The command line containerd gives a v2 shim binary, read the way Go's `flag` package reads it.
//!
//! containerd 1.6–2.x run `<shim> -namespace NS -address ADDR -publish-binary BIN -id ID [-debug]
//! start` with the bundle as the working directory, and `... -id ID -bundle DIR delete` to clean
//! up after a dead shim; `-v` prints the version. The wrapper passes the argument vector to the
//! delegate untouched, so this parse only has to find the action and the few values it uses.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::Error;

/// Flags of the shim protocol that take no value (Go `flag.Bool`); every other flag takes one.
const BOOL_FLAGS: &[&str] = &["debug", "v", "version", "systemd-cgroup"];

/// What containerd asks of the shim binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or find) the shim for a container and print its address.
    Start,
    /// Clean up after a dead shim and print a `DeleteResponse`.
    Delete,
    /// Anything else (`-v`, no action, a future action): handed to the delegate as it is.
    PassThrough,
}

/// The parts of a shim command line the wrapper uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    /// Every argument after the program name, exactly as received.
    pub raw: Vec<OsString>,
    /// `-id`.
    pub id: Option<String>,
    /// `-namespace`.
    pub namespace: Option<String>,
    /// `-bundle` (given for `delete`; `start` uses the working directory).
    pub bundle: Option<PathBuf>,
    /// What to do.
    pub action: Action,
}

impl ShimArgs {
    /// Reads the arguments after the program name.
    ///
    /// # Errors
    /// [`Error::Usage`] when a flag that takes a value ends the line, or when `start`/`delete` come
    /// without an `-id`, or when the id is not UTF-8.
    pub fn parse(raw: Vec<OsString>) -> Result<Self, Error> {
        let mut id = None;
        let mut namespace = None;
        let mut bundle = None;
        let mut positional: Option<&OsStr> = None;
        let mut i = 0;
        while i < raw.len() {
            let arg = raw[i].as_bytes();
            i += 1;
            if arg == b"--" {
                positional = raw.get(i).map(OsString::as_os_str);
                break;
            }
            if arg.len() < 2 || arg[0] != b'-' {
                positional = Some(OsStr::from_bytes(arg));
                break;
            }
            let name = if arg.starts_with(b"--") { &arg[2..] } else { &arg[1..] };
            let (name, inline) = match name.iter().position(|&b| b == b'=') {
                Some(eq) => (&name[..eq], Some(&name[eq + 1..])),
                None => (name, None),
            };
            let name = String::from_utf8_lossy(name);
            if BOOL_FLAGS.contains(&name.as_ref()) {
                continue;
            }
            let value = match inline {
                Some(v) => OsStr::from_bytes(v),
                None => {
                    let v = raw.get(i).ok_or_else(|| Error::Usage(format!("flag -{name} needs a value")))?;
                    i += 1;
                    v.as_os_str()
                }
            };
            match name.as_ref() {
                "id" => id = Some(utf8("id", value)?),
                "namespace" => namespace = Some(utf8("namespace", value)?),
                "bundle" => bundle = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        let action = match positional.map(OsStr::as_bytes) {
            Some(b"start") => Action::Start,
            Some(b"delete") => Action::Delete,
            _ => Action::PassThrough,
        };
        if action != Action::PassThrough && id.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Usage("start and delete need -id".into()));
        }
        Ok(Self { raw, id, namespace, bundle, action })
    }
}

fn utf8(flag: &str, v: &OsStr) -> Result<String, Error> {
    v.to_str().map(str::to_owned).ok_or_else(|| Error::Usage(format!("-{flag} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<ShimArgs, Error> {
        ShimArgs::parse(line.split_whitespace().map(OsString::from).collect())
    }

    #[test]
    fn containerd_lines() {
        // containerd 1.6 start, as recorded from a real containerd.
        let a = parse("-namespace kt -address /tmp/c.sock -publish-binary /usr/bin/containerd -id c1 start")
            .expect("start");
        assert_eq!(a.action, Action::Start);
        assert_eq!(a.id.as_deref(), Some("c1"));
        assert_eq!(a.namespace.as_deref(), Some("kt"));
        assert_eq!(a.bundle, None);
        assert_eq!(a.raw.len(), 9, "kept untouched");

        let a = parse("-namespace k8s.io -address /run/c.sock -publish-binary /bin/c -id abc -debug start")
            .expect("debug start");
        assert_eq!((a.action, a.id.as_deref()), (Action::Start, Some("abc")));

        let a = parse("-namespace kt -address /a -publish-binary /b -id c1 -bundle /run/b/c1 delete")
            .expect("del");
        assert_eq!(a.action, Action::Delete);
        assert_eq!(a.bundle, Some(PathBuf::from("/run/b/c1")));
    }

    #[test]
    fn go_flag_spellings() {
        let a = parse("--namespace=ns -id=x -debug=true --bundle=/b delete").expect("parse");
        assert_eq!(a.namespace.as_deref(), Some("ns"));
        assert_eq!(a.id.as_deref(), Some("x"));
        assert_eq!(a.bundle, Some(PathBuf::from("/b")));
        assert_eq!(a.action, Action::Delete);
        // An unknown valued flag consumes its value; the action is the first positional.
        let a = parse("-socket /s -id x start extra").expect("parse");
        assert_eq!(a.action, Action::Start);
        // `--` ends the flags.
        let a = parse("-id x -- start").expect("parse");
        assert_eq!(a.action, Action::Start);
    }

    #[test]
    fn pass_through_and_refusals() {
        assert_eq!(parse("-v").expect("version").action, Action::PassThrough);
        assert_eq!(parse("-namespace ns -id x").expect("serve").action, Action::PassThrough);
        assert_eq!(parse("-id x frobnicate").expect("unknown").action, Action::PassThrough);
        let err = parse("-namespace ns start").expect_err("no id").to_string();
        assert!(err.contains("-id"), "{err}");
        let err = parse("-namespace").expect_err("no value").to_string();
        assert!(err.contains("-namespace needs a value"), "{err}");
        assert!(parse("-id= start").is_err(), "empty id");
    }

    #[test]
    fn non_utf8_id_is_refused_but_other_bytes_pass() {
        use std::os::unix::ffi::OsStringExt;
        let raw = vec![OsString::from("-id"), OsString::from_vec(vec![0xff, 0xfe]), OsString::from("start")];
        assert!(ShimArgs::parse(raw).is_err());
        let raw = vec![
            OsString::from("-address"),
            OsString::from_vec(vec![b'/', 0xff]),
            OsString::from("-id"),
            OsString::from("x"),
            OsString::from("start"),
        ];
        let a = ShimArgs::parse(raw.clone()).expect("address bytes are not ours to judge");
        assert_eq!(a.raw, raw);
    }
}
