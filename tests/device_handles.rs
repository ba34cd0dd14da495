//! Device tensors of the wgpu backend (issue 11, item 4): a buffer of another device or of
//! another wgpu instance never reaches a kernel. Safe entries take `WgpuTensor` handles and
//! compare their owner's identity (works across instances, which wgpu 30 cannot tell apart);
//! raw buffers enter only through the `unsafe` `adopt_buffer`, which still refuses a buffer of
//! another device of the same instance (wgpu-core's device check in an error scope).

use headmix::backends::wgpu::{DeviceIo, WgpuBackend, WgpuTensor, wgpu};
use headmix::cache::KvCache;
use headmix::decode::DecodeIo;
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Rng, Tensor, TensorMut, Weights};
use headmix_tests::device_or_skip;

fn wgpu_or_skip(test: &str) -> Option<WgpuBackend> {
    device_or_skip(BackendKind::Wgpu, test)?;
    Some(WgpuBackend::new().expect("wgpu opened once already"))
}

/// The call every test runs: MHA, 2 heads of 32, batch 1, 4 queries and 4 keys.
const B: usize = 1;
const N: usize = 4;
const LEN: usize = B * N * 2 * 32;

fn cfg() -> (Config, Weights) {
    let cfg = Config::mha(2, 32);
    let w = Weights::random(&cfg, 5);
    (cfg, w)
}

/// Fresh random q, k, v (never zeros).
fn inputs(seed: u64) -> [Vec<f32>; 3] {
    let mut rng = Rng::new(seed);
    [rng.normal_vec(LEN, 1.0), rng.normal_vec(LEN, 1.0), rng.normal_vec(LEN, 1.0)]
}

/// The host-slice forward of the same call: output and lse, poisoned before.
fn host_forward(wb: &WgpuBackend, cfg: &Config, w: &Weights, [q, k, v]: &[Vec<f32>; 3]) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![f32::NAN; LEN];
    let mut lse = vec![f32::NAN; B * 2 * N];
    let shape = [B, N, 2, 32];
    let io = Io {
        q: Tensor::new(q, &shape),
        k: Tensor::new(k, &shape),
        v: Tensor::new(v, &shape),
        out: TensorMut::new(&mut out, &shape),
        lse: Some(&mut lse),
    };
    wb.forward(cfg, w, io).expect("host-slice forward");
    (out, lse)
}

/// The binding names `forward_buffers` reports, in `DeviceIo` order.
const BINDINGS: [&str; 5] = ["q buffer", "k buffer", "v buffer", "out buffer", "lse buffer"];

/// `forward_buffers` on five tensors in binding order (q, k, v, out, lse).
fn call(wb: &WgpuBackend, cfg: &Config, w: &Weights, t: [&WgpuTensor; 5]) -> headmix::Result<()> {
    let io = DeviceIo { q: t[0], k: t[1], v: t[2], out: t[3], lse: Some(t[4]) };
    wb.forward_buffers(cfg, w, B, N, N, DType::F32, io)
}

/// A handle of a second `WgpuBackend` (its own wgpu instance, the same lavapipe adapter) is
/// `Error::ForeignBuffer` naming the binding, in every binding of `forward_buffers`, in
/// `append_buffers` and in `download_tensor`; nothing is written. The backend's own handles (the
/// negative control) run and equal the host-slice forward bit for bit.
#[test]
fn handles_of_another_instance_are_foreign() {
    let Some(a) = wgpu_or_skip("handles_of_another_instance_are_foreign") else { return };
    let b = WgpuBackend::new().expect("a second instance");
    let (cfg, w) = cfg();
    let x = inputs(11);
    let own: Vec<WgpuTensor> = x.iter().map(|x| a.upload_tensor(x).unwrap()).collect();
    let poison = vec![f32::NAN; LEN];
    let (out, lse) = (a.upload_tensor(&poison).unwrap(), a.upload_tensor(&poison[..B * 2 * N]).unwrap());
    // The foreign handles hold the same data: only their owner differs.
    let foreign: Vec<WgpuTensor> = x.iter().chain([&poison, &poison]).map(|x| b.upload_tensor(x).unwrap()).collect();
    let foreign_lse = b.upload_tensor(&poison[..B * 2 * N]).unwrap();
    for (i, what) in BINDINGS.iter().enumerate() {
        let mut t = [&own[0], &own[1], &own[2], &out, &lse];
        t[i] = if i == 4 { &foreign_lse } else { &foreign[i] };
        let e = call(&a, &cfg, &w, t).expect_err("a handle of another instance");
        assert_eq!(e, Error::ForeignBuffer { what }, "binding {what}");
    }
    assert!(a.download_f32(&out).unwrap().iter().all(|x| x.is_nan()), "nothing written on a refusal");
    let e = a.download_f32(&foreign[0]).expect_err("download of another backend's handle");
    assert_eq!(e, Error::ForeignBuffer { what: "downloaded tensor" });

    // Negative control: the own handles run, and equal the host-slice forward.
    call(&a, &cfg, &w, [&own[0], &own[1], &own[2], &out, &lse]).expect("own handles");
    let (want_out, want_lse) = host_forward(&a, &cfg, &w, &x);
    assert_eq!(a.download_f32(&out).unwrap(), want_out, "device-tensor output equals the host-slice forward");
    assert_eq!(a.download_f32(&lse).unwrap(), want_lse, "device-tensor lse equals the host-slice forward");
    // The other backend runs its own handles too (the refusal is about ownership, not the data).
    let fl = &foreign_lse;
    call(&b, &cfg, &w, [&foreign[0], &foreign[1], &foreign[2], &foreign[3], fl]).expect("b's own handles");
    assert_eq!(b.download_f32(&foreign[3]).unwrap(), want_out, "same adapter, same result");

    // Identity is the backend's, not the device's: a fork shares it, a second `from_device` on
    // the same device does not.
    let fork = a.fork();
    call(&fork, &cfg, &w, [&own[0], &own[1], &own[2], &out, &lse]).expect("a fork accepts the handles");
    let twin = WgpuBackend::from_device(a.adapter_info().clone(), a.device().clone(), a.queue().clone());
    let e = call(&twin, &cfg, &w, [&own[0], &own[1], &own[2], &out, &lse]).expect_err("another identity");
    assert_eq!(e, Error::ForeignBuffer { what: "q buffer" });
}

