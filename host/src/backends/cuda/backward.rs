//! The CUDA backward (`bwd_v1.cu`, docs/backward.md): a launch plan built on the host, then
//! typed cudarc launches of it.
//!
//! [`BwdPlan::new`] is a pure function of the problem and the weights: the buffers (inputs, the
//! weights and tables uploaded as data, the gradients, the f32 scratch), the two argument blocks
//! ([`HmArgs`], [`HmBwd`]) with every pointer as a buffer slot, and the kernels in launch order
//! with their grids. [`CudaBackend`]'s `run_backward` allocates the buffers, relocates the slots to
//! device pointers and launches the list; the CPU emulator (`kernels-cuda/emu/bwd_emu.cpp`) runs the
//! very same plan ([`BwdPlan::write_emu`]), so the launch order and arguments are what the tests
//! check.
//!
//! Passes (one module, entry points named in [`BwdPlan::new`]): mix q, k, v into f32 pseudo-head rows;
//! recompute the pseudo outputs from `lse` (with a collapse, a head norm or a 16-bit dtype);
//! the norm and collapse transposes (`dop`, `D`); `dq` query-major; `dk, dv` key-major; the mixing
//! transposes; the weight gradients from per-tile partials reduced in tile order. No atomics: two
//! calls give the same bits.
//!
//! The passes run over chunks of `G` heads ([`Chunk`]): the f32 pseudo-head scratch holds one
//! chunk's rows, the mix-back adds each chunk into f32 sums of `dq, dk, dv` (in chunk order), and
//! each chunk's weight-gradient columns are reduced before the next chunk reuses the partials.
//! `G = H` (one chunk) is the launch sequence without chunks. A collapse with a head norm needs
//! `y` (every head's pseudo outputs) before any `dop`: with several chunks the plan first runs mix,
//! recompute and `ysum` per chunk into an f32 `y`, then `norm` (`y -> dy`), then the chunks again.
//!
//! Extra device memory ([`BwdPlan::extra_bytes`]): per head of a chunk the f32 pseudo-head rows
//! `qt, kt, vt, dop, dqt, dkt, dvt` (and `op` when recomputed) and `D`, [`head_scratch_bytes`]
//! (`4·B·P·d·(3N + 4M) + 4·B·N·P`, `4N` with `op`), times `G`; the partials (the chunk's columns);
//! with several chunks the f32 sums of `dq, dk, dv` (16-bit dtypes; f32 sums in the gradients
//! themselves) and with a collapse and a norm `y` (`4·B·N·H·d`); the weights and tables. Nothing of
//! size `N²`, and with the default budget nothing that grows with `H·P` beyond the weights.

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtrMut};

use super::args::HmArgs;
use super::device::launch_raw;
use super::variants::{Kernel, MaskKind, Variant};
use super::{CudaBackend, drv, plan};
use crate::validate::Problem;
use crate::{BackwardIo, DType, Error, Result, Weights};

/// Tokens per `hm_bwd_v1_pre` block (`BW_PRE_TOK`): one partial of `dr, dgamma, dbeta` each.
pub const PRE_TOK: usize = 8;
/// Tokens per `hm_bwd_v1_wgrad` block (`BW_W_TOK`): one partial of `daq, dak, dav` each.
pub const W_TOK: usize = 16;
/// Owned rows per block of bwd_v2's tensor-core passes (`BW2_BR`: 4 warps x 16).
pub const TC_ROWS: usize = 64;

