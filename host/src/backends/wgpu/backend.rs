//! `WgpuBackend`: the [`Backend`] implementation, the zero-copy entry point on the caller's
//! buffers, and device timing with timestamp queries.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wgpu::util::DeviceExt;

use super::Variant;
use super::device::{self, device_err};
use super::kernels::{Kernels, flash_tiles};
use super::launch::{self, Plan};
use super::tensor::{Owner, WgpuTensor};
use crate::timing::{Owned, try_random_inputs};
use crate::validate::{Problem, validate_config, validate_weights};
use crate::{Backend, BackendKind, Config, DType, Error, Io, Result, Timing, Weights};

/// Loop-iteration budget per invocation on llvmpipe, in the units of `launch::loops` (which
/// undercount llvmpipe's own count by up to ~1.8x: the cap there is 65535).
const LLVMPIPE_LOOP_BUDGET: u64 = 30_000;

/// Head-mixing attention on one wgpu device. Cheap to share: pipelines are compiled once per
/// (kernel, tile, dtype, head dim) and cached.
pub struct WgpuBackend {
    info: wgpu::AdapterInfo,
    pub(super) queue: wgpu::Queue,
    pub(super) kernels: Arc<Kernels>,
    variant: Variant,
    /// Forced split-KV ranges per query tile, or `None` for the heuristic.
    pub(super) kv_splits: Option<u32>,
    /// Bytes this backend moved host to device and device to host (uploads, read-backs).
    pub(super) uploaded: Arc<std::sync::atomic::AtomicU64>,
    downloaded: Arc<std::sync::atomic::AtomicU64>,
    /// Errors no error scope caught (device loss, errors raised on other threads), reported by
    /// the next call instead of wgpu's default panic.
    faults: Arc<Mutex<Option<String>>>,
    /// Stands in for the pseudo-output binding when no epilogue runs.
    dummy: wgpu::Buffer,
    /// A deliberately wrong backward kernel (negative controls of the tests); 0: none.
    pub(super) backward_fault: u32,
    /// Heads per chunk of the backward, forced (tests), or `None`: `HEADMIX_WGPU_BWD_CHUNK_HEADS`,
    /// else the memory budget (see `backward::Chunking`).
    pub(super) backward_chunk_heads: Option<usize>,
    /// This backend's identity: the owner of its [`WgpuTensor`]s and caches.
    pub(super) owner: Owner,
}

/// The device tensors of one [`WgpuBackend::forward_buffers`] call: handles made by this
/// backend ([`WgpuBackend::alloc_tensor`], [`WgpuBackend::upload_tensor`],
/// [`WgpuBackend::adopt_buffer`]), each holding at least the elements below, densely packed:
///
/// * `q`: `[B, N, Hq, d]` in the dtype; `k`, `v`: `[B, M, Hk, d]` in the dtype;
/// * `out`: `[B, N, H, d]` in the dtype when the weights carry `r`, else `[B, N, H, P, d]`;
/// * `lse`: `[B, H, N·P]` f32, optional.
///
/// A handle of another backend (another device or wgpu instance) is [`Error::ForeignBuffer`]
/// naming the binding; another dtype [`Error::DType`]; too few elements [`Error::Length`];
/// `out`/`lse` may not alias any other binding ([`Error::Alias`]; inputs may share a buffer).
#[derive(Clone, Copy, Debug)]
pub struct DeviceIo<'a> {
    /// Queries `[B, N, Hq, d]`.
    pub q: &'a WgpuTensor,
    /// Keys `[B, M, Hk, d]`.
    pub k: &'a WgpuTensor,
    /// Values `[B, M, Hk, d]`.
    pub v: &'a WgpuTensor,
    /// Output.
    pub out: &'a WgpuTensor,
    /// Log-sum-exp `[B, H, N·P]` (f32), when asked for.
    pub lse: Option<&'a WgpuTensor>,
}

/// Bind group and pipelines of one call, ready to record (possibly many times, for timing).
struct Prepared {
    bind_group: wgpu::BindGroup,
    /// Pipelines and 2-D grids, in launch order.
    passes: Vec<(Arc<wgpu::ComputePipeline>, (u32, u32))>,
    extra_bytes: u64,
}

