"""AdaKV: SnapKV's scores with the layer's budget shared out among its KV heads by score.

Based on Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", https://arxiv.org/abs/2407.11550 (official code: github.com/FFY0/AdaKV;
kvpress's ``AdaKVPress``). A head whose attention is concentrated needs few rows, a diffuse one
many: instead of ``budget`` rows per KV head, a layer keeps its ``H × budget`` rows by one top-k
over the scores of all its heads, with a safeguard: every head first keeps its own top
``floor × budget`` (the paper's α = 0.2).

Per layer and row, with ``c`` the candidates (outside the window) a KV head would keep under
SnapKV: each head takes its top ``⌊floor · c⌋``; the remaining ``H · (c − ⌊floor · c⌋)`` go to
the best of all heads' other candidates by SnapKV's window scores (softmax probabilities, so they
compare across heads); the window is kept by every head. The heads then hold different numbers of
rows, stored at their own lengths (:class:`~tokensparse.engine.cache.RaggedLayer`): the memory
freed is the memory the budget says.

Parameters: SnapKV's, plus
floor: float = 0.2
    Share of the per-head budget every head keeps by its own scores (the paper's α).

Deviations: the official implementation flattens the heads of the whole layer for its own varlen
kernel; here the allocation is the same and the executor reads a padded view per call (masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.selection import select_topk
from .snapkv import SnapKV


@dataclass(eq=False)
class AdaKV(SnapKV):
    name = "ada_kv"
    schedule = "once after prefill; per-KV-head budgets"
    kv_memory = "reduced to the budget (per layer; heads differ; ragged cache)"
    paper = "[Ada-KV](https://arxiv.org/abs/2407.11550)"
    kv_layout = "ragged"

    floor: float = param(0.2, "float", ge=0.0, le=1.0)

    @classmethod
    def at_full_budget(cls) -> "AdaKV":
        return cls(budget=1.0, window=4)

    @classmethod
    def at_sparse_budget(cls) -> "AdaKV":
        return cls(budget=12, window=4)

    def head_counts(self, scores: torch.Tensor, n_top: torch.Tensor, plan) -> torch.Tensor:
        b, h, n = scores.shape
        per_head = plan.counts(n_top)  # (B, 1): what SnapKV would give every head
        if plan.cand_mask is not None:
            scores = scores.masked_fill(~plan.cand_mask[:, None, :], float("-inf"))
        ranked = scores.float().sort(-1, descending=True).values  # (B, H, n)
        counts = torch.zeros(b, h, dtype=torch.long, device=scores.device)
        for r in range(b):
            c = int(per_head[r, 0])
            f = int(self.floor * c)
            rest = h * (c - f)
            counts[r] = f
            if rest:
                pool = ranked[r, :, f:].reshape(-1)  # each head's candidates after its own top f
                won = select_topk(pool, rest)[0] // (n - f)  # ties: the earlier head and rank
                counts[r] += torch.bincount(won, minlength=h)
        return counts
