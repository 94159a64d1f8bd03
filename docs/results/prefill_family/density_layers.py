"""Kept share per layer of each prefill-family configuration on the 8K bench prompt (no timing).

``.venv/bin/python docs/results/prefill_family/density_layers.py [--length 8192] [--variants FILE]``
captures the bundled model's Q/K/V of every layer on the benchmark prompt (the needle at depth
0.5, as ``tokensparse bench attention``), runs each configuration's ``select`` on each layer and
prints a Markdown table: per layer, the share of keys a query reads (``Selection.kept() / keys``:
listed key blocks × block size over all keys, so dense causal attention is ≈ 0.50; "D" = the
layer runs dense). Writes ``density_layers.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch

import tokensparse as ts
from tokensparse.bench import bench_prompt
from tokensparse.bench.decode import load_variants
from tokensparse.bench.prefill import _Capture, _setup

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--variants", default=os.path.join(HERE, "variants_attention_8k.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, _ = _setup(None, None, "cpu", torch.float32, None, None, 0, a.length)
    ids = bench_prompt(model, tok, a.length)
    cap = _Capture()
    with ts.sparsify(model, cap):
        model(input_ids=ids, cache=ts.KVCache(model), logits_to_keep=1)
    calls = [cap.calls[i] for i in sorted(cap.calls)]
    out = {"length": int(ids.shape[1]), "layers": len(calls), "variants": []}
    for label, name, kw in load_variants(a.variants):
        method = ts.methods.get(name)(**kw)
        per = []
        with ts.sparsify(model, method) as session:
            for call in calls:
                call = replace(call, session=session, layer=session.layers[call.layer_idx])
                sel = method.select(call)
                per.append(None if sel is None or sel.complete else round(sel.kept() / call.k_len, 4))
        out["variants"].append({"label": label, "config": method.config_dict(), "kept_share_per_layer": per})
        print(f"{label}: " + " ".join("D" if x is None else f"{x:.2f}" for x in per), flush=True)
    json.dump(out, open(os.path.join(HERE, "density_layers.json"), "w"), indent=1)
    print("| configuration | " + " | ".join(str(i) for i in range(len(calls))) + " |")
    print("|---|" + "--:|" * len(calls))
    for v in out["variants"]:
        print(f"| {v['label']} | " + " | ".join("D" if x is None else f"{x:.2f}" for x in v["kept_share_per_layer"]) + " |")


if __name__ == "__main__":
    main()
