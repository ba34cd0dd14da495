//! The CUDA backend against the f64 reference: the CPU backend's property suites (named methods,
//! random shapes, every dtype, RoPE, masks, KV prefixes, collapse and head norm), outputs
//! poisoned with NaN before every run, large logits, rows that see nothing in most KV tiles,
//! and the device entry points (zero-copy slices on a caller's stream, raw pointers, timing,
//! kernel resources, typed errors with untouched outputs).
//!
//! Without a GPU every test skips with one line; `HEADMIX_REQUIRE_CUDA=1` makes that a failure.

use headmix::backends::cuda::{CudaBackend, Kernel, RawIo};
use headmix::reference::PosMode;
use headmix::timing::Owned;
use headmix::validate;
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Method, Problem, Rope, Tensor, TensorMut, Weights};
use headmix_tests::cases::{Limits, Spec, specs};
use headmix_tests::{Case, check_lse, check_property, device_or_skip};
use proptest::prelude::*;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn cuda(test: &str) -> Option<Box<dyn Backend>> {
    device_or_skip(BackendKind::Cuda, test)
}

/// The concrete backend, for the device entry points (after `cuda` said a device is there).
fn cuda_concrete(test: &str) -> Option<CudaBackend> {
    cuda(test)?;
    Some(CudaBackend::new(0).unwrap_or_else(|e| panic!("{test}: device 0 opened once, then: {e}")))
}

/// One backend per attention kernel version (v2 and v3 fall back to v1 for f32 and d > 128, v3
/// also for d % 8 != 0), or none (one skip line) without a device.
fn kernels(test: &str) -> Vec<(&'static str, Box<dyn Backend>)> {
    let Some(be) = cuda_concrete(test) else { return Vec::new() };
    let v2 = CudaBackend::new(0).unwrap().with_kernel(Kernel::AttnV2);
    let v3 = CudaBackend::new(0).unwrap().with_kernel(Kernel::AttnV3);
    vec![("v1", Box::new(be.with_kernel(Kernel::AttnV1))), ("v2", Box::new(v2)), ("v3", Box::new(v3))]
}

// ---------------------------------------------------------------------------------------------
// The named methods, every dtype.

/// (label, config, weights seed) of the named methods at sizes that span several query and key
/// tiles, with and without a KV prefix (M > N) and RoPE.
fn named_cases() -> Vec<(String, Config, usize, usize)> {
    let rope_v = Rope { base: 10000.0, mode: PosMode::Virtual };
    let rope_t = Rope { base: 500.0, mode: PosMode::Token };
    vec![
        ("mha".into(), Config::mha(4, 64), 70, 70),
        ("mha causal rope".into(), Config::mha(2, 128).with_causal(true).with_rope(rope_v), 45, 45),
        ("gqa".into(), Config::gqa(8, 2, 128).unwrap().with_causal(true), 33, 40),
        ("gqa d64 rope token".into(), Config::gqa(6, 3, 64).unwrap().with_causal(true).with_rope(rope_t), 20, 29),
        ("mea".into(), Config::mea(4, 64).with_causal(true), 50, 50),
        ("mea compressed".into(), Config::mea_compressed(6, 2, 64).unwrap().with_causal(true), 31, 31),
        ("mea compressed d128 prefix".into(), Config::mea_compressed(4, 3, 128).unwrap().with_causal(true), 17, 60),
        ("iha p2".into(), Config::iha(4, 2, 64), 40, 40),
        ("iha p3 rope prefix".into(), Config::iha(3, 3, 64).with_rope(rope_v).with_pos_offset(7), 21, 30),
        ("iha p4 d128".into(), Config::iha(4, 4, 128), 18, 18),
        ("iha local".into(), Config::iha_local(4, 2, 64, 64).unwrap(), 64, 64),
        ("iha window d32".into(), Config::iha_window(2, 3, 32, 5), 48, 55),
        ("iha d96 p=h".into(), Config::iha(3, 3, 96), 23, 23),
        ("iha d256".into(), Config::iha(2, 2, 256).with_rope(rope_v), 19, 19),
    ]
}

