#!/usr/bin/env python3
"""Time the configurations of `headmix bench` the way people run them today, in PyTorch.

Peers, per configuration (all causal prefill, M = N, inputs token-major [B, N, heads, d]):
  mha             F.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION) and (FLASH_ATTENTION)
  gqa             the same with enable_gqa=True (no repeat_kv copy)
  mea, mea-compressed
                  einsum K/V mixing of the Hk stored heads into H heads, SDPA, F.group_norm(H groups)
  iha             einsum mixing of q, k, v into P pseudo-heads, reshape to N*P virtual tokens, SDPA
                  (cuDNN, flash), reshape back, einsum collapse by r
  iha-local       the same pipeline with FlexAttention (torch.compile) and a sliding-window block mask
                  of W*P virtual tokens (left W*P - 1, the query's own included), W = N / (2 P^2)

The cases are headmix's own plan (`headmix bench --list --sweep S --backend cuda --json plan.json`;
without --plan the script asks headmix for it), with headmix's FLOP and byte counts: both sides
time and count the same work, and a new configuration in the bench reaches the peers unchanged.

Timing: CUDA events around each call, after warm-up, cycling through several input sets so that
caches do not flatter small problems; FLOPs are headmix's count, 4*B*H*d * visible (query, key)
pairs of virtual tokens; peak extra memory is torch.cuda.max_memory_allocated beyond inputs and
output. Writes the JSON schema of `headmix bench --json` (headmix-bench/1, bench/README.md), so
`headmix bench --peers peers.json` prints both side by side.

    python3 bench/peers/peers.py --sweep full --json peers.json         # on the GPU machine
    python3 bench/peers/peers.py --device cpu --json /tmp/p.json        # tiny CPU smoke test
    python3 bench/peers/peers.py --check                                # every pipeline == the spec (f64, CPU)
    python3 bench/peers/peers.py --dry-run                              # the plan, no torch needed
    python3 bench/peers/peers.py --plan plan.json --json peers.json     # a plan written elsewhere

Written for PyTorch 2.11 (sdpa_kernel, enable_gqa, FlexAttention, F.group_norm).
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

SCHEMA = "headmix-bench/1"
SOURCE = "bench/peers/peers.py"
# Measured H100 SXM ceilings, used only as denominators (bench/src/count.rs has the same).
H100 = {"device": "H100 SXM", "dense_bf16_tflops": 790.0, "copy_tb_s": 3.0}


# ---------------------------------------------------------------------------------------------
# The plan: the cases of a sweep as `headmix bench --list --json` writes them (sizes, mask,
# FLOPs and bytes), so the peers time and count exactly the work headmix does.
# ---------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_plan(args, gpu):
    """The forward cases of the plan: read from --plan, or asked of `headmix bench --list`
    (the binary in $HEADMIX_BIN, else built and run by cargo)."""
    path = args.plan
    if not path:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="headmix-peers-"), "plan.json")
        headmix = os.environ.get("HEADMIX_BIN", "").split() or ["cargo", "run", "--release", "-q", "--bin", "headmix", "--"]
        backend = "cuda" if gpu else "cpu"
        cmd = headmix + ["bench", "--list", "--sweep", args.sweep, "--backend", backend, "--json", path]
        subprocess.run(cmd, cwd=REPO, check=True)
    with open(path) as f:
        plan = json.load(f)
    return [c for c in plan if c["mode"] == "forward" and (not args.filter or args.filter in c["label"])]


def known_peak(device):
    d = device.upper()
    return H100 if ("H100" in d and "PCIE" not in d) else None


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return (out.stdout.strip() or "unknown") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# The PyTorch pipelines.
# ---------------------------------------------------------------------------------------------


def weights(torch, c, dev, dtype):
    """Random weights of a trained layer, as headmix's Weights::random shapes them: aq [Hq, H, P],
    ak, av [Hk, H, P], r [H, H*P] (IHA), gamma, beta [H, d] (MEA's GroupNorm); N(0, 1/fan_in) entries."""
    h, hk, p, d = c["heads"], c["kv_heads"], c["pseudo"], c["head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(42)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    method = c["config"]
    if method in ("mha", "gqa"):
        return {}
    if method in ("mea", "mea-compressed"):
        ak = randn(hk, h, 1, scale=1 / math.sqrt(hk))
        av = randn(hk, h, 1, scale=1 / math.sqrt(hk))
        return {"ak": ak, "av": av, "gamma": 1 + randn(h, d, scale=0.1), "beta": randn(h, d, scale=0.1)}
    return {
        "aq": randn(h, h, p, scale=1 / math.sqrt(h)),
        "ak": randn(hk, h, p, scale=1 / math.sqrt(hk)),
        "av": randn(hk, h, p, scale=1 / math.sqrt(hk)),
        "r": randn(h, h * p, scale=1 / math.sqrt(h * p)),
    }


def torch_pipelines(torch, c, dev, w):
    """(implementation name, fn(q, k, v) -> out) for a case with weights `w`."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, p, d = c["heads"], c["pseudo"], c["head_dim"]
    if dev.type == "cuda":
        sdpa_backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    else:
        sdpa_backends = [("math", SDPBackend.MATH)]

    def sdpa(backend):
        def run(q, k, v, **kw):  # q, k, v: [B, heads, L, d]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)

        return run

    out = []
    method = c["config"]
    if method in ("mha", "gqa"):
        gqa = {"enable_gqa": True} if method == "gqa" else {}
        for name, backend in sdpa_backends:
            attend = sdpa(backend)

            def fn(q, k, v, attend=attend):
                o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **gqa)
                return o.transpose(1, 2)

            suffix = " (enable_gqa)" if gqa else ""
            out.append((f"torch sdpa {name}{suffix}", fn))
    elif method in ("mea", "mea-compressed"):
        ak, av, gamma, beta = w["ak"][:, :, 0], w["av"][:, :, 0], w["gamma"], w["beta"]
        for name, backend in sdpa_backends:
            attend = sdpa(backend)

            def fn(q, k, v, attend=attend):
                kt = torch.einsum("bmcd,ch->bmhd", k, ak)  # mix the Hk stored heads into H heads
                vt = torch.einsum("bmcd,ch->bmhd", v, av)
                o = attend(q.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)).transpose(1, 2)
                # MEA's head-level GroupNorm: GroupNorm(H, H*d) over the concatenated heads.
                bn = o.shape[0] * o.shape[1]
                y = F.group_norm(o.reshape(bn, h * d), h, gamma.reshape(-1), beta.reshape(-1), eps=1e-5)
                return y.reshape(o.shape)

            out.append((f"torch einsum + sdpa {name} + group_norm (unfused)", fn))
    else:
        aq, ak, av = w["aq"], w["ak"], w["av"]
        r = w["r"].reshape(h, h, p)  # r[g, h'*P + p] as [g, h', p]

        def mix(x, a):  # [B, S, src, d] -> [B, S, P, H, d] = [B, S*P, H, d] -> [B, H, S*P, d]
            b, s = x.shape[0], x.shape[1]
            return torch.einsum("bsmd,mhp->bsphd", x, a).reshape(b, s * p, h, d).transpose(1, 2)

        def collapse(o, b, n):  # [B, H, N*P, d] -> [B, N, P, H, d] -> [B, N, H, d]
            o = o.transpose(1, 2).reshape(b, n, p, h, d)
            return torch.einsum("bnphd,ghp->bngd", o, r)

        if method == "iha":
            for name, backend in sdpa_backends:
                attend = sdpa(backend)

                def fn(q, k, v, attend=attend):
                    return collapse(attend(mix(q, aq), mix(k, ak), mix(v, av)), q.shape[0], q.shape[1])

                out.append((f"torch einsum + sdpa {name} over N*P (unfused)", fn))
        else:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            left = c["window"][0]

            def sliding_window(b, hh, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)

            length = c["n"] * p
            # On the GPU both are compiled: eager create_block_mask would materialise the whole
            # (N*P)^2 mask (17 G entries at N*P = 128k), eager flex_attention the whole score matrix.
            on_gpu = dev.type == "cuda"
            make_mask = torch.compile(create_block_mask) if on_gpu else create_block_mask
            block_mask = make_mask(sliding_window, None, None, length, length, device=dev)
            flex = torch.compile(flex_attention, dynamic=False) if on_gpu else flex_attention

            def fn(q, k, v):
                o = flex(mix(q, aq), mix(k, ak), mix(v, av), block_mask=block_mask)
                return collapse(o, q.shape[0], q.shape[1])

            compiled = "compiled " if dev.type == "cuda" else ""
            out.append((f"torch einsum + {compiled}flex_attention window (unfused)", fn))
    return out


def reference(torch, c, q, k, v, w):
    """The spec written out (docs/operator.md, steps 1-8) with an explicit mask: the check
    that the peers compute headmix's function."""
    b, n, _, d = q.shape
    m, hk = k.shape[1], k.shape[2]
    h, p = c["heads"], c["pseudo"]
    eye = torch.eye(h, dtype=q.dtype).reshape(h, h, 1).expand(h, h, p)
    group = torch.zeros(hk, h, p, dtype=q.dtype)
    for hh in range(h):
        group[hh // (h // hk), hh, :] = 1  # GQA replication (the identity when Hk = H)
    aq, ak, av = w.get("aq", eye), w.get("ak", group), w.get("av", group)
    # 1-2. Mix and interleave: virtual token i = n*P + p.
    qt = torch.einsum("bnmd,mhp->bhnpd", q, aq).reshape(b, h, n * p, d)
    kt = torch.einsum("bnmd,mhp->bhnpd", k, ak).reshape(b, h, m * p, d)
    vt = torch.einsum("bnmd,mhp->bhnpd", v, av).reshape(b, h, m * p, d)
    # 4. Mask on virtual indices, bottom-right aligned.
    i = torch.arange(n * p).reshape(-1, 1) + (m - n) * p
    j = torch.arange(m * p).reshape(1, -1)
    visible = j <= i
    if c["window"] is not None:
        visible &= (i - c["window"][0] <= j) & (j <= i + c["window"][1])
    # 5. Attention.
    s = torch.einsum("bhid,bhjd->bhij", qt, kt) / math.sqrt(d)
    o = torch.einsum("bhij,bhjd->bhid", torch.softmax(s.masked_fill(~visible, -math.inf), -1), vt)
    # 6-7. De-interleave, collapse.
    o = o.reshape(b, h, n, p, d).permute(0, 2, 1, 3, 4)  # [B, N, H, P, d]
    if "r" in w:
        out = torch.einsum("gc,bncd->bngd", w["r"], o.reshape(b, n, h * p, d))
    else:
        out = o.reshape(b, n, h, d)  # P = 1
    # 8. Head norm.
    if "gamma" in w:  # MEA's GroupNorm, one group per head: centred, biased variance, bias
        mu = out.mean(-1, keepdim=True)
        var = (out - mu).pow(2).mean(-1, keepdim=True)
        out = w["gamma"] * (out - mu) / torch.sqrt(var + 1e-5) + w["beta"]
    return out


def check(torch, plan):
    """Every peer pipeline against `reference` in f64 on the CPU, for the first case of each
    configuration and P in the plan (the CPU quick sweep: N = 64); returns the failures."""
    dev = torch.device("cpu")
    failures, seen = [], set()
    for c in plan:
        if (c["config"], c["pseudo"]) in seen:
            continue
        seen.add((c["config"], c["pseudo"]))
        w = weights(torch, c, dev, torch.float64)
        gen = torch.Generator().manual_seed(7)
        b, n, d = c["batch"], c["n"], c["head_dim"]
        q, k, v = (torch.randn(b, n, hh, d, generator=gen, dtype=torch.float64) for hh in (c["q_heads"], c["kv_heads"], c["kv_heads"]))
        want = reference(torch, c, q, k, v, w)
        for name, fn in torch_pipelines(torch, c, dev, w):
            err = (fn(q, k, v) - want).abs().max().item()
            print(f"check {c['label']} · {name}: max |error| {err:.2e}", file=sys.stderr)
            if not err < 1e-10:
                failures.append(f"{c['label']} · {name}: {err}")
    return failures


def configure_compile(torch):
    """FlexAttention is compiled once per shape. Lift dynamo's recompile limits (8 by default), so
    that the sweep's many shapes never fall back to the slow eager path, and fail loudly if one would."""
    import torch._dynamo

    cfg = torch._dynamo.config
    settings = [
        ("recompile_limit", 1024),
        ("cache_size_limit", 1024),
        ("accumulated_recompile_limit", 8192),
        ("accumulated_cache_size_limit", 8192),
        ("fail_on_recompile_limit_hit", True),
    ]
    for name, value in settings:
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def time_calls(torch, dev, fn, input_sets, reps, warmup):
    """Seconds per call (CUDA events on a GPU, else the wall clock), input sets cycled."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    if dev.type != "cuda":
        seconds = []
        for i in range(reps):
            t = time.perf_counter()
            fn(*input_sets[i % len(input_sets)])
            seconds.append(time.perf_counter() - t)
        return seconds, "wall clock"
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        args = input_sets[i % len(input_sets)]
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events], "cuda events"


def extra_memory(torch, dev, fn, args):
    """Peak device memory of one call beyond its inputs (already allocated) and its output."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = fn(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - o.numel() * o.element_size()
    del o
    return max(int(extra), 0)


def row(c, implementation, device, driver, clock, seconds, extra):
    med = statistics.median(seconds)
    fl, by = c["flops"], c["bytes"]
    tflops, gb_s = fl / med / 1e12, by / med / 1e9
    peak = known_peak(device)
    keys = ["config", "dtype", "batch", "n", "m", "heads", "q_heads", "kv_heads", "pseudo", "head_dim", "causal"]
    r = {k: c[k] for k in keys}
    r.update(
        implementation=implementation,
        backend="torch",
        device=device,
        driver=driver,
        window=c["window"],
        flops=fl,
        bytes=by,
        clock=clock,
        seconds=seconds,
        median_s=med,
        tflops=tflops,
        gb_s=gb_s,
        pct_peak_flops=100 * tflops / peak["dense_bf16_tflops"] if peak else None,
        pct_peak_bw=100 * gb_s / (peak["copy_tb_s"] * 1000) if peak else None,
        extra_bytes=extra,
        unfused=None,
        speedup_vs_unfused=None,
    )
    return r


def run(args):
    import torch

    dev = torch.device(args.device)
    configure_compile(torch)
    if dev.type == "cuda":
        device = torch.cuda.get_device_name(dev)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        driver = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}"
    else:
        device = f"host CPU ({torch.get_num_threads()} threads)"
        driver = f"torch {torch.__version__}"
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    report = {
        "schema": SCHEMA,
        "source": SOURCE,
        "sweep": args.sweep,
        "git_commit": git_commit(),
        "date_utc": utc_now(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "ceilings": [H100],
        "backends": [{"backend": "torch", "device": device, "driver": driver, "describe": [["torch", torch.__version__]]}],
        "skipped": [],
        "results": [],
        "errors": [],
    }
    plan = load_plan(args, dev.type == "cuda")
    reps = args.reps or (20 if dev.type == "cuda" else 5)
    start = time.time()
    for i, c in enumerate(plan):
        dtype = torch_dtype[c["dtype"]]
        b, n, m, d = c["batch"], c["n"], c["m"], c["head_dim"]
        # Enough input sets to cover 128 MiB (more than an H100's L2), 2 to 8 of them.
        set_bytes = c["bytes"]
        n_sets = min(max(math.ceil((128 << 20) / set_bytes), 2), 8)
        gen = torch.Generator(device="cpu").manual_seed(1000 + i)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

        input_sets = [
            (randn(b, n, c["q_heads"], d), randn(b, m, c["kv_heads"], d), randn(b, m, c["kv_heads"], d))
            for _ in range(n_sets)
        ]
        try:
            pipelines = torch_pipelines(torch, c, dev, weights(torch, c, dev, dtype))
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
            pipelines = []
            report["errors"].append({"backend": "torch", "case": c["label"], "why": f"{type(e).__name__}: {e}"})
        for name, fn in pipelines:
            tag = f"[{i + 1}/{len(plan)}] {c['label']} · {name}"
            try:
                with torch.inference_mode():
                    seconds, clock = time_calls(torch, dev, fn, input_sets, reps, args.warmup)
                    extra = extra_memory(torch, dev, fn, input_sets[0])
                r = row(c, name, device, driver, clock, seconds, extra)
                report["results"].append(r)
                print(f"{tag}: {r['median_s'] * 1e3:.3f} ms, {r['tflops']:.3g} TFLOP/s", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - e.g. a kernel that does not support the shape
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                report["errors"].append({"backend": "torch", "case": f"{c['label']} · {name}", "why": why})
                print(f"{tag}: failed: {why}", file=sys.stderr)
        del input_sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"measured {len(plan)} cases in {time.time() - start:.1f} s", file=sys.stderr)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", choices=["quick", "full"], default="quick", help="the sweep whose plan to run (without --plan)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny sizes: a smoke test)")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per case (default 20 on a GPU, 5 on the CPU)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (compiles FlexAttention)")
    ap.add_argument("--filter", default="", help="only cases whose label contains this text")
    ap.add_argument("--json", default="", help="write the report here (default: stdout)")
    ap.add_argument("--plan", default="", help="the plan of `headmix bench --list --json PATH` (default: ask headmix)")
    ap.add_argument("--dry-run", action="store_true", help="print the forward cases of the plan as JSON; no torch")
    ap.add_argument("--check", action="store_true", help="check every pipeline against the spec (f64, CPU) and exit")
    args = ap.parse_args(argv)
    if args.check:
        import torch

        args.sweep, args.filter = "quick", "N=64 "
        failures = check(torch, load_plan(args, gpu=False))
        if failures:
            sys.exit("peers differ from the spec:\n  " + "\n  ".join(failures))
        print("every peer pipeline equals the spec's reference", file=sys.stderr)
        return
    if args.dry_run:
        text = json.dumps(load_plan(args, not args.device.startswith("cpu")), indent=1)
    else:
        text = json.dumps(run(args), indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
