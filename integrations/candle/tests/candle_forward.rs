//! headmix-candle against the f64 reference: random problems of every method (proptest) as candle
//! CPU tensors in f32, f16 and bf16, the log-sum-exp, the layouts candle produces (offsets,
//! non-contiguous views), candle errors for bad inputs, a negative control, and the CUDA path
//! (runs when a GPU is present; `HEADMIX_REQUIRE_CUDA=1` makes a missing GPU fail).

use candle_core::{DType as CDType, Device, Tensor};
use headmix::reference::{Rounding, max_abs_err, rel_err};
use headmix::{Config, DType, Weights};
use headmix_tests::cases::{Limits, Spec, specs};
use headmix_tests::{Case, check_lse, check_property, rounding, tolerance};

fn cdtype(d: DType) -> CDType {
    match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
    }
}

/// The case's inputs as candle tensors of its dtype on `dev`.
fn inputs(case: &Case, dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let t = |x: &Vec<f32>, shape: [usize; 4]| {
        Tensor::from_vec(x.clone(), &shape, dev).and_then(|t| t.to_dtype(cdtype(dtype))).expect("input tensor")
    };
    (t(&case.q, case.q_shape()), t(&case.k, case.kv_shape()), t(&case.v, case.kv_shape()))
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(CDType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("readback")
}

/// Compare an output (and lse) with the reference; `Err` says how it failed.
fn compare(case: &Case, dtype: DType, out: &[f32], lse: Option<&[f32]>) -> Result<f64, String> {
    let exact = case.reference(Rounding::Exact);
    if out.len() != exact.out.len() {
        return Err(format!("output has {} elements, expected {}", out.len(), exact.out.len()));
    }
    if out.iter().any(|x| x.is_nan()) {
        return Err("output has NaN".into());
    }
    let err = rel_err(out, &exact.out);
    if err > tolerance(dtype) {
        return Err(format!("relative error {err:.3e} above {:.0e}", tolerance(dtype)));
    }
    if dtype != DType::F32 {
        let low = case.reference(rounding(dtype));
        let ref_err = max_abs_err(&low.out, &exact.out);
        let our_err = max_abs_err(out, &exact.out);
        let atol = 1e-3 * exact.out.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
        if our_err > 2.0 * ref_err + atol {
            return Err(format!("max error {our_err:.3e} above 2 x {ref_err:.3e} + {atol:.1e}"));
        }
    }
    if let Some(lse) = lse {
        check_lse(lse, &exact.lse, if dtype == DType::F32 { 1e-4 } else { 2e-2 }, "lse");
    }
    Ok(err)
}

fn run_spec(spec: &Spec, dev: &Device) {
    let (cfg, w, case) = (spec.config(), spec.weights(), spec.case());
    let (q, k, v) = inputs(&case, spec.dtype, dev);
    let out = headmix_candle::forward(&q, &k, &v, &cfg, &w).unwrap_or_else(|e| panic!("{e} ({spec:?})"));
    assert_eq!(out.dtype(), cdtype(spec.dtype));
    assert!(out.device().same_device(dev));
    compare(&case, spec.dtype, &to_f32(&out), None).unwrap_or_else(|e| panic!("forward: {e} ({spec:?})"));
    let (out, lse) =
        headmix_candle::forward_with_lse(&q, &k, &v, &cfg, &w).unwrap_or_else(|e| panic!("{e} ({spec:?})"));
    let lse_v = lse.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("lse readback");
    assert_eq!(lse.dims(), &[spec.batch, cfg.heads, spec.n * cfg.pseudo]);
    compare(&case, spec.dtype, &to_f32(&out), Some(&lse_v))
        .unwrap_or_else(|e| panic!("forward_with_lse: {e} ({spec:?})"));
}

#[test]
fn cpu_tensors_match_the_reference_on_random_problems() {
    check_property("candle cpu", 48, specs(Limits::default()), |spec| run_spec(&spec, &Device::Cpu));
}

/// The check fails on a deliberately wrong variant: keys and values swapped, and weights of
/// another seed.
#[test]
fn negative_control_wrong_inputs_or_weights_fail_the_check() {
    let cfg = Config::iha(3, 2, 8);
    let w = Weights::random(&cfg, 11);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let case = Case::random(cfg, w.clone(), 2, 7, 9, dtype, 5);
        let (q, k, v) = inputs(&case, dtype, &Device::Cpu);
        let good = headmix_candle::forward(&q, &k, &v, &cfg, &w).unwrap();
        compare(&case, dtype, &to_f32(&good), None).expect("the right variant passes");
        let swapped = headmix_candle::forward(&q, &v, &k, &cfg, &w).unwrap();
        assert!(compare(&case, dtype, &to_f32(&swapped), None).is_err(), "{dtype:?}: swapped k/v passed");
        let other = headmix_candle::forward(&q, &k, &v, &cfg, &Weights::random(&cfg, 12)).unwrap();
        assert!(compare(&case, dtype, &to_f32(&other), None).is_err(), "{dtype:?}: other weights passed");
    }
}

