//! Checks that keep the layers apart and the documents in step with the code.
//!
//! They read `cargo metadata` (the workspace's manifests and the resolved dependency graph),
//! `cargo tree` (the wrapper libraries without their demo feature) and the source tree; nothing
//! is compiled. Each check is also a `#[test]`, so `cargo test`
//! enforces them without xtask.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Libraries that must not open sockets, spawn runtimes or depend on the QUIC stack.
const PROTOCOL_FREE: &[&str] = &[
    "migration-core",
    "migration-crypto",
    "wire-frame",
    "migration-wire",
    "control-protocol",
    "demo-echo",
];

/// Crates that bring sockets, runtimes or the QUIC stack.
const IO_CRATES: &[&str] = &["quinn", "quinn-udp", "tokio", "socket2", "mio", "nix"];

/// What migration-core may depend on: nothing that does I/O.
const CORE_ALLOWED: &[&str] = &["serde", "thiserror"];

/// Codecs that frame their messages and must stay light: their normal dependency tree holds no
/// compression, no cryptography, and not the crates that bring those.
const LIGHT_CODECS: &[&str] = &["control-protocol", "demo-echo"];

/// What a light codec must not pull in, directly or transitively.
const HEAVY: &[&str] = &[
    "zstd",
    "zstd-safe",
    "zstd-sys",
    "flate2",
    "ring",
    "migration-crypto",
    "migration-wire",
];

/// The two wrappers: neither may depend on the other, not even for tests.
const WRAPPERS: [&str; 2] = ["swrapper", "cwrapper"];

/// What only the wrappers' demo binaries need: an application that embeds a wrapper library
/// without its `demo` feature must not get it (README, "Use it in your own app").
const DEMO_ONLY: &[&str] = &["clap", "anyhow", "tracing-subscriber", "demo-echo", "rcgen"];

/// The test command that README.md documents and `.ci/run` runs.
pub(crate) const TEST_COMMAND: &str = "cargo xtask ci";

pub(crate) fn run_all(root: &Path) -> Result<()> {
    let meta = Metadata::load(root)?;
    let mut failures = Vec::new();
    for (name, check) in [
        ("dependency layering", check_dependencies(&meta)),
        ("dependency tree layering", check_dependency_tree(&meta)),
        ("source layering", check_sources(root)),
        ("documentation", check_docs(root, &meta)),
        ("lean libraries", check_lean_libraries(root)),
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
    /// The workspace's packages.
    packages: Vec<Package>,
    /// The resolved graph over every package, workspace or not.
    graph: Graph,
}

/// `cargo metadata`'s `resolve`: package ids, their names, and the edges with their kinds.
#[derive(Debug, Default)]
struct Graph {
    /// Package id -> name.
    names: HashMap<String, String>,
    /// Package id -> (dependency id, kinds: "normal" | "dev" | "build").
    edges: HashMap<String, Vec<(String, Vec<String>)>>,
}

impl Graph {
    fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut g = Graph::default();
        for p in v["packages"].as_array().into_iter().flatten() {
            let (Some(id), Some(name)) = (p["id"].as_str(), p["name"].as_str()) else {
                continue;
            };
            g.names.insert(id.to_owned(), name.to_owned());
        }
        for n in v["resolve"]["nodes"].as_array().into_iter().flatten() {
            let id = n["id"].as_str().context("resolve node without id")?;
            let mut deps = Vec::new();
            for d in n["deps"].as_array().into_iter().flatten() {
                let pkg = d["pkg"].as_str().context("resolve dep without pkg")?;
                let kinds = d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| k["kind"].as_str().unwrap_or("normal").to_owned())
                    .collect();
                deps.push((pkg.to_owned(), kinds));
            }
            g.edges.insert(id.to_owned(), deps);
        }
        Ok(g)
    }

    fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.names.get(id).map_or(id, String::as_str)
    }

    /// The ids of the packages called `name`.
    fn ids(&self, name: &str) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .names
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(id, _)| id.as_str())
            .collect();
        ids.sort();
        ids
    }

    /// Every package reachable from `start`, with the chain of names that reaches it. The first
    /// edge may be of any kind in `first`; the edges after it are normal or build edges (what
    /// building a dependency compiles).
    fn reachable(&self, start: &str, first: &[&str]) -> Vec<(String, Vec<String>)> {
        let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
        let mut queue: VecDeque<(&str, Vec<String>)> = VecDeque::new();
        queue.push_back((start, vec![self.name(start).to_owned()]));
        while let Some((id, chain)) = queue.pop_front() {
            let allowed: &[&str] = if id == start {
                first
            } else {
                &["normal", "build"]
            };
            for (dep, kinds) in self.edges.get(id).into_iter().flatten() {
                if !kinds.iter().any(|k| allowed.contains(&k.as_str())) {
                    continue;
                }
                if dep == start || seen.contains_key(dep.as_str()) {
                    continue;
                }
                let mut next = chain.clone();
                next.push(self.name(dep).to_owned());
                seen.insert(dep, next.clone());
                queue.push_back((dep, next));
            }
        }
        let mut out: Vec<(String, Vec<String>)> = seen
            .into_iter()
            .map(|(id, chain)| (self.name(id).to_owned(), chain))
            .collect();
        out.sort();
        out
    }
}

