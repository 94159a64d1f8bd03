"""Token Sparse Attention (compress → attend → scatter during prefill).

Based on Jo, Kang, Song, Kim, "Token Sparse Attention", ICML 2026, https://arxiv.org/abs/2602.03216
(official code: github.com/dongwonjo/Token-Sparse-Attention).

In each sparse layer, the last ``window`` queries score every earlier key (mean softmax
probability, computed in key chunks, never an L×L matrix), the scores are smoothed with an average
pool, and *Dynamic Token Coverage* drops the lowest-scored tokens whose total (head-averaged) mass
is below ``coverage`` (τ), keeping at least ``min_tokens``. Each head then keeps its own top
tokens plus the window; Q, K and V are gathered to those rows, attention runs causally on the
reduced set, and outputs are scattered back. Unselected query rows get an attention output of 0
(the residual stream carries them); the next layer selects afresh. The KV cache stays full, so
decoding is dense.

Sparse layers come from a Representation Drift profile (``tokensparse calibrate``): the layers
whose drift is at most the ``drift_quantile`` of all layers. Without a profile the fallback is the
official one, the second half of the layers, and a warning says so.

Parameters
----------
coverage: float = 0.005
    τ, the share of attention mass that may be discarded per layer (0 = dense).
window: int = 128
    Observation window (last queries used for scoring); always kept.
pool_kernel: int = 7
    Average-pooling kernel along keys before selection (1 = off).
min_tokens: int = 1024
    Minimum number of non-window tokens kept; layers with ``L <= min_tokens + window`` stay dense.
sink_tokens: int = 0
    First tokens always kept (not in the paper; sinks usually score high anyway).
select_per: str = "query_head"
    ``"query_head"`` (paper: K/V rows gathered per query head) or ``"kv_head"`` (GQA-preserving:
    scores aggregated over each query group with ``gqa_reduce``, K/V never expanded).
gqa_reduce: str = "mean"
    ``"mean"``, ``"max"`` or ``"sum"`` over a KV head's query group (``kv_head`` mode only).
layers: str | list[int] = "profile"
    ``"profile"`` (drift profile, else second half), ``"all"``, ``"second_half"`` or explicit indices.
drift_quantile: float = 0.5
    δ: with a profile, layers with drift ≤ this quantile are sparse (larger = more sparse layers).
profile: str | None = None
    Path of a drift profile; ``None`` looks up the shipped/user profile for the model fingerprint.
score_chunk: int = 8192
    Keys per chunk when computing window scores (memory ``W × chunk`` per head; contexts up to
    ``chunk`` take one fused softmax, longer ones two passes over chunks).
inner: str | None = None
    Composition, "compress the rows, then block-sparse among them": the name of a registered
    block-routing prefill method (``biformer``, ``hip``, ``xattention``: methods with
    ``block_router = True``, through their common entry point
    :meth:`~tokensparse.engine.method.Method.blockset`). In each sparse layer the kept rows of a
    head, in their original order, form a compressed prompt; the inner method chooses its key
    blocks on a grid laid over those compressed rows and the engine's block executor attends
    inside them (:mod:`tokensparse.engine.compressed`; the selection carries the rule as its
    ``route``). ``None``: dense causal attention among the kept rows (the paper).
inner_config: dict | None = None
    The inner method's settings (``None``: its defaults), checked by it at construction. Its
    token-valued settings count compressed rows (e.g. BiFormer's ``window`` and ``dense_tail``:
    the most recent kept rows), its shares the compressed prompt's blocks, and its
    ``dense_layers`` leave those layers dense among the kept rows.

Deviations from the paper/code: batches are supported (each row keeps the count it would keep
alone; padding keys are never selected), the optional ``sink_tokens`` and ``kv_head``
mode are additions, and scores use SDPA's scale ``1/sqrt(D)`` in fp32.

Composition (``inner``; not in the paper). Decisions: the engine, not this method, owns "attend
among the kept rows with a block selection" (a ``"rows"`` selection with a ``route``), so any
block router composes without special cases. The router sees the K/V heads of the kept rows: one
per query head in ``select_per="query_head"`` (each query head keeps its own rows, so a router that
chooses per KV head chooses per query head here), one per KV head in ``"kv_head"`` mode. Where
Token Sparse keeps every row (a short prompt, a covered budget) the composition still runs the
inner router over all rows (the same per-head form), so a prompt's result does not depend on
whether another row of its batch was compressed; the plain method runs such calls dense. The
inner method acts only in Token Sparse's sparse layers (elsewhere the call is dense, as in plain
Token Sparse). At the inner method's full budget the composition equals plain Token Sparse
(``tests/test_token_sparse_blocks.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..engine.compressed import BlockRoute
from ..engine.config import composed, param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything
from ..engine.selection import (
    GQA_REDUCTIONS,
    Selection,
    aggregate_gqa,
    coverage_keep_count,
    indices_from_mask,
    pool1d,
    window_scores,
)
from .drift_profile import KIND, KIND_VERSION, DriftProfile, find_drift_profile, measure_drift

#: registered block-routing prefill methods usable as ``inner`` (``block_router = True``; the tests
#: check that every registered block router is listed here)
INNERS = ("biformer", "hip", "xattention")


@dataclass(eq=False)
class TokenSparse(Method):
    name = "token_sparse"
    phase = Phase.PREFILL
    schedule = "each prefill call of its sparse layers"
    kv_memory = "none (full cache; decode is dense)"
    calibration = "optional: representation-drift layer profile"
    paper = "[Token Sparse Attention](https://arxiv.org/abs/2602.03216)"
    profile_kind = KIND
    profile_version = KIND_VERSION

    coverage: float = param(0.005, "float", ge=0.0, lt=1.0)
    window: int = param(128, "int", ge=1)
    pool_kernel: int = param(7, "int", ge=1)
    min_tokens: int = param(1024, "int", ge=0)
    sink_tokens: int = param(0, "int", ge=0)
    select_per: str = param("query_head", "choice", choices=("query_head", "kv_head"))
    gqa_reduce: str = param("mean", "choice", choices=GQA_REDUCTIONS)
    layers: str | list[int] = param("profile", "layers", choices=("profile", "all", "second_half"))
    drift_quantile: float = param(0.5, "float", ge=0.0, le=1.0)
    profile: str | None = param(None, "path", optional=True)
    score_chunk: int = param(8192, "int", ge=1)
    inner: str | None = param(None, "choice", choices=INNERS, optional=True, added=True)
    inner_config: dict | None = param(None, "mapping", optional=True, added=True)

    def validate(self) -> None:
        self.inner_method = None
        if self.inner is None:
            if self.inner_config is not None:
                raise ValueError(f"token_sparse: inner_config must be None without an inner method, got "
                                 f"{self.inner_config!r} (set inner=, one of {', '.join(INNERS)})")
            return
        from . import get

        cls = get(self.inner)
        if not cls.block_router:
            raise ValueError(f"token_sparse: inner must be a block-routing prefill method (block_router = True), "
                             f"got {self.inner!r}")
        self.inner_method = composed("token_sparse", "inner_config", cls, self.inner_config)

    @classmethod
    def at_full_budget(cls) -> "TokenSparse":
        return cls(coverage=0.0, layers="all", min_tokens=0, window=4)

    @classmethod
    def at_sparse_budget(cls) -> "Method":
        return cls(coverage=0.3, window=4, min_tokens=2, layers="all", pool_kernel=3)

    @classmethod
    def calibrate(cls, model, input_ids) -> dict:
        """The drift profile's payload: per-layer Representation Drift on ``input_ids`` (dense)."""
        return {"tokens": int(input_ids.shape[1]), "drift": measure_drift(model, input_ids)}

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        drift = payload["drift"]
        prof = DriftProfile("", "", len(drift), payload["tokens"], "", drift)
        return ("drift per layer: " + " ".join(f"{d:.4f}" for d in drift)
                + f"\nsparse layers at the default quantile 0.5: {prof.sparse_layers(0.5)}")

    def setup(self, session) -> None:
        n = session.num_layers
        if isinstance(self.layers, str):
            if self.layers == "all":
                chosen = list(range(n))
            elif self.layers == "second_half":
                chosen = list(range(n // 2, n))
            else:
                path = self.profile or find_drift_profile(session.model)
                if path is None:
                    warnings.warn(
                        "token_sparse: no drift profile for this model; using the documented fallback "
                        "(second half of the layers). Run `tokensparse calibrate` to create one.",
                        stacklevel=4,
                    )
                    chosen = list(range(n // 2, n))
                    session.info["token_sparse_layers_from"] = "fallback: second half"
                else:
                    prof = DriftProfile.load(path)
                    prof.check(session.model)
                    chosen = prof.sparse_layers(self.drift_quantile)
                    session.info["token_sparse_layers_from"] = str(path)
        else:
            chosen = [int(i) for i in self.layers]
            bad = [i for i in chosen if not 0 <= i < n]
            if bad:
                raise ValueError(f"layer indices {bad} out of range for a {n}-layer model")
        session.state["token_sparse_layers"] = frozenset(chosen)
        session.info["token_sparse_layers"] = sorted(chosen)
        if self.inner_method is not None:
            self.inner_method.setup(session)

    def select(self, call) -> Selection | None:
        """Per-head rows to keep (window included) in the call's sparse layers, or ``None`` elsewhere.

        Windows, sinks, ``min_tokens`` and the coverage count are taken over each row's real tokens.
        """
        if call.kind != "prefill" or call.layer_idx not in call.session.state["token_sparse_layers"]:
            return None
        length = call.k_len
        w = min(self.window, length)
        n_cand = length - w
        real = call.n_real  # (B, 1)
        short = real <= self.min_tokens + self.window  # such rows stay dense
        if n_cand <= 0 or bool(short.all()):
            return self._everything(call)
        plan = KeyPlan(call, n_sink=self.sink_tokens, window=self.window)
        valid = call.key_valid  # (B, L) or None; left padding: the last w queries are real
        scores = window_scores(call.query[:, :, n_cand:], call.key, call.scale, valid, self.score_chunk)[..., :n_cand]
        scores = pool1d(scores, self.pool_kernel, "avg")
        cand_valid = None if valid is None else valid[:, :n_cand]
        if cand_valid is not None:
            scores = scores * cand_valid[:, None, :]
        keep = coverage_keep_count(scores, self.coverage, self.min_tokens, cand_valid)  # (B, 1), sinks included
        n_real_cand = (real - w).clamp_min(0)
        n_sinks = n_real_cand.clamp(max=self.sink_tokens)
        keep = torch.where(short, n_real_cand, torch.maximum(keep, n_sinks))
        n_top = keep - n_sinks  # the sinks are always kept by the plan
        if plan.covers(n_top):
            return self._everything(call)
        if self.select_per == "kv_head":
            scores = aggregate_gqa(scores, call.n_kv_heads, self.gqa_reduce)
        return self._routed(call, plan.select(scores[..., plan.lo :], n_top, "rows"))

    def _routed(self, call, sel: Selection) -> Selection:
        """``sel`` with the inner method's rule for this layer as its ``route`` (none without ``inner``)."""
        if self.inner_method is None:
            return sel
        inner, layer = self.inner_method, call.layer_idx
        sel.route = BlockRoute(lambda q, k: inner.blockset(q, k, layer), inner.block, getattr(inner, "impl", "auto"),
                               inner.name)
        return sel

    def _everything(self, call) -> Selection:
        """Every real row kept: dense without ``inner``; with it, the inner rule over all rows, in
        the per-head form of a compressed call (per query head or per KV head by ``select_per``), so
        that a prompt routes the same whether or not another row of its batch was compressed."""
        if self.inner_method is None:
            return everything(call, "rows")
        heads = call.n_q_heads if self.select_per == "query_head" else call.n_kv_heads
        if call.key_valid is None:
            idx = torch.arange(call.k_len, device=call.query.device).expand(call.batch, heads, call.k_len)
            return self._routed(call, Selection("rows", idx))
        idx, ok = indices_from_mask(call.key_valid[:, None, :].expand(call.batch, heads, call.k_len))
        return self._routed(call, Selection("rows", idx, None if bool(ok.all()) else ok))
