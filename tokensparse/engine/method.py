"""The method base class: a ``@dataclass`` config plus the hooks the engine calls.

A method is a config (its fields are declared with :func:`tokensparse.engine.config.param` and
checked on construction) and a few hooks; everything else — executors, telemetry, statistics,
the forced-sparse test switch, eviction bookkeeping — belongs to the engine
(:mod:`tokensparse.engine.pipeline`). Hooks, in the order the engine calls them:

* ``setup(session)``: once when the method is attached to a model (resolve layers, load profiles);
* ``on_forward_start(session)``: at the start of every model forward pass, after the engine has
  cleared ``session.carry`` (the channel between the layers of one pass);
* ``select(call) -> Selection | None``: per attention call; ``None`` = the method does not act on
  this call (dense, not observed). Score-based methods build it with
  :class:`~tokensparse.engine.pipeline.KeyPlan`;
* ``key_bias(call) -> KeyBias | None``: an additive logit bias on a few key columns, applied by
  whichever executor runs (fast paths included);
* ``compress_prompt(model, context_ids)``: only for ``Phase.PROMPT`` methods — called by
  :func:`~tokensparse.engine.prompt.apply_prompt_step` (the evaluation harness does) before the
  model sees the prompt; returns the context positions to keep;
* ``keep_rows(session, layer_idx, hidden)``: only for methods with ``prunes_rows = True`` — after
  every decoder layer, the rows of the pass the later layers keep
  (:class:`~tokensparse.engine.rows.RowKeep`, or ``None`` to keep all); the engine gathers the hidden
  states, positions, masks and cache rows (:mod:`tokensparse.engine.rows`);
* ``forward(call)``: the escape hatch for a method that is not "select then execute"; the default
  runs the pipeline.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from .config import check_fields
from .pipeline import run

if TYPE_CHECKING:
    from .call import AttentionCall
    from .selection import KeyBias, Selection
    from .session import Session


class Phase(str, enum.Enum):
    """When a method acts; a ``str`` enum, so ``Phase.DECODE == "decode"`` and it prints as its value.

    * ``PREFILL``: changes attention while the prompt is processed (the cache stays full);
    * ``DECODE``: selects keys at decode steps (and cache chunks) over a full cache;
    * ``EVICTION``: physically drops cache rows;
    * ``REWEIGHT``: changes attention weights at every call and selects nothing (calibration
      methods such as ZeroTuning; the cache stays full);
    * ``PROMPT``: shortens the prompt before the model runs (prompt compression); inside
      ``sparsify`` it changes nothing, the harness applies it through
      :func:`~tokensparse.engine.prompt.apply_prompt_step`;
    * ``PRUNE``: drops hidden-state rows of a token span between decoder layers (the later layers
      compute and cache only the kept rows: FastV-style context-token pruning).
    """

    PREFILL = "prefill"
    DECODE = "decode"
    EVICTION = "eviction"
    REWEIGHT = "reweight"
    PROMPT = "prompt"
    PRUNE = "prune"

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Method:
    """Base class of every method config. Subclasses are ``@dataclass`` es registered by name.

    Class attributes describe the method for the registry table: ``name``, ``phase`` (a
    :class:`Phase`; the registry refuses anything else), ``schedule`` (free text saying when it
    acts, e.g. ``"every step"``), ``kv_memory`` (effect on KV memory), ``calibration`` (what
    offline step it needs, ``"no"`` if none), ``paper``; ``needs_evicting_cache`` for methods whose
    selections are ``keep`` (the engine then refuses a stock cache with a clear error);
    ``needs_cache_state`` for methods that keep state with the cache
    (:meth:`~tokensparse.engine.cache.PreallocLayer.state`: page summaries, accumulators), which
    therefore need ``cache=session.new_cache()`` too; ``kv_layout = "ragged"`` for eviction methods
    whose KV heads or layers keep different numbers of rows (their memory is then really freed).
    """

    name: ClassVar[str] = ""
    phase: ClassVar[Phase | str] = ""
    schedule: ClassVar[str] = ""
    kv_memory: ClassVar[str] = ""
    calibration: ClassVar[str] = "no"
    paper: ClassVar[str] = ""
    needs_evicting_cache: ClassVar[bool] = False
    needs_cache_state: ClassVar[bool] = False
    #: ``"ragged"``: ``session.new_cache()`` stores each KV head at its own length after an eviction
    #: (:class:`~tokensparse.engine.cache.RaggedLayer`), for per-head / per-layer budgets
    kv_layout: ClassVar[str] = "padded"
    #: the engine asks :meth:`keep_rows` after every decoder layer (decoder-layer hooks installed)
    prunes_rows: ClassVar[bool] = False
    #: the method leaves a one-shot prefill of an empty cache dense and keeps nothing from it but the
    #: cache rows (its cache states are built from the rows held when first asked for), so a run may
    #: start from a copy of a dense prefill's cache instead of prefilling again (the evaluation
    #: runner's ``share_prefill``); tests/test_shared_prefill.py checks every method declaring it
    dense_prefill: ClassVar[bool] = False
    #: methods calibrated offline: the kind of :class:`~tokensparse.engine.calibration.Profile` that
    #: :meth:`calibrate` measures (``tokensparse calibrate --method NAME``) and its payload version
    profile_kind: ClassVar[str] = ""
    profile_version: ClassVar[int] = 1

    @classmethod
    def calibrate(cls, model, input_ids: torch.Tensor) -> dict:
        """Methods with a ``profile_kind``: measure on ``input_ids (1, L)`` (dense attention) and return
        the profile payload (a JSON-serialisable dict)."""
        raise NotImplementedError(f"{cls.name or cls.__name__} needs no calibration")

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        """One or two lines the ``calibrate`` command prints about a fresh profile."""
        return ""

    def __post_init__(self):
        check_fields(self)  # every field declared with engine.config.param: type, range, choices
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ``ValueError`` naming the fields (called on construction, after
        every declared field was checked on its own)."""

    @classmethod
    def at_full_budget(cls) -> "Method":
        """A config under which the method must reproduce dense attention."""
        raise NotImplementedError

    @classmethod
    def at_sparse_budget(cls) -> "Method":
        """A config that really skips or evicts tokens on the 20–40-token prompts of the test
        matrices (used to check that a row of a padded batch equals the same prompt alone)."""
        raise NotImplementedError

    def setup(self, session: "Session") -> None:
        """Called once when the method is attached to a model (resolve layers, load profiles)."""

    def on_forward_start(self, session: "Session") -> None:
        """Called at the start of every model forward pass (``session.carry`` is already empty)."""

    def select(self, call: "AttentionCall") -> "Selection | None":
        """What this call attends to (or keeps); ``None`` = the method leaves this call dense."""
        return None

    def key_bias(self, call: "AttentionCall") -> "KeyBias | None":
        """An additive logit bias on a few key columns for this call, or ``None``."""
        return None

    def compress_prompt(self, model, context_ids: torch.Tensor) -> torch.Tensor:
        """``Phase.PROMPT`` methods: the positions of ``context_ids (1, n)`` to keep, a sorted 1-D
        long tensor (the kept tokens are fed in their original order)."""
        raise NotImplementedError(f"{self.name or type(self).__name__} is not a prompt-step method")

    def keep_rows(self, session: "Session", layer_idx: int, hidden: torch.Tensor):
        """Methods with ``prunes_rows``: after decoder layer ``layer_idx`` produced ``hidden (B, L, d)``
        (the rows this layer computed), the rows the later layers keep — a
        :class:`~tokensparse.engine.rows.RowKeep` or a ``(B, L')`` long index — or ``None`` (keep all)."""
        return None

    def forward(self, call: "AttentionCall") -> torch.Tensor:
        """Attention output ``(B, Hq, Lq, D)`` for one call: by default the selection pipeline."""
        return run(self, call)

    def key_scores(self, call: "AttentionCall") -> "torch.Tensor | None":
        """Scorer methods (usable as another method's ``scorer``, e.g. TidalDecode's): how much each
        key of this decode call is needed, ``(B, 1 | Hkv, Lk)`` float, higher = keep, ``-inf`` on
        keys that hold no token, on one scale across heads (a per-head distribution or its log: a
        composer may combine heads by their maximum). ``None``: this method is not a scorer."""
        return None

    #: True for block-routing prefill methods: they implement :meth:`blockset` and have a ``block``
    #: field, so another method can use them as its block rule (Token Sparse Attention's ``inner``)
    block_router: ClassVar[bool] = False

    def blockset(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int):
        """Block-routing prefill methods (``block_router = True``, with a ``block`` field): the key
        blocks each query block of one *unpadded* causal prompt reads in layer ``layer_idx``, as
        ``(set, complete)`` — ``set (b, H, nb, nb)`` bool on a grid of ``block``-row blocks from the
        first row (``nb = ⌈L / block⌉``; ``H`` the method's heads: ``k``'s or ``q``'s) and whether
        that is every causal block (``None``: not known) — or ``None`` where the method leaves the
        layer dense. ``q (b, Hq, L, D)``, ``k (b, Hkv, L, D)``: any prompt, e.g. the compressed rows
        of another method (:mod:`tokensparse.engine.compressed`). The method's own ``select`` runs
        the same rule through :func:`~tokensparse.engine.blocks.prefill_blocksets`."""
        return None

    def config_dict(self) -> dict:
        """``{"method": name, **fields}``; fields declared ``added=True`` are left out at their default."""
        values = asdict(self)
        omit = {f.name for f in fields(self) if f.metadata.get("added") and values[f.name] == f.default}
        return {"method": self.name, **{k: v for k, v in values.items() if k not in omit}}
