"""Recycled Attention: a full-attention step now and then; the steps between attend only to the keys
that step attended to most.

Based on Xu, Chen, Choi, "Recycled Attention: Efficient inference for long-context language models"
(later "RefreshKV"), https://arxiv.org/abs/2411.05787 (no public code: the authors' repository holds
only a README, so this follows the paper's description).

At a *full step* every layer attends to the whole cache, and the probabilities of that same pass
(:meth:`~tokensparse.engine.call.AttentionCall.dense_with_probs`, no second pass) rank the cached
keys: per KV head, the ``budget`` keys with the most attention (the query heads of a group combined
by ``gqa_reduce``) form the small "recycled" set. The following *recycle steps* attend only to that
set plus every token written since the full step (and optional sinks and local window); the full
cache is kept, so the next full step can refresh the set from the whole context. A full step is
taken at the first decode step, every ``stride`` steps, and (optionally) as soon as the layer's
query drifts from the query of its last full step (cosine similarity below ``similarity``, the
paper's dynamic schedule). The prefill and chunks run dense and start a new schedule.

Parameters
----------
budget: int | float = 2048
    Keys the recycled set holds at a full step, sinks and local window included (the paper's K:
    2048 or 4096); a float in (0, 1] is a share of each row's real tokens at that step. Tokens
    written after the full step are attended on top of it until the next full step.
stride: int = 16
    Steps between full steps (the paper's S; ``1`` = every step is a full step, i.e. dense).
similarity: float | None = None
    Also take a full step when the cosine similarity of this layer's query with the query of its
    last full step falls below this (per layer and per sequence); ``None``: the fixed stride only.
    The trigger is a host decision, so each decode step reads the device (at most two reads per
    layer; more on a step where only some rows drift). With the fixed stride a step reads nothing
    (tests/test_hostsync.py).
n_sink: int = 0
    First tokens always attended (a toolkit option; the paper has none).
n_local: int = 0
    Last tokens (at the full step) always attended (a toolkit option; the paper has none).
gqa_reduce: str = "max"
    How a KV head's query group combines its probabilities before the top-k: ``max``, ``mean``,
    ``sum``, or ``first`` (the first query head of the group, as a review of the paper describes).
pool_kernel: int = 15
    Beyond the paper: max-pool the full step's scores over this many neighbouring keys before the
    top-k (``1`` = off, the paper's ranking), so the rest of a span the step attends to (the next
    digits of a number it is copying) is recycled with it; one step's attention ranks what is
    needed now, not what the following steps will read. The default is 15 since 2026-12-06
    (before: 1), measured on SmolLM2's v2 suite, 21 samples per length paired with dense
    (docs/results/decode_suite/): the paper's ranking at 2048 tokens loses 32 points at 4K (0 wins /
    8 losses); pooled over 15, −1.2 points at 4K and at 8K (one loss each, −4.8 / −7.3 nats of
    answer log-likelihood); the kernel was chosen on the suite's 2K half, other samples.

Deviations: the dynamic schedule decides per layer (each layer compares its own queries) and per
sequence; which query the paper compares is not specified beyond "the query". One recycled set per
KV head (read once per KV head), from the group's combined probabilities. A full step's output and
probabilities come from one fp32 pass; in bf16/fp16 the output is SDPA's (the dense reference) and
the probabilities a second pass. The continued-pretraining variant of the paper is not
training-free and not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.cache import CacheState
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything, execute, record_dense, row_budgets
from ..engine.selection import (
    GQA_REDUCTIONS,
    Selection,
    aggregate_gqa,
    indices_from_mask,
    mask_from_indices,
    pool1d,
)


class RecycledSet(CacheState):
    """One layer's recycled keys, carried with its cache (beam reordering, batch selection and
    copies follow the sequences; a crop or a new prefill forgets it, so the next step is full).

    ``top (B, Hkv, k)`` physical positions of the recycled candidates (``valid`` marks filler
    entries), ``hi (B,)`` the physical end of the candidates at the full step (every row from
    ``hi`` on is attended), ``lo`` the sinks (an unpadded call's prefix), ``fingerprint (B, Hq·D)``
    the full step's query, ``steps`` decode steps since the full step. A budget that covers the
    whole context is an empty ``top`` with ``hi = 0`` (every row attended).

    Host twins, so that a recycle step never reads the device: ``covered`` (the budget covered the
    context), ``hi_host`` (``hi`` when every row shares it, else ``None``) and ``taken`` (the valid
    entries of each row of ``top``, ``None`` when unknown on the host)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.top = self.valid = self.hi = self.fingerprint = None
        self.lo, self.steps = 0, 0
        self.covered, self.hi_host, self.taken = False, None, None

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        same = self.taken is not None and len(set(self.taken)) == 1 and self.hi is not None
        self.taken = [self.taken[0]] * self.hi.shape[0] if same else None  # rows reordered or repeated

    def on_write(self, layer, start, end):
        pass

    def on_crop(self, layer):
        self.clear()


@dataclass(eq=False)
class RecycledAttention(Method):
    name = "recycled_attention"
    phase = Phase.DECODE
    dense_prefill = True
    schedule = "decode: a full step every `stride` steps (or on query drift); the others reuse its top keys"
    kv_memory = "none (full cache; recycle steps read only the recycled rows)"
    calibration = "no"
    paper = "[Recycled Attention](https://arxiv.org/abs/2411.05787)"
    needs_cache_state = True

    budget: int | float = param(2048, "budget")
    stride: int = param(16, "int", ge=1)
    similarity: float | None = param(None, "float", ge=-1.0, le=1.0, optional=True)
    n_sink: int = param(0, "int", ge=0)
    n_local: int = param(0, "int", ge=0)
    gqa_reduce: str = param("max", "choice", choices=("first",) + GQA_REDUCTIONS)
    pool_kernel: int = param(15, "int", ge=1)  # (no longer `added`: its default changed)

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget < self.n_sink + self.n_local:
            raise ValueError(
                f"recycled_attention: budget ({self.budget}) must hold n_sink + n_local ({self.n_sink} + {self.n_local})"
            )

    @classmethod
    def at_full_budget(cls) -> "RecycledAttention":
        return cls(budget=1.0, stride=4)

    @classmethod
    def at_sparse_budget(cls) -> "RecycledAttention":
        return cls(budget=6, stride=3, n_sink=1, n_local=1)

    # ---- one call ---------------------------------------------------------------------------------
    def forward(self, call) -> torch.Tensor:
        layer = call.require_cache(self.name) if call.kind == "decode" else None
        if layer is None:  # prefill / chunk (a new schedule starts), or no cache to recycle from
            st = getattr(call.cache_layer, "states", {}).get(_STATE)
            if st is not None:
                st.clear()
            return call.dense()
        st = layer.state(_STATE, RecycledSet)
        full = self._full_rows(call, st)  # (B,) bool, or True / False for every row
        if full is False:
            call.session.count("recycle_steps")
            st.steps += 1
            with call.session.selecting():
                sel = self._recycled(call, st)
            return execute(call, sel, impl="fast")
        out, probs = call.dense_with_probs()
        record_dense(call)
        call.session.count("full_steps")
        old = None if full is True else (st.top, st.valid, st.hi, st.fingerprint)
        recycled = None if full is True else execute(call, self._recycled(call, st), impl="fast")
        with call.session.selecting():
            self._refresh(call, st, probs)
        if full is True:
            return out
        # rows whose query did not drift keep their set and recycle; the others take the full step
        call.session.count("partial_full_steps")
        self._merge(st, full, *old)
        return torch.where(full[:, None, None, None], out, recycled)

    def _full_rows(self, call, st: RecycledSet):
        if st.hi is None or st.hi.shape[0] != call.batch or st.steps + 1 >= self.stride:
            return True
        if self.similarity is None:
            return False
        fp = call.query[:, :, -1].flatten(1).float()
        drift = F.cosine_similarity(fp, st.fingerprint, dim=-1) < self.similarity  # (B,)
        if bool(drift.all()):
            return True
        return drift if bool(drift.any()) else False

    def _refresh(self, call, st: RecycledSet, probs: torch.Tensor) -> None:
        """A full step: rank the candidates by this pass's probabilities, keep the top per KV head."""
        plan = KeyPlan(call, n_sink=self.n_sink, window=self.n_local)
        n_top, host = row_budgets(call, self.budget, -self.n_sink - self.n_local)  # host counts where known
        st.clear()
        dev = call.query.device
        st.fingerprint = call.query[:, :, -1].flatten(1).float()
        if plan.covers(n_top if host is None else host):  # every key: an empty set and every row from 0 on
            st.top = torch.empty(call.batch, call.n_kv_heads, 0, dtype=torch.long, device=dev)
            st.hi = torch.zeros(call.batch, dtype=torch.long, device=dev)
            st.covered, st.hi_host = True, 0
            return
        st.hi = torch.full((call.batch,), plan.hi, dtype=torch.long, device=dev)
        st.lo, st.hi_host = plan.lo, plan.hi
        st.taken = plan.host_counts(n_top if host is None else host)
        p = probs[:, :, -1]  # (B, Hq, Lk)
        if self.gqa_reduce == "first":
            weights = p.view(call.batch, call.n_kv_heads, call.group, -1)[:, :, 0]
        else:
            weights = aggregate_gqa(p, call.n_kv_heads, self.gqa_reduce)
        if self.pool_kernel > 1:  # neighbours of a key the step attends to (the rest of a span) rank with it
            weights = pool1d(weights, self.pool_kernel, "max")
        st.top, st.valid = plan.top(weights[..., plan.lo : plan.hi], n_top, host)

    @staticmethod
    def _merge(st: RecycledSet, full, top, valid, hi, fp) -> None:
        """Rows not in ``full`` get their previous set back (the new one is padded to a common width)."""
        k = max(top.shape[-1], st.top.shape[-1])

        def widen(t, v):
            pad = k - t.shape[-1]
            v = torch.ones_like(t, dtype=torch.bool) if v is None else v
            if pad:
                t = torch.cat([t, t.new_zeros(*t.shape[:-1], pad)], -1)
                v = torch.cat([v, v.new_zeros(*v.shape[:-1], pad)], -1)
            return t, v

        new_top, new_valid = widen(st.top, st.valid)
        old_top, old_valid = widen(top, valid)
        rows = full[:, None, None]
        st.top = torch.where(rows, new_top, old_top)
        st.valid = torch.where(rows, new_valid, old_valid)
        st.hi = torch.where(full, st.hi, hi)
        st.fingerprint = torch.where(full[:, None], st.fingerprint, fp)
        st.steps = 0
        st.covered, st.hi_host, st.taken = False, None, None  # rows now differ: read from the device

    def _recycled(self, call, st: RecycledSet) -> Selection:
        """The recycled set plus every row written since the full step (and the sinks)."""
        n = call.k_len
        if st.covered:  # the budget covered the context at the full step
            return everything(call, "keys")
        if st.hi_host is not None:  # one full step for every row: sinks + rows since then kept, as a plan sees it
            plan = KeyPlan(call, n_sink=self.n_sink, window=n - st.hi_host)
            return plan.selection(st.top, st.valid, "keys", taken=st.taken)
        hi = st.hi
        if not bool(hi.any()):  # every row's budget covered the context at its full step
            return everything(call, "keys")
        same_hi = bool((hi == hi[0]).all())
        if call.key_valid is None and same_hi and st.valid is None:
            return Selection.keys(st.top, None, prefix=st.lo, suffix=n - int(hi[0]))
        # padded rows, or rows refreshed at different steps: one mask per row
        pos = torch.arange(n, device=call.query.device)
        keep = mask_from_indices(st.top, n, st.valid)  # (B, Hkv, n)
        keep |= (pos[None, :] >= hi[:, None])[:, None, :]
        if self.n_sink:
            keep |= ((call.key_rank <= self.n_sink) & (call.key_rank > 0))[:, None, :]
        if call.key_valid is not None:
            keep &= call.key_valid[:, None, :]
        idx, valid = indices_from_mask(keep)
        return Selection.keys(idx, None if bool(valid.all()) else valid)


_STATE = "recycled_attention"
