//! Decode on the wgpu device: the device-resident KV cache ([`WgpuKv`]), appends from host tensors
//! (the new tokens uploaded once) or device buffers (copied on the device), and the decode call:
//! `decode.wgsl` (one workgroup per (sequence, split of the cache), all heads, each cached tile
//! read once), then the forward's own `combine.wgsl` and, with collapse or head norm,
//! `epilogue.wgsl`.
//!
//! A decode call moves no cache byte between host and device: it uploads the new queries, the
//! uniforms and the packed weights, and reads back the output and log-sum-exp
//! ([`WgpuBackend::host_traffic`] counts every byte the backend moves).

use std::any::Any;

use super::WgpuBackend;
use super::device::device_err;
use super::kernels::{KernelKey, Kind, decode_storage_bytes};
use super::launch::{self, COMBINE_WG, Dispatch, EPILOGUE_WG, Uniforms, loops, rope_table, to_u32};
use super::tensor::WgpuTensor;
use crate::cache::{CacheShape, DeviceKv, HostTraffic, KvCache, TrafficCounter, owned_from_le_bytes};
use crate::decode::plan::{bands, rope_levels, selection_bits, split};
use crate::decode::{DecodeIo, DecodeProblem};
use crate::timing::Owned;
use crate::validate::Problem;
use crate::{BackendKind, DType, Data, Error, Result, Weights};

fn unsupported(why: String) -> Error {
    Error::Unsupported { backend: "wgpu", why }
}

/// A KV cache in wgpu buffers: keys and values `[B, capacity, Hk, d]` in the cache dtype (f16 and
/// bf16 packed two per 32-bit word, as the kernels read them) and the absolute length of each
/// sequence as `u32 [B]`.
pub struct WgpuKv {
    device: wgpu::Device,
    queue: wgpu::Queue,
    shape: CacheShape,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    lens: wgpu::Buffer,
    traffic: TrafficCounter,
    /// The backend that made it: only that backend (and its forks) reads or appends to it.
    owner: super::tensor::Owner,
}

/// Caches up to this size are filled with NaN at creation (a slot read before it is written
/// shows up in every test); larger ones start zeroed, as wgpu allocates them.
const POISON_BYTES: u64 = 64 << 20;

fn nan_bits(dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => f32::NAN.to_le_bytes().to_vec(),
        DType::F16 => half::f16::NAN.to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::NAN.to_le_bytes().to_vec(),
    }
}

impl WgpuKv {
    /// Allocate a cache of `shape` on the backend's device: refused (`Error::Unsupported`) above
    /// the adapter's largest storage binding or the kernels' 32-bit element index.
    pub(super) fn new(backend: &WgpuBackend, shape: &CacheShape) -> Result<WgpuKv> {
        shape.check()?;
        let limits = backend.device().limits();
        let bytes = shape.elements() * shape.dtype.size() as u128;
        let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as u128;
        if bytes > max {
            return Err(unsupported(format!(
                "a KV cache tensor of {bytes} bytes is above this adapter's largest storage binding ({max} bytes)"
            )));
        }
        if shape.elements() > u32::MAX as u128 {
            return Err(unsupported(format!(
                "a KV cache tensor of {} elements is above the WGSL kernels' 32-bit index",
                shape.elements()
            )));
        }
        let bytes = bytes as u64;
        let poison = bytes <= POISON_BYTES;
        let make = |label| {
            let buf = backend.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(4),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: poison,
            });
            if poison {
                let nan = nan_bits(shape.dtype);
                let mut view =
                    buf.get_mapped_range_mut(..).map_err(|e| device_err(format!("mapping the new cache: {e}")))?;
                view.copy_from_slice(&nan.repeat(bytes.max(4) as usize / nan.len()));
                drop(view);
                buf.unmap();
            }
            Ok(buf)
        };
        let (k, v) = backend.scoped(|| Ok((make("headmix kv cache k")?, make("headmix kv cache v")?)))?;
        let lens = backend.buffer(
            "headmix kv cache lengths",
            4 * shape.batch as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        backend.queue().write_buffer(&lens, 0, &vec![0u8; 4 * shape.batch]);
        Ok(WgpuKv {
            device: backend.device().clone(),
            queue: backend.queue().clone(),
            shape: *shape,
            k,
            v,
            lens,
            traffic: TrafficCounter::default(),
            owner: backend.owner.clone(),
        })
    }

    /// The key buffer `[B, capacity, Hk, d]`.
    pub fn keys(&self) -> &wgpu::Buffer {
        &self.k
    }

    /// The value buffer `[B, capacity, Hk, d]`.
    pub fn values(&self) -> &wgpu::Buffer {
        &self.v
    }

    /// The absolute lengths `u32 [B]` the kernels read.
    pub fn lens(&self) -> &wgpu::Buffer {
        &self.lens
    }

    /// Byte offset of slot `slot` of sequence `b`.
    fn at(&self, b: usize, slot: usize) -> u64 {
        self.shape.slot_offset(b, slot) as u64
    }
}

