//! The wgpu backend (WGSL kernels) against the f64 reference: property suites over random shapes
//! for every method and option, in f32, f16 and bf16, for the flash kernel and the naive
//! baseline; large logits; multi-tile shapes (several query and key tiles, partial tiles,
//! window tile skipping); the zero-copy entry point; device timing; typed errors.
//!
//! Runs on any adapter, Mesa's lavapipe included (slow: shapes are kept small). Skips with one
//! line when no adapter is found; `HEADMIX_REQUIRE_WGPU=1` makes that a failure.
//! Rows that see no key (lse = -inf, output 0) cannot be built through the validated API (with
//! `M >= N` every virtual query sees its diagonal key); the kernels handle them (`l = 0`).

use headmix::backends::wgpu::{DeviceIo, Variant, WgpuBackend};
use headmix::reference::Rounding;
use headmix::timing::Owned;
use headmix::{
    Backend, BackendKind, Config, DType, Error, Io, Method, PosMode, Problem, Rope, Tensor, TensorMut, Weights,
};
use headmix_tests::cases::{Limits, Spec, specs};
use headmix_tests::{Case, check_property, device_or_skip};
use proptest::prelude::*;

/// The flash backend, or a one-line skip.
fn flash(test: &str) -> Option<Box<dyn Backend>> {
    device_or_skip(BackendKind::Wgpu, test)
}

/// Flash backends with the split-KV heuristic, with splitting off, and with 3 key ranges per
/// query tile; or a one-line skip.
fn flash_splits(test: &str) -> Option<[WgpuBackend; 3]> {
    device_or_skip(BackendKind::Wgpu, test)?;
    let open = |s| WgpuBackend::new().expect("opened once already").with_kv_splits(s);
    Some([open(None), open(Some(1)), open(Some(3))])
}

/// The naive baseline on its own device, or a one-line skip.
fn naive(test: &str) -> Option<WgpuBackend> {
    device_or_skip(BackendKind::Wgpu, test)?;
    Some(WgpuBackend::new().expect("opened once already").with_variant(Variant::Naive))
}

/// Small random problems of every method, custom head counts (`Hq`, `Hk` apart from `H`) and
/// `P` above `H` included: `max_n` query tokens at most, head dims from `dims`, far position
/// offsets (60k..70k) beside small ones, windows up to 12 virtual tokens. The default softmax
/// scale only: a sharper one with a head norm over one head reaches the f32 bound on lavapipe
/// (1.02e-5 at scale 0.45, Group norm, H = 1; the CPU backend 7.8e-6 on the same case).
fn shapes(max_n: usize, dims: &[usize], dtypes: &[DType]) -> impl Strategy<Value = Spec> {
    let mut methods = Method::ALL.to_vec();
    methods.push(Method::Custom);
    specs(Limits {
        max_pseudo: 3,
        max_n,
        head_dims: dims.to_vec(),
        dtypes: dtypes.to_vec(),
        methods,
        max_window: (12, 4),
        max_pos: 50,
        far_pos: Some((60_000, 70_000)),
        max_scale: None,
        ..Limits::default()
    })
}

#[test]
fn flash_f32_matches_reference_on_random_shapes() {
    let Some(bes) = flash_splits("flash_f32_matches_reference_on_random_shapes") else { return };
    check_property("flash f32", 128, shapes(24, &[32, 64, 128], &[DType::F32]), |s| {
        let (be, splits) = (&bes[s.seed as usize % 3], ["auto", "1", "3"][s.seed as usize % 3]);
        s.case().check(be, &format!("flash splits={splits} {s:?}"));
    });
}

#[test]
fn flash_f16_matches_reference_on_random_shapes() {
    let Some(bes) = flash_splits("flash_f16_matches_reference_on_random_shapes") else { return };
    check_property("flash f16", 64, shapes(16, &[32, 64, 128], &[DType::F16]), |s| {
        let (be, splits) = (&bes[s.seed as usize % 3], ["auto", "1", "3"][s.seed as usize % 3]);
        s.case().check(be, &format!("flash splits={splits} {s:?}"));
    });
}

