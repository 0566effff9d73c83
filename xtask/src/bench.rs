//! `cargo xtask bench`: run the criterion benches and write their medians into BENCHMARKS.md.
//!
//! Criterion leaves `target/criterion/<group>/<function>[/<value>]/new/{benchmark,estimates}.json`.
//! This reads the ones written by this run and replaces the generated section of BENCHMARKS.md
//! (between the two markers below), leaving the hand-written text around it alone.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

const BEGIN: &str = "<!-- xtask bench: generated section begins -->";
const END: &str = "<!-- xtask bench: generated section ends -->";

#[derive(Debug)]
struct Row {
    group: String,
    function: String,
    value: Option<String>,
    bytes: Option<u64>,
    median_ns: f64,
    low_ns: f64,
    high_ns: f64,
}

pub(crate) fn run(root: &Path, filter: &[String]) -> Result<()> {
    let started = SystemTime::now();
    println!("xtask bench: running criterion (this takes several minutes)...");
    let status = Command::new(crate::cargo())
        .args(["bench", "--package", "migration-benches", "--"])
        .args(filter)
        .current_dir(root)
        .status()
        .context("could not start cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let rows = collect(&target.join("criterion"), started)?;
    if rows.is_empty() {
        bail!("criterion wrote no results (filter {filter:?} matched nothing?)");
    }
    let section = render(&rows, &machine());
    print!("{section}");
    let path = root.join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, splice(&old, &section)).context("writing BENCHMARKS.md")?;
    println!("xtask bench: wrote {}", path.display());
    Ok(())
}

/// Every `new/benchmark.json` under `dir` written after `since`.
fn collect(dir: &Path, since: SystemTime) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let bench = path.join("benchmark.json");
                let fresh = fs::metadata(&bench)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since);
                if fresh {
                    rows.push(read_row(&path)?);
                }
            } else {
                stack.push(path);
            }
        }
    }
    rows.sort_by(|a, b| {
        (&a.group, a.bytes, &a.function, &a.value).cmp(&(&b.group, b.bytes, &b.function, &b.value))
    });
    Ok(rows)
}

fn read_row(dir: &Path) -> Result<Row> {
    let load = |name: &str| -> Result<serde_json::Value> {
        let p = dir.join(name);
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let b = load("benchmark.json")?;
    let e = load("estimates.json")?;
    let median = &e["median"];
    Ok(Row {
        group: b["group_id"].as_str().unwrap_or("?").to_owned(),
        function: b["function_id"].as_str().unwrap_or("").to_owned(),
        value: b["value_str"].as_str().map(str::to_owned),
        bytes: b["throughput"]["Bytes"]
            .as_u64()
            .or_else(|| b["throughput"]["BytesDecimal"].as_u64()),
        median_ns: median["point_estimate"].as_f64().context("no median")?,
        low_ns: median["confidence_interval"]["lower_bound"]
            .as_f64()
            .unwrap_or(f64::NAN),
        high_ns: median["confidence_interval"]["upper_bound"]
            .as_f64()
            .unwrap_or(f64::NAN),
    })
}

fn human_time(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn rate(bytes: u64, ns: f64) -> f64 {
    bytes as f64 / (ns / 1e9) / (1024.0 * 1024.0)
}

fn render(rows: &[Row], machine: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(s, "Machine: {machine}\n");
    let _ = writeln!(
        s,
        "| group | benchmark | input | median | median 95% CI | throughput (MiB/s) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in rows {
        let thr = r
            .bytes
            .map(|b| format!("{:.0}", rate(b, r.median_ns)))
            .unwrap_or_else(|| "-".to_owned());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} – {} | {} |",
            r.group,
            r.function,
            r.value.as_deref().unwrap_or("-"),
            human_time(r.median_ns),
            human_time(r.low_ns),
            human_time(r.high_ns),
            thr
        );
    }
    // Ratios within one group and input: each benchmark against the group's `full` one.
    let mut ratios = String::new();
    for full in rows.iter().filter(|r| r.function == "full") {
        let stages: Vec<&Row> = rows
            .iter()
            .filter(|r| r.group == full.group && r.value == full.value && r.function != "full")
            .collect();
        if let Some(slowest) = stages
            .iter()
            .max_by(|a, b| a.median_ns.total_cmp(&b.median_ns))
        {
            let _ = writeln!(
                ratios,
                "- `{}` {}: full pipeline {} vs slowest stage alone (`{}`) {}: ratio {:.2}",
                full.group,
                full.value.as_deref().unwrap_or(""),
                human_time(full.median_ns),
                slowest.function,
                human_time(slowest.median_ns),
                full.median_ns / slowest.median_ns
            );
        }
    }
    // Alternatives against a `stock` baseline in the same group and input (time ratio: below
    // 1.0 is faster than stock).
    for base in rows.iter().filter(|r| r.function == "stock") {
        for r in rows
            .iter()
            .filter(|r| r.group == base.group && r.value == base.value && r.function != "stock")
        {
            let _ = writeln!(
                ratios,
                "- `{}` {}: `{}` {} vs `stock` {}: time ratio {:.2}",
                r.group,
                r.value.as_deref().unwrap_or(""),
                r.function,
                human_time(r.median_ns),
                human_time(base.median_ns),
                r.median_ns / base.median_ns
            );
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(s, "\nRatios (same run):\n\n{ratios}");
    }
    let _ = writeln!(s, "{END}");
    s
}

fn splice(old: &str, section: &str) -> String {
    splice_between(
        old,
        BEGIN,
        END,
        section
            .trim_start_matches(BEGIN)
            .trim_end()
            .trim_end_matches(END)
            .trim(),
    )
}

/// Replaces the text between the markers `begin` and `end` in `old` with `body` (adding the
/// markers at the end of `old` when it has none), leaving the rest alone.
pub(crate) fn splice_between(old: &str, begin: &str, end: &str, body: &str) -> String {
    let section = format!("{begin}\n{}\n{end}\n", body.trim());
    match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => {
            let rest = old[e + end.len()..].trim_start_matches('\n');
            let sep = if rest.is_empty() { "" } else { "\n" };
            format!("{}{section}{sep}{rest}", &old[..b])
        }
        _ if old.is_empty() => format!("# Benchmarks\n\n{section}"),
        _ => format!("{}\n\n{section}", old.trim_end()),
    }
}

