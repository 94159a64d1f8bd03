"""Compile time of the FlexAttention block executor, and what a second prompt length costs.

``.venv/bin/python docs/results/prefill_family/flex_compile.py`` times, in one fresh process,
``block_attend(..., impl="flex")`` on SmolLM2's attention shape (9 query heads, 3 KV heads, head
size 64, fp32) with a BiFormer-like selection (each query block of 64 reads its own block, the
first one and 1/8 of the others at random), for a sequence of prompt lengths: the first call
compiles; a length in the same ``FLEX_BUCKET`` (512 tokens) reuses the compiled kernel; a length
in another bucket compiles again (``torch.compile(dynamic=False)``: one kernel per bucket). Each
length is called twice, so the second number is the compiled kernel's run time. Prints one line
per call; 1 thread.
"""

from __future__ import annotations

import time

import torch

from tokensparse.engine.blocks import FLEX_BUCKET, block_attend, blocks_from_sets, flex_available


def selection(length: int, bs: int = 64, share: float = 0.125, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nb = -(-length // bs)
    sets = torch.rand(1, 3, nb, nb, generator=g) < share
    i = torch.arange(nb)
    sets &= i[None, :] <= i[:, None]
    sets[:, :, i, i] = True
    sets[:, :, :, 0] = True
    return blocks_from_sets(sets, bs, bs)


def main() -> None:
    torch.set_num_threads(1)
    if not flex_available("cpu"):
        raise SystemExit("no C++ compiler: compiled FlexAttention is not available here")
    print(f"FLEX_BUCKET = {FLEX_BUCKET}; torch {torch.__version__}")
    for length in (8000, 8100, 8192, 7000, 8000):
        g = torch.Generator().manual_seed(length)
        q = torch.randn(1, 9, length, 64, generator=g)
        k = torch.randn(1, 3, length, 64, generator=g)
        v = torch.randn(1, 3, length, 64, generator=g)
        sel = selection(length)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            block_attend(q, k, v, sel, 0.125, impl="flex")
            times.append(time.perf_counter() - t)
        bucket = -(-length // FLEX_BUCKET) * FLEX_BUCKET
        print(f"length {length:>5} (bucket {bucket}): first call {times[0]:7.2f} s, second {times[1]:6.3f} s", flush=True)


if __name__ == "__main__":
    main()
