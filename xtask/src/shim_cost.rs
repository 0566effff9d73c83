//! `cargo xtask shim-cost`: what the UDP shims cost against quinn's stock socket, in
//! instructions counted by callgrind, which repeat run after run where wall-clock time on this
//! shared machine moves by ±20%.
//!
//! For each mode (`rtt`, `bulk`) and variant (`stock`, `shims`, `client_shim`, `server_shim`) it
//! runs the release binary `shim_cost` (package migration-benches) under
//! `valgrind --tool=callgrind` with a small and a big count of exchanges, reads the total
//! instruction count from the callgrind output file, and takes
//! `(I(big) - I(small)) / (big - small)`: the cost of one exchange, without the set-up
//! (certificate, TLS handshake, runtime), which both runs share. Prints a table and the ratios
//! against `stock`; `--write-benchmarks` replaces the generated section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

const BEGIN: &str = "<!-- xtask shim-cost: generated section begins -->";
const END: &str = "<!-- xtask shim-cost: generated section ends -->";

/// The variants `shim_cost` knows; `stock` is the baseline of the ratios.
const VARIANTS: [&str; 4] = ["stock", "shims", "client_shim", "server_shim"];

/// The target of the issue: every shim variant within 5% of stock.
const TARGET: f64 = 0.05;

/// One kind of exchange and the two counts it is run with.
#[derive(Debug, Clone, Copy)]
struct Workload {
    mode: &'static str,
    small: u64,
    big: u64,
    /// Payload bytes per exchange (for instructions per byte), if that means something.
    bytes: Option<u64>,
    /// What one operation is, for the table.
    what: &'static str,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        mode: "rtt",
        small: 200,
        big: 1200,
        bytes: None,
        what: "32-byte echo on a fresh stream",
    },
    Workload {
        mode: "bulk",
        small: 20,
        big: 120,
        bytes: Some(256 * 1024),
        what: "256 KiB on a fresh stream, answered with its length",
    },
];

/// The options of `cargo xtask shim-cost`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Put the table into the generated section of BENCHMARKS.md (needs both modes).
    #[arg(long, conflicts_with = "mode")]
    write_benchmarks: bool,
    /// Runs of each (variant, count), 1 to 10: the spread between them shows how repeatable
    /// the count is.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    repeat: u32,
    /// Only this workload: `rtt` (32-byte round trips) or `bulk` (256 KiB transfers).
    #[arg(long, value_parser = ["rtt", "bulk"])]
    mode: Option<String>,
}

/// The per-operation figures of one (mode, variant), one per repeat.
#[derive(Debug, Clone, PartialEq)]
struct Cost {
    mode: &'static str,
    variant: &'static str,
    /// Instructions per operation, one per repeat.
    per_op: Vec<f64>,
    /// Instructions outside the operations (set-up, tear-down), one per repeat.
    setup: Vec<f64>,
}

impl Cost {
    fn mean(&self) -> f64 {
        mean(&self.per_op)
    }

