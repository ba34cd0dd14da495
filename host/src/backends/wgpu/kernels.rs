//! WGSL sources, variant generation (constants substituted before compile), tile sizes chosen
//! from the device's limits, and the per-device pipeline cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{DType, Result};

// The sources, embedded by the `headmix-kernels-wgsl` crate.
use headmix_kernels_wgsl::{
    BACKWARD_COMMON, BACKWARD_DKDV, BACKWARD_DQ, BACKWARD_MIX, BACKWARD_PRE, BACKWARD_SUM, BACKWARD_WGRAD,
};
use headmix_kernels_wgsl::{
    COMBINE, COMMON, DECODE, DTYPE_BF16, DTYPE_F16, DTYPE_F32, EPILOGUE, FLASH_FORWARD as FLASH, MIXING,
    NAIVE_FORWARD as NAIVE,
};

/// Which kernel, with its compile-time tile sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Tiled flash forward: `br` query rows, `bc` keys per tile, `wg` threads.
    Flash { br: u32, bc: u32, wg: u32 },
    /// One thread per virtual query.
    Naive { wg: u32 },
    /// Collapse / head norm / dtype conversion, one workgroup of `wg` threads per output vector.
    Epilogue { wg: u32 },
    /// Merge of the split-KV partials, one workgroup of `wg` threads per virtual query.
    Combine { wg: u32 },
    /// Decode on a device cache: one workgroup of `wg` threads per (sequence, split), all `h`
    /// heads, `tc` cached tokens per tile, for `hk` stored heads, `p` pseudo-heads and `np = N·P`
    /// virtual queries per head (sizes of its workgroup arrays).
    Decode { tc: u32, wg: u32, hk: u32, h: u32, p: u32, np: u32 },
    /// Backward pre pass (`stage` 0: head norm's transpose, 1: `do` and `D`), one thread per vector.
    BwdPre { wg: u32, stage: u32 },
    /// Backward query-major pass (dqt), `t` virtual queries and keys per tile.
    BwdDq { t: u32 },
    /// Backward key-major pass (dkt, dvt), `t` virtual keys and queries per tile.
    BwdDkdv { t: u32 },
    /// Backward mix-back into dq, dk, dv, one thread per element pair.
    BwdMix { wg: u32 },
    /// Backward sums of split partials (dqt, dkt, dvt), one thread per element.
    BwdSum { wg: u32 },
    /// Backward weight gradients (`stage` 0: per-chunk partials, 1: their fixed-order sum).
    BwdWgrad { wg: u32, stage: u32 },
}

impl Kind {
    /// Whether the kernel is one of the backward's (its layout adds binding 8).
    pub fn is_backward(self) -> bool {
        matches!(
            self,
            Kind::BwdPre { .. }
                | Kind::BwdDq { .. }
                | Kind::BwdDkdv { .. }
                | Kind::BwdMix { .. }
                | Kind::BwdSum { .. }
                | Kind::BwdWgrad { .. }
        )
    }
}

/// One compiled variant: kernel, tensor dtype, head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub kind: Kind,
    pub dtype: DType,
    pub d: u32,
}

