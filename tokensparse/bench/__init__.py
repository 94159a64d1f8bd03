"""Speed benchmarks on the bundled model: prefill, decode and attention-only.

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
    lengths = [int(x) for x in str(args.lengths).split(",") if x]
    if not lengths or min(lengths) < 64:
        raise SystemExit(f"--lengths must be comma-separated lengths >= 64, got {args.lengths!r}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.what == "prefill":
        from .prefill import run
    elif args.what == "decode":
        from .decode import run
    else:
        from .prefill import run_attention_only as run
    result = run(lengths=lengths, repeats=args.repeats, steps=args.steps)
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0
