//! Issue 11's findings on the library, one test each (the CLI and bench findings live with the
//! CLI's tests): no panic and no abort for large numbers, problems built only by validation and
//! re-checked at every backend entry, outputs that may not alias, buffers of another device,
//! float settings whose derived constants overflow, compression layer names, and small ones.

use headmix::backends::wgpu::{DeviceIo, WgpuBackend};
use headmix::cache::KvCache;
use headmix::compress::safetensors::{self, Dtype, tensor::TensorView};
use headmix::compress::{CompressError, Projection, compress_safetensors};
use headmix::decode::DecodeIo;
use headmix::timing::Owned;
use headmix::validate::{Binding, check_no_alias};
use headmix::{
    Backend, BackendKind, Config, DType, DecodeProblem, Error, Io, Problem, Rng, Rope, Tensor, TensorMut, Weights,
};
use headmix_tests::device_or_skip;

fn cpu() -> Box<dyn Backend> {
    headmix::open(BackendKind::Cpu).unwrap()
}

/// Finding 1: `2·P²` wrapped to 0 in `iha_local` (divide by zero); now the configuration is
/// built and validation refuses it with a typed error.
#[test]
fn iha_local_with_huge_pseudo_heads_is_a_typed_error() {
    let cfg = Config::iha_local(8, 1 << 32, 64, 100).expect("built without dividing by zero");
    let e = headmix::validate::validate_config(&cfg).expect_err("P = 2^32 is beyond every kernel");
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    // Negative control: an ordinary P gives the paper's window N / (2 P^2).
    let ok = Config::iha_local(8, 2, 64, 100).unwrap();
    assert_eq!(ok.window.unwrap().left, (100 / 8) * 2 - 1); // W·P − 1 keys before the own one
}

/// Finding 1: `Weights::identity`/`random` indexed out of bounds when `Hk·H·P` wrapped; now they
/// return empty weights (refused by validation) and the `try_` forms say why.
#[test]
fn weights_of_huge_head_counts_are_refused_without_panic() {
    let cfg = Config::mha(1 << 32, 64);
    let w = Weights::identity(&cfg);
    assert!(w.aq.is_empty() && w.ak.is_empty() && w.av.is_empty());
    assert!(Weights::random(&cfg, 1).aq.is_empty());
    assert!(matches!(Weights::try_identity(&cfg), Err(Error::TooLarge { .. })));
    assert!(matches!(Weights::try_random(&cfg, 1), Err(Error::TooLarge { .. })));
    assert!(headmix::replication(1 << 32, 1 << 32, 1).is_empty());
    // Validation refuses the configuration before it looks at the (empty) weights.
    let e = headmix::validate::validate_weights(&cfg, &w).expect_err("too large");
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    // Negative control: ordinary sizes still give the identity.
    let small = Weights::try_identity(&Config::gqa(4, 2, 8).unwrap()).unwrap();
    assert_eq!(small.ak, headmix::replication(2, 4, 1));
}

/// Findings 1 and 8: a KV cache with a head dimension no kernel runs (1, 3, 100000) is refused
/// before allocating (the old `KvCache::new(1, i32::MAX, 1, 1, F32)` allocated 16 GiB first);
/// an allocation the host cannot make is `OutOfMemory`, not an abort.
#[test]
fn kv_cache_refuses_bad_head_dims_and_failed_allocations() {
    for d in [1, 3, 100_000] {
        let e = KvCache::new(1, i32::MAX as usize, 1, d, DType::F32).expect_err("head dim refused");
        assert!(matches!(e, Error::HeadDim { d: got, .. } if got == d), "{e}");
        let e = KvCache::new(1, 8, 1, d, DType::F32).expect_err("head dim refused");
        assert!(matches!(e, Error::HeadDim { .. }), "{e}");
    }
    let e = Owned::try_filled("test buffer", DType::F32, usize::MAX / 2, 0.0).err().expect("cannot allocate");
    assert!(matches!(e, Error::OutOfMemory { what: "test buffer", .. }), "{e}");
    // Negative control: an ordinary cache.
    KvCache::new(2, 8, 2, 16, DType::BF16).expect("fits");
}

