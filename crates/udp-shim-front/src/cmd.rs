//! Running `nft` and `iptables` inside the front's network namespace.
//!
//! A helper thread enters the namespace (`setns(CLONE_NEWNET)`) and spawns the commands: a
//! child starts in its parent thread's namespace, so no `nsenter` is needed and the caller's
//! threads stay where they are. Every failure carries the command line and its standard error.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nix::sched::{CloneFlags, setns};

use crate::FrontError;

/// The programs a front runs. Paths, or names looked up in `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `nft` (Debian package `nftables`): the NAT table and its switches.
    pub nft: PathBuf,
    /// An iptables that speaks nf_tables (Debian package `iptables`, `iptables-nft`): the hold's
    /// `NFQUEUE` rule. This kernel has no nftables `queue` expression, but iptables' `NFQUEUE`
    /// target works through nf_tables' xtables compatibility.
    pub iptables: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            nft: PathBuf::from("nft"),
            iptables: PathBuf::from("iptables-nft"),
        }
    }
}

/// Which of the [`Tools`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    Nft,
    Iptables,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Iptables => "iptables-nft",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Self::Nft => "nftables",
            Self::Iptables => "iptables",
        }
    }
}

/// A network namespace to run things in: a file of `/var/run/netns` or `/proc/PID/ns/net`,
/// opened once; `None` is the caller's own.
#[derive(Debug)]
pub(crate) struct Netns {
    file: Option<(File, PathBuf)>,
}

impl Netns {
    pub(crate) fn open(path: Option<&Path>) -> Result<Self, FrontError> {
        let file = match path {
            None => None,
            Some(path) => Some((
                File::open(path).map_err(|source| FrontError::Netns {
                    path: path.to_owned(),
                    source,
                })?,
                path.to_owned(),
            )),
        };
        Ok(Self { file })
    }

    /// The namespace's file (`None`: the caller's).
    pub(crate) fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(_, p)| p.as_path())
    }

    /// How to name the namespace in messages.
    pub(crate) fn shown(&self) -> String {
        match &self.file {
            Some((_, path)) => path.display().to_string(),
            None => "the caller's network namespace".to_owned(),
        }
    }

    /// Enters the namespace on the calling thread (only for a thread made for it).
    pub(crate) fn enter(&self) -> Result<(), FrontError> {
        match &self.file {
            None => Ok(()),
            Some((file, path)) => {
                setns(file, CloneFlags::CLONE_NEWNET).map_err(|errno| FrontError::Netns {
                    path: path.clone(),
                    source: io::Error::from(errno),
                })
            }
        }
    }

    /// Runs `f` on a helper thread inside the namespace (or on this thread for the caller's
    /// own namespace).
    pub(crate) fn run<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, FrontError> + Send,
    ) -> Result<T, FrontError> {
        if self.file.is_none() {
            return f();
        }
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("udp-shim-front-netns".into())
                .spawn_scoped(s, || {
                    self.enter()?;
                    f()
                })
                .map_err(|source| FrontError::Spawn {
                    command: "a thread to enter the network namespace".into(),
                    source,
                })?
                .join()
                .map_err(|_| FrontError::Holder {
                    what: "(namespace helper) panicked",
                })?
        })
    }
}

/// Runs one of the tools with `args` (and `stdin`, if any) in the calling thread's network
/// namespace; returns its standard output.
pub(crate) fn run(
    tools: &Tools,
    tool: Tool,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, FrontError> {
    let program = match tool {
        Tool::Nft => &tools.nft,
        Tool::Iptables => &tools.iptables,
    };
    let shown = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                FrontError::ToolMissing {
                    tool: tool.name(),
                    path: program.clone(),
                    package: tool.package(),
                }
            } else {
                FrontError::Spawn {
                    command: shown.clone(),
                    source,
                }
            }
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (the tool exited early) shows in its status and standard error.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| FrontError::Spawn {
            command: shown.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(FrontError::Command {
            command: match stdin {
                Some(text) => format!("{shown} <<EOF\n{}EOF", text),
                None => shown,
            },
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
