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

from ..engine.cache import PageSummary, summarize_pages
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import everything
from ..engine.selection import Selection, resolve_budget, select_topk


@dataclass(eq=False)
class Quest(Method):
    name = "quest"
    phase = Phase.DECODE
    schedule = "every decode step, layers from dense_layers"
    kv_memory = "full cache (+2·D per page and KV head)"
    paper = "[Quest](https://arxiv.org/abs/2406.10774)"
    needs_cache_state = True

    budget: int | float = param(1024, "budget")
    page: int = param(16, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)

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
        p, n = self.page, call.k_len
        stats = call.session.stats
        if call.key_valid is None:  # unpadded: the cache's page summaries
            st = layer.state(f"quest.pages.{p}", lambda: PageSummary(p))
            kmin, kmax = st.bounds
            n_sel = self.n_pages(n)
            if kmin.shape[2] <= n_sel:
                return everything(call, "keys")
            top = self.top_pages(call.query, kmin[:, :, :-1], kmax[:, :, :-1], n_sel - 1)
            stats["quest_summary_rows"] += 2 * kmin.shape[2]
            stats["quest_cache_rows"] += n
            idx = (top[..., None] * p + torch.arange(p, device=top.device)).flatten(-2)
            return Selection.keys(idx, suffix=n - (kmin.shape[2] - 1) * p)
        # a padded batch: each row on its own grid, from its real keys
        real = call.n_real[:, 0].tolist()
        if all(self.n_pages(r) >= -(-r // p) for r in real):
            return everything(call, "keys")
        rows, width = [], 0
        for r, n_real in enumerate(real):
            start = n - n_real
            kmin, kmax = summarize_pages(call.key[r : r + 1, :, start:], p)
            n_all, n_sel = kmin.shape[2], self.n_pages(n_real)
            if n_all <= n_sel:
                pages = torch.arange(n_all, device=kmin.device).expand(1, kmin.shape[1], n_all)
            else:
                top = self.top_pages(call.query[r : r + 1], kmin[:, :, :-1], kmax[:, :, :-1], n_sel - 1)
                pages = torch.cat([top, torch.full_like(top[..., :1], n_all - 1)], -1)
            tok = (pages[..., None] * p + torch.arange(p, device=pages.device)).flatten(-2)
            tok = tok[..., : int((tok < n_real).sum(-1).max())]  # the last page may be partial
            rows.append(tok + start)
            width = max(width, tok.shape[-1])
        idx = torch.full((call.batch, call.n_kv_heads, width), n - 1, dtype=torch.long, device=call.query.device)
        valid = torch.zeros_like(idx, dtype=torch.bool)
        for r, tok in enumerate(rows):
            ok = tok < n
            idx[r, :, : tok.shape[-1]] = tok.clamp_max(n - 1)
            valid[r, :, : tok.shape[-1]] = ok
        return Selection.keys(idx, None if bool(valid.all()) else valid)

    @staticmethod
    def top_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` pages ``(B, Hkv, k)`` (ascending) with the largest upper bound of ``q·key``
        over their keys, the bound maximised over the query heads of each KV head:
        ``Σ_d max(q_d·M_d, q_d·m_d) = q⁺·M + q⁻·m``."""
        b, hq, _, d = q.shape
        hkv = kmin.shape[1]
        qg = q.float().reshape(b, hkv, hq // hkv, d)
        bound = qg.clamp_min(0) @ kmax.float().transpose(-1, -2) + qg.clamp_max(0) @ kmin.float().transpose(-1, -2)
        top, _ = select_topk(bound.amax(2), k)
        return top