/// Finding 3: a problem changed after validation (`batch = 0`, `P = 0`, `m = 2^40`, another
/// `N` than the tensors', a collapse the weights lack) is refused by `run` and `time` of every
/// backend with a typed error, never a divide by zero, an assert or an allocation abort.
#[test]
fn run_and_time_validate_the_problem_again() {
    let cfg = Config::iha(2, 2, 8);
    let w = Weights::random(&cfg, 1);
    let (n, m) = (4, 4);
    let good = Problem::for_weights(&cfg, &w, 1, n, m, DType::F32).unwrap();
    let mut rng = Rng::new(2);
    let q = rng.normal_vec(n * 2 * 8, 1.0);
    let mut backends = vec![cpu()];
    if let Some(wb) = device_or_skip(BackendKind::Wgpu, "run_and_time_validate_the_problem_again") {
        backends.push(wb);
    }
    for be in &backends {
        let mut zero_batch = good;
        zero_batch.batch = 0;
        let mut zero_p = good;
        zero_p.cfg.pseudo = 0;
        let mut huge_m = good;
        huge_m.m = 1 << 40;
        let mut other_n = good;
        other_n.n = 3;
        let mut no_r = good;
        no_r.collapse = false;
        let cases: [(&str, Problem, fn(&Error) -> bool); 5] = [
            ("batch 0", zero_batch, |e| matches!(e, Error::Empty { what: "batch" })),
            ("P = 0", zero_p, |e| matches!(e, Error::ZeroPseudoHeads)),
            ("M = 2^40", huge_m, |e| matches!(e, Error::TooLarge { .. })),
            ("N = 3 vs tensors of 4", other_n, |e| matches!(e, Error::ProblemMismatch { .. } | Error::Shape { .. })),
            ("collapse without r", no_r, |e| matches!(e, Error::ProblemMismatch { .. })),
        ];
        for (what, p, expected) in cases {
            let mut out = vec![f32::NAN; n * 2 * 8];
            let io = Io {
                q: Tensor::new(&q, &[1, n, 2, 8]),
                k: Tensor::new(&q, &[1, m, 2, 8]),
                v: Tensor::new(&q, &[1, m, 2, 8]),
                out: TensorMut::new(&mut out, &[1, n, 2, 8]),
                lse: None,
            };
            let e = be.run(&p, &w, io).expect_err(what);
            assert!(expected(&e), "{} run, {what}: {e}", be.kind());
            assert!(out.iter().all(|x| x.is_nan()), "{} run, {what}: output written", be.kind());
            if what != "N = 3 vs tensors of 4" {
                let e = be.time(&p, &w, 1).expect_err(what);
                assert!(expected(&e), "{} time, {what}: {e}", be.kind());
            }
        }
        // Negative control: the unchanged problem runs and times.
        let mut out = vec![f32::NAN; n * 2 * 8];
        let io = Io {
            q: Tensor::new(&q, &[1, n, 2, 8]),
            k: Tensor::new(&q, &[1, m, 2, 8]),
            v: Tensor::new(&q, &[1, m, 2, 8]),
            out: TensorMut::new(&mut out, &[1, n, 2, 8]),
            lse: None,
        };
        be.run(&good, &w, io).unwrap();
        be.time(&good, &w, 1).unwrap();
    }
}

/// Finding 3 for decode: a decode problem changed after validation is refused by the backend's
/// decode (the CPU's split-KV and the per-sequence default).
#[test]
fn decode_validates_the_problem_again() {
    let cfg = Config::iha(2, 2, 8);
    let w = Weights::random(&cfg, 3);
    let mut cache = KvCache::for_config(&cfg, 1, 8, DType::F32).unwrap();
    let kv = Rng::new(4).normal_vec(5 * 2 * 8, 1.0);
    cache.append(&Tensor::new(&kv, &[1, 5, 2, 8]), &Tensor::new(&kv, &[1, 5, 2, 8])).unwrap();
    let q = Rng::new(5).normal_vec(2 * 8, 1.0);
    let mut out = vec![f32::NAN; 2 * 8];
    let io = DecodeIo {
        q: Tensor::new(&q, &[1, 1, 2, 8]),
        cache: &cache,
        out: TensorMut::new(&mut out, &[1, 1, 2, 8]),
        lse: None,
    };
    let mut p = headmix::decode::validate_decode(&cfg, &w, &io).unwrap();
    p.stored[0] = 1 << 20; // more than the cache holds: would index past it
    let e = cpu().decode(&p, &w, io).expect_err("stored changed");
    assert!(matches!(e, Error::ProblemMismatch { .. }), "{e}");
    assert!(out.iter().all(|x| x.is_nan()));
    // Sizes-only decode problems are validated too.
    assert!(DecodeProblem::new(&cfg, 0, DType::F32, true, false, vec![4], vec![0]).is_err());
    assert!(DecodeProblem::new(&cfg, 5, DType::F32, true, false, vec![4], vec![0]).is_err());
    assert!(DecodeProblem::new(&cfg, 1, DType::F32, true, false, vec![4], vec![0, 1]).is_err());
    DecodeProblem::new(&cfg, 1, DType::F32, true, false, vec![4, 6], vec![0, 3]).expect("valid");
}

