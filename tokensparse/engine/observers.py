"""Observers: read attention calls without changing them (Engine v2 part 2).

An :class:`Observer` sees two things, through two hooks the engine calls:

* ``on_call(call)``: every attention call of the model, before the method runs — prefill, chunks,
  decode steps, sliding-window layers, calls the method leaves alone. The call's Q/K/V, mask,
  padding and cache are all there (:class:`~tokensparse.engine.call.AttentionCall`). Analysis
  observers (sink detection, retrieval-head scores, attention-distance metrics) use this one.
* ``on_selection(call, selection)``: the calls a method acted on, with its
  :class:`~tokensparse.engine.selection.Selection` (a complete selection arrives as
  ``Selection.dense()``). :class:`~tokensparse.engine.telemetry.Telemetry` is this kind.

Observers attach in two ways that compose:

* ``ts.sparsify(model, method, observers=[...])``: next to a method;
* ``ts.observe(model, *observers)``: on its own (the model then runs dense attention through the
  engine, with nothing selected) or, entered inside ``sparsify``, added to the running session
  until the block ends.

An observer must not modify the call's tensors. What it computes inside the call costs time: do
not time a run with observers attached.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .method import Method, Phase

if TYPE_CHECKING:
    from .call import AttentionCall
    from .selection import Selection

__all__ = ["Observer", "observe", "observe_prompt"]


class Observer:
    """Base class: override ``on_call`` and/or ``on_selection``; ``report()`` returns what was
    observed (JSON-ready); ``reset()`` forgets it."""

    def on_call(self, call: "AttentionCall") -> None:
        """Every attention call, before the method runs."""

    def on_selection(self, call: "AttentionCall", selection: "Selection") -> None:
        """A call the method acted on, with its selection."""

    def report(self) -> dict:
        return {}

    def reset(self) -> None:
        """Forget everything observed so far."""


def wants_calls(observer: Observer) -> bool:
    """True when ``observer`` overrides ``on_call`` (the engine skips the hook otherwise)."""
    return type(observer).on_call is not Observer.on_call


@dataclass(eq=False)
class ObserveOnly(Method):
    """The engine's placeholder method under ``ts.observe`` outside ``sparsify``: selects nothing,
    every call runs dense attention (not registered; not a method a user picks)."""

    name = "observe_only"
    phase = Phase.REWEIGHT
    schedule = "never acts"
    kv_memory = "none"

    @classmethod
    def at_full_budget(cls) -> "ObserveOnly":
        return cls()


@contextlib.contextmanager
def observe(model, *observers: Observer):
    """Attach ``observers`` to ``model`` inside the block; yields the session they run in.

    Outside ``ts.sparsify`` the model runs dense attention through the engine (outputs equal to
    SDPA's); inside it, the observers join the running session and leave it on exit.
    """
    from .integration import active_session, sparsify

    for o in observers:
        if not isinstance(o, Observer):
            raise TypeError(f"ts.observe expects Observer instances, got {type(o).__name__}")
    session = active_session(model)
    if session is None:
        with sparsify(model, ObserveOnly(), observers=list(observers)) as s:
            yield s
        return
    session.add_observers(observers)
    try:
        yield session
    finally:
        session.remove_observers(observers)


def observe_prompt(model, input_ids, *observers: Observer) -> None:
    """One dense forward pass of ``input_ids`` (no cache, the last logit only) with ``observers``
    attached: how calibrations and prompt scorers measure attention on a prompt."""
    dev = next(model.parameters()).device
    with torch.no_grad(), observe(model, *observers):
        model(input_ids=input_ids.to(dev), use_cache=False, logits_to_keep=1)

