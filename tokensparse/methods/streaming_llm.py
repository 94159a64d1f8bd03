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
    Rows kept per layer, sinks included. A float in (0, 1] is a share of the first prefill's length
    (fixed at that point, so the cache stays that size while generating).
n_sink: int = 4
    Initial tokens always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.selection import resolve_budget, validate_budget
from ..engine.session import Method, sparse_paths_forced
from ..engine.telemetry import Selection


@dataclass(eq=False)
class StreamingLLM(Method):
    name = "streaming_llm"
    phase = "eviction (every step)"
    kv_memory = "bounded by the budget"
    calibration = "no"
    paper = "[StreamingLLM](https://arxiv.org/abs/2309.17453)"
    needs_evicting_cache = True

    budget: int | float = 0.5
    n_sink: int = 4

    def validate(self) -> None:
        validate_budget("budget", self.budget)
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if isinstance(self.budget, int) and self.budget <= self.n_sink:
            raise ValueError(f"budget ({self.budget}) must exceed n_sink ({self.n_sink})")

    @classmethod
    def at_full_budget(cls) -> "StreamingLLM":
        return cls(budget=1.0)

    def forward(self, call) -> torch.Tensor:
        out = call.dense()
        cache = call.require_evicting_cache(self.name)
        if cache is None:
            return out
        keep = max(resolve_budget(self.budget, cache.seen), self.n_sink + 1)
        valid = cache.valid_rows()  # (B, Hkv, n)
        n_valid = valid.sum(-1, keepdim=True)
        if int(n_valid.max()) <= keep and not sparse_paths_forced():
            return out
        # rank real rows in physical (= arrival) order: sinks are the first ones, the window the last
        rank = valid.long().cumsum(-1)
        take = valid & ((rank <= self.n_sink) | (rank > n_valid - (keep - self.n_sink)))
        n_keep = int(take.sum(-1).max())
        # taken rows first, in physical order; a head/sequence with fewer real rows is padded
        pos = torch.arange(cache.n, device=valid.device).expand_as(take)
        idx = torch.where(take, pos, pos + cache.n).sort(-1).values[..., :n_keep] % cache.n
        kept = take.gather(-1, idx)
        call.session.observe(call, Selection.keys(idx))
        cache.keep(idx, None if bool(kept.all()) else kept)
        call.session.stats["streaming_llm.evictions"] += 1
        return out
