"""Where a decode step's time goes on a GPU: host (Python, launches) or device (kernels).

For each variant, after one prefill of a random prompt on a random-weight model shape:
- ``wall``: per-step wall time, each step between two synchronisations (what a user waits);
- ``gpu``: CUDA events recorded around the step on the stream (they measure elapsed time on the
  stream, idle gaps included, so ``gpu`` ≈ ``wall`` says nothing about launch-boundness; the
  kernels' own time is ``kernel_ms_per_step``, the sum of every op's self device time);
- ``launches``: CUDA kernel launches per step (torch.profiler), and the ten ops with the most
  host time and the ten with the most device time.

Usage (on a CUDA machine; CPU runs give wall times and the op table only):
    python docs/results/gpu/profile_decode.py --device cuda --model-config llama-3.1-8b --length 32768 \
        --json docs/results/gpu/profile_decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

import tokensparse as ts
from tokensparse.engine.executors import decode_backends
from tokensparse.bench import bench_prompt, environment, load_bench_model, resolve_device, resolve_dtype

VARIANTS = {  # label -> (method, config) or None; "stock" labels run without decode_backends()
    "dense, stock SDPA order": None,
    "dense": None,
    "token_select 2048": ("token_select", {"budget": 2048, "n_sink": 128, "n_local": 256}),
    "quest 2048": ("quest", {"budget": 2048}),
}


def _steps(model, cache, tok, n, device, stock=False):
    cuda = device.type == "cuda"
    walls, gpus = [], []
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        with contextlib.nullcontext() if stock else decode_backends():
            out = model(input_ids=tok, cache=cache, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        if cuda:
            b.record()
            torch.cuda.synchronize(device)
            gpus.append(a.elapsed_time(b) / 1e3)
        walls.append(time.perf_counter() - t0)
    return walls, gpus, tok


def _table(prof, key, n):
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "host_ms": e.cpu_time_total / 1e3,
             "device_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3} for e in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--model-config", default="llama-3.1-8b")
    p.add_argument("--layers", type=int)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    device, dtype = resolve_device(a.device), resolve_dtype(a.dtype)
    model, _, info = load_bench_model(device=device, dtype=dtype, model_config=a.model_config, layers=a.layers)
    ids = bench_prompt(model, None, a.length)
    result = {"env": environment(device, dtype), "model": info, "length": a.length, "variants": []}
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for label, spec in VARIANTS.items():
            method = ts.methods.get(spec[0])(**spec[1]) if spec else None
            ctx = ts.sparsify(model, method) if method is not None else None
            s = ctx.__enter__() if ctx else None
            try:
                cache = s.new_cache() if s else ts.KVCache(model)
                out = model(input_ids=ids, cache=cache, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                stock = "stock" in label
                _, _, tok = _steps(model, cache, tok, 2, device, stock)  # warm-up
                walls, gpus, tok = _steps(model, cache, tok, a.steps, device, stock)
                with profile(activities=acts) as prof:
                    _, _, tok = _steps(model, cache, tok, 3, device, stock)
                launches = sum(e.count for e in prof.key_averages()
                               if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
                kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
                row = {
                    "variant": label,
                    "wall_ms": statistics.median(walls) * 1e3, "wall_ms_min": min(walls) * 1e3,
                    "wall_ms_max": max(walls) * 1e3,
                    "gpu_ms": statistics.median(gpus) * 1e3 if gpus else None,
                    "launches_per_step": launches / 3,
                    "kernel_ms_per_step": kernel_us / 3 / 1e3,
                    "top_host": _table(prof, "cpu_time_total", 10),
                    "top_device": _table(prof, "device_time_total", 10) if gpus else [],
                }
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["variants"].append(row)
            gpu = f"{row['gpu_ms']:.1f}" if row["gpu_ms"] is not None else "-"
            print(f"{a.length} {label:<20} wall {row['wall_ms']:.1f} ms/token (gpu {gpu} ms), "
                  f"{row['launches_per_step']:.0f} launches/step, kernels {row['kernel_ms_per_step']:.1f} ms/step", flush=True)
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
