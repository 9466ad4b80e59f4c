//! The wrapper's actions: `start` (delegate, then the extension for a sandbox), `delete`
//! (delegate, then stop the extension), anything else handed to the delegate by `exec`.

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;

use super::args::{Action, ShimArgs};
use super::config::{find_program, ExtensionPolicy, WrapperConfig};
use super::decide::{choose_shim_pid, extension_args, wants_extension};
use super::extension::{self, ExtensionPaths, Stopped};
use super::{delegate, process, Error};
use crate::migration::error::chain;
use crate::sandbox::{validate_sandbox_id, BundleInfo};

/// The binary's name, as containerd derives it from `io.containerd.katamaran.v2`.
pub const PROGRAM: &str = "containerd-shim-katamaran-v2";

/// Runs the wrapper on the arguments after the program name and returns the exit code; errors are
/// printed once, whole, on stderr.
pub fn main(args: Vec<OsString>) -> u8 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{PROGRAM}: {}", chain(&e));
            1
        }
    }
}

/// Runs the wrapper; `Ok` carries the exit code (the delegate's).
///
/// # Errors
/// Anything that stops the wrapper before or while running the delegate: a bad command line or
/// configuration, a missing delegate or agent, an unreadable bundle, a held extension socket.
pub fn run(args: Vec<OsString>) -> Result<u8, Error> {
    let args = ShimArgs::parse(args)?;
    let cfg = WrapperConfig::load()?;
    match args.action {
        Action::Start => start(&args, &cfg),
        Action::Delete => delete(&args, &cfg),
        Action::PassThrough => Err(delegate::exec(&delegate::resolve(&cfg.delegate)?, &args.raw)),
    }
}

/// Everything an extension start needs, settled before the delegate runs.
#[derive(Debug)]
struct Plan {
    id: String,
    bundle: PathBuf,
    paths: ExtensionPaths,
    agent: PathBuf,
    log: File,
}

fn plan_extension(args: &ShimArgs, cfg: &WrapperConfig) -> Result<Option<Plan>, Error> {
    let Some(id) = args.id.clone() else { return Ok(None) };
    if cfg.extension == ExtensionPolicy::Off {
        return Ok(None);
    }
    let bundle = match &args.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(Error::Cwd)?,
    };
    let info = BundleInfo::load(&bundle).map_err(|source| Error::Bundle { id: id.clone(), source })?;
    if !wants_extension(cfg.extension, info.container_type) {
        return Ok(None);
    }
    validate_sandbox_id(&id).map_err(Error::SandboxId)?;
    let paths = ExtensionPaths::new(&cfg.layout(), &id);
    extension::check_free(&paths, &id)?;
    let agent = find_program(&cfg.agent, std::env::var_os("PATH").as_deref())
        .ok_or_else(|| Error::AgentMissing { path: cfg.agent.clone() })?;
    let log = extension::prepare(&paths)?;
    Ok(Some(Plan { id, bundle, paths, agent, log }))
}

fn start(args: &ShimArgs, cfg: &WrapperConfig) -> Result<u8, Error> {
    let program = delegate::resolve(&cfg.delegate)?;
    let Some(mut plan) = plan_extension(args, cfg)? else {
        // Nothing of ours to do: become the delegate.
        return Err(delegate::exec(&program, &args.raw));
    };
    process::become_subreaper().map_err(Error::Subreaper)?;
    let code = delegate::exit_code(delegate::run(&program, &args.raw)?);
    if code != 0 {
        extension::note(&mut plan.log, &format!("delegate start exited with {code}; no extension"));
        return Ok(code);
    }
    // The delegate's answer is on containerd's pipe: from here on nothing may reach stdout or
    // stderr, whatever happens to the extension.
    launch(plan, cfg);
    Ok(0)
}

fn launch(mut plan: Plan, cfg: &WrapperConfig) {
    let pid_file = std::fs::read_to_string(plan.bundle.join("shim.pid")).ok();
    let orphans = process::children();
    let Some(shim_pid) = choose_shim_pid(pid_file.as_deref(), &orphans) else {
        let e = Error::ShimPidUnknown { bundle: plan.bundle.clone(), orphans: orphans.len() };
        extension::note(&mut plan.log, &format!("sandbox {}: {}; no extension started", plan.id, chain(&e)));
        return;
    };
    let args = extension_args(&plan.id, &cfg.root, shim_pid, &cfg.node_addresses);
    extension::note(
        &mut plan.log,
        &format!("sandbox {}: starting {} (following shim pid {shim_pid})", plan.id, plan.agent.display()),
    );
    match extension::launch(&plan.agent, &args, &plan.log, cfg.log.as_deref(), &plan.paths) {
        Ok(pid) => extension::note(&mut plan.log, &format!("sandbox {}: extension pid {pid}", plan.id)),
        Err(e) => extension::note(&mut plan.log, &format!("sandbox {}: {}", plan.id, chain(&e))),
    }
    extension::prune_logs(&cfg.layout());
}

fn delete(args: &ShimArgs, cfg: &WrapperConfig) -> Result<u8, Error> {
    let delegated = delegate::resolve(&cfg.delegate).and_then(|p| delegate::run(&p, &args.raw));
    // Stop the extension whatever the delegate said: a dead shim's extension must not linger.
    if let Some(id) = args.id.as_deref().filter(|id| validate_sandbox_id(id).is_ok()) {
        let paths = ExtensionPaths::new(&cfg.layout(), id);
        let outcome = extension::stop(&paths, id, cfg.stop_timeout);
        let msg = match &outcome {
            Ok(Stopped::NotRunning) => None,
            Ok(s) => Some(format!("sandbox {id}: extension stopped by delete ({s:?})")),
            Err(e) => Some(format!("sandbox {id}: {}", chain(e))),
        };
        if let (Some(msg), Ok(mut log)) = (msg, File::options().append(true).open(&paths.log_file)) {
            extension::note(&mut log, &msg);
        }
        // containerd logs delete's stderr as cleanup warnings; say only what went wrong.
        if let Err(e) = outcome {
            eprintln!("{PROGRAM}: {}", chain(&e));
        }
    }
    Ok(delegate::exit_code(delegated?))
}