impl WgpuBackend {
    /// Open the best adapter (see [`super::ADAPTER_VAR`], [`super::BACKEND_VAR`]) with the flash kernel.
    pub fn new() -> Result<WgpuBackend> {
        let adapter = device::pick_adapter()?;
        let (device, queue) = device::request_device(&adapter)?;
        let backend = WgpuBackend::from_device(adapter.get_info(), device, queue);
        // Route errors outside our error scopes, and device loss, to the next call's result.
        let faults = backend.faults.clone();
        backend.kernels.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            faults.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(describe_error(&e));
        }));
        let faults = backend.faults.clone();
        backend.kernels.device.set_device_lost_callback(move |reason, msg| {
            faults.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(format!("device lost ({reason:?}): {msg}"));
        });
        Ok(backend)
    }

    /// Run on a device the caller opened (to share it with another wgpu library; its buffers
    /// enter [`WgpuBackend::forward_buffers`] through [`WgpuBackend::adopt_buffer`]).
    /// `info` is the adapter's `get_info()`, used for [`Backend::device_name`] and `describe`.
    /// The caller's uncaptured-error handler is left as it is. Each call makes a new identity:
    /// tensors and caches of one such backend are foreign to another (see [`WgpuBackend::fork`]).
    pub fn from_device(info: wgpu::AdapterInfo, device: wgpu::Device, queue: wgpu::Queue) -> WgpuBackend {
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("headmix unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        WgpuBackend {
            info,
            queue,
            kernels: Arc::new(Kernels::new(&device)),
            variant: Variant::Flash,
            kv_splits: None,
            faults: Arc::new(Mutex::new(None)),
            dummy,
            uploaded: Default::default(),
            downloaded: Default::default(),
            backward_fault: 0,
            backward_chunk_heads: None,
            owner: Owner::new(),
        }
    }

    /// Test hook (negative controls): run a deliberately wrong backward kernel. 1: the RoPE
    /// transpose rotates `dqt` by `+theta`; 2: `dS` without the `- D_i`; 3: `dvt` accumulates
    /// `dS` instead of `P`; 4: the mix-back reads the mixing matrices transposed (`a[h, m, p]`,
    /// where the stored heads number `H`); 5: the mix-back multiplies selection matrices densely
    /// (`0 · x` of unread heads, against the NaN policy); over several chunks of heads, 6: the
    /// mix-back drops the chunks before the last, 7: the collapse's `y` keeps only the last
    /// chunk's columns. 0: the correct kernels.
    #[doc(hidden)]
    pub fn with_backward_fault(mut self, fault: u32) -> WgpuBackend {
        self.backward_fault = fault;
        self
    }

    /// Run the backward over chunks of `heads` heads (`Some(h)` with `h >= H`: one chunk, the
    /// unchunked passes); `None` (the default): the environment variable
    /// `HEADMIX_WGPU_BWD_CHUNK_HEADS` if set, else the memory budget, which chunks only when the
    /// pseudo-head scratch of all heads exceeds twice the stored `q, k, v` in f32
    /// (`kernels-wgsl/README.md`, "WGSL backward"). The gradients are bit-identical either way.
    pub fn with_backward_chunk_heads(mut self, heads: Option<usize>) -> WgpuBackend {
        self.backward_chunk_heads = heads;
        self
    }

    /// Another backend on this device and queue with the same identity: it accepts this
    /// backend's [`WgpuTensor`]s and KV caches (and this one its) and shares its compiled
    /// pipelines, with its own kernel variant, split-KV and backward chunk settings, e.g.
    /// `gpu.fork().with_kv_splits(Some(4))`. (A second
    /// [`WgpuBackend::from_device`] on the same device is a new identity: handles do not cross.)
    pub fn fork(&self) -> WgpuBackend {
        let device = self.device();
        let mut forked = WgpuBackend::from_device(self.info.clone(), device.clone(), self.queue.clone());
        forked.variant = self.variant;
        forked.kv_splits = self.kv_splits;
        forked.backward_chunk_heads = self.backward_chunk_heads;
        forked.kernels = self.kernels.clone(); // the same device: share the compiled pipelines
        forked.faults = self.faults.clone();
        forked.owner = self.owner.clone();
        forked
    }

    /// The same device with another attention kernel (e.g. [`Variant::Naive`], the baseline).
    pub fn with_variant(mut self, variant: Variant) -> WgpuBackend {
        self.variant = variant;
        self
    }

    /// Split the keys of each query tile into `splits` ranges run by separate workgroups and
    /// merged by a combine pass (split-KV, for decode). `None` (the default): split only when the
    /// query tiles alone give too few workgroups to fill a GPU; `Some(1)`: never split.
    pub fn with_kv_splits(mut self, splits: Option<u32>) -> WgpuBackend {
        self.kv_splits = splits.map(|s| s.max(1));
        self
    }

    /// The kernel variant in use.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The wgpu device (for the caller's own work; its buffers enter the device entries through
    /// [`WgpuBackend::adopt_buffer`]).
    pub fn device(&self) -> &wgpu::Device {
        &self.kernels.device
    }

    /// The device's queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The adapter's name, backend and type.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether timing uses GPU timestamps (`TIMESTAMP_QUERY`) rather than the host clock.
    pub fn has_timestamps(&self) -> bool {
        self.device().features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Zero copy: validate, then record and submit one forward call on `queue` reading and writing
    /// device tensors of this backend (layouts and checks in [`DeviceIo`]). Returns once
    /// submitted; the results are ready when the queue's work completes
    /// ([`WgpuBackend::download_tensor`] waits for it, or `device.poll`). Small temporary
    /// buffers (uniforms, packed weights, the f32 pseudo outputs when `r` or a head norm is given) are
    /// allocated per call and freed by wgpu after the work completes.
    pub fn forward_buffers(
        &self,
        cfg: &Config,
        w: &Weights,
        batch: usize,
        n: usize,
        m: usize,
        dtype: DType,
        io: DeviceIo<'_>,
    ) -> Result<()> {
        let problem = problem_of(cfg, w, batch, n, m, dtype)?;
        self.supports(&problem)?;
        let c = &problem.cfg;
        let out_len: usize = problem.out_shape().iter().product();
        let needs = [
            ("q buffer", io.q, dtype, batch * n * c.q_heads * c.head_dim),
            ("k buffer", io.k, dtype, batch * m * c.kv_heads * c.head_dim),
            ("v buffer", io.v, dtype, batch * m * c.kv_heads * c.head_dim),
            ("out buffer", io.out, dtype, out_len),
        ];
        let lse_bytes = 4 * problem.lse_len() as u64;
        // Ownership first (a handle of another backend, device or wgpu instance is refused by
        // identity before wgpu sees its buffer), then dtype, length and usage.
        for (what, t, dtype, len) in
            needs.into_iter().chain(io.lse.map(|l| ("lse buffer", l, DType::F32, problem.lse_len())))
        {
            self.check_tensor(what, t, dtype, len)?;
            if !t.buffer().usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::device("wgpu", format!("{what} lacks BufferUsages::STORAGE")));
            }
        }
        // Outputs may not alias any other binding (whole buffers at offset 0: aliasing is
        // identity); inputs may share a buffer (they are only read).
        let bindings = [
            ("q buffer", Some(io.q.buffer())),
            ("k buffer", Some(io.k.buffer())),
            ("v buffer", Some(io.v.buffer())),
            ("out buffer", Some(io.out.buffer())),
        ];
        for (what, out) in [("out buffer", Some(io.out.buffer())), ("lse buffer", io.lse.map(|l| l.buffer()))] {
            let Some(out) = out else { continue };
            for &(other, buf) in bindings.iter().filter(|(o, _)| *o != what) {
                if buf == Some(out) {
                    return Err(Error::Alias { what, other });
                }
            }
        }
        self.check_faults()?;
        let plan =
            launch::plan(&problem, w, self.variant, self.kv_splits, &self.device().limits(), self.loop_budget())?;
        self.scoped(|| {
            let scratch;
            let lse = match io.lse {
                Some(l) => l.buffer(),
                None => {
                    scratch = self.buffer("lse", lse_bytes, wgpu::BufferUsages::STORAGE);
                    &scratch
                }
            };
            let prepared = self.prepare(&plan, [io.q.buffer(), io.k.buffer(), io.v.buffer(), io.out.buffer(), lse])?;
            let mut enc = self.device().create_command_encoder(&Default::default());
            self.record(&prepared, &mut enc, None);
            self.queue.submit([enc.finish()]);
            Ok(())
        })
    }

    /// Time `reps` submissions of what `record` records (after one warm-up submission): the
    /// device's timestamps around the first and last pass where the adapter has
    /// `TIMESTAMP_QUERY` (`record` gets the query set and base index to write them to), else the
    /// host clock around submit + wait. Returns the seconds per rep and the clock's name.
    pub(super) fn time_recorded(
        &self,
        reps: usize,
        record: impl Fn(&mut wgpu::CommandEncoder, Option<(&wgpu::QuerySet, u32)>),
    ) -> Result<(Vec<f64>, &'static str)> {
        use wgpu::BufferUsages as U;
        let stamps = self.has_timestamps();
        let set = stamps.then(|| {
            self.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("headmix timing"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        let stride = wgpu::QUERY_RESOLVE_BUFFER_ALIGNMENT;
        let resolve = self.buffer("timestamps", stride * reps.max(1) as u64, U::QUERY_RESOLVE | U::COPY_SRC);
        let mut seconds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            let mut enc = self.device().create_command_encoder(&Default::default());
            record(&mut enc, set.as_ref().map(|s| (s, 0)));
            if let (Some(set), Some(r)) = (&set, rep.checked_sub(1)) {
                enc.resolve_query_set(set, 0..2, &resolve, stride * r as u64);
            }
            let t = Instant::now();
            self.queue.submit([enc.finish()]);
            self.device().poll(wgpu::PollType::wait_indefinitely()).map_err(|e| device::device_caused("poll", e))?;
            if rep > 0 {
                seconds.push(t.elapsed().as_secs_f64());
            }
        }
        if stamps && reps > 0 {
            let staging = self.buffer("timestamps read back", stride * reps as u64, U::MAP_READ | U::COPY_DST);
            let mut enc = self.device().create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, stride * reps as u64);
            self.queue.submit([enc.finish()]);
            let bytes = self.read_back(&staging)?;
            let period = self.queue.get_timestamp_period() as f64 * 1e-9;
            for (r, s) in seconds.iter_mut().enumerate() {
                let at = |i: usize| {
                    let o = r * stride as usize + 8 * i;
                    u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
                };
                *s = at(1).wrapping_sub(at(0)) as f64 * period;
            }
        }
        Ok((seconds, if stamps { "wgpu timestamps" } else { "wall clock (submit + wait)" }))
    }

    /// Loop iterations one invocation may run: Mesa's llvmpipe (lavapipe) silently ends an
    /// invocation's loops after 65535 iterations in all; the kernels stay under this budget (the
    /// flash kernel by splitting the keys) or refuse the call. `None`: no such limit.
    /// `HEADMIX_WGPU_LOOP_BUDGET=<n>` overrides it (`0`: no budget).
    pub fn loop_budget(&self) -> Option<u64> {
        if let Some(n) = std::env::var("HEADMIX_WGPU_LOOP_BUDGET").ok().and_then(|v| v.parse::<u64>().ok()) {
            return (n > 0).then_some(n);
        }
        let llvmpipe = |s: &str| s.to_lowercase().contains("llvmpipe");
        (llvmpipe(&self.info.name) || llvmpipe(&self.info.driver)).then_some(LLVMPIPE_LOOP_BUDGET)
    }

    /// Bytes this backend has moved between host and device so far: uploads (inputs, weights,
    /// uniforms) and read-backs (outputs). A decode on a device cache moves none of the cache.
    pub fn host_traffic(&self) -> crate::cache::HostTraffic {
        use std::sync::atomic::Ordering::Relaxed;
        crate::cache::HostTraffic { uploaded: self.uploaded.load(Relaxed), downloaded: self.downloaded.load(Relaxed) }
    }

    /// [`Error::ForeignBuffer`] unless `buf` belongs to this backend's device: a one-entry bind
    /// group on this device, in a validation error scope, accepts only buffers of this device
    /// (wgpu-core's device check; it cannot see buffers of another wgpu instance, hence
    /// [`WgpuBackend::adopt_buffer`], its only caller, is `unsafe`).
    pub(super) fn check_own_device(&self, what: &'static str, buf: &wgpu::Buffer) -> Result<()> {
        let device = self.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let _probe = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("headmix device check"),
            layout: &self.kernels.probe_layout,
            entries: &[wgpu::BindGroupEntry { binding: 0, resource: buf.as_entire_binding() }],
        });
        match pollster::block_on(scope.pop()) {
            None => Ok(()),
            Some(e) if describe_error(&e).contains("doesn't match") => Err(Error::ForeignBuffer { what }),
            Some(e) => Err(device_err(format!("{what}: {}", describe_error(&e)))),
        }
    }

    /// Report (once) an error that arrived outside an error scope.
    pub(super) fn check_faults(&self) -> Result<()> {
        match self.faults.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(why) => Err(device_err(why)),
            None => Ok(()),
        }
    }

    /// Run `f` inside validation, out-of-memory and internal error scopes: wgpu errors become
    /// `Error::Device` instead of panics.
    pub(super) fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let device = self.device();
        let scopes = [
            device.push_error_scope(wgpu::ErrorFilter::Validation),
            device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
            device.push_error_scope(wgpu::ErrorFilter::Internal),
        ];
        let result = f();
        let mut caught = None;
        for scope in scopes.into_iter().rev() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                caught.get_or_insert(describe_error(&e));
            }
        }
        self.check_faults()?;
        match caught {
            Some(why) => Err(device_err(why)),
            None => result,
        }
    }

    pub(super) fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4),
            usage,
            mapped_at_creation: false,
        })
    }

    pub(super) fn upload(&self, label: &str, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.uploaded.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytes,
            usage,
        })
    }

    /// Uniforms, weights and pseudo-output buffers, the bind group and the pipelines of a plan on
    /// the tensors `[q, k, v, out, lse]`.
    fn prepare(&self, plan: &Plan, tensors: [&wgpu::Buffer; 5]) -> Result<Prepared> {
        let limits = self.device().limits();
        let uniforms = self.upload("headmix uniforms", bytemuck::bytes_of(&plan.uniforms), wgpu::BufferUsages::UNIFORM);
        let weights = self.upload("headmix weights", bytemuck::cast_slice(&plan.weights), wgpu::BufferUsages::STORAGE);
        let op = (plan.op_bytes > 0)
            .then(|| self.buffer("headmix pseudo outputs", plan.op_bytes, wgpu::BufferUsages::STORAGE));
        let [q, k, v, out, lse] = tensors;
        let buffers = [&uniforms, &weights, q, k, v, out, lse, op.as_ref().unwrap_or(&self.dummy)];
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        let bind_group = self.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("headmix call"),
            layout: &self.kernels.layout,
            entries: &entries,
        });
        let passes = plan
            .passes
            .iter()
            .map(|p| Ok((self.kernels.pipeline(&p.key)?, launch::grid(p.workgroups, &limits)?)))
            .collect::<Result<Vec<_>>>()?;
        let extra_bytes = plan.op_bytes + 4 * plan.weights.len() as u64 + std::mem::size_of_val(&plan.uniforms) as u64;
        Ok(Prepared { bind_group, passes, extra_bytes })
    }

    /// Record the call's passes; with `timestamps = (set, i)` write queries `i` (start of the
    /// first pass) and `i + 1` (end of the last).
    fn record(&self, p: &Prepared, enc: &mut wgpu::CommandEncoder, timestamps: Option<(&wgpu::QuerySet, u32)>) {
        let last = p.passes.len() - 1;
        for (i, (pipeline, (x, y))) in p.passes.iter().enumerate() {
            // Start stamp on the first pass, end stamp on the last; none on passes between.
            let timestamp_writes =
                timestamps.filter(|_| i == 0 || i == last).map(|(set, base)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: (i == 0).then_some(base),
                    end_of_pass_write_index: (i == last).then_some(base + 1),
                });
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("headmix"), timestamp_writes });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &p.bind_group, &[]);
            pass.dispatch_workgroups(*x, *y, 1);
        }
    }

    /// Wait for the queue, then read a MAP_READ buffer back.
    pub(super) fn read_back(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let bytes = map_read(self.device(), staging)?;
        self.downloaded.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(bytes)
    }
}

