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
``session.stats`` (``token_select.reuse`` / ``token_select.select``).

Parameters
----------
budget: int | float = 2688
    Tokens attended per step, sinks and local window included (official: 128 + 512 + 2048).
    A float in (0, 1] is a share of the current context length.
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

from ..engine.executors import gather_attend, gather_rows, segments_attend
from ..engine.selection import grouped_dot, pool1d, resolve_budget, topk_sorted, validate_budget
from ..engine.session import Method, sparse_paths_forced
from ..engine.telemetry import Selection


@dataclass(eq=False)
class TokenSelect(Method):
    name = "token_select"
    phase = "decode (and cache chunks)"
    kv_memory = "none (full cache; reads only selected rows)"
    calibration = "no"
    paper = "[TokenSelect](https://arxiv.org/abs/2411.02886)"

    budget: int | float = 2688
    n_sink: int = 128
    n_local: int = 512
    pool_kernel: int = 0
    logit_scale: float | None = 1.0
    select_per: str = "layer"
    reuse_threshold: float | None = None
    impl: str = "fast"

    def validate(self) -> None:
        validate_budget("budget", self.budget)
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_local < 1:
            raise ValueError(f"n_local must be >= 1 (the current token is always attended), got {self.n_local}")
        if isinstance(self.budget, int) and self.budget <= self.n_sink + self.n_local:
            raise ValueError(
                f"budget ({self.budget}) must exceed n_sink + n_local ({self.n_sink} + {self.n_local}) to leave room for top-k tokens"
            )
        if self.pool_kernel < 0:
            raise ValueError(f"pool_kernel must be >= 0, got {self.pool_kernel}")
        if self.select_per not in ("layer", "kv_head"):
            raise ValueError(f"select_per must be 'layer' or 'kv_head', got {self.select_per!r}")
        if self.reuse_threshold is not None and not -1.0 <= self.reuse_threshold <= 1.0:
            raise ValueError(f"reuse_threshold is a cosine similarity in [-1, 1], got {self.reuse_threshold}")
        if self.impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {self.impl!r}")

    @classmethod
    def at_full_budget(cls) -> "TokenSelect":
        return cls(budget=1.0, n_sink=2, n_local=4)

    # ---- selection -------------------------------------------------------------------------------
    def _vote(self, call, q_fp: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Soft vote over candidate keys ``[lo, hi)``: ``(B, 1 | Hkv, hi - lo)``."""
        k = call.key[:, :, lo:hi]
        b, hq, d = q_fp.shape
        hkv, g = call.n_kv_heads, call.group
        scale = call.scale if self.logit_scale is None else self.logit_scale
        q = (q_fp.float() * scale).view(b, hkv, g, d)
        logits = grouped_dot(q.to(k.dtype), k).float()  # (B, Hkv, G, C), in the cache dtype
        valid = call.key_valid
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, lo:hi], torch.finfo(torch.float32).min)
        p = logits.softmax(-1)
        vote = p.sum(2) if self.select_per == "kv_head" else p.sum((1, 2)).unsqueeze(1)
        if valid is not None:
            vote = vote.masked_fill(~valid[:, None, lo:hi], -1.0)
        return pool1d(vote, self.pool_kernel, "max") if self.pool_kernel > 1 else vote

    def _topk(self, call, n_top: int, lo: int, hi: int) -> torch.Tensor:
        """Top-k indices ``(B, 1 | Hkv, k)``, or the previous ones from the Selection Cache."""
        q_fp = call.query.mean(2)  # (B, Hq, D): the chunk's query fingerprint
        scratch = call.layer.scratch
        thr = self.reuse_threshold
        fp = q_fp.flatten(1).float() if thr is not None else None
        if thr is not None:
            prev = scratch.get("fingerprint")
            if prev is not None and scratch["top"].shape[-1] == n_top and scratch["lo"] == lo and scratch["hi"] <= hi:
                if bool((F.cosine_similarity(fp, prev, dim=-1) >= thr).all()):
                    call.session.stats["token_select.reuse"] += 1
                    return scratch["top"]
        call.session.stats["token_select.select"] += 1
        top = topk_sorted(self._vote(call, q_fp, lo, hi), n_top) + lo
        if thr is not None:
            scratch.update(fingerprint=fp, top=top, lo=lo, hi=hi)
        return top

    @staticmethod
    def _top_rows(call, top: torch.Tensor):
        """K/V rows of ``top`` ``(B, Hkv, k, D)``, gathered once per selection (cache rows never
        change in place, so a reused selection reuses its rows)."""
        scratch = call.layer.scratch
        if scratch.get("rows_of") is not top:
            sel = top.expand(call.batch, call.n_kv_heads, top.shape[-1])
            scratch["rows"] = (gather_rows(call.key, sel), gather_rows(call.value, sel))
            scratch["rows_of"] = top
        return scratch["rows"]

    def forward(self, call) -> torch.Tensor:
        if call.kind == "prefill":
            call.layer.scratch.clear()  # a new sequence: forget the selection cache
            return call.dense()
        length, lq = call.k_len, call.q_len
        forced = sparse_paths_forced()
        if lq > self.n_local:
            call.session.stats["token_select.dense_chunks"] += 1
            return call.dense()
        budget = resolve_budget(self.budget, length)
        n_sink, n_local = min(self.n_sink, length), min(self.n_local, length)
        lo, hi = n_sink, length - n_local
        n_top = min(budget - n_sink - n_local, max(hi - lo, 0))
        if n_top < 0:
            raise ValueError(
                f"token_select: budget resolves to {budget} tokens at context {length}, less than "
                f"n_sink + n_local = {n_sink + n_local}; raise the budget or lower n_sink/n_local"
            )
        if n_top >= hi - lo and not forced:
            return call.dense()  # the budget covers the whole context
        dev = call.query.device
        if n_top > 0:
            top = self._topk(call, n_top, lo, hi)
        else:
            top = torch.empty(call.batch, 1, 0, dtype=torch.long, device=dev)
        heads = top.shape[1]
        # decode of an fp32 model without padding: sinks and the local window are read as views of
        # the cache, only the top-k rows were gathered (and are reused with the selection). Other
        # cases (chunks, padding, bf16/fp16, where SDPA's own rounding is the dense reference) go
        # through index_select + SDPA.
        segmented = self.impl == "fast" and lq == 1 and call.key_valid is None and call.query.dtype == torch.float32
        idx = None
        if call.session.telemetry is not None or not segmented:
            sinks = torch.arange(0, lo, device=dev).expand(call.batch, heads, lo)
            local = torch.arange(hi, length, device=dev).expand(call.batch, heads, length - hi)
            idx = torch.cat([sinks, top, local], dim=-1)  # (B, 1 | Hkv, n), sorted
            call.session.observe(call, Selection.keys(idx))
        if segmented:
            k, v = call.key, call.value
            middle = [self._top_rows(call, top)] if n_top > 0 else []
            segments = [(k[:, :, :lo], v[:, :, :lo])] + middle + [(k[:, :, hi:], v[:, :, hi:])]
            return segments_attend(call.query, segments, call.scale)
        mask = None
        if lq > 1 or call.key_valid is not None:
            qpos = torch.arange(length - lq, length, device=dev)
            mask = (idx[:, :, None, :] <= qpos[None, None, :, None])  # causal inside the local window
            if call.key_valid is not None:
                mask = mask & call.key_valid.gather(1, idx.reshape(call.batch, -1)).view(call.batch, heads, 1, -1)
        return gather_attend(call.query, call.key, call.value, idx, call.scale, mask, impl=self.impl)