    /// (max - min) / mean of the per-operation figures across repeats.
    fn spread(&self) -> f64 {
        let max = self.per_op.iter().copied().fold(f64::MIN, f64::max);
        let min = self.per_op.iter().copied().fold(f64::MAX, f64::min);
        (max - min) / self.mean()
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    let started = Instant::now();
    let valgrind = valgrind_version()?;
    println!("shim-cost: building shim_cost (release)...");
    let status = Command::new(crate::cargo())
        .args([
            "build",
            "--release",
            "-p",
            "migration-benches",
            "--bin",
            "shim_cost",
        ])
        .current_dir(root)
        .status()
        .context("starting cargo build")?;
    if !status.success() {
        bail!("building shim_cost failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("shim_cost");
    let out_dir = target.join("shim-cost");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut costs = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(|w| opts.mode.as_deref().is_none_or(|m| m == w.mode))
    {
        for variant in VARIANTS {
            let mut cost = Cost {
                mode: w.mode,
                variant,
                per_op: Vec::new(),
                setup: Vec::new(),
            };
            for rep in 1..=opts.repeat {
                let count_at = |count| -> Result<u64> {
                    let file = out_dir.join(format!("{}-{variant}-{count}.callgrind", w.mode));
                    let t = Instant::now();
                    let instr = callgrind(&bin, variant, w.mode, count, &file)?;
                    println!(
                        "shim-cost: {:<4} {variant:<11} x{count:<5} run {rep}/{}: {} instructions \
                         ({:.1} s)",
                        w.mode,
                        opts.repeat,
                        thousands(instr),
                        t.elapsed().as_secs_f64()
                    );
                    Ok(instr)
                };
                let small = count_at(w.small)?;
                let big = count_at(w.big)?;
                let op = per_op((w.small, small), (w.big, big))?;
                cost.per_op.push(op);
                cost.setup.push(setup(w.small, small, op));
            }
            costs.push(cost);
        }
    }
    let section = render(&costs, &crate::bench::machine(), &valgrind, opts.repeat);
    print!("{section}");
    if opts.write_benchmarks {
        let path = root.join("BENCHMARKS.md");
        let old = fs::read_to_string(&path).unwrap_or_default();
        let body = section
            .trim()
            .trim_start_matches(BEGIN)
            .trim_end_matches(END)
            .trim();
        fs::write(&path, crate::bench::splice_between(&old, BEGIN, END, body))
            .context("writing BENCHMARKS.md")?;
        println!("shim-cost: wrote {}", path.display());
    }
    println!(
        "shim-cost: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `valgrind --version`, or a clear error when valgrind is missing.
fn valgrind_version() -> Result<String> {
    match Command::new("valgrind").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Ok(out) => bail!(
            "`valgrind --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "valgrind is not installed: shim-cost counts instructions with \
             `valgrind --tool=callgrind` (Debian: `apt-get install valgrind`)"
        ),
        Err(e) => Err(e).context("starting valgrind"),
    }
}

/// Runs `shim_cost` once under callgrind and returns its total instruction count.
fn callgrind(bin: &Path, variant: &str, mode: &str, count: u64, file: &Path) -> Result<u64> {
    let _ = fs::remove_file(file);
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--quiet")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(bin)
        .args(["--variant", variant, "--mode", mode, "--count"])
        .arg(count.to_string())
        .output()
        .context("starting valgrind")?;
    if !out.status.success() {
        bail!(
            "shim_cost --variant {variant} --mode {mode} --count {count} under callgrind failed \
             ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    total_instructions(&text).with_context(|| format!("in {}", file.display()))
}

/// The total of event `Ir` (instructions executed) in a callgrind output file: its `totals:`
/// line, else its `summary:` line, read in the column that the `events:` line gives `Ir`.
fn total_instructions(text: &str) -> Result<u64> {
    let field = |key: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(key))
            .map(str::split_whitespace)
    };
    let column = match field("events:") {
        Some(mut names) => names
            .position(|n| n == "Ir")
            .context("the events: line has no Ir (instructions) event")?,
        None => bail!("no events: line: not a callgrind output file"),
    };
    let mut values = field("totals:")
        .or_else(|| field("summary:"))
        .context("no totals: or summary: line (did callgrind finish?)")?;
    let value = values
        .nth(column)
        .context("the totals/summary line has no Ir column")?;
    value
        .parse()
        .with_context(|| format!("instruction count `{value}` is not a number"))
}

/// Instructions per operation from two runs `(count, instructions)`: the set-up, the same in
/// both, cancels out.
fn per_op(small: (u64, u64), big: (u64, u64)) -> Result<f64> {
    if big.0 <= small.0 {
        bail!(
            "the big count ({}) must exceed the small one ({})",
            big.0,
            small.0
        );
    }
    let instructions = i128::from(big.1) - i128::from(small.1);
    Ok(instructions as f64 / (big.0 - small.0) as f64)
}

/// Instructions outside the operations, from the small run.
fn setup(count: u64, instructions: u64, per_op: f64) -> f64 {
    instructions as f64 - count as f64 * per_op
}

/// 1234567 as "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut s = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            s.push(',');
        }
        s.push(c);
    }
    s
}

fn render(costs: &[Cost], machine: &str, valgrind: &str, repeat: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(s, "Machine: {machine}, {valgrind}\n");
    let _ = writeln!(
        s,
        "Instructions per operation (callgrind `Ir`, user space only), `(I(big) - I(small)) / \
         (big - small)`, mean of {repeat} run(s); spread = (max - min) / mean across runs."
    );
    for w in &WORKLOADS {
        let rows: Vec<&Cost> = costs.iter().filter(|c| c.mode == w.mode).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "\n`{}` ({}; counts {} and {}):\n",
            w.mode, w.what, w.small, w.big
        );
        let _ = writeln!(
            s,
            "| variant | instructions per op | per byte | spread | set-up | vs stock |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let stock = rows.iter().find(|c| c.variant == "stock").map(|c| c.mean());
        for c in &rows {
            let per_byte = w
                .bytes
                .map(|b| format!("{:.2}", c.mean() / b as f64))
                .unwrap_or_else(|| "-".to_owned());
            let ratio = stock
                .map(|base| format!("{:.3}", c.mean() / base))
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2}% | {} | {} |",
                c.variant,
                thousands(c.mean().round().max(0.0) as u64),
                per_byte,
                c.spread() * 100.0,
                thousands(mean(&c.setup).round().max(0.0) as u64),
                ratio
            );
        }
    }
    let mut verdicts = String::new();
    for c in costs.iter().filter(|c| c.variant != "stock") {
        let Some(base) = costs
            .iter()
            .find(|b| b.mode == c.mode && b.variant == "stock")
        else {
            continue;
        };
        let change = c.mean() / base.mean() - 1.0;
        let noise = c.spread().max(base.spread());
        // Cheaper than stock is within the target too.
        let verdict = if change + noise <= TARGET {
            "within 5%"
        } else if change - noise > TARGET {
            "outside 5%"
        } else {
            "undecided (spread too large)"
        };
        let _ = writeln!(
            verdicts,
            "- `{}` `{}`: {:+.1}% instructions per op vs `stock` (spread {:.2}%): {verdict}",
            c.mode,
            c.variant,
            change * 100.0,
            noise * 100.0
        );
    }
    if !verdicts.is_empty() {
        let _ = writeln!(s, "\nAgainst the 5% target (same run):\n\n{verdicts}");
    }
    let _ = writeln!(s, "{END}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLGRIND: &str = "\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 7898
cmd:  target/release/shim_cost --variant stock --mode rtt --count 200
part: 1

desc: I1 cache: 
positions: line
events: Ir
summary: 21919868

ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) 0x0000000000027200
0 7

