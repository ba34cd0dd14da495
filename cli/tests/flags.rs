//! The `headmix` binary as a user meets it: every bad flag value is one line on stderr naming the
//! flag and what it takes, with a non-zero exit and never a panic or a backtrace; requests too
//! large for the kernels or the machine are refused before anything is allocated; the bench
//! fails cleanly on reports it cannot draw or write. (Issue 11 findings 1 and 7, issue 16's CLI.)

use std::process::{Command, Output};

fn headmix(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headmix"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("HEADMIX_REQUIRE_WGPU", "0")
        .output()
        .expect("the headmix binary runs")
}

/// The command fails with exactly one line on stderr that names `flag`, and no panic.
#[track_caller]
fn refused(args: &[&str], flag: &str) -> String {
    let out = headmix(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("note: ")).collect();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{args:?} panicked: {err}");
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
    assert!(lines[0].contains(flag), "{args:?}: {:?} does not name {flag}", lines[0]);
    assert!(!lines[0].contains("Usage") && !lines[0].contains("--help"), "{args:?}: {:?}", lines[0]);
    lines[0].to_string()
}

const HUGE: &str = "18446744073709551615";
const HUGER: &str = "99999999999999999999999";

#[test]
fn huge_values_of_every_run_flag_are_one_line_naming_the_flag_and_its_range() {
    for flag in ["--reps", "--seq", "--batch", "--pseudo", "--heads", "--kv-heads", "--kv-seq", "--head-dim"] {
        for value in [HUGE, HUGER, "-1", "1.5", "x", ""] {
            let line = refused(&["run", "--backend", "cpu", flag, value], flag);
            assert!(line.contains("..="), "{flag} {value}: no range in {line:?}");
        }
    }
    refused(&["run", "--seed", HUGER], "--seed");
    refused(&["run", "--window", "1"], "--window");
    refused(&["run", "--window", &format!("{HUGE},0")], "--window");
    refused(&["run", "--dtype", "f64"], "--dtype");
    refused(&["run", "--config", "mqa"], "--config");
    refused(&["run", "--backend", "tpu"], "--backend");
    refused(&["run", "--rope", "--rope-base", "1"], "--rope-base");
    refused(&["run", "--rope", "--rope-base", "inf"], "--rope-base");
    refused(&["run", "--rope", "--rope-mode", "absolute"], "--rope-mode");
}

#[test]
fn flags_that_do_not_apply_or_do_not_exist_are_errors() {
    refused(&["run", "--bogus"], "--bogus");
    refused(&["run", "--seq"], "--seq");
    refused(&["run", "--config", "mha", "--pseudo", "2"], "--pseudo");
    refused(&["run", "--config", "mea", "--kv-heads", "2"], "--kv-heads");
    refused(&["run", "--config", "iha", "--kv-heads", "2"], "--kv-heads");
    refused(&["run", "--rope-base", "500"], "--rope");
    refused(&["run", "--causal", "maybe"], "--causal");
    refused(&["run", "--norm", "layer"], "--norm");
    refused(&["run", "--config", "gqa", "--heads", "8", "--kv-heads", "3"], "--kv-heads");
    refused(&["run", "--head-dim", "3"], "--head-dim");
    refused(&["run", "--seq", "8", "--kv-seq", "4"], "--kv-seq");
    refused(&["bench", "--bogus"], "--bogus");
    refused(&["bench", "--sweep", "decode-full"], "--sweep");
    refused(&["bench", "--config", "iha,nope"], "--config");
    refused(&["bench", "--backend", "cpu,tpu"], "--backend");
    refused(&["bench", "--reps", "0"], "--reps");
    refused(&["bench", "--reps", HUGER], "--reps");
    refused(&["bench", "--sizes-only", "--json", "/nonexistent/x.json"], "--json");
    refused(&["bench", "--sizes-only", "--sweep", "full"], "--sizes-only");
    refused(&["compress", "--input", "/nonexistent/in.safetensors", "--output", "/tmp/x", "--rank", HUGE], "--rank");
    refused(
        &["compress", "--input", "/nonexistent/in.safetensors", "--output", "/tmp/x", "--rank", "2", "--heads", HUGER],
        "--heads",
    );
    refused(&["compress", "--input", "/nonexistent/in.safetensors", "--output", "/tmp/x"], "--rank");
    refused(&["info", "--bogus"], "--bogus");
    refused(&["nonsense"], "nonsense");
}

