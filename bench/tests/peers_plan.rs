//! `bench/peers/peers.py` must time the same cases as `headmix bench` and count the same FLOPs and
//! bytes, or the side-by-side comparison compares different work. It reads the bench's own plan
//! (`headmix bench --list --json`, here `run::plan_json`); its `--dry-run` (no torch needed) must
//! give back exactly the plan's forward cases, whose counts are the Rust problem's. Skips with
//! one line when `python3` is missing.

use std::process::Command;

use headmix::BackendKind;
use headmix_bench::count;
use headmix_bench::run::{Selection, plan_json};
use headmix_bench::sweep::{Scale, Sweep};
use serde_json::Value;

#[test]
fn peers_run_the_plan_of_the_rust_sweeps_case_by_case() {
    let dir = std::env::temp_dir().join(format!("headmix-peers-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (sweep, kind, device) in [
        (Sweep::Quick, BackendKind::Cuda, "cuda"),
        (Sweep::Full, BackendKind::Cuda, "cuda"),
        (Sweep::Quick, BackendKind::Cpu, "cpu"),
    ] {
        let plan = plan_json(sweep, &[kind], &Selection::default());
        let cases = sweep.cases(Scale::assumed(kind));
        assert_eq!(plan.as_array().unwrap().len(), cases.len());
        for (entry, case) in plan.as_array().unwrap().iter().zip(&cases) {
            let (p, _) = case.problem().unwrap();
            let label = case.label();
            assert_eq!(entry["label"], label.as_str());
            assert_eq!(entry["flops"].as_f64().unwrap(), p.flops(), "{label}: FLOPs");
            assert_eq!(entry["bytes"].as_f64().unwrap(), count::bytes(&p), "{label}: bytes");
            let window = p.cfg.window.map(|w| serde_json::json!([w.left, w.right])).unwrap_or(Value::Null);
            assert_eq!(entry["window"], window, "{label}: window");
            assert_eq!(
                (entry["kv_heads"].as_u64().unwrap() as usize, entry["q_heads"].as_u64().unwrap() as usize),
                (p.cfg.kv_heads, p.cfg.q_heads),
                "{label}"
            );
            assert_eq!(
                (entry["collapse"].as_bool().unwrap(), entry["causal"].as_bool().unwrap()),
                (p.collapse, p.cfg.causal),
                "{label}"
            );
        }
        let path = dir.join("plan.json");
        std::fs::write(&path, plan.to_string()).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/peers.py");
        let args = [script, "--dry-run", "--plan", path.to_str().unwrap(), "--device", device];
        let out = match Command::new("python3").args(args).output() {
            Ok(out) => out,
            Err(e) => return eprintln!("skipped: python3 not runnable ({e})"),
        };
        assert!(out.status.success(), "peers.py --dry-run failed: {}", String::from_utf8_lossy(&out.stderr));
        let peers: Value = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
        assert_eq!(peers, plan, "{}: peers.py runs exactly the bench's forward plan", sweep.name());
    }
    // Decode plans carry decode cases, which the peers leave out.
    let decode = plan_json(Sweep::DecodeQuick, &[BackendKind::Cpu], &Selection::default());
    assert!(decode.as_array().unwrap().iter().all(|c| c["mode"] == "decode"));
    std::fs::remove_dir_all(&dir).unwrap();
}
