//! `headmix bench`: run a named sweep on the backends present, print the table, write JSON / SVG,
//! compare with the PyTorch peers.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use headmix::{BackendKind, Method};

use crate::decode::{DecodeCase, DecodeSweep};
use crate::measure::{self, Device};
use crate::report::{self, CaseError, Report, Row, Skipped};
use crate::sweep::{Case, Scale, Sweep};

pub const HELP: &str = "\
headmix bench — time the fused kernels against the unfused pipeline, per backend present

usage: headmix bench [--quick | --sweep quick|full|decode|decode-quick] [options]
  --sweep NAME     quick (default; under a minute on the CPU backend of a 2-core machine)
                   or full (GPUs: N = 1k..16k tokens, P = 1, 2, 4, 8, d = 64 and 128, bf16 and f16);
                   decode (KV-cache decode, one new token per sequence; GPUs: B = 1, 8, 64, caches of
                   4k..128k tokens, H = 16, d = 128, bf16) or decode-quick (fewer sizes; well under a
                   minute on the CPU backend)
  --quick          the same as --sweep quick
  --sizes-only     print the KV-cache size of headmix against the unfused design (exact counts, nothing
                   timed): issue 6's configurations (B = 8, 32k tokens, H = 16, d = 128, bf16), or with
                   --sweep decode|decode-quick that sweep's GPU cases
  --backend LIST   all (default: every backend that opens), or a comma list of cuda, wgpu, cpu
  --config LIST    only these configurations (comma list of mha, gqa, mea, mea-compressed, iha, iha-local)
  --filter TEXT    only the cases whose label contains TEXT (labels as --list prints them, e.g. N=128)
  --reps N         timed repetitions per case, after warm-up (default: 3 on the CPU, 10 quick / 20 full on GPUs)
  --json FILE      write the report as JSON (schema headmix-bench/1, see bench/README.md)
  --svg FILE       plot TFLOP/s against sequence length, a panel per configuration, a line per backend
                   (forward sweeps only)
  --peers FILE     a report of bench/peers/peers.py (same schema), printed side by side with the results
  --load FILE      print, plot and compare a saved report instead of measuring
  --list           list the cases of the sweep and exit";

const SWITCHES: [&str; 3] = ["quick", "list", "sizes-only"];
const VALUES: [&str; 9] = ["sweep", "backend", "config", "filter", "reps", "json", "svg", "peers", "load"];

/// `--name value` pairs and bare switches.
#[derive(Debug)]
struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let (mut values, mut switches) = (HashMap::new(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a.strip_prefix("--").ok_or_else(|| format!("unexpected argument {a:?}\n\n{HELP}"))?;
            if SWITCHES.contains(&name) {
                switches.push(name.to_string());
            } else if VALUES.contains(&name) {
                let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                values.insert(name.to_string(), v.clone());
            } else {
                return Err(format!("unknown option --{name}\n\n{HELP}"));
            }
        }
        Ok(Args { values, switches })
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|s| s.as_str())
    }
}

/// The backend kinds `--backend` names.
pub fn parse_backends(s: &str) -> Result<Vec<BackendKind>, String> {
    if s == "all" {
        return Ok(BackendKind::ALL.to_vec());
    }
    s.split(',')
        .map(|name| BackendKind::parse(name.trim()).ok_or_else(|| format!("--backend: unknown backend {name:?}")))
        .collect()
}

/// A forward or a decode sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AnySweep {
    Forward(Sweep),
    Decode(DecodeSweep),
}

impl AnySweep {
    /// The sweep `--quick` / `--sweep` name (default `quick`).
    fn of(args: &Args) -> Result<AnySweep, String> {
        let name = if args.switch("quick") { "quick" } else { args.get("sweep").unwrap_or("quick") };
        Sweep::parse(name)
            .map(AnySweep::Forward)
            .or_else(|| DecodeSweep::parse(name).map(AnySweep::Decode))
            .ok_or_else(|| format!("--sweep: unknown sweep {name:?} (quick, full, decode, decode-quick)"))
    }