#[test]
fn flash_bf16_matches_reference_on_random_shapes() {
    let Some(bes) = flash_splits("flash_bf16_matches_reference_on_random_shapes") else { return };
    check_property("flash bf16", 64, shapes(16, &[32, 64, 128], &[DType::BF16]), |s| {
        let (be, splits) = (&bes[s.seed as usize % 3], ["auto", "1", "3"][s.seed as usize % 3]);
        s.case().check(be, &format!("flash splits={splits} {s:?}"));
    });
}

#[test]
fn naive_matches_reference_on_random_shapes() {
    let Some(be) = naive("naive_matches_reference_on_random_shapes") else { return };
    // Small enough for llvmpipe's loop budget (a thread walks all its keys; see long_loops_*).
    check_property("naive", 48, shapes(8, &[32, 64], &[DType::F32, DType::F16, DType::BF16]), |s| {
        s.case().check(&be, &format!("naive {s:?}"));
    });
}

/// Several query tiles and key tiles, partial last tiles, and a window narrower than a tile
/// band, so that whole key tiles are skipped; with a KV prefix, RoPE and an odd P. Each with
/// split-KV off, on (4 ranges, some empty) and by the heuristic.
#[test]
fn flash_multi_tile_window_and_prefix() {
    let Some(bes) = device_or_skip(BackendKind::Wgpu, "flash_multi_tile_window_and_prefix") else { return };
    drop(bes);
    for splits in [Some(1), Some(4), None] {
        let be = WgpuBackend::new().expect("adapter present").with_kv_splits(splits);
        multi_tile_cases(&be, &format!("splits {splits:?}"));
    }
}

fn multi_tile_cases(be: &WgpuBackend, what: &str) {
    let cfg = Config::iha_window(2, 3, 64, 9).with_rope(Rope::default()).with_pos_offset(7);
    let w = Weights::random(&cfg, 1);
    let case = Case::random(cfg, w, 1, 61, 83, DType::F32, 2);
    case.check(be, &format!("multi-tile iha-local, M > N, rope, {what}"));
    // Non-causal two-sided window with norm and no collapse, d = 128 (smaller tiles).
    let cfg = Config::mea(2, 128)
        .with_causal(false)
        .with_window(20, 13)
        .with_rope(Rope { base: 500.0, mode: PosMode::Token });
    let case = Case::random(cfg, Weights::random(&cfg, 3), 2, 50, 70, DType::F32, 4);
    case.check(be, &format!("multi-tile mea, two-sided window, d = 128, {what}"));
    // Global causal IHA, batch 2, 400 virtual queries per head: many query and key tiles.
    let cfg = Config::iha(2, 2, 64).with_rope(Rope::default());
    let case = Case::random(cfg, Weights::random(&cfg, 17), 2, 200, 200, DType::F32, 18);
    case.check(be, &format!("multi-tile iha, 400 virtual tokens, {what}"));
    // Global causal IHA, f16, enough queries for several tiles.
    let cfg = Config::iha(2, 2, 64);
    let case = Case::random(cfg, Weights::random(&cfg, 5), 1, 45, 45, DType::F16, 6);
    case.check(be, &format!("multi-tile iha f16, {what}"));
}