impl DeviceKv for WgpuKv {
    fn backend(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn write_rows(&mut self, b: usize, slot: usize, k: &Data, v: &Data, src_at: usize, rows: usize) -> Result<()> {
        let range = self.shape.rows_bytes(src_at, rows);
        self.queue.write_buffer(&self.k, self.at(b, slot), &k.bytes()[range.clone()]);
        self.queue.write_buffer(&self.v, self.at(b, slot), &v.bytes()[range.clone()]);
        self.traffic.upload(2 * range.len() as u64);
        Ok(())
    }

    fn set_lens(&mut self, lens: &[usize]) -> Result<()> {
        let words: Vec<u32> = lens.iter().map(|&l| l as u32).collect(); // <= 2^31 - 1 (check_room)
        self.queue.write_buffer(&self.lens, 0, bytemuck::cast_slice(&words));
        Ok(())
    }

    fn read_back(&self) -> Result<(Owned, Owned)> {
        let bytes = self.k.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("headmix kv cache read back"),
            size: 2 * bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.k, 0, &staging, 0, bytes);
        enc.copy_buffer_to_buffer(&self.v, 0, &staging, bytes, bytes);
        self.queue.submit([enc.finish()]);
        let raw = super::backend::map_read(&self.device, &staging)?;
        self.traffic.download(2 * bytes);
        let len = self.shape.elements() as usize * self.shape.dtype.size(); // (the buffers are at least 4 bytes)
        let (kb, vb) = raw.split_at(bytes as usize);
        Ok((owned_from_le_bytes(self.shape.dtype, &kb[..len]), owned_from_le_bytes(self.shape.dtype, &vb[..len])))
    }

