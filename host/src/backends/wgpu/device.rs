//! Adapter and device selection: discrete GPU first, overridable by environment variables, with
//! limits and features requested from what the adapter offers.

use crate::{Error, Result};

/// `HEADMIX_WGPU_ADAPTER=<substring>`: pick the first adapter whose name contains it (case-insensitive).
pub const ADAPTER_VAR: &str = "HEADMIX_WGPU_ADAPTER";
/// `HEADMIX_WGPU_BACKEND=vulkan|metal|dx12|gl`: restrict the graphics API.
pub const BACKEND_VAR: &str = "HEADMIX_WGPU_BACKEND";

pub(crate) fn device_err(why: impl Into<String>) -> Error {
    Error::device("wgpu", why)
}

/// A wgpu error as `Error::Device`, kept as its source.
pub(crate) fn device_caused(what: &str, cause: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::device_caused("wgpu", what, cause)
}

fn backends_from_env() -> Result<wgpu::Backends> {
    let Ok(name) = std::env::var(BACKEND_VAR) else {
        // GL is opt-in: its compute support is partial and probing it prints noise.
        return Ok(wgpu::Backends::PRIMARY);
    };
    match name.to_ascii_lowercase().as_str() {
        "vulkan" => Ok(wgpu::Backends::VULKAN),
        "metal" => Ok(wgpu::Backends::METAL),
        "dx12" => Ok(wgpu::Backends::DX12),
        "gl" => Ok(wgpu::Backends::GL),
        other => Err(device_err(format!("{BACKEND_VAR}={other}: expected one of vulkan, metal, dx12, gl"))),
    }
}

/// Preference of a device type: discrete first, software (lavapipe) last.
fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The adapter to use: the env override, else the best-ranked compute-capable adapter.
pub(crate) fn pick_adapter() -> Result<wgpu::Adapter> {
    let backends = backends_from_env()?;
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    // The kernels bind 7 storage buffers; adapters without them (GL ES 3.0) cannot run them.
    adapters.retain(|a| a.limits().max_storage_buffers_per_shader_stage >= 7);
    if adapters.is_empty() {
        return Err(device_err("no wgpu adapter with compute storage buffers found"));
    }
    if let Ok(want) = std::env::var(ADAPTER_VAR) {
        let want_lc = want.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want_lc))
            .ok_or_else(|| device_err(format!("{ADAPTER_VAR}={want}: no adapter matches (found {names:?})")));
    }
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(adapters.remove(0))
}

/// Request a device with the adapter's own limits (workgroup storage, binding sizes) and the
/// optional features it has (SHADER_F16, TIMESTAMP_QUERY).
pub(crate) fn request_device(adapter: &wgpu::Adapter) -> Result<(wgpu::Device, wgpu::Queue)> {
    let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY;
    let features = adapter.features() & wanted;
    let desc = wgpu::DeviceDescriptor {
        label: Some("headmix"),
        required_features: features,
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    pollster::block_on(adapter.request_device(&desc)).map_err(|e| device_caused("request_device", e))
}
