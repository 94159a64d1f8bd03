"""Superlinear multi-step attention, training-free: top-k spans of ≈ √L tokens by pooled-key scores.

Emulates "Superlinear Multi-Step Attention" (concavity-ai, 2026), https://arxiv.org/abs/2601.18401.
In the paper (a modified NVIDIA-Nemotron-3-Nano-30B-A3B hybrid, trained) attention takes two
steps: a *span search* scores ``O(√L)`` candidate contiguous spans with a learned router fed by the
Mamba-2 layers' per-position representatives and keeps the top-k spans per query; *span attention*
then attends token to token inside each selected span, and the spans' outputs are combined by a
learned softmax gating. With spans of ``√L`` tokens and a fixed ``k`` both steps cost
``O(L^{3/2})``.

Training-free version (``/work/shared/methods/prefill.md`` §9). The prompt is cut into spans of
``span_blocks · block`` tokens, ``span_blocks = max(1, round(√L / block))`` (``√L`` rounded to the
engine's block grid; ``span=`` fixes it), laid over each row's real tokens from its first one. A
span's representative is its mean key (:func:`~tokensparse.engine.blocks.pool_blocks`); query
block ``i`` (``block`` tokens) scores each span that ends before its own span by ``q̄_i · k̄_s``,
maximised over the query heads of each KV head, and keeps the ``spans`` best (ties to the earlier
span; a span whose blocks it reads anyway is not a candidate). It also reads its sink blocks, its
local window (its own block included) and the earlier blocks of its own span; the block-sparse
executor then runs **one** exact softmax over the union of everything read
(:mod:`tokensparse.engine.blocks`), instead of per-span attention combined by learned gating.

Parameters
----------
spans: int = 8
    Spans each query block selects (the paper's ``top-k``), on top of its sinks and local window.
span: int | None = None
    Span length in tokens, rounded up to whole blocks; ``None``: ``√L`` rounded to the block grid.
block: int = 64
    Query and key block size (the executor's unit; spans are whole numbers of blocks).
n_sink: int = 64
    First tokens every query block reads (rounded up to whole blocks).
window: int = 128
    Most recent tokens every query block reads, its own block included (rounded up to blocks).
dense_layers: int = 2
    The first layers run dense.
dense_tail: int = 128
    Query blocks holding the prompt's last ``dense_tail`` tokens read every earlier block.
impl: str = "auto"
    Block executor (see :mod:`tokensparse.engine.blocks`).

Deviations. The learned span router (on Mamba-2 representatives) becomes the dot product of the
query block's mean query with the span's mean key; spans are chosen per query *block* of ``block``
tokens and per KV head (shared by its query heads), not per query token and head; candidate spans
are a fixed partition of the prompt rather than the paper's anchored spans (whose anchor stride
and span length were not extracted); the learned softmax gating over span outputs becomes one joint
softmax over the union of the selected spans, the sinks and the local window (so at full budget
the method is dense attention). Sinks, the local window, dense first layers and the dense tail are
not in the paper: as for BiFormer and XAttention on SmolLM2, the first layers and the prompt's last
positions (which produce the first generated token) run dense. Training-free: the paper trains the
model with this attention; here it is applied to a model trained dense. Prefill only: decode steps
and chunks on a cache run dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.blocks import forced_blocks, n_blocks, pool_blocks, prefill_blocksets, spread_blocks, top_blocks
from ..engine.config import param
from ..engine.method import Method, Phase


def span_scores(q: torch.Tensor, k: torch.Tensor, block: int, span_blocks: int) -> torch.Tensor:
    """``(B, Hkv, nb, nS)`` float64: ``q̄_i · k̄_s`` of every query block ``i`` (``block`` tokens) and
    span ``s`` (``span_blocks · block`` tokens, the last one possibly partial) of an unpadded prefill
    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, maximised over the query heads of each KV head."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qp = pool_blocks(q, block)  # (B, Hq, nb, D)
    kp = pool_blocks(k, block * span_blocks)  # (B, Hkv, nS, D)
    return (qp.view(b, hkv, hq // hkv, -1, d) @ kp[:, :, None].transpose(-1, -2)).amax(2)


@dataclass(eq=False)
class Superlinear(Method):
    name = "superlinear"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[Superlinear](https://arxiv.org/abs/2601.18401)"

    spans: int = param(8, "int", ge=1)
    span: int | None = param(None, "int", ge=1, optional=True)
    block: int = param(64, "int", ge=1)
    n_sink: int = param(64, "int", ge=0)
    window: int = param(128, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    @classmethod
    def at_full_budget(cls) -> "Superlinear":
        return cls(spans=1 << 20, span=8, block=8, n_sink=8, window=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "Superlinear":
        return cls(spans=1, span=4, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0)

    def span_blocks(self, length: int) -> int:
        """Blocks per span for a ``length``-token prompt."""
        if self.span is not None:
            return n_blocks(self.span, self.block)
        return max(1, round(math.sqrt(length) / self.block))

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        return prefill_blocksets(call, call.n_kv_heads, self.block, lambda q, k: (self.choose(q, k), None))

    def choose(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The key blocks ``(B, Hkv, nb, nb)`` bool each query block reads on an unpadded prefill."""
        length = q.shape[2]
        nb = n_blocks(length, self.block)
        m = self.span_blocks(length)
        ns = n_blocks(nb, m)
        dev = q.device
        dense_from = (length - self.dense_tail) // self.block if self.dense_tail else None
        causal, forced = forced_blocks(nb, nb, sink_blocks=n_blocks(self.n_sink, self.block),
                                       local_blocks=n_blocks(self.window, self.block), dense_from=dense_from,
                                       device=dev)
        qi = torch.arange(nb, device=dev)[:, None]
        kj = torch.arange(nb, device=dev)[None, :]
        forced = forced | ((kj // m == qi // m) & causal)  # the earlier blocks of the query block's own span
        # a span is a candidate when it ends before the query block's span and holds a block not read anyway
        padded = torch.nn.functional.pad(forced, (0, ns * m - nb), value=True)
        covered = padded.view(nb, ns, m).all(-1)  # (nb, nS)
        before = torch.arange(ns, device=dev)[None, :] < qi // m
        candidates = before & ~covered
        chosen = top_blocks(span_scores(q, k, self.block, m), self.spans, candidates)  # (B, Hkv, nb, nS)
        return (spread_blocks(chosen, m, nb) | forced) & causal  # chosen spans → their key blocks