    fn name(self) -> &'static str {
        match self {
            AnySweep::Forward(s) => s.name(),
            AnySweep::Decode(s) => s.name(),
        }
    }

    fn reps(self, scale: Scale) -> usize {
        match self {
            AnySweep::Forward(s) => s.reps(scale),
            AnySweep::Decode(s) => s.reps(scale),
        }
    }

    fn cases(self, scale: Scale) -> Vec<AnyCase> {
        match self {
            AnySweep::Forward(s) => s.cases(scale).into_iter().map(AnyCase::Forward).collect(),
            // On GPUs each decode case also gets its device-clock forward N = 1 baseline row.
            AnySweep::Decode(s) => s
                .cases(scale)
                .into_iter()
                .flat_map(|c| {
                    let forward = (scale == Scale::Gpu).then_some(AnyCase::DecodeForward(c));
                    std::iter::once(AnyCase::Decode(c)).chain(forward)
                })
                .collect(),
        }
    }
}

/// One case of either kind of sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AnyCase {
    Forward(Case),
    Decode(DecodeCase),
    /// A decode case's attention as a forward pass with `N = 1` (device baseline).
    DecodeForward(DecodeCase),
}

impl AnyCase {
    fn method(&self) -> Method {
        match self {
            AnyCase::Forward(c) => c.method,
            AnyCase::Decode(c) | AnyCase::DecodeForward(c) => c.method,
        }
    }

    fn label(&self) -> String {
        match self {
            AnyCase::Forward(c) => c.label(),
            AnyCase::Decode(c) => c.label(),
            AnyCase::DecodeForward(c) => format!("{} [forward N=1]", c.label()),
        }
    }

    fn run(&self, dev: &Device, reps: usize) -> Result<Vec<Row>, String> {
        match self {
            AnyCase::Forward(c) => measure::run_case(dev, c, reps),
            AnyCase::Decode(c) => crate::decode_measure::run_case(dev, c, reps),
            AnyCase::DecodeForward(c) => crate::decode_measure::run_forward_case(dev, c, reps),
        }
    }
}

/// Whether a case passes `--config` and `--filter`.
fn selected(method: Method, label: &str, configs: Option<&[String]>, filter: Option<&str>) -> bool {
    configs.is_none_or(|c| c.iter().any(|c| c == method.name())) && filter.is_none_or(|f| label.contains(f))
}

/// The progress line of a measured row: time and TFLOP/s (forward) or cache GB/s (decode).
fn done_line(label: &str, r: &Row) -> String {
    let mut line = format!("{label}: {}", report::fmt_time(r.median_s));
    match &r.decode {
        Some(dc) => {
            line += &format!(" ({} GB/s", report::fmt_sig(r.gb_s));
            if let Some(pct) = r.pct_peak_bw {
                line += &format!(", {}% of copy bw", report::fmt_sig(pct));
            }
            line += &format!(", cache {:.2}x smaller than unfused", dc.cache_ratio);
        }
        None => {
            line += &format!(" ({} TFLOP/s", report::fmt_sig(r.tflops));
            if let Some(x) = r.speedup_vs_unfused {
                line += &format!(", {x:.2}x vs unfused");
            }
        }
    }
    line + ")"
}

/// `--sizes-only`: the cache size table of issue 6's configurations or of a decode sweep's GPU
/// cases, filtered by `--config` and `--filter`.
fn sizes_only(args: &Args) -> Result<String, String> {
    let configs: Option<Vec<String>> = args.get("config").map(|c| c.split(',').map(|s| s.trim().to_string()).collect());
    let cases = match (args.get("sweep"), AnySweep::of(args)?) {
        (None, _) => crate::decode::issue_size_cases(),
        (Some(_), AnySweep::Decode(sweep)) => sweep.cases(Scale::Gpu),
        (Some(name), AnySweep::Forward(_)) => {
            return Err(format!("--sizes-only: {name:?} is not a decode sweep (decode, decode-quick)"));
        }
    };
    let cases: Vec<DecodeCase> =
        cases.into_iter().filter(|c| selected(c.method, &c.label(), configs.as_deref(), args.get("filter"))).collect();
    if cases.is_empty() {
        return Err("no case to size (check --config and --filter)".into());
    }
    crate::decode::sizes_table(&cases)
}

