//! The CPU backend: runs the pure-Rust reference (rayon) in f32.

use headmix_reference::attention;

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
        problem.check_io(w, &io)?;
        let params = problem.params();
        let (q, k, v) = (io.q.data.to_f32(), io.k.data.to_f32(), io.v.data.to_f32());
        let mix = w.mix();
        let res = attention(&params, &q, &k, &v, &mix);
        let mut out = io.out;
        out.data.write_f32(&res.out);
        if let Some(lse) = io.lse {
            lse.copy_from_slice(&res.lse);
        }
        Ok(())
    }

    /// The reference's direct backward in f32 (`headmix_reference::backward::direct`):
    /// FlashAttention-2's algorithm per batch element and head, probabilities recomputed from
    /// `lse` (`D = <do, o>` from the saved `out` in f32 when it is the pseudo-output, else `o`
    /// recomputed), `dq` query-major and `dk, dv` key-major (deterministic, no atomics), each head's
    /// pseudo-gradients mixed back into the stored heads before the next head. Extra memory per
    /// batch element in flight: `2·(N + 2M)·P·d` values (one head's mixed tensors and their
    /// gradients), plus `2·N·H·d` (`y`, `dy`) with a head norm, plus the f32 copies of the inputs
    /// and outputs when they are f16/bf16.
    fn run_backward(&self, problem: &Problem, w: &Weights, io: crate::BackwardIo<'_>) -> Result<()> {
        let params = problem.params();
        let f = |t: &crate::Tensor| t.data.to_f32();
        let (q, k, v, out, dout) = (f(&io.q), f(&io.k), f(&io.v), f(&io.out), f(&io.dout));
        let layer = crate::backward::layer(w);
        // A saved f16/bf16 output would put its rounding into D = <do, o>: recompute o then.
        let saved = (problem.dtype == crate::DType::F32).then_some(out.as_slice());
        let g = headmix_reference::backward::direct::backward(&params, &q, &k, &v, &layer, saved, io.lse, &dout);
        let (mut dq, mut dk, mut dv, dw) = (io.dq, io.dk, io.dv, io.dw);
        dq.data.write_f32(&g.dq);
        dk.data.write_f32(&g.dk);
        dv.data.write_f32(&g.dv);
        dw.daq.copy_from_slice(&g.daq);
        dw.dak.copy_from_slice(&g.dak);
        dw.dav.copy_from_slice(&g.dav);
        for (dst, src) in [(dw.dr, &g.dr), (dw.dgamma, &g.dgamma), (dw.dbeta, &g.dbeta)] {
            if let (Some(dst), Some(src)) = (dst, src) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Flash-decoding on the host: the cache split into chunks, each attended separately, then
    /// combined by log-sum-exp (the algorithm device kernels follow, written out).
    fn decode(&self, problem: &crate::DecodeProblem, w: &Weights, io: crate::DecodeIo<'_>) -> Result<()> {
        crate::decode::check_host_cache(io.cache, BackendKind::Cpu)?;
        crate::decode::split::decode_host(problem, w, io, None)
    }
}
