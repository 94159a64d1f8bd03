"""DHSA, training-free: query blocks pick whole variable-length key chunks under a token budget.

Based on Xiong, Zou, Fekri, Cho, "Dynamic Hierarchical Sparse Attention" (DHSA),
https://arxiv.org/abs/2510.24606 (official code: github.com/xiongsiheng/DHSA, the arXiv-v1
algorithm in ``legacy/utils/helper.py``: ``predict_boundaries``, ``_obtain_dhsa_mask``,
``dhsa_sdpa``). DHSA cuts the prompt's keys into chunks of variable length at predicted
boundaries, represents each chunk by its mean key × √(chunk length) (``avgpool_norm``: neither
short nor long chunks are favoured), scores every chunk against fixed query blocks (mean query
× √(real tokens in the block)) and lets each query block attend to the best chunks within a token
budget, plus its most recent tokens and the prompt's first tokens (sinks). The last
``instruction_tokens`` queries attend densely. Query and key representations are averaged over all
heads, so one mask serves every head.

Here, per prefill layer (after ``dense_layers``), on each row's real tokens:

1. **Boundaries** (training-free; ``boundaries="dynamic"``). The keys are pooled into blocks of
   ``grain`` tokens (the engine's grid); the boundary score of the edge between blocks ``j - 1``
   and ``j`` is the cosine shift ``1 - cos(k̄_{j-1}, k̄_j)`` of their mean keys, all KV heads
   concatenated (the paper's predictor reads the keys of all heads concatenated, and its training
   labels come from "similarity shifts between consecutive key embeddings"). The edge where the
   dense instruction tail starts is always a boundary (as in the official code); then the other
   edges before it are taken in descending shift (ties: the earlier edge) with 1-D non-maximum
   suppression (an edge within ``nms`` blocks of a taken one is skipped) until there are
   ``⌈L / chunk⌉`` chunks (the official ``num_chunks = L // block_size``: ``chunk`` is the mean
   chunk length). ``boundaries="shared"`` computes them in the first routed layer of a forward pass
   and reuses them in the later layers (the paper's ``share_boundaries``, its default);
   ``"fixed"`` cuts every ``chunk`` tokens (no boundary detection: the ablation).
2. **Representations.** Query blocks of ``grain`` tokens: mean query × √(real tokens);
   chunks: mean key × √(chunk tokens), in float64; averaged over all heads
   (``select_per="shared"``, the paper) or over the query heads of each KV head
   (``select_per="kv_head"``: one choice per KV head, its own keys; costs nothing extra at
   execution since the executor gathers per KV head anyway).
3. **Chunk-level choice.** Query block ``i`` scores chunk ``c`` by ``q̄_i · k̄_c``; every key block
   of a chunk carries its chunk's score, and the engine's
   :func:`~tokensparse.engine.blocks.route_blocks` keeps the sink blocks (the first
   ``global_tokens``), the local blocks (the last ``local_tokens`` up to and including the query
   block) and then the other earlier blocks in descending score, **ties to the later block**
   (``prefer="later"``), until ``budget`` tokens (sinks and window included) are read. So whole
   chunks are taken best first, and the one chunk that does not fit whole contributes its most
   recent blocks — the spec's pitfall (token-level top-k over upsampled chunk scores otherwise
   ends in an arbitrary part of a chunk).
4. Query blocks holding the last ``instruction_tokens`` prompt tokens read every earlier block;
   the block-sparse executor attends exactly inside the chosen blocks
   (:mod:`tokensparse.engine.blocks`; the fast square-block ``"sdpa"`` executor on CPU).

Parameters
----------
budget: int | float = 1024
    Tokens each query block reads (``budget_prefill`` / ``topk_tokens``), rounded up to whole
    blocks, sinks and local window included; a float in (0, 1] is a share of the query block's
    causal blocks (``⌈budget · (i + 1)⌉`` blocks for query block ``i``).
grain: int = 64
    Query block size and the grid key chunks are cut on (chunks are unions of ``grain``-token
    blocks).
chunk: int = 128
    Mean chunk length in tokens (a multiple of ``grain``): ``⌈L / chunk⌉`` chunks per prompt (the
    official code uses ``L // block_size`` chunks with query blocks of 128).
boundaries: str = "dynamic"
    ``"dynamic"`` (cosine-shift boundaries in every routed layer), ``"shared"`` (the first routed
    layer's boundaries for every layer of the forward pass) or ``"fixed"`` (chunks of ``chunk``
    tokens).
nms: int = 1
    Non-maximum suppression window in blocks: an edge within ``nms`` blocks of an already chosen
    boundary is skipped (0: off). With the default no two boundaries are adjacent, so chunks other
    than the first and the last span at least two blocks.
global_tokens: int = 128
    First tokens every query block reads (sinks; rounded up to blocks).
local_tokens: int = 128
    Most recent tokens every query block reads, its own block included (rounded up to blocks).
instruction_tokens: int = 64
    The last prompt tokens whose queries read every earlier key (rounded up to whole query blocks).
dense_layers: int = 0
    The first layers run dense (the paper: none).
select_per: str = "shared"
    ``"shared"`` (one mask for all heads, the paper) or ``"kv_head"``. Per KV head nets −5 answers
    of the suite's 70 against the shared mask's −2 on SmolLM2
    (docs/results/prefill_family.md, "DHSA at lower density and per KV head").
impl: str = "auto"
    Block executor (see :mod:`tokensparse.engine.blocks`).

Deviations. **The boundary predictor is not the paper's**: DHSA's predictor is a small trained
network (weights released per model); here the boundary rule is training-free (the cosine shift
between adjacent key blocks with NMS, above), which is what makes the method training-free. The
boundaries are **snapped to the ``grain`` grid** (chunk lengths are multiples of 64, not any
length): the engine's block executors, and the fast CPU one in particular, run on square blocks
of one aligned grid; so the boundary score is one number per block edge, not per token. The
instruction tail is rounded up to whole query blocks (64 tokens = one block at the defaults).
Query blocks are 64 tokens, not 128 (a 4K prompt has 32 blocks of 128). The selection is made
in whole blocks: the budget, sinks and local window are rounded up to blocks, and the chunk that
does not fit whole is cut at a block edge (the official code selects tokens and then splices the
128 sink tokens over the lowest-indexed ones). Chunk representations use the whole chunk,
including keys later than the query block (as in the official code; only the keys a query may see
are read). Sliding-window layers run dense (engine rule; the official Gemma 2 code applies the
window inside its selection). Prefill only: decode steps and chunks on a cache run dense (as the
current official code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.blocks import n_blocks, pool_blocks, prefill_blocksets, route_blocks
from ..engine.config import param
from ..engine.method import Method, Phase

_CARRY = "dhsa.boundaries"
"""Key of the shared boundaries in the per-pass carry: one entry per prompt the first routed
layer chose on (the whole batch, or each row of a padded batch in turn)."""


def block_counts(length: int, block: int, device=None) -> torch.Tensor:
    """``(n_blocks,)`` float64: the number of real tokens in each ``block``-token block."""
    nb = n_blocks(length, block)
    counts = torch.full((nb,), float(block), dtype=torch.float64, device=device)
    counts[-1] = length - (nb - 1) * block
    return counts


def cosine_shift(k_blocks: torch.Tensor) -> torch.Tensor:
    """``(B, nb - 1)`` float64: ``1 - cos`` between the features of adjacent blocks, from the mean
    keys ``k_blocks (B, Hkv, nb, D)`` with the KV heads concatenated; entry ``j - 1`` scores the edge
    between blocks ``j - 1`` and ``j``."""
    b, hkv, nb, d = k_blocks.shape
    f = k_blocks.double().transpose(1, 2).reshape(b, nb, hkv * d)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - (f[:, 1:] * f[:, :-1]).sum(-1)


def pick_boundaries(shift: torch.Tensor, n_cuts: int, nms: int, forced: int | None = None) -> torch.Tensor:
    """``(B, nb)`` bool, True where a chunk starts (block 0 always), from the edge scores
    ``shift (B, nb - 1)``: edge ``forced`` (a block index in ``1 … nb - 1``, or ``None``) first, then
    the edges before it (all edges when ``None``) in descending score — ties to the earlier edge —
    skipping any within ``nms`` blocks of a chosen one, until ``n_cuts`` edges are chosen."""
    b, n_edges = shift.shape
    nb = n_edges + 1
    starts = torch.zeros(b, nb, dtype=torch.bool, device=shift.device)
    starts[:, 0] = True
    order = torch.argsort(shift, dim=-1, descending=True, stable=True).tolist()
    last = nb if forced is None else forced  # candidate edges: blocks 1 … last - 1
    for r in range(b):
        first = [forced] if forced is not None and n_cuts > 0 else []
        candidates = first + [e + 1 for e in order[r] if e + 1 < last]  # e + 1: the block edge e starts
        chosen: list[int] = []
        blocked = [False] * (nb + 1)  # blocked[x]: edge x lies within nms blocks of a chosen edge
        for edge in candidates:
            if len(chosen) >= n_cuts:
                break
            if not blocked[edge]:
                chosen.append(edge)
                for x in range(max(0, edge - nms), min(nb, edge + nms) + 1):
                    blocked[x] = True
        starts[r, chosen] = True
    return starts


def chunk_representations(k: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reps (B, H, nb, D) float64, chunk_of (B, nb) long)``: each chunk's mean key × √(its tokens)
    (chunk ``c`` in ``reps[:, :, c]``; rows past a prompt's last chunk are 0) and the chunk of every
    block, from block means ``k (B, H, nb, D)``, real tokens per block ``counts (nb,)`` and chunk
    starts ``starts (B, nb)`` bool."""
    b, h, nb, d = k.shape
    chunk_of = starts.long().cumsum(-1) - 1  # (B, nb)
    sums = torch.zeros(b, h, nb, d, dtype=torch.float64, device=k.device)
    sums.scatter_add_(2, chunk_of[:, None, :, None].expand(b, h, nb, d), k.double() * counts[:, None])
    lens = torch.zeros(b, nb, dtype=torch.float64, device=k.device).scatter_add_(1, chunk_of, counts.expand(b, nb))
    return sums / lens.clamp_min(1.0).sqrt()[:, None, :, None], chunk_of  # mean · √len = sum / √len


