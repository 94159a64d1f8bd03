"""SnapKV: compress the KV cache once after prefill, by the votes of an observation window.

Based on Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469 (official code: github.com/FasterDecoding/SnapKV).

At the end of the prefill (the first call on an empty cache), in every layer: the last ``window``
queries' softmax attention to the earlier keys is averaged over the window, pooled along keys
(``pool``/``pool_kernel``), aggregated over each KV head's query group (``gqa_reduce``), and the
top ``budget - window`` keys per KV head are kept together with the window itself. Prefill attention
is dense (it ran before the compression); later tokens are appended without further eviction.

Where the question sits is the caller's choice and must be reported: if it is part of the prefill
("inside") the window sees it; if it is fed after the prefill ("after") the compression is
question-agnostic. The evaluation harness records this as ``placement``.

Parameters
----------
budget: int | float = 0.5
    KV rows kept per layer and KV head after compression, window included; a float in (0, 1] is a
    share of the prefill length.
window: int = 32
    Observation window (paper's LongBench setting: 32).
pool_kernel: int = 7
    Pooling kernel along keys (paper: 7).
pool: str = "max"
    ``"max"`` (paper's LongBench setting) or ``"avg"`` (official class default).
gqa_reduce: str = "mean"
    How scores are combined over the query heads sharing a KV head (``mean``/``max``/``sum``). The
    official code repeats K/V per query head instead (memory ×G); this keeps one row set per KV head.
impl: str = "fast"
    ``"fast"`` (window scores in key chunks) or ``"reference"`` (one full window × L softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.selection import (
    GQA_REDUCTIONS,
    aggregate_gqa,
    pool1d,
    resolve_budget,
    topk_sorted,
    validate_budget,
    window_scores,
    window_scores_reference,
)
from ..engine.session import Method, sparse_paths_forced
from ..engine.telemetry import Selection


@dataclass(eq=False)
class SnapKV(Method):
    name = "snapkv"
    phase = "eviction (once after prefill)"
    kv_memory = "reduced to the budget"
    calibration = "no"
    paper = "[SnapKV](https://arxiv.org/abs/2404.14469)"
    needs_evicting_cache = True

    budget: int | float = 0.5
    window: int = 32
    pool_kernel: int = 7
    pool: str = "max"
    gqa_reduce: str = "mean"
    impl: str = "fast"

    def validate(self) -> None:
        validate_budget("budget", self.budget)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if isinstance(self.budget, int) and self.budget < self.window:
            raise ValueError(f"budget ({self.budget}) must be at least the observation window ({self.window})")
        if self.pool_kernel < 1:
            raise ValueError(f"pool_kernel must be >= 1, got {self.pool_kernel}")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        if self.gqa_reduce not in GQA_REDUCTIONS:
            raise ValueError(f"gqa_reduce must be one of {GQA_REDUCTIONS}, got {self.gqa_reduce!r}")
        if self.impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {self.impl!r}")

    @classmethod
    def at_full_budget(cls) -> "SnapKV":
        return cls(budget=1.0, window=4)

    def forward(self, call) -> torch.Tensor:
        out = call.dense()
        if call.kind != "prefill":
            return out
        cache = call.require_evicting_cache(self.name)
        if cache is None:  # use_cache=False: nothing is stored, nothing to evict
            return out
        length = call.k_len
        keep = min(resolve_budget(self.budget, length), length)
        w = min(self.window, length)
        if keep >= length and not sparse_paths_forced():
            return out
        n_top = max(keep - w, 0)
        valid = call.key_valid
        score_fn = window_scores if self.impl == "fast" else window_scores_reference
        scores = score_fn(call.query[:, :, length - w :], call.key, call.scale, valid)[..., : length - w]
        scores = pool1d(scores, self.pool_kernel, self.pool)
        scores = aggregate_gqa(scores, call.n_kv_heads, self.gqa_reduce)  # (B, Hkv, L - w)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, : length - w], -1.0)
        top = topk_sorted(scores, n_top)
        tail = torch.arange(length - w, length, device=top.device).expand(*top.shape[:2], w)
        idx = torch.cat([top, tail], dim=-1)
        kept_valid = None if valid is None else valid[:, None, :].expand_as(call.key[..., 0]).gather(2, idx)
        call.session.observe(call, Selection.keys(idx))
        cache.keep(idx, kept_valid)
        call.session.stats["snapkv.compressed_layers"] += 1
        return out