totals: 21919868
";

    fn cost(mode: &'static str, variant: &'static str, per_op: &[f64]) -> Cost {
        Cost {
            mode,
            variant,
            per_op: per_op.to_vec(),
            setup: vec![1e7; per_op.len()],
        }
    }

    #[test]
    fn the_total_is_read_from_a_callgrind_file() {
        assert_eq!(total_instructions(CALLGRIND).unwrap(), 21_919_868);
    }

    #[test]
    fn summary_serves_when_totals_is_missing_and_the_ir_column_is_found() {
        let text = "events: Dr Ir Dw\nsummary: 5 123 7\n";
        assert_eq!(total_instructions(text).unwrap(), 123);
        let both = "events: Ir\nsummary: 1\nfn=(1) x\n0 1\ntotals: 2\n";
        assert_eq!(total_instructions(both).unwrap(), 2, "totals wins");
    }

    #[test]
    fn bad_callgrind_files_are_errors() {
        let no_total = CALLGRIND
            .lines()
            .filter(|l| !l.starts_with("summary:") && !l.starts_with("totals:"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = total_instructions(&no_total).unwrap_err().to_string();
        assert!(e.contains("no totals: or summary:"), "{e}");
        let e = total_instructions("summary: 12\n").unwrap_err().to_string();
        assert!(e.contains("no events:"), "{e}");
        let e = total_instructions("events: Dr\nsummary: 12\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Ir"), "{e}");
        let e = total_instructions("events: Ir\ntotals: 12x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
        let e = total_instructions("events: Dr Ir\ntotals: 12\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Ir column"), "{e}");
    }

    #[test]
    fn per_op_cancels_the_setup() {
        // 1,000,000 of set-up and 500 per operation.
        let small = (200, 1_000_000 + 200 * 500);
        let big = (1200, 1_000_000 + 1200 * 500);
        let op = per_op(small, big).unwrap();
        assert_eq!(op, 500.0);
        assert_eq!(setup(200, small.1, op), 1_000_000.0);
        // A big run cheaper than the small one (noise) gives a negative figure, not a wrap.
        assert_eq!(per_op((1, 100), (3, 90)).unwrap(), -5.0);
        assert!(per_op((10, 1), (10, 2)).is_err());
        assert!(per_op((10, 1), (5, 2)).is_err());
    }

    #[test]
    fn spread_and_mean() {
        let c = cost("rtt", "stock", &[990.0, 1010.0]);
        assert_eq!(c.mean(), 1000.0);
        assert!((c.spread() - 0.02).abs() < 1e-12);
        assert_eq!(cost("rtt", "stock", &[7.0]).spread(), 0.0);
    }

    #[test]
    fn render_gives_ratios_and_verdicts_against_stock() {
        let costs = [
            cost("rtt", "stock", &[70_000.0, 70_000.0]),
            cost("rtt", "shims", &[72_100.0, 72_100.0]),
            cost("rtt", "client_shim", &[77_000.0, 77_000.0]),
            cost("rtt", "server_shim", &[72_000.0, 75_000.0]),
            cost("bulk", "stock", &[2_621_440.0]),
        ];
        let s = render(&costs, "test machine", "valgrind-3.19.0", 2);
        assert!(s.starts_with(BEGIN) && s.trim_end().ends_with(END), "{s}");
        assert!(
            s.contains("| shims | 72,100 | - | 0.00% | 10,000,000 | 1.030 |"),
            "{s}"
        );
        assert!(s.contains("| stock | 2,621,440 | 10.00 | 0.00% |"), "{s}");
        assert!(s.contains("`rtt` `shims`: +3.0% "), "{s}");
        assert!(
            s.contains(
                "`rtt` `shims`: +3.0% instructions per op vs `stock` (spread 0.00%): within 5%"
            ),
            "{s}"
        );
        assert!(s.contains("`rtt` `client_shim`: +10.0% instructions per op vs `stock` (spread 0.00%): outside 5%"), "{s}");
        assert!(s.contains("`rtt` `server_shim`: +5.0%"), "{s}");
        assert!(s.contains("undecided"), "{s}");
    }

    #[test]
    fn the_section_replaces_only_its_markers() {
        let old = format!("# B\n\nprose\n\n{BEGIN}\nold\n{END}\n\nmore\n");
        let new = crate::bench::splice_between(&old, BEGIN, END, "new table");
        assert_eq!(
            new,
            format!("# B\n\nprose\n\n{BEGIN}\nnew table\n{END}\n\nmore\n")
        );
    }

    fn options(args: &str) -> Result<Options, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            o: Options,
        }
        <Cli as clap::Parser>::try_parse_from(
            std::iter::once("shim-cost").chain(args.split_whitespace()),
        )
        .map(|c| c.o)
    }

    #[test]
    fn options_parse() {
        let o = options("--repeat 3 --mode bulk").unwrap();
        assert_eq!(
            (o.repeat, o.mode.as_deref(), o.write_benchmarks),
            (3, Some("bulk"), false)
        );
        let o = options("").unwrap();
        assert_eq!((o.repeat, o.mode, o.write_benchmarks), (2, None, false));
        assert!(options("--write-benchmarks").unwrap().write_benchmarks);
        for bad in [
            "--repeat 0",
            "--repeat 11",
            "--repeat",
            "--mode ping",
            "--bogus",
            "--write-benchmarks --mode rtt",
        ] {
            let err = options(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(21_919_868), "21,919,868");
    }
}