/// Sizes within every flag's range whose product the kernels cannot index, or whose buffers the
/// machine cannot hold, are refused by the library's validator before any allocation (this
/// request once aborted allocating its inputs).
#[test]
fn requests_too_large_are_typed_errors_before_allocating() {
    let line = refused(&["run", "--backend", "cpu", "--seq", "100000", "--heads", "64", "--head-dim", "256"], "--seq");
    assert!(line.contains("exceeds"), "{line}");
    let line = refused(&["run", "--backend", "cpu", "--batch", "2147483647", "--seq", "2147483647"], "--batch");
    assert!(line.contains("exceeds"), "{line}");
    // Within the index limits but far beyond any host's memory: the weights of 2^31 - 1 heads.
    let line =
        refused(&["run", "--backend", "cpu", "--seq", "1", "--heads", "2147483647", "--head-dim", "2"], "--heads");
    assert!(line.contains("GiB") || line.contains("exceeds"), "{line}");
    refused(
        &["run", "--backend", "cpu", "--config", "iha", "--pseudo", "2147483647", "--seq", "1", "--heads", "1"],
        "--pseudo",
    );
}

#[test]
fn help_shows_every_flag_with_its_default() {
    let out = headmix(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--backend",
        "--batch",
        "--seq",
        "--kv-seq",
        "--heads",
        "--kv-heads",
        "--pseudo",
        "--head-dim",
        "--dtype",
        "--window",
        "--causal",
        "--norm",
        "--rope",
        "--rope-mode",
        "--rope-base",
        "--seed",
        "--reps",
    ] {
        assert!(help.contains(flag), "{flag} missing from run --help");
    }
    for default in ["[default: iha]", "[default: 256]", "[default: 10000]", "[default: 5]"] {
        assert!(help.contains(default), "{default} missing from run --help:\n{help}");
    }
    let out = headmix(&["bench", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--quick",
        "--sweep",
        "--backend",
        "--config",
        "--filter",
        "--reps",
        "--json",
        "--svg",
        "--load",
        "--peers",
        "--list",
        "--sizes-only",
    ] {
        assert!(help.contains(flag), "{flag} missing from bench --help");
    }
    assert!(headmix(&["completions", "bash"]).stdout.len() > 1000);
}

/// A tiny run end to end: the checked forward pass, and a throughput printed with significant
/// digits (not `0.000` on a slow device).
#[test]
fn a_tiny_run_prints_its_error_and_throughput() {
    let out = headmix(&[
        "run",
        "--backend",
        "cpu",
        "--seq",
        "16",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--reps",
        "2",
        "--rope",
        "--rope-mode",
        "token",
        "--rope-base",
        "500",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rope=token base 500"), "{text}");
    let tflops = text.split("; ").nth(1).and_then(|t| t.split(' ').next()).unwrap();
    assert!(tflops.parse::<f64>().unwrap() > 0.0, "{text}");
    let err: f64 = text.split("out ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(err < 1e-5, "{text}");
}

/// A filtered CPU sweep end to end: tables, JSON, SVG; the JSON read back and compared with
/// itself as peers; a decode sweep; sizes and lists without a device; and reports that cannot
/// be drawn or written fail cleanly.
#[test]
fn bench_runs_writes_reads_back_and_fails_cleanly() {
    let dir = std::env::temp_dir().join(format!("headmix-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (json, svg) = (path("r.json"), path("r.svg"));
    let ok = |args: &[&str]| {
        let out = headmix(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let table = ok(&[
        "bench",
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
        &json,
        "--svg",
        &svg,
    ]);
    assert!(table.contains("| gqa Hk=1") && table.contains("TFLOP/s"), "{table}");
    let r = headmix_bench::report::Report::load(&json).unwrap();
    assert_eq!((r.results.len(), r.results[0].config.as_str(), r.results[0].n), (1, "gqa", 64));
    assert!(r.errors.is_empty() && r.backends[0].backend == "cpu");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let side = ok(&["bench", "--load", &json, "--peers", &json]);
    assert!(side.contains("headmix speed-up") && side.contains("1.00x"), "{side}");
    // A row with N = 0 (once hung the drawing): refused, not drawn.
    let mut zero = r.clone();
    zero.results[0].n = 0;
    let zero_json = path("zero.json");
    zero.save(&zero_json).unwrap();
    refused(&["bench", "--load", &zero_json, "--svg", &path("zero.svg")], "--svg");
    refused(&["bench", "--load", &json, "--json", "/nonexistent/x.json"], "--json");
    refused(&["bench", "--load", "/nonexistent/r.json"], "--load");
    // A measuring run refuses an output it cannot write before measuring anything.
    refused(&["bench", "--backend", "cpu", "--json", "/nonexistent/x.json"], "--json");
    refused(&["bench", "--load", &json, "--peers", &svg], "--peers");
    refused(&["bench", "--backend", "cpu", "--filter", "no such case"], "--filter");
    // Decode: rows in the JSON, read back; nothing to plot.
    let d = path("d.json");
    ok(&[
        "bench",
        "--sweep",
        "decode-quick",
        "--backend",
        "cpu",
        "--config",
        "iha,gqa",
        "--filter",
        "B=1 L=256",
        "--reps",
        "1",
        "--json",
        &d,
    ]);
    let r = headmix_bench::report::Report::load(&d).unwrap();
    assert_eq!(r.sweep, "decode-quick");
    assert_eq!(r.results.iter().map(|r| r.config.as_str()).collect::<Vec<_>>(), ["gqa", "iha", "iha"]);
    assert!(r.results.iter().all(|r| r.decode.is_some() && r.n == 1 && r.m == 256 && r.batch == 1));
    assert!(r.results.iter().all(|r| r.decode.as_ref().unwrap().roofline_s.is_some()));
    ok(&["bench", "--load", &d]);
    refused(&["bench", "--sweep", "decode", "--svg", &path("d.svg")], "--svg");
    refused(&["bench", "--load", &d, "--svg", &path("d.svg")], "--svg");
    // Sizes and lists need no device; the plan for the peers is JSON with FLOPs and bytes.
    assert!(ok(&["bench", "--sizes-only"]).contains("4097 ring"));
    assert!(ok(&["bench", "--sizes-only", "--sweep", "decode", "--filter", "L=131072"]).contains("131072"));
    // Decode is timed on device caches: one row per case, no forward N = 1 stand-in.
    let list = ok(&["bench", "--list", "--sweep", "decode", "--backend", "cuda,cpu"]);
    assert!(list.contains("cuda\tiha P=2 B=8 L=32768 d=128 bf16") && !list.contains("N=1"), "{list}");
    let plan = path("plan.json");
    ok(&["bench", "--list", "--sweep", "quick", "--backend", "cpu", "--json", &plan]);
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(
        plan.as_array().unwrap().len(),
        headmix_bench::sweep::Sweep::Quick.cases(headmix_bench::sweep::Scale::Host).len()
    );
    assert!(plan[0]["flops"].as_f64().unwrap() > 0.0 && plan[0]["label"] == "mha B=1 N=64 d=64 f32");
    std::fs::remove_dir_all(&dir).unwrap();
}