/// Wait for the device, then read a MAP_READ buffer back.
pub(super) fn map_read(device: &wgpu::Device, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| device_err(format!("poll: {e}")))?;
    rx.recv()
        .map_err(|_| device_err("buffer map callback never ran"))?
        .map_err(|e| device_err(format!("map_async: {e}")))?;
    let bytes = staging.get_mapped_range(..).map_err(|e| device_err(format!("get_mapped_range: {e}")))?.to_vec();
    staging.unmap();
    Ok(bytes)
}

/// A wgpu error on one line (its text is "Validation Error", then the chain of causes, one per line).
fn describe_error(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => "out of device memory".into(),
        e => e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Validate a call given by sizes (no host tensors): the checks of [`crate::validate`].
fn problem_of(cfg: &Config, w: &Weights, batch: usize, n: usize, m: usize, dtype: DType) -> Result<Problem> {
    validate_config(cfg)?;
    validate_weights(cfg, w)?;
    if cfg.check_finite {
        return Err(Error::Unsupported {
            backend: "wgpu",
            why: "check_finite validates host tensors; forward_buffers takes device buffers (check them before upload)"
                .into(),
        });
    }
    Problem::for_weights(cfg, w, batch, n, m, dtype)
}

impl Backend for WgpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn device_name(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    fn describe(&self) -> Vec<(String, String)> {
        let l = self.device().limits();
        let f = self.device().features();
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        let tiles = |d: u32| match flash_tiles(&l, d, usize::MAX) {
            Some((br, bc, wg)) => format!("{br} queries x {bc} keys, {wg} threads"),
            None => "does not fit".into(),
        };
        vec![
            ("adapter".into(), self.info.name.clone()),
            ("graphics API".into(), format!("{:?}", self.info.backend)),
            ("device type".into(), format!("{:?}", self.info.device_type)),
            ("driver".into(), format!("{} {}", self.info.driver, self.info.driver_info).trim().to_string()),
            ("kernel".into(), self.variant.name().into()),
            ("split-KV".into(), self.kv_splits.map_or("auto".into(), |s| s.to_string())),
            (
                "loop budget".into(),
                self.loop_budget().map_or("none".into(), |b| format!("{b} iterations per invocation (llvmpipe)")),
            ),
            ("workgroup storage".into(), format!("{} bytes", l.max_compute_workgroup_storage_size)),
            ("invocations / workgroup".into(), l.max_compute_invocations_per_workgroup.to_string()),
            ("workgroups / dimension".into(), l.max_compute_workgroups_per_dimension.to_string()),
            ("storage binding".into(), format!("{} bytes", l.max_storage_buffer_binding_size)),
            ("buffer size".into(), format!("{} bytes", l.max_buffer_size)),
            ("SHADER_F16".into(), yes(f.contains(wgpu::Features::SHADER_F16)) + " (f16/bf16 run packed either way)"),
            ("TIMESTAMP_QUERY".into(), yes(f.contains(wgpu::Features::TIMESTAMP_QUERY))),
            ("flash tile d=64".into(), tiles(64)),
            ("flash tile d=128".into(), tiles(128)),
        ]
    }

    /// On a cache of this device: the decode passes timed by GPU timestamps
    /// ([`WgpuBackend::time_decode_device`]); on a host cache, the host clock.
    fn time_decode(
        &self,
        cfg: &Config,
        w: &Weights,
        cache: &crate::cache::KvCache,
        n: usize,
        reps: usize,
    ) -> Result<crate::decode::DecodeTiming> {
        if cache.is_host() {
            return crate::decode::time_decode_host(self, cfg, w, cache, n, reps);
        }
        self.time_decode_device(cfg, w, cache, n, reps)
    }

    /// A cache in this device's memory ([`super::WgpuKv`]).
    fn new_cache_storage(&self, shape: &crate::cache::CacheShape) -> Result<Option<Box<dyn crate::cache::DeviceKv>>> {
        Ok(Some(Box::new(super::decode::WgpuKv::new(self, shape)?)))
    }

    /// Decode: a cache on this device is read in place by the decode kernel
    /// (`decode.wgsl`, then `combine.wgsl`); a host cache goes through the generic per-sequence path.
    fn decode(&self, problem: &crate::DecodeProblem, w: &Weights, io: crate::DecodeIo<'_>) -> Result<()> {
        match io.cache.device_storage() {
            None => crate::decode::decode_default(self, problem, w, io),
            Some(d) => match d.as_any().downcast_ref::<super::decode::WgpuKv>() {
                Some(kv) => self.decode_on_device(problem, w, io, kv),
                None => Err(Error::Cache {
                    why: format!("the cache lives on the {} device; this is the wgpu backend", d.backend()),
                }),
            },
        }
    }

    fn supports(&self, problem: &Problem) -> Result<()> {
        launch::check_limits(problem, self.variant, self.kv_splits, &self.device().limits(), self.loop_budget())
    }

    /// The WGSL backward (`backward.rs`; passes in `kernels-wgsl/README.md`, "WGSL backward").
    fn run_backward(&self, problem: &Problem, w: &Weights, io: crate::BackwardIo<'_>) -> Result<()> {
        super::backward::run(self, problem, w, io)
    }

    fn run(&self, problem: &Problem, w: &Weights, io: Io<'_>) -> Result<()> {
        problem.check_io(w, &io)?;
        self.supports(problem)?;
        self.check_faults()?;
        let plan = launch::plan(problem, w, self.variant, self.kv_splits, &self.device().limits(), self.loop_budget())?;
        let out_bytes = (io.out.data.len() * io.out.dtype().size()) as u64;
        let lse_bytes = 4 * problem.lse_len() as u64;
        let bytes = self.scoped(|| {
            use wgpu::BufferUsages as U;
            let q = self.upload("q", io.q.data.bytes(), U::STORAGE);
            let k = self.upload("k", io.k.data.bytes(), U::STORAGE);
            let v = self.upload("v", io.v.data.bytes(), U::STORAGE);
            let out = self.buffer("out", out_bytes, U::STORAGE | U::COPY_SRC);
            let lse = self.buffer("lse", lse_bytes, U::STORAGE | U::COPY_SRC);
            let prepared = self.prepare(&plan, [&q, &k, &v, &out, &lse])?;
            let staging = self.buffer("read back", out_bytes + lse_bytes, U::MAP_READ | U::COPY_DST);
            let mut enc = self.device().create_command_encoder(&Default::default());
            self.record(&prepared, &mut enc, None);
            enc.copy_buffer_to_buffer(&out, 0, &staging, 0, out_bytes);
            enc.copy_buffer_to_buffer(&lse, 0, &staging, out_bytes, lse_bytes);
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

    /// Device time of `reps` calls on resident random inputs: GPU timestamps around the passes
    /// when the adapter has `TIMESTAMP_QUERY`, else the host clock around submit + wait.
    fn time(&self, problem: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
        problem.check(w)?;
        self.supports(problem)?;
        self.check_faults()?;
        let c = &problem.cfg;
        let plan = launch::plan(problem, w, self.variant, self.kv_splits, &self.device().limits(), self.loop_budget())?;
        let (q, k, v) = try_random_inputs(problem, 1)?;
        let qs = [problem.batch, problem.n, c.q_heads, c.head_dim];
        let ks = [problem.batch, problem.m, c.kv_heads, c.head_dim];
        let owned = |x: &[f32]| Owned::from_f32(problem.dtype, x);
        let (q, k, v) = (owned(&q), owned(&k), owned(&v));
        let out_bytes: u64 = problem.out_shape().iter().product::<usize>() as u64 * problem.dtype.size() as u64;
        self.scoped(|| {
            use wgpu::BufferUsages as U;
            let q = self.upload("q", q.tensor(&qs).data.bytes(), U::STORAGE);
            let k = self.upload("k", k.tensor(&ks).data.bytes(), U::STORAGE);
            let v = self.upload("v", v.tensor(&ks).data.bytes(), U::STORAGE);
            let out = self.buffer("out", out_bytes, U::STORAGE);
            let lse = self.buffer("lse", 4 * problem.lse_len() as u64, U::STORAGE);
            let prepared = self.prepare(&plan, [&q, &k, &v, &out, &lse])?;
            let (seconds, clock) = self.time_recorded(reps, |enc, stamps| self.record(&prepared, enc, stamps))?;
            Ok(Timing { seconds, extra_bytes: prepared.extra_bytes, clock })
        })
    }
}
