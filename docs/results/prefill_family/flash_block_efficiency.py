"""How efficiently the CPU flash kernel runs the block executor's calls against the dense causal
kernel (issue 12: why attention-only speed-ups stay below the kept share's ideal).

The sdpa block executor (`engine/blocks.py`, `_sdpa`) folds the 3 query heads of a KV head into
one 192-row query block and attends it to its gathered key blocks (the own block last, under an
additive causal mask). This times those calls (16 query blocks, 3 KV heads, widths 4/12/32 blocks
of 64) with and without the mask, and the dense causal kernel on one 8K layer (9 heads), 1 thread,
best of 5; GFLOP/s counts 4·D flops per (query, key) pair attended (QKᵀ and PV), the causal half
for dense.

    .venv/bin/python docs/results/prefill_family/flash_block_efficiency.py
"""

import torch

from tokensparse.bench import timed

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def best_ms(fn, n=5):
    fn()  # warm-up
    return 1000 * min(timed(fn) for _ in range(n))


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bs, d, h, g, m = 64, 64, 3, 3, 16
    local = torch.arange(g * bs) % bs
    causal = torch.zeros(g * bs, bs).masked_fill_(torch.arange(bs)[None, :] > local[:, None], float("-inf"))
    print("| call | ms | GFLOP/s |")
    print("|---|--:|--:|")
    for w in (4, 12, 32):
        q = torch.randn(m, h, g * bs, d)
        k, v = torch.randn(m, h, (w + 1) * bs, d), torch.randn(m, h, (w + 1) * bs, d)
        mask = torch.cat([causal.new_zeros(g * bs, w * bs), causal], -1)[None, None]
        flops = m * h * g * bs * (w + 1) * bs * d * 4
        for name, kw in (("masked", {"attn_mask": mask}), ("no mask", {})):
            ms = best_ms(lambda: FLASH(q, k, v, 0.0, False, scale=0.125, **kw))
            print(f"| {m} query blocks × {w + 1} key blocks, {name} | {ms:.2f} | {flops / ms / 1e6:.1f} |")
    n = 8192
    q, k, v = (torch.randn(1, 9, n, d) for _ in range(3))
    ms = best_ms(lambda: FLASH(q, k, v, 0.0, True, scale=0.125), 2)
    print(f"| dense causal, 9 heads × {n} | {ms:.1f} | {9 * n * n / 2 * d * 4 / ms / 1e6:.1f} |")