/// A KV cache of another instance's backend is refused by decode and by device appends (it used
/// to be compared by `wgpu::Device` equality, i.e. by id, which repeats across instances); a
/// foreign handle appended to the own cache is `ForeignBuffer`. Negative controls: the cache
/// decodes on its own backend, own handles append.
#[test]
fn caches_and_appends_check_ownership() {
    let Some(a) = wgpu_or_skip("caches_and_appends_check_ownership") else { return };
    let b = WgpuBackend::new().expect("a second instance");
    let (cfg, w) = cfg();
    let x = inputs(12);
    let shape = [B, N, 2, 32];
    let mut theirs = KvCache::for_config_on(&b, &cfg, B, 8, DType::F32).unwrap();
    theirs.append(&Tensor::new(&x[1], &shape), &Tensor::new(&x[2], &shape)).unwrap();
    let q = &x[0][..B * 2 * 32];
    let decode_on = |be: &WgpuBackend, cache: &KvCache| {
        let mut out = vec![f32::NAN; B * 2 * 32];
        let io = DecodeIo {
            q: Tensor::new(q, &[B, 1, 2, 32]),
            cache,
            out: TensorMut::new(&mut out, &[B, 1, 2, 32]),
            lse: None,
        };
        headmix::decode(be, &cfg, &w, io).map(|()| out)
    };
    let e = decode_on(&a, &theirs).expect_err("a cache of another instance");
    assert!(matches!(&e, Error::Cache { why } if why.contains("another wgpu backend")), "{e}");
    let (k, v) = (a.upload_tensor(&x[1]).unwrap(), a.upload_tensor(&x[2]).unwrap());
    let e = a.append_buffers(&mut theirs, &k, &v, N).expect_err("append to a cache of another instance");
    assert!(matches!(&e, Error::Cache { .. }), "{e}");
    let want = decode_on(&b, &theirs).expect("the cache decodes on its own backend");
    assert!(want.iter().all(|x| x.is_finite()));

    let mut mine = KvCache::for_config_on(&a, &cfg, B, 8, DType::F32).unwrap();
    let (fk, fv) = (b.upload_tensor(&x[1]).unwrap(), b.upload_tensor(&x[2]).unwrap());
    let e = a.append_buffers(&mut mine, &fk, &v, N).expect_err("foreign k");
    assert_eq!(e, Error::ForeignBuffer { what: "appended k buffer" });
    let e = a.append_buffers(&mut mine, &k, &fv, N).expect_err("foreign v");
    assert_eq!(e, Error::ForeignBuffer { what: "appended v buffer" });
    assert_eq!(mine.lens(), vec![0], "nothing appended on a refusal");
    a.append_buffers(&mut mine, &k, &v, N).expect("own handles append");
    assert_eq!(decode_on(&a, &mine).expect("decode"), want, "same tokens, same answer");
}

/// One adapter, two devices, one wgpu instance: (adapter info, first device, second device).
fn two_devices() -> (wgpu::AdapterInfo, (wgpu::Device, wgpu::Queue), (wgpu::Device, wgpu::Queue)) {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters.retain(|a| a.limits().max_storage_buffers_per_shader_stage >= 7);
    let adapter = adapters.into_iter().next().expect("an adapter (the backend opened one)");
    let open = || {
        let desc = wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() };
        pollster::block_on(adapter.request_device(&desc)).expect("a device")
    };
    (adapter.get_info(), open(), open())
}

