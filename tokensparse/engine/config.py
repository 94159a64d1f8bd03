"""Declared, checked method settings.

Every field of a method config is declared with :func:`param`, which records what it accepts
(kind, range, choices, whether ``None`` is allowed). :meth:`Method.__post_init__` checks every
field against its declaration before the method's own cross-field ``validate()``, and normalises
numpy scalars to Python numbers, so a bad value fails at construction with an error that names
the field, the value and what is accepted, never later inside a forward pass. The tests generate
bad values for every declared field from the same declarations.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields

KINDS = ("int", "float", "budget", "choice", "layers", "indices", "path", "mapping")


@dataclass(frozen=True)
class Spec:
    """What one field accepts. Bounds: ``ge``/``gt``/``le``/``lt`` (inclusive/exclusive)."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    optional: bool = False

    def describe(self) -> str:
        """The accepted values in words, e.g. ``an int >= 1`` or ``one of 'max', 'avg'``."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "budget":
            text = "an int > 0 (tokens) or a float ratio in (0, 1]"
        elif self.kind in ("layers", "indices"):
            what = "layer indices" if self.kind == "layers" else "indices"
            text = "one of " + ", ".join(repr(c) for c in self.choices) + f" or a non-empty list of distinct {what} >= 0"
        elif self.kind == "path":
            text = "a file path (str)"
        elif self.kind == "mapping":
            text = "a dict of settings with str keys"
        else:
            text = {"int": "an int", "float": "a finite number"}[self.kind] + self._range()
        return text + (" or None" if self.optional else "")

    def _range(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None]
        return (" " + " and ".join(parts)) if parts else ""

    def in_range(self, x: float) -> bool:
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )


def param(default, kind: str, *, ge=None, gt=None, le=None, lt=None, choices=(), optional: bool = False,
          added: bool = False):
    """A dataclass field whose accepted values are declared (see :class:`Spec`).

    ``added=True``: a field added after results were stored whose default reproduces the earlier
    behaviour; :meth:`~tokensparse.engine.method.Method.config_dict` leaves it out while it holds
    that default, so stored evaluation rows (keyed by the full config) stay valid."""
    if kind not in KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; known: {KINDS}")
    spec = Spec(kind, ge, gt, le, lt, tuple(choices), optional)
    return field(default=default, metadata={"spec": spec, "added": bool(added)})


def spec_of(f) -> Spec | None:
    return f.metadata.get("spec")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_value(owner: str, name: str, spec: Spec, value):
    """``value`` normalised (numpy scalars → Python numbers, tuples of layers → list), or a
    ``TypeError``/``ValueError`` naming ``owner.name``, the value and what is accepted."""

    def fail(exc=ValueError):
        raise exc(f"{owner}: {name} must be {spec.describe()}, got {value!r}")

    if value is None:
        if spec.optional:
            return None
        fail(TypeError)
    kind = spec.kind
    if kind == "int":
        if not _is_int(value):
            fail(TypeError)
        value = int(value)
        if not spec.in_range(value):
            fail()
        return value
    if kind == "float":
        if not _is_real(value):
            fail(TypeError)
        x = float(value)
        if not math.isfinite(x) or not spec.in_range(x):
            fail()
        return x
    if kind == "budget":
        if _is_int(value):
            if int(value) <= 0:
                fail()
            return int(value)
        if not _is_real(value):
            fail(TypeError)
        x = float(value)
        if not (math.isfinite(x) and 0.0 < x <= 1.0):
            fail()
        return x
    if kind == "choice":
        if not isinstance(value, str):
            fail(TypeError)
        if value not in spec.choices:
            fail()
        return value
    if kind in ("layers", "indices"):
        if isinstance(value, str):
            if value not in spec.choices:
                fail()
            return value
        if not isinstance(value, (list, tuple)):
            fail(TypeError)
        if not all(_is_int(i) for i in value):
            fail(TypeError)
        out = [int(i) for i in value]
        if not out or any(i < 0 for i in out) or len(set(out)) != len(out):
            fail()
        return out
    if kind == "path":
        if not isinstance(value, (str, os.PathLike)):
            fail(TypeError)
        return os.fspath(value)
    if kind == "mapping":  # the values are the owner's to check (e.g. a composed method's own fields)
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            fail(TypeError)
        return dict(value)
    raise AssertionError(kind)


def check_fields(obj) -> None:
    """Check and normalise every declared field of the dataclass ``obj`` in place."""
    owner = getattr(obj, "name", "") or type(obj).__name__
    for f in fields(obj):
        spec = spec_of(f)
        if spec is not None:
            setattr(obj, f.name, check_value(owner, f.name, spec, getattr(obj, f.name)))


def undeclared_fields(cls) -> list[str]:
    """Fields of a method config declared without :func:`param` (the tests require none)."""
    return [f.name for f in fields(cls) if spec_of(f) is None]


def at_default(obj, name: str) -> bool:
    """Whether the dataclass field ``name`` of ``obj`` holds its declared default (for options that
    only apply with another one: a check that follows the default if it changes)."""
    return getattr(obj, name) == {f.name: f for f in fields(obj)}[name].default


def composed(owner: str, field_name: str, cls, settings: dict | None):
    """``cls(**settings)`` (``None``: its defaults): a method another one composes (``owner``'s
    ``field_name`` holds the settings). The composed method checks them; its error is re-raised
    naming the owner's field, the method and the settings."""
    try:
        return cls(**(settings or {}))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {field_name} must be settings of {cls.name}, got {settings!r} ({err})") from None