/// Progress on stderr: rewritten in place on a terminal, one line per step otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn step(&self, line: &str) {
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Measure a sweep on the devices asked for.
fn measure(args: &Args) -> Result<Report, String> {
    let sweep = AnySweep::of(args)?;
    let kinds = parse_backends(args.get("backend").unwrap_or("all"))?;
    let configs: Option<Vec<String>> = args.get("config").map(|c| c.split(',').map(|s| s.trim().to_string()).collect());
    let filter = args.get("filter");
    let reps: Option<usize> = match args.get("reps") {
        None => None,
        Some(r) => {
            Some(r.parse().ok().filter(|&r| r > 0).ok_or_else(|| format!("--reps: not a positive count {r:?}"))?)
        }
    };
    let mut report = Report::new("headmix bench", sweep.name());
    let (devices, skipped) = measure::open_all(&kinds);
    for (kind, why) in skipped {
        eprintln!("{kind}: skipped ({why})");
        report.skipped.push(Skipped { backend: kind.name().into(), why });
    }
    let plan: Vec<(&Device, AnyCase)> = devices
        .iter()
        .flat_map(|dev| {
            let cases = sweep.cases(dev.scale);
            cases
                .into_iter()
                .filter(|c| selected(c.method(), &c.label(), configs.as_deref(), filter))
                .map(move |c| (dev, c))
        })
        .collect();
    for dev in &devices {
        eprintln!(
            "{}: {} (driver {}): {} cases",
            dev.info.backend,
            dev.info.device,
            dev.info.driver,
            plan.iter().filter(|(d, _)| d.kind() == dev.kind()).count()
        );
        report.backends.push(dev.info.clone());
    }
    if devices.is_empty() {
        return Err("none of the backends asked for opened (see the lines above)".into());
    }
    if plan.is_empty() {
        return Err("no case to run (check --config and --filter: --list shows the cases)".into());
    }
    let progress = Progress { tty: std::io::stderr().is_terminal() };
    let start = Instant::now();
    for (i, (dev, case)) in plan.iter().enumerate() {
        let label = format!("[{}/{}] {} {}", i + 1, plan.len(), dev.info.backend, case.label());
        progress.step(&format!("{label} ..."));
        let reps = reps.unwrap_or_else(|| sweep.reps(dev.scale));
        match case.run(dev, reps) {
            Ok(rows) => {
                progress.step(&done_line(&label, &rows[0]));
                report.results.extend(rows);
            }
            Err(why) => {
                progress.step(&format!("{label}: failed: {why}"));
                if progress.tty {
                    eprintln!();
                }
                report.errors.push(CaseError { backend: dev.info.backend.clone(), case: case.label(), why });
            }
        }
    }
    progress.done();
    eprintln!("measured {} cases in {:.1} s", plan.len(), start.elapsed().as_secs_f64());
    Ok(report)
}

