//! The wgpu backward (WGSL kernels, `WgpuBackend::run_backward`) against the f64 reference
//! backward on lavapipe (or any adapter): property suite over every method, random shapes, masks
//! and windows, RoPE in both position modes, `M > N`, `Hk < H`, f32/f16/bf16, gradients poisoned
//! with NaN before each call; determinism; negative controls (deliberately wrong kernels fail the
//! check); the loop-budget refusal as a typed error with nothing written.
//! `HEADMIX_REQUIRE_WGPU=1` makes a missing adapter a failure instead of a skip.

use headmix::backends::wgpu::WgpuBackend;
use headmix::reference::backward::Grads;
use headmix::{Backend, BackendKind, BackwardIo, Config, DType, Error, Tensor, TensorMut, WeightGrads, Weights};
use headmix_tests::backward::{Inputs, OneHeadNan};
use headmix_tests::cases::{Limits, specs};
use headmix_tests::{Case, check_property, device_or_skip};
use proptest::strategy::Strategy;

/// The wgpu backend, or a skip (a failure under `HEADMIX_REQUIRE_WGPU=1`).
fn wgpu(test: &str) -> Option<WgpuBackend> {
    device_or_skip(BackendKind::Wgpu, test)?;
    Some(WgpuBackend::new().expect("the adapter opened a moment ago"))
}

/// Property suite: 256 random problems (every method, d up to 16, N up to 8, M − N up to 4, every
/// dtype), each checked gradient by gradient by the shared rule (`Expected::check`; a head norm
/// over d = 2 elements, whose gradients are mostly rounding noise, included: 1,500 cases passed).
#[test]
fn wgpu_backward_matches_reference_on_random_problems() {
    let Some(be) = wgpu("wgpu_backward_matches_reference_on_random_problems") else { return };
    let limits = Limits { max_n: 8, max_extra: 4, head_dims: vec![2, 4, 8, 16], ..Limits::default() };
    let specs = specs(limits);
    check_property("wgpu backward", 256, specs, |spec| {
        let inputs = Inputs::new(spec.case(), spec.seed);
        let got = inputs.run(&be).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        inputs.expected().check(&got, 1.0, &format!("{spec:?}"));
    });
}

/// Larger fixed problems: d = 64, several tiles of queries and keys (the tile is 32 virtual
/// tokens), windows crossing tiles, M > N, Hk < H, RoPE in both modes, collapse and both norms.
#[test]
fn wgpu_backward_matches_reference_on_multi_tile_problems() {
    let Some(be) = wgpu("wgpu_backward_matches_reference_on_multi_tile_problems") else { return };
    use headmix::{PosMode, Rope};
    let token = Rope { base: 10000.0, mode: PosMode::Token };
    let cases = [
        (Config::iha(2, 2, 64).with_rope(Default::default()), 19, 23, DType::F32),
        (Config::iha_window(2, 3, 64, 5).with_rope(token), 21, 21, DType::F32),
        (Config::mea_compressed(4, 2, 64).unwrap().with_causal(true), 37, 40, DType::F32),
        (Config::gqa(4, 2, 32).unwrap().with_causal(true).with_rope(token), 40, 45, DType::BF16),
        (Config::iha(2, 2, 32), 17, 20, DType::F16),
    ];
    for (i, (cfg, n, m, dtype)) in cases.into_iter().enumerate() {
        let case = Case::random(cfg, Weights::random(&cfg, i as u64), 1, n, m, dtype, 40 + i as u64);
        let inputs = Inputs::new(case, i as u64);
        let label = format!("{cfg:?} n={n} m={m} {dtype:?}");
        inputs.expected().check(&inputs.run(&be).unwrap(), 1.0, &label);
    }
}

/// Two calls give bit-identical gradients (no atomics; every sum in a fixed order).
#[test]
fn wgpu_backward_is_deterministic() {
    let Some(be) = wgpu("wgpu_backward_is_deterministic") else { return };
    let cfg = Config::mea_compressed(3, 2, 8).unwrap().with_rope(Default::default()).with_causal(true);
    let inputs = Inputs::new(Case::random(cfg, Weights::random(&cfg, 1), 2, 37, 41, DType::F32, 3), 3);
    assert_eq!(inputs.run(&be).unwrap(), inputs.run(&be).unwrap());
}

