"""MInference's vertical-slash prefill against brute force: the column and diagonal scores, the kept
lines, the block mapping, full budget = dense, padded rows = the prompt alone, config errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import n_blocks
from tokensparse.methods.minference import keep_lines, vertical_slash_blocks, vertical_slash_scores
from tokensparse.testing import TOLERANCE, full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _brute_scores(q, k, last_q, scale):
    """Term by term: each estimating query's causal softmax, added to its key's column and to its
    offset's diagonal."""
    b, hq, length, _ = q.shape
    g = hq // k.shape[1]
    vertical = torch.zeros(b, hq, length, dtype=torch.float64)
    slash = torch.zeros(b, hq, length, dtype=torch.float64)
    for h in range(hq):
        for p in range(max(0, length - last_q), length):
            logits = (q[:, h, p].double()[:, None, :] * k[:, h // g, : p + 1].double()).sum(-1) * scale  # (B, p+1)
            probs = torch.softmax(logits, -1)
            for key in range(p + 1):
                vertical[:, h, key] += probs[:, key]
                slash[:, h, p - key] += probs[:, key]
    return vertical, slash


@pytest.mark.parametrize("length,last_q", [(1, 64), (20, 64), (37, 8), (50, 1)])
def test_scores_match_brute_force(length, last_q):
    torch.manual_seed(length)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    vertical, slash = vertical_slash_scores(q, k, last_q, 0.3)
    bv, bs = _brute_scores(q, k, last_q, 0.3)
    assert max_diff(vertical.double(), bv) < 1e-5
    assert max_diff(slash.double(), bs) < 1e-5
    n = min(last_q, length)  # each estimating query spreads mass 1 over its keys and over its diagonals
    assert torch.allclose(vertical.sum(-1), torch.full((2, 4), float(n)), atol=1e-4)
    assert torch.allclose(slash.sum(-1), torch.full((2, 4), float(n)), atol=1e-4)


def test_keep_lines_brute_force():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 40).round(decimals=1)  # many ties
    for budget, forced in ((5, 3), (0.25, 0), (2, 6), (40, 2), (1.0, 0), (0.01, 1)):
        got = keep_lines(scores, budget, forced)
        count = min(40, max(budget if isinstance(budget, int) else max(1, round(budget * 40)), forced))
        for b in range(2):
            for h in range(3):
                keep = set(range(forced))
                rest = sorted(set(range(40)) - keep, key=lambda j: (-float(scores[b, h, j]), j))
                keep |= set(rest[: count - len(keep)])
                assert set(got[b, h].nonzero().flatten().tolist()) == keep, (budget, forced, b, h)


def _brute_blocks(columns, diagonals, block, dense_from=None):
    """Token by token: query block i reads key block j when some real (query, key) pair in it lies
    on a kept column or a kept diagonal (causal)."""
    b, h, length = columns.shape
    nb = n_blocks(length, block)
    out = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for r in range(b):
        for hh in range(h):
            for qpos in range(length):
                for key in range(qpos + 1):
                    if columns[r, hh, key] or diagonals[r, hh, qpos - key]:
                        out[r, hh, qpos // block, key // block] = True
    if dense_from is not None:
        for i in range(dense_from, nb):
            out[:, :, i, : i + 1] = True
    return out


@pytest.mark.parametrize("length,block", [(64, 8), (61, 8), (45, 7), (5, 8), (30, 1)])
def test_block_mapping_matches_brute_force(length, block):
    gen = torch.Generator().manual_seed(length * 31 + block)
    for density in (0.05, 0.2):
        columns = torch.rand(2, 3, length, generator=gen) < density
        diagonals = torch.rand(2, 3, length, generator=gen) < density
        diagonals[..., 0] = True
        assert torch.equal(vertical_slash_blocks(columns, diagonals, block), _brute_blocks(columns, diagonals, block))
        nb = n_blocks(length, block)
        dense_from = max(0, nb - 2)
        assert torch.equal(vertical_slash_blocks(columns, diagonals, block, dense_from),
                           _brute_blocks(columns, diagonals, block, dense_from))


def test_engine_executes_the_brute_force_choice():
    """The selections the engine runs are the brute-force blocks of the brute-force lines."""
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 96)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append((call.query, call.key, call.scale, sel))

    method = ts.methods.get("minference")(vertical=4, slash=0.07, last_q=16, n_sink=3, n_local=5, block=16,
                                          dense_layers=0, dense_tail=0)
    with ts.sparsify(model, method, observers=[Spy()]), torch.no_grad():
        model(input_ids=ids)
    assert seen
    for q, k, scale, sel in seen:
        nb = n_blocks(q.shape[2], 16)
        if sel.idx is None:  # every causal block chosen: the engine runs it dense
            got = torch.ones(1, k.shape[1], nb, nb, dtype=torch.bool).tril()
        else:
            got = torch.zeros(1, sel.idx.shape[1], nb, nb, dtype=torch.bool)
        for h in range(0 if sel.idx is None else sel.idx.shape[1]):
            for i in range(nb):
                ok = sel.idx[0, h, i] if sel.valid is None else sel.idx[0, h, i][sel.valid[0, h, i]]
                got[0, h, i, ok] = True
        vertical, slash = vertical_slash_scores(q, k, 16, scale)  # against brute force above; ranked as the
        bv, bs = _brute_scores(q, k, 16, scale)  # method ranks them (fp32 sums: no near-tie flips)
        assert max_diff(vertical.double(), bv) < 1e-5 and max_diff(slash.double(), bs) < 1e-5
        g = q.shape[1] // k.shape[1]
        vertical, slash = vertical.view(1, k.shape[1], g, -1).sum(2), slash.view(1, k.shape[1], g, -1).sum(2)
        expect = _brute_blocks(keep_lines(vertical, 4, 3), keep_lines(slash, 0.07, 5), 16)
        assert torch.equal(got, expect)
    assert any(sel.idx is not None for *_, sel in seen), "no layer ran sparse"


def test_full_budget_equals_dense():
    dense, runs = full_budget_runs(tiny_model("llama"), ts.methods.get("minference").at_full_budget())
    for _, full, _ in runs:
        assert max(max_diff(full[0, 5:], dense[0, 5:]), max_diff(full[1], dense[1])) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("select_per", ["kv_head", "query_head"])
def test_padded_row_equals_the_prompt_alone(select_per):
    model = tiny_model("llama")
    pad = 7
    method = ts.methods.get("minference")(vertical=0.1, slash=3, last_q=8, n_sink=2, n_local=2, block=8,
                                          dense_layers=0, dense_tail=0, select_per=select_per)
    batched, alone, dense = padded_row_and_alone(model, method, 60, pad)
    assert max_diff(batched[0, pad:], alone[0]) <= TOLERANCE[torch.float32]
    assert max_diff(alone, dense) > 1e-4, "the method did not act"


def test_config_errors():
    M = ts.methods.get("minference")
    with pytest.raises(ValueError, match="vertical"):
        M(vertical=0)
    with pytest.raises(ValueError, match="slash"):
        M(slash=1.5)
    with pytest.raises(ValueError, match="n_local"):
        M(n_local=0)
    with pytest.raises(ValueError, match="last_q"):
        M(last_q=0)
    with pytest.raises(ValueError, match="select_per"):
        M(select_per="layer")
    with pytest.raises(TypeError):
        M(vertical="all")


def test_budgets_scale_with_the_prompt():
    """A share keeps that share of the lines (at least the forced ones); an int a fixed count."""
    scores = torch.rand(1, 1, 200)
    assert int(keep_lines(scores, 0.1, 3).sum()) == 20
    assert int(keep_lines(scores, 7, 30).sum()) == 30
    assert int(keep_lines(scores[..., :10], 100, 3).sum()) == 10
    assert math.isclose(float(keep_lines(scores, 1.0, 0).float().mean()), 1.0)
