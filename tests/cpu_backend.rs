//! The CPU backend against the f64 reference: property suites over every method, random shapes,
//! masks, RoPE modes, offsets and dtypes, with NaN-poisoned outputs (see `Case::check`).

use headmix::backends::cpu::CpuBackend;
use headmix::reference::{MixWeights, Rounding, rel_err, unfused};
use headmix::{Config, DType, Weights};
use headmix_tests::cases::{Limits, specs};
use headmix_tests::{Case, check_property};

#[test]
fn cpu_matches_reference_on_random_problems() {
    let cpu = CpuBackend::new();
    check_property("cpu random problems", 96, specs(Limits::default()), |spec| {
        spec.case().check(&cpu, &format!("cpu {spec:?}"));
    });
}

#[test]
fn cpu_matches_reference_with_head_dims_64_and_128() {
    let cpu = CpuBackend::new();
    let limits = Limits { max_n: 24, max_extra: 8, head_dims: vec![64, 128], ..Limits::default() };
    check_property("cpu d64/d128", 16, specs(limits), |spec| {
        spec.case().check(&cpu, &format!("cpu {spec:?}"));
    });
}

#[test]
fn cpu_matches_reference_iha_causal_window_rope() {
    let cfg = Config::iha(3, 2, 16).with_window(5, 0).with_rope(Default::default());
    let case = Case::random(cfg, Weights::random(&cfg, 3), 2, 7, 9, DType::F32, 11);
    case.check(&CpuBackend::new(), "cpu iha");
    // And the two reference implementations agree.
    let direct = case.reference(Rounding::Exact);
    let mut p = case.problem.params();
    p.rounding = Rounding::Exact;
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let w = &case.weights;
    let (aq, ak, av, r) = (f(&w.aq), f(&w.ak), f(&w.av), w.r.as_deref().map(f));
    let mix = MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm: None };
    let un = unfused::attention(&p, &f(&case.q), &f(&case.k), &f(&case.v), &mix);
    assert!(rel_err(&un.out, &direct.out) < 1e-12, "{}", rel_err(&un.out, &direct.out));
    assert_eq!(un.lse.len(), direct.lse.len());
    for (a, b) in un.lse.iter().zip(&direct.lse) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "lse {a} vs {b}");
    }
}

#[test]
fn large_logits_stay_finite() {
    // Scores of several hundred: a kernel without the running max overflows exp().
    let cfg = Config::iha(2, 2, 16).with_scale(40.0);
    let case = Case::random(cfg, Weights::random(&cfg, 5), 1, 9, 9, DType::F32, 17);
    case.check(&CpuBackend::new(), "cpu large logits");
}

/// The comparison itself must fail on a wrong answer: perturb one output element of a correct
/// run and see the tolerance reject it.
#[test]
fn negative_control_check_detects_a_wrong_element() {
    let cfg = Config::mea(3, 8).with_causal(true);
    let case = Case::random(cfg, Weights::random(&cfg, 1), 1, 5, 6, DType::F32, 2);
    let (mut out, _) = case.run(&CpuBackend::new()).unwrap();
    let exact = case.reference(Rounding::Exact);
    assert!(rel_err(&out, &exact.out) <= 1e-5);
    out[7] += 0.05;
    assert!(rel_err(&out, &exact.out) > 1e-5, "a perturbed element went unnoticed");
}

/// IHA-local: each virtual query sees exactly W·P keys (itself included); fails at the old width.
#[test]
fn iha_local_window_sees_exactly_wp_keys() {
    headmix_tests::check_iha_local_window(&CpuBackend::new(), "cpu");
}

/// MEA's GroupNorm through the CPU backend, with its negative controls (beta or centring dropped).
#[test]
fn mea_group_norm_with_negative_controls() {
    headmix_tests::check_group_norm(&CpuBackend::new(), "cpu");
}
