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
selection_layers: str | list[int] = "periodic"
    The layers that select. ``"paper"``: layer 2 (the paper's ``sparse_layer_start``) and the
    re-selection layer ``round(13 / 32 · n_layers)`` (the paper's layer 13 of Llama-3-8B scaled to
    the model's depth: 12 of SmolLM2's 30; the paper picks it per model by a sweep).
    ``"periodic"`` (beyond the paper): layer 2 and every ``period``-th layer after it (2, 6, 10, …,
    26 of 30 at ``period=4``), so no layer reuses positions chosen more than ``period - 1`` layers
    above it. A list sets them explicitly (one layer: no re-selection; more than two: more
    re-selections). Layers before the first one run dense.
period: int = 4
    Layers between two selection layers with ``selection_layers="periodic"`` (another value with
    other selection layers is an error).
gqa_reduce: str = "max"
    How the attention weights of the query heads that share a position set are combined before
    the top-k (``max``, ``mean`` or ``sum``): a KV head's group, or every head with
    ``select_per="layer"``. K/V rows are read once per KV head either way.
select_per: str = "layer"
    ``"layer"`` (beyond the paper): one position set for the whole layer, the weights combined
    over every query head by ``gqa_reduce`` (a composed scorer's per-KV-head scores likewise), so
    a reusing layer's heads see the tokens any head of the selection layer attended to.
    ``"kv_head"``: one set per KV head from its query group (the GQA form of the paper's per-head
    sets): a reusing head then gets the choice of the selection layer's head of the same index,
    an arbitrary pairing, since heads of two layers share nothing.

    The defaults (a selection layer every 4 layers, one set per layer) are not the paper's
    (``selection_layers="paper", select_per="kv_head"``): on SmolLM2's v2 suite
    (docs/results/decode_suite/, 25 % budget) the paper's schedule loses 40.2 points on the 2K half
    (tuning set) and 25.0 at 4K (held out), with 36–40 nats of answer log-likelihood. One set per
    layer halves the loss at the paper's layers (−22.4 points at 2K) and at a selection layer every
    6 layers (−8.8 against −16.7, −1.9 nats against −18.0) and every 4 layers (+0.2 points, 1 win
    / 1 loss of 35, −0.22 nats: within dense's noise, against −9.8 points and −6.8 nats with one
    set per KV head); held out, every 4 layers with one set per layer is within the noise at 4K
    (−1.2 points, 1 win / 2 losses of 21, −0.01 nats) and 8K (dense's answers, −1.85 nats). The
    price: 9 of 30 layers read the whole cache (layers 0–1 and the seven selection layers)
    against 4 (docs/results/decode_suite/README.md has the speed).
    Other settings measured: layers 0–13 dense with one selection layer at 14: −7.4 / −10.7 points
    at 2K / 4K with 15–23 nats lost; ``pool_kernel=15``: no gain; a 2048-token budget with the
    paper's schedule: −16.7 points at 4K.
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
    ``pool_kernel``). With the periodic layers (every 6, one set per KV head) on the 2K half:
    −15.7 points against −16.7 unpooled (no gain).

Deviations: the default schedule and sharing (``selection_layers``, ``select_per`` above; the
paper's: ``selection_layers="paper", select_per="kv_head"``). The HF reference selects per query
head (after repeating K/V) and its kernel path does not support GQA (the README lists it as future
work); here one set per KV head from the group's combined weights (``select_per="kv_head"``) or one
per layer. The cache correction of the paper's system (re-computing the K/V of tokens decoded
sparsely) is not in the HF reference and not implemented. Chunks of several queries on a filled
cache run dense (the method is decode-only). Batches are supported (budgets per row's real tokens;
padding is never selected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import at_default, composed, param
from ..engine.method import Method, Phase
from ..engine.pipeline import KeyPlan, everything, execute, record_dense, row_budgets, run
from ..engine.selection import GQA_REDUCTIONS, Selection, aggregate_gqa

_CARRY = "tidal_decode.positions"

#: registered methods whose ``key_scores`` can drive the selection layers (``scorer=``)
SCORERS = ("quest", "landmark", "token_select", "fasa")


@dataclass(eq=False)
class TidalDecode(Method):
    name = "tidal_decode"
    phase = Phase.DECODE
    schedule = "each decode step: select in a few layers (every 4th from layer 2 by default), reuse in the others"
    kv_memory = "none (full cache; reads only selected rows)"
    calibration = "optional: selection-layer sweep (default: every 4th layer, chosen on SmolLM2's v2 suite)"
    paper = "[TidalDecode](https://arxiv.org/abs/2410.05076)"

    budget: int | float = param(0.25, "budget")
    selection_layers: str | list[int] = param("periodic", "layers", choices=("paper", "periodic"))
    gqa_reduce: str = param("max", "choice", choices=GQA_REDUCTIONS)
    # select_per and period are recorded in every row key: rows from before the defaults changed
    # (the paper's schedule, one set per KV head) left them out and must not match later runs
    select_per: str = param("layer", "choice", choices=("kv_head", "layer"))
    scorer: str | None = param(None, "choice", choices=SCORERS, optional=True, added=True)
    pool_kernel: int = param(1, "int", ge=1, added=True)
    period: int = param(4, "int", ge=1)
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
                    scores = self._per(scores, call.n_kv_heads)
                    scores = plan.pooled(scores[..., plan.lo : plan.hi], self.pool_kernel)
                    chosen = plan.top(scores.contiguous(), n_top, taken)
                    call.carry[_CARRY] = (*chosen, taken)
                call.session.count("select")
                return execute(call, plan.selection(*chosen, kind="keys", taken=taken), impl="fast")
            if not covered:
                out, probs = call.dense_with_probs()
                with call.session.selecting():
                    weights = self._per(probs[:, :, 0], call.n_kv_heads)  # (B, Hkv, Lk)
                    weights = plan.pooled(weights[..., plan.lo : plan.hi], self.pool_kernel)
                    call.carry[_CARRY] = (*plan.top(weights, n_top, taken), taken)
                call.session.count("select")
                record_dense(call)
                return out
        return run(self, call)

    def _per(self, scores: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """Per-head scores ``(B, H, Lk)`` (query heads, KV heads or one) → the rows the top-k ranks:
        ``(B, Hkv, Lk)``, each KV head's group combined, or with ``select_per="layer"`` ``(B, 1,
        Lk)``, every head combined (one set, which the executors apply to every KV head)."""
        if self.select_per == "layer":
            return scores if scores.shape[1] == 1 else aggregate_gqa(scores, 1, self.gqa_reduce)
        if scores.shape[1] == 1:
            return scores.expand(-1, n_kv_heads, -1)
        return scores if scores.shape[1] == n_kv_heads else aggregate_gqa(scores, n_kv_heads, self.gqa_reduce)

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