/// The backward's buffers, mirrored from `HmBwd` in `kernels-cuda/bwd_v1.cu`: 30 device pointers,
/// then 12 `i32` (288 bytes, no padding). The pseudo-head scratch holds the chunk's heads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmBwd {
    /// `dL/dout` (storage type).
    pub dout: u64,
    /// f32 pseudo-head query rows `[B, H, N·P, d]` (mixed, rotated, rounded as the forward).
    pub qt: u64,
    /// f32 pseudo-head key rows `[B, H, M·P, d]`.
    pub kt: u64,
    /// f32 pseudo-head value rows `[B, H, M·P, d]`.
    pub vt: u64,
    /// Recomputed pseudo outputs `[B, H, N·P, d]` f32 (0: `out` is the pseudo output).
    pub op: u64,
    /// `dL/d(pseudo output)` `[B, H, N·P, d]` f32.
    pub dop: u64,
    /// `D_i = <dop_i, o_i>` `[B, H, N·P]` f32.
    pub d_rows: u64,
    /// Pseudo-gradient of the queries (after the RoPE transpose) `[B, H, N·P, d]` f32.
    pub dqt: u64,
    /// Pseudo-gradient of the keys `[B, H, M·P, d]` f32.
    pub dkt: u64,
    /// Pseudo-gradient of the values `[B, H, M·P, d]` f32.
    pub dvt: u64,
    /// `dq` (storage type).
    pub dq: u64,
    /// `dk` (storage type).
    pub dk: u64,
    /// `dv` (storage type).
    pub dv: u64,
    /// `daq` f32.
    pub daq: u64,
    /// `dak` f32.
    pub dak: u64,
    /// `dav` f32.
    pub dav: u64,
    /// `dr` f32 (0: no collapse).
    pub dr: u64,
    /// `dgamma` f32 (0: no norm).
    pub dgamma: u64,
    /// `dbeta` f32 (0: no Group norm).
    pub dbeta: u64,
    /// Per-tile partials of every weight gradient (f32).
    pub part: u64,
    /// One-hot selection of `aq` `[H·P]` i32 (0: dense).
    pub selq: u64,
    /// One-hot selection of `ak` (0: dense).
    pub selk: u64,
    /// One-hot selection of `av` (0: dense).
    pub selv: u64,
    /// RoPE table of `hi·128` positions ([`plan::rope_tables`]), 0 without RoPE.
    pub rope_hi: u64,
    /// RoPE table of positions `0 .. 128`.
    pub rope_lo: u64,
    /// f32 sum of `dq` over the chunks so far (0: one chunk; `dq` itself in f32).
    pub accq: u64,
    /// f32 sum of `dk` (as `accq`).
    pub acck: u64,
    /// f32 sum of `dv` (as `accq`).
    pub accv: u64,
    /// `y` `[B, N, H, d]` f32, then `dy` in place (several chunks with a collapse and a norm), or 0.
    pub y: u64,
    /// The chunk's saved `lse` `[B, hc, N·P]`: the call's `lse` with one chunk, else a copy
    /// (written by `hm_bwd_v1_mix`; the attention passes index it as `D`).
    pub lse: u64,
    /// The first row of `rope_hi`.
    pub rope_hi0: i32,
    /// Partials of the `pre` pass: `B·ceil(N / PRE_TOK)`.
    pub pre_tiles: i32,
    /// Partials of `daq`: `B·ceil(N / W_TOK)`.
    pub wq_tiles: i32,
    /// Partials of `dak`, `dav`: `B·ceil(M / W_TOK)`.
    pub wk_tiles: i32,
    /// Offset (f32 elements) of the `dr` partials `[pre_tiles][H][hc·P]` in `part`.
    pub part_pre: i32,
    /// Offset of the `dgamma, dbeta` partials `[pre_tiles][2][H·d]`.
    pub part_g: i32,
    /// Offset of the `daq` partials `[wq_tiles][Hq][hc·P]`.
    pub part_wq: i32,
    /// Offset of the `dak` partials `[wk_tiles][Hk][hc·P]`.
    pub part_wk: i32,
    /// Offset of the `dav` partials.
    pub part_wv: i32,
    /// The launch's chunk: its first head (set per launch from [`BwdLaunch::heads`]).
    pub h0: i32,
    /// The launch's chunk: its number of heads.
    pub hc: i32,
    /// `hm_bwd_v1_reduce`: bit `g` set writes gradient `g` (daq, dak, dav, dr, dgamma, dbeta).
    pub reduce: i32,
}

const _: () = assert!(std::mem::size_of::<HmBwd>() == 30 * 8 + 12 * 4);

/// Pointers at the head of [`HmBwd`] (relocated from slots to device addresses).
pub const HM_BWD_NPTR: usize = 30;

/// What a buffer of the plan holds before the kernels run.
#[derive(Clone, Debug)]
pub enum BufRole {
    /// A tensor of the call (`q, k, v, out, dout, lse`), copied in.
    Input(&'static str),
    /// Data the plan computed (weights, selections, RoPE tables), copied in.
    Data(Vec<u8>),
    /// A gradient of the call (`dq, dk, dv, daq, dak, dav, dr, dgamma, dbeta`), copied out.
    Output(&'static str),
    /// Scratch written and read by the kernels only.
    Scratch(&'static str),
}

/// One device buffer of the plan.
#[derive(Clone, Debug)]
pub struct BwdBuf {
    /// Bytes.
    pub bytes: usize,
    /// What it holds.
    pub role: BufRole,
}

impl BwdBuf {
    /// The buffer's name (the tensor, gradient or scratch it is).
    pub fn name(&self) -> &'static str {
        match &self.role {
            BufRole::Input(n) | BufRole::Output(n) | BufRole::Scratch(n) => n,
            BufRole::Data(_) => "data",
        }
    }
}

/// One kernel launch of the plan (every entry takes `(HmArgs, HmBwd)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BwdLaunch {
    /// The `extern "C"` entry point in `bwd_v1.cu`.
    pub entry: &'static str,
    /// Grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory, bytes.
    pub smem: u32,
    /// The chunk of heads it covers, `(h0, hc)`: `HmBwd::h0`, `HmBwd::hc` for this launch.
    pub heads: (u32, u32),
    /// `HmBwd::reduce` for this launch (the gradients `hm_bwd_v1_reduce` writes; 0 elsewhere).
    pub reduce: u32,
}

/// Bits of [`BwdLaunch::reduce`] (`hm_bwd_v1_reduce`'s grid rows).
pub mod reduce {
    /// `daq, dak, dav, dr`: the chunk's columns.
    pub const COLUMNS: u32 = 0b1111;
    /// `dgamma, dbeta`: the chunk's heads.
    pub const NORM: u32 = 0b11_0000;
}

/// Variable that forces the number of heads per chunk ([`Chunk::from_env`]).
pub const CHUNK_VAR: &str = "HEADMIX_CUDA_BWD_CHUNK_HEADS";

/// How many heads each pass of the plan covers: the f32 pseudo-head scratch holds one chunk's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// The most heads whose scratch ([`head_scratch_bytes`] each) fits in this many bytes; at
    /// least one, at most `H`.
    Budget(u64),
    /// This many heads per chunk (clamped to `1..=H`).
    Heads(usize),
}

impl Chunk {
    /// The default budget: the pseudo-head scratch at most the size of the stored `q, k, v` in f32
    /// (`4·B·d·(N·Hq + 2·M·Hk)` bytes).
    pub fn default_for(pb: &Problem) -> Chunk {
        let c = &pb.cfg;
        Chunk::Budget(4 * (pb.batch * c.head_dim * (pb.n * c.q_heads + 2 * pb.m * c.kv_heads)) as u64)
    }