/// RoPE from the host's per-call table (one (cos, sin) row per position, built in f64): both
/// position modes, M > N (queries at bottom-right-aligned positions), offsets up to near 2^31 (the validated limit),
/// several key tiles, on the flash kernel (with and without split-KV) and the naive one, against
/// the f64 reference within the f32 tolerance. Negative controls: the reference with the other
/// position mode, or another base, is outside that tolerance.
#[test]
fn rope_table_matches_reference_in_both_position_modes() {
    let Some(be) = flash("rope_table_matches_reference_in_both_position_modes") else { return };
    let split = WgpuBackend::new().expect("adapter present").with_kv_splits(Some(3));
    let nv = naive("rope_table_matches_reference_in_both_position_modes").expect("adapter present");
    let mut checked = 0;
    for mode in [PosMode::Virtual, PosMode::Token] {
        for (pos0, n, m, d) in [(0, 37, 90, 64), (65_536 + 17, 20, 45, 32), (2_147_000_000, 9, 30, 128)] {
            let cfg = Config::iha(2, 3, d).with_rope(Rope { base: 10000.0, mode }).with_pos_offset(pos0);
            let case = Case::random(cfg, Weights::random(&cfg, 31), 1, n, m, DType::F32, 32 + pos0 as u64);
            let what = format!("{mode:?} pos0 {pos0} N {n} M {m} d {d}");
            case.check(be.as_ref(), &format!("flash rope {what}"));
            case.check(&split, &format!("flash split-KV rope {what}"));
            if d == 32 {
                // Within llvmpipe's loop budget for the naive kernel (one thread walks every key).
                case.check(&nv, &format!("naive rope {what}"));
            }
            // Negative controls (RoPE scores depend on position differences only, so a global
            // shift is invisible): the other position mode's relative positions, and a table of
            // other frequencies, both move the output past the tolerance.
            let (out, _) = case.run(be.as_ref()).expect("runs");
            let other_mode = if mode == PosMode::Virtual { PosMode::Token } else { PosMode::Virtual };
            for (rope, why) in
                [(Rope { base: 10000.0, mode: other_mode }, "other mode"), (Rope { base: 9000.0, mode }, "other base")]
            {
                let mut wrong = Case::random(cfg, Weights::random(&cfg, 31), 1, n, m, DType::F32, 32 + pos0 as u64);
                wrong.problem.cfg = cfg.with_rope(rope);
                let err = headmix::reference::rel_err(&out, &wrong.reference(Rounding::Exact).out);
                assert!(err > 1e-4, "{what}: the reference with the {why} must differ ({err:.2e})");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

/// Long loops: Mesa's llvmpipe silently ends an invocation's loops after 65535 iterations in all.
/// The flash kernel must still be right on a long cache (it splits the keys under the adapter's
/// loop budget), and the naive kernel must either be right or refuse with `Unsupported`, never
/// return truncated sums. (Without the budget, the naive case below returns wrong values on
/// llvmpipe: it sees only its first ~400 keys.)
#[test]
fn long_loops_are_split_or_refused() {
    let Some(be) = flash("long_loops_are_split_or_refused") else { return };
    let cfg = Config::iha(2, 2, 64).with_rope(Rope::default());
    let case = Case::random(cfg, Weights::random(&cfg, 23), 1, 1, 3000, DType::F32, 24);
    case.check(be.as_ref(), "flash decode over a 6000-key cache");
    let nv = naive("long_loops_are_split_or_refused").expect("adapter present");
    let cfg = Config::iha(1, 1, 32);
    let case = Case::random(cfg, Weights::random(&cfg, 25), 1, 1, 600, DType::F32, 26);
    match case.run(&nv) {
        Ok(_) => case.check(&nv, "naive decode over 600 keys"),
        Err(Error::Unsupported { why, .. }) => {
            assert!(nv.loop_budget().is_some() && why.contains("loop iterations"), "{why}")
        }
        Err(e) => panic!("naive decode over 600 keys: {e}"),
    }
}

/// Decode: one or two new tokens against a long KV cache (split-KV by the heuristic), RoPE at
/// the bottom-right-aligned positions with an offset, compressed MEA and IHA.
#[test]
fn flash_decode_against_long_cache() {
    let Some(be) = flash("flash_decode_against_long_cache") else { return };
    for (n, dtype) in [(1, DType::F32), (2, DType::BF16)] {
        let cfg = Config::iha(2, 2, 64).with_rope(Rope::default()).with_pos_offset(1000);
        let case = Case::random(cfg, Weights::random(&cfg, 19), 1, n, 300, dtype, 20);
        case.check(be.as_ref(), &format!("decode iha n={n} {dtype:?}"));
        let cfg = Config::mea_compressed(4, 2, 32).expect("valid").with_causal(true);
        let case = Case::random(cfg, Weights::random(&cfg, 21), 2, n, 257, dtype, 22);
        case.check(be.as_ref(), &format!("decode mea-compressed n={n} {dtype:?}"));
    }
}

/// Logits of several hundred: the online softmax must rescale without overflow.
#[test]
fn flash_and_naive_large_logits() {
    let Some(be) = flash("flash_and_naive_large_logits") else { return };
    let Some(nv) = naive("flash_and_naive_large_logits") else { return };
    for (i, scale) in [40.0f32, 400.0].into_iter().enumerate() {
        let cfg = Config::iha(2, 2, 32).with_scale(scale);
        let case = Case::random(cfg, Weights::random(&cfg, 7), 1, 20, 24, DType::F32, 8 + i as u64);
        let exact = case.reference(Rounding::Exact);
        let max_lse = exact.lse.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(max_lse > 50.0, "logits are not large ({max_lse})");
        case.check(be.as_ref(), &format!("flash, scale {scale}"));
        case.check(&nv, &format!("naive, scale {scale}"));
    }
}

/// d = 256, the largest head dimension: tiles shrink to fit the workgroup memory.
#[test]
fn flash_head_dim_256() {
    let Some(be) = flash("flash_head_dim_256") else { return };
    let cfg = Config::iha(2, 2, 256).with_rope(Rope::default());
    let case = Case::random(cfg, Weights::random(&cfg, 9), 1, 9, 11, DType::BF16, 10);
    case.check(be.as_ref(), "iha d = 256 bf16");
}

/// A test of the tests: a wrong kernel result must fail `Case::check` (here the reference of a
/// different problem).
#[test]
fn check_detects_a_wrong_answer() {
    let Some(be) = flash("check_detects_a_wrong_answer") else { return };
    let cfg = Config::iha(2, 2, 32);
    let case = Case::random(cfg, Weights::random(&cfg, 11), 1, 6, 6, DType::F32, 12);
    let mut other = Case::random(cfg, Weights::random(&cfg, 11), 1, 6, 6, DType::F32, 12);
    other.q[5] += 0.05; // a single input element changed
    case.check(be.as_ref(), "control");
    let (out, _) = other.run(be.as_ref()).expect("runs");
    let err = headmix::reference::rel_err(&out, &case.reference(Rounding::Exact).out);
    assert!(err > 1e-5, "a changed input must move the output past the f32 tolerance ({err:.2e})");
}

/// f16 / bf16 outputs are the round-to-nearest-even of the kernel's f32 result (arithmetic is f32
/// for every dtype, so the same inputs run in f32 give the unrounded values), on both store paths:
/// the attention kernel's (no collapse, no norm) and the epilogue's. Catches a truncating store,
/// which the 2x-reference error rule of `Case::check` lets through.
#[test]
fn low_precision_outputs_round_to_nearest() {
    let Some(be) = flash("low_precision_outputs_round_to_nearest") else { return };
    for dtype in [DType::F16, DType::BF16] {
        for collapse in [false, true] {
            let cfg = Config::iha(2, 2, 32).with_rope(Rope::default());
            let mut w = Weights::random(&cfg, 15);
            if !collapse {
                w.r = None;
            }
            let case = Case::random(cfg, w, 1, 12, 14, dtype, 16);
            let wide = Case {
                problem: Problem::for_weights(&cfg, &case.weights, 1, 12, 14, DType::F32).unwrap(),
                weights: case.weights.clone(),
                q: case.q.clone(),
                k: case.k.clone(),
                v: case.v.clone(),
            };
            let (low, _) = case.run(be.as_ref()).expect("runs");
            let (high, _) = wide.run(be.as_ref()).expect("runs");
            let rounded = Owned::from_f32(dtype, &high).to_f32();
            let same = low.iter().zip(&rounded).filter(|(a, b)| a == b).count();
            assert!(
                same * 100 >= 99 * low.len(),
                "{dtype:?} collapse={collapse}: only {same} of {} outputs are the nearest value",
                low.len()
            );
        }
    }
}

fn poisoned_io_result(be: &dyn Backend, cfg: &Config, w: &Weights, q_shape: [usize; 4]) -> (Error, Vec<f32>) {
    let [b, n, _, d] = q_shape;
    let q = vec![0.5f32; q_shape.iter().product()];
    let kv = vec![0.25f32; b * n * cfg.kv_heads * d];
    let mut out = vec![f32::NAN; b * n * cfg.heads * d];
    let e = be
        .forward(
            cfg,
            w,
            Io {
                q: Tensor::new(&q, &q_shape),
                k: Tensor::new(&kv, &[b, n, cfg.kv_heads, d]),
                v: Tensor::new(&kv, &[b, n, cfg.kv_heads, d]),
                out: TensorMut::new(&mut out, &[b, n, cfg.heads, d]),
                lse: None,
            },
        )
        .expect_err("invalid input");
    (e, out)
}

/// Bad input gives a typed error before anything is written; oversized problems are refused with
/// `Unsupported` naming the binding (never truncated).
#[test]
fn typed_errors_for_bad_and_oversized_input() {
    let Some(be) = flash("typed_errors_for_bad_and_oversized_input") else { return };
    let cfg = Config::mha(2, 32);
    let w = Weights::random(&cfg, 1);
    let (e, out) = poisoned_io_result(be.as_ref(), &cfg, &w, [1, 4, 3, 32]);
    assert!(matches!(e, Error::Shape { what: "q", .. }), "{e}");
    assert!(out.iter().all(|x| x.is_nan()), "output written despite the error");

    // Oversized: q alone is 4·2^25·... bytes, above the adapter's storage-binding limit.
    let wb = WgpuBackend::new().expect("adapter present");
    let max = wb.device().limits().max_storage_buffer_binding_size;
    // A narrow window keeps the work per workgroup small (llvmpipe's loop budget plays no part).
    let cfg = Config::mha(4, 64).with_window(64, 0);
    let n = (max / (4 * 4 * 64)) as usize + 1; // one token more than fits
    let big = Problem::new(&cfg, 1, n, n, DType::F32, false, false).unwrap();
    let e = wb.supports(&big).expect_err("over the binding limit");
    assert!(matches!(&e, Error::Unsupported { backend: "wgpu", why } if why.contains("q needs")), "{e}");
    let ok = Problem::new(&cfg, 1, n - 1, n - 1, DType::F32, false, false).unwrap();
    wb.supports(&ok).expect("just fits");

    // The zero-copy entry point refuses tensors that are too small or of another dtype.
    let cfg = Config::iha(2, 2, 32);
    let w = Weights::random(&cfg, 2);
    let buf = |len: usize| wb.alloc_tensor(DType::F32, len).unwrap();
    let (q, small) = (buf(4 * 2 * 32), buf(1));
    let io = DeviceIo { q: &q, k: &q, v: &q, out: &small, lse: None };
    let e = wb.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io).expect_err("out too small");
    assert!(matches!(e, Error::Length { what: "out buffer", .. }), "{e}");
    let e = wb.forward_buffers(&cfg, &w, 1, 5, 4, DType::F32, io).expect_err("N > M");
    assert!(matches!(e, Error::QueryLongerThanKeys { .. }), "{e}");
    let half = wb.alloc_tensor(DType::BF16, 4 * 2 * 32).unwrap();
    let io = DeviceIo { q: &q, k: &q, v: &q, out: &half, lse: None };
    let e = wb.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io).expect_err("bf16 out of an f32 call");
    assert_eq!(e, Error::DType { what: "out buffer", expected: DType::F32, got: DType::BF16 });

    // An output also bound as the read-only query is refused up front as `Error::Alias`
    // (issue 11), not left to wgpu's validation; the backend stays usable.
    let (q, out) = (buf(4 * 2 * 32), buf(4 * 2 * 32));
    let io = DeviceIo { q: &out, k: &q, v: &q, out: &out, lse: None };
    let cfg = Config::mha(2, 32);
    let w = Weights::random(&cfg, 3);
    let e = wb.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io).expect_err("aliased in/out");
    assert_eq!(e, Error::Alias { what: "out buffer", other: "q buffer" });
    let io = DeviceIo { q: &q, k: &q, v: &q, out: &out, lse: None };
    wb.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io).expect("still usable after errors");
}

