//! # headmix-candle: head-mixing attention on candle tensors
//!
//! [headmix](https://crates.io/crates/headmix)'s fused head-mixing attention (IHA, MEA, GQA, MHA
//! as configurations of one operator, defined in `docs/operator.md` of the headmix repository) as
//! a candle operation: [`candle_core::Tensor`] in, `Tensor` out.
//!
//! * CPU tensors run headmix's CPU backend (the pure-Rust reference, f32 arithmetic, rayon).
//! * CUDA tensors (feature `cuda`, off by default) run headmix's CUDA kernels on the tensors'
//!   device memory and on candle's own stream: no copy, no synchronisation, the output is a new
//!   candle CUDA tensor.
//!
//! The operation is a [`candle_core::CustomOp3`] ([`HeadMix`]), so it composes inside candle
//! graphs. Shapes: `q [B, N, Hq, d]`, `k, v [B, M, Hk, d]`, all three contiguous and of one dtype
//! (f32, f16 or bf16); the output is `[B, N, H, d]` with a collapse `r` in the weights, else
//! `[B, N, H, P, d]`. Mixing weights are f32 host vectors ([`Weights`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use headmix_candle::{Config, Weights};
//!
//! let cfg = Config::iha(4, 2, 32); // H = 4 heads, P = 2 pseudo-heads, d = 32, causal
//! let w = Weights::random(&cfg, 7); // aq, ak, av and a collapse r
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (1, 16, 4, 32), &dev)?; // [B, N, H, d]
//! let k = Tensor::randn(0f32, 1.0, (1, 16, 4, 32), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (1, 16, 4, 32), &dev)?;
//! let out = headmix_candle::forward(&q, &k, &v, &cfg, &w)?;
//! assert_eq!(out.dims(), &[1, 16, 4, 32]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! Errors are candle errors: rank, dtype, device and contiguity problems with candle's own
//! variants (returned bare, without candle's backtrace wrapper, so they can be matched), and every
//! headmix validation error (a head count, a weight's length, a window too large...) wrapped with
//! its message.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use headmix::backends::cpu::CpuBackend;
use headmix::{Backend, Io, TensorMut};

pub use headmix::{Config, Weights};

/// The name of the operation in candle errors.
const OP: &str = "headmix";

/// Head-mixing attention: `q [B, N, Hq, d]`, `k, v [B, M, Hk, d]` (contiguous, one dtype: f32,
/// f16 or bf16, one device) to `[B, N, H, d]` (with a collapse `r`) or `[B, N, H, P, d]`.
///
/// Runs as the custom op [`HeadMix`] inside candle's graph. The backward pass is not there yet:
/// calling `backward` through it returns candle's `BackwardNotSupported`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &Config, weights: &Weights) -> Result<Tensor> {
    let op = HeadMix::new(cfg, weights)?;
    op.check_inputs(q, k, v)?;
    q.apply_op3(k, v, op)
}