/// A buffer of a second device of the same adapter and wgpu instance: `adopt_buffer` refuses it
/// with `ForeignBuffer` naming it (the bind-group check in an error scope, now tested). Negative
/// control: a buffer of the backend's own device is adopted, runs, and equals the host-slice
/// forward; adopted and backend-made handles mix.
#[test]
fn buffer_of_another_device_of_the_same_instance_is_foreign() {
    if wgpu_or_skip("buffer_of_another_device_of_the_same_instance_is_foreign").is_none() {
        return;
    }
    let (info, (d1, q1), (d2, _q2)) = two_devices();
    let wb = WgpuBackend::from_device(info, d1.clone(), q1);
    let usage = WgpuBackend::TENSOR_USAGE;
    let make = |d: &wgpu::Device| {
        d.create_buffer(&wgpu::BufferDescriptor { label: None, size: 4 * LEN as u64, usage, mapped_at_creation: false })
    };
    // SAFETY: both devices belong to this test's one wgpu instance (adopt_buffer's precondition);
    // the second device's buffer is what the check refuses.
    let e = unsafe { wb.adopt_buffer("q buffer", make(&d2), DType::F32, LEN) }.expect_err("other device");
    assert_eq!(e, Error::ForeignBuffer { what: "q buffer" });
    let e = unsafe { wb.adopt_buffer("out buffer", make(&d2), DType::F32, LEN) }.expect_err("other device");
    assert_eq!(e, Error::ForeignBuffer { what: "out buffer" });

    let (cfg, w) = cfg();
    let x = inputs(13);
    let q = make(&d1);
    wb.queue().write_buffer(&q, 0, &x[0].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
    // SAFETY: `q` comes from the backend's own device.
    let q = unsafe { wb.adopt_buffer("q buffer", q, DType::F32, LEN) }.expect("own device's buffer");
    let (k, v) = (wb.upload_tensor(&x[1]).unwrap(), wb.upload_tensor(&x[2]).unwrap());
    let (out, lse) = (wb.alloc_tensor(DType::F32, LEN).unwrap(), wb.alloc_tensor(DType::F32, B * 2 * N).unwrap());
    call(&wb, &cfg, &w, [&q, &k, &v, &out, &lse]).expect("adopted and made handles");
    let (want_out, want_lse) = host_forward(&wb, &cfg, &w, &x);
    assert_eq!(wb.download_f32(&out).unwrap(), want_out);
    assert_eq!(wb.download_f32(&lse).unwrap(), want_lse);
    // Adoption checks what it can: too short, or not bindable.
    let e = unsafe { wb.adopt_buffer("q buffer", make(&d1), DType::F32, LEN + 1) }.expect_err("short");
    assert!(matches!(e, Error::Length { what: "q buffer", .. }), "{e}");
}

/// Handles are typed: another dtype or too few elements are refused before anything runs, and
/// `download_tensor` checks its destination.
#[test]
fn handles_carry_dtype_and_length() {
    let Some(wb) = wgpu_or_skip("handles_carry_dtype_and_length") else { return };
    let (cfg, w) = cfg();
    let x = inputs(14);
    let (q, k, v) =
        (wb.upload_tensor(&x[0]).unwrap(), wb.upload_tensor(&x[1]).unwrap(), wb.upload_tensor(&x[2]).unwrap());
    let (out, lse) = (wb.alloc_tensor(DType::F32, LEN).unwrap(), wb.alloc_tensor(DType::F32, B * 2 * N).unwrap());
    let half = wb.alloc_tensor(DType::F16, B * 2 * N).unwrap();
    let e = call(&wb, &cfg, &w, [&q, &k, &v, &out, &half]).expect_err("f16 lse");
    assert_eq!(e, Error::DType { what: "lse buffer", expected: DType::F32, got: DType::F16 });
    let short = wb.alloc_tensor(DType::F32, LEN - 1).unwrap();
    let e = call(&wb, &cfg, &w, [&q, &short, &v, &out, &lse]).expect_err("short k");
    assert_eq!(e, Error::Length { what: "k buffer", expected: LEN, got: LEN - 1 });
    assert_eq!((q.dtype(), q.len(), q.bytes()), (DType::F32, LEN, 4 * LEN as u64));
    let mut dst = vec![half::f16::ZERO; LEN];
    let e = wb.download_tensor(&q, (&mut dst).into()).expect_err("f16 destination of an f32 tensor");
    assert_eq!(e, Error::DType { what: "downloaded tensor", expected: DType::F16, got: DType::F32 });
    // Round trips in every dtype, odd lengths included (f16/bf16 pad to whole words).
    let h: Vec<half::bf16> = x[0][..7].iter().map(|&f| half::bf16::from_f32(f)).collect();
    let t = wb.upload_tensor(&h).unwrap();
    let mut back = vec![half::bf16::NAN; 7];
    wb.download_tensor(&t, (&mut back).into()).unwrap();
    assert_eq!(back, h);
    let z = wb.alloc_tensor(DType::F16, 3).unwrap();
    assert_eq!(wb.download_f32(&z).unwrap(), vec![0.0; 3]);
}
