"""select_topk on a CPU: the block-maxima shortlist against one float top-k over the row.

Times ``select_topk`` (what every selecting method's ``KeyPlan.top`` runs) on random scores of the
decode shapes (rows = batch x KV heads, ``k`` = 1023 of a 1024-token budget), the new path against
the previous one (``PREFILTER_MIN_LEN`` raised past the length), interleaved, 1 thread, median and
range of 7 rounds of 20 calls.

    .venv/bin/python docs/results/decode_suite/topk_shortlist.py
"""
import statistics
import time

import torch

from tokensparse.engine import selection

torch.set_num_threads(1)


def per_call_ms(fn, calls=20):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - t0) / calls


def main():
    g = torch.Generator().manual_seed(0)
    default = selection.PREFILTER_MIN_LEN
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    print("| length | rows | scores | counts | one top-k (ms) | shortlist (ms) | ratio |")
    print("|--:|--:|---|---|--:|--:|--:|")
    for length in (8192, 16384, 32768):
        for rows in (3, 12):
            for kind in ("gaussian", "softmax"):
                for per_row in (False, True):
                    x = torch.randn(rows // 3, 3, length, generator=g)
                    if kind == "softmax":
                        x = (3 * x).softmax(-1)
                    counts = torch.full((rows // 3, 1, 1), 1023) if per_row else None
                    if per_row:
                        counts[0] = 900  # rows take different counts: the padded-batch path
                    k = 1023
                    a, b = [], []
                    for _ in range(7):  # interleaved rounds
                        selection.PREFILTER_MIN_LEN = length + 1
                        a.append(per_call_ms(lambda: selection.select_topk(x, k, counts)))
                        selection.PREFILTER_MIN_LEN = default
                        b.append(per_call_ms(lambda: selection.select_topk(x, k, counts)))
                    selection.PREFILTER_MIN_LEN = length + 1
                    ref = selection.select_topk(x, k, counts)
                    selection.PREFILTER_MIN_LEN = default
                    got = selection.select_topk(x, k, counts)
                    assert torch.equal(ref[0], got[0])
                    ma, mb = statistics.median(a), statistics.median(b)
                    print(f"| {length} | {rows} | {kind} | {'per row' if per_row else '-'} | "
                          f"{ma:.3f} ({min(a):.3f}-{max(a):.3f}) | {mb:.3f} ({min(b):.3f}-{max(b):.3f}) | {ma / mb:.2f}x |")


if __name__ == "__main__":
    main()
