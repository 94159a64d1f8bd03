"""Rectified SpaAttn (methods/rectified.py) and the pooled-estimate helpers it uses (engine/blocks.py):
the fast path against the token-level reference, exact compensation of homogeneous dropped blocks,
full budget = dense, a padded row = the prompt alone, config errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import exercise_sparse_paths
from tokensparse.engine.blocks import (block_attend, blocks_from_sets, everything_blocks, pool_segments, pooled_attend,
                                       pooled_scores, selection_rows)
from tokensparse.methods.rectified import segment_ranges
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCALE = 0.35


def qkv(b=2, hq=4, hkv=2, length=45, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g),
            torch.randn(b, hkv, length, d, generator=g))


def random_sets(b, h, length, block, p=0.3, seed=0, lengths=None):
    """Causal block sets as the bases make them: block 0 and the diagonal always, others at random;
    ``lengths``: each row's real tokens (its own grid, left padding)."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-length // block)
    sets = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for r in range(b):
        n = -(-(lengths[r] if lengths else length) // block)
        s = (torch.rand(h, n, n, generator=g) < p) | torch.eye(n, dtype=torch.bool)
        s[..., 0] = True
        sets[r, :, :n, :n] = s.tril()
    return sets


def dense(q, k, v, key_valid=None):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * SCALE
    length = q.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ vv


def method(**kw):
    return ts.methods.get("rectified")(**kw)


# ---- helpers in engine/blocks.py ---------------------------------------------------------------------


def test_segment_ranges():
    assert segment_ranges(10, 4, 0) == [(0, 4), (4, 8), (8, 10)]
    assert segment_ranges(10, 4, 2) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert segment_ranges(10, 4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 8), (8, 10)]
    assert segment_ranges(10, 4, 9) == segment_ranges(10, 4, 4)  # at most the first block
    assert segment_ranges(3, 4, 1) == [(0, 1), (1, 3)]
    assert segment_ranges(1, 4, 2) == [(0, 1)]


def test_pool_segments_against_loops():
    x = torch.randn(2, 3, 11, 5)
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 2, 4, 4, 4, 1])  # group 3 is empty
    mean, spread, count = pool_segments(x, seg, 5)
    assert count.tolist() == [2, 2, 4, 0, 3] and spread.shape == (2, 3, 5)
    for g in range(5):
        rows = x[:, :, seg == g].double()
        if rows.shape[2] == 0:
            assert float(mean[:, :, g].abs().max()) == 0 and float(spread[:, :, g].abs().max()) == 0
            continue
        m = rows.mean(2)
        assert max_diff(mean[:, :, g], m) < 1e-12
        assert max_diff(spread[:, :, g], (rows - m[:, :, None]).norm(dim=-1).mean(2)) < 1e-12


