"""Build ``pipeline_regression.pt``: logits and every selection of the four first methods on fixed
inputs, recorded *before* they were ported to the Engine v2 selection pipeline.

``tests/test_pipeline_regression.py`` replays the same cases through the current code and requires
identical selections and logits, so the port (and any later refactor of the pipeline) cannot change
what a method selects or computes. Rerun only when a method's behaviour is meant to change, and say
why in the commit:

    .venv/bin/python tests/data/make_pipeline_regression.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tokensparse as ts  # noqa: E402
from tokensparse.engine.telemetry import Telemetry  # noqa: E402
from tokensparse.testing import tiny_inputs, tiny_model  # noqa: E402

OUT = Path(__file__).with_name("pipeline_regression.pt")

#: (case name, method name, config) — sparse budgets that really select on 48-token prompts
CONFIGS = [
    ("token_sparse-qhead", "token_sparse", dict(coverage=0.3, window=4, min_tokens=2, layers="all", pool_kernel=3)),
    ("token_sparse-kvhead-sinks", "token_sparse", dict(coverage=0.4, window=6, min_tokens=4, layers=[1], pool_kernel=1,
                                                       select_per="kv_head", gqa_reduce="max", sink_tokens=3, score_chunk=16)),
    ("token_select-layer", "token_select", dict(budget=14, n_sink=2, n_local=4, pool_kernel=3)),
    ("token_select-kvhead-reuse", "token_select", dict(budget=0.4, n_sink=3, n_local=5, select_per="kv_head",
                                                        reuse_threshold=0.5, logit_scale=None)),
    ("snapkv-max", "snapkv", dict(budget=12, window=4)),
    ("snapkv-avg-share", "snapkv", dict(budget=0.5, window=5, pool="avg", gqa_reduce="sum")),
    ("streaming_llm", "streaming_llm", dict(budget=12, n_sink=2)),
    ("streaming_llm-share", "streaming_llm", dict(budget=0.3, n_sink=3)),
]
FAMILIES = ("llama", "qwen3")
MODES = ("prefill", "chunked", "decode")


class RecordingTelemetry(Telemetry):
    """Telemetry that also keeps every selection as a ``(B, H, Lk)`` bool mask, in call order."""

    def __init__(self):
        super().__init__(sample_queries=4)
        self.selections: list[tuple[int, str, torch.Tensor | None]] = []

    def observe(self, call, selection) -> None:
        super().observe(call, selection)
        mask = None if selection.kind == "dense" else selection.mask(call.k_len).cpu()
        self.selections.append((call.layer_idx, selection.kind, mask))


def run_case(model, method, mode, ids, mask, telemetry):
    with torch.no_grad(), ts.sparsify(model, method, telemetry=telemetry) as s:
        cache = s.new_cache()
        if mode == "prefill":
            return model(ids, attention_mask=mask, cache=cache).logits
        if mode == "chunked":
            cut = ids.shape[1] - 4  # a chunk no longer than every n_local above: TokenSelect selects on it
            model(ids[:, :cut], attention_mask=mask[:, :cut], cache=cache)
            return model(ids[:, cut:], attention_mask=mask, cache=cache).logits
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits, 1)


def cases():
    for family in FAMILIES:
        model = tiny_model(family, torch.float32)
        for batch in (1, 2):
            ids, mask = tiny_inputs(batch, 48, pad=7 if batch == 2 else 0, seed=3)
            for case, name, cfg in CONFIGS:
                for mode in MODES:
                    yield f"{family}/b{batch}/{case}/{mode}", model, name, cfg, mode, ids, mask


def record() -> dict:
    out = {}
    for key, model, name, cfg, mode, ids, mask in cases():
        method = ts.methods.get(name)(**cfg)
        logits = run_case(model, method, mode, ids, mask, False)
        tele = RecordingTelemetry()
        run_case(model, ts.methods.get(name)(**cfg), mode, ids, mask, tele)
        out[key] = {"logits": logits, "selections": tele.selections}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = record()
    torch.save(data, OUT)
    n_sel = sum(len(v["selections"]) for v in data.values())
    print(f"wrote {OUT} ({len(data)} cases, {n_sel} selections)")