#[test]
fn named_methods_match_the_reference_in_every_dtype() {
    for (kernel, cuda) in kernels("named_methods_match_the_reference_in_every_dtype") {
        for (label, cfg, n, m) in named_cases() {
            for (s, dtype) in DTYPES.into_iter().enumerate() {
                let w = Weights::random(&cfg, 11 + s as u64);
                let case = Case::random(cfg, w, 2, n, m, dtype, 100 + s as u64);
                case.check(cuda.as_ref(), &format!("{kernel} {label} {}", dtype.name()));
            }
        }
    }
}

#[test]
fn methods_with_identity_and_replication_weights() {
    // Weights::identity: no collapse (output [B,N,H,d] for P = 1, else [B,N,H,P,d]); MEA's Group
    // norm with gamma = 1, beta = 0.
    for (kernel, cuda) in kernels("methods_with_identity_and_replication_weights") {
        for cfg in [
            Config::mha(3, 64).with_causal(true),
            Config::gqa(4, 2, 64).unwrap(),
            Config::mea(2, 128),
            Config::iha(2, 3, 64),
        ] {
            for dtype in DTYPES {
                let case = Case::random(cfg, Weights::identity(&cfg), 1, 35, 35, dtype, 5);
                case.check(cuda.as_ref(), &format!("{kernel} {} identity {}", cfg.method.name(), dtype.name()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random shapes.

/// Custom configurations (`H`, `Hq`, `Hk` in 1..6 apart, `P` up to 4, dense mixing): B 1..2,
/// N 1..48, M N..N+40, every head-dim capacity and even values in between, any mask with edges
/// up to the largest the API accepts, RoPE of any base, offsets up to 100k, scale, collapse,
/// norm, dtype.
fn shapes() -> impl Strategy<Value = Spec> {
    specs(Limits {
        max_heads: 6,
        max_n: 48,
        max_extra: 40,
        head_dims: vec![32, 64, 96, 128, 256],
        even_head_dims: Some(256),
        methods: vec![Method::Custom],
        max_window: (39, 39),
        huge_window: true,
        max_pos: 63,
        far_pos: Some((100_000, 100_000)),
        max_scale: Some(1.0),
        random_rope_base: true,
        ..Limits::default()
    })
}

#[test]
fn random_shapes_match_the_reference() {
    for (kernel, cuda) in kernels("random_shapes_match_the_reference") {
        check_property(&format!("cuda {kernel} random shapes"), 96, shapes(), |s| {
            s.case().check(cuda.as_ref(), &format!("{kernel} {s:?}"));
        });
    }
}

#[test]
fn random_shapes_p_up_to_h_with_collapse() {
    // P as large as H (the IHA maximum), always collapsed, both RoPE modes.
    for (kernel, cuda) in kernels("random_shapes_p_up_to_h_with_collapse") {
        let strategy = (1..=8usize, 1..=24usize, 0..=16usize, prop_oneof![Just(64usize), Just(128)], any::<u64>());
        check_property(&format!("cuda {kernel} p = h"), 24, strategy, |(h, n, extra, d, seed)| {
            let mode = if seed % 2 == 0 { PosMode::Virtual } else { PosMode::Token };
            let cfg = Config::iha(h, h, d).with_rope(Rope { base: 10000.0, mode });
            let dtype = DTYPES[(seed % 3) as usize];
            let case = Case::random(cfg, Weights::random(&cfg, seed), 1, n, n + extra, dtype, seed);
            let label = format!("{kernel} iha h = p = {h}, n {n}, m {}, d {d}, {}", n + extra, dtype.name());
            case.check(cuda.as_ref(), &label);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Numerically hard rows.

#[test]
fn large_logits_stay_finite_and_accurate() {
    // Queries scaled so that scores reach hundreds (f32) or tens (f16/bf16): a softmax without
    // the running max overflows; the online rescaling must keep every row exact.
    for (kernel, cuda) in kernels("large_logits_stay_finite_and_accurate") {
        for (dtype, factor) in [(DType::F32, 40.0f32), (DType::F16, 6.0), (DType::BF16, 6.0)] {
            for cfg in [Config::iha(2, 2, 64), Config::mha(2, 128).with_causal(true)] {
                let mut case = Case::random(cfg, Weights::random(&cfg, 3), 1, 70, 70, dtype, 9);
                let scaled: Vec<f32> = case.q.iter().map(|x| x * factor).collect();
                case.q = Owned::from_f32(dtype, &scaled).to_f32();
                case.check(cuda.as_ref(), &format!("{kernel} large logits {} {}", cfg.method.name(), dtype.name()));
            }
        }
    }
}

#[test]
fn rows_that_see_nothing_in_most_tiles() {
    // Bottom-right alignment always leaves key i' visible, so no row is empty overall; with a
    // window of 0..2 keys every row is empty in all but one KV tile, and most rows of a query tile
    // have nothing visible in a given key tile (the "no visible key yet" path of the softmax).
    for (kernel, cuda) in kernels("rows_that_see_nothing_in_most_tiles") {
        for (left, right) in [(0usize, 0usize), (1, 0), (0, 2), (2, 1)] {
            for dtype in DTYPES {
                let cfg = Config::iha(2, 3, 64).with_causal(right == 0).with_window(left, right);
                let case = Case::random(cfg, Weights::random(&cfg, 1), 2, 40, 52, dtype, 2);
                case.check(cuda.as_ref(), &format!("{kernel} window ({left}, {right}) {}", dtype.name()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#[test]
fn forward_without_lse_writes_the_same_output() {
    let Some(cuda) = cuda("forward_without_lse_writes_the_same_output") else { return };
    let cfg = Config::iha(3, 2, 64);
    let case = Case::random(cfg, Weights::random(&cfg, 4), 1, 29, 29, DType::F32, 4);
    let (with_lse, _) = case.run(cuda.as_ref()).unwrap();
    let p = &case.problem;
    let (q, k, v) =
        (Owned::from_f32(p.dtype, &case.q), Owned::from_f32(p.dtype, &case.k), Owned::from_f32(p.dtype, &case.v));
    let shape = p.out_shape();
    let mut out = Owned::filled(p.dtype, shape.iter().product(), f32::NAN);
    let io = Io {
        q: q.tensor(&case.q_shape()),
        k: k.tensor(&case.kv_shape()),
        v: v.tensor(&case.kv_shape()),
        out: out.tensor_mut(&shape),
        lse: None,
    };
    cuda.forward(&cfg, &case.weights, io).unwrap();
    assert_eq!(out.to_f32().len(), with_lse.len());
    let e = headmix::reference::rel_err(&out.to_f32(), &with_lse);
    assert!(e <= 1e-6, "with and without lse differ by {e:.2e}");
}

#[test]
fn invalid_input_is_a_typed_error_and_leaves_outputs_untouched() {
    let Some(cuda) = cuda("invalid_input_is_a_typed_error_and_leaves_outputs_untouched") else { return };
    let cfg = Config::iha(2, 2, 64);
    let w = Weights::random(&cfg, 1);
    let q = vec![0.5f32; 10 * 2 * 64];
    let kv = vec![0.5f32; 9 * 2 * 64]; // M = 9 < N = 10
    let mut out = vec![7.0f32; 10 * 2 * 64];
    let err = cuda
        .forward(
            &cfg,
            &w,
            Io {
                q: Tensor::new(&q, &[1, 10, 2, 64]),
                k: Tensor::new(&kv, &[1, 9, 2, 64]),
                v: Tensor::new(&kv, &[1, 9, 2, 64]),
                out: TensorMut::new(&mut out, &[1, 10, 2, 64]),
                lse: None,
            },
        )
        .unwrap_err();
    assert_eq!(err, Error::QueryLongerThanKeys { n: 10, m: 9 });
    assert!(out.iter().all(|&x| x == 7.0), "the output was written before validation");
}

#[test]
fn device_slices_on_a_caller_stream_match_the_host_path() {
    let Some(be) = cuda_concrete("device_slices_on_a_caller_stream_match_the_host_path") else { return };
    let be = be.with_kernel(Kernel::AttnV2); // bf16, d = 128: the tensor-core kernel
    let cfg = Config::iha(4, 2, 128).with_rope(Rope::default());
    let case = Case::random(cfg, Weights::random(&cfg, 8), 2, 33, 41, DType::BF16, 8);
    let (host_out, host_lse) = case.run(&be).unwrap();

    let stream = be.context().new_stream().unwrap();
    let dw = be.upload_weights(&cfg, &case.weights, &stream).unwrap();
    let to = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>();
    let q = stream.clone_htod(&to(&case.q)).unwrap();
    let k = stream.clone_htod(&to(&case.k)).unwrap();
    let v = stream.clone_htod(&to(&case.v)).unwrap();
    let out_len: usize = case.problem.out_shape().iter().product();
    let mut out = stream.clone_htod(&vec![half::bf16::NAN; out_len]).unwrap();
    let mut lse = stream.clone_htod(&vec![f32::NAN; case.problem.lse_len()]).unwrap();
    be.forward_device(&cfg, &dw, 2, &q, &k, &v, &mut out, Some(&mut lse), &stream).unwrap();
    let got: Vec<f32> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f32()).collect();
    let got_lse = stream.clone_dtoh(&lse).unwrap();
    assert!(headmix::reference::rel_err(&got, &host_out) <= 1e-2, "device path differs from the host path");
    check_lse(&got_lse, &host_lse.iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-3, "device lse");

    // Views of a larger buffer work too (zero-copy into part of an allocation).
    let big = stream.clone_htod(&[to(&case.q), to(&case.q)].concat()).unwrap();
    let qv = big.slice(0..case.q.len());
    let mut out2 = stream.clone_htod(&vec![half::bf16::NAN; out_len]).unwrap();
    be.forward_device(&cfg, &dw, 2, &qv, &k, &v, &mut out2, None, &stream).unwrap();
    let got2: Vec<f32> = stream.clone_dtoh(&out2).unwrap().iter().map(|x| x.to_f32()).collect();
    assert!(headmix::reference::rel_err(&got2, &host_out) <= 1e-2, "view path differs");

    // Wrong lengths: typed errors, nothing launched, output untouched.
    let short = stream.clone_htod(&to(&case.k[..case.k.len() - 1])).unwrap();
    let mut out3 = stream.clone_htod(&vec![half::bf16::from_f32(3.0); out_len]).unwrap();
    let err = be.forward_device(&cfg, &dw, 2, &q, &short, &v, &mut out3, None, &stream).unwrap_err();
    assert!(matches!(err, Error::Length { .. }), "{err:?}");
    let mut wrong_out = stream.clone_htod(&vec![half::bf16::from_f32(3.0); out_len + 1]).unwrap();
    let err = be.forward_device(&cfg, &dw, 2, &q, &k, &v, &mut wrong_out, None, &stream).unwrap_err();
    assert!(matches!(err, Error::Length { what: "out (device)", .. }), "{err:?}");
    assert!(stream.clone_dtoh(&out3).unwrap().iter().all(|x| x.to_f32() == 3.0));
    // Weights uploaded for another shape are refused.
    let other = Config::iha(4, 3, 128);
    let dw_other = be.upload_weights(&other, &Weights::random(&other, 1), &stream).unwrap();
    let err = be.forward_device(&cfg, &dw_other, 2, &q, &k, &v, &mut out3, None, &stream).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
}

/// Slices of another CUDA context (a non-primary context of the same device) are
/// `Error::ForeignBuffer` naming the binding, in `forward_device` and `append_device`, with the
/// output untouched. Negative controls: the backend's own slices, and slices of a second
/// `CudaContext::new` of the device (the same primary context, the same memory), run and equal
/// the host path.
#[test]
fn slices_of_another_context_are_foreign() {
    let Some(be) = cuda_concrete("slices_of_another_context_are_foreign") else { return };
    use headmix::backends::cuda::cudarc::driver::CudaContext;
    let cfg = Config::mha(2, 32);
    let case = Case::random(cfg, Weights::random(&cfg, 4), 1, 8, 8, DType::F32, 4);
    let (host_out, _) = case.run(&be).unwrap();
    let stream = be.context().new_stream().unwrap();
    let dw = be.upload_weights(&cfg, &case.weights, &stream).unwrap();
    let (q, k, v) =
        (stream.clone_htod(&case.q).unwrap(), stream.clone_htod(&case.k).unwrap(), stream.clone_htod(&case.v).unwrap());
    let mut out = stream.clone_htod(&vec![f32::NAN; host_out.len()]).unwrap();
    let mut lse = stream.clone_htod(&vec![f32::NAN; case.problem.lse_len()]).unwrap();

    let other = CudaContext::new_non_primary(be.context().ordinal(), 0).unwrap();
    let os = other.new_stream().unwrap();
    let fq = os.clone_htod(&case.q).unwrap();
    let mut fout = os.clone_htod(&vec![f32::NAN; host_out.len()]).unwrap();
    let mut flse = os.clone_htod(&vec![f32::NAN; case.problem.lse_len()]).unwrap();
    let foreign = |e: Error, what: &str| assert!(matches!(e, Error::ForeignBuffer { what: w } if w == what), "{e}");
    let call = |q, k, v, out: &mut _, lse| be.forward_device(&cfg, &dw, 1, q, k, v, out, lse, &stream);
    foreign(call(&fq, &k, &v, &mut out, None).unwrap_err(), "q (device)");
    foreign(call(&q, &fq, &v, &mut out, None).unwrap_err(), "k (device)");
    foreign(call(&q, &k, &fq, &mut out, None).unwrap_err(), "v (device)");
    foreign(call(&q, &k, &v, &mut fout, None).unwrap_err(), "out (device)");
    foreign(call(&q, &k, &v, &mut out, Some(&mut flse)).unwrap_err(), "lse (device)");
    assert!(stream.clone_dtoh(&out).unwrap().iter().all(|x| x.is_nan()), "nothing ran");
    let mut cache = headmix::KvCache::for_config_on(&be, &cfg, 1, 16, DType::F32).unwrap();
    let (kb, fkb) =
        (stream.clone_htod(&vec![1u8; 8 * 2 * 32 * 4]).unwrap(), os.clone_htod(&vec![1u8; 8 * 2 * 32 * 4]).unwrap());
    foreign(be.append_device(&mut cache, &fkb, &kb, 8).unwrap_err(), "appended k (device)");
    be.append_device(&mut cache, &kb, &kb, 8).expect("own slices append");

    // Negative controls: own slices, and the primary context opened a second time.
    call(&q, &k, &v, &mut out, Some(&mut lse)).expect("own slices");
    let got = stream.clone_dtoh(&out).unwrap();
    assert!(headmix::reference::rel_err(&got, &host_out) <= 1e-5, "own slices differ from the host path");
    let primary = CudaContext::new(be.context().ordinal()).unwrap().new_stream().unwrap();
    let pq = primary.clone_htod(&case.q).unwrap();
    let mut pout = primary.clone_htod(&vec![f32::NAN; host_out.len()]).unwrap();
    call(&pq, &k, &v, &mut pout, None).expect("the primary context's memory");
    stream.synchronize().unwrap();
    let got = primary.clone_dtoh(&pout).unwrap();
    assert!(headmix::reference::rel_err(&got, &host_out) <= 1e-5, "primary-context slices differ");
}

#[test]
fn raw_pointers_match_the_host_path() {
    let Some(be) = cuda_concrete("raw_pointers_match_the_host_path") else { return };
    use headmix::backends::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
    let cfg = Config::mea_compressed(4, 2, 64).unwrap().with_causal(true);
    let case = Case::random(cfg, Weights::random(&cfg, 2), 1, 25, 25, DType::F32, 2);
    let (host_out, _) = case.run(&be).unwrap();
    let stream = be.context().new_stream().unwrap();
    let dw = be.upload_weights(&cfg, &case.weights, &stream).unwrap();
    let q = stream.clone_htod(&case.q).unwrap();
    let k = stream.clone_htod(&case.k).unwrap();
    let v = stream.clone_htod(&case.v).unwrap();
    let mut out = stream.clone_htod(&vec![f32::NAN; host_out.len()]).unwrap();
    {
        let (qp, _a) = q.device_ptr(&stream);
        let (kp, _b) = k.device_ptr(&stream);
        let (vp, _c) = v.device_ptr(&stream);
        let (op, _d) = out.device_ptr_mut(&stream);
        let io = RawIo { q: qp, k: kp, v: vp, out: op, lse: 0 };
        // SAFETY: live buffers of the right sizes on this context; the stream is this context's.
        unsafe { be.forward_raw(&cfg, &dw, 1, 25, 25, DType::F32, io, stream.cu_stream()) }.unwrap();
    }
    let got = stream.clone_dtoh(&out).unwrap();
    assert!(headmix::reference::rel_err(&got, &host_out) <= 1e-6);
}

#[test]
fn timing_uses_cuda_events_and_kernel_info_is_reported() {
    let Some(be) = cuda_concrete("timing_uses_cuda_events_and_kernel_info_is_reported") else { return };
    let cfg = Config::iha(4, 2, 64);
    let w = Weights::random(&cfg, 1);
    let (q, k) = (vec![0f32; 2 * 64 * 4 * 64], vec![0f32; 2 * 64 * 4 * 64]);
    let mut out = vec![0f32; 2 * 64 * 4 * 64];
    let pb: Problem = validate(
        &cfg,
        &w,
        &Tensor::new(&q, &[2, 64, 4, 64]),
        &Tensor::new(&k, &[2, 64, 4, 64]),
        &Tensor::new(&k, &[2, 64, 4, 64]),
        &TensorMut::new(&mut out, &[2, 64, 4, 64]),
        None,
    )
    .unwrap();
    let t = be.time(&pb, &w, 3).unwrap();
    assert_eq!(t.clock, "cuda events");
    assert_eq!(t.seconds.len(), 3);
    assert!(t.seconds.iter().all(|&s| s > 0.0 && s < 10.0), "{:?}", t.seconds);
    assert_eq!(t.extra_bytes, (2 * 64 * 4 * 64 * 4) as u64, "the collapse accumulator");
    let info = be.kernel_info(&pb).unwrap();
    assert_eq!(info.len(), 2, "attention + epilogue: {info:?}");
    assert!(info.iter().all(|k| k.registers > 0 && k.threads > 0), "{info:?}");
    assert!(info[0].dynamic_smem > 0, "{info:?}");
    eprintln!("kernel info: {info:?}");
    let d = be.describe();
    for key in ["device", "compute capability", "memory", "driver (CUDA version)"] {
        assert!(d.iter().any(|(k, _)| k == key), "describe lacks {key}: {d:?}");
    }
    assert!(headmix::best().backend.kind() == BackendKind::Cuda, "best() must pick CUDA when present");
}

/// IHA-local sees exactly W·P keys per virtual query (fails at the old width), and MEA's
/// GroupNorm with its negative controls (beta or centring dropped), on every kernel version.
#[test]
fn iha_local_window_and_mea_group_norm() {
    for (kernel, cuda) in kernels("iha_local_window_and_mea_group_norm") {
        headmix_tests::check_iha_local_window(cuda.as_ref(), &format!("cuda {kernel}"));
        headmix_tests::check_group_norm(cuda.as_ref(), &format!("cuda {kernel}"));
    }
}
