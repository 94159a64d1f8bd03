"""MInference's vertical-slash pattern: block-sparse prefill over estimated columns and diagonals.

Based on Jiang, Li, Zhang, Wu, Luo, Ahn, Han, Abdi, Li, Lin, Yang, Qiu, "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention" (NeurIPS 2024),
https://arxiv.org/abs/2407.02490 (official code: github.com/microsoft/MInference,
``minference/modules/minference_forward.py``: ``vertical_and_slash_kernel`` and
``sum_all_diagonal_matrix``; ``minference/ops/pit_sparse_flash_attention_v2.py``).

Estimate. The last ``last_q`` queries of the prompt (64, the official value) attend exactly to
every key (softmax in fp32, causal among themselves, the model's scale). Summing their
probabilities down each key column gives the *vertical* score of every key position; summing
them along each diagonal gives the *slash* score of every offset ``o = query position - key
position`` (``o = 0`` is the main diagonal). Each head keeps its ``vertical`` highest columns and
its ``slash`` highest diagonals; the first ``n_sink`` columns and the ``n_local`` nearest
diagonals (offsets ``0 … n_local - 1``) are always kept and count towards the budgets (the
official kernel forces the first 30 columns and the 100 nearest diagonals and raises the budgets
to at least 30 and 50; here a budget below the forced lines is raised to them). Ties go to the
earlier column and to the nearer diagonal.

Block mapping. The pattern is executed on the engine's square block grid
(:mod:`tokensparse.engine.blocks`, ``block`` tokens, so the CPU flash block executor applies):
query block ``i`` reads key block ``j ≤ i`` when ``j`` holds a kept column, or when a kept
diagonal ``o`` passes through the block pair, i.e. some real query ``q`` of block ``i`` and key
``k = q - o`` of block ``j`` exist (``o`` in ``[(i-j)·block - block + 1, q_last(i) - j·block]``,
``q_last(i)`` the last real query of block ``i``). The main diagonal keeps every diagonal block.
The executor then attends exactly (causally) inside the chosen blocks.

Parameters
----------
vertical: int | float = 0.02
    Kept columns: an int is a count of key positions, a float in (0, 1] a share of the prompt's
    length. The paper's default head pattern is 1000 columns at 128K tokens (0.8 %).
slash: int | float = 0.05
    Kept diagonals, as ``vertical``. The paper's default is 6096 diagonals at 128K (4.7 %); at
    4K tokens that is every diagonal (dense), hence shares by default here.
last_q: int = 64
    Queries (the prompt's last) whose attention estimates the pattern.
n_sink: int = 30
    First columns always kept (the official value).
n_local: int = 100
    Nearest diagonals always kept, the main one included (the official kernel's value).
block: int = 64
    Query and key block size of the executed grid.
dense_layers: int = 2
    The first layers run dense.
dense_tail: int = 128
    Query blocks holding the prompt's last ``dense_tail`` tokens read every earlier block.
select_per: str = "kv_head"
    ``"kv_head"`` (the query heads of a KV head share one pattern: their probabilities are
    summed before ranking) or ``"query_head"`` (the paper: one pattern per attention head).
impl: str = "auto"
    Block executor (see :mod:`tokensparse.engine.blocks`).

Deviations. Block rounding: the official kernel reads kept columns token by token and rounds
only the diagonals to 64-token blocks; here both are rounded to ``block × block`` blocks, so a
single kept column costs its whole key block for every later query block (more keys read than
MInference reads; the block density in the results counts them). ``dense_tail`` and
``dense_layers`` are not in the paper (its ``starting_layer`` is 0): as for XAttention, HiP and
BiFormer on SmolLM2 the prompt's last positions produce the first generated token, and an
estimated pattern there loses needles that the rest of the prompt does not attend to. Budgets may
be shares of the prompt length (the paper's budgets are token counts tuned for 128K prompts, and
are dense at the lengths measured here). GQA: the official code repeats the KV heads and selects
per query head; here the query heads of a KV head share one pattern by default, so the executor
gathers each block once per KV head. Offline pattern search not built: MInference searches, per
head, among A-shape, vertical-slash (several vertical/slash sizes) and block-sparse patterns on
one calibration prompt; here every head uses vertical-slash with the same budgets (the official
pattern for a head without a searched entry). Prefill only: decode steps and chunks on a cache run
dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.blocks import n_blocks, prefill_blocksets
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.selection import mask_from_indices, resolve_budget, select_topk


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical, slash)``, each ``(B, Hq, L)`` fp32, of an unpadded prefill ``q (B, Hq, L, D)``,
    ``k (B, Hkv, L, D)``: the attention probabilities of the last ``min(last_q, L)`` queries
    summed over each key column (``vertical[..., j]``: key ``j``) and along each diagonal
    (``slash[..., o]``: the pairs ``(p, p - o)``)."""
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    n = min(last_q, length)
    pos = torch.arange(length - n, length, device=q.device)  # positions of the estimating queries
    keys = torch.arange(length, device=q.device)
    logits = (q[:, :, -n:].float().view(b, hkv, hq // hkv, n, d) @ k.float()[:, :, None].transpose(-1, -2)) * scale
    logits = logits.view(b, hq, n, length).masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    vertical = p.sum(-2)
    at = pos[:, None] - keys[None, :]  # (n, L): the key of query t on diagonal o (t, o)
    slash = p.gather(-1, at.clamp_min(0).expand(b, hq, n, length)).masked_fill(at < 0, 0.0).sum(-2)
    return vertical, slash


def keep_lines(scores: torch.Tensor, budget: int | float, forced: int) -> torch.Tensor:
    """``(..., L)`` bool: the first ``forced`` positions and the highest other ``scores`` up to
    ``max(budget, forced)`` positions in all (``budget`` resolved on ``L``; ties to the earlier)."""
    length = scores.shape[-1]
    forced = min(forced, length)
    count = min(length, max(resolve_budget(budget, length), forced))
    ranked = scores.float().clone()
    ranked[..., :forced] = float("inf")
    idx, _ = select_topk(ranked, count)
    return mask_from_indices(idx, length)


def vertical_slash_blocks(columns: torch.Tensor, diagonals: torch.Tensor, block: int,
                          dense_from: int | None = None) -> torch.Tensor:
    """``(B, H, nb, nb)`` bool: the key blocks each query block reads for the kept ``columns``
    (``(B, H, L)`` bool over key positions) and ``diagonals`` (``(B, H, L)`` bool over offsets) of
    an ``L``-token causal prefill (see the module doc); query blocks from ``dense_from`` on read
    every earlier block."""
    b, h, length = columns.shape
    dev = columns.device
    nb = n_blocks(length, block)
    pad = nb * block - length
    col_blocks = torch.nn.functional.pad(columns, (0, pad)).view(b, h, nb, block).any(-1)  # (B, H, nb)
    qi = torch.arange(nb, device=dev)[:, None]
    kj = torch.arange(nb, device=dev)[None, :]
    causal = kj <= qi
    # offsets through block pair (i, j): [(i-j)·block - block + 1, last real query of i - j·block]
    lo = ((qi - kj) * block - block + 1).clamp(0, length)
    hi = ((qi + 1) * block).clamp_max(length) - 1 - kj * block
    hi = torch.maximum(hi, lo - 1).clamp_max(length - 1)  # empty range above the diagonal
    cum = torch.nn.functional.pad(diagonals.long().cumsum(-1), (1, 0))  # (B, H, L+1): kept offsets below
    hits = cum[..., (hi + 1).flatten()] - cum[..., lo.flatten()]
    chosen = (hits.view(b, h, nb, nb) > 0) | col_blocks[:, :, None, :]
    if dense_from is not None:
        chosen = chosen | (qi >= dense_from)
    return chosen & causal


@dataclass(eq=False)
class MInference(Method):
    name = "minference"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[MInference](https://arxiv.org/abs/2407.02490)"

    vertical: int | float = param(0.02, "budget")
    slash: int | float = param(0.05, "budget")
    last_q: int = param(64, "int", ge=1)
    n_sink: int = param(30, "int", ge=0)
    n_local: int = param(100, "int", ge=1)
    block: int = param(64, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    select_per: str = param("kv_head", "choice", choices=("query_head", "kv_head"))
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    @classmethod
    def at_full_budget(cls) -> "MInference":
        return cls(vertical=1.0, slash=1.0, block=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "MInference":
        return cls(vertical=2, slash=2, last_q=4, n_sink=1, n_local=1, block=4, dense_layers=0, dense_tail=0)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        h = call.n_q_heads if self.select_per == "query_head" else call.n_kv_heads
        return prefill_blocksets(call, h, self.block, lambda q, k: (self.choose(q, k, call.scale), None))

    def lines(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ``(columns, diagonals)``, each ``(B, H, L)`` bool, of an unpadded prefill."""
        vertical, slash = vertical_slash_scores(q, k, self.last_q, scale)
        if self.select_per == "kv_head":
            b, hq, length = vertical.shape
            vertical = vertical.view(b, k.shape[1], hq // k.shape[1], length).sum(2)
            slash = slash.view(b, k.shape[1], hq // k.shape[1], length).sum(2)
        return keep_lines(vertical, self.vertical, self.n_sink), keep_lines(slash, self.slash, self.n_local)

    def choose(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """The key blocks ``(B, H, nb, nb)`` bool each query block reads on an unpadded prefill."""
        columns, diagonals = self.lines(q, k, scale)
        length = q.shape[2]
        dense_from = (length - self.dense_tail) // self.block if self.dense_tail else None
        return vertical_slash_blocks(columns, diagonals, self.block, dense_from)