/// `forward_buffers` on device tensors (uploaded, allocated, downloaded) equals the host path
/// bit for bit, for f32 and bf16.
#[test]
fn zero_copy_matches_reference() {
    let Some(_) = flash("zero_copy_matches_reference") else { return };
    let wb = WgpuBackend::new().expect("adapter present");
    for dtype in [DType::F32, DType::BF16] {
        let cfg = Config::iha(3, 2, 32).with_rope(Rope::default());
        let case = Case::random(cfg, Weights::random(&cfg, 13), 2, 7, 9, dtype, 14);
        let p = case.problem;
        let upload =
            |x: &[f32], shape: &[usize]| wb.upload_tensor(Owned::from_f32(dtype, x).tensor(shape).data).unwrap();
        let (q, k, v) =
            (upload(&case.q, &case.q_shape()), upload(&case.k, &case.kv_shape()), upload(&case.v, &case.kv_shape()));
        let out_len: usize = p.out_shape().iter().product();
        let (out, lse) = (wb.alloc_tensor(dtype, out_len).unwrap(), wb.alloc_tensor(DType::F32, p.lse_len()).unwrap());
        let io = DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: Some(&lse) };
        wb.forward_buffers(&cfg, &case.weights, p.batch, p.n, p.m, dtype, io).expect("zero-copy forward");
        let got = wb.download_f32(&out).expect("read back out");
        let lse_got = wb.download_f32(&lse).expect("read back lse");
        let (host_out, host_lse) = case.run(&wb).expect("host path");
        assert_eq!(got, host_out, "{dtype:?}: zero-copy output differs from the host path");
        assert_eq!(lse_got, host_lse, "{dtype:?}: zero-copy lse differs from the host path");
        case.check(&wb, &format!("zero-copy {dtype:?} (host path)"));
    }
}

