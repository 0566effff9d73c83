//! Checks that keep the layers apart and the documents in step with the code.
//!
//! They read `cargo metadata --no-deps` and the source tree; nothing is compiled. Each check is
//! also a `#[test]`, so `cargo test` enforces them without xtask.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Libraries that must not open sockets, spawn runtimes or depend on the QUIC stack.
const PROTOCOL_FREE: &[&str] = &[
    "migration-core",
    "migration-crypto",
    "migration-wire",
    "control-protocol",
];

/// Crates that bring sockets, runtimes or the QUIC stack.
const IO_CRATES: &[&str] = &["quinn", "quinn-udp", "tokio", "socket2", "mio", "nix"];

/// What migration-core may depend on: nothing that does I/O.
const CORE_ALLOWED: &[&str] = &["serde", "thiserror"];

/// The test command that README.md documents and `.ci/run` runs.
pub(crate) const TEST_COMMAND: &str = "cargo xtask ci";

pub(crate) fn run_all(root: &Path) -> Result<()> {
    let meta = Metadata::load(root)?;
    let mut failures = Vec::new();
    for (name, check) in [
        ("dependency layering", check_dependencies(&meta)),
        ("source layering", check_sources(root)),
        ("documentation", check_docs(root, &meta)),
    ] {
        if let Err(e) = check {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{}", failures.join("\n"))
    }
}

#[derive(Debug)]
struct Package {
    name: String,
    dir: PathBuf,
    /// (dependency name, kind: "normal" | "dev" | "build").
    deps: Vec<(String, String)>,
}

#[derive(Debug)]
struct Metadata {
    packages: Vec<Package>,
}

impl Metadata {
    fn load(root: &Path) -> Result<Self> {
        let out = Command::new(crate::cargo())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root)
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
        Self::from_json(&v)
    }

    fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut packages = Vec::new();
        for p in v["packages"]
            .as_array()
            .context("no packages in metadata")?
        {
            let name = p["name"]
                .as_str()
                .context("package without name")?
                .to_owned();
            let manifest = p["manifest_path"]
                .as_str()
                .context("package without manifest_path")?;
            let dir = Path::new(manifest)
                .parent()
                .context("manifest without parent")?
                .to_path_buf();
            let mut deps = Vec::new();
            for d in p["dependencies"].as_array().into_iter().flatten() {
                let dep = d["name"].as_str().context("dependency without name")?;
                let kind = d["kind"].as_str().unwrap_or("normal");
                deps.push((dep.to_owned(), kind.to_owned()));
            }
            packages.push(Package { name, dir, deps });
        }
        Ok(Self { packages })
    }

    fn package(&self, name: &str) -> Result<&Package> {
        self.packages
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("package {name} is not in the workspace"))
    }
}

