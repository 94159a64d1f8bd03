"""Landmark-style block retrieval, training-free: one representative key per block of the cache;
the query attends to the representatives, the top blocks per KV head are attended exactly.

After Mohtashami and Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers", NeurIPS 2023, https://arxiv.org/abs/2305.16300 (official code:
github.com/epfml/landmark-attention).

The paper inserts a *trained* landmark token after every block of the input; the attention a query
gives a block's landmark gates the block, and at inference the top-k blocks per head are retrieved
and attended exactly. This training-free version has no landmark tokens: each block's
representative is computed from its keys and kept by the cache on write
(:class:`~tokensparse.engine.cache.PageSummary`): the **mean key** (``representative="mean"``, the
direction a block's keys share; a decode step updates only the block it lands in) or the key of
**largest norm** (``"max_norm"``). At a decode step each query head takes a softmax over the
representatives (scaled like attention logits), the query heads of a KV head are combined by
``gqa_reduce``, and the top ``budget // block`` blocks per KV head (the current, partial block
always added) are attended exactly. Scoring reads ``D`` numbers per block (``1/block`` of K).

Parameters
----------
budget: int | float = 1024
    Tokens attended per decode step, rounded up to whole blocks, at least 2 blocks (the current one
    included); a float in (0, 1] is a share of each row's real tokens.
block: int = 4
    Tokens per block (the paper uses 50 with one landmark token each). Finer blocks rank better
    and read more of K to score (``1/block``): on SmolLM2's v2 suite (2K half, 35 samples,
    docs/results/decode_suite/) 32 loses 24 points, 16 17, 8 7.9, 4 4.0 (within noise on accuracy);
    at 4K (21 other samples) 32 loses 26 points, 4 is within noise (+1.2 points, −0.41 nats). The
    default is 4 since 2026-12-06 (before: 32), the one size that keeps the answers: at 8K it
    decodes at 1.28× dense against 1.42× for blocks of 32 (docs/results/decode_defaults/); 32 is
    the fast setting for contexts where a few lost answers are acceptable.
representative: str = "mean"
    The block's key that stands in for its landmark: ``mean`` or ``max_norm``.
dense_layers: int = 0
    The first layers run dense.
coarse: int | None = None
    Beyond the paper: blocks per *coarse* block (at least 2) for a two-level search
    (:func:`~tokensparse.engine.pages.page_select_coarse`): the query first attends to the
    representatives of coarse blocks of ``coarse · block`` tokens (same ``representative``; the
    cache keeps them too, ``D`` per coarse block), keeps the top coarse blocks holding ``widen`` ×
    the blocks it needs, and ranks only the blocks inside them (a softmax over those candidates)
    plus the blocks after the last full coarse block. Scoring then reads ``1/(coarse · block)`` of
    K plus the candidates' representatives instead of ``1/block``: at 32K with blocks of 4,
    ``coarse=8`` and the default budget, 6 % of K instead of 25 %. The same search as one level
    when the candidates cover the context (about ``widen · budget`` tokens: 4K at the defaults).
    ``None``: one level (the default). Measured with blocks of 4 (docs/results/landmark_two_level/):
    ``coarse=8`` decodes at 3.31× dense at 32K against 2.97× for one level (selection 26 % of the
    step against 34 %), but is slower at 8K (1.04× against 1.12×) and loses 1.7 nats more answer
    log-likelihood on the v2 suite's 8K samples (−2.94 against −1.21; accuracy within noise for
    both): a coarse block's mean hides a single relevant key.
widen: float = 4.0
    With ``coarse``: candidate blocks as a multiple of the blocks attended (at least 1).
summary_dtype: str | None = None
    Beyond the paper: keep the representatives in ``bfloat16`` or ``float16`` (``None``: the cache
    dtype) and score them in that dtype: half the bytes the scorer reads. The query (scaled) is
    rounded to it too, the product runs on the low-precision kernel (the cache keeps these means
    token-major, one contiguous matrix per row), the softmax in fp32; rounded logits tie more
    often (the top-k breaks ties by position). Measured on an AMX Xeon (docs/results/landmark_bf16/):
    the same answers as fp32 means on the v2 suite's 4K and 8K samples (−0.10 nats), 2.97× dense
    at 32K against 2.76× (selection 29 % of the step against 32 %), but slower at 8K (1.18×
    against 1.21×) and with ``coarse``; not measured on CPUs without bf16 instructions.
gqa_reduce: str = "max"
    How a KV head's query group combines its softmax over the blocks: ``max``, ``mean`` or ``sum``.

As a scorer (:meth:`Landmark.key_scores`, TidalDecode's ``scorer="landmark"``) every block is
scored at one level: a scorer gives every key a score.

Deviations: no trained landmark tokens (representatives computed from the keys, above); the
paper's grouped softmax, in which the landmark's weight multiplies the in-block attention, is
replaced by exact attention over the retrieved blocks (the paper's own inference mode for long
inputs); one block set per KV head (the paper retrieves per head: here the query group shares it,
so each chosen block is read once per KV head). The prefill and chunks run dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import at_default, param
from ..engine.method import Method, Phase
from ..engine.pages import page_select, page_select_coarse, page_token_scores
from ..engine.selection import GQA_REDUCTIONS, Selection, aggregate_gqa, resolve_budget, select_topk


@dataclass(eq=False)
class Landmark(Method):
    name = "landmark"
    phase = Phase.DECODE
    dense_prefill = True
    schedule = "every decode step, layers from dense_layers"
    kv_memory = "full cache (+D per block and KV head, in `summary_dtype`; + D per coarse block with `coarse`)"
    calibration = "no (the paper trains landmark tokens; here: mean or max-norm key per block)"
    paper = "[Landmark Attention](https://arxiv.org/abs/2305.16300)"
    needs_cache_state = True

    budget: int | float = param(1024, "budget")
    block: int = param(4, "int", ge=1)
    representative: str = param("mean", "choice", choices=("mean", "max_norm"))
    dense_layers: int = param(0, "int", ge=0)
    gqa_reduce: str = param("max", "choice", choices=GQA_REDUCTIONS)
    coarse: int | None = param(None, "int", ge=2, optional=True, added=True)
    widen: float = param(4.0, "float", ge=1.0, added=True)
    summary_dtype: str | None = param(None, "choice", choices=("bfloat16", "float16"), optional=True, added=True)

    def validate(self) -> None:
        if not at_default(self, "widen") and self.coarse is None:
            raise ValueError(f"landmark: widen ({self.widen}) only applies with coarse blocks (coarse=None)")

    @classmethod
    def at_full_budget(cls) -> "Landmark":
        return cls(budget=1.0, block=4)

    @classmethod
    def at_sparse_budget(cls) -> "Landmark":
        return cls(budget=8, block=2)

    def n_blocks(self, n_real: int) -> int:
        """Blocks attended for a context of ``n_real`` real tokens (the current one included)."""
        return max(2, -(-resolve_budget(self.budget, n_real) // self.block))

    def select(self, call) -> Selection | None:
        if call.kind != "decode" or call.layer_idx < self.dense_layers:
            return None
        layer = call.require_cache(self.name)
        if layer is None:  # no cache (use_cache=False): nothing to decode against
            return None
        if self.coarse is not None:
            return page_select_coarse(call, self.block, self.n_blocks, self.representative,
                                      lambda q, parts: self.block_weights(q, parts[0], call.scale), "landmark",
                                      self.coarse * self.block, self.widen, layer, self._dtype)
        return page_select(call, self.block, self.n_blocks, self.representative,
                           lambda q, parts, k: self.top_blocks(q, parts[0], k, call.scale), "landmark", layer,
                           self._dtype)

    @property
    def _dtype(self) -> torch.dtype | None:
        return None if self.summary_dtype is None else getattr(torch, self.summary_dtype)

    def key_scores(self, call) -> torch.Tensor | None:
        """As a scorer: each key scored by its block's weight (``(B, Hkv, Lk)``; decode calls)."""
        layer = call.require_cache(self.name)
        if layer is None:
            return None
        return page_token_scores(call, self.block, self.representative,
                                 lambda q, parts: self.block_weights(q, parts[0], call.scale), layer, self._dtype)

    def block_weights(self, q: torch.Tensor, reps: torch.Tensor, scale: float) -> torch.Tensor:
        """``(B, Hkv, P)``: the attention the query heads of each KV head give the representatives
        ``reps (B, Hkv, P, D)`` (softmax per query head over them, combined by ``gqa_reduce``).
        With ``summary_dtype`` the logits are the product of the representatives and the scaled
        query rounded to their dtype, computed in it (fp32 accumulation, rounded output), then made
        fp32; see :meth:`low_precision_logits`."""
        b, hq, _, d = q.shape
        hkv = reps.shape[1]
        qg = q.float().reshape(b, hkv, hq // hkv, d)
        if self.summary_dtype is None:
            logits = qg @ reps.float().transpose(-1, -2) * scale
        else:
            logits = self.low_precision_logits((qg * scale).to(reps.dtype), reps)
        p = logits.softmax(-1)  # (B, Hkv, G, P)
        return aggregate_gqa(p.flatten(1, 2), hkv, self.gqa_reduce)

    @staticmethod
    def low_precision_logits(qg: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, P)`` fp32 logits of ``qg (B, Hkv, G, D)`` against ``reps (B, Hkv, P, D)``,
        both in one low-precision dtype, computed in it (fp32 accumulation, rounded output). The
        cache's token-major summaries (each row's ``reps[i].transpose(0, 1)`` one contiguous
        ``(P, Hkv·D)`` matrix) take one product per row with a block-diagonal ``(Hkv·D, Hkv·G)``
        query matrix, so the CPU's bf16 kernel reads them once, in place (the zero blocks add exact
        zeros); other layouts (gathered candidates) one product per KV head."""
        b, hkv, g, d = qg.shape
        rows = reps.transpose(1, 2)  # (B, P, Hkv, D)
        if rows.shape[1] and rows[0].is_contiguous():
            eye = torch.eye(hkv, dtype=qg.dtype, device=qg.device)
            w = (qg.transpose(-1, -2)[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, hkv * d, hkv * g)
            out = torch.stack([rows[i].reshape(-1, hkv * d) @ w[i] for i in range(b)])  # (B, P, Hkv·G)
            out = out.view(b, -1, hkv, g).permute(0, 2, 3, 1)
        else:
            out = (reps @ qg.transpose(-1, -2)).transpose(-1, -2)
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def top_blocks(self, q: torch.Tensor, reps: torch.Tensor, k: int, scale: float) -> torch.Tensor:
        """The ``k`` blocks ``(B, Hkv, k)`` (ascending) with the largest :meth:`block_weights`."""
        top, _ = select_topk(self.block_weights(q, reps, scale), k)
        return top