/// Negative controls: each deliberately wrong kernel (RoPE transpose by +theta, dS without
/// -D_i, dvt from dS instead of P, the mixing matrices transposed in the mix-back) fails the
/// check that the correct kernels pass, in one chunk of heads; over one head per chunk, so do
/// the first three and a mix-back that drops the chunks before the last, and (collapse and head
/// norm) a `y` that keeps only the last chunk's columns.
#[test]
fn negative_control_wrong_kernels_fail_the_check() {
    let Some(be) = wgpu("negative_control_wrong_kernels_fail_the_check") else { return };
    let cfg = Config::iha(2, 2, 8).with_rope(Default::default());
    let mut w = Weights::random(&cfg, 2);
    w.norm = Some(headmix::HeadNorm::Rms { gamma: (0..16).map(|i| 1.0 + 0.05 * i as f32).collect() });
    let inputs = Inputs::new(Case::random(cfg, w, 1, 6, 7, DType::F32, 8), 8);
    let expected = inputs.expected();
    let one_chunk = be.fork().with_backward_chunk_heads(Some(usize::MAX));
    let chunked = be.fork().with_backward_chunk_heads(Some(1));
    expected.check(&inputs.run(&one_chunk).unwrap(), 1.0, "correct kernels");
    expected.check(&inputs.run(&chunked).unwrap(), 1.0, "correct kernels, chunked");
    let faults = [
        (1, "RoPE transpose by +theta", true),
        (2, "dS without -D", true),
        (3, "dvt from dS", true),
        (4, "aq transposed", false),
        (6, "mix-back drops the chunks before", true),
        (7, "y keeps the last chunk only", true),
    ];
    for (fault, what, in_chunks) in faults {
        let runs = [(&one_chunk, fault < 6), (&chunked, in_chunks)];
        for (be, _) in runs.into_iter().filter(|r| r.1) {
            let wrong = inputs.run(&be.fork().with_backward_fault(fault)).unwrap();
            let caught = std::panic::catch_unwind(|| expected.check(&wrong, 1.0, what)).is_err();
            assert!(caught, "the wrong kernel ({what}) went unnoticed");
        }
    }
}

/// The gradients' bits, for equality that tells -0 from 0 and fails on NaN nowhere.
fn bits(g: &Grads<f32>) -> Vec<u32> {
    let opt = [g.dr.as_deref(), g.dgamma.as_deref(), g.dbeta.as_deref()];
    [&g.dq[..], &g.dk, &g.dv, &g.daq, &g.dak, &g.dav]
        .into_iter()
        .chain(opt.into_iter().flatten())
        .flat_map(|x| x.iter().map(|v| v.to_bits()))
        .collect()
}

/// Chunks of heads: the passes over one head per chunk and over `1 < G < H` heads give the
/// same gradients, bit for bit, as one chunk (the mix-back and the collapse's `y` continue their
/// sums in the unchunked order, the recompute keeps the unchunked split-KV ranges), which match
/// the reference: 40 random problems with `H` in 2..=5 (every method, head norms, collapse, RoPE,
/// windows, `M > N`, every dtype).
#[test]
fn chunked_backward_is_the_unchunked_bit_for_bit() {
    let Some(be) = wgpu("chunked_backward_is_the_unchunked_bit_for_bit") else { return };
    let limits = Limits { max_heads: 5, max_n: 6, max_extra: 3, head_dims: vec![4, 8], ..Limits::default() };
    let specs = specs(limits).prop_filter("one head is one chunk", |s| s.heads >= 2);
    let one_chunk = be.fork().with_backward_chunk_heads(Some(usize::MAX));
    let per_head: Vec<WgpuBackend> = (1..=4).map(|g| be.fork().with_backward_chunk_heads(Some(g))).collect();
    check_property("wgpu backward chunks", 40, specs, |spec| {
        let inputs = Inputs::new(spec.case(), spec.seed);
        let whole = inputs.run(&one_chunk).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        inputs.expected().check(&whole, 1.0, &format!("{spec:?} one chunk"));
        let mut sizes = vec![1];
        if spec.heads > 2 {
            sizes.push(spec.heads / 2 + 1); // 1 < G < H, a shorter last chunk when H is odd
        }
        for g in sizes {
            let got = inputs.run(&per_head[g - 1]).unwrap_or_else(|e| panic!("{spec:?} G = {g}: {e}"));
            assert!(bits(&got) == bits(&whole), "{spec:?}: G = {g} differs from one chunk");
        }
    });
}