/// Finding 4: `forward_buffers` refused nothing when `lse` aliased `out` (it overwrote part of
/// the output); now every output/other-binding alias is `Error::Alias`, also through a clone of
/// a handle. Buffers of another device or wgpu instance: `tests/device_handles.rs`.
#[test]
fn forward_buffers_refuses_aliases_and_foreign_buffers() {
    if device_or_skip(BackendKind::Wgpu, "forward_buffers_refuses_aliases_and_foreign_buffers").is_none() {
        return;
    }
    let wb = WgpuBackend::new().unwrap();
    let cfg = Config::mha(2, 32);
    let w = Weights::identity(&cfg);
    let make = || wb.alloc_tensor(DType::F32, 4 * 2 * 32).unwrap();
    let (q, k, v, out, lse) = (make(), make(), make(), make(), make());
    let call = |io: DeviceIo| wb.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io);
    let e = call(DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: Some(&out) }).expect_err("lse on out");
    assert_eq!(e, Error::Alias { what: "lse buffer", other: "out buffer" });
    let twin = out.clone(); // another handle on the same buffer
    let e = call(DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: Some(&twin) }).expect_err("lse on a clone of out");
    assert_eq!(e, Error::Alias { what: "lse buffer", other: "out buffer" });
    let e = call(DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: Some(&k) }).expect_err("lse on k");
    assert_eq!(e, Error::Alias { what: "lse buffer", other: "k buffer" });
    let e = call(DeviceIo { q: &q, k: &k, v: &out, out: &out, lse: None }).expect_err("out on v");
    assert_eq!(e, Error::Alias { what: "out buffer", other: "v buffer" });
    // Inputs may share a buffer (negative control).
    call(DeviceIo { q: &q, k: &q, v: &q, out: &out, lse: Some(&lse) }).expect("shared inputs are fine");
    call(DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: None }).expect("usable after the errors");
}

/// Finding 4 for the CUDA pointer entries (host-side check, no GPU needed): any output
/// overlapping another binding is refused, adjacent ranges are fine.
#[test]
fn device_pointer_bindings_may_not_overlap_outputs() {
    let b = |what, addr, bytes, written| Binding { what, addr, bytes, written };
    let ok =
        [b("q", 0x1000, 256, false), b("k", 0x1000, 256, false), b("out", 0x1100, 256, true), b("lse", 0, 0, true)];
    check_no_alias(&ok).expect("inputs may share; out starts where q ends");
    let bad = [b("q", 0x1000, 256, false), b("out", 0x10ff, 256, true)];
    assert_eq!(check_no_alias(&bad), Err(Error::Alias { what: "out", other: "q" }));
    let bad = [b("out", 0x1000, 256, true), b("lse", 0x1080, 16, true)];
    assert_eq!(check_no_alias(&bad), Err(Error::Alias { what: "out", other: "lse" }));
}

/// Finding 5: a finite scale whose `scale · log2(e)` overflows f32 gave NaN (CPU) or zeros (wgpu);
/// now it is `Error::Config`. A subnormal `norm_eps` (0 on flush-to-zero devices) too.
#[test]
fn float_settings_whose_derived_constants_overflow_are_refused() {
    for s in [f32::MAX, f32::MAX / 1.4] {
        let e = headmix::validate::validate_config(&Config::mha(2, 8).with_scale(s)).expect_err("overflows");
        assert!(matches!(e, Error::Config { what: "scale", .. }), "{e}");
    }
    let e = headmix::validate::validate_config(&Config::mea(2, 8).with_norm_eps(1e-40)).expect_err("subnormal");
    assert!(matches!(e, Error::Config { what: "norm_eps", .. }), "{e}");
    // Negative controls: large but representable settings pass.
    headmix::validate::validate_config(&Config::mha(2, 8).with_scale(f32::MAX / 2.0)).unwrap();
    headmix::validate::validate_config(&Config::mea(2, 8).with_norm_eps(f32::MIN_POSITIVE)).unwrap();
}