    /// `HEADMIX_CUDA_BWD_CHUNK_HEADS` (heads per chunk, a positive integer) when set, else
    /// [`Chunk::default_for`]. The one place the variable is read.
    pub fn from_env(pb: &Problem) -> Result<Chunk> {
        match std::env::var(CHUNK_VAR) {
            Err(_) => Ok(Chunk::default_for(pb)),
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(g) if g >= 1 => Ok(Chunk::Heads(g)),
                _ => Err(super::dev_err(format!("{CHUNK_VAR}={v}: expected a number of heads >= 1"))),
            },
        }
    }

    /// Heads per chunk for a problem (`1..=H`).
    pub fn heads(self, pb: &Problem) -> usize {
        let h = pb.cfg.heads.max(1);
        match self {
            Chunk::Heads(g) => g.clamp(1, h),
            Chunk::Budget(bytes) => ((bytes / head_scratch_bytes(pb).max(1)) as usize).clamp(1, h),
        }
    }
}

/// Whether the plan recomputes the pseudo outputs: unless `out` is them in f32 (FlashAttention-2's
/// `D = rowsum(dout * out)`); a 16-bit `out` would put its rounding into `D`.
fn recomputes(pb: &Problem) -> bool {
    pb.collapse || pb.norm || pb.dtype != DType::F32
}

/// Bytes of one head's f32 pseudo-head scratch: `qt, dop, dqt` (and `op` when recomputed) of
/// `N·P` rows, `kt, vt, dkt, dvt` of `M·P` rows, `D` and the copy of `lse` (`N·P` each; the copy
/// with several chunks only), for all `B`.
pub fn head_scratch_bytes(pb: &Problem) -> u64 {
    let (b, p, d) = (pb.batch as u64, pb.cfg.pseudo as u64, pb.cfg.head_dim as u64);
    let q_rows = if recomputes(pb) { 4 } else { 3 };
    4 * b * p * (d * (q_rows * pb.n as u64 + 4 * pb.m as u64) + 2 * pb.n as u64)
}

/// The whole backward of one problem: buffers, argument blocks (pointers as slot numbers: slot
/// `s` is the value `s + 1`, 0 is null) and launches in order.
#[derive(Clone, Debug)]
pub struct BwdPlan {
    /// The compiled variant (dtype, head-dim capacity).
    pub variant: Variant,
    /// The buffers, in slot order.
    pub bufs: Vec<BwdBuf>,
    /// The forward's argument block.
    pub args: HmArgs,
    /// The backward's buffers.
    pub x: HmBwd,
    /// The kernels, in launch order.
    pub launches: Vec<BwdLaunch>,
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(x).to_vec()
}

/// Dynamic shared memory of `hm_bwd_v1_pre` over a chunk of `heads` heads (mirrors its
/// carve-up): op `[CP][d]` (`CP = heads·P`), dy `[R][d]` (`R = H` with a collapse, else `CP`), the
/// dr partial `[H][CP]`, the dgamma and dbeta partials `[H][d]`, f32.
pub fn pre_smem(pb: &Problem, heads: usize) -> usize {
    let c = &pb.cfg;
    let (h, cp, d) = (c.heads, heads * c.pseudo, c.head_dim);
    let rows = if pb.collapse { h } else { cp };
    4 * (cp * d + rows * d + h * cp + 2 * h * d)
}