fn check_dependencies(meta: &Metadata) -> Result<()> {
    let mut errors = Vec::new();
    let core = meta.package("migration-core")?;
    for (dep, kind) in &core.deps {
        if kind == "normal" && !CORE_ALLOWED.contains(&dep.as_str()) {
            errors.push(format!(
                "migration-core depends on `{dep}`; it may only use {CORE_ALLOWED:?} (it does no I/O)"
            ));
        }
    }
    for p in &meta.packages {
        for (dep, _) in &p.deps {
            if dep == "ring" && p.name != "migration-crypto" {
                errors.push(format!(
                    "{} depends on ring; only migration-crypto touches ring",
                    p.name
                ));
            }
        }
        if PROTOCOL_FREE.contains(&p.name.as_str()) {
            for (dep, kind) in &p.deps {
                if kind == "normal" && IO_CRATES.contains(&dep.as_str()) {
                    errors.push(format!(
                        "{} depends on `{dep}`; protocol crates do no I/O (only the shims touch sockets)",
                        p.name
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// Forbidden text per crate directory: (crate dirs it applies to, needle, why).
fn source_rules() -> Vec<(Vec<&'static str>, &'static str, &'static str)> {
    vec![
        (
            vec!["crates/migration-core"],
            "Instant::now",
            "migration-core reads no clock: time comes in as an argument",
        ),
        (
            vec!["crates/migration-core"],
            "SystemTime::now",
            "migration-core reads no clock: time comes in as an argument",
        ),
        (
            vec!["crates/migration-core"],
            "std::fs",
            "migration-core does no I/O",
        ),
        (
            vec!["crates/migration-core"],
            "std::io::Read",
            "migration-core does no I/O",
        ),
        (
            vec![
                "crates/migration-core",
                "crates/migration-wire",
                "crates/control-protocol",
            ],
            "ring::",
            "only migration-crypto touches ring",
        ),
        (
            vec![
                "crates/migration-core",
                "crates/migration-crypto",
                "crates/migration-wire",
                "crates/control-protocol",
            ],
            "UdpSocket",
            "only the shims touch sockets",
        ),
    ]
}

fn check_sources(root: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for (dirs, needle, why) in source_rules() {
        for dir in dirs {
            let src = root.join(dir).join("src");
            for file in rust_files(&src)? {
                let text = fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if contains_path(code, needle) {
                        errors.push(format!(
                            "{}:{}: `{needle}`: {why}",
                            file.strip_prefix(root).unwrap_or(&file).display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// Whether `needle` occurs in `code` at the start of a path segment (`ring::` matches in
/// `use ring::aead` but not in `String::new`).
fn contains_path(code: &str, needle: &str) -> bool {
    code.match_indices(needle).any(|(i, _)| {
        !code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn check_docs(root: &Path, meta: &Metadata) -> Result<()> {
    let readme = read(root, "README.md")?;
    let arch = read(root, "ARCHITECTURE.md")?;
    let ci = read(root, ".ci/run")?;
    let mut errors = Vec::new();
    if !readme.contains(TEST_COMMAND) {
        errors.push(format!(
            "README.md does not document the test command `{TEST_COMMAND}`"
        ));
    }
    if !ci.lines().any(|l| l.trim_start().starts_with(TEST_COMMAND)) {
        errors.push(format!(
            ".ci/run does not run the README's test command `{TEST_COMMAND}`"
        ));
    }
    let documented: BTreeSet<&Path> = [root.join("crates"), root.join("bins")]
        .iter()
        .flat_map(|d| meta.packages.iter().filter(move |p| p.dir.starts_with(d)))
        .map(|p| p.dir.as_path())
        .collect();
    for p in meta
        .packages
        .iter()
        .filter(|p| documented.contains(p.dir.as_path()))
    {
        if !arch.contains(&format!("### `{}`", p.name)) {
            errors.push(format!(
                "ARCHITECTURE.md has no section \"### `{}`\" in its code map",
                p.name
            ));
        }
        if !readme.contains(&format!("`{}`", p.name)) {
            errors.push(format!(
                "README.md's crate map does not mention `{}`",
                p.name
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

fn read(root: &Path, rel: &str) -> Result<String> {
    fs::read_to_string(root.join(rel)).with_context(|| format!("reading {rel}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata::load(&crate::project_root()).unwrap()
    }

    #[test]
    fn dependency_layering() {
        check_dependencies(&meta()).unwrap();
    }

    #[test]
    fn source_layering() {
        check_sources(&crate::project_root()).unwrap();
    }

    #[test]
    fn documentation_matches_the_workspace() {
        check_docs(&crate::project_root(), &meta()).unwrap();
    }

    #[test]
    fn a_forbidden_dependency_is_reported() {
        let v = serde_json::json!({ "packages": [
            { "name": "migration-core", "manifest_path": "/r/crates/migration-core/Cargo.toml",
              "dependencies": [ { "name": "tokio", "kind": null } ] },
            { "name": "migration-wire", "manifest_path": "/r/crates/migration-wire/Cargo.toml",
              "dependencies": [ { "name": "ring", "kind": null }, { "name": "quinn", "kind": null } ] },
        ]});
        let m = Metadata::from_json(&v).unwrap();
        let err = format!("{:#}", check_dependencies(&m).unwrap_err());
        assert!(err.contains("migration-core depends on `tokio`"), "{err}");
        assert!(err.contains("migration-wire depends on ring"), "{err}");
        assert!(err.contains("migration-wire depends on `quinn`"), "{err}");
    }

    #[test]
    fn needles_match_whole_path_segments_only() {
        assert!(contains_path("use ring::aead;", "ring::"));
        assert!(contains_path("let k = ::ring::hmac::Key", "ring::"));
        assert!(!contains_path("String::deserialize(d)", "ring::"));
        assert!(contains_path("std::time::Instant::now()", "Instant::now"));
    }

    #[test]
    fn a_forbidden_source_line_is_reported() {
        let dir = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let src = dir.join("crates/migration-core/src");
        fs::create_dir_all(&src).unwrap();
        fs::write(
            src.join("lib.rs"),
            "// Instant::now in a comment is fine\nfn f() { let _ = std::time::Instant::now(); }\n",
        )
        .unwrap();
        let err = format!("{:#}", check_sources(&dir).unwrap_err());
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("crates/migration-core/src/lib.rs:2: `Instant::now`"),
            "{err}"
        );
        assert!(!err.contains("lib.rs:1"), "{err}");
    }
}
