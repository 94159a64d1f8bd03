"""BiFormer-style bi-level routing, 1-D causal: blocks route to the key blocks they attend to.

Based on Zhu, Wang, Ke, Li, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention"
(CVPR 2023), https://arxiv.org/abs/2303.08813 (official code: github.com/rayleizhu/BiFormer,
``ops/bra_legacy.py``). Bi-level routing attention first prunes at the level of regions — the
queries and keys of each region are averaged, the region-to-region affinity ``Q̄ K̄ᵀ`` is computed
and each query region keeps its ``top-k`` key regions — then attends token to token inside the
gathered regions.

Here regions are ``block``-token blocks of the prompt, causal: query block ``i`` routes over key
blocks ``0 … i`` by ``q̄_i · k̄_j`` (the engine's :func:`~tokensparse.engine.blocks.route_blocks`),
always keeping its sink blocks and its local window, and the block-sparse executor attends exactly
inside the chosen blocks (:mod:`tokensparse.engine.blocks`). The same routing runs across ranks in
context-parallel prefill: ``context_parallel(model, sparsity=ts.methods.get("biformer")(...))``
(:mod:`tokensparse.engine.context_parallel`) equals this method in one process.

Parameters
----------
budget: int | float = 0.125
    Key blocks per query block: a float in (0, 1] is a share of the query block's causal blocks
    (``ceil(budget · (i + 1))`` for query block ``i``, so the cost stays a fixed share of dense);
    an int is a token count, rounded up to whole blocks (the paper's fixed ``top-k``). Sinks and
    window count towards it.
block: int = 64
    Region size in tokens (query and key blocks).
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

Deviations. The paper routes 2-D image regions of a vision transformer, non-causally, with a
fixed ``top-k`` and no forced regions; here the regions are 1-D and causal, a query block also
reads its sinks and its local window (a language model's attention is concentrated there: sinks
and recency), and the last ``dense_tail`` tokens read everything — as for HiP on SmolLM2
(``methods/hip.py``), the first generated token comes from the prompt's last position and a
routed last block loses needles that the rest of the prompt never attends to. BiFormer computes
one routing per region from queries and keys averaged over every channel (all heads); here each
KV head routes on its own, scoring a key block by the maximum over the KV head's query heads (the
executor then gathers each chosen block once per KV head). Scores are computed in float64 on the
pooled rows, so one process and context-parallel ranks choose identically. Training-free: the
paper trains the model with this attention; here it is applied to a model trained dense.
Prefill only: decode steps and chunks on a cache run dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.blocks import n_blocks, pool_blocks, prefill_blocksets, route_blocks
from ..engine.config import param
from ..engine.method import Method, Phase


@dataclass(eq=False)
class BiFormer(Method):
    name = "biformer"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[BiFormer](https://arxiv.org/abs/2303.08813)"
    block_router = True

    budget: int | float = param(0.125, "budget")
    block: int = param(64, "int", ge=1)
    n_sink: int = param(64, "int", ge=0)
    window: int = param(128, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    @classmethod
    def at_full_budget(cls) -> "BiFormer":
        return cls(budget=1.0, block=8, n_sink=8, window=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "BiFormer":
        return cls(budget=0.25, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0)

    def route(self, q_pooled: torch.Tensor, k_pooled: torch.Tensor, first_block: int, *, layer_idx: int,
              length: int) -> torch.Tensor | None:
        """The routing of a ``length``-token prompt's query blocks from global block
        ``first_block`` on (``None`` on a dense layer); see
        :func:`~tokensparse.engine.blocks.route_blocks` for the arguments."""
        if layer_idx < self.dense_layers:
            return None
        qi = torch.arange(first_block, first_block + q_pooled.shape[2])
        if isinstance(self.budget, float):
            keep = torch.ceil(self.budget * (qi + 1).double()).long()
        else:
            keep = torch.full_like(qi, n_blocks(self.budget, self.block))
        dense_from = (length - self.dense_tail) // self.block if self.dense_tail else None
        return route_blocks(q_pooled, k_pooled, first_block, keep=keep, sink_blocks=n_blocks(self.n_sink, self.block),
                            local_blocks=n_blocks(self.window, self.block), dense_from=dense_from)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        return prefill_blocksets(call, call.n_kv_heads, self.block, lambda q, k: self.blockset(q, k, call.layer_idx))

    def blockset(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int):
        """The key blocks each query block of an unpadded prompt ``q``, ``k`` reads in layer
        ``layer_idx`` (``None`` in the first ``dense_layers``), the block-router entry point
        (:meth:`~tokensparse.engine.method.Method.blockset`): what :meth:`select` chooses per prompt,
        and what another method's kept rows get as its ``inner``."""
        if layer_idx < self.dense_layers:
            return None
        return self._route_rows(q, k, layer_idx), None

    def _route_rows(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> torch.Tensor:
        length = q.shape[2]
        return self.route(pool_blocks(q, self.block), pool_blocks(k, self.block), 0, layer_idx=layer_idx, length=length)

    def expected_density(self, length: int) -> float:
        """Share of the causal block pairs read at ``length`` tokens in a routed layer (for reports)."""
        nb = n_blocks(length, self.block)
        sink, win = n_blocks(self.n_sink, self.block), n_blocks(self.window, self.block)
        tail = (length - self.dense_tail) // self.block if self.dense_tail else nb
        read = 0
        for i in range(nb):
            forced = len(set(range(min(sink, i + 1))) | set(range(max(0, i - win + 1), i + 1)))
            if i >= tail:
                keep = i + 1
            elif isinstance(self.budget, float):
                keep = math.ceil(self.budget * (i + 1))
            else:
                keep = n_blocks(self.budget, self.block)
            read += min(i + 1, max(keep, forced))
        return read / (nb * (nb + 1) // 2)
