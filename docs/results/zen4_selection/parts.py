"""Where a 32K decode step's selection time goes, by operation, for Landmark's default (blocks of
4: 8192 block means per KV head) and Quest's int8 bound (32768 int8 keys per KV head), SmolLM2's
shape (3 KV heads x 3 query heads, head dim 64), 1 thread.

Each operation runs on the next of 30 different inputs (as 30 layers would: a layer's 6 MB of
block means is not in the caches when its step comes), median of 200 calls after 20. The top-k
is timed twice: on a new row of scores every call (a decode step) and on the same scores every
call (what a naive micro-benchmark measures: its branches are then predicted).

    .venv/bin/python docs/results/zen4_selection/parts.py
"""
import time

import torch

from tokensparse.engine.selection import select_topk
from tokensparse.engine.shadow import int8_products, quantize_rows

torch.set_num_threads(1)


def median_ms(fn, n=200, warm=20):
    xs = []
    for i in range(n + warm):
        t0 = time.perf_counter()
        fn(i)
        xs.append(time.perf_counter() - t0)
    xs = sorted(xs[warm:])
    return 1000 * xs[len(xs) // 2]


def main():
    g = torch.Generator().manual_seed(0)
    hkv, grp, d, p, n = 3, 3, 64, 8192, 32768
    means = [torch.randn(1, hkv, p, d, generator=g) for _ in range(30)]
    q = torch.randn(1, hkv, grp, d, generator=g)
    logits = [q @ m.transpose(-1, -2) * d ** -0.5 for m in means]
    scores = [x.softmax(-1).amax(2) for x in logits]
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print("| operation (one layer, 32K context) | ms |")
    print("|---|--:|")
    rows = [
        ("Landmark: read the 6 MB of block means (`sum`, a bandwidth floor)", lambda i: means[i % 30].sum()),
        ("Landmark: query · means, fp32 batched GEMM (3 query rows per KV head), as run", lambda i: q @ means[i % 30].transpose(-1, -2)),
        ("Landmark: the same as 3 matrix-vector products (one query row per KV head; not the method)",
         lambda i: [torch.mv(means[i % 30][0, h], q[0, h, 0]) for h in range(hkv)]),
        ("Landmark: softmax over the 8192 means (9 query heads)", lambda i: logits[i % 30].softmax(-1)),
        ("Landmark: select_topk(255 of 8192 x 3), new scores every call", lambda i: select_topk(scores[i % 30], 255)),
        ("Landmark: select_topk(255 of 8192 x 3), the same scores every call", lambda i: select_topk(scores[0], 255)),
    ]
    mb = [m.bfloat16() for m in means]
    rows.append(("Landmark: query · means in bf16, head-major batched GEMM (not the method's token-major layout)",
                 lambda i: q.bfloat16() @ mb[i % 30].transpose(-1, -2)))
    keys = [quantize_rows(torch.randn(1, hkv, n, d, generator=g)) for _ in range(12)]
    q8, _ = quantize_rows(q)
    rows += [
        ("Quest int8: `int8_products` (3 `torch._int_mm` of 32768 x 64 int8 by 64 x 3) and the rescale",
         lambda i: int8_products(q, *keys[i % 12])),
        ("Quest int8: the 3 `torch._int_mm` alone",
         lambda i: [torch._int_mm(keys[i % 12][0][0, h], q8[0, h].t().contiguous()) for h in range(hkv)]),
    ]
    for label, fn in rows:
        print(f"| {label} | {median_ms(fn):.3f} |", flush=True)


if __name__ == "__main__":
    main()
