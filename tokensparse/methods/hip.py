"""HiP: hierarchically pruned attention — a tree search picks each query block's key blocks.

Based on Lee, Park, Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
Attention Pruning" (v2: "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
with HiP"), https://arxiv.org/abs/2406.09827 (official code: github.com/DeepAuto-AI/hip-attention,
the numba draft ``hip_attn_legacy/v1_1/attention2_draft.py`` and ``HiPAttentionArgs``).

For each query block of ``block`` rows and each head, the candidate key blocks lie between the
first ``n_sink`` tokens and the local ``window`` (both always attended). ``K = budget / block``
nodes are spread evenly over the candidates; then, while a node spans more than one key block,
every node is split in two halves, each half is scored by its *representative* — ``rep_keys``
keys at its centre (the paper's ``sampling_method="center"``) — as the maximum of ``q·k`` over
every ``stride_q``-th query of the block and those keys, and the best ``K`` halves survive. After
about ``log2(candidates / K)`` rounds each node is one key block; the query block then attends
(block-sparse, causal inside the diagonal block) to its sinks, its window and those ``K`` blocks.
A query block whose candidates number ``K`` or fewer takes them all.

Parameters
----------
budget: int | float = 512
    Selected tokens per query block (the paper's ``mask_k``), rounded up to whole blocks; a float
    in (0, 1] is a share of the prompt's real tokens.
block: int = 64
    Query and key block size (the paper's ``block_size_q``; see the deviations for keys).
n_sink: int = 64
    First tokens every query block reads (rounded up to whole blocks).
window: int = 128
    Most recent tokens every query block reads, diagonal block included (rounded up to blocks).
stride_q: int = 4
    Every ``stride_q``-th query of a block scores the representatives (``block_stride_q``).
rep_keys: int = 8
    Keys per representative, centred in the node's central key block.
dense_layers: int = 3
    The first layers run dense (the official evaluation arguments' ``dense_layers``).
dense_tail: int = 128
    The query blocks holding the prompt's last ``dense_tail`` tokens read every earlier block
    (not in the paper; see the deviations).
select_per: str = "kv_head"
    ``"kv_head"`` (the query heads of a KV head share one choice, scored by their maximum; see the
    deviations) or ``"query_head"`` (the paper: every query head its own blocks).
impl: str = "auto"
    Block executor: ``"auto"`` (the CPU flash kernel ``"sdpa"`` on CPU, compiled FlexAttention
    elsewhere), ``"sdpa"``, ``"flex"``, ``"gather"``, ``"reference"`` (see
    :mod:`tokensparse.engine.blocks`).

Deviations. ``dense_tail``: the last query blocks of the prompt attend densely. On SmolLM2 the
first generated token comes from the prompt's last position, and with only the tree's blocks
that position lost the pass key at 4K (2/9 at the paper's k = 512; an oracle choosing blocks by
their exact maximum logit also failed 3/3 probes, by exact attention mass 2/3), while the same
configuration with the last 256 tokens dense retrieved 3/3, and with the last 256 or 128 tokens
dense 9/9 (within 0.09 / 0.10 nats of dense; ``docs/results/hip/``). 128 is the default: at 8K
the attention-only speed-up is 2.57× against 2.46× with 256 (same run). Costs ``dense_tail × L``
more pairs, linear in ``L``. The paper's key blocks are 2 tokens (``block_size_k = 2``) for a Triton kernel on a
GPU; the CPU's block-sparse kernel (inductor's FlexAttention template) wants blocks of tens of
keys, so here the *attention* granularity is ``block`` keys and the tree's representative is
``rep_keys`` keys at the centre of a node's central block (for a node of one block: the centre of
that block) — a coarser mask with the same search. Prefill only: decode steps and chunks on a
cache run dense (the paper also sparsifies decoding with a periodically refreshed mask; not
built). ``select_per="kv_head"`` by default: the query heads sharing a KV head share one choice
(scored by their maximum), so the executor gathers each chosen key block once per KV head instead
of once per query head; the paper's per-query-head choice is ``select_per="query_head"`` (same
pass key result at 4K, slower on the CPU). Sinks and window are counted in tokens and rounded to blocks. Padded batches choose per
row on its real tokens (the block grid starts at each row's first real token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.blocks import n_blocks, prefill_blocksets
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.selection import resolve_budget, select_topk


@dataclass(eq=False)
class HiP(Method):
    name = "hip"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[HiP](https://arxiv.org/abs/2406.09827)"
    block_router = True

    budget: int | float = param(512, "budget")
    block: int = param(64, "int", ge=1)
    n_sink: int = param(64, "int", ge=0)
    window: int = param(128, "int", ge=1)
    stride_q: int = param(4, "int", ge=1)
    rep_keys: int = param(8, "int", ge=1)
    dense_layers: int = param(3, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    select_per: str = param("kv_head", "choice", choices=("query_head", "kv_head"))
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    @classmethod
    def at_full_budget(cls) -> "HiP":
        return cls(budget=1 << 40, block=8, n_sink=8, window=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "HiP":
        return cls(budget=8, block=4, n_sink=4, window=4, stride_q=2, rep_keys=2, dense_layers=0, dense_tail=0)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        h = call.n_q_heads if self.select_per == "query_head" else call.n_kv_heads
        return prefill_blocksets(call, h, self.block, lambda q, k: self.blockset(q, k, call.layer_idx))

    def blockset(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int):
        """The key blocks each query block of an unpadded prompt ``q``, ``k`` reads in layer
        ``layer_idx`` (``None`` in the first ``dense_layers``), the block-router entry point
        (:meth:`~tokensparse.engine.method.Method.blockset`): what :meth:`select` chooses per prompt,
        and what another method's kept rows get as its ``inner``."""
        if layer_idx < self.dense_layers:
            return None
        return self.choose(q, k)

    def choose(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The key blocks ``(B, H, nb, nb)`` bool each query block reads on unpadded ``q, k`` of one
        prefill (``H``: query or KV heads by ``select_per``), and whether that is every block."""
        b, hq, length, d = q.shape
        hkv, g, bs, dev = k.shape[1], hq // k.shape[1], self.block, q.device
        nb = n_blocks(length, bs)
        n_keep = min(nb, n_blocks(resolve_budget(self.budget, length), bs))
        sink, win = n_blocks(self.n_sink, bs), n_blocks(self.window, bs)
        i = torch.arange(nb, device=dev)
        hi = (i - win + 1).clamp_min(sink)  # candidates [sink, hi) of query block i
        n_cand = (hi - sink).clamp_min(0)
        tail = i >= (length - self.dense_tail) // bs if self.dense_tail else torch.zeros_like(i, dtype=torch.bool)
        always = (i[None, :] < sink) | (i[None, :] > i[:, None] - win) | tail[:, None]  # (nb, nb)
        blockset = always & (i[None, :] <= i[:, None])
        h = hq if self.select_per == "query_head" else hkv
        n_cand = n_cand.masked_fill(tail, 0)  # the tail reads everything already
        if int(n_cand.max()) <= n_keep:  # every query block takes all its candidates
            cand = (i[None, :] >= sink) & (i[None, :] < hi[:, None])
            return (blockset | cand).expand(b, h, nb, nb), True
        if n_keep == 0:  # sinks and window only
            return blockset.expand(b, h, nb, nb), False
        table = self.rep_scores(q, k)  # (B, H, nb, nb): query block × key block representative score
        n = torch.arange(n_keep, device=dev)
        start = (sink + n_cand[:, None] * n // n_keep).expand(b, h, nb, n_keep)
        size = ((n_cand[:, None] * (n + 1)) // n_keep - (n_cand[:, None] * n) // n_keep).expand(b, h, nb, n_keep)
        while int(size.max()) > 1:
            left = (size + 1) // 2
            c_start = torch.cat([start, start + left], -1)  # (B, H, nb, 2K): both halves of every node
            c_size = torch.cat([left, size - left], -1)
            centre = (c_start + (c_size - 1).clamp_min(0) // 2).clamp_max(nb - 1)  # each half's central block
            score = table.gather(-1, centre).masked_fill(c_size == 0, float("-inf"))
            best, _ = select_topk(score, n_keep)
            start, size = c_start.gather(-1, best), c_size.gather(-1, best)
        chosen = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(size > 0, start, nb), True)
        return blockset | chosen[..., :nb], False

    def rep_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(B, H, nb, nb)``: for each query block and key block, the max of ``q·k`` over the query
        block's every ``stride_q``-th query and the key block's ``rep_keys`` central keys — the score
        of any tree node whose central block that is (computed once per call, not per round)."""
        b, hq, length, d = q.shape
        hkv, bs, dev = k.shape[1], self.block, q.device
        g, nb = hq // hkv, n_blocks(length, bs)
        i = torch.arange(nb, device=dev)
        rows = (i[:, None] * bs + torch.arange(0, bs, self.stride_q, device=dev)).clamp_max(length - 1)
        reps = (i[:, None] * bs + bs // 2 - self.rep_keys // 2 + torch.arange(self.rep_keys, device=dev))
        keys = k[:, :, reps.clamp(0, length - 1).flatten()].float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, nb·rep)
        r = rows.shape[1]
        per_kv = self.select_per == "kv_head"
        out = torch.full((b, hkv if per_kv else hq, nb, nb), float("-inf"), device=dev)
        step = max(1, (1 << 23) // max(1, b * hq * r * nb * self.rep_keys))
        for c0 in range(0, nb, step):
            c1 = min(nb, c0 + step)  # query blocks [c0, c1) only look at key blocks before c1
            qs = q[:, :, rows[c0:c1].flatten()].float().view(b, hkv, g, -1, d)
            s = (qs @ keys[..., : c1 * self.rep_keys]).view(b, hkv, g, c1 - c0, r, c1, self.rep_keys).amax(-1)
            s = s.amax((2, 4)) if per_kv else s.amax(4).view(b, hq, c1 - c0, c1)  # the scale does not reorder
            out[:, :, c0:c1, :c1] = s
        return out