def test_pooled_attend_is_exact_for_identical_keys():
    """Groups of identical keys: the pooled estimate equals attention over the keys themselves."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8)
    centers = torch.randn(1, 2, 3, 8)
    sizes = [2, 5, 3]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    k = centers[:, :, seg]
    v = torch.randn(1, 2, 10, 8)
    allowed = torch.rand(1, 4, 6, 3) < 0.7
    allowed[0, 0, 0] = False  # a row that reads nothing
    k_mean, _, count = pool_segments(k, seg, 3)
    v_mean, _, _ = pool_segments(v, seg, 3)
    out, lse = pooled_attend(pooled_scores(q, k_mean), SCALE, count, v_mean, allowed)
    token_allowed = allowed[..., seg]  # (1, 4, 6, 10)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = ((q @ kk.transpose(-1, -2)) * SCALE).masked_fill(~token_allowed, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ vv
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and float(out[0, 0, 0].abs().max()) == 0
    live = lse.isfinite()
    assert max_diff(lse[live], ref_lse[live]) < 1e-5 and max_diff(out, ref) < 1e-5


def test_selection_rows_follow_each_rows_grid():
    sets = random_sets(2, 1, 20, 4, lengths=[13, 20])
    sel = blocks_from_sets(sets, 4, 4)
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[0, :7] = False
    got = list(selection_rows(sel, 20, 20, key_valid))
    assert [(r, k0, q0) for r, k0, q0, _ in got] == [(0, 7, 7), (1, 0, 0)]
    assert torch.equal(got[0][3], sets[:1, :, :4, :4]) and torch.equal(got[1][3], sets[1:])


# ---- the rectified output ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 4], ids=["one-set", "per-kv-head", "per-q-head"])
@pytest.mark.parametrize("gapr", ["sparse", "drop", "off"])
@pytest.mark.parametrize("length,block,isolate", [(45, 4, 2), (40, 8, 0), (33, 5, 9)])
def test_fast_path_equals_token_reference(heads, gapr, length, block, isolate):
    q, k, v = qkv(length=length, seed=length)
    sel = blocks_from_sets(random_sets(2, heads, length, block, seed=block), block, block)
    m = method(gapr=gapr, isolate=isolate)
    fast = m.rectify(q, k, v, sel, SCALE, impl="gather")
    ref = m.reference(q, k, v, sel, SCALE)
    assert max_diff(fast, ref) < 2e-5
    assert max_diff(m.rectify(q, k, v, sel, SCALE, impl="sdpa"), ref) < 2e-5


def homogeneous(length=48, block=4, noise=0.0, seed=0):
    """Keys identical inside every block (plus ``noise``), except the first block's first key (a sink)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, length, 8, generator=g)
    nb = -(-length // block)
    k = torch.randn(1, 2, nb, 8, generator=g).repeat_interleave(block, 2)[:, :, :length]
    k = k + noise * torch.randn(k.shape, generator=g)
    k[:, :, 0] = 3 * torch.randn(1, 2, 8, generator=g)
    v = torch.randn(1, 2, length, 8, generator=g)
    sets = random_sets(1, 2, length, block, p=0.2, seed=seed)
    sets[..., 0] = sets[..., 0] & (torch.arange(nb) % 3 == 0)  # block 0 (with the sink) dropped by some query blocks
    sets |= torch.eye(nb, dtype=torch.bool)
    return q, k, v, blocks_from_sets(sets, block, block)


@pytest.mark.parametrize("gapr", ["off", "sparse"])
def test_homogeneous_dropped_blocks_are_compensated_exactly(gapr):
    q, k, v, sel = homogeneous()
    want = dense(q, k, v)
    sparse = block_attend(q, k, v, sel, SCALE, impl="gather")
    got = method(gapr=gapr, isolate=1).rectify(q, k, v, sel, SCALE)
    assert max_diff(sparse, want) > 0.1  # the selection does drop mass
    assert max_diff(got, want) < 1e-5
    # without isolating the sink the first block is not homogeneous: its estimate is not exact
    assert max_diff(method(gapr="off", isolate=0).rectify(q, k, v, sel, SCALE), want) > 1e-3


@pytest.mark.parametrize("gapr", ["off", "sparse", "drop"])
def test_rectification_moves_towards_dense(gapr):
    q, k, v, sel = homogeneous(noise=0.05, seed=1)
    want = dense(q, k, v)
    err_sparse = (block_attend(q, k, v, sel, SCALE, impl="gather") - want).norm()
    err_rect = (method(gapr=gapr).rectify(q, k, v, sel, SCALE) - want).norm()
    assert err_rect < 0.5 * err_sparse


def test_everything_selection_equals_dense():
    q, k, v = qkv(length=37)
    sel = everything_blocks(2, 1, 37, 37, 8, 8)
    out = method().rectify(q, k, v, sel, SCALE)
    assert max_diff(out, dense(q, k, v)) < 1e-5
    assert torch.equal(out, block_attend(q, k, v, sel, SCALE))  # nothing dropped: the sparse output, unchanged


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_padded_row_equals_alone_function_level(impl):
    q, k, v = qkv(length=30, seed=3)
    pad = 9
    key_valid = torch.ones(2, 30, dtype=torch.bool)
    key_valid[0, :pad] = False
    sets = random_sets(2, 2, 30, 4, lengths=[30 - pad, 30], seed=3)
    m = method(gapr="sparse", isolate=2)
    run = (lambda *a, **kw: m.rectify(*a, **kw)) if impl == "fast" else (lambda *a, **kw: m.reference(*a, **kw))
    both = run(q, k, v, blocks_from_sets(sets, 4, 4), SCALE, key_valid=key_valid)
    alone = run(q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], blocks_from_sets(sets[:1, :, :6, :6], 4, 4), SCALE)
    assert max_diff(both[:1, :, pad:], alone) < 1e-6
    assert float(both[0, :, :pad].abs().max()) == 0  # padding query rows output 0


