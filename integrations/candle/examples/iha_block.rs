//! A small Interleaved Head Attention block: projections, residual and norm in candle, the
//! attention in headmix.
//!
//! ```text
//! x [B, N, D] -> q, k, v = x Wq, x Wk, x Wv  (each [B, N, H, d])
//!             -> headmix IHA: P pseudo-heads per head, mixed, interleaved, causal, collapsed by r
//!             -> [B, N, H*d] Wo + x
//! ```
//!
//! Run: `cargo run --release -p headmix-candle --example iha_block` (CPU tensors). With
//! `--features cuda` and a GPU, the same block runs on CUDA tensors without copies.

use candle_core::{D, DType, Device, Result, Tensor};
use headmix_candle::{Config, HeadMix, Weights};

/// The block's parameters: candle tensors for the projections, headmix weights for the mixing.
struct IhaBlock {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    attention: HeadMix,
    heads: usize,
    head_dim: usize,
}

impl IhaBlock {
    fn new(model_dim: usize, heads: usize, pseudo: usize, dev: &Device) -> Result<IhaBlock> {
        let head_dim = model_dim / heads;
        let std = 1.0 / (model_dim as f64).sqrt();
        let proj = |rows, cols| Tensor::randn(0f32, std as f32, (rows, cols), dev);
        // IHA: causal over the N·P virtual tokens, dense mixing and collapse (random here, as a
        // freshly initialised layer would have them).
        let cfg = Config::iha(heads, pseudo, head_dim);
        let weights = Weights::random(&cfg, 42);
        Ok(IhaBlock {
            wq: proj(model_dim, heads * head_dim)?,
            wk: proj(model_dim, heads * head_dim)?,
            wv: proj(model_dim, heads * head_dim)?,
            wo: proj(heads * head_dim, model_dim)?,
            attention: HeadMix::new(&cfg, &weights)?,
            heads,
            head_dim,
        })
    }

    /// `x [B, N, D]` to `[B, N, D]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let heads = |w: &Tensor| x.broadcast_matmul(w)?.reshape((b, n, self.heads, self.head_dim));
        let (q, k, v) = (heads(&self.wq)?, heads(&self.wk)?, heads(&self.wv)?);
        let attn = q.apply_op3(&k, &v, self.attention.clone())?; // [B, N, H, d]
        let y = attn.reshape((b, n, self.heads * self.head_dim))?.broadcast_matmul(&self.wo)?;
        rms_norm(&(y + x)?)
    }
}

fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)
}

fn main() -> Result<()> {
    let dev = if cfg!(feature = "cuda") { Device::cuda_if_available(0)? } else { Device::Cpu };
    let (batch, seq, model_dim, heads, pseudo) = (2, 64, 256, 4, 2);
    let block = IhaBlock::new(model_dim, heads, pseudo, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (batch, seq, model_dim), &dev)?;
    let start = std::time::Instant::now();
    let y = block.forward(&x)?;
    let y16 = block.forward(&x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)?;
    println!("device: {:?}", dev.location());
    println!("IHA block: H = {heads}, P = {pseudo}, d = {}, x {:?} -> y {:?}", model_dim / heads, x.dims(), y.dims());
    println!("two forward passes in {:.1} ms (wall clock, not a benchmark)", start.elapsed().as_secs_f64() * 1e3);
    let mean_sq = y.sqr()?.mean_all()?.to_scalar::<f32>()?;
    let diff = (y - y16)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("mean of y^2 = {mean_sq:.4} (RMS-normed: about 1); max change from rounding x to bf16: {diff:.3e}");
    assert!((mean_sq - 1.0).abs() < 1e-2 && diff.is_finite());
    Ok(())
}
