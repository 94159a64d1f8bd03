"""XAttention: block-sparse prefill chosen by antidiagonal scoring and a mass threshold.

Based on Xu, Xiao, Guo, Han et al., "XAttention: Block Sparse Attention with Antidiagonal
Scoring" (ICML 2025), https://arxiv.org/abs/2503.16428 (official code: github.com/mit-han-lab/
x-attention, ``xattn/src/Xattention.py`` ``xattn_estimate`` and ``utils.find_blocks_chunked``).

Scoring. Inside every ``stride × stride`` tile of the attention logits only the antidiagonal is
summed: query ``i·S + (S-1-t)`` against key ``j·S + t`` for ``t < S``. Concatenating the
strided slices of the queries (in reverse) and of the keys along the feature axis turns that into
one matmul of ``L/S`` rows by ``L/S`` columns of width ``S·D`` (1/S of the dense logits' cost).
The tile scores, divided by ``√D · S``, are softmaxed per tile row (causal at tile granularity,
fp32) and summed into ``block × block`` blocks: the estimated attention mass of every block.

Selection. Each query block keeps the first block and its own (diagonal) block, then the other
earlier blocks in descending estimated mass until the kept mass reaches ``threshold`` of the row's
total; the block-sparse executor then attends exactly inside them
(:mod:`tokensparse.engine.blocks`).

Parameters
----------
threshold: float = 0.9
    Share of each query block's estimated mass its kept blocks must reach (the paper's ``τ``;
    the official estimate's default). 1.0 keeps every block with any mass.
stride: int = 8
    Antidiagonal stride ``S`` (8 or 16 in the paper); ``block`` must be a multiple of it.
block: int = 64
    Query and key block size (the paper's kernel uses 128; see the deviations).
dense_layers: int = 2
    The first layers run dense.
dense_tail: int = 128
    Query blocks holding the prompt's last ``dense_tail`` tokens read every earlier block.
select_per: str = "kv_head"
    ``"kv_head"`` (the query heads of a KV head share one choice: their block masses are summed)
    or ``"query_head"`` (the paper, whose models here have as many KV heads as query heads).
impl: str = "auto"
    Block executor (see :mod:`tokensparse.engine.blocks`).

Deviations. Blocks of 64 tokens instead of 128 (the CPU's block-sparse kernels want blocks of
tens of tokens, and a 4K prompt has only 32 blocks of 128). ``dense_tail`` and ``dense_layers``
are not in the paper: as for HiP and BiFormer on SmolLM2 the prompt's last positions produce the
first generated token, and an estimated block set there loses needles the rest of the prompt
does not attend to (``docs/results/prefill_family.md`` measures it). GQA: the official code
asserts one KV head per query head; here the query heads of a KV head share one choice by
default (summed masses), which lets the executor gather each block once per KV head. The
threshold is one number for every head (the paper also profiles per-head thresholds; not built).
Prefill only: decode steps and chunks on a cache run dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.blocks import n_blocks, prefill_blocksets
from ..engine.config import param
from ..engine.method import Method, Phase

SCORE_CHUNK_ELEMS = 1 << 24
"""Tile scores per chunk of query tiles (64 MiB of fp32)."""


def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, stride: int, block: int) -> torch.Tensor:
    """``(B, Hq, nQB, nKB)`` fp32: the estimated attention mass of each (query block, key block)
    of an unpadded prefill ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)`` (see the module doc); each
    query block's row sums to its number of real tile rows."""
    b, hq, length, d = q.shape
    hkv, g = k.shape[1], hq // k.shape[1]
    s = stride
    nb = n_blocks(length, block)
    lp = nb * block
    pad = lp - length
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
    rq = torch.cat([qp[:, :, s - 1 - t :: s] for t in range(s)], dim=-1).float()  # (B, Hq, Lp/S, S·D)
    rk = torch.cat([kp[:, :, t::s] for t in range(s)], dim=-1).float()  # (B, Hkv, Lp/S, S·D)
    n = lp // s
    tiles_real = n_blocks(length, s)  # tile rows/columns holding at least one real token
    per = block // s  # tiles per block
    col = torch.arange(n, device=q.device)
    out = torch.zeros(b, hkv, g, nb, nb, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(per, (SCORE_CHUNK_ELEMS // max(1, b * hq * n)) // per * per)
    rows_per_chunk = min(rows_per_chunk, max(per, n // 8 // per * per))  # >= 8 chunks: skip ~7/16 of the tiles
    scale = 1.0 / (math.sqrt(d) * s)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)  # tile rows [r0, r1) see tile columns [0, r1) only (causal)
        logits = (rq[:, :, r0:r1].view(b, hkv, g, r1 - r0, -1) @ rk[:, :, None, :r1].transpose(-1, -2)) * scale
        row = torch.arange(r0, r1, device=q.device)[:, None]
        allowed = (col[None, :r1] <= row) & (col[None, :r1] < tiles_real)
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        p = p.masked_fill(row >= tiles_real, 0.0)  # tile rows of padding only
        mass = p.view(b, hkv, g, (r1 - r0) // per, per, r1 // per, per).sum((4, 6))
        out[:, :, :, r0 // per : r1 // per, : r1 // per] = mass
    return out.view(b, hq, nb, nb)


def threshold_blocks(mass: torch.Tensor, threshold: float, dense_from: int | None = None) -> torch.Tensor:
    """``(B, H, nQB, nKB)`` bool from block masses ``mass`` of a causal prefill: every query block
    keeps block 0 and its diagonal, then other earlier blocks in descending mass until the kept
    mass reaches ``threshold`` of its total (a block is kept when the mass kept before it falls
    short); query blocks from ``dense_from`` on keep every earlier block."""
    b, h, nqb, nkb = mass.shape
    dev = mass.device
    qi = torch.arange(nqb, device=dev)[:, None]
    kj = torch.arange(nkb, device=dev)[None, :]
    causal = kj <= qi
    forced = ((kj == 0) | (kj == qi)) & causal
    m = mass.double().masked_fill(~causal, 0.0)
    need = m.sum(-1, keepdim=True) * threshold
    others = m.masked_fill(forced, -1.0).masked_fill(~causal, -1.0)  # -1: never "others"
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    before = (m * forced).sum(-1, keepdim=True) + vals.clamp_min(0).cumsum(-1) - vals.clamp_min(0)
    keep_sorted = (before < need) & (vals >= 0)
    chosen = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) | forced
    if dense_from is not None:
        chosen = chosen | ((qi >= dense_from) & causal)
    return chosen


@dataclass(eq=False)
class XAttention(Method):
    name = "xattention"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[XAttention](https://arxiv.org/abs/2503.16428)"
    block_router = True

    threshold: float = param(0.9, "float", gt=0.0, le=1.0)
    stride: int = param(8, "int", ge=1)
    block: int = param(64, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    select_per: str = param("kv_head", "choice", choices=("query_head", "kv_head"))
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    def __post_init__(self):
        super().__post_init__()
        if self.block % self.stride:
            raise ValueError(f"xattention: block ({self.block}) must be a multiple of stride ({self.stride})")

    @classmethod
    def at_full_budget(cls) -> "XAttention":
        return cls(threshold=1.0, stride=2, block=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "XAttention":
        return cls(threshold=0.5, stride=2, block=4, dense_layers=0, dense_tail=0)

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
        return self.choose(q, k), None

    def choose(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The key blocks ``(B, H, nb, nb)`` bool each query block reads on an unpadded prefill."""
        mass = antidiagonal_mass(q, k, self.stride, self.block)  # (B, Hq, nb, nb)
        if self.select_per == "kv_head":
            b, hq, nb, _ = mass.shape
            mass = mass.view(b, k.shape[1], hq // k.shape[1], nb, nb).sum(2)
        length = q.shape[2]
        dense_from = (length - self.dense_tail) // self.block if self.dense_tail else None
        return threshold_blocks(mass, self.threshold, dense_from)