/// On an adapter with a loop budget (llvmpipe), a long problem is split (the dq pass over key
/// ranges, the dk/dv pass over query ranges, partials summed in order) and still matches the
/// reference; a problem whose smallest split cannot fit (one row mixing 128 stored heads of
/// d = 256) is refused with `Error::Unsupported` naming the kernel, and no gradient is written.
#[test]
fn over_budget_backward_is_split_or_refused() {
    let Some(be) = wgpu("over_budget_backward_is_split_or_refused") else { return };
    let Some(budget) = be.loop_budget() else { return }; // no budget on hardware adapters
    // Split: IHA P = 2 over 300 tokens at d = 64 is 600 virtual keys, above one invocation's budget.
    let cfg = Config::iha(2, 2, 64).with_rope(Default::default());
    let inputs = Inputs::new(Case::random(cfg, Weights::random(&cfg, 5), 1, 300, 300, DType::F32, 5), 5);
    inputs.expected().check(&inputs.run(&be).unwrap(), 1.0, &format!("split under {budget}"));

    let cfg = Config::mea(128, 256);
    let w = Weights::random(&cfg, 1);
    let (n, d, h) = (1, 256, 128);
    let x = vec![0.25f32; n * h * d];
    let lse = vec![0.0f32; n * h];
    let sentinel = 7.25f32;
    let (mut dq, mut dk, mut dv) = (vec![sentinel; n * h * d], vec![sentinel; n * h * d], vec![sentinel; n * h * d]);
    let (mut daq, mut dak, mut dav) = (vec![sentinel; h * h], vec![sentinel; h * h], vec![sentinel; h * h]);
    let mut dgamma = vec![sentinel; h * d];
    let mut dbeta = w.norm.as_ref().and_then(|n| n.beta()).map(|b| vec![sentinel; b.len()]);
    let shape = [1, n, h, d];
    let err = be
        .backward(
            &cfg,
            &w,
            BackwardIo {
                q: Tensor::new(&x, &shape),
                k: Tensor::new(&x, &shape),
                v: Tensor::new(&x, &shape),
                out: Tensor::new(&x, &shape),
                lse: &lse,
                dout: Tensor::new(&x, &shape),
                dq: TensorMut::new(&mut dq, &shape),
                dk: TensorMut::new(&mut dk, &shape),
                dv: TensorMut::new(&mut dv, &shape),
                dw: WeightGrads {
                    daq: &mut daq,
                    dak: &mut dak,
                    dav: &mut dav,
                    dr: None,
                    dgamma: Some(&mut dgamma),
                    dbeta: dbeta.as_deref_mut(),
                },
            },
        )
        .expect_err("over the loop budget");
    match &err {
        Error::Unsupported { backend: "wgpu", why } if why.contains("backward") => {}
        other => panic!("expected Unsupported naming a backward kernel, got {other:?}"),
    }
    for g in [&dq, &dk, &dv, &daq, &dak, &dav, &dgamma] {
        assert!(g.iter().all(|&v| v == sentinel), "a gradient was written before the refusal");
    }
}

#[path = "../host/examples/train_iha.rs"]
#[allow(dead_code)]
mod train_iha;

/// The training example on the wgpu backward: 40 steps of gradient descent halve the loss, as
/// on the CPU (`tests/train_example.rs`).
#[test]
fn training_example_loss_falls_on_wgpu() {
    let Some(be) = wgpu("training_example_loss_falls_on_wgpu") else { return };
    let losses = train_iha::fit(&be, 40, 0.02, false).expect("training runs");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(losses.iter().all(|l| l.is_finite()), "a loss is not finite: {losses:?}");
    assert!(last < 0.5 * first, "loss did not fall enough: {first:.4e} -> {last:.4e}");
}

/// NaN policy, selection mixing (MHA): a NaN in head 1's query of one token leaves head 0's
/// `dq, dk, dv` bit-identical to the run without it (the selection gathers read no other head,
/// the mix-back adds no 0 · NaN), while head 1's `dq` row reads it.
#[test]
fn nan_in_one_head_leaves_other_heads_gradients_alone() {
    let Some(be) = wgpu("nan_in_one_head_leaves_other_heads_gradients_alone") else { return };
    let case = OneHeadNan::new();
    let check = |be: &WgpuBackend| case.check(&case.clean.run(be).unwrap(), &case.dirty.run(be).unwrap());
    check(&be);
    // Negative control: a mix-back that multiplies the selection densely (0 · NaN) fails it.
    let dense = WgpuBackend::new().unwrap().with_backward_fault(5);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&dense))).is_err();
    assert!(caught, "0 · NaN of an unread head went unnoticed");
}