impl Metadata {
    fn load(root: &Path) -> Result<Self> {
        let out = Command::new(crate::cargo())
            .args(["metadata", "--format-version", "1"])
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
        // Full metadata lists every package of the graph; the workspace's are the members.
        // Without `workspace_members` (a hand-written test input), every package is one.
        let members: Option<BTreeSet<&str>> = v["workspace_members"]
            .as_array()
            .map(|m| m.iter().filter_map(|id| id.as_str()).collect());
        let mut packages = Vec::new();
        for p in v["packages"]
            .as_array()
            .context("no packages in metadata")?
            .iter()
            .filter(|p| {
                members
                    .as_ref()
                    .is_none_or(|m| p["id"].as_str().is_some_and(|id| m.contains(id)))
            })
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
        Ok(Self {
            packages,
            graph: Graph::from_json(v)?,
        })
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

/// The layering that only the resolved graph shows: (a) the light codecs pull in no
/// compression or cryptography, not even through another crate; (b) neither wrapper depends
/// on the other, through any kind of dependency (dev-dependencies included).
fn check_dependency_tree(meta: &Metadata) -> Result<()> {
    let g = &meta.graph;
    let mut errors = Vec::new();
    for codec in LIGHT_CODECS {
        let ids = g.ids(codec);
        if ids.is_empty() {
            errors.push(format!("{codec} is not in the dependency graph"));
        }
        for id in ids {
            for (name, chain) in g.reachable(id, &["normal"]) {
                if HEAVY.contains(&name.as_str()) {
                    errors.push(format!(
                        "{codec}'s dependency tree holds `{name}` ({}); it frames with wire-frame \
                         and needs no compression or cryptography",
                        chain.join(" -> ")
                    ));
                }
            }
        }
    }
    for (w, other) in [(WRAPPERS[0], WRAPPERS[1]), (WRAPPERS[1], WRAPPERS[0])] {
        for id in g.ids(w) {
            for (name, chain) in g.reachable(id, &["normal", "dev", "build"]) {
                if name == other {
                    errors.push(format!(
                        "{w} depends on {other} ({}); tests that run both wrappers belong in \
                         tests/ (integration-tests)",
                        chain.join(" -> ")
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

/// The wrapper libraries without their default features pull in nothing of [`DEMO_ONLY`]
/// (the resolved tree of that build: `cargo tree --no-default-features -e normal`).
fn check_lean_libraries(root: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for w in WRAPPERS {
        let out = Command::new(crate::cargo())
            .args(["tree", "-p", w, "--no-default-features", "-e", "normal"])
            .args(["--prefix", "none", "--format", "{p}"])
            .current_dir(root)
            .output()
            .context("running cargo tree")?;
        if !out.status.success() {
            bail!(
                "cargo tree failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        errors.extend(lean_errors(w, &String::from_utf8_lossy(&out.stdout)));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// What of [`DEMO_ONLY`] a `cargo tree --prefix none --format {p}` listing of `library` holds.
fn lean_errors(library: &str, tree: &str) -> Vec<String> {
    let found: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| DEMO_ONLY.contains(name))
        .collect();
    found
        .into_iter()
        .map(|name| {
            format!(
                "{library} without its `demo` feature depends on `{name}`, which only the demo \
                 binary needs: make it optional, behind `demo`"
            )
        })
        .collect()
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
                "crates/wire-frame",
                "crates/migration-wire",
                "crates/control-protocol",
                "crates/demo-echo",
            ],
            "ring::",
            "only migration-crypto touches ring",
        ),
        (
            vec![
                "crates/migration-core",
                "crates/migration-crypto",
                "crates/wire-frame",
                "crates/migration-wire",
                "crates/control-protocol",
                "crates/demo-echo",
            ],
            "UdpSocket",
            "only the shims touch sockets",
        ),
        (
            vec![
                "crates/admin-api",
                "bins/control",
                "bins/swrapper",
                "bins/cwrapper",
            ],
            "serde_json::Value",
            "contracts between processes are admin-api types, not free-form JSON",
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
    fn dependency_tree_layering() {
        check_dependency_tree(&meta()).unwrap();
    }

    #[test]
    fn the_wrapper_libraries_are_lean_without_demo() {
        check_lean_libraries(&crate::project_root()).unwrap();
    }

    #[test]
    fn a_demo_dependency_in_a_lean_library_is_reported() {
        let tree = "swrapper v0.1.0 (/r/bins/swrapper)\nquinn v0.11.12\nclap v4.6.7\n\
                    clap_builder v4.6.7\nclap v4.6.7 (*)\n";
        let errors = lean_errors("swrapper", tree);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("swrapper without its `demo` feature depends on `clap`"));
        assert!(lean_errors("swrapper", "swrapper v0.1.0\nquinn v0.11.12\n").is_empty());
    }

    /// Full `cargo metadata` for a graph given as (from, to, kind) edges; kind `None` is
    /// normal. Every named package is a workspace member.
    fn graph(edges: &[(&str, &str, Option<&str>)]) -> Metadata {
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for (a, b, _) in edges {
            names.insert(a);
            names.insert(b);
        }
        let id = |n: &str| format!("path+file:///r/{n}#0.1.0");
        let packages: Vec<_> = names
            .iter()
            .map(|n| {
                serde_json::json!({ "name": n, "id": id(n),
                    "manifest_path": format!("/r/crates/{n}/Cargo.toml"), "dependencies": [] })
            })
            .collect();
        let nodes: Vec<_> = names
            .iter()
            .map(|n| {
                let deps: Vec<_> = edges
                    .iter()
                    .filter(|(a, _, _)| a == n)
                    .map(|(_, b, k)| {
                        serde_json::json!({ "name": b, "pkg": id(b),
                            "dep_kinds": [ { "kind": k, "target": null } ] })
                    })
                    .collect();
                serde_json::json!({ "id": id(n), "deps": deps })
            })
            .collect();
        let members: Vec<_> = names.iter().map(|n| id(n)).collect();
        Metadata::from_json(&serde_json::json!({
            "packages": packages, "workspace_members": members, "resolve": { "nodes": nodes },
        }))
        .unwrap()
    }

    /// The edges of a tree that keeps the layering.
    const GOOD: &[(&str, &str, Option<&str>)] = &[
        ("control-protocol", "wire-frame", None),
        ("control-protocol", "migration-core", None),
        ("demo-echo", "wire-frame", None),
        ("migration-wire", "wire-frame", None),
        ("migration-wire", "zstd", None),
        ("migration-wire", "migration-crypto", None),
        ("migration-crypto", "ring", None),
        // A dev-dependency of a codec may be heavy: it is not in the normal tree.
        ("control-protocol", "migration-wire", Some("dev")),
        ("swrapper", "control-protocol", None),
        ("cwrapper", "control-protocol", None),
        ("integration-tests", "swrapper", Some("dev")),
        ("integration-tests", "cwrapper", Some("dev")),
    ];

    #[test]
    fn a_good_tree_passes() {
        check_dependency_tree(&graph(GOOD)).unwrap();
    }

    #[test]
    fn a_codec_that_pulls_in_compression_fails() {
        let mut edges = GOOD.to_vec();
        edges.push(("wire-frame", "flate2", None));
        edges.push(("demo-echo", "migration-wire", None));
        let err = format!("{:#}", check_dependency_tree(&graph(&edges)).unwrap_err());
        assert!(
            err.contains("control-protocol's dependency tree holds `flate2` (control-protocol -> wire-frame -> flate2)"),
            "{err}"
        );
        assert!(
            err.contains(
                "demo-echo's dependency tree holds `migration-wire` (demo-echo -> migration-wire)"
            ),
            "{err}"
        );
        assert!(
            err.contains("demo-echo's dependency tree holds `ring` (demo-echo -> migration-wire -> migration-crypto -> ring)"),
            "{err}"
        );
        assert!(err.contains("holds `zstd`"), "{err}");
    }

    #[test]
    fn a_wrapper_that_dev_depends_on_the_other_fails() {
        let mut edges = GOOD.to_vec();
        edges.push(("swrapper", "cwrapper", Some("dev")));
        let err = format!("{:#}", check_dependency_tree(&graph(&edges)).unwrap_err());
        assert!(
            err.contains("swrapper depends on cwrapper (swrapper -> cwrapper)"),
            "{err}"
        );
        assert!(!err.contains("cwrapper depends on swrapper"), "{err}");
        // Through another crate, by a normal edge, too.
        let mut edges = GOOD.to_vec();
        edges.push(("cwrapper", "helper", None));
        edges.push(("helper", "swrapper", None));
        let err = format!("{:#}", check_dependency_tree(&graph(&edges)).unwrap_err());
        assert!(
            err.contains("cwrapper depends on swrapper (cwrapper -> helper -> swrapper)"),
            "{err}"
        );
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
