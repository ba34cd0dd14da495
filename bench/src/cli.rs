//! `headmix bench`: run a named sweep on the backends present, print the table, write JSON / SVG,
//! compare with the PyTorch peers.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use headmix::BackendKind;

use crate::measure::{self, Device};
use crate::report::{self, CaseError, Report, Skipped};
use crate::sweep::{Case, Scale, Sweep};

pub const HELP: &str = "\
headmix bench — time the fused kernels against the unfused pipeline, per backend present

usage: headmix bench [--quick | --sweep quick|full] [options]
  --sweep NAME     quick (default; under a minute on the CPU backend of a 2-core machine)
                   or full (GPUs: N = 1k..16k tokens, P = 1, 2, 4, 8, d = 64 and 128, bf16 and f16)
  --quick          the same as --sweep quick
  --backend LIST   all (default: every backend that opens), or a comma list of cuda, wgpu, cpu
  --config LIST    only these configurations (comma list of mha, gqa, mea, mea-compressed, iha, iha-local)
  --filter TEXT    only the cases whose label contains TEXT (labels as --list prints them, e.g. N=128)
  --reps N         timed repetitions per case, after warm-up (default: 3 on the CPU, 10 quick / 20 full on GPUs)
  --json FILE      write the report as JSON (schema headmix-bench/1, see bench/README.md)
  --svg FILE       plot TFLOP/s against sequence length, a panel per configuration, a line per backend
  --peers FILE     a report of bench/peers/peers.py (same schema), printed side by side with the results
  --load FILE      print, plot and compare a saved report instead of measuring
  --list           list the cases of the sweep and exit";

const SWITCHES: [&str; 2] = ["quick", "list"];
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

/// Whether a case passes `--config` and `--filter`.
fn selected(case: &Case, configs: Option<&[String]>, filter: Option<&str>) -> bool {
    configs.is_none_or(|c| c.iter().any(|c| c == case.method.name())) && filter.is_none_or(|f| case.label().contains(f))
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
    let sweep_name = if args.switch("quick") { "quick" } else { args.get("sweep").unwrap_or("quick") };
    let sweep =
        Sweep::parse(sweep_name).ok_or_else(|| format!("--sweep: unknown sweep {sweep_name:?} (quick, full)"))?;
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
    let plan: Vec<(&Device, Case)> = devices
        .iter()
        .flat_map(|dev| {
            let cases = sweep.cases(dev.scale);
            cases.into_iter().filter(|c| selected(c, configs.as_deref(), filter)).map(move |c| (dev, c))
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
        match measure::run_case(dev, case, reps) {
            Ok(rows) => {
                let r = &rows[0];
                let mut line =
                    format!("{label}: {} ({} TFLOP/s", report::fmt_time(r.median_s), report::fmt_sig(r.tflops));
                if let Some(x) = r.speedup_vs_unfused {
                    line += &format!(", {x:.2}x vs unfused");
                }
                progress.step(&(line + ")"));
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
    if args.switch("list") {
        let sweep_name = if args.switch("quick") { "quick" } else { args.get("sweep").unwrap_or("quick") };
        let sweep = Sweep::parse(sweep_name).ok_or_else(|| format!("--sweep: unknown sweep {sweep_name:?}"))?;
        let configs: Option<Vec<String>> =
            args.get("config").map(|c| c.split(',').map(|s| s.trim().to_string()).collect());
        // Without opening devices: GPU sizes for cuda and wgpu (a software wgpu adapter gets the CPU's).
        for kind in parse_backends(args.get("backend").unwrap_or("all"))? {
            let scale = if kind == BackendKind::Cpu { Scale::Host } else { Scale::Gpu };
            for case in sweep.cases(scale).iter().filter(|c| selected(c, configs.as_deref(), args.get("filter"))) {
                println!("{kind}\t{}", case.label());
            }
        }
        return Ok(());
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
    println!();
    print!("{}", report::table(&report.results));
    println!();
    print!("{}", report::legend(&report.results));
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
        crate::plot::svg(&report.results, &title, path)?;
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
}