impl BwdPlan {
    /// The plan of a validated problem and its weights, its heads in chunks as `chunk` says.
    /// `tensor_cores`: the dq and dk/dv passes of `bwd_v2` where it has a variant (f16/bf16,
    /// d <= 128), else `bwd_v1`'s. `Error::Unsupported` when neither has a variant for the head
    /// dim.
    pub fn new(pb: &Problem, w: &Weights, tensor_cores: bool, chunk: Chunk) -> Result<BwdPlan> {
        let c = &pb.cfg;
        let v2 = Variant::attention(Kernel::BwdV2, pb.dtype, c.head_dim, MaskKind::Runtime).filter(|_| tensor_cores);
        let v1 = Variant::attention(Kernel::BwdV1, pb.dtype, c.head_dim, MaskKind::Runtime);
        let variant = v2.or(v1).ok_or_else(|| Error::Unsupported {
            backend: "cuda",
            why: format!("the backward has no variant for head dim {}", c.head_dim),
        })?;
        let t = variant.tiles();
        let (b, n, m, h, p, d) = (pb.batch, pb.n, pb.m, c.heads, c.pseudo, c.head_dim);
        let hp = h * p;
        // Heads per chunk, and whether there is more than one chunk.
        let g = chunk.heads(pb);
        let chunked = g < h;
        let gp = g * p;
        let e = pb.dtype.size();
        let mut bufs: Vec<BwdBuf> = Vec::new();
        let mut add = |bytes: usize, role: BufRole| -> u64 {
            bufs.push(BwdBuf { bytes, role });
            bufs.len() as u64
        };
        let norm = w.norm.as_ref().map(|x| x.kind());
        let mut args = HmArgs::from_problem(pb, norm);
        let mut x = HmBwd::default();
        let q_len = b * n * c.q_heads * d;
        let kv_len = b * m * c.kv_heads * d;
        let out_len: usize = pb.out_shape().iter().product();
        args.q = add(q_len * e, BufRole::Input("q"));
        args.k = add(kv_len * e, BufRole::Input("k"));
        args.v = add(kv_len * e, BufRole::Input("v"));
        args.out = add(out_len * e, BufRole::Input("out"));
        args.lse = add(4 * pb.lse_len(), BufRole::Input("lse"));
        x.dout = add(out_len * e, BufRole::Input("dout"));
        args.aq = add(4 * w.aq.len(), BufRole::Data(f32_bytes(&w.aq)));
        args.ak = add(4 * w.ak.len(), BufRole::Data(f32_bytes(&w.ak)));
        args.av = add(4 * w.av.len(), BufRole::Data(f32_bytes(&w.av)));
        if let Some(r) = &w.r {
            args.r = add(4 * r.len(), BufRole::Data(f32_bytes(r)));
        }
        if let Some(nw) = &w.norm {
            args.gamma = add(4 * nw.gamma().len(), BufRole::Data(f32_bytes(nw.gamma())));
            if let Some(beta) = nw.beta() {
                args.beta = add(4 * beta.len(), BufRole::Data(f32_bytes(beta)));
            }
        }
        // Selections: a one-hot mixing reads (and gives gradients to) only its selected head.
        let mut sel = |wm: &[f32], s: usize| match plan::selection(wm, s, hp) {
            Some(sel) => add(4 * sel.len(), BufRole::Data(bytemuck::cast_slice(&sel).to_vec())),
            None => 0,
        };
        x.selq = sel(&w.aq, c.q_heads);
        x.selk = sel(&w.ak, c.kv_heads);
        x.selv = sel(&w.av, c.kv_heads);
        if let Some(r) = c.rope {
            let first = c.pos_offset as u64;
            let tb = plan::rope_tables(r.base, d, first, first + (m * p) as u64 - 1);
            x.rope_hi = add(4 * tb.hi.len(), BufRole::Data(f32_bytes(&tb.hi)));
            x.rope_lo = add(4 * tb.lo.len(), BufRole::Data(f32_bytes(&tb.lo)));
            x.rope_hi0 = tb.hi0 as i32;
        }
        // Gradients.
        x.dq = add(q_len * e, BufRole::Output("dq"));
        x.dk = add(kv_len * e, BufRole::Output("dk"));
        x.dv = add(kv_len * e, BufRole::Output("dv"));
        x.daq = add(4 * w.aq.len(), BufRole::Output("daq"));
        x.dak = add(4 * w.ak.len(), BufRole::Output("dak"));
        x.dav = add(4 * w.av.len(), BufRole::Output("dav"));
        if w.r.is_some() {
            x.dr = add(4 * h * hp, BufRole::Output("dr"));
        }
        if let Some(nw) = &w.norm {
            x.dgamma = add(4 * h * d, BufRole::Output("dgamma"));
            if nw.beta().is_some() {
                x.dbeta = add(4 * h * d, BufRole::Output("dbeta"));
            }
        }
        // f32 scratch of one chunk (G heads): pseudo-head rows and their gradients.
        let (rows_q, rows_k) = (4 * b * g * n * p * d, 4 * b * g * m * p * d);
        x.qt = add(rows_q, BufRole::Scratch("qt"));
        x.kt = add(rows_k, BufRole::Scratch("kt"));
        x.vt = add(rows_k, BufRole::Scratch("vt"));
        let recompute = recomputes(pb);
        if recompute {
            x.op = add(rows_q, BufRole::Scratch("op"));
        }
        x.dop = add(rows_q, BufRole::Scratch("dop"));
        x.d_rows = add(4 * b * g * n * p, BufRole::Scratch("D"));
        x.dqt = add(rows_q, BufRole::Scratch("dqt"));
        x.dkt = add(rows_k, BufRole::Scratch("dkt"));
        x.dvt = add(rows_k, BufRole::Scratch("dvt"));
        // Several chunks: the chunk's lse rows (one chunk reads the call's), f32 sums of dq, dk, dv
        // across chunks (f32 gradients hold their own sums).
        x.lse = if chunked { add(4 * b * g * n * p, BufRole::Scratch("lse chunk")) } else { args.lse };
        if chunked {
            if pb.dtype == DType::F32 {
                (x.accq, x.acck, x.accv) = (x.dq, x.dk, x.dv);
            } else {
                x.accq = add(4 * q_len, BufRole::Scratch("dq f32"));
                x.acck = add(4 * kv_len, BufRole::Scratch("dk f32"));
                x.accv = add(4 * kv_len, BufRole::Scratch("dv f32"));
            }
        }
        // y needs every chunk's pseudo outputs when a collapse feeds a norm.
        let two_phase = chunked && pb.collapse && pb.norm;
        if two_phase {
            x.y = add(4 * b * n * h * d, BufRole::Scratch("y"));
        }
        // Partials (one chunk's columns, reduced before the next chunk): dr [pre_tiles][H][GP],
        // dgamma and dbeta [pre_tiles][2][H*d], daq [wq_tiles][Hq][GP], dak, dav [wk_tiles][Hk][GP].
        let pre_tiles = b * n.div_ceil(PRE_TOK);
        let (wq_tiles, wk_tiles) = (b * n.div_ceil(W_TOK), b * m.div_ceil(W_TOK));
        let (dr_len, g_len) = (pre_tiles * h * gp, pre_tiles * 2 * h * d);
        let wq_len = wq_tiles * c.q_heads * gp;
        let wk_len = wk_tiles * c.kv_heads * gp;
        let part_len = dr_len + g_len + wq_len + 2 * wk_len;
        if part_len > i32::MAX as usize {
            return Err(Error::Unsupported { backend: "cuda", why: format!("{part_len} weight-gradient partials") });
        }
        x.part = add(4 * part_len, BufRole::Scratch("partials"));
        x.pre_tiles = pre_tiles as i32;
        x.wq_tiles = wq_tiles as i32;
        x.wk_tiles = wk_tiles as i32;
        x.part_pre = 0;
        x.part_g = dr_len as i32;
        x.part_wq = (dr_len + g_len) as i32;
        x.part_wk = (dr_len + g_len + wq_len) as i32;
        x.part_wv = (dr_len + g_len + wq_len + wk_len) as i32;
        (x.h0, x.hc) = (0, g as i32);

        // Launches, in order: per chunk of heads [h0, h0 + hc).
        let (nt, smem) = (t.threads as u32, t.smem as u32);
        let b32 = b as u32;
        let tokens = n.max(m) as u32;
        let chunks: Vec<(u32, u32)> = (0..h).step_by(g).map(|h0| (h0 as u32, g.min(h - h0) as u32)).collect();
        let longest = [c.q_heads * gp, c.kv_heads * gp, h * gp, h * d].into_iter().max().unwrap_or(1);
        let l = |entry, grid, smem, heads, reduce| BwdLaunch { entry, grid, threads: nt, smem, heads, reduce };
        let reduce_grid = (longest.div_ceil(t.threads) as u32, 6, 1);
        let pre_grid = (n.div_ceil(PRE_TOK) as u32, b32, 1);
        let q_blocks = |hc: u32| ((n * p).div_ceil(t.br) as u32, hc, b32);
        let mut launches = Vec::new();
        if two_phase {
            // y = r op over every chunk, then the norm's backward once (dgamma, dbeta reduced).
            for &(h0, hc) in &chunks {
                launches.push(l("hm_bwd_v1_mix", (tokens, 3, b32), 0, (h0, hc), 0));
                launches.push(l("hm_bwd_v1_fwd", q_blocks(hc), smem, (h0, hc), 0));
                launches.push(l("hm_bwd_v1_ysum", (n as u32, b32, 1), 0, (h0, hc), 0));
            }
            let all = (0, h as u32);
            launches.push(l("hm_bwd_v1_norm", pre_grid, (8 * h * d) as u32, all, 0));
            launches.push(l("hm_bwd_v1_reduce", reduce_grid, 0, all, reduce::NORM));
        }
        for &(h0, hc) in &chunks {
            launches.push(l("hm_bwd_v1_mix", (tokens, 3, b32), 0, (h0, hc), 0));
            if recompute {
                launches.push(l("hm_bwd_v1_fwd", q_blocks(hc), smem, (h0, hc), 0));
            }
            launches.push(l("hm_bwd_v1_pre", pre_grid, pre_smem(pb, hc as usize) as u32, (h0, hc), 0));
            if variant.kernel == Kernel::BwdV2 {
                let rows = TC_ROWS;
                launches.push(l("hm_bwd_v2_dq", ((n * p).div_ceil(rows) as u32, hc, b32), smem, (h0, hc), 0));
                launches.push(l("hm_bwd_v2_dkdv", ((m * p).div_ceil(rows) as u32, hc, b32), smem, (h0, hc), 0));
            } else {
                launches.push(l("hm_bwd_v1_dq", q_blocks(hc), smem, (h0, hc), 0));
                launches.push(l("hm_bwd_v1_dkdv", ((m * p).div_ceil(t.br) as u32, hc, b32), smem, (h0, hc), 0));
            }
            launches.push(l("hm_bwd_v1_mixback", (tokens, 3, b32), 0, (h0, hc), 0));
            launches.push(l("hm_bwd_v1_wgrad", (n.max(m).div_ceil(W_TOK) as u32, 3, b32), 0, (h0, hc), 0));
            let bits = if two_phase { reduce::COLUMNS } else { reduce::COLUMNS | reduce::NORM };
            launches.push(l("hm_bwd_v1_reduce", reduce_grid, 0, (h0, hc), bits));
        }
        Ok(BwdPlan { variant, bufs, args, x, launches })
    }

