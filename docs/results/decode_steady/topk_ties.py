"""select_topk's CPU path on scores with ties at the k-th value (max-pooled scores, bf16-rounded
logits) against the order-key path it used for them before 2026-12-07 (a float top-k tried first,
then the int64 keys). Same sets (asserted); median ms over 30 calls, 1 thread.

    .venv/bin/python docs/results/decode_steady/topk_ties.py
"""

import statistics

import torch

from tokensparse.bench import timed
from tokensparse.engine import selection as S


def before(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The CPU path before: a float top-k when the set is unique, else the order keys."""
    length, low = scores.shape[-1], (1 << 32) - 1
    vals, ids = scores.topk(k, dim=-1, sorted=False)
    kth = vals.amin(-1, keepdim=True)
    if bool(((scores >= kth).sum(-1) == k).all()):
        return ids.sort(-1).values
    top = S._order_keys(scores).topk(k, dim=-1, sorted=False).values
    return ((length - 1) - (top & low)).sort(-1).values


def median_ms(fn, n=30):
    fn()  # warm-up
    return 1000 * statistics.median(timed(fn) for _ in range(n))


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| scores (1, 3, L) | L | k | before ms | now ms |")
    print("|---|--:|--:|--:|--:|")
    for length, k, kind in ((4096, 1023, "pool15"), (8192, 1023, "pool15"), (32768, 1023, "pool15"),
                            (8192, 255, "bf16"), (32768, 1023, "bf16")):
        x = torch.randn(1, 3, length).softmax(-1)
        s = torch.nn.functional.max_pool1d(x, 15, 1, 7) if kind == "pool15" else x.bfloat16().float()
        assert torch.equal(before(s, k), S.select_topk(s, k)[0])
        print(f"| {kind} | {length} | {k} | {median_ms(lambda: before(s, k)):.3f} | "
              f"{median_ms(lambda: S.select_topk(s, k)):.3f} |")