/// `headmix bench ARGS`.
pub fn main(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h" || a == "help") {
        println!("{HELP}");
        return Ok(());
    }
    let args = Args::parse(args)?;
    if args.switch("sizes-only") {
        print!("{}", sizes_only(&args)?);
        return Ok(());
    }
    if args.switch("list") {
        let sweep = AnySweep::of(&args)?;
        let configs: Option<Vec<String>> =
            args.get("config").map(|c| c.split(',').map(|s| s.trim().to_string()).collect());
        // Without opening devices: GPU sizes for cuda and wgpu (a software wgpu adapter gets the CPU's).
        for kind in parse_backends(args.get("backend").unwrap_or("all"))? {
            let scale = if kind == BackendKind::Cpu { Scale::Host } else { Scale::Gpu };
            for case in sweep.cases(scale) {
                if selected(case.method(), &case.label(), configs.as_deref(), args.get("filter")) {
                    println!("{kind}\t{}", case.label());
                }
            }
        }
        return Ok(());
    }
    if args.get("svg").is_some() && args.get("load").is_none() && matches!(AnySweep::of(&args)?, AnySweep::Decode(_)) {
        return Err("--svg plots forward sweeps only (TFLOP/s against sequence length)".into());
    }
    let report = match args.get("load") {
        Some(path) => Report::load(path)?,
        None => measure(&args)?,
    };
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
        println!();
        print!("{}", report::table(&forward_rows));
        println!();
        print!("{}", report::legend(&forward_rows));
    }
    if !decode_rows.is_empty() {
        println!();
        print!("{}", report::decode_table(&decode_rows));
        println!();
        print!("{}", report::decode_legend(&decode_rows));
    }
    for e in &report.errors {
        println!("failed: {} {}: {}", e.backend, e.case, e.why);
    }
    if let Some(path) = args.get("json") {
        report.save(path)?;
        eprintln!("wrote {path}");
    }
    if let Some(path) = args.get("svg") {
        let devices: Vec<String> = report.backends.iter().map(|b| format!("{}: {}", b.backend, b.device)).collect();
        let title = format!(
            "headmix {} sweep, TFLOP/s vs sequence length · {} · commit {} · {}",
            report.sweep,
            devices.join(", "),
            report.git_commit,
            report.date_utc
        );
        if forward_rows.is_empty() {
            return Err("--svg plots forward sweeps only (TFLOP/s against sequence length)".into());
        }
        crate::plot::svg(&forward_rows, &title, path)?;
        eprintln!("wrote {path}");
    }
    if let Some(path) = args.get("peers") {
        let peers = Report::load(path)?;
        println!();
        print!("{}", report::side_by_side(&report.results, &peers));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_typos_are_refused() {
        let a = Args::parse(&strings(&["--quick", "--backend", "cpu", "--json", "x.json"])).unwrap();
        assert!(a.switch("quick") && a.get("json") == Some("x.json"));
        assert!(Args::parse(&strings(&["--jsno", "x"])).unwrap_err().contains("--jsno"));
        assert!(Args::parse(&strings(&["--svg"])).unwrap_err().contains("needs a value"));
        assert!(Args::parse(&strings(&["quick"])).is_err());
        assert_eq!(parse_backends("all").unwrap(), BackendKind::ALL);
        assert_eq!(parse_backends("cpu,wgpu").unwrap(), [BackendKind::Cpu, BackendKind::Wgpu]);
        assert!(parse_backends("tpu").is_err());
    }

    /// A filtered run end to end on the CPU: table, JSON and SVG written, and JSON read back.
    #[test]
    fn a_tiny_cpu_run_writes_json_and_svg() {
        let dir = std::env::temp_dir().join(format!("headmix-bench-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
        let args = strings(&[
            "--quick",
            "--backend",
            "cpu",
            "--config",
            "gqa",
            "--filter",
            "N=64",
            "--reps",
            "1",
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ]);
        main(&args).unwrap();
        let r = Report::load(json.to_str().unwrap()).unwrap();
        assert_eq!(r.results.len(), 1);
        assert_eq!((r.results[0].config.as_str(), r.results[0].n), ("gqa", 64));
        assert!(r.errors.is_empty() && r.backends[0].backend == "cpu");
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
        // Reprinted from the file, compared with itself as "peers".
        let j = json.to_str().unwrap();
        main(&strings(&["--load", j, "--peers", j])).unwrap();
        assert!(main(&strings(&["--backend", "cpu", "--filter", "no such case"])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A filtered decode run on the CPU: decode rows in the JSON, read back; sizes and lists.
    #[test]
    fn a_tiny_cpu_decode_run_writes_json() {
        let dir = std::env::temp_dir().join(format!("headmix-bench-decode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("d.json");
        let j = json.to_str().unwrap();
        let args = ["--sweep", "decode-quick", "--backend", "cpu", "--config", "iha,gqa", "--filter", "B=1 L=256"];
        main(&strings(&[&args[..], &["--reps", "1", "--json", j]].concat())).unwrap();
        let r = Report::load(j).unwrap();
        assert_eq!(r.sweep, "decode-quick");
        let configs: Vec<&str> = r.results.iter().map(|r| r.config.as_str()).collect();
        assert_eq!(configs, ["gqa", "iha", "iha"]);
        assert!(r.results.iter().all(|r| r.decode.is_some() && r.n == 1 && r.m == 256 && r.batch == 1));
        assert!(r.errors.is_empty());
        main(&strings(&["--load", j])).unwrap();
        // A decode report has nothing to plot; sizes and lists need no device.
        let svg = dir.join("d.svg");
        assert!(
            main(&strings(&["--sweep", "decode", "--svg", svg.to_str().unwrap()])).unwrap_err().contains("forward")
        );
        assert!(main(&strings(&["--load", j, "--svg", svg.to_str().unwrap()])).is_err());
        main(&strings(&["--sizes-only"])).unwrap();
        main(&strings(&["--sizes-only", "--sweep", "decode", "--filter", "L=131072"])).unwrap();
        assert!(main(&strings(&["--sizes-only", "--sweep", "full"])).is_err());
        main(&strings(&["--list", "--sweep", "decode", "--backend", "cuda,cpu"])).unwrap();
        assert!(main(&strings(&["--sweep", "decode-full"])).unwrap_err().contains("unknown sweep"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
