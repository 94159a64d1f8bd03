"""A method attached to a model: per-layer state, the cross-layer carry, statistics, telemetry.

The attention function (:mod:`tokensparse.engine.integration`) reaches the :class:`Session` of a
module through a weak map; methods reach it as ``call.session`` and their layer's state as
``call.layer``.
"""

from __future__ import annotations

import contextlib
import time

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import KVCache
from .hostsync import host_read_is_free
from .selection import Selection
from .observers import Observer, wants_calls
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

    Engine and decode-path code counts through :meth:`count`, never ``stats[...] +=``: a count
    known only on the device (e.g. the kept keys of a selection with filler entries) is then added
    up on the device and read once, when ``stats`` is read, instead of a host synchronisation per
    call (see docs/ARCHITECTURE.md, "Host synchronisation").
    """

    def __init__(self, model, method, telemetry: Telemetry | None, observers=()):
        self.model = model
        self.method = method
        self.telemetry = telemetry
        #: attached :class:`~tokensparse.engine.observers.Observer` s (telemetry is one of them)
        self.observers: list[Observer] = []
        self._call_observers: list[Observer] = []  # those with an ``on_call`` hook
        self.add_observers(([telemetry] if telemetry is not None else []) + list(observers))
        self._counts: Counter = Counter()
        #: device-side counters not yet read: (name, device) -> running 0-dim sum (see :meth:`count`)
        self._pending: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.info: dict[str, Any] = {}  # facts worth reporting (e.g. which layers a method made sparse)
        self.state: dict[str, Any] = {}  # method-wide state resolved in Method.setup
        #: the channel between the layers of one forward pass (e.g. positions a selection layer
        #: chose for the layers after it); cleared at the start of every pass, so a layer that did
        #: not run in this pass cannot leave stale entries behind
        self.carry: dict[Any, Any] = {}
        self.forward_passes = 0
        #: the rows the current layer computes when a method pruned hidden rows in this pass
        #: (:class:`~tokensparse.engine.rows.RowMap`; ``None`` = all), with the pass's length and the
        #: tokens cached before it (set by the decoder-layer hooks, engine-owned)
        self.rows = None
        self.pass_len = 0
        self.pass_offset = 0
        #: a marked token span ``(start, end)`` of the next prompt, in positions of its real tokens
        #: (e.g. the context of a prompt, or an image's tokens); see :meth:`mark_span`
        self.span: tuple[int, int] | None = None
        #: when True, :meth:`selecting` adds the wall time of each selection (scoring and top-k) to
        #: ``stats["selection_s"]`` (benchmarks switch it on; a perf_counter pair per call)
        self.time_selection = False
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.layers = [LayerState(i) for i in range(self.num_layers)]

    @property
    def stats(self) -> Counter:
        """The counters (a ``Counter``); reading it reads pending device-side counts (one host
        synchronisation per counter, only when there are some)."""
        if self._pending:
            pending, self._pending = self._pending, {}
            for (name, _), total in pending.items():
                value = total.item()
                self._counts[name] += value
        return self._counts

    def count(self, name: str, value: "int | float | torch.Tensor" = 1) -> None:
        """Add ``value`` to counter ``name`` without a host synchronisation: a number at once, a
        0-dim tensor on its device (summed there; read when :attr:`stats` is read), or at once on a
        CPU, where reading it is free and cheaper than the sum. Integer tensors give an integer
        count, floating ones a float."""
        if not isinstance(value, torch.Tensor):
            self._counts[name] += value
            return
        if value.dim() != 0:
            raise ValueError(f"count({name!r}) takes a 0-dim tensor, got shape {tuple(value.shape)}")
        if host_read_is_free(value):
            self._counts[name] += value.item()
            return
        if value.is_floating_point():  # float64 where the device has it: sums of many calls stay exact
            value = value.to(torch.float32 if value.device.type == "mps" else torch.float64)
        else:
            value = value.long()
        key = (name, value.device)
        total = self._pending.get(key)
        self._pending[key] = value if total is None else total + value

    def new_cache(self, capacity: int | None = None, headroom: int = 256) -> KVCache:
        """A cache suited to the method: evicting layers for eviction methods (ragged ones for methods
        with per-head or per-layer budgets), else preallocated ones."""
        m = self.method
        return KVCache(self.model, evicting=m.needs_evicting_cache, capacity=capacity, headroom=headroom,
                       ragged=m.needs_evicting_cache and m.kv_layout == "ragged")

    def mark_span(self, start: int, end: int) -> None:
        """Mark tokens ``[start, end)`` of the next prompt (counted over each sequence's real tokens,
        left padding excluded) as the span that span methods act on (FastV's "image tokens",
        generalised: the evaluation harness marks a prompt's context). ``clear_span()`` removes it."""
        if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
            raise TypeError(f"mark_span takes two ints, got {start!r}, {end!r}")
        if not 0 <= start <= end:
            raise ValueError(f"mark_span needs 0 <= start <= end, got ({start}, {end})")
        self.span = (start, end)

    def clear_span(self) -> None:
        self.span = None

    @contextlib.contextmanager
    def selecting(self):
        """Wrap a method's selection work (scoring and top-k, not the attention it then runs):
        timed into ``stats["selection_s"]`` when :attr:`time_selection` is on."""
        if not self.time_selection:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.count("selection_s", time.perf_counter() - t0)

    def add_observers(self, observers) -> None:
        for o in observers:
            if not isinstance(o, Observer):
                raise TypeError(f"observers must be tokensparse Observer instances, got {type(o).__name__}")
            if any(o is x for x in self.observers):
                raise ValueError(f"{type(o).__name__} is already attached to this session")
            self.observers.append(o)
            if wants_calls(o):
                self._call_observers.append(o)

    def remove_observers(self, observers) -> None:
        ids = {id(o) for o in observers}
        self.observers = [o for o in self.observers if id(o) not in ids]
        self._call_observers = [o for o in self._call_observers if id(o) not in ids]

    def observe_call(self, call) -> None:
        """Every attention call, before the method runs (observers' ``on_call``)."""
        for o in self._call_observers:
            o.on_call(call)

    def observe(self, call, selection: Selection) -> None:
        """A call the method acted on (observers' ``on_selection``)."""
        for o in self.observers:
            o.on_selection(call, selection)

    def begin_forward(self) -> None:
        """Start of a model forward pass (a forward pre-hook installed by ``sparsify``)."""
        self.carry.clear()
        self.rows = None
        self.forward_passes += 1
        self.method.on_forward_start(self)

    def reset_state(self) -> None:
        """Forget per-layer method state (e.g. selection caches) before an unrelated sequence."""
        self.carry.clear()
        for layer in self.layers:
            layer.scratch.clear()
            layer.gathered = None


