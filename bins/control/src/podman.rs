//! podman: the image, the two containers, their network namespaces.
//!
//! Verified on these machines (see the project notes): rootful podman works with the runc
//! runtime (crun fails on hybrid cgroups) and with lowered rlimits; no registry can be reached,
//! so the image is imported from a tar of a root filesystem assembled here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sys::{self, run, run_unchecked};

/// The port the server listens on inside each container's network namespace.
pub(crate) const CONTAINER_PORT: u16 = 4242;

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// Assembles a root filesystem from static busybox (the containers' `sleep`) and the
/// project's release binaries with the shared libraries they need, and imports it as `tag`.
pub(crate) fn build_image(work: &Path, tag: &str, binaries: &[PathBuf]) -> Result<()> {
    let rootfs = work.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing the old {}", rootfs.display()))?;
    }
    for d in ["bin", "usr/local/bin", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let busybox = busybox()?;
    std::fs::copy(&busybox, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    for applet in ["sh", "sleep", "true", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    for bin in binaries {
        let name = bin
            .file_name()
            .with_context(|| format!("{} has no file name", bin.display()))?;
        std::fs::copy(bin, rootfs.join("usr/local/bin").join(name))
            .with_context(|| format!("copying {}", bin.display()))?;
        for lib in shared_libraries(bin)? {
            let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if !dest.exists() {
                std::fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
    }
    let tar = work.join("rootfs.tar");
    run(
        "pack the image",
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    run(
        "import the image",
        podman()
            .args(["import", "--change", r#"CMD ["/bin/sleep", "2147483647"]"#])
            .arg(&tar)
            .arg(tag),
    )?;
    std::fs::remove_dir_all(&rootfs).ok();
    std::fs::remove_file(&tar).ok();
    Ok(())
}

pub(crate) fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("busybox is not installed (package busybox-static); run `cargo xtask setup`")
}

/// The shared libraries `bin` loads, from `ldd`.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run("list shared libraries", Command::new("ldd").arg(bin))?;
    Ok(parse_ldd(&out.stdout()))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Starts a detached container named `name` from `image`, host UDP `port` mapped to the
/// container's [`CONTAINER_PORT`].
pub(crate) fn start_container(name: &str, image: &str, port: u16) -> Result<()> {
    run(
        &format!("start container {name}"),
        podman()
            .args(["run", "-d", "--name", name])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1000:1000",
            ])
            .args(["-p", &format!("{port}:{CONTAINER_PORT}/udp")])
            .arg(image),
    )?;
    Ok(())
}

/// The network namespace of a running container.
pub(crate) fn netns(name: &str) -> Result<PathBuf> {
    let out = run(
        &format!("inspect container {name}"),
        podman().args(["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name]),
    )?;
    let path = PathBuf::from(out.stdout());
    if !path.is_absolute() || !path.exists() {
        bail!(
            "container {name} has no network namespace (SandboxKey `{}`)",
            path.display()
        );
    }
    Ok(path)
}

/// The container's address on podman's network (where a front sends its datagrams).
pub(crate) fn ipv4(name: &str) -> Result<std::net::Ipv4Addr> {
    let out = run(
        &format!("inspect container {name}"),
        podman().args(["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name]),
    )?;
    let text = out.stdout();
    text.trim()
        .parse()
        .with_context(|| format!("container {name} has no IPv4 address (`{text}`)"))
}

/// Whether the container exists and runs.
pub(crate) fn is_running(name: &str) -> bool {
    run_unchecked(
        &format!("check container {name}"),
        podman().args(["inspect", "-f", "{{.State.Running}}", name]),
    )
    .is_ok_and(|r| r.output.status.success() && r.stdout() == "true")
}

/// Removes a container (stopping it); fine if it does not exist.
pub(crate) fn remove_container(name: &str) -> Result<()> {
    let r = run_unchecked(
        &format!("remove container {name}"),
        podman().args(["rm", "-f", "-t", "0", name]),
    )?;
    let stderr = String::from_utf8_lossy(&r.output.stderr);
    if !r.output.status.success() && !stderr.contains("no such container") {
        bail!("removing container {name}: {}", sys::tail(&stderr, 5));
    }
    Ok(())
}

/// Removes an image; fine if it does not exist.
pub(crate) fn remove_image(tag: &str) -> Result<()> {
    let r = run_unchecked("remove the image", podman().args(["rmi", "-f", tag]))?;
    let stderr = String::from_utf8_lossy(&r.output.stderr);
    if !r.output.status.success() && !stderr.contains("image not known") {
        bail!("removing image {tag}: {}", sys::tail(&stderr, 5));
    }
    Ok(())
}

/// A container's log, for diagnostics.
pub(crate) fn logs(name: &str) -> String {
    run_unchecked(&format!("logs of {name}"), podman().args(["logs", name]))
        .map(|r| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&r.output.stdout),
                String::from_utf8_lossy(&r.output.stderr)
            )
        })
        .unwrap_or_else(|e| format!("(no logs: {e:#})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                    \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}
