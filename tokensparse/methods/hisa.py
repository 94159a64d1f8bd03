"""HISA-style two-level selection, training-free: coarse key blocks by pooled scores, then exact
token-level refinement inside the surviving blocks.

Based on Xu, Meng et al., "HISA: Hierarchical Indexed Sparse Attention", arXiv 2603.28458
(``/work/shared/methods/prefill.md`` §4). HISA replaces the O(L²) lightning indexer of DeepSeek
Sparse Attention (DSA) by a two-level search: the prefix keys are cut into blocks of ``B``
tokens, each block is represented by its pooled (mean) indexer key, a *coarse filter* keeps the
``m`` blocks with the highest pooled index score per query, the original token-level index score
is computed only for the ``m·B`` candidate tokens, and their top-``k`` tokens are what sparse
attention reads (the index format DSA's sparse attention consumes, unchanged downstream).

Here, on a model without an indexer (SmolLM2 / Llama), the model's own ``q · k`` is the indexer,
and the selection is made per query *block* of ``block`` queries and per KV head:

1. **coarse:** query block ``i`` scores each earlier key block ``j`` by ``q̄_i · k̄_j`` (mean query
   of the block · mean key of the key block, maximised over the KV head's query heads; the
   engine's :func:`~tokensparse.engine.blocks.route_blocks`) and keeps the ``candidates`` best
   blocks besides the ones it reads whole anyway: its sinks, its local window (its own block
   included) and, for the prompt's last ``dense_tail`` tokens, everything;
2. **refine:** inside the candidate blocks each key ``s`` gets the exact score ``max_t q_t · k_s``
   over the block's queries ``t`` and the KV head's query heads (``refine="max"``) or
   ``q̄_i · k_s`` (``refine="mean"``: the per-token terms of the coarse score, ``1/block`` of the
   cost); the ``budget`` best keys are kept — by groups of ``fine`` consecutive keys scored by
   their best key when ``fine > 1`` (``fine=1``: single tokens, as in the paper);
3. **attend:** one exact softmax over the kept keys plus the sinks and window, through the
   engine's block-sparse executor on a grid of ``block`` queries × ``fine`` keys
   (:func:`~tokensparse.engine.blocks.block_attend`; ``impl="gather"`` gathers each query
   block's key rows and runs an fp32 softmax over them, ``impl="reference"`` builds the explicit
   token mask and runs the fp32 matmul/softmax oracle). :meth:`HISA.reference_mask` is a plain
   loop-by-loop construction of the same token mask (the test oracle of steps 1–2).

Parameters
----------
candidates: int | float = 1024
    Coarse stage, the paper's top-``m``: candidate key blocks per query block besides its sinks
    and window. An int is a token count, rounded up to whole blocks; a float in (0, 1] a share of
    the query block's causal blocks (``ceil(candidates · (i + 1))`` for query block ``i``).
budget: int | float = 256
    Refinement, the paper's top-``k``: keys kept inside the candidate blocks per query block and
    KV head (rounded up to whole ``fine`` groups). An int is a token count; a float in (0, 1] a
    share of the candidate keys. Sinks and window come on top.
block: int = 64
    Query block and coarse key block size in tokens.
fine: int = 1
    Refinement granularity in keys (divides ``block``): 1 = single tokens.
refine: str = "max"
    Token score inside the candidate blocks: ``"max"`` (exact, every query of the block) or
    ``"mean"`` (the block's mean query).
n_sink: int = 64
    First tokens every query block reads (rounded up to whole blocks).
window: int = 128
    Most recent tokens every query block reads, its own block included (rounded up to blocks).
dense_layers: int = 2
    The first layers run dense.
dense_tail: int = 128
    Query blocks holding the prompt's last ``dense_tail`` tokens read every earlier key.
impl: str = "gather"
    Block executor: ``"gather"``, ``"reference"`` or ``"auto"`` (the engine's choice: the CPU
    flash kernel when ``fine == block``, else compiled FlexAttention where available). On a CPU
    the token-level gather path measured slower than dense SDPA at 4K (0.51 vs 0.32 s per layer;
    ``docs/results/prefill_family/hisa.md``): this method is a quality reference, not a speed-up.

Deviations. No trained DSA lightning indexer: the model's own attention logits ``q · k`` are the
indexer, so the index score is one dot product per (query, key) instead of ``Σ_j w_{t,j}
ReLU(q^I_{t,j} · k^I_s)`` over 64 weighted ReLU indexer heads (the ReLU-weighted multi-head sum
becomes a maximum over the KV head's query heads, with no ReLU and no learned weights; pooling
before a nonlinearity is then exact for one head: ``q̄ · k̄`` is the mean of ``q̄ · k_s``). The
paper selects per query token; here per query block of ``block`` tokens (the block's queries share
one key set, the refinement scores a key by its best query, or by the mean query), per KV head
(shared by its query heads), so that the gathered keys serve ``block`` queries at once on a CPU.
Sinks, the local window, dense first layers and the dense tail are not in the paper: as for
BiFormer and Superlinear on SmolLM2, the first layers and the prompt's last positions (which
produce the first generated token) run dense, and every query block reads its sinks and its
recent keys (the paper's top-``k`` usually holds them anyway). The coarse and fine budgets are
this library's, the paper's ``B`` and ``m`` were not extracted. Training-free in the paper too
(a drop-in for DSA's indexer), but there on models trained with DSA. Prefill only: decode steps
and chunks on a cache run dense. Cost: step 2 with ``refine="max"`` multiplies every query by its
block's ``candidates`` keys, the paper's ``O(L·m·B)`` indexer (about 0.4 of dense attention's
causal logits at 4K with the defaults, 1024 candidates against 2048 causal keys on average);
``"mean"`` multiplies one query per block (``1/block`` of that). Step 3 reads ``n_sink + window +
budget`` keys per query (448 with the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.blocks import (forced_blocks, n_blocks, pool_blocks, prefill_blocksets, route_blocks, spread_blocks,
                             top_blocks)
from ..engine.config import param
from ..engine.executors import gather_rows
from ..engine.method import Method, Phase
from ..engine.selection import indices_from_mask

SCORE_CHUNK_ELEMS = 1 << 22
"""Refinement logits per chunk of query blocks (16 MiB of fp32)."""


@dataclass(eq=False)
class HISA(Method):
    name = "hisa"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[HISA](https://arxiv.org/abs/2603.28458)"

    candidates: int | float = param(1024, "budget")
    budget: int | float = param(256, "budget")
    block: int = param(64, "int", ge=1)
    fine: int = param(1, "int", ge=1)
    refine: str = param("max", "choice", choices=("max", "mean"))
    n_sink: int = param(64, "int", ge=0)
    window: int = param(128, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    impl: str = param("gather", "choice", choices=("gather", "reference", "auto"))

    def validate(self) -> None:
        if self.block % self.fine:
            raise ValueError(f"hisa: fine must divide block (fine groups nest in the coarse blocks), got fine={self.fine}, "
                             f"block={self.block}")

    @classmethod
    def at_full_budget(cls) -> "HISA":
        return cls(candidates=1.0, budget=1.0, block=8, fine=2, n_sink=8, window=8, dense_layers=0, dense_tail=0)

    @classmethod
    def at_sparse_budget(cls) -> "HISA":
        return cls(candidates=4, budget=3, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        return prefill_blocksets(call, call.n_kv_heads, self.block, self.choose, block_k=self.fine)

    # ---- the selection ---------------------------------------------------------------------------

    def _forced_args(self, length: int) -> dict:
        """Sinks, window and dense tail on the coarse grid of a ``length``-token prompt, in blocks."""
        return dict(sink_blocks=n_blocks(self.n_sink, self.block), local_blocks=n_blocks(self.window, self.block),
                    dense_from=(length - self.dense_tail) // self.block if self.dense_tail else None)

    def _candidate_count(self, nb: int, device=None) -> torch.Tensor:
        """``(nb,)`` long: candidate blocks query block ``i`` may keep (before capping at what exists)."""
        qi = torch.arange(nb, device=device)
        if isinstance(self.candidates, float):
            return torch.ceil(self.candidates * (qi + 1).double()).long()
        return torch.full_like(qi, n_blocks(self.candidates, self.block))

    def _fine_keep(self, n_candidate_blocks: torch.Tensor) -> torch.Tensor:
        """Fine groups to keep given the number of candidate blocks (a long tensor of any shape)."""
        if isinstance(self.budget, float):
            return torch.ceil(self.budget * (n_candidate_blocks * self.block).double() / self.fine).long()
        return torch.full_like(n_candidate_blocks, n_blocks(self.budget, self.fine))

    def choose(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(set, complete)`` for an unpadded prefill ``q (b, Hq, L, D)``, ``k (b, Hkv, L, D)``: the
        ``fine``-key groups ``(b, Hkv, nb, ⌈L / fine⌉)`` bool each query block of ``block`` rows
        reads, and whether that is every causal key."""
        b, _, length, _ = q.shape
        hkv = k.shape[1]
        nb, nf, ratio = n_blocks(length, self.block), n_blocks(length, self.fine), self.block // self.fine
        dev = q.device
        grid = self._forced_args(length)
        causal, forced = forced_blocks(nb, nb, device=dev, **grid)
        # 1. coarse: the best candidate blocks besides the forced ones (route_blocks keeps the forced first)
        keep = forced.sum(-1) + self._candidate_count(nb, dev)
        routed = route_blocks(pool_blocks(q, self.block), pool_blocks(k, self.block), 0, keep=keep, **grid)
        cand = routed & ~forced  # (b, Hkv, nb, nb)
        causal_f = spread_blocks(causal, ratio, nf)
        out = spread_blocks(forced, ratio, nf).expand(b, hkv, nb, nf)
        width = int(cand.sum(-1).max()) if cand.numel() else 0
        if width:
            # 2. refine: exact scores of the candidate keys, the best fine groups among them
            idx, valid = indices_from_mask(cand, width)  # (b, Hkv, nb, width) candidate blocks, ascending
            scores, tok = self.token_scores(q, k, idx, valid)  # (b, Hkv, nb, width·block)
            group = scores.unflatten(-1, (width * ratio, self.fine)).amax(-1)  # fine groups, in key order
            pos = tok[..., :: self.fine] // self.fine
            n_cand = valid.sum(-1, keepdim=True)
            chosen = top_blocks(group, self._fine_keep(n_cand), group > -math.inf)
            hits = torch.zeros(b * hkv * nb, nf, dtype=torch.long, device=dev)  # filler entries add 0
            hits.scatter_add_(-1, pos.reshape(-1, pos.shape[-1]), chosen.long().reshape(-1, pos.shape[-1]))
            out = out | (hits.view(b, hkv, nb, nf) > 0)
        # 3. attend: the executor reads the forced blocks whole and the chosen groups
        out = out & causal_f
        return out, bool((out == causal_f).all())

    def token_scores(self, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Refinement scores of the keys of the candidate blocks ``idx (b, Hkv, nb, n)`` (``valid``
        marks the real entries) for each query block: ``(scores, tok)``, both ``(b, Hkv, nb, n·block)``
        — fp32 scores (``-inf`` on filler entries and keys past the prompt) and the key positions,
        in the order of ``idx`` — computed on the gathered candidate keys only."""
        b, hq, length, d = q.shape
        hkv = k.shape[1]
        g, bs = hq // hkv, self.block
        nb = idx.shape[2]
        tok = (idx[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # (b, Hkv, nb, n·bs)
        ok = valid[..., None].expand(*valid.shape, bs).flatten(-2) & (tok < length)
        tok = tok.clamp_max(length - 1)
        live = None
        if self.refine == "mean":
            rows = pool_blocks(q, bs).float().view(b, hkv, g, nb, d).transpose(2, 3)  # (b, Hkv, nb, G, D)
        else:
            pad = nb * bs - length
            qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
            rows = qp.reshape(b, hkv, g, nb, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nb, g * bs, d)
            live = (torch.arange(nb * bs, device=q.device) < length).view(nb, 1, bs).expand(nb, g, bs).reshape(nb, g * bs)
        nk, nr = tok.shape[-1], rows.shape[3]
        scores = torch.empty(b, hkv, nb, nk, dtype=torch.float32, device=q.device)
        step = max(1, SCORE_CHUNK_ELEMS // max(1, b * hkv * nr * nk))
        for c0 in range(0, nb, step):
            c1 = min(nb, c0 + step)
            kc = gather_rows(k, tok[:, :, c0:c1].reshape(b, hkv, -1)).view(b, hkv, c1 - c0, nk, d).float()
            s = rows[:, :, c0:c1].float() @ kc.transpose(-1, -2)  # (b, Hkv, c, rows, nk)
            if live is not None:  # padding query rows of a partial last block
                s.masked_fill_(~live[c0:c1, :, None], -math.inf)
            scores[:, :, c0:c1] = s.amax(-2)
        return scores.masked_fill_(~ok, -math.inf), tok

    def reference_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(b, Hkv, L, L)`` bool: the keys each query reads on an unpadded prefill, built query
        block by query block with plain loops in float64 (the oracle of :meth:`choose`)."""
        b, hq, length, _ = q.shape
        hkv = k.shape[1]
        g, bs, fine = hq // hkv, self.block, self.fine
        nb = n_blocks(length, bs)
        sink, local = n_blocks(self.n_sink, bs), n_blocks(self.window, bs)
        tail = (length - self.dense_tail) // bs if self.dense_tail else nb
        qd, kd = q.double(), k.double()
        out = torch.zeros(b, hkv, length, length, dtype=torch.bool)
        for bi in range(b):
            for h in range(hkv):
                heads = range(h * g, (h + 1) * g)
                kmean = [kd[bi, h, j * bs : (j + 1) * bs].mean(0) for j in range(nb)]
                for i in range(nb):
                    qs = slice(i * bs, min(length, (i + 1) * bs))
                    qmean = [qd[bi, hh, qs].mean(0) for hh in heads]
                    forced = {j for j in range(i + 1) if j < sink or j > i - local or i >= tail}
                    others = [j for j in range(i + 1) if j not in forced]
                    coarse = {j: max(float(qm @ kmean[j]) for qm in qmean) for j in others}
                    if isinstance(self.candidates, float):
                        m = math.ceil(self.candidates * (i + 1))
                    else:
                        m = n_blocks(self.candidates, bs)
                    cand = sorted(others, key=lambda j: (-coarse[j], j))[:m]
                    score = {}
                    for j in cand:
                        for s in range(j * bs, min(length, (j + 1) * bs)):
                            if self.refine == "max":
                                score[s] = max(float((qd[bi, hh, qs] @ kd[bi, h, s]).max()) for hh in heads)
                            else:
                                score[s] = max(float(qm @ kd[bi, h, s]) for qm in qmean)
                    groups: dict[int, float] = {}
                    for s, v in score.items():
                        groups[s // fine] = max(groups.get(s // fine, -math.inf), v)
                    if isinstance(self.budget, float):
                        n_keep = math.ceil(self.budget * (len(cand) * bs) / fine)
                    else:
                        n_keep = n_blocks(self.budget, fine)
                    kept = sorted(groups, key=lambda f: (-groups[f], f))[:n_keep]
                    keys = [s for j in forced for s in range(j * bs, min(length, (j + 1) * bs))]
                    keys += [s for f in kept for s in range(f * fine, min(length, (f + 1) * fine))]
                    for t in range(qs.start, qs.stop):
                        out[bi, h, t, [s for s in keys if s <= t]] = True
        return out

    def expected_density(self, length: int) -> float:
        """Share of the causal (query, key) pairs a routed layer reads at ``length`` tokens when every
        candidate block holds ``budget`` keys or more (for reports; the diagonal counted whole)."""
        bs = self.block
        nb = n_blocks(length, bs)
        causal, forced = forced_blocks(nb, nb, **self._forced_args(length))
        n_forced = forced.sum(-1)
        n_cand = torch.minimum(self._candidate_count(nb), causal.sum(-1) - n_forced)
        kept = torch.minimum(self._fine_keep(n_cand) * self.fine, n_cand * bs)
        q_rows = torch.tensor([min(bs, length - i * bs) for i in range(nb)], dtype=torch.float64)
        read = ((n_forced * bs + kept).double() * q_rows).sum()
        return float(read / (length * (length + 1) / 2))
