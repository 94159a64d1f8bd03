"""TOVA: keep the cache rows the current query attends to most, evict the rest, at every step.

Based on Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs", EMNLP 2024,
https://arxiv.org/abs/2401.06104 (Token Omission Via Attention; official code:
github.com/schwartz-lab-NLP/TOVA).

After every call (prefill, cache chunk or decode step), in every layer: the softmax attention of
the call's *last* query to every cached key, averaged over all query heads, scores the rows; the
``budget`` best rows are kept (the current token always), the same rows for every KV head. The
call itself attended densely (evict-after-attend), so the prefill is dense.

Parameters
----------
budget: int | float = 0.5
    Rows kept per layer. A float in (0, 1] is a share of the first prefill's real tokens, fixed
    at that point and stored with the cache (the cache then stays that size while generating).

Deviations: the paper evicts one token per step once the cache is full; evicting down to the
budget after a multi-token call (the prefill) is what its reference code and kvpress's
``TOVAPress`` do for a prompt. Scores are computed in fp32; batches are supported (budgets per
row's real tokens, padding never kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything, fixed_budget, host_eviction, uniform_or
from ..engine.selection import Selection, grouped_logits


@dataclass(eq=False)
class TOVA(Method):
    name = "tova"
    phase = Phase.EVICTION
    schedule = "every step"
    kv_memory = "bounded by the budget"
    paper = "[TOVA](https://arxiv.org/abs/2401.06104)"
    needs_evicting_cache = True

    budget: int | float = param(0.5, "budget")

    @classmethod
    def at_full_budget(cls) -> "TOVA":
        return cls(budget=1 << 40)  # a token count no generation reaches (a share is fixed at the prompt)

    @classmethod
    def at_sparse_budget(cls) -> "TOVA":
        return cls(budget=12)

    def select(self, call) -> Selection:
        name = "tova.keep"
        keep = fixed_budget(call, self.budget, name, minimum=1)
        # the counts on the host where the cache knows them (a decode step then never reads the device)
        rows = host_eviction(call, name)
        plan = KeyPlan(call, window=1, host_real=call.evicting.host_valid)  # the current token stays
        host = None if rows is None else [b - min(v, 1) for b, v in zip(rows.budgets, rows.held)]  # less the current token
        n_top = uniform_or(host, lambda: keep - plan.n_always)
        if plan.covers(n_top if host is None else host):
            return everything(call, "keep")
        logits = grouped_logits(call.query[:, :, -1:], call.key, call.scale)[:, :, 0]  # (B, Hq, Lk)
        if call.mask is not None:  # padding and empty rows of the last query
            logits = logits.masked_fill(~call.mask[:, :, -1].repeat_interleave(
                call.n_q_heads // call.mask.shape[1], dim=1), torch.finfo(torch.float32).min)
        scores = logits.softmax(-1).mean(1, keepdim=True)  # (B, 1, Lk): one set for the layer
        return plan.select(scores[..., plan.lo : plan.hi], n_top, "keep", host)
