"""FASA's group combination per layer: softmax against z-score (head_scale), 1 thread.

Times ``FASA._group_weights`` on partial logits of SmolLM2's decode shape (1 sequence, 3 KV heads
x 3 query heads) at 8K and 32K keys, the two scales interleaved, median and range of 9 rounds of
50 calls.

    .venv/bin/python docs/results/decode_suite/fasa_head_scale_cost.py
"""
import statistics

import torch
from topk_shortlist import per_call_ms  # the sibling script's timer (its import sets 1 thread too)

import tokensparse as ts

torch.set_num_threads(1)


def main():
    g = torch.Generator().manual_seed(0)
    fasa = ts.methods.get("fasa")
    soft, z = fasa(head_scale="softmax"), fasa(head_scale="zscore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    print("| keys | softmax (ms) | zscore (ms) | zscore / softmax |")
    print("|--:|--:|--:|--:|")
    for n in (8192, 32768):
        logits = torch.randn(1, 3, 3, n, generator=g) * 2
        a, b = [], []
        for _ in range(9):
            a.append(per_call_ms(lambda: soft._group_weights(logits, None), 50))
            b.append(per_call_ms(lambda: z._group_weights(logits, None), 50))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {n} | {ma:.3f} ({min(a):.3f}-{max(a):.3f}) | {mb:.3f} ({min(b):.3f}-{max(b):.3f}) | {mb / ma:.2f} |")


if __name__ == "__main__":
    main()
