"""StreamingLLM: keep the first few "attention sink" tokens and a window of recent tokens.

Based on Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453 (official code: github.com/mit-han-lab/streaming-llm).

After every call (prefill, chunk or decode step), each layer keeps its first ``n_sink`` tokens and
the most recent ``budget - n_sink`` tokens and drops the rest. Attention inside a call sees
everything that was cached plus the call's own tokens (evict-after-attend, as in the within-context
benchmarks of kvpress/PyramidKV), so the prefill itself is dense.

Deviation: positions are not re-indexed inside the cache (keys are cached post-RoPE at their true
positions); the official "pos-shift" mode that re-rotates keys to cache positions is what allows
streaming beyond the trained context and is not implemented here.

Parameters
----------
budget: int | float = 0.5
    Rows kept per layer, sinks included. A float in (0, 1] is a share of the first prefill's real
    tokens (padding excluded), fixed at that point and stored with the cache, so the cache stays
    that size while generating.
n_sink: int = 4
    Initial tokens always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import everything, fixed_budget, host_eviction
from ..engine.selection import Selection, indices_from_mask


@dataclass(eq=False)
class StreamingLLM(Method):
    name = "streaming_llm"
    phase = Phase.EVICTION
    schedule = "every step"
    kv_memory = "bounded by the budget"
    calibration = "no"
    paper = "[StreamingLLM](https://arxiv.org/abs/2309.17453)"
    needs_evicting_cache = True

    budget: int | float = param(0.5, "budget")
    n_sink: int = param(4, "int", ge=0)

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget <= self.n_sink:
            raise ValueError(f"streaming_llm: budget ({self.budget}) must exceed n_sink ({self.n_sink})")

    @classmethod
    def at_full_budget(cls) -> "StreamingLLM":
        # a share is fixed at the prompt's length (the cache then stops growing), so "everything"
        # is a token count no generation reaches
        return cls(budget=1 << 40)

    @classmethod
    def at_sparse_budget(cls) -> "Method":
        return cls(budget=12, n_sink=2)

    def select(self, call) -> Selection:
        """After every call: the first ``n_sink`` and the most recent real rows of each KV head.

        A decode step never waits for the device when the cache knows on the host how many real
        rows each sequence holds (``EvictingLayer.host_valid``; every KV head the same, as this
        policy keeps them) and the budget's host copy survived (:func:`host_eviction`): the
        decision and the widths are then ints. With no empty row and one budget for every sequence
        the rows are even known by position (the first ``n_sink`` and the last ``budget - n_sink``);
        otherwise they are ranked from the slots on the device. Without the host records (a batch
        reorder of unequal rows, a pruned pass) the counts are read from the device."""
        cache = call.evicting  # present: the engine refuses a stock cache for an eviction method
        name = "streaming_llm.keep"
        keep = fixed_budget(call, self.budget, name, self.n_sink + 1)[:, :, None]  # (B, 1, 1)
        host = host_eviction(call, name)
        if host is not None:
            if host.fits:
                return everything(call, "keep")
            kept = host.kept
            if not cache.has_empty_rows and len(set(host.budgets)) == 1:  # every row and head holds n real rows
                n, budget = cache.n, host.budgets[0]
                dev = keep.device
                idx = torch.cat([torch.arange(self.n_sink, device=dev),
                                 torch.arange(n - (budget - self.n_sink), n, device=dev)])
                return Selection.keep(idx.expand(call.batch, call.n_kv_heads, budget), kept_rows=kept)  # (as ranked)
            width = max(kept)
        else:
            kept = width = None
        valid = cache.valid_rows()  # (B, Hkv, n): padding was marked before this call
        n_valid = valid.sum(-1, keepdim=True)
        if width is None and bool((n_valid <= keep).all()):
            return everything(call, "keep")
        # rank real rows in physical (= arrival) order: sinks are the first ones, the window the last
        rank = valid.long().cumsum(-1)
        take = valid & ((rank <= self.n_sink) | (rank > n_valid - (keep - self.n_sink)))
        idx, ok = indices_from_mask(take, width)  # taken rows in physical order; shorter rows padded
        if kept is not None:
            return Selection.keep(idx, None if len(set(kept)) == 1 else ok, kept_rows=kept)
        return Selection.keep(idx, None if bool(ok.all()) else ok)
