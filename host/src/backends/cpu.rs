//! The CPU backend: runs the pure-Rust reference (rayon) in f32.

use headmix_reference::{MixWeights, attention};

use crate::validate::Problem;
use crate::{Backend, BackendKind, Io, Result, Weights};

/// The reference on the host's cores. Always available.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// The CPU backend (stateless).
    pub fn new() -> CpuBackend {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device_name(&self) -> String {
        format!("host CPU ({} threads)", rayon::current_num_threads())
    }

    fn describe(&self) -> Vec<(String, String)> {
        vec![
            ("threads".into(), rayon::current_num_threads().to_string()),
            ("arithmetic".into(), "f32 (f16/bf16 inputs widened, outputs rounded)".into()),
        ]
    }

    fn run(&self, problem: &Problem, w: &Weights, io: Io<'_>) -> Result<()> {
        let params = problem.params();
        let (q, k, v) = (io.q.data.to_f32(), io.k.data.to_f32(), io.v.data.to_f32());
        let mix = MixWeights { aq: &w.aq, ak: &w.ak, av: &w.av, r: w.r.as_deref(), gamma: w.gamma.as_deref() };
        let res = attention(&params, &q, &k, &v, &mix);
        let mut out = io.out;
        out.data.write_f32(&res.out);
        if let Some(lse) = io.lse {
            lse.copy_from_slice(&res.lse);
        }
        Ok(())
    }

    /// Flash-decoding on the host: the cache split into chunks, each attended separately, then
    /// combined by log-sum-exp (the algorithm device kernels follow, written out).
    fn decode(&self, problem: &crate::DecodeProblem, w: &Weights, io: crate::DecodeIo<'_>) -> Result<()> {
        crate::decode::split::decode_host(problem, w, io, None)
    }
}
