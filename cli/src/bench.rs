//! `headmix bench`: run a named sweep on the backends present, print the tables, write JSON / SVG,
//! compare with the PyTorch peers; or list a sweep's plan, or print exact cache sizes.

use headmix::{BackendKind, Method};
use headmix_bench::report::{self, Report, Row};
use headmix_bench::run::{self, Selection};
use headmix_bench::sweep::{self, Scale, Sweep};

use crate::flags;

fn sweep(s: &str) -> Result<Sweep, String> {
    Sweep::parse(s).ok_or_else(|| format!("takes one of {}", Sweep::ALL.map(Sweep::name).join(", ")))
}

#[derive(clap::Args)]
#[command(
    allow_negative_numbers = true,
    after_help = "Sweeps: quick (under a minute on the CPU backend of a 2-core machine); full (GPUs: N = 1k..16k, \
P = 1, 2, 4, 8, d = 64 and 128, bf16 and f16); decode-quick and decode (KV-cache decode, one new token per \
sequence; GPUs: B = 1, 8, 64, caches of 4k..128k tokens). The CPU backend and software wgpu adapters get tiny \
sizes. What is measured and the JSON schema: bench/README.md."
)]
pub struct Args {
    /// Shorthand for --sweep quick
    #[arg(long, conflicts_with = "sweep")]
    quick: bool,
    /// The sweep: quick, full, decode-quick, decode [default: quick]
    #[arg(long, value_parser = sweep)]
    sweep: Option<Sweep>,
    /// Backends to try: all, or a list of cuda, wgpu, cpu (one line per backend that does not open)
    #[arg(long, default_value = "all", value_parser = flags::backends)]
    backend: ::std::vec::Vec<BackendKind>,
    /// Only these configurations (a list of mha, gqa, mea, mea-compressed, iha, iha-local)
    #[arg(long, value_parser = flags::methods)]
    config: Option<::std::vec::Vec<Method>>,
    /// Only cases whose label contains this text (see --list)
    #[arg(long)]
    filter: Option<String>,
    /// Timed repetitions per case, in 1..=1000000 [default: the sweep's, 5 to 20]
    #[arg(long, value_parser = flags::count(1, 1_000_000))]
    reps: Option<usize>,
    /// Write the report as JSON here (with --list: the plan, which bench/peers/peers.py runs)
    #[arg(long, value_name = "PATH", conflicts_with = "sizes_only")]
    json: Option<String>,
    /// Draw TFLOP/s against sequence length into an SVG file (forward sweeps)
    #[arg(long, value_name = "PATH", conflicts_with_all = ["sizes_only", "list"])]
    svg: Option<String>,
    /// Read a report written by --json instead of measuring
    #[arg(long, value_name = "PATH", conflicts_with_all = ["sizes_only", "list", "quick", "reps"])]
    load: Option<String>,
    /// A peers report (bench/peers/peers.py --json) to print side by side
    #[arg(long, value_name = "PATH", conflicts_with_all = ["sizes_only", "list"])]
    peers: Option<String>,
    /// List the cases without running them (GPU sizes for cuda and wgpu)
    #[arg(long, conflicts_with = "sizes_only")]
    list: bool,
    /// Exact cache bytes against the unfused design, nothing timed: issue 6's configurations, or a decode sweep's GPU cases with --sweep
    #[arg(long)]
    sizes_only: bool,
}

pub fn main(a: Args) -> crate::Result {
    let sel = Selection { methods: a.config.clone(), filter: a.filter.clone() };
    let sweep = a.sweep.unwrap_or(Sweep::Quick);
    if a.sizes_only {
        let cases = match (a.sweep.is_some(), sweep.is_decode()) {
            (false, _) => sweep::issue_size_cases(),
            (true, true) => sweep.cases(Scale::Gpu).into_iter().filter(|c| c.mode == sweep::Mode::Decode).collect(),
            (true, false) => {
                return Err(format!("--sizes-only: {:?} is not a decode sweep (decode, decode-quick)", sweep.name()));
            }
        };
        let cases: Vec<_> = cases.into_iter().filter(|c| sel.keeps(c)).collect();
        if cases.is_empty() {
            return Err("--sizes-only: no case to size (check --config and --filter)".into());
        }
        print!("{}", report::sizes_table(&cases)?);
        return Ok(());
    }
    if a.list {
        if let Some(path) = &a.json {
            let plan = serde_json::to_string_pretty(&run::plan_json(sweep, &a.backend, &sel)).expect("plain data");
            std::fs::write(path, plan + "\n").map_err(|e| format!("--json: {path}: {e}"))?;
            eprintln!("wrote {path}");
        } else {
            for &kind in &a.backend {
                for case in sel.cases(sweep, Scale::assumed(kind)) {
                    println!("{kind}\t{}", case.label());
                }
            }
        }
        return Ok(());
    }
    if a.svg.is_some() && a.load.is_none() && sweep.is_decode() {
        return Err("--svg: plots forward sweeps only (TFLOP/s against sequence length)".into());
    }
    // Check the outputs' folders and read the peers first: a bad path fails before minutes of measuring.
    for (flag, path) in [("--json", &a.json), ("--svg", &a.svg)] {
        let dir =
            path.as_deref().map(std::path::Path::new).and_then(|p| p.parent()).filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(format!("{flag}: {} is not a folder", dir.display()));
        }
    }
    // Read the peers first: a bad file fails before minutes of measuring.
    let peers = a.peers.as_deref().map(Report::load).transpose().map_err(|e| format!("--peers: {e}"))?;
    let report = match &a.load {
        Some(path) => Report::load(path).map_err(|e| format!("--load: {e}"))?,
        None => run::measure(sweep, &a.backend, &sel, a.reps)?,
    };
    // Write the JSON before printing, so that nothing is lost if the terminal goes away.
    if let Some(path) = &a.json {
        report.save(path).map_err(|e| format!("--json: {e}"))?;
        eprintln!("wrote {path}");
    }
    println!("{}", report.header());
    for b in &report.backends {
        println!("  {}: {} (driver {})", b.backend, b.device, b.driver);
    }
    for s in &report.skipped {
        println!("  {}: skipped ({})", s.backend, s.why);
    }
    let (decode_rows, forward_rows): (Vec<Row>, Vec<Row>) =
        report.results.iter().cloned().partition(|r| r.decode.is_some());
    if !forward_rows.is_empty() || decode_rows.is_empty() {
        print!("\n{}\n{}", report::table(&forward_rows), report::legend(&forward_rows));
    }
    if !decode_rows.is_empty() {
        print!("\n{}\n{}", report::decode_table(&decode_rows), report::decode_legend(&decode_rows));
    }
    for e in &report.errors {
        println!("failed: {} {}: {}", e.backend, e.case, e.why);
    }
    if let Some(path) = &a.svg {
        let devices: Vec<String> = report.backends.iter().map(|b| format!("{}: {}", b.backend, b.device)).collect();
        let (sweep, commit, date) = (&report.sweep, &report.git_commit, &report.date_utc);
        let title = format!(
            "headmix {sweep} sweep, TFLOP/s vs sequence length · {} · commit {commit} · {date}",
            devices.join(", ")
        );
        headmix_bench::plot::svg(&forward_rows, &title, path).map_err(|e| format!("--svg: {e}"))?;
        eprintln!("wrote {path}");
    }
    if let Some(peers) = peers {
        print!("\n{}", report::side_by_side(&report.results, &peers));
    }
    Ok(())
}