    /// Heads per chunk (`H`: one chunk, the launch sequence without chunks).
    pub fn chunk_heads(&self) -> usize {
        self.x.hc as usize
    }

    /// The largest dynamic shared memory of a launch of `entry` (0 when none).
    pub fn smem_of(&self, entry: &str) -> usize {
        self.launches.iter().filter(|l| l.entry == entry).map(|l| l.smem as usize).max().unwrap_or(0)
    }

    /// Scratch bytes only (pseudo-head rows, `D`, the f32 sums, `y`, partials): what
    /// [`BwdPlan::extra_bytes`] holds beyond the uploaded weights and tables.
    pub fn scratch_bytes(&self) -> u64 {
        self.bufs.iter().filter(|b| matches!(b.role, BufRole::Scratch(_))).map(|b| b.bytes as u64).sum()
    }

    /// Device memory the plan needs beyond the call's tensors and gradients: scratch, partials,
    /// weights and tables (bytes).
    pub fn extra_bytes(&self) -> u64 {
        self.bufs
            .iter()
            .filter(|b| matches!(b.role, BufRole::Scratch(_) | BufRole::Data(_)))
            .map(|b| b.bytes as u64)
            .sum()
    }

    /// The slot (0-based) of a named input, output or scratch buffer.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.bufs.iter().position(|b| !matches!(b.role, BufRole::Data(_)) && b.name() == name)
    }

    /// Write the plan for the CPU emulator (`kernels-cuda/emu/bwd_emu.cpp`) into `dir`: the
    /// inputs (`(name, bytes)`, every [`BufRole::Input`] of the plan) and data as files, and
    /// `plan.txt`; the emulator writes each output to `dir/<name>.out`. Returns the plan file.
    pub fn write_emu(&self, dir: &Path, inputs: &[(&str, &[u8])]) -> std::io::Result<PathBuf> {
        use std::fmt::Write as _;
        let mut text = String::new();
        for (i, buf) in self.bufs.iter().enumerate() {
            let (role, file) = match &buf.role {
                BufRole::Input(name) => {
                    let data = inputs.iter().find(|(n, _)| n == name).map(|(_, d)| *d).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no input {name}"))
                    })?;
                    let f = dir.join(format!("{name}.in"));
                    std::fs::write(&f, data)?;
                    ("in", f)
                }
                BufRole::Data(data) => {
                    let f = dir.join(format!("data{i}.in"));
                    std::fs::write(&f, data)?;
                    ("in", f)
                }
                BufRole::Output(name) => ("out", dir.join(format!("{name}.out"))),
                BufRole::Scratch(name) => ("tmp", dir.join(format!("{name}.tmp"))),
            };
            let _ = writeln!(text, "buf {} {role} {}", buf.bytes.max(1), file.display());
        }
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // SAFETY: both structs are repr(C) plain data without padding (size asserts above).
        let (a, x) = unsafe {
            (
                std::slice::from_raw_parts(&self.args as *const HmArgs as *const u8, std::mem::size_of::<HmArgs>()),
                std::slice::from_raw_parts(&self.x as *const HmBwd as *const u8, std::mem::size_of::<HmBwd>()),
            )
        };
        let _ = writeln!(text, "args {}", hex(a));
        let _ = writeln!(text, "bwd {}", hex(x));
        for l in &self.launches {
            let (g, (h0, hc)) = (l.grid, l.heads);
            let _ = writeln!(
                text,
                "launch {} {} {} {} {} {} {h0} {hc} {}",
                l.entry, g.0, g.1, g.2, l.threads, l.smem, l.reduce
            );
        }
        let f = dir.join("plan.txt");
        std::fs::write(&f, text)?;
        Ok(f)
    }
}

