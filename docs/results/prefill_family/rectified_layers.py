"""Per-layer relative output error vs dense of a base block selection, unrectified and rectified
(gapr off / sparse / drop), on the Q/K/V that dense prefill of a 2K pass key (depth 0.25) produces.
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/results/prefill_family/rectified_layers.py"""
import torch
import tokensparse as ts

from dataclasses import replace
from tokensparse.bench.prefill import _Capture
from tokensparse.eval import tasks
from tokensparse.eval.harness import encode_sample
from tokensparse.engine.blocks import block_attend
from tokensparse.engine.executors import dense_attention
torch.set_num_threads(1)
model, tok = ts.load_model()
s = tasks.passkey(tok, 2048, depth=0.25)
ctx, q = encode_sample(tok, s)
ids = torch.cat([ctx, q], -1) if ctx.dim() == 2 else torch.tensor([ctx + q])
cap = _Capture()
with torch.no_grad(), ts.sparsify(model, cap):
    model(input_ids=ids, cache=ts.KVCache(model), logits_to_keep=1)
calls = [cap.calls[i] for i in sorted(cap.calls)]
R = ts.methods.get("rectified")
for base, bc in [("biformer", {"dense_tail": 0}), ("xattention", {"threshold": 0.8})]:
    ms = {g: R(base=base, base_config=bc, gapr=g) for g in ("off", "sparse", "drop")}
    tot = {k: [0.0, 0.0] for k in ["base", *ms]}
    with torch.no_grad(), ts.sparsify(model, ms["off"]) as sess:
        for call in calls:
            call = replace(call, session=sess, layer=sess.layers[call.layer_idx])
            sel = ms["off"].base_method.select(call)
            if sel is None or sel.complete:
                continue
            d = dense_attention(call.query, call.key, call.value, None, call.scale).float()
            outs = {"base": block_attend(call.query, call.key, call.value, sel, call.scale)}
            for g, m in ms.items():
                outs[g] = m.rectify(call.query, call.key, call.value, sel, call.scale)
            for k, o in outs.items():
                tot[k][0] += float((o.float() - d).norm() ** 2); tot[k][1] += float(d.norm() ** 2)
            last = {k: float((o[..., -1, :].float() - d[..., -1, :]).norm() / d[..., -1, :].norm()) for k, o in outs.items()}
            print(base, call.layer_idx, {k: round(v, 3) for k, v in last.items()})
    print(base, "relative output error over all rows and sparse layers:", {k: round((a / b) ** 0.5, 4) for k, (a, b) in tot.items()})
