"""KV memory of the per-head / per-layer budget methods on SmolLM2: bytes held (rows with a token),
bytes allocated (the cache's buffers) and the per-call padded view, on the ragged cache the methods
get from ``session.new_cache()`` and, for comparison, on the padded ``EvictingLayer`` cache (every KV
head as wide as the widest). One v2-suite sample per length (needle_number, seed 0), question
inside, prefill then 8 generated tokens.

    .venv/bin/python docs/results/adakv/memory.py > docs/results/adakv/memory.txt
"""

import json
import sys

import torch

import tokensparse as ts
from tokensparse.eval import tasks
from tokensparse.eval.harness import encode_sample, prefill

torch.set_num_threads(2)
model, tok = ts.load_model()
rows = []
for length in (2048, 4096):
    sample = tasks.make_samples("needle_number", tok, length, seed=0)[0]
    ctx, q = encode_sample(tok, sample)
    for name, budget in (("snapkv", 0.25), ("pyramid_kv", 0.25), ("ada_kv", 0.25), ("snapkv", 0.5), ("pyramid_kv", 0.5), ("ada_kv", 0.5)):
        method = ts.methods.get(name)(budget=budget)
        for layout in ("ragged", "padded"):
            kv = ts.KVCache(model, evicting=True, ragged=(layout == "ragged"))
            with torch.no_grad(), ts.sparsify(model, method):
                t = prefill(model, ctx, q, kv, "inside").logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(7):
                    t = model(input_ids=t, cache=kv, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            held, alloc = kv.bytes_held(), kv.bytes_allocated()
            row = {"length": int(ctx.shape[1] + q.shape[1]), "method": name, "budget": budget, "layout": layout,
                   "held_MB": round(held / 2**20, 2), "allocated_MB": round(alloc / 2**20, 2),
                   "allocated_over_held": round(alloc / held, 3), "transient_MB": round(kv.bytes_transient() / 2**20, 2)}
            rows.append(row)
            print(f"{row['length']:>5} {name:<11} {budget:<5} {layout:<7} held {row['held_MB']:8.2f} MB  allocated "
                  f"{row['allocated_MB']:8.2f} MB  (x{row['allocated_over_held']:.3f})  per-call view {row['transient_MB']:.2f} MB",
                  flush=True)
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "docs/results/adakv/memory.json", "w"), indent=1)
