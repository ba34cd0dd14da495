//! Tests of `bench/src/unfused.rs`.

use headmix::reference::unfused::{collapse, materialise};
use headmix::{BackendKind, Config, DType, Io, Method, Problem, Rng, Tensor, TensorMut, Weights};
use headmix_bench::unfused::*;

fn problem(cfg: Config, w: &Weights, batch: usize, n: usize) -> Problem {
    Problem::for_weights(&cfg, w, batch, n, n, DType::F32).unwrap()
}

/// The pipeline the bench times (reference mix, attention stage through the CPU backend,
/// reference collapse) equals the fused CPU call, for every configuration the sweeps run.
#[test]
fn unfused_pipeline_equals_fused_call() {
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let cfgs = [
        Config::iha(3, 2, 16),
        Config::iha_local(2, 3, 8, 24).unwrap(),
        Config::mea(4, 8).with_causal(true),
        Config::mea_compressed(4, 2, 8).unwrap(),
        Config::gqa(4, 2, 8).unwrap().with_causal(true),
    ];
    for (i, cfg) in cfgs.into_iter().enumerate() {
        let w = Weights::random(&cfg, 5 + i as u64);
        let (b, n, h, p, d) = (2, 12, cfg.heads, cfg.pseudo, cfg.head_dim);
        let pr = problem(cfg, &w, b, n);
        let mut rng = Rng::new(100 + i as u64);
        let q = rng.normal_vec(b * n * cfg.q_heads * d, 1.0);
        let k = rng.normal_vec(b * n * cfg.kv_heads * d, 1.0);
        let v = rng.normal_vec(b * n * cfg.kv_heads * d, 1.0);
        let (ap, aw) = attention_problem(&pr).unwrap();
        let (qt, kt, vt) = (
            materialise(&q, &w.aq, b, n, cfg.q_heads, h, p, d),
            materialise(&k, &w.ak, b, n, cfg.kv_heads, h, p, d),
            materialise(&v, &w.av, b, n, cfg.kv_heads, h, p, d),
        );
        let mut o = vec![f32::NAN; ap.out_shape().iter().product()];
        let vs = [b, n * p, h, d];
        let io = Io {
            q: Tensor::new(&qt, &vs),
            k: Tensor::new(&kt, &vs),
            v: Tensor::new(&vt, &vs),
            out: TensorMut::new(&mut o, &ap.out_shape()),
            lse: None,
        };
        cpu.forward(&ap.cfg, &aw, io).unwrap();
        let norm = w.norm.as_ref().map(|n| n.as_slices());
        let got = collapse(&o, w.r.as_deref(), norm.as_ref(), cfg.norm_eps as f64, b, n, h, p, d);
        let mut want = vec![f32::NAN; pr.out_shape().iter().product()];
        let (qs, ks) = ([b, n, cfg.q_heads, d], [b, n, cfg.kv_heads, d]);
        let io = Io {
            q: Tensor::new(&q, &qs),
            k: Tensor::new(&k, &ks),
            v: Tensor::new(&v, &ks),
            out: TensorMut::new(&mut want, &pr.out_shape()),
            lse: None,
        };
        cpu.forward(&cfg, &w, io).unwrap();
        let err = headmix::reference::rel_err(&got, &want);
        assert!(err < 1e-5, "{:?}: unfused differs from fused by {err:e}", cfg.method);
        let stages = Stages::of(&pr, &w);
        assert!(stages.any(), "{:?} has an unfused pipeline", cfg.method);
        if cfg.method == Method::Gqa {
            assert!(!stages.mix_q && stages.mix_k && !stages.collapse);
        }
    }
}

#[test]
fn stages_extra_bytes_and_timing() {
    // MHA: nothing to do besides attention.
    let cfg = Config::mha(4, 8);
    let w = Weights::identity(&cfg);
    let pr = problem(cfg, &w, 1, 4);
    assert!(!Stages::of(&pr, &w).any());
    assert_eq!(extra_bytes(&pr, &w), 0);
    // IHA bf16, B=2, N=M=3, H=4, P=2, d=8: qt, kt, vt and the pre-collapse output, 2 bytes each.
    let cfg = Config::iha(4, 2, 8);
    let w = Weights::random(&cfg, 1);
    let pr = Problem::for_weights(&cfg, &w, 2, 3, 3, DType::BF16).unwrap();
    assert_eq!(extra_bytes(&pr, &w), 4 * (2 * 3 * 4 * 2 * 8) * 2);
    // MEA: kt, vt and the pre-norm output.
    let cfg = Config::mea(4, 8);
    let w = Weights::random(&cfg, 1);
    assert_eq!(extra_bytes(&problem(cfg, &w, 1, 5), &w), 3 * (5 * 4 * 8) * 4);
    // Every stage named with where it ran; on devices the attention stage only.
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let cfg = Config::iha(2, 2, 8);
    let w = Weights::random(&cfg, 2);
    let u = measure(cpu.as_ref(), &problem(cfg, &w, 1, 8), &w, 2, true).unwrap();
    let names: Vec<_> = u.stages.iter().map(|s| (s.name.as_str(), s.place.as_str())).collect();
    assert_eq!(names, [("mix", "host"), ("attention", "cpu"), ("collapse", "host")]);
    assert!(u.complete && u.stages.iter().all(|s| s.seconds.len() == 2 && s.seconds.iter().all(|&t| t > 0.0)));
    assert_eq!(measure(cpu.as_ref(), &problem(cfg, &w, 1, 8), &w, 2, false).unwrap().stages.len(), 1);
}
