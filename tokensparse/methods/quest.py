"""Quest: query-aware page selection at decode time, from per-page key bounds kept by the cache.

Based on Tang, Zhao, Zhu, Xiao, Kasikci, Han, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference", ICML 2024, https://arxiv.org/abs/2406.10774 (official code:
github.com/mit-han-lab/Quest, the Hugging Face reference ``evaluation/quest_attention.py``).

The cache is cut into pages of ``page`` consecutive tokens; for every page and KV head the cache
keeps the elementwise minimum ``m`` and maximum ``M`` of its keys
(:class:`~tokensparse.engine.cache.PageSummary`, maintained on write: a decode step updates one
page). At a decode step each page's score is the upper bound of ``q·k`` over its keys,
``Σ_d max(q_d·M_d, q_d·m_d)``; the top ``max(3, budget // page)`` pages (the current, partial page
always among them) are attended exactly, the rest skipped. Scoring reads ``2·D`` numbers per page,
``1/8`` of the keys at ``page = 16``. The prefill, cache chunks and the first ``dense_layers``
layers run dense (the paper's ``layer_id < 2``).

Parameters
----------
budget: int | float = 1024
    Tokens attended per decode step (the paper's ``token_budget``), rounded up to whole pages (the
    paper rounds down; up makes a budget of the whole context exactly dense), at least 3 pages; a
    float in (0, 1] is a share of the context's real tokens.
page: int = 16
    Tokens per page (the paper's ``chunk_size``).
dense_layers: int = 2
    The first layers run dense.
bound: str = "minmax"
    How a page is scored: ``minmax`` (the paper's bound from per-page min/max keys, ``2·D`` numbers
    per page) or, beyond the paper, the exact maximum of ``q·k`` over the page's keys read from a
    low-precision shadow of K that the cache keeps (:mod:`tokensparse.engine.shadow`: ``int8``
    reads a quarter of the fp32 key bytes plus a scale per row, ``bf16`` half). On SmolLM2 the
    bound is loose at head dim 64 (docs/results/quest: an exact-page oracle answers the pass key
    where the bound does not); the shadow is the affordable exact-ish page score.

Deviations: the paper scores pages per query head; here the query heads of a KV head share one
choice (the maximum of their bounds, which is still an upper bound for each of them), so the
executor reads each chosen page once per KV head. In a left-padded batch the page grid starts at
each row's first real token (so a row chooses what it would alone) and the bounds are then
computed per step from the keys (reading all of K); the cache-kept summaries serve unpadded
batches. The official kernels also keep the current page dense; here it is always selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pages import minmax_bound, page_max_token_scores, page_select, page_select_by_max, page_token_scores
from ..engine.shadow import SHADOW_DTYPES, shadow_token_scores
from ..engine.selection import Selection, resolve_budget, select_topk


@dataclass(eq=False)
class Quest(Method):
    name = "quest"
    phase = Phase.DECODE
    dense_prefill = True
    schedule = "every decode step, layers from dense_layers"
    kv_memory = "full cache (+2·D per page and KV head)"
    paper = "[Quest](https://arxiv.org/abs/2406.10774)"
    needs_cache_state = True

    budget: int | float = param(1024, "budget")
    page: int = param(16, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    bound: str = param("minmax", "choice", choices=("minmax",) + SHADOW_DTYPES, added=True)

    @classmethod
    def at_full_budget(cls) -> "Quest":
        return cls(budget=1.0, page=4, dense_layers=0)  # ceil(n / 4) pages: every page

    @classmethod
    def at_sparse_budget(cls) -> "Quest":
        return cls(budget=8, page=2, dense_layers=0)

    def n_pages(self, n_real: int) -> int:
        """Pages attended for a context of ``n_real`` real tokens."""
        return max(3, -(-resolve_budget(self.budget, n_real) // self.page))

    def select(self, call) -> Selection | None:
        if call.kind != "decode" or call.layer_idx < self.dense_layers:
            return None
        layer = call.require_cache(self.name)
        if layer is None:  # no cache (use_cache=False): nothing to decode against
            return None
        if self.bound != "minmax":  # the exact per-page maximum of q·k over a low-precision shadow of K
            return page_select_by_max(call, self.page, self.n_pages,
                                      lambda q, start, rows: shadow_token_scores(call, self.bound, q, start, rows),
                                      "quest")
        return page_select(call, self.page, self.n_pages, "minmax",
                           lambda q, parts, k: self.top_pages(q, *parts, k), "quest", layer)

    def key_scores(self, call) -> torch.Tensor | None:
        """As a scorer: each key scored by its page's bound (``(B, Hkv, Lk)``; decode calls; with a
        shadow ``bound``, the page's maximum of ``q·k`` over the shadow, as :meth:`select` ranks), as a
        log-softmax of ``bound · scale`` over the keys of each KV head. Within a head that is the
        bound's order; across heads it puts the raw bounds (whose scale differs from head to head)
        on one scale, as the other scorers' probabilities are, so a composer that combines heads
        (TidalDecode's ``select_per="layer"``) compares like with like."""
        layer = call.require_cache(self.name)
        if layer is None:
            return None
        if self.bound != "minmax":  # each page's exact maximum of q·k over the shadow, as select() ranks it
            bounds = page_max_token_scores(call, self.page,
                                           lambda q, start, rows: shadow_token_scores(call, self.bound, q, start, rows))
        else:
            bounds = page_token_scores(call, self.page, "minmax", lambda q, parts: self.page_bounds(q, *parts), layer)
        return (bounds * call.scale).log_softmax(-1)

    @staticmethod
    def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, P)``: the upper bound of ``q·key`` over each page's keys, maximised over the
        query heads of each KV head (:func:`~tokensparse.engine.pages.minmax_bound`)."""
        return minmax_bound(q, kmin, kmax)

    @classmethod
    def top_pages(cls, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` pages ``(B, Hkv, k)`` (ascending) with the largest :meth:`page_bounds`."""
        top, _ = select_topk(cls.page_bounds(q, kmin, kmax), k)
        return top