# ---- through a model ---------------------------------------------------------------------------------


def _logits(model, m, ids, mask, forced=False):
    ctx = exercise_sparse_paths() if forced else torch.no_grad()
    with torch.no_grad(), ctx, ts.sparsify(model, m) as s:
        out = model(ids, attention_mask=mask, cache=s.new_cache()).logits
    return out, dict(s.stats)


@pytest.mark.parametrize("forced", [False, True])
def test_full_budget_equals_dense_on_a_model(forced):
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 40, pad=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    got, _ = _logits(model, ts.methods.get("rectified").at_full_budget(), ids, mask, forced)
    assert max_diff(got, want, mask) < 1e-4


def test_model_run_rectifies_pads_and_matches_reference():
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 40, pad=7)
    m = ts.methods.get("rectified").at_sparse_budget()
    got, stats = _logits(model, m, ids, mask)
    assert stats["sparse_calls"] > 0
    base, _ = _logits(model, m.base_method, ids, mask)
    assert max_diff(got, base, mask) > 1e-4  # the correction changes the output
    alone, _ = _logits(model, m, ids[:1, 7:], mask[:1, 7:])
    assert max_diff(got[:1, 7:], alone) < 1e-4
    ref_method = method(base=m.base, base_config=m.base_config, gapr=m.gapr, isolate=m.isolate, impl="reference")
    ref, _ = _logits(model, ref_method, ids, mask)
    assert max_diff(got, ref, mask) < 1e-4


def test_decode_runs_dense_after_a_rectified_prefill():
    model = tiny_model("llama")
    ids, mask = tiny_inputs(1, 40)
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("rectified").at_sparse_budget()) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 43


# ---- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, exc, words", [
    ({"base": "snapkv"}, ValueError, ["base", "snapkv"]),
    ({"base_config": [("budget", 0.5)]}, TypeError, ["base_config", "dict"]),
    ({"base_config": {1: 2}}, TypeError, ["base_config"]),
    ({"base": "biformer", "base_config": {"threshold": 0.8}}, TypeError, ["base_config", "biformer", "threshold"]),
    ({"base": "xattention", "base_config": {"threshold": 1.5}}, ValueError, ["base_config", "threshold", "1.5"]),
    ({"gapr": "yes"}, ValueError, ["gapr"]),
    ({"isolate": -1}, ValueError, ["isolate"]),
    ({"impl": "flex"}, ValueError, ["impl"]),
])
def test_config_errors_name_the_field(kw, exc, words):
    with pytest.raises(exc) as err:
        method(**kw)
    for w in words:
        assert w in str(err.value)


def test_config_round_trips_and_defaults():
    m = method(base="biformer", base_config={"budget": 0.0625, "dense_tail": 0})
    assert m.base_method.budget == 0.0625 and m.base_method.dense_tail == 0
    cfg = m.config_dict()
    assert cfg["base_config"] == {"budget": 0.0625, "dense_tail": 0}
    again = method(**{k: v for k, v in cfg.items() if k != "method"})
    assert again.config_dict() == cfg
    assert method().base_method.config_dict() == ts.methods.get("xattention")().config_dict()
    assert math.isclose(method(base_config={"threshold": 0.8}).base_method.threshold, 0.8)
