//! `bench/peers/peers.py` must time the same cases as `headmix bench` and count the same FLOPs and
//! bytes, or the side-by-side comparison compares different work. Its `--dry-run` plan (no torch
//! needed) is checked here against the Rust sweeps. Skips with one line when `python3` is missing.

use std::process::Command;

use headmix::Problem;
use headmix_bench::count;
use headmix_bench::sweep::{Scale, Sweep};
use serde_json::Value;

fn plan(sweep: &str, device: &str) -> Option<Vec<Value>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/peers.py");
    let out = match Command::new("python3").args([script, "--dry-run", "--sweep", sweep, "--device", device]).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: python3 not runnable ({e})");
            return None;
        }
    };
    assert!(out.status.success(), "peers.py --dry-run failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).expect("the plan is JSON"))
}

#[test]
fn peers_plan_equals_the_rust_sweeps_case_by_case() {
    for (sweep, scale, device) in
        [(Sweep::Quick, Scale::Gpu, "cuda"), (Sweep::Full, Scale::Gpu, "cuda"), (Sweep::Quick, Scale::Host, "cpu")]
    {
        let Some(plan) = plan(sweep.name(), device) else { return };
        let cases = sweep.cases(scale);
        assert_eq!(plan.len(), cases.len(), "{} {device}: number of cases", sweep.name());
        for (py, case) in plan.iter().zip(&cases) {
            let w = case.weights().unwrap();
            let p = Problem::for_weights(&case.config().unwrap(), &w, case.batch, case.n, case.m, case.dtype).unwrap();
            let label = case.label();
            assert_eq!(py["label"], label.as_str());
            assert_eq!(py["flops"].as_f64().unwrap(), count::flops(&p), "{label}: FLOPs");
            assert_eq!(py["bytes"].as_f64().unwrap(), count::bytes(&p), "{label}: bytes");
            let window = p.cfg.window.map(|w| serde_json::json!([w.left, w.right])).unwrap_or(Value::Null);
            assert_eq!(py["window"], window, "{label}: window");
            assert_eq!(py["kv_heads"].as_u64().unwrap() as usize, p.cfg.kv_heads, "{label}");
            assert_eq!(py["collapse"].as_bool().unwrap(), p.collapse, "{label}");
            assert_eq!(py["causal"].as_bool().unwrap(), p.cfg.causal, "{label}");
        }
    }
}