    fn traffic(&self) -> HostTraffic {
        self.traffic.get()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Cached tokens per tile, largest first (the largest whose workgroup memory fits is used).
const TILE_TOKENS: [u32; 5] = [16, 8, 4, 2, 1];
/// Workgroups the split heuristic aims for, and the fewest tiles a split should hold.
const TARGET_WORKGROUPS: usize = 256;
const MIN_TILES_PER_SPLIT: usize = 2;

/// Everything one decode call launches.
#[allow(dead_code)] // splits and tokens_per_split are for reports (bench)
pub(crate) struct DecodePlan {
    pub uniforms: Uniforms,
    pub weights: Vec<f32>,
    /// decode, combine, then the epilogue when collapse or norm asks for it.
    pub passes: Vec<Dispatch>,
    /// Bytes of the f32 scratch (pseudo outputs for the epilogue, the split partials).
    pub op_bytes: u64,
    /// Splits of the cache per sequence and cached tokens per split.
    pub splits: usize,
    pub tokens_per_split: usize,
    /// Cache bytes the decode kernel reads: every held token of the visible band, keys and
    /// values, once (counted from the plan, not measured).
    pub cache_bytes_read: u64,
}

/// The workgroup size: enough threads for the rows' output pairs, within the device's limits.
fn threads(rows_half: usize, limits: &wgpu::Limits) -> u32 {
    let max = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x).min(256);
    let want = (rows_half / 8).next_power_of_two().clamp(64, 256) as u32;
    let mut wg = want;
    while wg > max {
        wg /= 2;
    }
    wg.max(1)
}

/// Plan a validated decode problem on a cache of `shape` whose sequences hold `lens` tokens.
pub(crate) fn plan(
    problem: &DecodeProblem,
    w: &Weights,
    shape: &CacheShape,
    lens: &[usize],
    splits: Option<usize>,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
) -> Result<DecodePlan> {
    let c = &problem.cfg;
    let (b, n, d, p, h, hq, hk) = (problem.batch, problem.n, c.head_dim, c.pseudo, c.heads, c.q_heads, c.kv_heads);
    let np = n * p;
    let cap = shape.capacity;
    if (cap as u128) * (p as u128) > crate::validate::MAX_INDEX as u128 {
        return Err(unsupported(format!("capacity {cap} times P = {p} virtual keys above 2^31 - 1")));
    }
    // Packed weights: aq | ak | av | r | gamma | RoPE table, as the forward (the RoPE levels,
    // table and selection bits: crate::decode::plan, shared with the CUDA decode).
    let rope_levels = rope_levels(c, lens, cap);
    if rope_levels > 4 {
        let max_pos = crate::decode::plan::max_position(c, lens, cap);
        return Err(unsupported(format!("RoPE position {max_pos} above 2^32 - 1")));
    }
    let rope = match c.rope {
        Some(r) => rope_table(rope_levels, d, r.base as f64),
        None => Vec::new(),
    };
    // No gather tables: the decode kernel reads the selection bits below.
    let packed = super::pack::pack(c, w, false, &rope)?;
    let selection = selection_bits(c, w);

    // Tile: the most cached tokens per tile whose workgroup memory fits.
    let d32 = to_u32("head dim", d)?;
    let rows = h * np;
    let wg = threads(rows * d / 2, limits);
    let dims = (to_u32("kv heads", hk)?, to_u32("heads", h)?, to_u32("pseudo", p)?, to_u32("N·P", np)?);
    let storage = limits.max_compute_workgroup_storage_size as u64;
    let tc = TILE_TOKENS
        .into_iter()
        .find(|&tc| decode_storage_bytes(d32, tc, dims.0, dims.1, dims.2, dims.3) <= storage)
        .ok_or_else(|| {
            unsupported(format!(
                "the decode kernel's workgroup memory for H·N·P = {rows} rows, Hk = {hk}, d = {d} ({} bytes with \
                 one cached token per tile) is above this adapter's {storage} bytes",
                decode_storage_bytes(d32, 1, dims.0, dims.1, dims.2, dims.3)
            ))
        })?;
    let key = |kind| KernelKey { kind, dtype: problem.dtype, d: d32 };

    // Splits: fill the device, keep each split's share of tiles under the loop budget.
    let (_, band_max) = bands(problem);
    let tiles = band_max.div_ceil(tc as usize);
    let mut n_splits = match splits {
        Some(s) => s.clamp(1, band_max),
        None => TARGET_WORKGROUPS.div_ceil(b).min(tiles / MIN_TILES_PER_SPLIT).max(1),
    };
    let levels = rope_levels as u64;
    let cost = |tiles: u64| loops::decode(wg, tc, (hq, hk, h, p, np, d), levels, tiles);
    if let Some(budget) = loop_budget {
        let (fixed, per_tile) = (cost(0), cost(1) - cost(0));
        let tiles_per_split = budget.saturating_sub(fixed) / per_tile;
        if tiles_per_split == 0 {
            return Err(over_budget("decode", cost(1), budget));
        }
        if splits.is_none() {
            n_splits = n_splits.max(tiles.div_ceil(tiles_per_split as usize));
        }
    }
    let (n_splits, tokens_per_split) = split(band_max, n_splits); // no empty split at the end
    if let Some(budget) = loop_budget {
        let iterations = cost(tokens_per_split.div_ceil(tc as usize) as u64);
        if iterations > budget {
            return Err(over_budget("decode", iterations, budget));
        }
    }

    let direct = !problem.collapse && !problem.norm;
    let op_len = if direct { 0 } else { b * rows * d };
    let part_len = n_splits * b * rows * (d + 2);
    to_u32("f32 scratch elements (kernels index it with u32)", op_len + part_len)?;
    let n_vec = b * n * h * if problem.collapse { 1 } else { p };
    let (win_left, win_right) = c.window.map_or((0, 0), |w| (w.left.min(cap * p), w.right.min(cap * p)));
    let u = Uniforms {
        batch: to_u32("batch", b)?,
        n: to_u32("n", n)?,
        m: to_u32("capacity", cap)?,
        nq: dims.3,
        nk: to_u32("capacity·P", cap * p)?,
        off: 0,
        win_left: win_left as u32,
        win_right: win_right as u32,
        rope_levels,
        q_tiles: to_u32("tokens per split", tokens_per_split)?,
        splits: to_u32("splits", n_splits)?,
        collapse: problem.collapse as u32,
        direct: direct as u32,
        n_vec: to_u32("output vectors", n_vec)?,
        part_off: to_u32("scratch offset", op_len)?,
        dec_sel: selection,
        ..packed.uniforms(c, w)?
    };

    // The forward's combine and epilogue, on the problem of the whole batch.
    let fwd = Problem {
        cfg: *c,
        batch: b,
        n,
        m: n,
        dtype: problem.dtype,
        collapse: problem.collapse,
        norm: problem.norm,
        checked: crate::validate::Checked(()), // sizes of a validated decode problem
    };
    let decode = Dispatch {
        key: key(Kind::Decode { tc, wg, hk: dims.0, h: dims.1, p: dims.2, np: dims.3 }),
        workgroups: to_u32("workgroups", b * n_splits)?,
    };
    let combine = Dispatch { key: key(Kind::Combine { wg: COMBINE_WG }), workgroups: to_u32("rows", b * rows)? };
    let epilogue = (!direct).then(|| Dispatch { key: key(Kind::Epilogue { wg: EPILOGUE_WG }), workgroups: u.n_vec });
    if let Some(budget) = loop_budget {
        let tails = [
            ("combine", loops::combine(&fwd, n_splits, COMBINE_WG)),
            ("epilogue", if epilogue.is_some() { loops::epilogue(&fwd, EPILOGUE_WG) } else { 0 }),
        ];
        if let Some((kernel, iterations)) = tails.into_iter().find(|t| t.1 > budget) {
            return Err(over_budget(kernel, iterations, budget));
        }
    }
    let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as u128;
    let out_len: u128 = problem.out_shape().iter().map(|&x| x as u128).product();
    for (what, bytes) in [
        ("q", (b * n * hq * d * problem.dtype.size()) as u128),
        ("out", out_len * problem.dtype.size() as u128),
        ("f32 scratch (pseudo outputs, split partials)", 4 * (op_len + part_len) as u128),
        ("weights", 4 * packed.weights.len() as u128),
    ] {
        if bytes > max_binding {
            return Err(unsupported(format!(
                "{what} needs {bytes} bytes, above this adapter's largest storage binding ({max_binding} bytes)"
            )));
        }
    }
    if limits.max_storage_buffers_per_shader_stage < 8 {
        return Err(unsupported(format!(
            "the decode kernel binds 8 storage buffers, the adapter allows {}",
            limits.max_storage_buffers_per_shader_stage
        )));
    }
    let passes: Vec<Dispatch> = [decode, combine].into_iter().chain(epilogue).collect();
    for pass in &passes {
        launch::grid(pass.workgroups, limits)?;
    }
    let cache_bytes_read = crate::decode::cache_bytes_read(problem);
    Ok(DecodePlan {
        uniforms: u,
        weights: packed.weights,
        passes,
        op_bytes: 4 * (op_len + part_len) as u64,
        splits: n_splits,
        tokens_per_split,
        cache_bytes_read,
    })
}

/// Bind groups, pipelines and output buffers of one decode call, ready to record.
struct PreparedDecode {
    decode_group: wgpu::BindGroup,
    forward_group: wgpu::BindGroup,
    passes: Vec<(std::sync::Arc<wgpu::ComputePipeline>, (u32, u32))>,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

fn over_budget(kernel: &str, iterations: u64, budget: u64) -> Error {
    unsupported(format!(
        "the {kernel} kernel would run {iterations} loop iterations per invocation, above this adapter's \
         {budget} (llvmpipe ends longer loops early); use fewer heads or a hardware adapter"
    ))
}

impl WgpuBackend {
    /// The plan [`crate::Backend::decode`] would launch for a validated problem on this device's
    /// cache (splits, tile, cache bytes read), without running it: for benchmarks and reports.
    pub(crate) fn decode_plan(&self, problem: &DecodeProblem, w: &Weights, cache: &KvCache) -> Result<DecodePlan> {
        plan(
            problem,
            w,
            &cache.shape(),
            cache.lens(),
            self.kv_splits.map(|s| s as usize),
            &self.device().limits(),
            self.loop_budget(),
        )
    }

