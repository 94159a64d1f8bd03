"""A method attached to a model: per-layer state, the cross-layer carry, statistics, telemetry.

The attention function (:mod:`tokensparse.engine.integration`) reaches the :class:`Session` of a
module through a weak map; methods reach it as ``call.session`` and their layer's state as
``call.layer``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .cache import KVCache
from .selection import Selection
from .telemetry import Telemetry


@dataclass(eq=False)
class LayerState:
    """Engine-owned state of one decoder layer; ``scratch`` is free for the method to use."""

    layer_idx: int
    scratch: dict = field(default_factory=dict)
    #: the decode executor's gathered K/V rows of the last selection (engine-owned, see pipeline._gathered)
    gathered: tuple | None = None


class Session:
    """A method (a :class:`~tokensparse.engine.method.Method`) attached to a model: what
    :func:`~tokensparse.engine.integration.sparsify` yields.

    ``stats`` counts, for every call the method acted on: ``calls``, ``dense_calls``,
    ``sparse_calls``, ``kept_keys`` and ``total_keys`` (summed over sparse calls; kept = mean
    selected keys per row and head), plus events a method counts itself (e.g. TokenSelect's
    ``reuse``/``select``) and ``sliding_dense_calls`` (sliding-window layers, always dense).
    """

    def __init__(self, model, method, telemetry: Telemetry | None):
        self.model = model
        self.method = method
        self.telemetry = telemetry
        self.stats: Counter = Counter()
        self.info: dict[str, Any] = {}  # facts worth reporting (e.g. which layers a method made sparse)
        self.state: dict[str, Any] = {}  # method-wide state resolved in Method.setup
        #: the channel between the layers of one forward pass (e.g. positions a selection layer
        #: chose for the layers after it); cleared at the start of every pass, so a layer that did
        #: not run in this pass cannot leave stale entries behind
        self.carry: dict[Any, Any] = {}
        self.forward_passes = 0
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.layers = [LayerState(i) for i in range(self.num_layers)]

    def new_cache(self, capacity: int | None = None, headroom: int = 256) -> KVCache:
        """A cache suited to the method: evicting layers for eviction methods, else preallocated ones."""
        return KVCache(self.model, evicting=self.method.needs_evicting_cache, capacity=capacity, headroom=headroom)

    def observe(self, call, selection: Selection) -> None:
        if self.telemetry is not None:
            self.telemetry.observe(call, selection)

    def begin_forward(self) -> None:
        """Start of a model forward pass (a forward pre-hook installed by ``sparsify``)."""
        self.carry.clear()
        self.forward_passes += 1
        self.method.on_forward_start(self)

    def reset_state(self) -> None:
        """Forget per-layer method state (e.g. selection caches) before an unrelated sequence."""
        self.carry.clear()
        for layer in self.layers:
            layer.scratch.clear()
            layer.gathered = None


