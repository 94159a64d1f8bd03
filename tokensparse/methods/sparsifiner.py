"""Sparsifiner, training-free: block connectivity from low-rank approximate attention.

Based on Wei, Ye, Zhang, Wang, Yang, Yan, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers" (CVPR 2023), https://arxiv.org/abs/2303.13755.
Sparsifiner adds a lightweight *connectivity predictor* to each attention layer: queries and keys
are down-projected to a low rank, their product gives an approximate attention map, and the top
entries of each row form an instance-dependent sparse mask inside which the exact attention runs.
The down-projections are trained (distilled from the dense attention).

Training-free version. The learned down-projection is replaced by an orthonormal projection
``P (D × r)`` per layer and KV head onto the ``r`` principal directions of the keys (the top
eigenvectors of their covariance: the directions along which the logits ``q · k`` of one query
vary most across keys). The approximate logits ``(Q P)(K P)ᵀ`` cost ``r/D`` of the dense logits;
softmaxed per query row (causal, in fp32) they give approximate attention probabilities, summed
(``score="mass"``) or maximised (``score="max"``) over each ``block × block`` block and over the
query heads of each KV head. Each query block then reads its sink blocks, its local window (its
own block included) and the other earlier blocks of highest score, ``budget`` blocks in all
(:func:`~tokensparse.engine.blocks.top_blocks`); the block-sparse executor attends exactly inside
them (:mod:`tokensparse.engine.blocks`).

Where the projection comes from (``basis``):

* ``"prompt"`` (default): a PCA of the current prompt's own keys, per call (per layer, KV head and
  row of the batch; ``O(L·D²)`` plus one ``D × D`` eigendecomposition, negligible beside the
  ``L²·r`` approximate logits). It needs no calibration and no data beyond the prompt, adapts to
  the instance, and gives a row of a padded batch exactly the projection it gets alone.
* ``"profile"``: a projection calibrated once per model (``tokensparse calibrate --method
  sparsifiner``, a profile of kind ``sparsifiner_pca`` holding every layer's and KV head's key
  principal directions measured on a calibration text): a fixed projection like the paper's
  learned one. ``profile=`` names a file; otherwise the shipped or cached profile is used, and a
  model with none is refused with an error that names the calibration command.

At ``rank`` equal to the head dimension ``P Pᵀ = I``: the approximate logits are the exact ones
and the chosen blocks are those of highest exact attention mass.

Parameters
----------
budget: int | float = 0.125
    Key blocks per query block: a float in (0, 1] is a share of the query block's causal blocks
    (``ceil(budget · (i + 1))`` for query block ``i``); an int is a token count rounded up to whole
    blocks (the paper's per-row ``top-k``). Sinks and window count towards it.
rank: int = 16
    Rank ``r`` of the projection (at most the head dimension).
block: int = 64
    Query and key block size.
score: str = "mass"
    A block's score: ``"mass"`` (the approximate probabilities of its keys summed over the query
    block's rows) or ``"max"`` (the largest one).
basis: str = "prompt"
    ``"prompt"`` or ``"profile"`` (see above).
profile: str | None = None
    An explicit ``sparsifiner_pca`` profile file (with ``basis="profile"``).
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

Deviations. The trained connectivity predictor (learned down-projections) becomes a PCA
projection of the keys (per prompt by default, or calibrated); it is shared by a KV head's query
heads and applied to queries and keys alike. The paper's mask is token-level (top-k per query row)
over a vision transformer's non-causal attention; here connectivity is chosen per block of
``block`` tokens (the block-sparse executor's unit), causally, from the approximate probabilities
pooled per block and over the KV head's query heads (one choice per KV head: its blocks are
gathered once). The paper does not force sinks or a local window, nor keep dense layers or a dense
tail; as for BiFormer and XAttention on SmolLM2 the first layers and the prompt's last positions
(which produce the first generated token) run dense. The approximate logits are still computed
for every causal (query, key) pair (``r/D`` of the dense logits' multiply-adds, but as many
exponentials). Prefill only: decode steps and chunks on a cache run dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.blocks import forced_blocks, n_blocks, prefill_blocksets, top_blocks
from ..engine.calibration import Profile, find_kind_profile
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.observers import Observer, observe_prompt

KIND = "sparsifiner_pca"
KIND_VERSION = 1

SCORE_CHUNK_ELEMS = 1 << 24
"""Approximate probabilities per chunk of query rows (64 MiB of fp32)."""


def key_basis(k: torch.Tensor, rank: int) -> torch.Tensor:
    """``(B, Hkv, D, rank)`` float64: orthonormal columns spanning the ``rank`` principal directions
    of the keys ``k (B, Hkv, L, D)`` of each row and KV head (eigenvectors of their covariance,
    largest eigenvalue first)."""
    x = k.double()
    x = x - x.mean(2, keepdim=True)
    cov = x.transpose(-1, -2) @ x
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs.flip(-1)[..., :rank]


def lowrank_block_scores(q: torch.Tensor, k: torch.Tensor, basis: torch.Tensor, scale: float, block: int,
                         score: str = "mass") -> torch.Tensor:
    """``(B, Hkv, nb, nb)`` fp32 block scores of an unpadded causal prefill ``q (B, Hq, L, D)``,
    ``k (B, Hkv, L, D)`` from the approximate probabilities ``softmax(scale · (q P)(k P)ᵀ)`` (causal,
    per query row) with ``basis`` ``P (B or 1, Hkv, D, r)``: per (query block, key block), their sum
    (``"mass"``) or maximum (``"max"``) over the block's query rows, its keys and the KV head's query
    heads. Blocks after the query block score 0."""
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = n_blocks(length, block)
    lp = nb * block
    p = basis.float()
    qr = q.float().view(b, hkv, g, length, d) @ p[:, :, None]  # (B, Hkv, G, L, r)
    kr = k.float() @ p  # (B, Hkv, L, r)
    if lp > length:
        qr = torch.nn.functional.pad(qr, (0, 0, 0, lp - length))
    out = torch.zeros(b, hkv, nb, nb, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(block, (SCORE_CHUNK_ELEMS // max(1, b * hq * lp)) // block * block)
    for r0 in range(0, lp, rows_per_chunk):
        r1 = min(lp, r0 + rows_per_chunk)  # rows [r0, r1) see keys [0, min(r1, L)) only (causal)
        c1 = min(r1, length)
        logits = (qr[:, :, :, r0:r1] @ kr[:, :, None, :c1].transpose(-1, -2)) * scale  # (B, Hkv, G, R, c1)
        row = torch.arange(r0, r1, device=q.device)[:, None]
        col = torch.arange(c1, device=q.device)[None, :]
        probs = torch.softmax(logits.masked_fill(col > row, float("-inf")), dim=-1)
        probs = probs.masked_fill(row >= length, 0.0)  # padding rows of the last block
        if r1 > c1:
            probs = torch.nn.functional.pad(probs, (0, r1 - c1))
        tiles = probs.view(b, hkv, g, (r1 - r0) // block, block, r1 // block, block)
        if score == "mass":
            part = tiles.sum((2, 4, 6))
        else:
            part = tiles.amax((2, 4, 6))
        out[:, :, r0 // block : r1 // block, : r1 // block] = part
    return out


class _KeyCovariance(Observer):
    """Per layer: the key covariance ``(Hkv, D, D)`` float64 of a dense prefill (row 0)."""

    def __init__(self):
        self.cov: dict[int, torch.Tensor] = {}

    def on_call(self, call) -> None:
        if call.past_len:
            return
        x = call.key[0].double()
        x = x - x.mean(1, keepdim=True)
        self.cov[call.layer_idx] = x.transpose(-1, -2) @ x


def measure_basis(model, input_ids: torch.Tensor) -> dict:
    """The ``sparsifiner_pca`` payload: ``basis[layer][KV head][i]`` the ``i``-th principal direction
    (length ``D``) of that layer's and head's keys on ``input_ids``, largest variance first."""
    obs = _KeyCovariance()
    observe_prompt(model, input_ids, obs)
    layers = sorted(obs.cov)
    basis = []
    for i in layers:
        _, vecs = torch.linalg.eigh(obs.cov[i].cpu())
        basis.append(vecs.flip(-1).transpose(-1, -2).round(decimals=6).tolist())  # (Hkv, D directions, D)
    return {"tokens": int(input_ids.shape[1]), "layers": len(layers), "basis": basis}


@dataclass(eq=False)
class Sparsifiner(Method):
    name = "sparsifiner"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    calibration = "optional: key principal directions per layer (default: a PCA of each prompt's keys)"
    paper = "[Sparsifiner](https://arxiv.org/abs/2303.13755)"
    profile_kind = KIND
    profile_version = KIND_VERSION

    budget: int | float = param(0.125, "budget")
    rank: int = param(16, "int", ge=1)
    block: int = param(64, "int", ge=1)
    score: str = param("mass", "choice", choices=("mass", "max"))
    basis: str = param("prompt", "choice", choices=("prompt", "profile"))
    profile: str | None = param(None, "path", optional=True)
    n_sink: int = param(64, "int", ge=0)
    window: int = param(128, "int", ge=1)
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    impl: str = param("auto", "choice", choices=("auto", "sdpa", "flex", "gather", "reference"))

    def validate(self) -> None:
        if self.profile is not None and self.basis != "profile":
            raise ValueError(f"sparsifiner: profile={self.profile!r} is read only with basis='profile' "
                             f"(got basis={self.basis!r})")

    @classmethod
    def at_full_budget(cls) -> "Sparsifiner":
        return cls(budget=1.0, rank=1, block=8, n_sink=8, window=8, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "Sparsifiner":
        return cls(budget=0.25, rank=4, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0)

    @classmethod
    def calibrate(cls, model, input_ids) -> dict:
        return measure_basis(model, input_ids)

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        return f"key principal directions of {payload['layers']} layers measured on {payload['tokens']} tokens"

    def setup(self, session) -> None:
        cfg = session.model.config.get_text_config(decoder=True)
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
        if self.rank > d:
            raise ValueError(f"sparsifiner: rank ({self.rank}) exceeds the head dimension {d}")
        session.info["sparsifiner_basis"] = "prompt"
        if self.basis != "profile":
            return
        path = self.profile or find_kind_profile(session.model, KIND)
        if path is None:
            raise ValueError("sparsifiner: basis='profile' but this model has no sparsifiner_pca profile; run "
                             "`tokensparse calibrate --method sparsifiner` (or pass profile=FILE, or use the "
                             "default basis='prompt', a PCA of each prompt's own keys that needs no calibration)")
        prof = Profile.load(path, KIND, KIND_VERSION)
        prof.check(session.model)
        basis = torch.tensor(prof.payload["basis"], dtype=torch.float64)  # (layers, Hkv, D, D) rows: directions
        want = (session.num_layers, hkv, d, d)
        if tuple(basis.shape) != want:
            raise ValueError(f"sparsifiner: profile {path} holds bases shaped {tuple(basis.shape)}, the model needs {want}")
        session.state["sparsifiner_basis"] = basis[..., : self.rank, :].transpose(-1, -2).contiguous()  # (…, D, r)
        session.info["sparsifiner_basis"] = str(path)

    def select(self, call):
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None
        basis = call.session.state.get("sparsifiner_basis") if self.basis == "profile" else None
        if basis is not None:
            basis = basis[call.layer_idx][None].to(call.query.device)  # (1, Hkv, D, r)
        return prefill_blocksets(call, call.n_kv_heads, self.block,
                                 lambda q, k: (self.choose(q, k, call.scale, basis), None))

    def choose(self, q: torch.Tensor, k: torch.Tensor, scale: float, basis: torch.Tensor | None = None) -> torch.Tensor:
        """The key blocks ``(B, Hkv, nb, nb)`` bool each query block reads on an unpadded prefill
        (``basis``: a fixed projection ``(1, Hkv, D, r)``; ``None``: the PCA of ``k``)."""
        length = q.shape[2]
        nb = n_blocks(length, self.block)
        if basis is None:
            basis = key_basis(k, self.rank)
        scores = lowrank_block_scores(q, k, basis, scale, self.block, self.score)
        dense_from = (length - self.dense_tail) // self.block if self.dense_tail else None
        causal, forced = forced_blocks(nb, nb, sink_blocks=n_blocks(self.n_sink, self.block),
                                       local_blocks=n_blocks(self.window, self.block), dense_from=dense_from,
                                       device=q.device)
        return top_blocks(scores, self.keep_blocks(nb, q.device), causal, forced)

    def keep_blocks(self, nb: int, device=None) -> torch.Tensor:
        """``(nb, 1)`` long: how many key blocks each query block reads (before the forced ones)."""
        qi = torch.arange(nb, device=device)
        if isinstance(self.budget, float):
            keep = torch.ceil(self.budget * (qi + 1).double()).long()
        else:
            keep = torch.full_like(qi, n_blocks(self.budget, self.block))
        return keep[:, None]
