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
    share of the prefill's real tokens (padding excluded). A prompt shorter than the window is kept
    whole.
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

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything
from ..engine.selection import (
    GQA_REDUCTIONS,
    Selection,
    aggregate_gqa,
    pool1d,
    resolve_budget_rows,
    window_scores,
    window_scores_reference,
)


@dataclass(eq=False)
class SnapKV(Method):
    name = "snapkv"
    phase = Phase.EVICTION
    schedule = "once after prefill"
    kv_memory = "reduced to the budget"
    calibration = "no"
    paper = "[SnapKV](https://arxiv.org/abs/2404.14469)"
    needs_evicting_cache = True

    budget: int | float = param(0.5, "budget")
    window: int = param(32, "int", ge=1)
    pool_kernel: int = param(7, "int", ge=1)
    pool: str = param("max", "choice", choices=("max", "avg"))
    gqa_reduce: str = param("mean", "choice", choices=GQA_REDUCTIONS)
    impl: str = param("fast", "choice", choices=("fast", "reference"))

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget < self.window:
            raise ValueError(f"snapkv: budget ({self.budget}) must be at least the observation window ({self.window})")

    @classmethod
    def at_full_budget(cls) -> "SnapKV":
        return cls(budget=1.0, window=4)

    @classmethod
    def at_sparse_budget(cls) -> "Method":
        return cls(budget=12, window=4)

    def select(self, call) -> Selection | None:
        """At the prefill: the rows each KV head keeps (window included); ``None`` afterwards."""
        if call.kind != "prefill":
            return None
        plan = KeyPlan(call, window=self.window)
        n_top = self.n_top(call, plan)
        if plan.covers(n_top):
            return everything(call, "keep")  # the window always stays: nothing to evict
        scores = self.scores(call, plan)
        return plan.select(scores, self.head_counts(scores, n_top, plan), "keep")

    def n_top(self, call, plan: KeyPlan) -> torch.Tensor:
        """Candidates (outside the window) each KV head keeps in this layer, ``(B, 1)``: the budget
        over each row's real tokens (a row of a left-padded batch keeps what it would alone).
        PyramidKV changes it per layer."""
        real = call.n_real  # (B, 1)
        return torch.minimum(resolve_budget_rows(self.budget, real), real) - plan.n_always

    def head_counts(self, scores: torch.Tensor, n_top: torch.Tensor, plan: KeyPlan) -> torch.Tensor:
        """How many candidates each KV head keeps given the layer's ``n_top``: the same for every
        head here; AdaKV shares them out by score."""
        return n_top

    def scores(self, call, plan: KeyPlan) -> torch.Tensor:
        """The observation window's votes for the candidates, ``(B, Hkv, L - window)``."""
        # rows that take candidates hold at least `window` real tokens: the last w queries are real
        score_fn = window_scores if self.impl == "fast" else window_scores_reference
        scores = score_fn(call.query[:, :, plan.hi :], call.key, call.scale, call.key_valid)[..., : plan.hi]
        scores = pool1d(scores, self.pool_kernel, self.pool)
        return aggregate_gqa(scores, call.n_kv_heads, self.gqa_reduce)
