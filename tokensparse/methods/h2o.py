"""H2O: keep the heavy hitters (most accumulated attention) and the recent tokens, at every step.

Based on Zhang, Sheng, Zhou et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048 (official code:
github.com/FMInference/H2O, ``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise``).

Every cache row carries the attention probability it has received so far, summed over every query
that saw it (the prefill's queries, then each decode step's) and over the query heads of its KV
head. After every call (prefill, chunk or decode step), each layer keeps, per KV head, the
``window`` most recent rows and the ``budget - window`` rows with the largest accumulated score
among the others, and drops the rest together with their scores. The call itself attended densely
(evict-after-attend), so the prefill is dense. The accumulator is a
:class:`~tokensparse.engine.cache.RowState` kept by the cache, so it follows eviction, beam
reordering, batch expansion and ``KVCache.clone`` without this file tracking any of it.

Parameters
----------
budget: int | float = 0.2
    Rows kept per layer and KV head (the paper's ``heavy_ratio + recent_ratio`` = 0.1 + 0.1). A
    float in (0, 1] is a share of the first prefill's real tokens, fixed at that point and stored
    with the cache.
window: int | float = 0.5
    Recent rows always kept: a token count, or (a float in (0, 1)) a share of the budget (the
    paper's equal heavy and recent ratios are 0.5).

Deviations: the official code scores per attention head of a multi-head model; with grouped
queries this one sums the group's probabilities into its KV head (the cache stores KV heads, not
repeated copies) and chooses per KV head. Scores are kept per sequence (the official code sums over
the batch), in fp32. Evicting down to the budget after a multi-token call (the prefill) is what the
official ``utils_real_drop`` path does for a prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.cache import RowState
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import everything, fixed_budget, host_eviction
from ..engine.selection import (
    Selection,
    aggregate_gqa,
    attention_mass,
    indices_from_mask,
    mask_from_indices,
    select_topk,
)


@dataclass(eq=False)
class H2O(Method):
    name = "h2o"
    phase = Phase.EVICTION
    schedule = "every step"
    kv_memory = "bounded by the budget"
    paper = "[H2O](https://arxiv.org/abs/2306.14048)"
    needs_evicting_cache = True

    budget: int | float = param(0.2, "budget")
    window: int | float = param(0.5, "budget")

    def validate(self) -> None:
        if isinstance(self.window, float) and self.window >= 1.0:
            raise ValueError(f"h2o: a float window is a share of the budget in (0, 1), got {self.window}")
        if isinstance(self.budget, int) and isinstance(self.window, int) and self.window >= self.budget:
            raise ValueError(f"h2o: window ({self.window}) must be smaller than the budget ({self.budget})")

    @classmethod
    def at_full_budget(cls) -> "H2O":
        return cls(budget=1 << 40, window=4)

    @classmethod
    def at_sparse_budget(cls) -> "H2O":
        return cls(budget=12, window=4)

    def select(self, call) -> Selection:
        """Accumulate this call's attention mass, then keep the window and the heavy hitters.

        A decode step never waits for the device when the cache knows on the host how many real rows
        each sequence holds (``EvictingLayer.host_valid``; every KV head keeps the same number here)
        and the budget's host copy survived (:func:`host_eviction`): the decision and the widths
        are then ints. Otherwise the counts are read from the device."""
        cache = call.evicting
        acc = cache.state("h2o.scores", RowState)  # (B, Hkv, n) accumulated attention of each row
        query_valid = None if call.key_valid is None else call.key_valid[:, -call.q_len :]
        mass = attention_mass(call.query, call.key, call.scale, call.mask, query_valid)
        acc.values.add_(aggregate_gqa(mass, call.n_kv_heads, "sum"))
        name = "h2o.keep"
        keep = fixed_budget(call, self.budget, name, minimum=2)  # (B, 1)
        host = host_eviction(call, name)
        if host is not None:
            if host.fits:
                return everything(call, "keep")
            # every head holds v > window rows: it keeps the window and exactly min(v, b) - window others
            kept = host.kept
            n_heavy_max = max(b - self._window(b) for b in host.budgets)
        else:
            kept = n_heavy_max = None
        if isinstance(self.window, float):  # (double, then floor: the same number as the host's ``_window``)
            window = (keep.double() * self.window).floor().long()
        else:
            window = torch.full_like(keep, self.window)
        window = window.clamp(1, None).minimum(keep - 1)
        valid = cache.valid_rows()  # (B, Hkv, n)
        n_valid = valid.sum(-1)  # (B, Hkv)
        if kept is None and bool((n_valid <= keep).all()):
            return everything(call, "keep")
        rank = valid.long().cumsum(-1)  # arrival order of the real rows of each KV head
        recent = valid & (rank > (n_valid - window)[..., None])
        heavy = acc.values.masked_fill(~valid | recent, float("-inf"))
        n_heavy = keep - window  # (B, 1)
        if n_heavy_max is None:
            n_heavy_max = int(n_heavy.max())
        top, ok = select_topk(heavy, n_heavy_max, n_heavy[:, :, None])
        ok = ok & heavy.gather(-1, top).isfinite()  # a head with fewer candidates than its share
        take = recent | mask_from_indices(top, heavy.shape[-1], ok)
        if kept is not None:
            idx, ok = indices_from_mask(take, max(kept))
            return Selection.keep(idx, None if len(set(kept)) == 1 else ok, kept_rows=kept)
        idx, ok = indices_from_mask(take)
        return Selection.keep(idx, None if bool(ok.all()) else ok)

    def _window(self, budget: int) -> int:
        """The recent rows kept of ``budget`` rows, on the host."""
        w = math.floor(budget * self.window) if isinstance(self.window, float) else self.window
        return min(max(w, 1), budget - 1)
