"""TokenSelect: per-step token selection over a full KV cache by a softmax "soft vote" of the heads.

Based on Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for
LLMs via Dynamic Token-Level KV Cache Selection", EMNLP 2025, https://arxiv.org/abs/2411.02886
(official code: github.com/pzs19/TokenSelect, ``patcher/token_retrieval.py``).

For each decode step (or each chunk of at most ``n_local`` queries on a filled cache) and each
layer: the query fingerprint (mean over the chunk's queries) scores every candidate key
``[n_sink, L - n_local)`` per head, each head's scores go through a softmax over the candidates,
and the heads' probabilities are summed (the soft vote: every head has one unit of vote, so a few
heads with sharp preferences cannot be drowned out by raw logit magnitudes). Optional max-pooling
widens the picks to neighbours; the top ``k`` candidates plus the ``n_sink`` first and ``n_local``
last tokens form one index set per layer (or per KV head). Attention then reads only those rows
with a flat ``index_select`` and SDPA. The cache keeps every token: this saves compute and
bandwidth, not memory.

The *Selection Cache* reuses the previous step's top-k set (and its gathered rows) when the cosine
similarity of consecutive query fingerprints is at least ``reuse_threshold``; hits and misses are counted in
``session.stats`` (``reuse`` / ``select``).

Parameters
----------
budget: int | float = 2688
    Tokens attended per step, sinks and local window included (official: 128 + 512 + 2048).
    A float in (0, 1] is a share of the current context length (each row's real tokens). Where a
    share resolves below ``n_sink + n_local`` (short contexts: e.g. 0.25 below 2,560 tokens with
    the default 128 + 512), the step attends to everything, i.e. runs dense, and
    ``session.stats["dense_short"]`` counts it; sinks and window are never shrunk.
n_sink: int = 128
    First tokens always attended.
n_local: int = 512
    Last tokens always attended; also the largest chunk handled sparsely (longer chunks, and the
    one-shot prefill of an empty cache, run dense).
pool_kernel: int = 0
    Max-pool kernel over the voted scores (official per task: passkey 6, kv_retrieval 32; 0 = off).
logit_scale: float | None = 1.0
    Multiplier of q·k before the per-head softmax. Official: 1.0 (raw dot products, no 1/sqrt(D),
    a sharper vote). ``None`` uses the attention scale 1/sqrt(D).
select_per: str = "layer"
    ``"layer"`` (official: one set for all heads, vote summed over every head) or ``"kv_head"``
    (one set per KV head, vote summed over its query group).
reuse_threshold: float | None = None
    Selection Cache threshold θ on cosine similarity (paper: 0.9; off in the official release).
shadow: str | None = None
    Beyond the paper: score with a low-precision copy of K the cache keeps (``bf16`` or ``int8``,
    :mod:`tokensparse.engine.shadow`) instead of the keys themselves (the vote reads all of K each
    step); attention still reads the full-precision rows.
impl: str = "fast"
    ``"fast"``: in decode, one softmax over cache views of the sinks and local window plus the
    gathered top-k rows (:func:`~tokensparse.engine.executors.segments_attend`); chunks and padded
    batches use a flat ``index_select`` + SDPA. ``"reference"``: dense attention under a key mask.

Deviations: keys are scored post-RoPE at their true positions (the transformers cache stores
post-RoPE keys) instead of the official pre-RoPE keys re-rotated at positions inside the selected
list, so there is no length extrapolation beyond the trained context; query heads map to KV heads
as ``h // G`` (the official kernel uses ``h % Hkv``, see the spec); q·k of the vote runs in the
cache dtype and its softmax in fp32 (official: all bf16); batches are supported (one set per sequence, padding never selected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything, row_budgets
from ..engine.selection import Selection, grouped_dot, pool1d
from ..engine.shadow import SHADOW_DTYPES, ShadowKeys, quantize_rows, shadow_logits, shadow_of


@dataclass(eq=False)
class TokenSelect(Method):
    name = "token_select"
    phase = Phase.DECODE
    dense_prefill = True
    schedule = "each decode step and cache chunk"
    kv_memory = "none (full cache; reads only selected rows)"
    calibration = "no"
    paper = "[TokenSelect](https://arxiv.org/abs/2411.02886)"

    budget: int | float = param(2688, "budget")
    n_sink: int = param(128, "int", ge=0)
    n_local: int = param(512, "int", ge=1)  # the current token is always attended
    pool_kernel: int = param(0, "int", ge=0)
    logit_scale: float | None = param(1.0, "float", gt=0.0, optional=True)
    select_per: str = param("layer", "choice", choices=("layer", "kv_head"))
    reuse_threshold: float | None = param(None, "float", ge=-1.0, le=1.0, optional=True)  # a cosine similarity
    impl: str = param("fast", "choice", choices=("fast", "reference"))
    shadow: str | None = param(None, "choice", choices=SHADOW_DTYPES, optional=True, added=True)

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget <= self.n_sink + self.n_local:
            raise ValueError(
                f"token_select: budget ({self.budget}) must exceed n_sink + n_local ({self.n_sink} + {self.n_local}) "
                "to leave room for top-k tokens"
            )

    @classmethod
    def at_full_budget(cls) -> "TokenSelect":
        return cls(budget=1.0, n_sink=2, n_local=4)

    @classmethod
    def at_sparse_budget(cls) -> "Method":
        return cls(budget=12, n_sink=2, n_local=4, pool_kernel=3)

    # ---- selection -------------------------------------------------------------------------------
    def _vote(self, call, q_fp: torch.Tensor, lo: int, hi: int, cand: torch.Tensor | None = None) -> torch.Tensor:
        """Soft vote over candidate keys ``[lo, hi)``: ``(B, 1 | Hkv, hi - lo)``.

        ``cand (B, hi - lo)``: which of those keys are candidates (padded batches); the others take
        no part in the per-head softmax and get vote -1 after pooling (votes are >= 0, so a pooled
        neighbour outside the candidates changes nothing, as at the ends of an unpadded range).
        """
        k = call.key[:, :, lo:hi]
        b, hq, d = q_fp.shape
        hkv, g = call.n_kv_heads, call.group
        scale = call.scale if self.logit_scale is None else self.logit_scale
        q = (q_fp.float() * scale).view(b, hkv, g, d)
        if self.shadow is not None and call.cache_layer is not None and call.key_valid is None:
            logits = shadow_logits(q, shadow_of(call, self.shadow))[..., lo:hi]  # the cache's low-precision copy
        elif self.shadow is not None:  # padded rows: the same per-row quantisation on the fly (a row votes as alone)
            tmp = ShadowKeys(self.shadow)
            tmp.keys, tmp.scale = (k.to(torch.bfloat16), None) if self.shadow == "bf16" else quantize_rows(k)
            tmp.n = k.shape[2]
            logits = shadow_logits(q, tmp)
        else:
            logits = grouped_dot(q.to(k.dtype), k).float()  # (B, Hkv, G, C), in the cache dtype
        if cand is not None:
            logits = logits.masked_fill(~cand[:, None, None, :], torch.finfo(torch.float32).min)
        p = logits.softmax(-1)
        vote = p.sum(2) if self.select_per == "kv_head" else p.sum((1, 2)).unsqueeze(1)
        if self.pool_kernel > 1:
            vote = pool1d(vote, self.pool_kernel, "max")
        if cand is not None:
            vote = vote.masked_fill(~cand[:, None, :], -1.0)
        return vote

    def key_scores(self, call) -> torch.Tensor | None:
        """As a scorer: the soft vote over every key of the call (``(B, 1 | Hkv, Lk)``; padding
        ``-inf``). Sinks, window, budget and the Selection Cache belong to TokenSelect's own
        selection and are not applied here."""
        vote = self._vote(call, call.query.mean(2), 0, call.k_len, call.key_valid)
        if call.key_valid is not None:
            vote = vote.masked_fill(~call.key_valid[:, None, :], float("-inf"))
        return vote

    def _cached(self, call, key: tuple, fresh):
        """``fresh()`` (a tuple of ``(B, …)`` tensors), or the previous choice from the Selection Cache.

        Reuse is decided per sequence (cosine similarity of its query fingerprint with the one its
        selection was made for); a fresh selection is computed when any row misses, and rows that
        hit keep their previous choice, so a row of a batch selects as it would alone. Deciding
        whether to skip the vote reads the similarity on the host: one synchronisation per layer
        and step when ``reuse_threshold`` is set (the documented allowance of this option).
        """
        thr = self.reuse_threshold
        session = call.session
        if thr is None:
            session.count("select")
            return fresh()
        scratch = call.layer.scratch
        fp = call.query.mean(2).flatten(1).float()  # (B, Hq·D): the chunk's query fingerprint
        hit = None
        if scratch.get("key") == key:
            hit = F.cosine_similarity(fp, scratch["fingerprint"], dim=-1) >= thr  # (B,)
            if bool(hit.all()):
                session.count("reuse")
                return scratch["sel"]
        session.count("select")
        sel = fresh()
        if hit is not None:  # rows that hit keep their choice (branch-free: no second read of `hit`)
            sel = tuple(None if new is None else torch.where(hit.view(-1, *([1] * (new.dim() - 1))), old, new)
                        for old, new in zip(scratch["sel"], sel))
            fp = torch.where(hit[:, None], scratch["fingerprint"], fp)
        scratch.update(fingerprint=fp, sel=sel, key=key)
        return sel

    def select(self, call) -> Selection | None:
        if call.kind == "prefill":
            call.layer.scratch.clear()  # a new sequence: forget the selection cache
            return None
        if call.q_len > self.n_local:
            call.session.count("dense_chunks")
            return None
        plan = KeyPlan(call, n_sink=self.n_sink, window=self.n_local)
        fixed = self.n_sink + self.n_local
        budget, host = row_budgets(call, self.budget)
        if host is not None:  # every count on the host: this step never waits for the device
            short = [b < fixed for b in host]
            any_short = any(short)
            host = [c if sh else b - fixed for b, sh, c in zip(host, short, plan.host_cand)]
        else:
            any_short = bool((budget < fixed).any())
        if any_short:  # a share too small for sinks + window: that row attends to all
            call.session.count("dense_short")
        if isinstance(budget, int) and host is not None and len(set(host)) == 1:
            n_top = host[0]
        else:
            if isinstance(budget, int):  # built on the device (a tensor from a Python number is a host→device copy)
                budget = torch.full((call.batch, 1), budget, dtype=torch.long, device=call.query.device)
            n_top = torch.where(budget < fixed, plan.n_cand, budget - fixed)  # the device twin of `host`
        if plan.covers(n_top if host is None else host):
            return everything(call, "keys")
        counts = plan.host_counts(n_top if host is None else host)
        if counts is None:
            n_top = plan.counts(n_top)
            none_taken = not bool((n_top > 0).any())
        else:
            none_taken = not any(counts)
        if none_taken:  # the budget holds exactly the sinks and the window
            return plan.selection(None, None, "keys", heads=call.n_kv_heads if self.select_per == "kv_head" else 1)
        q_fp = call.query.mean(2)  # (B, Hq, D)
        if plan.padded:  # votes over the whole row (as unpadded rows see it), candidates only
            cand = torch.zeros_like(call.key_valid)
            cand[:, : plan.hi] = plan.cand_mask

            def fresh():
                return plan.top(self._vote(call, q_fp, 0, call.k_len, cand)[..., : plan.hi], n_top, counts)

            key = ("rows", tuple(counts if counts is not None else plan.counts(n_top).flatten().tolist()))
        else:

            def fresh():
                return plan.top(self._vote(call, q_fp, plan.lo, plan.hi), n_top, counts)

            key = ("range", max(counts) if counts is not None else int(plan.counts(n_top).max()), plan.lo)
        top, top_valid = self._cached(call, key, fresh)
        return plan.selection(top, top_valid, "keys", taken=counts)
