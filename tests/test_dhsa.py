"""DHSA (training-free) against brute force: cosine-shift boundaries with NMS, chunk representations
(mean key × √len), the chunk-level budgeted choice with ties to recency; full budget = dense; a
padded row = the prompt alone; shared boundaries; config errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import route_blocks
from tokensparse.engine.blocks import pool_blocks
from tokensparse.methods.dhsa import DHSA, block_counts, chunk_representations, chunk_scores, cosine_shift, pick_boundaries
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- brute-force references ----------------------------------------------------------------------


def _block_means(x: torch.Tensor, grain: int) -> list[list[torch.Tensor]]:
    """Per (row, head): the list of block means, token by token."""
    b, h, length, _ = x.shape
    return [[[x[r, j, s : min(length, s + grain)].double().mean(0) for s in range(0, length, grain)]
             for j in range(h)] for r in range(b)]


def _brute_shift(k: torch.Tensor, grain: int) -> torch.Tensor:
    means = _block_means(k, grain)
    b, hkv = k.shape[:2]
    out = []
    for r in range(b):
        feats = [torch.cat([means[r][j][i] for j in range(hkv)]) for i in range(len(means[r][0]))]
        out.append([1.0 - float(torch.dot(feats[i - 1], feats[i]) / (feats[i - 1].norm() * feats[i].norm()))
                    for i in range(1, len(feats))])
    return torch.tensor(out, dtype=torch.float64)


def _brute_boundaries(shift: list[float], n_cuts: int, nms: int, forced: int | None) -> set[int]:
    chosen = [forced] if forced is not None and n_cuts > 0 else []
    for e in sorted(range(len(shift)), key=lambda e: (-shift[e], e)):
        edge = e + 1
        if len(chosen) >= n_cuts:
            break
        if forced is not None and edge >= forced:
            continue
        if all(abs(edge - c) > nms for c in chosen):
            chosen.append(edge)
    return {0, *chosen}


def _chunks(starts: list[bool]) -> list[list[int]]:
    out: list[list[int]] = []
    for j, s in enumerate(starts):
        if s:
            out.append([])
        out[-1].append(j)
    return out


def _brute_choice(m: DHSA, q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Token-level representations and a chunk-by-chunk greedy choice: per query block, sinks and
    local blocks, then chunks best first (equal scores: the later chunk), each chunk's causal
    blocks most recent first, until the budget's blocks are read."""
    b, hq, length, d = q.shape
    hkv, g = k.shape[1], m.grain
    nb = -(-length // g)
    heads = 1 if m.select_per == "shared" else hkv
    sink, local = -(-m.global_tokens // g), -(-m.local_tokens // g)
    tail = (length - m.instruction_tokens) // g if m.instruction_tokens else None
    out = torch.zeros(b, heads, nb, nb, dtype=torch.bool)
    for r in range(b):
        chunks = _chunks(starts[r].tolist())
        for h in range(heads):
            qh = q[r] if heads == 1 else q[r, h * (hq // hkv) : (h + 1) * (hq // hkv)]
            kh = k[r] if heads == 1 else k[r, h : h + 1]
            reps = []
            for c in chunks:
                toks = kh[:, c[0] * g : min(length, (c[-1] + 1) * g)].double()  # (heads, n, D)
                reps.append(toks.mean((0, 1)) * math.sqrt(toks.shape[1]))
            for i in range(nb):
                toks = qh[:, i * g : min(length, (i + 1) * g)].double()
                qrep = toks.mean((0, 1)) * math.sqrt(toks.shape[1])
                if tail is not None and i >= tail:
                    out[r, h, i, : i + 1] = True
                    continue
                forced = {j for j in range(i + 1) if j < sink or j > i - local}
                keep = math.ceil(m.budget * (i + 1)) if isinstance(m.budget, float) else -(-m.budget // g)
                keep = max(keep, len(forced))
                got = set(forced)
                scores = [float(qrep @ rep) for rep in reps]
                for c in sorted(range(len(chunks)), key=lambda c: (-scores[c], -c)):
                    for j in sorted(chunks[c], reverse=True):
                        if len(got) < keep and j <= i and j not in got:
                            got.add(j)
                out[r, h, i, sorted(got)] = True
    return out


# ---- the steps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length,grain", [(64, 8), (61, 8), (45, 4), (5, 8)])
def test_cosine_shift_matches_brute_force(length, grain):
    torch.manual_seed(length)
    k = torch.randn(2, 3, length, 5)
    got = cosine_shift(pool_blocks(k, grain))
    assert got.shape == (2, -(-length // grain) - 1)
    assert max_diff(got, _brute_shift(k, grain)) < 1e-6


@pytest.mark.parametrize("nms", [0, 1, 2])
@pytest.mark.parametrize("forced", [None, 9, 3])
def test_pick_boundaries_matches_greedy_nms(nms, forced):
    torch.manual_seed(nms * 10 + (forced or 0))
    shift = torch.rand(3, 13, dtype=torch.float64)
    shift[1, 4] = shift[1, 7]  # a tie: the earlier edge first
    for n_cuts in (0, 1, 3, 6, 20):
        got = pick_boundaries(shift, n_cuts, nms, forced)
        for r in range(3):
            expect = _brute_boundaries(shift[r].tolist(), n_cuts, nms, forced)
            assert set(got[r].nonzero().flatten().tolist()) == expect, (n_cuts, r)


def test_chunk_representations_match_brute_force():
    torch.manual_seed(1)
    length, g = 45, 4
    k = torch.randn(2, 3, length, 6)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, [3, 4, 9]] = True
    starts[1, [6, 11]] = True  # the last chunk: the partial last block alone
    reps, chunk_of = chunk_representations(pool_blocks(k, g), block_counts(length, g), starts)
    qb = torch.randn(2, 3, 12, 6, dtype=torch.float64)
    scores = chunk_scores(qb, reps, chunk_of)
    for r in range(2):
        for c, blocks in enumerate(_chunks(starts[r].tolist())):
            toks = k[r, :, blocks[0] * g : min(length, (blocks[-1] + 1) * g)].double()
            rep = toks.mean(1) * math.sqrt(toks.shape[1])  # (H, D)
            assert max_diff(reps[r, :, c], rep) < 1e-6
            for j in blocks:
                assert int(chunk_of[r, j]) == c
                assert torch.equal(scores[r, :, :, j], scores[r, :, :, blocks[0]])  # a chunk's blocks tie exactly
                assert max_diff(scores[r, :, :, j], (qb[r] * rep[:, None]).sum(-1)) < 1e-6


def test_route_blocks_prefer_later_breaks_ties_by_recency():
    q = torch.ones(1, 1, 6, 2)
    k = torch.ones(1, 1, 6, 2)  # every score ties
    keep = torch.full((6,), 2)
    earlier = route_blocks(q, k, 0, keep=keep, sink_blocks=0, local_blocks=1)
    later = route_blocks(q, k, 0, keep=keep, sink_blocks=0, local_blocks=1, prefer="later")
    assert earlier[0, 0, 5].nonzero().flatten().tolist() == [0, 5]
    assert later[0, 0, 5].nonzero().flatten().tolist() == [4, 5]
    with pytest.raises(ValueError, match="prefer"):
        route_blocks(q, k, 0, keep=keep, sink_blocks=0, local_blocks=1, prefer="recent")


@pytest.mark.parametrize("cfg", [
    dict(budget=16, grain=4, chunk=8, global_tokens=4, local_tokens=4, instruction_tokens=0),
    dict(budget=12, grain=4, chunk=12, global_tokens=0, local_tokens=8, instruction_tokens=6, nms=0),
    dict(budget=0.3, grain=4, chunk=8, global_tokens=4, local_tokens=4, instruction_tokens=4, select_per="kv_head"),
    dict(budget=20, grain=4, chunk=8, global_tokens=8, local_tokens=4, instruction_tokens=0, boundaries="fixed"),
    dict(budget=8, grain=2, chunk=4, global_tokens=2, local_tokens=2, instruction_tokens=0, select_per="kv_head", nms=2),
])
@pytest.mark.parametrize("length", [45, 64])
def test_choice_matches_brute_force(cfg, length):
    torch.manual_seed(length)
    m = DHSA(**cfg)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    sets, starts = m.choose(q, k)
    g = m.grain
    nb = -(-length // g)
    # the boundaries the rule must have chosen
    if m.boundaries == "fixed":
        expect_starts = [{j for j in range(nb) if j % (m.chunk // g) == 0}] * 2
    else:
        tail = (length - m.instruction_tokens) // g if m.instruction_tokens else None
        forced = tail if tail is not None and 0 < tail < nb else None
        shift = _brute_shift(k, g)
        expect_starts = [_brute_boundaries(shift[r].tolist(), -(-length // m.chunk) - 1, m.nms, forced) for r in range(2)]
    for r in range(2):
        assert set(starts[r].nonzero().flatten().tolist()) == expect_starts[r]
    assert torch.equal(sets, _brute_choice(m, q, k, starts))


def test_the_chosen_blocks_are_what_the_engine_executes():
    """Through a model: every selection equals the brute-force choice on that layer's q, k."""
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 70)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append((call.query, call.key, sel))

    m = DHSA(budget=24, grain=8, chunk=16, global_tokens=8, local_tokens=8, instruction_tokens=8)
    with ts.sparsify(model, m, observers=[Spy()]), torch.no_grad():
        model(input_ids=ids)
    assert seen
    for q, k, sel in seen:
        _, starts = m.choose(q, k)
        nb = -(-q.shape[2] // 8)
        got = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
        for i in range(nb):
            ok = sel.idx[0, 0, i] if sel.valid is None else sel.idx[0, 0, i][sel.valid[0, 0, i]]
            got[0, 0, i, ok] = True
        assert torch.equal(got, _brute_choice(m, q, k, starts))


# ---- end to end ----------------------------------------------------------------------------------


def _logits(model, method, ids, mask=None):
    with ts.sparsify(model, method), torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_budget_equals_dense(family):
    model = tiny_model(family)
    ids, _ = tiny_inputs(2, 53)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    for m in (DHSA.at_full_budget(), DHSA(budget=4096, grain=8, chunk=16), DHSA(
            budget=1.0, grain=4, chunk=8, global_tokens=0, local_tokens=4, boundaries="shared", select_per="kv_head")):
        assert max_diff(_logits(model, m, ids), dense) < 1e-4, m


@pytest.mark.parametrize("boundaries", ["dynamic", "shared", "fixed"])
def test_padded_row_equals_the_prompt_alone(boundaries):
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 44, pad=9)
    m = DHSA(budget=12, grain=4, chunk=8, global_tokens=4, local_tokens=4, instruction_tokens=4, boundaries=boundaries)
    both = _logits(model, m, ids, mask)
    alone = _logits(model, m, ids[:1, 9:])
    other = _logits(model, m, ids[1:])
    assert max_diff(both[0, 9:], alone[0]) < 1e-4
    assert max_diff(both[1], other[0]) < 1e-4
    with torch.no_grad():
        dense = model(input_ids=ids[1:]).logits
    assert max_diff(other, dense) > 1e-3  # the budget really skipped blocks


def test_shared_boundaries_are_computed_once_per_pass():
    calls = []

    class Counting(DHSA):
        def chunk_starts(self, k_blocks, length):
            calls.append(length)
            return super().chunk_starts(k_blocks, length)

    model = tiny_model("llama")
    n_layers = model.config.num_hidden_layers
    ids, mask = tiny_inputs(2, 40, pad=5)
    for boundaries, per_pass in (("shared", 2), ("dynamic", 2 * n_layers)):
        calls.clear()
        m = Counting(budget=12, grain=4, chunk=8, global_tokens=4, local_tokens=4, boundaries=boundaries)
        _logits(model, m, ids, mask)
        assert len(calls) == per_pass, boundaries  # a padded batch: one per row
        _logits(model, m, ids, mask)
        assert len(calls) == 2 * per_pass, boundaries  # a new pass chooses again


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of grain"):
        DHSA(chunk=100)
    with pytest.raises(ValueError, match="cannot hold global_tokens"):
        DHSA(budget=128)
    with pytest.raises(ValueError, match="boundaries"):
        DHSA(boundaries="learned")
    with pytest.raises(ValueError, match="budget"):
        DHSA(budget=1.5)
    with pytest.raises(ValueError, match="local_tokens"):
        DHSA(local_tokens=0)
    DHSA(budget=256)  # sinks (2 blocks) + window (2 blocks) fit exactly