/// Replace the first `n` u64 words of a `repr(C)` struct (buffer slots) by device pointers.
///
/// # Safety
/// `s` must start with at least `n` u64 fields.
unsafe fn relocate<T>(s: &mut T, n: usize, ptrs: &[u64]) {
    let words = s as *mut T as *mut u64;
    for i in 0..n {
        // SAFETY: the caller guarantees n leading u64 fields.
        let w = unsafe { &mut *words.add(i) };
        if *w != 0 {
            *w = ptrs[*w as usize - 1];
        }
    }
}

impl CudaBackend {
    /// The CUDA backward: the plan's buffers allocated and filled, its launches on the backend's
    /// stream, the gradients copied back.
    pub(super) fn backward_on_device(&self, pb: &Problem, w: &Weights, io: BackwardIo<'_>) -> Result<()> {
        let tensor_cores = self.cc >= Kernel::BwdV2.spec().min_cc
            && Variant::attention(Kernel::BwdV2, pb.dtype, pb.cfg.head_dim, MaskKind::Runtime)
                .is_some_and(|v| v.tiles().smem <= self.max_smem);
        let plan = BwdPlan::new(pb, w, tensor_cores, Chunk::from_env(pb)?)?;
        let s = &self.stream;
        self.ctx.bind_to_thread().map_err(drv("binding the context"))?;
        let module = self.function(plan.variant)?;
        let spec = plan.variant.spec();
        let pre_smem = plan.smem_of("hm_bwd_v1_pre").max(plan.smem_of("hm_bwd_v1_norm"));
        if pre_smem > self.max_smem {
            return Err(Error::Unsupported {
                backend: "cuda",
                why: format!(
                    "the backward's norm/collapse pass needs {pre_smem} B of shared memory, above {}",
                    self.max_smem
                ),
            });
        }
        let inputs: [(&str, &[u8]); 6] = [
            ("q", io.q.data.bytes()),
            ("k", io.k.data.bytes()),
            ("v", io.v.data.bytes()),
            ("out", io.out.data.bytes()),
            ("lse", bytemuck::cast_slice(io.lse)),
            ("dout", io.dout.data.bytes()),
        ];
        let mut dev: Vec<CudaSlice<u8>> = Vec::with_capacity(plan.bufs.len());
        for buf in &plan.bufs {
            let slice = match &buf.role {
                BufRole::Input(name) => {
                    let data = inputs.iter().find(|(n, _)| n == name).map(|(_, d)| *d).unwrap_or(&[]);
                    s.clone_htod(data).map_err(drv("copying an input of the backward"))?
                }
                BufRole::Data(data) => s.clone_htod(data).map_err(drv("uploading the backward's tables"))?,
                // SAFETY: every element of an output or scratch buffer is written by a kernel of
                // the plan before any kernel reads it (the emulator poisons them to check this).
                _ => unsafe { s.alloc::<u8>(buf.bytes.max(1)) }.map_err(drv("allocating backward scratch"))?,
            };
            dev.push(slice);
        }
        {
            let ptrs_guards: Vec<_> = dev.iter_mut().map(|d| d.device_ptr_mut(s)).collect();
            let ptrs: Vec<u64> = ptrs_guards.iter().map(|(p, _)| *p).collect();
            let (mut args, mut x) = (plan.args, plan.x);
            // SAFETY: HmArgs starts with 12 pointers, HmBwd with HM_BWD_NPTR.
            unsafe {
                relocate(&mut args, 12, &ptrs);
                relocate(&mut x, HM_BWD_NPTR, &ptrs);
            }
            for l in &plan.launches {
                // The launch's chunk (the parameters are copied at launch: later changes are safe).
                (x.h0, x.hc, x.reduce) = (l.heads.0 as i32, l.heads.1 as i32, l.reduce as i32);
                let func = if l.entry == spec.entry {
                    &module.func
                } else {
                    let i = spec.extra_entries.iter().position(|e| *e == l.entry).expect("every entry is in the table");
                    &module.extra[i]
                };
                if l.smem as usize > 48 * 1024 {
                    func.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        l.smem as i32,
                    )
                    .map_err(drv("cuFuncSetAttribute (backward shared memory)"))?;
                }
                let mut params = [&mut args as *mut HmArgs as *mut c_void, &mut x as *mut HmBwd as *mut c_void];
                // SAFETY: loaded in this context; every entry of bwd_v1.cu takes (HmArgs, HmBwd) by
                // value; the pointers are the plan's buffers, sized by the validated problem.
                unsafe {
                    launch_raw(&func, l.grid, l.threads, l.smem, s, &mut params, &format!("launching {}", l.entry))
                }?;
            }
        }
        let BackwardIo { mut dq, mut dk, mut dv, dw, .. } = io;
        let mut outputs: Vec<(&str, &mut [u8])> = vec![
            ("dq", dq.data.bytes_mut()),
            ("dk", dk.data.bytes_mut()),
            ("dv", dv.data.bytes_mut()),
            ("daq", bytemuck::cast_slice_mut(dw.daq)),
            ("dak", bytemuck::cast_slice_mut(dw.dak)),
            ("dav", bytemuck::cast_slice_mut(dw.dav)),
        ];
        for (name, g) in [("dr", dw.dr), ("dgamma", dw.dgamma), ("dbeta", dw.dbeta)] {
            if let Some(g) = g {
                outputs.push((name, bytemuck::cast_slice_mut(g)));
            }
        }
        for (name, dst) in outputs {
            let slot = plan.slot(name).ok_or_else(|| super::dev_err(format!("the plan has no {name}")))?;
            s.memcpy_dtoh(&dev[slot], dst).map_err(drv("copying a gradient back"))?;
        }
        s.synchronize().map_err(drv("running the backward"))?;
        drop(dev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Rope};