/// [`forward`], also returning the log-sum-exp of every virtual query row, `[B, H, N·P]` f32
/// (`-inf` for a row that sees no key). The two results are plain tensors, outside the autograd
/// graph.
pub fn forward_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &Config,
    weights: &Weights,
) -> Result<(Tensor, Tensor)> {
    let op = HeadMix::new(cfg, weights)?;
    op.check_inputs(q, k, v)?;
    let (sq, lq) = q.storage_and_layout();
    let (sk, lk) = k.storage_and_layout();
    let (sv, lv) = v.storage_and_layout();
    let (out, shape, lse) = match (&*sq, &*sk, &*sv) {
        (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => {
            let (out, shape, lse) = op.cpu_run(q, lq, k, lk, v, lv, true)?;
            (Storage::Cpu(out), shape, lse.map(Storage::Cpu))
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(q), Storage::Cuda(k), Storage::Cuda(v)) => {
            let (out, shape, lse) = op.cuda_run(q, lq, k, lk, v, lv, true)?;
            (Storage::Cuda(out), shape, lse.map(Storage::Cuda))
        }
        _ => return Err(not_supported_here(q)),
    };
    let lse = lse.ok_or_else(|| candle_core::Error::Msg("headmix: the lse was not computed".into()))?;
    let lse_shape = op.lse_shape(lq.dims());
    let no_grad = candle_core::op::BackpropOp::none;
    Ok((Tensor::from_storage(out, shape, no_grad(), false), Tensor::from_storage(lse, lse_shape, no_grad(), false)))
}

fn not_supported_here(q: &Tensor) -> candle_core::Error {
    let why = if q.device().is_cuda() {
        "CUDA tensors need headmix-candle's `cuda` feature"
    } else {
        "only CPU tensors (and CUDA tensors with the `cuda` feature) are supported"
    };
    candle_core::Error::Msg(format!("headmix: {why} (device {:?})", q.device().location()))
}

/// The headmix forward as a candle [`CustomOp3`] over `(q, k, v)`: one configuration and its
/// mixing weights, validated once by [`HeadMix::new`]. Reuse it across calls with
/// `q.apply_op3_arc(&k, &v, op)` or clone it (the weights are shared).
#[derive(Clone, Debug)]
pub struct HeadMix {
    cfg: Config,
    weights: Arc<Weights>,
    #[cfg(feature = "cuda")]
    device_weights: Arc<cuda::WeightCache>,
}

impl HeadMix {
    /// Validate the configuration and the weights (shapes, finiteness) against each other.
    pub fn new(cfg: &Config, weights: &Weights) -> Result<HeadMix> {
        headmix::validate::validate_config(cfg).map_err(wrap)?;
        headmix::validate::validate_weights(cfg, weights).map_err(wrap)?;
        Ok(HeadMix {
            cfg: *cfg,
            weights: Arc::new(weights.clone()),
            #[cfg(feature = "cuda")]
            device_weights: Default::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The mixing weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Rank, dtype and device checks on whole tensors, with candle's error variants (the op's
    /// forward repeats the layout checks on the storages).
    pub fn check_inputs(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        for t in [q, k, v] {
            if t.rank() != 4 {
                return Err(candle_core::Error::UnexpectedNumberOfDims {
                    expected: 4,
                    got: t.rank(),
                    shape: t.shape().clone(),
                });
            }
        }
        for t in [k, v] {
            if !q.device().same_device(t.device()) {
                return Err(candle_core::Error::DeviceMismatchBinaryOp {
                    lhs: q.device().location(),
                    rhs: t.device().location(),
                    op: OP,
                });
            }
        }
        check_dtypes(q.dtype(), k.dtype(), v.dtype())
    }

    fn out_shape(&self, q_dims: &[usize]) -> Shape {
        let c = &self.cfg;
        let (b, n) = (q_dims[0], q_dims[1]);
        if self.weights.r.is_some() {
            Shape::from((b, n, c.heads, c.head_dim))
        } else {
            Shape::from((b, n, c.heads, c.pseudo, c.head_dim))
        }
    }

    fn lse_shape(&self, q_dims: &[usize]) -> Shape {
        Shape::from((q_dims[0], self.cfg.heads, q_dims[1] * self.cfg.pseudo))
    }

    /// The CPU forward on contiguous storages: output, its shape, and the lse when asked for.
    #[allow(clippy::too_many_arguments)]
    fn cpu_run(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
        want_lse: bool,
    ) -> Result<(CpuStorage, Shape, Option<CpuStorage>)> {
        check_dtypes(q.dtype(), k.dtype(), v.dtype())?;
        let (q_dims, kv_dims) = (lq.dims(), lk.dims());
        if lv.dims() != kv_dims {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: lk.shape().clone(),
                rhs: lv.shape().clone(),
                op: OP,
            });
        }
        let shape = self.out_shape(q_dims);
        let mut lse = want_lse.then(|| vec![f32::NAN; self.lse_shape(q_dims).elem_count()]);
        // One generic body; the arm only picks the element type.
        let qkv = [(q, lq), (k, lk), (v, lv)];
        let out = match q {
            CpuStorage::F32(_) => CpuStorage::F32(self.cpu_typed(qkv, &shape, lse.as_deref_mut())?),
            CpuStorage::F16(_) => CpuStorage::F16(self.cpu_typed(qkv, &shape, lse.as_deref_mut())?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.cpu_typed(qkv, &shape, lse.as_deref_mut())?),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), OP)),
        };
        Ok((out, shape, lse.map(CpuStorage::F32)))
    }

    /// The CPU forward in element type `T` (the dtype of q, k and v, checked equal).
    fn cpu_typed<T>(&self, qkv: [(&CpuStorage, &Layout); 3], shape: &Shape, lse: Option<&mut [f32]>) -> Result<Vec<T>>
    where
        T: candle_core::WithDType,
        for<'a> &'a [T]: Into<headmix::Data<'a>>,
        for<'a> &'a mut [T]: Into<headmix::DataMut<'a>>,
    {
        let [q, k, v] = qkv.map(|(s, l)| {
            Ok::<_, candle_core::Error>(headmix::Tensor::new(contiguous(s.as_slice::<T>()?, l)?, l.dims()))
        });
        // Poisoned: a value headmix failed to write shows as NaN.
        let mut out = vec![T::from_f64(f64::NAN); shape.elem_count()];
        let io = Io { q: q?, k: k?, v: v?, out: TensorMut::new(out.as_mut_slice(), shape.dims()), lse };
        CpuBackend::new().forward(&self.cfg, &self.weights, io).map_err(wrap)?;
        Ok(out)
    }
}

impl CustomOp3 for HeadMix {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, shape, _) = self.cpu_run(q, lq, k, lk, v, lv, false)?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, shape, _) = self.cuda_run(q, lq, k, lk, v, lv, false)?;
        Ok((out, shape))
    }

    // TODO(backward): when headmix has its backward pass, compute (dq, dk, dv) here from
    // `grad_res` (and the lse, recomputed or saved by the forward) so that candle's autograd
    // runs through the op. Until then candle reports `BackwardNotSupported { op: "headmix" }`.
    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Err(candle_core::Error::BackwardNotSupported { op: OP })
    }
}

/// One supported dtype shared by q, k and v.
fn check_dtypes(q: DType, k: DType, v: DType) -> Result<()> {
    if !matches!(q, DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(q, OP));
    }
    for other in [k, v] {
        if other != q {
            return Err(candle_core::Error::DTypeMismatchBinaryOp { lhs: q, rhs: other, op: OP });
        }
    }
    Ok(())
}

/// The elements of a contiguous layout (any start offset), or candle's `RequiresContiguous`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: OP }),
    }
}

/// A headmix error as a candle error (its message names the offending value).
fn wrap(e: headmix::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

#[cfg(feature = "cuda")]
mod cuda;
