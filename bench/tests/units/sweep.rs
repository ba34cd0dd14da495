//! Tests of `bench/src/sweep.rs`.

use headmix::validate::{MAX_INDEX, validate_config, validate_weights};
use headmix::{BackendKind, DType, Method};
use headmix_bench::sweep::*;
use std::collections::BTreeSet;

#[test]
fn every_case_of_every_sweep_builds_a_valid_problem() {
    for sweep in Sweep::ALL {
        assert_eq!(Sweep::parse(sweep.name()), Some(sweep));
        for scale in [Scale::Gpu, Scale::Host] {
            for case in sweep.cases(scale) {
                let cfg = case.config().unwrap();
                validate_config(&cfg).unwrap();
                validate_weights(&cfg, &case.weights().unwrap()).unwrap();
                assert!(cfg.causal && case.held().unwrap() <= case.m, "{}", case.label());
                assert_eq!(case.mode == Mode::Forward, !sweep.is_decode());
            }
        }
    }
    assert_eq!(Sweep::parse("decode-full"), None);
}

#[test]
fn software_devices_get_host_sizes() {
    assert_eq!(Scale::of(BackendKind::Cpu, "host CPU (2 threads)", &[]), Scale::Host);
    assert_eq!(Scale::of(BackendKind::Cuda, "NVIDIA H100 80GB HBM3", &[]), Scale::Gpu);
    assert_eq!(Scale::of(BackendKind::Wgpu, "NVIDIA GeForce RTX 4090", &[]), Scale::Gpu);
    assert_eq!(Scale::of(BackendKind::Wgpu, "llvmpipe (LLVM 19.1.7, 256 bits)", &[]), Scale::Host);
    let describe = [("device type".to_string(), "Cpu".to_string())];
    assert_eq!(Scale::of(BackendKind::Wgpu, "some adapter", &describe), Scale::Host);
}

#[test]
fn forward_sweeps_cover_the_issue_grid() {
    let full = Sweep::Full.cases(Scale::Gpu);
    let ns: BTreeSet<_> = full.iter().map(|c| c.n).collect();
    assert_eq!(ns.into_iter().collect::<Vec<_>>(), [1024, 2048, 4096, 8192, 16384]);
    for p in [1, 2, 4, 8] {
        assert!(full.iter().any(|c| c.method == Method::IhaLocal && c.pseudo == p));
    }
    assert!(full.iter().all(|c| c.batch * c.n == 16384 && c.heads * c.head_dim == 2048 && c.m == c.n));
    assert!(Sweep::Full.cases(Scale::Host).iter().all(|c| c.n <= 256));
    // IHA local uses the paper's window: W = N / (2 P²) tokens, each virtual query sees W·P
    // virtual keys, its own included: window (W·P − 1, 0).
    let c = full.iter().find(|c| c.method == Method::IhaLocal && c.pseudo == 4 && c.n == 4096).unwrap();
    assert_eq!(c.config().unwrap().window.unwrap().left, 4096 / 32 * 4 - 1);
    assert_eq!(c.label(), "iha-local P=4 B=4 N=4096 d=64 bf16");
}

#[test]
fn decode_sweeps_cover_the_issue_grid_and_host_sizes_stay_small() {
    let full: Vec<Case> = Sweep::Decode.cases(Scale::Gpu).into_iter().filter(|c| c.mode == Mode::Decode).collect();
    let lens: BTreeSet<_> = full.iter().map(|c| c.m).collect();
    assert_eq!(lens.into_iter().collect::<Vec<_>>(), [4096, 8192, 16384, 32768, 65536, 131072]);
    let batches: BTreeSet<_> = full.iter().map(|c| c.batch).collect();
    assert_eq!(batches.into_iter().collect::<Vec<_>>(), [1, 8, 64]);
    assert!(full.iter().all(|c| c.heads == 16 && c.head_dim == 128 && c.dtype == DType::BF16 && c.n == 1));
    // The first bar of the issue, B = 8 at 32k tokens, in both GPU sweeps, with its forward twin.
    for sweep in [Sweep::Decode, Sweep::DecodeQuick] {
        let cases = sweep.cases(Scale::Gpu);
        assert!(cases.iter().all(|c| c.mode == Mode::Decode));
        for m in Method::ALL {
            assert!(cases.iter().any(|c| c.method == m && c.batch == 8 && c.m == 32768), "{m:?}");
        }
        assert!(sweep.cases(Scale::Host).iter().all(|c| c.m <= 4096 && c.heads == 4 && c.mode == Mode::Decode));
    }
    assert_eq!(full[1].label(), "gqa Hk=4 B=1 L=4096 d=128 bf16");
}

/// Every GPU case's sequence fits the kernels' 32-bit per-sequence indices (`capacity·Hk·d`),
/// so the whole grid builds its cache, B = 8 and B = 64 at 128k tokens included (64-bit bases).
#[test]
fn every_gpu_case_fits_the_per_sequence_index_limit() {
    for c in Sweep::Decode.cases(Scale::Gpu) {
        assert!(c.held().unwrap() * c.kv_heads * c.head_dim <= MAX_INDEX, "{}", c.label());
    }
}

#[test]
fn ring_cases_hold_the_window_and_the_new_token() {
    // IHA local, L = 32768, P = 2: W = 32768 / 8 = 4096 tokens, ring of 4097.
    let c = issue_size_cases().into_iter().find(|c| c.method == Method::IhaLocal && c.pseudo == 2).unwrap();
    assert_eq!(c.config().unwrap().window.unwrap().left, 4096 * 2 - 1);
    assert_eq!(c.held().unwrap(), 4097);
    let small = Case { batch: 2, m: 256, heads: 4, kv_heads: 4, head_dim: 8, dtype: DType::F32, ..c };
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let cache = small.empty_cache(cpu.as_ref()).unwrap();
    assert_eq!((cache.shape().capacity, small.layout_name()), (small.held().unwrap(), "ring"));
    assert_eq!(cache.bytes(), small.cache_bytes().unwrap().headmix);
    // A global IHA case keeps every token in a linear cache.
    let global = Case { method: Method::Iha, ..small };
    let cache = global.empty_cache(cpu.as_ref()).unwrap();
    assert_eq!((cache.shape().capacity, global.layout_name()), (256, "linear"));
    assert_eq!(cache.bytes(), global.cache_bytes().unwrap().headmix);
}

#[test]
fn issue_sizes_are_p_and_h_over_hk_times_smaller() {
    for c in issue_size_cases() {
        let b = c.cache_bytes().unwrap();
        let want = match c.method {
            Method::Iha | Method::IhaLocal => c.pseudo as f64,
            Method::Mea | Method::MeaCompressed => (c.heads / c.kv_heads) as f64,
            _ => 1.0,
        };
        assert_eq!(b.ratio(), want, "{}", c.label());
        // B · held · Hk · d · 2 (k and v) · 2 bytes.
        assert_eq!(b.headmix, 8 * c.held().unwrap() * c.kv_heads * 128 * 2 * 2, "{}", c.label());
    }
}
