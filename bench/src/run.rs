//! A sweep run: the plan (which case on which backend), its JSON form for the peers, and the
//! measuring loop with its progress lines.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use headmix::{BackendKind, Method};
use serde_json::{Value, json};

use crate::measure::{self, Device};
use crate::report::{CaseError, Report, Row, Skipped, fmt_sig, fmt_time};
use crate::sweep::{Case, Mode, Scale, Sweep};

/// Which cases of a sweep to keep: by method and by a label substring.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub methods: Option<Vec<Method>>,
    pub filter: Option<String>,
}

impl Selection {
    pub fn keeps(&self, case: &Case) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(&case.method))
            && self.filter.as_ref().is_none_or(|f| case.label().contains(f.as_str()))
    }

    /// The selected cases of a sweep at a scale.
    pub fn cases(&self, sweep: Sweep, scale: Scale) -> Vec<Case> {
        sweep.cases(scale).into_iter().filter(|c| self.keeps(c)).collect()
    }
}

/// The plan of a sweep without opening a device (GPU sizes except on the CPU backend), as JSON:
/// one object per case with its sizes, mask, FLOPs and bytes. `bench/peers/peers.py` runs the
/// forward cases of this plan, so both sides time and count the same work.
pub fn plan_json(sweep: Sweep, kinds: &[BackendKind], sel: &Selection) -> Value {
    let mut plan = Vec::new();
    for &kind in kinds {
        for case in sel.cases(sweep, Scale::assumed(kind)) {
            let cfg = case.config().ok();
            let problem = case.problem().ok().map(|(p, _)| p);
            plan.push(json!({
                "backend": kind.name(),
                "label": case.label(),
                "mode": if case.mode == Mode::Forward { "forward" } else { "decode" },
                "config": case.method.name(),
                "heads": case.heads,
                "q_heads": cfg.map(|c| c.q_heads),
                "kv_heads": case.kv_heads,
                "pseudo": case.pseudo,
                "head_dim": case.head_dim,
                "batch": case.batch,
                "n": case.n,
                "m": case.m,
                "dtype": case.dtype.name(),
                "causal": cfg.map(|c| c.causal),
                "window": cfg.and_then(|c| c.window).map(|w| [w.left, w.right]),
                "collapse": problem.map(|p| p.collapse),
                "flops": problem.map(|p| case.counts(&p).0),
                "bytes": problem.map(|p| case.counts(&p).1),
            }));
        }
    }
    Value::Array(plan)
}

/// The progress line of a measured row: time and TFLOP/s (forward) or cache GB/s (decode).
fn done_line(label: &str, r: &Row) -> String {
    let mut line = format!("{label}: {}", fmt_time(r.median_s));
    let sig = |x: Option<f64>| x.map_or("-".into(), fmt_sig);
    match (&r.decode, r.speedup_vs_unfused) {
        (Some(dc), _) => {
            let (gb_s, pct, ratio) = (sig(dc.cache_gb_s), sig(dc.pct_copy_bw), dc.cache_ratio);
            line += &format!(" (cache read {gb_s} GB/s, {pct}% of 4.3 TB/s, cache {ratio:.2}x smaller than unfused)");
        }
        (None, Some(x)) => line += &format!(" ({} TFLOP/s, {x:.2}x vs unfused)", fmt_sig(r.tflops)),
        (None, None) => line += &format!(" ({} TFLOP/s)", fmt_sig(r.tflops)),
    }
    line
}

/// Progress on stderr: rewritten in place on a terminal, one line per step otherwise.
fn progress(line: &str, last: bool) {
    let mut e = std::io::stderr();
    let _ = if e.is_terminal() {
        write!(e, "\r\x1b[K{line}{}", if last { "\n" } else { "" })
    } else {
        writeln!(e, "{line}")
    };
    let _ = e.flush();
}

/// Measure a sweep on the backends asked for; `reps` overrides the sweep's repetitions.
pub fn measure(sweep: Sweep, kinds: &[BackendKind], sel: &Selection, reps: Option<usize>) -> Result<Report, String> {
    if [Scale::Host, Scale::Gpu].iter().all(|&scale| sel.cases(sweep, scale).is_empty()) {
        return Err("--config, --filter: no case of the sweep selected (--list shows the cases)".into());
    }
    let mut report = Report::new("headmix bench", sweep.name());
    let (devices, skipped) = measure::open_all(kinds);
    for (kind, why) in skipped {
        eprintln!("{kind}: skipped ({why})");
        report.skipped.push(Skipped { backend: kind.name().into(), why });
    }
    let plan: Vec<(&Device, Case)> =
        devices.iter().flat_map(|dev| sel.cases(sweep, dev.scale).into_iter().map(move |c| (dev, c))).collect();
    for dev in &devices {
        let count = plan.iter().filter(|(d, _)| d.kind() == dev.kind()).count();
        eprintln!("{}: {} (driver {}): {count} cases", dev.info.backend, dev.info.device, dev.info.driver);
        report.backends.push(dev.info.clone());
    }
    if devices.is_empty() {
        return Err("none of the backends asked for opened (see the lines above)".into());
    }
    if plan.is_empty() {
        return Err("no case to run (check --config and --filter: --list shows the cases)".into());
    }
    let start = Instant::now();
    for (i, (dev, case)) in plan.iter().enumerate() {
        let label = format!("[{}/{}] {} {}", i + 1, plan.len(), dev.info.backend, case.label());
        progress(&format!("{label} ..."), false);
        match measure::run(dev, case, reps.unwrap_or_else(|| sweep.reps(dev.scale))) {
            Ok(rows) => {
                progress(&done_line(&label, &rows[0]), true);
                report.results.extend(rows);
            }
            Err(why) => {
                progress(&format!("{label}: failed: {why}"), true);
                report.errors.push(CaseError { backend: dev.info.backend.clone(), case: case.label(), why });
            }
        }
    }
    eprintln!("measured {} cases in {:.1} s", plan.len(), start.elapsed().as_secs_f64());
    Ok(report)
}

/// The criterion suites' cases and devices: the backends of `HEADMIX_BENCH_BACKENDS` (default:
/// all; one line per backend that does not open), each with `gpu` on GPUs (`host`'s sweep when
/// `HEADMIX_BENCH_SWEEP=quick`) and `host` on host-scale devices.
pub fn criterion_cases(gpu: Sweep, host: Sweep) -> Vec<(Vec<Case>, Device)> {
    let env = |name: &str| std::env::var(name).ok();
    let backends = env("HEADMIX_BENCH_BACKENDS").unwrap_or("cuda,wgpu,cpu".into());
    let kinds: Vec<BackendKind> = (backends.split(',').map(str::trim))
        .map(|k| BackendKind::parse(k).unwrap_or_else(|| panic!("HEADMIX_BENCH_BACKENDS: unknown {k:?}")))
        .collect();
    let gpu = match env("HEADMIX_BENCH_SWEEP").as_deref() {
        None | Some("full") => gpu,
        Some("quick") => host,
        Some(s) => panic!("HEADMIX_BENCH_SWEEP: unknown sweep {s:?} (quick, full)"),
    };
    let (devices, skipped) = measure::open_all(&kinds);
    for (kind, why) in skipped {
        eprintln!("{kind}: skipped ({why})");
    }
    let sweep = |d: &Device| if d.scale == Scale::Host { host } else { gpu };
    devices.into_iter().map(|d| (sweep(&d).cases(d.scale), d)).collect()
}