/// `time` returns one positive duration per repetition, by timestamps where the adapter has them.
#[test]
fn timing_reports_device_time() {
    let Some(_) = flash("timing_reports_device_time") else { return };
    // Up to three passes (attention, split-KV combine, collapse epilogue): stamps on the first and last.
    for (variant, splits) in [(Variant::Flash, None), (Variant::Flash, Some(3)), (Variant::Naive, None)] {
        let wb = WgpuBackend::new().expect("adapter present").with_variant(variant).with_kv_splits(splits);
        let cfg = Config::iha(2, 2, 32);
        let w = Weights::random(&cfg, 1);
        let problem = Problem::new(&cfg, 1, 16, 16, DType::F16, true, false).unwrap();
        let t = wb.time(&problem, &w, 3).expect("timed");
        assert_eq!(t.seconds.len(), 3);
        assert!(t.seconds.iter().all(|&s| s > 0.0 && s < 10.0), "{:?}", t.seconds);
        assert_eq!(t.clock, if wb.has_timestamps() { "wgpu timestamps" } else { "wall clock (submit + wait)" });
        assert!(t.extra_bytes > 0);
    }
}

/// IHA-local: each virtual query sees exactly W·P keys (itself included), flash and naive
/// kernels; the count fails at the old width W·P + 1.
#[test]
fn iha_local_window_sees_exactly_wp_keys() {
    let Some(be) = flash("iha_local_window_sees_exactly_wp_keys") else { return };
    headmix_tests::check_iha_local_window(be.as_ref(), "wgpu flash");
    let nv = naive("iha_local_window_sees_exactly_wp_keys").expect("adapter present");
    headmix_tests::check_iha_local_window(&nv, "wgpu naive");
}

/// MEA's GroupNorm in the WGSL epilogue (with and without collapse), with its negative controls.
#[test]
fn mea_group_norm_with_negative_controls() {
    let Some(be) = flash("mea_group_norm_with_negative_controls") else { return };
    headmix_tests::check_group_norm(be.as_ref(), "wgpu flash");
}