    /// Cache bytes one decode call of `problem` reads on this device (counted from the plan:
    /// every held token of each sequence's visible band, keys and values, once).
    pub fn decode_cache_bytes(&self, problem: &DecodeProblem, w: &Weights, cache: &KvCache) -> Result<u64> {
        Ok(self.decode_plan(problem, w, cache)?.cache_bytes_read)
    }

    /// Decode on a cache in this device's memory: new queries uploaded, the three passes, output
    /// and lse read back. The cache is read in place.
    pub(super) fn decode_on_device(
        &self,
        problem: &DecodeProblem,
        w: &Weights,
        io: DecodeIo<'_>,
        kv: &WgpuKv,
    ) -> Result<()> {
        self.check_cache(kv)?;
        self.check_faults()?;
        let plan = self.decode_plan(problem, w, io.cache)?;
        let out_bytes = (io.out.data.len() * io.out.dtype().size()) as u64;
        let lse_bytes = 4 * problem.lse_len() as u64;
        let bytes = self.scoped(|| {
            use wgpu::BufferUsages as U;
            let q = self.upload("q", io.q.data.bytes(), U::STORAGE);
            let call = self.prepare_decode(&plan, &q, kv, out_bytes, lse_bytes)?;
            let mut enc = self.device().create_command_encoder(&Default::default());
            self.record_decode(&call, &mut enc, None);
            let staging = self.buffer("read back", out_bytes + lse_bytes, U::MAP_READ | U::COPY_DST);
            enc.copy_buffer_to_buffer(&call.out, 0, &staging, 0, out_bytes);
            enc.copy_buffer_to_buffer(&call.lse, 0, &staging, out_bytes, lse_bytes);
            self.queue.submit([enc.finish()]);
            self.read_back(&staging)
        })?;
        // Only now, with the device work done and no error, touch the caller's outputs.
        let (out_part, lse_part) = bytes.split_at(out_bytes as usize);
        let mut out = io.out;
        out.data.bytes_mut().copy_from_slice(out_part);
        if let Some(lse) = io.lse {
            bytemuck::cast_slice_mut::<f32, u8>(lse).copy_from_slice(&lse_part[..lse_bytes as usize]);
        }
        Ok(())
    }