pub(crate) fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "?".to_owned())
    };
    format!(
        "{cpu}, {cores} cores, kernel {}, {}, measured {}",
        run("uname", &["-r"]),
        run("rustc", &["--version"]),
        run("date", &["-u", "+%Y-%m-%d"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(function: &str, ns: f64) -> Row {
        Row {
            group: "pipeline".into(),
            function: function.into(),
            value: Some("64MiB".into()),
            bytes: Some(64 << 20),
            median_ns: ns,
            low_ns: ns * 0.9,
            high_ns: ns * 1.1,
        }
    }

    #[test]
    fn render_reports_throughput_and_the_pipeline_ratio() {
        let rows = [row("full", 2e8), row("seal", 1e8), row("compress", 1.6e8)];
        let s = render(&rows, "test machine");
        assert!(s.contains("| pipeline | full | 64MiB | 200.00 ms |"), "{s}");
        assert!(s.contains("| 320 |"), "64 MiB in 200 ms is 320 MiB/s: {s}");
        assert!(
            s.contains("slowest stage alone (`compress`) 160.00 ms: ratio 1.25"),
            "{s}"
        );
    }

    #[test]
    fn alternatives_are_compared_with_stock() {
        let mut stock = row("stock", 1e7);
        stock.group = "shim_bulk".into();
        let mut shims = row("shims", 1.1e7);
        shims.group = "shim_bulk".into();
        let s = render(&[stock, shims], "m");
        assert!(
            s.contains("`shims` 11.00 ms vs `stock` 10.00 ms: time ratio 1.10"),
            "{s}"
        );
    }

    #[test]
    fn splice_replaces_only_the_generated_section() {
        let old = format!("# B\n\nprose\n\n{BEGIN}\nold table\n{END}\n\nmore prose\n");
        let new = splice(&old, &format!("{BEGIN}\nnew\n{END}\n"));
        assert_eq!(
            new,
            format!("# B\n\nprose\n\n{BEGIN}\nnew\n{END}\n\nmore prose\n")
        );
        let appended = splice("# B\nprose\n", &format!("{BEGIN}\nx\n{END}\n"));
        assert!(appended.starts_with("# B\nprose\n\n"));
        assert!(appended.contains("x"));
    }
}
