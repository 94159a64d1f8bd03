"""PyramidKV: SnapKV's selection with a budget that shrinks with depth (a pyramid over layers).

Based on Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", https://arxiv.org/abs/2406.02069 (official code: github.com/Zefan-Cai/KVCache-Factory,
``pyramidkv_utils.py``). Attention is broad in the lower layers and concentrates in the upper
ones, so lower layers keep more rows and upper layers fewer, at the same mean budget.

Per row, with ``c = budget − window`` candidates per KV head on average: the last layer keeps
``c // beta``, the first ``2c − c // beta``, the layers between on an arithmetic sequence; when the first layer's share exceeds the candidates, it is cut to
them and the last layer's raised to keep the mean. Scores, pooling, window: SnapKV's
(:class:`~tokensparse.methods.snapkv.SnapKV`). Each layer keeps its own number of rows in a
ragged cache (:class:`~tokensparse.engine.cache.RaggedLayer`), so the memory is the mean budget.

Parameters: SnapKV's (``budget`` is the mean over layers), plus
beta: int = 20
    The pyramid's ratio: the last layer keeps ``1/beta`` of the mean candidates (paper: 20).

Deviations: the official code steps down by the integer ``(max − min) // (layers − 1)``, which
overshoots the mean (101 rows instead of 96 on 30 layers at c = 96); here the sequence is exact
and rounded so that the layers' total is ``layers × c`` (the memory the budget states). The official code resolves the budget on the prompt length of the whole batch; here per
row over its real tokens (a padded row keeps what it would alone). Sliding-window layers are never
compressed (they count in the pyramid's layer index but keep their window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.selection import resolve_budget_rows
from .snapkv import SnapKV


@dataclass(eq=False)
class PyramidKV(SnapKV):
    name = "pyramid_kv"
    schedule = "once after prefill; per-layer budgets"
    kv_memory = "reduced to the budget (mean over layers; ragged cache)"
    paper = "[PyramidKV](https://arxiv.org/abs/2406.02069)"
    kv_layout = "ragged"

    beta: int = param(20, "int", ge=1)

    @classmethod
    def at_full_budget(cls) -> "PyramidKV":
        return cls(budget=1.0, window=4)

    @classmethod
    def at_sparse_budget(cls) -> "PyramidKV":
        return cls(budget=12, window=4, beta=4)

    def layer_counts(self, mean: torch.Tensor, n_cand: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Candidates kept by each layer, ``(B, n_layers)``, for a mean of ``mean (B, 1)`` and
        ``n_cand (B, 1)`` candidates."""
        lo = mean // self.beta
        hi = 2 * mean - lo
        over = hi >= n_cand
        hi = torch.where(over, n_cand, hi)
        lo = torch.where(over, 2 * mean - hi, lo)
        t = torch.arange(n_layers, device=mean.device) / max(n_layers - 1, 1)
        exact = hi - t * (hi - lo)  # (B, n_layers), sums to n_layers · mean
        counts = exact.floor().long()
        short = n_layers * mean - counts.sum(-1, keepdim=True)  # the rounding, to the largest remainders
        order = (exact - counts).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # remainder ranks
        counts += (order < short).long()
        return counts.clamp_min(0).minimum(n_cand)

    def n_top(self, call, plan) -> torch.Tensor:
        real = call.n_real
        mean = torch.minimum(resolve_budget_rows(self.budget, real), real) - plan.n_always
        counts = self.layer_counts(mean.clamp_min(0), plan.n_cand, call.session.num_layers)
        return counts[:, call.layer_idx : call.layer_idx + 1]
