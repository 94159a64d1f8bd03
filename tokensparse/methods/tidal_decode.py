"""TidalDecode: token positions chosen by full attention in a few layers, reused by the layers after them.

Based on Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent
Sparse Attention", ICLR 2025, https://arxiv.org/abs/2410.05076 (official code:
github.com/DerrickYLJ/TidalDecode, HF reference ``src/tidal_build/modify_llama.py``).

At each decode step: layers below the first selection layer attend densely; a *selection layer*
attends densely too and picks the ``budget`` keys with the highest attention weights; every later
layer attends only to the positions the most recent selection layer picked (plus the current
token), until the next selection layer (the paper's re-selection layer, which corrects the drift
of the chosen positions in deeper layers) picks again. Positions travel between layers through the
engine's per-forward ``carry``, which is cleared at the start of every forward pass, so a layer
never reuses positions from an earlier step. The prefill is dense; the cache keeps every token.

Parameters
----------
budget: int | float = 0.25
    Keys each reusing layer attends to per step, the current token included; a float in (0, 1]
    is a share of each row's real tokens. The official scripts use 128–256 (needle) and 4096
    (LongBench) tokens.
selection_layers: str | list[int] = "paper"
    The layers that select. ``"paper"``: layer 2 (the paper's ``sparse_layer_start``) and the
    re-selection layer ``round(13 / 32 · n_layers)`` (the paper's layer 13 of Llama-3-8B scaled to
    the model's depth: 12 of SmolLM2's 30; the paper picks it per model by a sweep).
    ``"periodic"`` (beyond the paper): layer 2 and every ``period``-th layer after it (2, 8, 14, 20,
    26 of 30 at ``period=6``), so no layer reuses positions chosen more than ``period - 1`` layers
    above it. A list sets them explicitly (one layer: no re-selection; more than two: more
    re-selections). Layers before the first one run dense.
period: int = 6
    Layers between two selection layers with ``selection_layers="periodic"`` (another value with
    other selection layers is an error).
    Measured on SmolLM2's v2 suite (docs/results/decode_suite/, 25 % budget): the paper's layers lose
    40 points on the 2K half and 25 at 4K; ``"periodic"`` 16.7 at 2K but 25.0 at 4K (held out);
    ``[14]`` (layers 0–13 dense) 7.4 and 10.7 (intervals containing zero) with 15–23 nats of answer
    log-likelihood lost, at 1.30× dense at 8K against 1.46× (docs/results/decode_defaults/). The
    default stays the paper's.
gqa_reduce: str = "max"
    How the attention weights of a KV head's query group are combined before the top-k (``max``,
    ``mean`` or ``sum``): one position set per KV head, so K/V rows are read once per KV head.
scorer: str | None = None
    Composition: the name of a registered scorer method (``quest``: page bounds, ``landmark``:
    block representatives, ``token_select``: the soft vote; each at its defaults, through
    :meth:`~tokensparse.engine.method.Method.key_scores`) that ranks the keys in the selection
    layers instead of their dense attention; a selection layer then attends to its own choice, so
    no layer after the dense ones reads the whole cache. ``None``: the paper's dense selection
    layers.
scorer_config: dict | None = None
    The scorer's settings (``None``: its defaults), checked by it at construction, e.g.
    ``{"block": 32}`` for Landmark. Evaluation rows record them when given; a scorer left at its
    defaults is recorded by name only, so a later change of the scorer's own defaults does not show
    in the row (set them here to pin them).
pool_kernel: int = 1
    Beyond the paper: max-pool a selection layer's scores over this many neighbouring keys before
    the top-k (``1`` = off, the paper's ranking), so the rest of a span the step attends to (the
    next digits of a number being copied) is kept with it (as Recycled Attention's
    ``pool_kernel``). With the periodic layers on the 2K half: −15.7 points against −16.7 unpooled
    (no gain).

Deviations: the HF reference selects per query head (after repeating K/V) and its kernel path
does not support GQA (the README lists it as future work); here one set per KV head from the
group's combined weights. The cache correction of the paper's system (re-computing the K/V of
tokens decoded sparsely) is not in the HF reference and not implemented. Chunks of several
queries on a filled cache run dense (the method is decode-only). Batches are supported (budgets
per row's real tokens; padding is never selected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import at_default, composed, param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything, execute, record_dense, row_budgets, run
from ..engine.selection import GQA_REDUCTIONS, Selection, aggregate_gqa, pool1d

_CARRY = "tidal_decode.positions"

#: registered methods whose ``key_scores`` can drive the selection layers (``scorer=``)
SCORERS = ("quest", "landmark", "token_select", "fasa")


@dataclass(eq=False)
class TidalDecode(Method):
    name = "tidal_decode"
    phase = Phase.DECODE
    schedule = "each decode step: select in a few layers (2 by default), reuse in the others"
    kv_memory = "none (full cache; reads only selected rows)"
    calibration = "optional: re-selection layer sweep (default scaled from the paper)"
    paper = "[TidalDecode](https://arxiv.org/abs/2410.05076)"

    budget: int | float = param(0.25, "budget")
    selection_layers: str | list[int] = param("paper", "layers", choices=("paper", "periodic"))
    gqa_reduce: str = param("max", "choice", choices=GQA_REDUCTIONS)
    scorer: str | None = param(None, "choice", choices=SCORERS, optional=True, added=True)
    pool_kernel: int = param(1, "int", ge=1, added=True)
    period: int = param(6, "int", ge=1, added=True)
    scorer_config: dict | None = param(None, "mapping", optional=True, added=True)

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget < 2:
            raise ValueError(f"tidal_decode: budget ({self.budget}) must hold the current token and at least one other")
        if not at_default(self, "period") and self.selection_layers != "periodic":
            raise ValueError(f"tidal_decode: period ({self.period}) only applies to selection_layers='periodic', "
                             f"not {self.selection_layers!r}")
        if self.scorer is None:
            if self.scorer_config is not None:
                raise ValueError(f"tidal_decode: scorer_config must be None without a scorer, got "
                                 f"{self.scorer_config!r} (set scorer=, one of {', '.join(SCORERS)})")
            return
        self._scorer()

    @property
    def needs_cache_state(self) -> bool:  # a page scorer keeps its summaries with the cache
        return self.scorer is not None and self._scorer().needs_cache_state

    @property
    def dense_prefill(self) -> bool:  # its own prefill is dense; a scorer's must be too
        return self.scorer is None or self._scorer().dense_prefill

    def _scorer(self) -> Method:
        from . import get

        return composed("tidal_decode", "scorer_config", get(self.scorer), self.scorer_config)

    @classmethod
    def at_full_budget(cls) -> "TidalDecode":
        return cls(budget=1.0, selection_layers=[0])

    @classmethod
    def at_sparse_budget(cls) -> "TidalDecode":
        return cls(budget=6, selection_layers=[0])

    def setup(self, session) -> None:
        n = session.num_layers
        if self.selection_layers == "paper":
            layers = sorted({layer for layer in (2, round(13 / 32 * n)) if layer < n})  # never empty: 13/32·n < n
        elif self.selection_layers == "periodic":
            layers = list(range(min(2, n - 1), n, self.period))
        else:
            layers = sorted(self.selection_layers)
            if layers[-1] >= n:
                raise ValueError(f"tidal_decode: selection_layers {layers} out of range for a {n}-layer model")
        session.state["tidal_selection_layers"] = frozenset(layers)
        session.info["tidal_selection_layers"] = layers
        if self.scorer is not None:
            scorer = session.state["tidal_scorer"] = self._scorer()
            scorer.setup(session)  # e.g. FASA resolves its frequency chunks (its state keys are its own)

    def forward(self, call) -> torch.Tensor:
        """A selection layer that picks attends densely and ranks the keys by the probabilities of
        that same pass (:meth:`~tokensparse.engine.call.AttentionCall.dense_with_probs`, one pass);
        every other call goes through the selection pipeline (:meth:`select`)."""
        layers = call.session.state["tidal_selection_layers"]
        if call.kind == "decode" and call.layer_idx in layers:
            plan = KeyPlan(call, window=1)
            n_top, host = row_budgets(call, self.budget, -1)
            covered = plan.covers(n_top if host is None else host)
            taken = plan.host_counts(n_top if host is None else host)  # carried with the choice (host sizes)
            if self.scorer is not None and not covered:
                # a composed scorer ranks the keys; the selection layer attends to its own choice
                scorer = call.session.state["tidal_scorer"]
                with call.session.selecting():
                    scores = scorer.key_scores(call)
                    if scores is None:  # no cache to score from (use_cache=False)
                        return run(self, call)
                    if scores.shape[1] == 1:
                        scores = scores.expand(-1, call.n_kv_heads, -1)
                    chosen = plan.top(self._pooled(plan, scores[..., plan.lo : plan.hi]).contiguous(), n_top, taken)
                    call.carry[_CARRY] = (*chosen, taken)
                call.session.count("select")
                return execute(call, plan.selection(*chosen, kind="keys", taken=taken), impl="fast")
            if not covered:
                out, probs = call.dense_with_probs()
                with call.session.selecting():
                    weights = aggregate_gqa(probs[:, :, 0], call.n_kv_heads, self.gqa_reduce)  # (B, Hkv, Lk)
                    weights = self._pooled(plan, weights[..., plan.lo : plan.hi])
                    call.carry[_CARRY] = (*plan.top(weights, n_top, taken), taken)
                call.session.count("select")
                record_dense(call)
                return out
        return run(self, call)

    def _pooled(self, plan: KeyPlan, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` of the candidates ``[plan.lo, plan.hi)`` max-pooled over ``pool_kernel`` keys;
        non-candidates (a padded row's padding) are set to ``-inf`` first, so they never spread."""
        if self.pool_kernel <= 1:
            return scores
        if plan.cand_mask is not None:
            scores = scores.masked_fill(~plan.cand_mask[:, None, :], float("-inf"))
        return pool1d(scores, self.pool_kernel, "max")

    def select(self, call) -> Selection | None:
        if call.kind != "decode" or call.layer_idx < min(call.session.state["tidal_selection_layers"]):
            return None  # prefill and chunks run dense; so do the layers before the first selection
        plan = KeyPlan(call, window=1)  # the current token is always attended
        if call.layer_idx in call.session.state["tidal_selection_layers"]:
            # only reached when the budget covers everything (see forward): the next layers attend to all
            call.carry[_CARRY] = None
            call.session.count("select")
            return Selection.dense()
        if _CARRY not in call.carry:  # no selection layer ran in this pass (e.g. it is a sliding layer)
            call.session.count("no_selection_yet")
            return None
        chosen = call.carry[_CARRY]
        if chosen is None:
            return everything(call, "keys")
        top, valid, taken = chosen
        return plan.selection(top, valid, kind="keys", taken=taken)