/// The full WGSL text of a variant.
pub fn source(v: &KernelKey) -> String {
    let dtype = match v.dtype {
        DType::F32 => DTYPE_F32,
        DType::F16 => DTYPE_F16,
        DType::BF16 => DTYPE_BF16,
    };
    let mut consts = format!("const D: u32 = {}u;\n", v.d);
    let body = match v.kind {
        Kind::Flash { br, bc, wg } => {
            consts += &format!("const BR: u32 = {br}u;\nconst BC: u32 = {bc}u;\nconst WG: u32 = {wg}u;\n");
            FLASH
        }
        Kind::Naive { wg } => {
            consts += &format!("const WG: u32 = {wg}u;\n");
            NAIVE
        }
        Kind::Epilogue { wg } => {
            consts += &format!("const WG: u32 = {wg}u;\n");
            EPILOGUE
        }
        Kind::Combine { wg } => {
            consts += &format!("const WG: u32 = {wg}u;\n");
            COMBINE
        }
        Kind::Decode { tc, wg, hk, h, p, np } => {
            consts += &format!(
                "const WG: u32 = {wg}u;\nconst TC: u32 = {tc}u;\nconst HK: u32 = {hk}u;\nconst H: u32 = {h}u;\n\
                 const P: u32 = {p}u;\nconst NP: u32 = {np}u;\n"
            );
            DECODE
        }
        Kind::BwdPre { wg, stage } | Kind::BwdWgrad { wg, stage } => {
            consts += &format!("const WG: u32 = {wg}u;\nconst STAGE: u32 = {stage}u;\n");
            if matches!(v.kind, Kind::BwdPre { .. }) { BACKWARD_PRE } else { BACKWARD_WGRAD }
        }
        Kind::BwdDq { t } | Kind::BwdDkdv { t } => {
            consts += &format!("const T: u32 = {t}u;\n");
            if matches!(v.kind, Kind::BwdDq { .. }) { BACKWARD_DQ } else { BACKWARD_DKDV }
        }
        Kind::BwdMix { wg } | Kind::BwdSum { wg } => {
            consts += &format!("const WG: u32 = {wg}u;\n");
            if matches!(v.kind, Kind::BwdMix { .. }) { BACKWARD_MIX } else { BACKWARD_SUM }
        }
    };
    // The shared pieces after common.wgsl: the mixing (kernels that mix pseudo-heads), then the
    // backward's declarations.
    let pieces: &[&str] = match v.kind {
        kind if kind.is_backward() => &[MIXING, BACKWARD_COMMON],
        Kind::Flash { .. } | Kind::Naive { .. } => &[MIXING],
        _ => &[],
    };
    format!("{consts}\n{dtype}\n{COMMON}\n{}\n{body}", pieces.join("\n"))
}

/// Bytes of workgroup memory the flash kernel declares for a tile shape (see flash_forward.wgsl).
pub fn flash_storage_bytes(d: u32, br: u32, bc: u32, wg: u32) -> u64 {
    4 * ((br + 2 * bc) * (d + 1) + br * bc + wg + br + bc) as u64 // ... + row_bad + col_bad
}

/// Bytes of workgroup memory the decode kernel declares (see decode.wgsl): queries of every
/// head, the stored tile, the current head's mixed tile, scores and row state.
pub fn decode_storage_bytes(d: u32, tc: u32, hk: u32, h: u32, p: u32, np: u32) -> u64 {
    let (d, tc, hk, h, p, np) = (d as u64, tc as u64, hk as u64, h as u64, p as u64, np as u64);
    let rows = h * np;
    4 * (rows * d + 2 * tc * hk * d + 2 * tc * p * d + np * tc * p + 2 * rows + np)
}

/// Tile shapes of the flash kernel, largest first: (query rows, keys, threads). Each has
/// `wg % br == 0` and `bc % (wg / br) == 0` (the threads of a row split the key columns).
/// Within one row count, wider key tiles come first.
const FLASH_TILES: [(u32, u32, u32); 12] = [
    (64, 32, 128),
    (32, 32, 128),
    (32, 16, 128),
    (16, 32, 128),
    (16, 16, 128),
    (16, 8, 128),
    (8, 64, 128),
    (8, 32, 64),
    (8, 16, 64),
    (8, 8, 64),
    (8, 4, 32),
    (4, 4, 16),
];

/// Threads per workgroup of the largest flash tile the device allows (for reports).
pub fn flash_threads(limits: &wgpu::Limits) -> u32 {
    FLASH_TILES
        .iter()
        .map(|t| t.2)
        .find(|&wg| wg <= limits.max_compute_invocations_per_workgroup && wg <= limits.max_compute_workgroup_size_x)
        .unwrap_or(0)
}