    fn check_cache(&self, kv: &WgpuKv) -> Result<()> {
        // By identity: `wgpu::Device` equality compares ids, which repeat across wgpu instances.
        if !kv.owner.is(&self.owner) {
            return Err(Error::Cache {
                why: "the cache was made by another wgpu backend (device or instance) than this one".into(),
            });
        }
        Ok(())
    }

    /// Output, scratch and small uploads of one decode call, its bind groups and pipelines.
    fn prepare_decode(
        &self,
        plan: &DecodePlan,
        q: &wgpu::Buffer,
        kv: &WgpuKv,
        out_bytes: u64,
        lse_bytes: u64,
    ) -> Result<PreparedDecode> {
        use wgpu::BufferUsages as U;
        let out = self.buffer("out", out_bytes, U::STORAGE | U::COPY_SRC);
        let lse = self.buffer("lse", lse_bytes, U::STORAGE | U::COPY_SRC);
        let uniforms = self.upload("headmix uniforms", bytemuck::bytes_of(&plan.uniforms), U::UNIFORM);
        let weights = self.upload("headmix weights", bytemuck::cast_slice(&plan.weights), U::STORAGE);
        let op = self.buffer("headmix decode scratch", plan.op_bytes, U::STORAGE);
        let buffers = [&uniforms, &weights, q, &kv.k, &kv.v, &out, &lse, &op, &kv.lens];
        let entries = |n: usize| -> Vec<wgpu::BindGroupEntry> {
            buffers[..n]
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
                .collect()
        };
        let device = self.device();
        let layout = &self
            .kernels
            .decode_layout
            .as_ref()
            .ok_or_else(|| unsupported("the decode kernel needs 8 storage buffers per shader stage".into()))?
            .0;
        let decode_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("headmix decode"),
            layout,
            entries: &entries(9),
        });
        let forward_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("headmix decode combine"),
            layout: &self.kernels.layout,
            entries: &entries(8),
        });
        let limits = device.limits();
        let passes = plan
            .passes
            .iter()
            .map(|p| Ok((self.kernels.pipeline(&p.key)?, launch::grid(p.workgroups, &limits)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PreparedDecode { decode_group, forward_group, passes, out, lse })
    }

    /// Record the passes of a prepared decode; with `timestamps = (set, i)` write queries `i`
    /// (start of the decode pass) and `i + 1` (end of the last pass).
    fn record_decode(
        &self,
        call: &PreparedDecode,
        enc: &mut wgpu::CommandEncoder,
        timestamps: Option<(&wgpu::QuerySet, u32)>,
    ) {
        let last = call.passes.len() - 1;
        for (i, (pipeline, (x, y))) in call.passes.iter().enumerate() {
            let timestamp_writes =
                timestamps.filter(|_| i == 0 || i == last).map(|(set, base)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: (i == 0).then_some(base),
                    end_of_pass_write_index: (i == last).then_some(base + 1),
                });
            let mut cp = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("headmix decode"), timestamp_writes });
            cp.set_pipeline(pipeline);
            cp.set_bind_group(0, if i == 0 { &call.decode_group } else { &call.forward_group }, &[]);
            cp.dispatch_workgroups(*x, *y, 1);
        }
    }

    /// Device time of `reps` decode calls on a cache of this device (after one warm-up call),
    /// random new queries uploaded once: GPU timestamps around the passes where the adapter has
    /// `TIMESTAMP_QUERY`, else the host clock around submit + wait. With the plan's counted
    /// cache bytes read per call, for the decode benchmark.
    pub fn time_decode_device(
        &self,
        cfg: &crate::Config,
        w: &Weights,
        cache: &KvCache,
        n: usize,
        reps: usize,
    ) -> Result<crate::decode::DecodeTiming> {
        let kv = cache.device_storage().and_then(|d| d.as_any().downcast_ref::<WgpuKv>()).ok_or_else(|| {
            Error::Cache { why: format!("the cache lives on the {} device, not wgpu", cache.location()) }
        })?;
        self.check_cache(kv)?;
        let (q, qs, mut out, os) = crate::decode::timing_io(cfg, w, cache, n);
        let out_len = out.to_f32().len();
        let shape = cache.shape();
        let io = DecodeIo { q: q.tensor(&qs), cache, out: out.tensor_mut(&os), lse: None };
        let problem = crate::decode::validate_decode(cfg, w, &io)?;
        let plan = self.decode_plan(&problem, w, cache)?;
        self.check_faults()?;
        let out_bytes = (out_len * shape.dtype.size()) as u64;
        let timing = self.scoped(|| {
            use wgpu::BufferUsages as U;
            let qb = self.upload("q", io.q.data.bytes(), U::STORAGE);
            let call = self.prepare_decode(&plan, &qb, kv, out_bytes, 4 * problem.lse_len() as u64)?;
            let (seconds, clock) = self.time_recorded(reps, |enc, stamps| self.record_decode(&call, enc, stamps))?;
            Ok(crate::Timing { seconds, extra_bytes: plan.op_bytes, clock })
        })?;
        Ok(crate::decode::DecodeTiming { timing, cache_bytes_read: plan.cache_bytes_read })
    }

    /// Append `n` tokens to every sequence of a cache on this device from device tensors `k`, `v`
    /// `[B, n, Hk, d]` in the cache dtype (e.g. the prefill forward's inputs of
    /// [`WgpuBackend::forward_buffers`]): copied on the device, no host round trip. The tensors
    /// must be this backend's ([`Error::ForeignBuffer`]) and need `BufferUsages::COPY_SRC`
    /// (every tensor the backend allocates has it).
    pub fn append_buffers(&self, cache: &mut KvCache, k: &WgpuTensor, v: &WgpuTensor, n: usize) -> Result<()> {
        let seqs: Vec<usize> = (0..cache.shape().batch).collect();
        self.append_from(cache, k, v, n, &seqs, n)
    }

    /// Append `n` tokens to sequence `b` only (ragged prefill) from device tensors `[n, Hk, d]`.
    pub fn append_seq_buffers(
        &self,
        cache: &mut KvCache,
        b: usize,
        k: &WgpuTensor,
        v: &WgpuTensor,
        n: usize,
    ) -> Result<()> {
        self.append_from(cache, k, v, n, &[b], 0)
    }

    /// Copy rows of `k`, `v` into the cache: sequence `b`'s tokens start at row `b·stride`
    /// of the sources (`stride = 0`: one sequence's rows).
    fn append_from(
        &self,
        cache: &mut KvCache,
        k: &WgpuTensor,
        v: &WgpuTensor,
        n: usize,
        seqs: &[usize],
        stride: usize,
    ) -> Result<()> {
        let shape = cache.shape();
        let rows_needed = if stride == 0 { n } else { shape.batch * n };
        let row_bytes = (shape.kv_heads * shape.head_dim * shape.dtype.size()) as u64;
        for (what, t) in [("appended k buffer", k), ("appended v buffer", v)] {
            self.check_tensor(what, t, shape.dtype, rows_needed * shape.kv_heads * shape.head_dim)?;
            if !t.buffer().usage().contains(wgpu::BufferUsages::COPY_SRC) {
                return Err(device_err(format!("{what} lacks BufferUsages::COPY_SRC")));
            }
        }
        let kv = cache.device_storage().and_then(|d| d.as_any().downcast_ref::<WgpuKv>()).ok_or_else(|| {
            Error::Cache { why: format!("the cache lives on the {} device, not wgpu", cache.location()) }
        })?;
        self.check_cache(kv)?;
        let (k, v) = (k.buffer(), v.buffer());
        self.check_faults()?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        self.scoped(|| {
            cache.append_with(n, seqs, |d, b, t, slot, rows| {
                let kv = d.as_any().downcast_ref::<WgpuKv>().expect("checked above");
                let src = ((b * stride + t) as u64) * row_bytes;
                let bytes = rows as u64 * row_bytes;
                enc.copy_buffer_to_buffer(k, src, &kv.k, kv.at(b, slot), bytes);
                enc.copy_buffer_to_buffer(v, src, &kv.v, kv.at(b, slot), bytes);
                Ok(())
            })?;
            // Submitted before the lengths the append published are used by a later decode.
            self.queue.submit([enc.finish()]);
            Ok(())
        })
    }
}
