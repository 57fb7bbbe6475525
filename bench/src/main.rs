//! twill-bench: twill measured side by side with its references (the stock CNI plugins, the
//! kernel tools' batch mode, the underlay itself) in lab namespaces on this machine.
//!
//! `twill-bench <scenario>|all [--quick] [--out DIR]` writes `<scenario>.json` and `.md` per
//! scenario, `summary.json` / `summary.md` for `all`, and SVG charts of the CNI latencies.

mod backends;
mod cni;
mod coldstart;
mod common;
mod convergence;
mod datapath;
mod dualstack;
mod etcd;
mod etcd_load;
mod faults;
mod footprint;
mod kube;
mod nl;
mod polgen;
mod policy;
mod refns;
mod report;
mod stats;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::common::Ctx;
use crate::report::{Machine, ScenarioResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Cni,
    Convergence,
    Coldstart,
    Footprint,
    Datapath,
    Backends,
    Etcd,
    Faults,
    Netpol,
    Kube,
    Dualstack,
    All,
}

const ALL: [Scenario; 11] = [
    Scenario::Cni,
    Scenario::Convergence,
    Scenario::Coldstart,
    Scenario::Footprint,
    Scenario::Datapath,
    Scenario::Backends,
    Scenario::Etcd,
    Scenario::Faults,
    Scenario::Netpol,
    Scenario::Kube,
    Scenario::Dualstack,
];

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Cni => "cni",
            Scenario::Convergence => "convergence",
            Scenario::Coldstart => "coldstart",
            Scenario::Footprint => "footprint",
            Scenario::Datapath => "datapath",
            Scenario::Backends => "backends",
            Scenario::Etcd => "etcd",
            Scenario::Faults => "faults",
            Scenario::Netpol => "netpol",
            Scenario::Kube => "kube",
            Scenario::Dualstack => "dualstack",
            Scenario::All => "all",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "twill-bench",
    about = "Benchmarks twill against its references in lab namespaces (run as root)"
)]
struct Cli {
    /// Which scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Tiny configuration that only proves the bench works (CI).
    #[arg(long)]
    quick: bool,
    /// Output directory for the JSON, Markdown and SVG files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Directory holding twilld and twill; default: the directory of this binary (so a release
    /// build of twill-bench uses release daemons).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("twill-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Ok(false) when a scenario failed (its partial results are still written).
fn run(cli: Cli) -> Result<bool> {
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("binary has no directory"))?
            .to_path_buf(),
    };
    let ctx = Ctx {
        quick: cli.quick,
        bin_dir,
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("mkdir {}", cli.out.display()))?;
    twill_tests::cleanup_stale(twill_tests::lab::PREFIX_ROOT)?;
    let machine = Machine::probe();
    let command: Vec<String> = std::env::args().collect();
    let scenarios: Vec<Scenario> = if cli.scenario == Scenario::All {
        ALL.to_vec()
    } else {
        vec![cli.scenario]
    };
    let mut results = Vec::new();
    for s in scenarios {
        eprintln!("twill-bench: {} ...", s.name());
        let r = run_one(&ctx, s, &cli.out);
        match &r.error {
            None => eprintln!("twill-bench: {} done in {:.0} s", s.name(), r.seconds),
            Some(e) => eprintln!("twill-bench: {} FAILED: {e}", s.name()),
        }
        let doc = json!({"machine": machine, "command": command, "result": r});
        report::write(
            &cli.out.join(format!("{}.json", s.name())),
            &serde_json::to_string_pretty(&doc)?,
        )?;
        report::write(
            &cli.out.join(format!("{}.md", s.name())),
            &report::markdown(&r),
        )?;
        results.push(r);
    }
    let ok = results.iter().all(|r| r.error.is_none());
    if cli.scenario != Scenario::All {
        return Ok(ok);
    }
    let summary = json!({"machine": machine, "command": command, "quick": cli.quick,
                         "scenarios": results});
    report::write(
        &cli.out.join("summary.json"),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    report::write(
        &cli.out.join("summary.md"),
        &summary_md(&machine, &command, &results),
    )?;
    Ok(ok)
}

fn run_one(ctx: &Ctx, s: Scenario, out: &Path) -> ScenarioResult {
    let mut r = ScenarioResult {
        scenario: s.name().into(),
        quick: ctx.quick,
        seconds: 0.0,
        config: json!({}),
        metrics: Vec::new(),
        notes: Vec::new(),
        error: None,
    };
    let start = Instant::now();
    // A panic inside a scenario still unwinds through its Lab (namespaces are removed) and
    // must not stop the other scenarios.
    let outcome = catch_unwind(AssertUnwindSafe(|| match s {
        Scenario::Cni => cni::run(ctx, out, &mut r),
        Scenario::Convergence => convergence::run(ctx, &mut r),
        Scenario::Coldstart => coldstart::run(ctx, &mut r),
        Scenario::Footprint => footprint::run(ctx, &mut r),
        Scenario::Datapath => datapath::run(ctx, &mut r),
        Scenario::Backends => backends::run(ctx, &mut r),
        Scenario::Etcd => etcd_load::run(ctx, &mut r),
        Scenario::Faults => faults::run(ctx, &mut r),
        Scenario::Netpol => policy::run(ctx, &mut r),
        Scenario::Kube => kube::run(ctx, &mut r),
        Scenario::Dualstack => dualstack::run(ctx, &mut r),
        Scenario::All => Err(anyhow!("'all' is not a single scenario")),
    }));
    r.error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("panicked".into()),
    };
    r.seconds = start.elapsed().as_secs_f64();
    r
}

fn summary_md(machine: &Machine, command: &[String], results: &[ScenarioResult]) -> String {
    let mut s = format!(
        "Machine: {} × {}, kernel {}, {} MiB RAM. Command: `{}`\n\n",
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.mem_total_mib,
        command.join(" ")
    );
    for r in results {
        s.push_str(&report::markdown(r));
        s.push('\n');
    }
    s
}
