"""Real-model check of the sdpa block executor after the 2026-12-08 changes: DHSA defaults on SmolLM2 over a
4002-token prompt (its last query block partial: 34 rows), last 8 positions' logits against the reference
(dense masked) executor and against dense attention.

    .venv/bin/python docs/results/sdpa_executor/real_check.py
"""
import torch, tokensparse as ts
from tokensparse.bench import bench_prompt, load_bench_model
torch.set_num_threads(2)
model, tok, info = load_bench_model()
ids = bench_prompt(model, tok, 4000, seed=0)  # not a multiple of 64: a partial last query block
print("tokens", ids.shape[1], "last block rows", ids.shape[1] % 64)
outs = {}
for impl in ("sdpa", "reference"):
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("dhsa")(impl=impl)) as s:
        outs[impl] = model(input_ids=ids, logits_to_keep=8).logits
with torch.no_grad():
    dense = model(input_ids=ids, logits_to_keep=8).logits
d = (outs["sdpa"] - outs["reference"]).abs().max().item()
print("max |sdpa - reference| logits:", d, " |dhsa - dense|:", (outs["sdpa"] - dense).abs().max().item())
print("argmax equal:", torch.equal(outs["sdpa"].argmax(-1), outs["reference"].argmax(-1)))
