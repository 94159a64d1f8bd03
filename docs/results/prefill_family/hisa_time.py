"""One-layer timing of HISA configurations against dense SDPA at 4K (random q/k/v, SmolLM2-135M head shapes, 1 thread):
``OMP_NUM_THREADS=1 .venv/bin/python docs/results/prefill_family/hisa_time.py`` (docs/results/prefill_family/hisa.md)."""
import time, torch
import tokensparse as ts
from tokensparse.engine.blocks import block_attend, blocks_from_sets
import torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)
L = 4096
q, k, v = torch.randn(1, 9, L, 64), torch.randn(1, 3, L, 64), torch.randn(1, 3, L, 64)
scale = 64 ** -0.5
def t(f, n=2):
    f(); t0 = time.perf_counter()
    for _ in range(n): r = f()
    return (time.perf_counter() - t0) / n
print("dense sdpa", round(t(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), 3))
M = ts.methods.get("hisa")
for kw in [dict(), dict(refine="mean"), dict(fine=16), dict(fine=64, impl="auto"), dict(candidates=512, budget=128)]:
    m = M(**kw)
    sets, comp = m.choose(q, k)
    sel = blocks_from_sets(sets, m.block, m.fine)
    ts_ = t(lambda: m.choose(q, k))
    ta = t(lambda: block_attend(q, k, v, sel, scale, impl=m.impl))
    print(kw, "choose", round(ts_, 3), "attend", round(ta, 3), "kept/query-block", float(sets.sum(-1).float().mean()) * m.fine)