/// Candle views: a contiguous slice at an offset runs in place; a strided view is refused with
/// candle's `RequiresContiguous` and runs after `.contiguous()`.
#[test]
fn layouts_offsets_run_strided_views_are_refused() {
    let cfg = Config::mea(2, 8);
    let w = Weights::random(&cfg, 3);
    let case = Case::random(cfg, w.clone(), 1, 5, 5, DType::F32, 9);
    let (q, k, v) = inputs(&case, DType::F32, &Device::Cpu);
    let want = to_f32(&headmix_candle::forward(&q, &k, &v, &cfg, &w).unwrap());

    // The same q as the second batch element of a larger tensor: a start offset, still contiguous.
    let q2 = Tensor::cat(&[&q.affine(2.0, 1.0).unwrap(), &q], 0).unwrap().narrow(0, 1, 1).unwrap();
    assert!(q2.is_contiguous() && q2.layout().start_offset() > 0);
    assert_eq!(to_f32(&headmix_candle::forward(&q2, &k, &v, &cfg, &w).unwrap()), want);

    // The same q stored [B, N, d, H] and viewed as [B, N, H, d]: strided.
    let qt = q.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
    assert!(!qt.is_contiguous());
    let e = headmix_candle::forward(&qt, &k, &v, &cfg, &w).unwrap_err();
    assert!(matches!(e, candle_core::Error::RequiresContiguous { op: "headmix" }), "{e:?}");
    assert_eq!(to_f32(&headmix_candle::forward(&qt.contiguous().unwrap(), &k, &v, &cfg, &w).unwrap()), want);
}

/// Bad inputs are candle errors naming the problem, never panics.
#[test]
fn bad_inputs_are_candle_errors() {
    let cfg = Config::gqa(4, 2, 8).unwrap();
    let w = Weights::random(&cfg, 1);
    let dev = Device::Cpu;
    let t = |shape: &[usize], dt: CDType| Tensor::randn(0f32, 1.0, shape, &dev).unwrap().to_dtype(dt).unwrap();
    let (q, kv) = (t(&[1, 6, 4, 8], CDType::F32), t(&[1, 6, 2, 8], CDType::F32));
    headmix_candle::forward(&q, &kv, &kv, &cfg, &w).expect("the valid call runs");

    let e = headmix_candle::forward(&t(&[6, 4, 8], CDType::F32), &kv, &kv, &cfg, &w).unwrap_err();
    assert!(matches!(e, candle_core::Error::UnexpectedNumberOfDims { expected: 4, got: 3, .. }), "{e:?}");
    let e = headmix_candle::forward(&q, &kv, &t(&[1, 6, 2, 8], CDType::F16), &cfg, &w).unwrap_err();
    assert!(matches!(e, candle_core::Error::DTypeMismatchBinaryOp { .. }), "{e:?}");
    let e = headmix_candle::forward(&t(&[1, 6, 4, 8], CDType::F64), &kv, &kv, &cfg, &w).unwrap_err();
    assert!(matches!(e, candle_core::Error::UnsupportedDTypeForOp(CDType::F64, "headmix")), "{e:?}");
    let e = headmix_candle::forward(&q, &kv, &t(&[1, 6, 2, 4], CDType::F32), &cfg, &w).unwrap_err();
    assert!(matches!(e, candle_core::Error::ShapeMismatchBinaryOp { .. }), "{e:?}");
    // headmix's own validation, wrapped: q with 3 heads where the configuration has 4.
    let e = headmix_candle::forward(&t(&[1, 6, 3, 8], CDType::F32), &kv, &kv, &cfg, &w).unwrap_err();
    assert!(e.to_string().contains("q: expected shape [1, 6, 4, 8], got [1, 6, 3, 8]"), "{e}");
    // Weights that do not fit the configuration are refused when the op is built.
    let e = headmix_candle::HeadMix::new(&cfg, &Weights::random(&Config::mha(4, 8), 1)).unwrap_err();
    assert!(e.to_string().contains("ak"), "{e}");
}

/// Inside a graph: the op's output feeds further candle ops; asking for gradients through it
/// reports that the backward is not there yet (instead of a wrong gradient).
#[test]
fn composes_in_a_graph_and_reports_no_backward_yet() {
    let cfg = Config::iha(2, 2, 4);
    let w = Weights::random(&cfg, 2);
    let x = candle_core::Var::randn(0f32, 1.0, (1, 3, 2, 4), &Device::Cpu).unwrap();
    let out = headmix_candle::forward(x.as_tensor(), x.as_tensor(), x.as_tensor(), &cfg, &w).unwrap();
    let loss = out.sqr().unwrap().sum_all().unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let e = loss.backward().unwrap_err();
    assert!(e.to_string().contains("headmix"), "{e}");
}

/// The CUDA path: candle CUDA tensors in, candle CUDA tensors out, equal to the reference and to
/// the CPU path. Skips (one line) without a GPU or without the `cuda` feature.
#[test]
fn cuda_tensors_match_the_reference() {
    let require = std::env::var("HEADMIX_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let skip = |why: String| {
        assert!(!require, "HEADMIX_REQUIRE_CUDA=1 but {why}");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipping cuda_tensors_match_the_reference: {why}");
    };
    if !cfg!(feature = "cuda") {
        return skip("headmix-candle was built without its `cuda` feature".into());
    }
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => return skip(format!("no CUDA device ({e})")),
    };
    let limits = Limits { head_dims: vec![8, 32, 64], max_n: 24, ..Limits::default() };
    check_property("candle cuda", 48, specs(limits), |spec| run_spec(&spec, &dev));
    // The output stays on the device and equals the CPU path's.
    let cfg = Config::iha(4, 2, 64);
    let w = Weights::random(&cfg, 4);
    let case = Case::random(cfg, w.clone(), 2, 33, 40, DType::BF16, 6);
    let (q, k, v) = inputs(&case, DType::BF16, &dev);
    let gpu = headmix_candle::forward(&q, &k, &v, &cfg, &w).unwrap();
    assert!(gpu.device().is_cuda());
    let (qc, kc, vc) = inputs(&case, DType::BF16, &Device::Cpu);
    let cpu = headmix_candle::forward(&qc, &kc, &vc, &cfg, &w).unwrap();
    let err = rel_err(&to_f32(&gpu), &to_f32(&cpu));
    assert!(err <= 2.0 * tolerance(DType::BF16), "gpu vs cpu: {err:.3e}");
}
