//! The CPU backend against the f64 reference (smoke level; the property suites are in
//! reference_identities.rs).

use headmix::backends::cpu::CpuBackend;
use headmix::reference::{MixWeights, Rounding, rel_err, unfused};
use headmix::{Config, DType, Weights};
use headmix_tests::Case;

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
    let mix = MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), gamma: None };
    let un = unfused::attention(&p, &f(&case.q), &f(&case.k), &f(&case.v), &mix);
    assert!(rel_err(&un.out, &direct.out) < 1e-12, "{}", rel_err(&un.out, &direct.out));
    assert!(rel_err(&un.lse[..], &direct.lse[..]).is_nan() || un.lse == direct.lse || rel_err(&un.lse, &direct.lse) < 1e-12);
}
