"""Every field of every method is checked at construction: bad values generated from the field
declarations (engine.config.param) must raise TypeError/ValueError naming the field and the value."""

import dataclasses
import math

import numpy as np
import pytest

import tokensparse as ts
from tokensparse.engine.config import spec_of, undeclared_fields


def bad_values(spec):
    """Values the declaration must refuse."""
    out = [object()]
    if not spec.optional:
        out.append(None)
    if spec.kind in ("int", "float", "budget"):
        out += ["3", True, [1]]
    if spec.kind in ("int", "float"):
        for bound, step in ((spec.ge, -1), (spec.gt, 0), (spec.le, 1), (spec.lt, 0)):
            if bound is not None:
                out.append(bound + step if step else bound)
    if spec.kind == "int":
        out += [2.5, float("nan")]
    if spec.kind == "float":
        out += [float("nan"), float("inf"), -float("inf")]
    if spec.kind == "budget":
        out += [0, -3, 0.0, 1.5, float("nan"), np.float64(-0.5)]
    if spec.kind == "choice":
        out += ["no-such-choice", 3, (spec.choices[0],)]
    if spec.kind in ("layers", "indices"):
        out += [7, "no-such-choice", ["a"], [1.5], [-1], [], [1, 1]]
    if spec.kind == "path":
        out += [3, ["a.json"]]
    return out


CASES = [
    (name, f.name, value)
    for name in ts.methods.names()
    for f in dataclasses.fields(ts.methods.get(name))
    for value in bad_values(spec_of(f))
]


@pytest.mark.parametrize("name", ts.methods.names())
def test_every_field_is_declared(name):
    assert undeclared_fields(ts.methods.get(name)) == []


@pytest.mark.parametrize("name,field,value", CASES, ids=[f"{n}.{f}={v!r}"[:60] for n, f, v in CASES])
def test_bad_value_is_refused_with_the_field_and_value_named(name, field, value):
    cls = ts.methods.get(name)
    with pytest.raises((TypeError, ValueError)) as err:
        cls(**{field: value})
    msg = str(err.value)
    assert field in msg
    if not (isinstance(value, float) and math.isnan(value)):
        assert repr(value) in msg or str(value) in msg
    assert "must be" in msg  # the accepted values are stated


@pytest.mark.parametrize("name", ts.methods.names())
def test_numpy_integers_are_integers(name):
    cls = ts.methods.get(name)
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        default = f.default
        if spec.kind in ("int", "budget") and isinstance(default, int) and not isinstance(default, bool):
            kwargs = {f.name: np.int64(default)}
            if spec.kind == "budget":
                kwargs[f.name] = np.int64(1 << 20)
            cfg = cls(**kwargs)
            value = getattr(cfg, f.name)
            assert type(value) is int and value == int(kwargs[f.name])


def test_cross_field_checks_still_apply():
    with pytest.raises(ValueError, match="n_sink"):
        ts.methods.get("streaming_llm")(budget=4, n_sink=4)
    with pytest.raises(ValueError, match="window"):
        ts.methods.get("snapkv")(budget=8, window=16)
    with pytest.raises(ValueError, match="n_local"):
        ts.methods.get("token_select")(budget=600, n_sink=128, n_local=512)


def test_layer_lists_are_normalised():
    cfg = ts.methods.get("token_sparse")(layers=(np.int64(3), 1))
    assert cfg.layers == [3, 1] and all(type(i) is int for i in cfg.layers)