def chunk_scores(q_blocks: torch.Tensor, reps: torch.Tensor, chunk_of: torch.Tensor) -> torch.Tensor:
    """``(B, H, nQB, nb)`` float64: query block ``i`` against key block ``j``'s chunk,
    ``q_blocks[i] · reps[chunk_of[j]]`` — one dot product per chunk, gathered to its blocks (so the
    blocks of a chunk tie exactly)."""
    s = q_blocks.double() @ reps.transpose(-1, -2)  # (B, H, nQB, n_chunks)
    b, h, nqb, _ = s.shape
    return s.gather(-1, chunk_of[:, None, None, :].expand(b, h, nqb, chunk_of.shape[-1]))


@dataclass(eq=False)
class DHSA(Method):
    name = "dhsa"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[DHSA](https://arxiv.org/abs/2510.24606) (training-free boundaries)"

    budget: int | float = param(1024, "budget")
    grain: int = param(64, "int", ge=1)
    chunk: int = param(128, "int", ge=1)
    boundaries: str = param("dynamic", "choice", choices=("dynamic", "shared", "fixed"))
    nms: int = param(1, "int", ge=0)
    global_tokens: int = param(128, "int", ge=0)
    local_tokens: int = param(128, "int", ge=1)
    instruction_tokens: int = param(64, "int", ge=0)
    dense_layers: int = param(0, "int", ge=0)
    select_per: str = param("shared", "choice", choices=("shared", "kv_head"))
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    def validate(self) -> None:
        if self.chunk % self.grain:
            raise ValueError(f"dhsa: chunk ({self.chunk}) must be a multiple of grain ({self.grain}): chunks are "
                             "unions of grain-token blocks")
        if isinstance(self.budget, int):
            forced = n_blocks(self.global_tokens, self.grain) + n_blocks(self.local_tokens, self.grain)
            if n_blocks(self.budget, self.grain) < forced:
                raise ValueError(
                    f"dhsa: budget ({self.budget} tokens = {n_blocks(self.budget, self.grain)} blocks of {self.grain}) "
                    f"cannot hold global_tokens ({self.global_tokens}) + local_tokens ({self.local_tokens}) = {forced} "
                    "blocks; raise budget or lower them")

    @classmethod
    def at_full_budget(cls) -> "DHSA":
        return cls(budget=1.0, grain=8, chunk=16, global_tokens=8, local_tokens=8, instruction_tokens=0)

    @classmethod
    def at_sparse_budget(cls) -> "DHSA":
        return cls(budget=12, grain=4, chunk=8, global_tokens=4, local_tokens=4, instruction_tokens=0)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        heads = 1 if self.select_per == "shared" else call.n_kv_heads
        saved = call.carry.get(_CARRY) if self.boundaries == "shared" else None
        made: list[torch.Tensor] = []

        def choose(q, k):
            prior = saved[len(made)] if saved is not None and len(made) < len(saved) else None
            sets, starts = self.choose(q, k, prior)
            made.append(starts)
            return sets, None

        sel = prefill_blocksets(call, heads, self.grain, choose)
        if self.boundaries == "shared" and saved is None:
            call.carry[_CARRY] = made
        return sel

    # ---- the steps, on one unpadded prompt ----------------------------------------------------------

    def dense_from(self, length: int) -> int | None:
        """First query block of the dense instruction tail (``None``: no tail)."""
        return (length - self.instruction_tokens) // self.grain if self.instruction_tokens else None

    def chunk_starts(self, k_blocks: torch.Tensor, length: int) -> torch.Tensor:
        """``(B, nb)`` bool: the blocks that start a chunk, from the block means ``k_blocks``."""
        b, nb = k_blocks.shape[0], k_blocks.shape[2]
        per = self.chunk // self.grain
        if self.boundaries == "fixed":
            return (torch.arange(nb, device=k_blocks.device) % per == 0).expand(b, nb).clone()
        tail = self.dense_from(length)
        forced = tail if tail is not None and 0 < tail < nb else None
        return pick_boundaries(cosine_shift(k_blocks), n_blocks(length, self.chunk) - 1, self.nms, forced)

    def choose(self, q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor | None = None):
        """``(sets (B, H, nb, nb) bool, starts (B, nb) bool)``: the key blocks each query block reads on
        an unpadded prefill ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)`` and the chunk starts used
        (``starts``: reuse these, when they fit this prompt)."""
        b, hq, length, _ = q.shape
        hkv = k.shape[1]
        g = self.grain
        nb = n_blocks(length, g)
        kb = pool_blocks(k, g)  # (B, Hkv, nb, D) float64
        if starts is None or tuple(starts.shape) != (b, nb):
            starts = self.chunk_starts(kb, length)
        counts = block_counts(length, g, q.device)
        qb = pool_blocks(q, g)  # (B, Hq, nb, D)
        if self.select_per == "shared":
            qf, kf = qb.mean(1, keepdim=True), kb.mean(1, keepdim=True)
        else:
            qf, kf = qb.view(b, hkv, hq // hkv, nb, -1).mean(2), kb
        qf = qf * counts.sqrt()[:, None]  # mean · √(real tokens)
        reps, chunk_of = chunk_representations(kf, counts, starts)
        qi = torch.arange(nb, device=q.device)
        if isinstance(self.budget, float):
            keep = torch.ceil(self.budget * (qi + 1).double()).long()
        else:
            keep = torch.full_like(qi, n_blocks(self.budget, g))
        sets = route_blocks(None, None, 0, scores=chunk_scores(qf, reps, chunk_of), keep=keep,
                            sink_blocks=n_blocks(self.global_tokens, g), local_blocks=n_blocks(self.local_tokens, g),
                            dense_from=self.dense_from(length), prefer="later")
        return sets, starts