/// Tile sizes of the flash kernel for head dim `d` and `nq` virtual queries per head: the
/// largest shape whose workgroup memory and thread count fit the device; for query sequences
/// shorter than its rows (decode), the fewest rows that hold them all (at least 8), with the
/// widest key tile that fits.
pub fn flash_tiles(limits: &wgpu::Limits, d: u32, nq: usize) -> Option<(u32, u32, u32)> {
    let fits = |&&(br, bc, wg): &&(u32, u32, u32)| {
        wg <= limits.max_compute_invocations_per_workgroup
            && wg <= limits.max_compute_workgroup_size_x
            && flash_storage_bytes(d, br, bc, wg) <= limits.max_compute_workgroup_storage_size as u64
    };
    let best = *FLASH_TILES.iter().find(fits)?;
    if nq >= best.0 as usize {
        return Some(best);
    }
    let need = nq.max(8);
    FLASH_TILES
        .iter()
        .filter(fits)
        .filter(|t| t.0 as usize >= need)
        .min_by_key(|t| (t.0, std::cmp::Reverse(t.1)))
        .copied()
        .or(Some(best))
}

/// Compiled pipelines of one device, built once per variant and shared by all calls.
pub struct Kernels {
    pub device: wgpu::Device,
    pub layout: wgpu::BindGroupLayout,
    /// One read-only storage buffer: bind groups of it check a caller's buffer's device.
    pub probe_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    /// The decode kernel's layout: the shared one plus binding 8, the cache's lengths (8
    /// storage buffers; `None` on adapters that allow fewer).
    pub decode_layout: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    /// The backward kernels' layout: the shared one plus binding 8, the backward's uniforms.
    pub backward_layout: (wgpu::BindGroupLayout, wgpu::PipelineLayout),
    cache: Mutex<HashMap<KernelKey, Arc<wgpu::ComputePipeline>>>,
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    /// The shared bind-group layout (uniform, weights, q, k, v, out, lse, op) on `device`.
    pub fn new(device: &wgpu::Device) -> Kernels {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for b in 1..=4 {
            entries.push(storage_entry(b, true));
        }
        for b in 5..=7 {
            entries.push(storage_entry(b, false));
        }
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("headmix bindings"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("headmix pipeline layout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let mut backward_entries = entries.clone();
        backward_entries.push(wgpu::BindGroupLayoutEntry { binding: 8, ..entries[0] });
        let backward_layout = {
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("headmix backward bindings"),
                entries: &backward_entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("headmix backward pipeline layout"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            (layout, pipeline_layout)
        };
        entries.push(storage_entry(8, true));
        let decode_layout = (device.limits().max_storage_buffers_per_shader_stage >= 8).then(|| {
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("headmix decode bindings"),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("headmix decode pipeline layout"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            (layout, pipeline_layout)
        });
        let probe_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("headmix device check"),
            entries: &[storage_entry(0, true)],
        });
        Kernels {
            device: device.clone(),
            layout,
            probe_layout,
            pipeline_layout,
            decode_layout,
            backward_layout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline of a variant, compiled on first use (compile errors become `Error::Device`).
    pub fn pipeline(&self, v: &KernelKey) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(v) {
            return Ok(p.clone());
        }
        let layout = match (v.kind, &self.decode_layout) {
            (Kind::Decode { .. }, Some((_, layout))) => layout,
            (Kind::Decode { .. }, None) => {
                return Err(super::device::device_err("the decode kernel needs 8 storage buffers per shader stage"));
            }
            (kind, _) if kind.is_backward() => &self.backward_layout.1,
            _ => &self.pipeline_layout,
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("headmix kernel"),
            source: wgpu::ShaderSource::Wgsl(source(v).into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("headmix kernel"),
            layout: Some(layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(super::device::device_caused(&format!("compiling {v:?}"), e));
        }
        let p = Arc::new(pipeline);
        cache.insert(*v, p.clone());
        Ok(p)
    }
}
