"""Superlinear (training-free emulation) against brute force: the span size, the span scores, the
span choice, full budget = dense, padded rows = the prompt alone, config errors."""

from __future__ import annotations


import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import n_blocks
from tokensparse.methods.superlinear import span_scores
from tokensparse.testing import full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

M = ts.methods.get("superlinear")


def _brute_span_scores(q, k, block, span_blocks):
    """Mean query of each block · mean key of each span (real tokens only), max over the group."""
    b, hq, length, _ = q.shape
    g = hq // k.shape[1]
    nb, span = n_blocks(length, block), block * span_blocks
    ns = n_blocks(length, span)
    out = torch.full((b, k.shape[1], nb, ns), -float("inf"), dtype=torch.float64)
    for h in range(hq):
        for i in range(nb):
            qm = q[:, h, i * block : (i + 1) * block].double().mean(1)
            for s in range(ns):
                km = k[:, h // g, s * span : (s + 1) * span].double().mean(1)
                out[:, h // g, i, s] = torch.maximum(out[:, h // g, i, s], (qm * km).sum(-1))
    return out


def _brute_choice(scores, length, block, m, spans, sink, window, dense_tail):
    """Per query block: sinks, window, its own span's earlier blocks, then the ``spans`` best whole
    earlier spans (ties: earlier) that hold a block not read anyway."""
    b, h, nb, ns = scores.shape
    sb, wb = n_blocks(sink, block), n_blocks(window, block)
    dense_from = (length - dense_tail) // block if dense_tail else nb
    out = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(nb):
                if i >= dense_from:
                    out[bi, hi, i, : i + 1] = True
                    continue
                forced = {j for j in range(i + 1) if j < sb or j > i - wb or j // m == i // m}
                cands = [s for s in range(i // m) if not set(range(s * m, s * m + m)) <= forced]
                best = sorted(cands, key=lambda s: (-float(scores[bi, hi, i, s]), s))[:spans]
                chosen = forced | {j for s in best for j in range(s * m, min(nb, s * m + m))}
                out[bi, hi, i, sorted(chosen)] = True
    return out


def test_span_size_is_sqrt_length_on_the_block_grid():
    m = M()
    assert [m.span_blocks(n) for n in (100, 4096, 10000, 16384, 65536)] == [1, 1, 2, 2, 4]
    assert M(block=16).span_blocks(4096) == 4
    assert M(span=100).span_blocks(10**6) == 2  # fixed: tokens rounded up to blocks
    assert M(span=1, block=8).span_blocks(5000) == 1


@pytest.mark.parametrize("length,block,m", [(64, 8, 2), (61, 8, 3), (45, 9, 1), (5, 4, 2)])
def test_span_scores_match_brute_force(length, block, m):
    torch.manual_seed(length)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    got = span_scores(q, k, block, m)
    assert max_diff(got, _brute_span_scores(q, k, block, m)) < 1e-6


@pytest.mark.parametrize("spans,span,dense_tail", [(2, 16, 0), (1, 24, 16), (3, None, 0), (50, 8, 0)])
def test_choice_is_the_brute_force_choice(spans, span, dense_tail):
    torch.manual_seed(spans)
    length = 150
    q, k = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8)
    m = M(spans=spans, span=span, block=8, n_sink=8, window=8, dense_layers=0, dense_tail=dense_tail)
    sb = m.span_blocks(length)
    assert sb == (n_blocks(span, 8) if span else round(length ** 0.5 / 8))
    got = m.choose(q, k)
    expect = _brute_choice(_brute_span_scores(q, k, 8, sb), length, 8, sb, spans, 8, 8, dense_tail)
    assert torch.equal(got, expect)
    if spans == 50:  # more spans than candidates: every causal block
        assert torch.equal(got[0, 0], torch.ones(19, 19, dtype=torch.bool).tril())


def test_engine_runs_the_brute_force_choice():
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 96)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append((call.query, call.key, sel))

    m = M(spans=1, span=16, block=8, n_sink=8, window=8, dense_layers=0, dense_tail=0)
    with ts.sparsify(model, m, observers=[Spy()]), torch.no_grad():
        model(input_ids=ids)
    assert seen
    for q, k, sel in seen:
        nb = n_blocks(q.shape[2], 8)
        got = torch.zeros(1, sel.idx.shape[1], nb, nb, dtype=torch.bool)
        for h in range(sel.idx.shape[1]):
            for i in range(nb):
                ok = sel.idx[0, h, i] if sel.valid is None else sel.idx[0, h, i][sel.valid[0, h, i]]
                got[0, h, i, ok] = True
        expect = _brute_choice(_brute_span_scores(q, k, 8, 2), 96, 8, 2, 1, 8, 8, 0)
        assert torch.equal(got, expect)
        assert not got.all()


def test_full_budget_equals_dense():
    dense, runs = full_budget_runs(tiny_model("llama"), M.at_full_budget())
    for _, full, _ in runs:
        assert max_diff(full[0, 5:], dense[0, 5:]) < 1e-5 and max_diff(full[1], dense[1]) < 1e-5


@pytest.mark.parametrize("span", [None, 12])
def test_padded_row_equals_the_prompt_alone(span):
    """The span size follows each row's real length (√L), so a padded row splits as it does alone."""
    model = tiny_model("llama")
    pad = 7
    method = M(spans=1, span=span, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0)
    batched, alone, dense = padded_row_and_alone(model, method, 60, pad)
    # fp32 rounding of batched vs single-row matmuls: dense attention itself differs by ~2e-5 here
    assert max_diff(batched[0, pad:], alone[0]) < 1e-4
    assert max_diff(alone, dense) > 1e-2, "the method did not act"


def test_config_errors():
    with pytest.raises(ValueError, match="spans"):
        M(spans=0)
    with pytest.raises(ValueError, match="span"):
        M(span=0)
    with pytest.raises(ValueError, match="block"):
        M(block=0)
    with pytest.raises(ValueError, match="window"):
        M(window=0)
    with pytest.raises(TypeError, match="spans"):
        M(spans=2.5)