    fn problem(cfg: Config, dtype: DType) -> (Problem, Weights) {
        let w = Weights::random(&cfg, 3);
        let pb = Problem::new(&cfg, 2, 9, 13, dtype, w.r.is_some(), w.norm.is_some()).unwrap();
        (pb, w)
    }

    fn plan(cfg: Config, dtype: DType, tc: bool) -> (Problem, BwdPlan) {
        let (pb, w) = problem(cfg, dtype);
        let plan = BwdPlan::new(&pb, &w, tc, Chunk::Heads(cfg.heads)).unwrap();
        (pb, plan)
    }

    fn short(l: &BwdLaunch) -> &'static str {
        l.entry.trim_start_matches("hm_bwd_v1_").trim_start_matches("hm_bwd_v2_")
    }

    #[test]
    fn the_plan_launches_table_entries_in_pass_order() {
        let rope = Rope { base: 10000.0, mode: headmix_reference::PosMode::Token };
        for (cfg, dtype, tc, want_v2) in [
            (Config::mha(4, 32).with_causal(true), DType::F32, false, false),
            (Config::mha(4, 32).with_causal(true), DType::F32, true, false), // no f32 bwd_v2
            (Config::iha(2, 3, 64).with_rope(rope), DType::BF16, true, true),
            (Config::mea(4, 16), DType::F16, false, false),
            (Config::iha(2, 2, 256), DType::F16, true, false), // d 256: bwd_v1 only
        ] {
            let (pb, p) = plan(cfg, dtype, tc);
            assert_eq!(p.variant.kernel == Kernel::BwdV2, want_v2, "{cfg:?} {dtype:?}");
            let spec = p.variant.spec();
            for l in &p.launches {
                assert!(
                    l.entry == spec.entry || spec.extra_entries.contains(&l.entry),
                    "{} not in {}",
                    l.entry,
                    spec.name
                );
                assert!(l.grid.0 > 0 && l.grid.1 > 0 && l.grid.2 > 0 && l.threads as usize == spec.threads);
                assert_eq!(l.heads, (0, cfg.heads as u32), "one chunk");
            }
            let names: Vec<_> = p.launches.iter().map(short).collect();
            let recompute = pb.collapse || pb.norm || dtype != DType::F32;
            let mut want = vec!["mix"];
            if recompute {
                want.push("fwd");
            }
            want.extend(["pre", "dq", "dkdv", "mixback", "wgrad", "reduce"]);
            assert_eq!(names, want);
            // Every pointer is null or a slot of the plan; every gradient the weights need is an output.
            for name in ["q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv", "daq", "dak", "dav"] {
                assert!(p.slot(name).is_some(), "{name}");
            }
            assert_eq!(p.slot("dr").is_some(), pb.collapse);
            assert_eq!(p.slot("dgamma").is_some(), pb.norm);
            assert_eq!(p.slot("op").is_some(), recompute);
            assert_eq!(p.x.rope_hi != 0, cfg.rope.is_some());
            assert!(p.slot("y").is_none() && p.x.accq == 0, "one chunk: no sums across chunks");
        }
    }

    /// Chunks of G heads: every head in exactly one chunk, in order; the passes per chunk; the
    /// two-phase sequence (y first) only for a collapse with a norm; f32 sums only for 16-bit.
    #[test]
    fn chunked_plans_cover_every_head_once_in_order() {
        let collapse_norm = Config::iha(5, 2, 16);
        for (cfg, dtype, norm) in [
            (Config::mha(5, 32).with_causal(true), DType::F32, None),
            (Config::mea(5, 16), DType::BF16, Some(crate::NormKind::Rms)),
            (collapse_norm, DType::F16, Some(crate::NormKind::Group)),
            (collapse_norm, DType::F32, None),
        ] {
            let w = Weights::random(&cfg, 3).with_norm_kind(norm, &cfg);
            let pb = Problem::new(&cfg, 2, 9, 13, dtype, w.r.is_some(), w.norm.is_some()).unwrap();
            for g in 1..=5usize {
                let p = BwdPlan::new(&pb, &w, true, Chunk::Heads(g)).unwrap();
                assert_eq!(p.chunk_heads(), g);
                let mixes: Vec<_> = p.launches.iter().filter(|l| short(l) == "mixback").map(|l| l.heads).collect();
                let want: Vec<_> = (0..5).step_by(g).map(|h0| (h0 as u32, g.min(5 - h0) as u32)).collect();
                assert_eq!(mixes, want, "{cfg:?} G={g}");
                let two_phase = g < 5 && pb.collapse && pb.norm;
                assert_eq!(p.slot("y").is_some(), two_phase);
                assert_eq!(p.launches.iter().filter(|l| short(l) == "norm").count(), two_phase as usize);
                assert_eq!(
                    p.launches.iter().filter(|l| short(l) == "ysum").count(),
                    if two_phase { want.len() } else { 0 }
                );
                assert_eq!(p.slot("dq f32").is_some(), g < 5 && dtype != DType::F32);
                assert_eq!(p.x.accq == p.x.dq, g < 5 && dtype == DType::F32);
                // Each chunk's launches cover its heads only (grids over hc heads).
                for l in &p.launches {
                    if ["fwd", "dq", "dkdv"].contains(&short(l)) {
                        assert_eq!(l.grid.1, l.heads.1);
                    }
                }
            }
        }
    }

    /// The extra memory: with a budget, the scratch does not grow with P (G shrinks as P grows),
    /// only the weights (of `H·P` columns, as their gradients) do; one chunk is the plan without
    /// chunks (the figure `4·B·H·P·d·(4N + 4M)` of pseudo-head rows, `D`, partials, data).
    #[test]
    fn extra_memory_is_bounded_by_the_budget_not_by_p() {
        let (b, n, m, d, h) = (2, 9, 13, 32, 8);
        let figure = |cfg: Config, chunk: Chunk| {
            let w = Weights::random(&cfg, 3);
            let pb = Problem::new(&cfg, b, n, m, DType::BF16, w.r.is_some(), w.norm.is_some()).unwrap();
            let p = BwdPlan::new(&pb, &w, true, chunk).unwrap();
            (pb, p)
        };
        // The budget: two heads at P = 2 (G = 4, 2, 1 at P = 1, 2, 4).
        let (pb2, _) = figure(Config::iha(h, 2, d), Chunk::Heads(h));
        let budget = 2 * head_scratch_bytes(&pb2);
        let (mut scratch, mut extra, mut unchunked) = (Vec::new(), Vec::new(), Vec::new());
        for p in [1, 2, 4] {
            let cfg = Config::iha(h, p, d);
            let (pb, chunked) = figure(cfg, Chunk::Budget(budget));
            let (_, whole) = figure(cfg, Chunk::Heads(h));
            assert_eq!(chunked.chunk_heads(), 4 / p);
            assert!(chunked.x.hc as u64 * head_scratch_bytes(&pb) <= budget);
            scratch.push(chunked.scratch_bytes());
            // Beyond the scratch: the uploaded weights (`aq, ak, av, r`: `(Hq + 2 Hk + H)·H·P`
            // f32, the parameters themselves, as large as their gradients), the same in both plans.
            let weights = 4 * (3 * h + h) as u64 * (h * p) as u64;
            assert_eq!(chunked.extra_bytes() - chunked.scratch_bytes(), weights);
            assert_eq!(whole.extra_bytes() - whole.scratch_bytes(), weights);
            extra.push(chunked.extra_bytes() - weights);
            unchunked.push(whole.extra_bytes() - weights);
            // One chunk: the old figure (rows with op, D, partials, weights and tables).
            let (bb, hp) = (b as u64, (h * p) as u64);
            let rows = 4 * bb * hp * d as u64 * (4 * n as u64 + 4 * m as u64) + 4 * bb * hp * n as u64;
            let parts = 4
                * ((bb * n.div_ceil(8) as u64) * (h as u64 * hp + 2 * (h * d) as u64)
                    + (bb * n.div_ceil(16) as u64) * h as u64 * hp
                    + 2 * (bb * m.div_ceil(16) as u64) * h as u64 * hp);
            assert_eq!(whole.scratch_bytes(), rows + parts, "P={p}");
        }
        assert!(scratch.windows(2).all(|s| s[0] == s[1]), "scratch grows with P: {scratch:?}");
        assert!(extra.windows(2).all(|s| s[0] == s[1]), "extra memory grows with P: {extra:?}");
        // Negative control: one chunk does grow with P (the check can fail).
        assert!(unchunked.windows(2).all(|s| s[0] < s[1]), "{unchunked:?}");
        // The default budget: the pseudo-head scratch at most the stored q, k, v in f32.
        let (pb, p) = figure(Config::iha(h, 4, d), Chunk::default_for(&pb2));
        let stored = 4 * (b * d * (n * h + 2 * m * h)) as u64;
        assert!(p.x.hc as u64 * head_scratch_bytes(&pb) <= stored || p.x.hc == 1);
    }

    #[test]
    fn the_chunk_variable_is_a_number_of_heads() {
        let (pb, _) = problem(Config::mha(4, 32), DType::F32);
        assert_eq!(Chunk::Heads(9).heads(&pb), 4);
        assert_eq!(Chunk::Heads(0).heads(&pb), 1);
        assert_eq!(Chunk::Budget(0).heads(&pb), 1);
        assert_eq!(Chunk::Budget(u64::MAX).heads(&pb), 4);
    }
}