fn file_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.to_string(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Finding 6: `l.0.k_proj` and `l.0.k_proj.weight` in one file reached `safetensors::serialize`
/// with duplicate output names (a panic); now a typed error. `from_layout` checks its product.
#[test]
fn compress_refuses_duplicate_layers_and_wrapping_shapes() {
    let (h, d, dm) = (2, 2, 3);
    let x: Vec<f32> = (0..h * d * dm).map(|i| 0.1 + i as f32).collect();
    let one = |name: &'static str| (name, vec![h * d, dm], x.clone());
    let dup = file_bytes(&[one("l.0.k_proj"), one("l.0.v_proj"), one("l.0.k_proj.weight"), one("l.0.v_proj.weight")]);
    let e = compress_safetensors(&dup, 1, Some(h)).expect_err("duplicate layer");
    assert!(matches!(&e, CompressError::Tensor { why, .. } if why.contains("also has")), "{e}");
    // Negative control: either spelling alone compresses.
    compress_safetensors(&file_bytes(&[one("l.0.k_proj"), one("l.0.v_proj")]), 1, Some(h)).unwrap();
    compress_safetensors(&file_bytes(&[one("l.0.k_proj.weight"), one("l.0.v_proj.weight")]), 1, Some(h)).unwrap();

    // (2^62 + 1) · 4 wraps to 4 in usize.
    let e = Projection::from_layout("x", &[(1 << 62) + 1, 4], &[1.0; 4], Some(1)).expect_err("wraps");
    assert!(matches!(e, CompressError::Tensor { .. }), "{e}");
}

/// Finding 8: `Error::NonFinite { value: NaN }` was not equal to its clone.
#[test]
fn errors_equal_their_clones() {
    for e in [
        Error::NonFinite { what: "q", index: 3, value: f64::NAN },
        Error::Config { what: "scale", value: f64::NAN, why: "x" },
        Error::Cache { why: "y".into() },
    ] {
        assert_eq!(e.clone(), e);
    }
    // Negative control: different fields still differ.
    assert_ne!(
        Error::NonFinite { what: "q", index: 3, value: f64::NAN },
        Error::NonFinite { what: "q", index: 4, value: f64::NAN }
    );
    assert_ne!(
        Error::NonFinite { what: "q", index: 3, value: 1.0 },
        Error::NonFinite { what: "q", index: 3, value: 2.0 }
    );
}

/// Finding 8: decode refused RoPE positions above 2^31 − 1 that a forward over the same tokens
/// accepts; both now accept the same offsets, and give the same answer.
#[test]
fn decode_accepts_the_positions_a_forward_accepts() {
    let (h, d, len) = (2, 8, 4);
    let pos = i32::MAX as usize - 4; // the last virtual key sits at pos + len·P − 1 > 2^31 − 1
    let cfg = Config::iha(h, 2, d).with_rope(Rope::default()).with_pos_offset(pos);
    let w = Weights::random(&cfg, 6);
    let mut rng = Rng::new(7);
    let (k, v, q) = (rng.normal_vec(len * h * d, 1.0), rng.normal_vec(len * h * d, 1.0), rng.normal_vec(h * d, 1.0));
    let be = cpu();
    let mut fwd = vec![f32::NAN; h * d];
    be.forward(
        &cfg,
        &w,
        Io {
            q: Tensor::new(&q, &[1, 1, h, d]),
            k: Tensor::new(&k, &[1, len, h, d]),
            v: Tensor::new(&v, &[1, len, h, d]),
            out: TensorMut::new(&mut fwd, &[1, 1, h, d]),
            lse: None,
        },
    )
    .expect("forward accepts the offset");
    let mut cache = KvCache::for_config(&cfg, 1, 8, DType::F32).unwrap();
    cache.append(&Tensor::new(&k, &[1, len, h, d]), &Tensor::new(&v, &[1, len, h, d])).unwrap();
    let mut dec = vec![f32::NAN; h * d];
    let io = DecodeIo {
        q: Tensor::new(&q, &[1, 1, h, d]),
        cache: &cache,
        out: TensorMut::new(&mut dec, &[1, 1, h, d]),
        lse: None,
    };
    headmix::decode(be.as_ref(), &cfg, &w, io).expect("decode accepts it too");
    let err = headmix::reference::rel_err(&dec, &fwd);
    assert!(err < 1e-5, "decode differs from the forward: {err}");
    // Negative control: an offset above 2^31 − 1 is refused by both.
    let e = headmix::validate::validate_config(&cfg.with_pos_offset(i32::MAX as usize + 1)).expect_err("above");
    assert!(matches!(e, Error::Config { what: "pos_offset", .. }), "{e}");
}
