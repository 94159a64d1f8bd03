"""Speed benchmarks on the bundled model: prefill, decode and attention-only; and an
attention-only microbenchmark of the executors on random tensors (:mod:`.executors`, no model).

Every ratio is against dense attention measured in the same process, on the same prompt, with the
same thread count; runs of the variants are interleaved and medians reported with their spread
(min–max). Results carry the environment (versions, threads, load average, dtype). Speed is never
asserted in tests; these numbers back the claims in ``docs/results/``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["main", "timed", "spread"]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def save_json(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(args) -> int:
    executors = args.what == "executors"
    default_lengths = "2048,4096,8192" if executors else "8192"
    text = default_lengths if args.lengths is None else args.lengths
    try:
        lengths = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 64:
        raise SystemExit(f"--lengths must be comma-separated lengths >= 64, got {text!r}")
    repeats = args.repeats if args.repeats is not None else (5 if executors else 3)
    if repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {repeats}")
    if args.what == "decode" and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1 (decode steps timed per run), got {args.steps}")
    if executors:
        return _main_executors(args, lengths, repeats)
    kw = {}
    if getattr(args, "methods", None):
        if args.what not in ("prefill", "attention"):
            raise SystemExit("--methods applies to bench prefill and bench attention")
        from .prefill import CONFIGS

        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = sorted({name for _, name, _ in CONFIGS})
        unknown = [m for m in wanted if m not in known]
        if unknown or not wanted:
            raise SystemExit(f"--methods: {', '.join(unknown) or 'none given'}; benchmarked methods: {', '.join(known)}")
        kw["configs"] = [c for c in CONFIGS if c[1] in wanted]
    if getattr(args, "variants", None):
        if args.what != "decode":
            raise SystemExit("--variants applies to bench decode")
        from .decode import load_variants

        try:
            kw["variants"] = load_variants(args.variants)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"--variants: {e}") from None
        kw["dynamic"] = not getattr(args, "no_dynamic", False)
    if args.what == "prefill":
        from .prefill import run
    elif args.what == "decode":
        from .decode import run
    else:
        from .prefill import run_attention_only as run
    result = run(lengths=lengths, repeats=repeats, steps=args.steps, **kw)
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0


def _main_executors(args, lengths: list[int], repeats: int) -> int:
    from .executors import DEFAULT_DENSITIES, format_table, run, validate

    text = getattr(args, "densities", None)
    try:
        densities = list(DEFAULT_DENSITIES) if text is None else [float(x) for x in text.split(",") if x.strip()]
        validate(lengths, densities, repeats)
    except ValueError:
        raise SystemExit(f"--densities must be comma-separated numbers in (0, 1], got {text!r}") from None
    device = getattr(args, "device", None) or "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device must be a torch device such as cpu or cuda, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build sees no CUDA device")
    result = run(lengths=lengths, densities=densities, repeats=repeats, device=device, progress=True)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0
