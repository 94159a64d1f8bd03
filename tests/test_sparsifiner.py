"""Sparsifiner (training-free) against brute force: the key PCA basis, the low-rank block scores, the
block choice (the engine's forced_blocks / top_blocks too), full rank = exact scores and choice,
full budget = dense, padded rows = the prompt alone, the calibrated profile, config errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import forced_blocks, n_blocks, top_blocks
from tokensparse.engine.calibration import calibrate
from tokensparse.methods.sparsifiner import key_basis, lowrank_block_scores
from tokensparse.testing import full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _brute_scores(q, k, proj, scale, block, score):
    """Term by term: each query row's causal softmax of ``scale · (q P)(k P)ᵀ`` (``proj`` ``P Pᵀ``
    per KV head, ``None``: exact logits), summed or maximised per block and over the KV head's
    query heads."""
    b, hq, length, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = n_blocks(length, block)
    out = torch.zeros(b, hkv, nb, nb, dtype=torch.float64)
    for h in range(hq):
        kh = k[:, h // g].double()
        if proj is not None:
            kh = kh @ proj[:, h // g]
        for p in range(length):
            logits = (q[:, h, p].double()[:, None, :] * kh[:, : p + 1]).sum(-1) * scale  # (B, p+1)
            probs = torch.softmax(logits, -1)
            for j in range(p + 1):
                cur = out[:, h // g, p // block, j // block]
                out[:, h // g, p // block, j // block] = cur + probs[:, j] if score == "mass" else torch.maximum(cur, probs[:, j])
    return out


def _brute_choice(scores, budget, block, sink, window, dense_from=None):
    """Per query block: sinks, window, then the best others until ``keep`` blocks (ties: earlier)."""
    b, h, nb, _ = scores.shape
    out = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    sb, wb = n_blocks(sink, block), n_blocks(window, block)
    for bi in range(b):
        for hi in range(h):
            for i in range(nb):
                if dense_from is not None and i >= dense_from:
                    out[bi, hi, i, : i + 1] = True
                    continue
                forced = {j for j in range(i + 1) if j < sb or j > i - wb}
                keep = math.ceil(budget * (i + 1)) if isinstance(budget, float) else n_blocks(budget, block)
                rest = sorted(set(range(i + 1)) - forced, key=lambda j: (-float(scores[bi, hi, i, j]), j))
                out[bi, hi, i, list(forced) + rest[: max(0, keep - len(forced))]] = True
    return out


def test_key_basis_spans_the_top_principal_directions():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 50, 8) * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
    p = key_basis(k, 3)
    assert p.shape == (2, 3, 8, 3)
    assert max_diff(p.transpose(-1, -2) @ p, torch.eye(3).double().expand(2, 3, 3, 3)) < 1e-10
    x = k.double() - k.double().mean(2, keepdim=True)
    u = torch.linalg.svd(x, full_matrices=False).Vh[..., :3, :].transpose(-1, -2)  # right singular vectors
    assert max_diff(p @ p.transpose(-1, -2), u @ u.transpose(-1, -2)) < 1e-8


@pytest.mark.parametrize("length,block,score", [(64, 8, "mass"), (61, 16, "max"), (45, 9, "mass"), (7, 4, "max")])
def test_lowrank_block_scores_match_brute_force(length, block, score):
    torch.manual_seed(length)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    p = key_basis(k, 3)
    got = lowrank_block_scores(q, k, p, 0.3, block, score)
    assert max_diff(got.double(), _brute_scores(q, k, p @ p.transpose(-1, -2), 0.3, block, score)) < 1e-5


def test_full_rank_scores_are_the_exact_attention():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    exact = _brute_scores(q, k, None, 8 ** -0.5, 8, "mass")
    got = lowrank_block_scores(q, k, key_basis(k, 8), 8 ** -0.5, 8, "mass")
    assert max_diff(got.double(), exact) < 1e-5
    # every query row's probabilities sum to one, the group's G rows of a block to G · rows
    assert max_diff(got.sum(-1), torch.full((1, 2, 5), 2 * 8.0)) < 1e-4


def test_forced_and_top_blocks_brute_force():
    torch.manual_seed(2)
    causal, forced = forced_blocks(6, 9, 3, sink_blocks=2, local_blocks=2, dense_from=7)
    for i in range(6):
        qi = i + 3
        assert causal[i].nonzero().flatten().tolist() == list(range(qi + 1))
        want = set(range(qi + 1)) if qi >= 7 else {j for j in range(qi + 1) if j < 2 or j > qi - 2}
        assert set(forced[i].nonzero().flatten().tolist()) == want
    scores = torch.randint(0, 4, (2, 3, 6, 9)).double()  # many ties
    keep = torch.tensor([1, 2, 3, 4, 5, 6])[:, None]
    got = top_blocks(scores, keep, causal, forced)
    for b in range(2):
        for h in range(3):
            for i in range(6):
                allowed = causal[i].nonzero().flatten().tolist()
                f = [j for j in allowed if forced[i, j]]
                rest = sorted(set(allowed) - set(f), key=lambda j: (-float(scores[b, h, i, j]), j))
                want = set(f) | set(rest[: max(0, int(keep[i]) - len(f))])
                assert set(got[b, h, i].nonzero().flatten().tolist()) == want
    assert torch.equal(top_blocks(scores, 100, causal), causal.expand_as(scores))  # never past the allowed


@pytest.mark.parametrize("budget,score", [(0.4, "mass"), (24, "max")])
def test_choice_is_the_brute_force_choice_of_the_scores(budget, score):
    torch.manual_seed(3)
    q, k = torch.randn(1, 4, 70, 8), torch.randn(1, 2, 70, 8)
    m = ts.methods.get("sparsifiner")(budget=budget, rank=3, block=8, score=score, n_sink=8, window=8,
                                      dense_layers=0, dense_tail=16)
    got = m.choose(q, k, 0.35)
    p = key_basis(k, 3)
    scores = lowrank_block_scores(q, k, p, 0.35, 8, score)
    assert torch.equal(got, _brute_choice(scores, budget, 8, 8, 8, dense_from=(70 - 16) // 8))


def test_full_rank_choice_is_the_exact_choice():
    """At rank = head dim the chosen blocks are those of highest exact attention mass."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 64, 8) * 2, torch.randn(1, 2, 64, 8)
    m = ts.methods.get("sparsifiner")(budget=0.3, rank=8, block=8, n_sink=8, window=8, dense_layers=0, dense_tail=0)
    exact = _brute_scores(q, k, None, 8 ** -0.5, 8, "mass")
    assert torch.equal(m.choose(q, k, 8 ** -0.5), _brute_choice(exact, 0.3, 8, 8, 8))


def test_engine_runs_the_brute_force_choice():
    """The selections the engine executes on a tiny model are the brute-force choices of its q, k."""
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 96)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append((call.query, call.key, call.scale, sel))

    m = ts.methods.get("sparsifiner")(budget=0.4, rank=4, block=16, n_sink=16, window=16, dense_layers=0, dense_tail=0)
    with ts.sparsify(model, m, observers=[Spy()]), torch.no_grad():
        model(input_ids=ids)
    assert seen
    for q, k, scale, sel in seen:
        nb = n_blocks(q.shape[2], 16)
        got = torch.zeros(1, sel.idx.shape[1], nb, nb, dtype=torch.bool)
        for h in range(sel.idx.shape[1]):
            for i in range(nb):
                ok = sel.idx[0, h, i] if sel.valid is None else sel.idx[0, h, i][sel.valid[0, h, i]]
                got[0, h, i, ok] = True
        p = key_basis(k, 4)
        expect = _brute_choice(_brute_scores(q, k, p @ p.transpose(-1, -2), scale, 16, "mass"), 0.4, 16, 16, 16)
        assert torch.equal(got, expect)


def test_full_budget_equals_dense():
    dense, runs = full_budget_runs(tiny_model("llama"), ts.methods.get("sparsifiner").at_full_budget())
    for _, full, _ in runs:
        assert max_diff(full[0, 5:], dense[0, 5:]) < 1e-5 and max_diff(full[1], dense[1]) < 1e-5


@pytest.mark.parametrize("score", ["mass", "max"])
def test_padded_row_equals_the_prompt_alone(score):
    model = tiny_model("llama")
    pad = 7
    method = ts.methods.get("sparsifiner")(budget=0.3, rank=4, block=8, score=score, n_sink=4, window=4,
                                           dense_layers=0, dense_tail=0)
    batched, alone, dense = padded_row_and_alone(model, method, 60, pad)
    # fp32 rounding of batched vs single-row matmuls: dense attention itself differs by ~2e-5 here
    assert max_diff(batched[0, pad:], alone[0]) < 1e-4
    assert max_diff(alone, dense) > 1e-2, "the method did not act"


def test_calibrated_profile(tmp_path):
    """A profile holds every layer's and KV head's key directions; at full rank it chooses as the
    per-prompt basis does (both projections are the identity), below full rank it is used."""
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 80, seed=7)
    prof = calibrate(model, ts.methods.get("sparsifiner"), ids, source="random ids")
    cfg = model.config
    basis = torch.tensor(prof.payload["basis"])
    assert basis.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, 16, 16)
    assert max_diff(basis @ basis.transpose(-1, -2), torch.eye(16).expand_as(basis)) < 1e-4
    path = prof.save(tmp_path / "sparsifiner.json")
    test_ids, _ = tiny_inputs(1, 64, seed=8)
    kw = dict(budget=0.3, block=8, n_sink=4, window=4, dense_layers=0, dense_tail=0)
    with torch.no_grad():
        out = {}
        for name, m in {"prompt16": ts.methods.get("sparsifiner")(rank=16, **kw),
                        "profile16": ts.methods.get("sparsifiner")(rank=16, basis="profile", profile=str(path), **kw),
                        "profile2": ts.methods.get("sparsifiner")(rank=2, basis="profile", profile=str(path), **kw)}.items():
            with ts.sparsify(model, m) as s:
                out[name] = model(input_ids=test_ids, cache=s.new_cache()).logits
                assert s.info["sparsifiner_basis"] == (str(path) if name.startswith("profile") else "prompt")
    assert max_diff(out["prompt16"], out["profile16"]) < 1e-5
    assert torch.isfinite(out["profile2"]).all()


def test_config_errors(monkeypatch, tmp_path):
    M = ts.methods.get("sparsifiner")
    with pytest.raises(ValueError, match="rank"):
        M(rank=0)
    with pytest.raises(ValueError, match="budget"):
        M(budget=1.5)
    with pytest.raises(ValueError, match="score"):
        M(score="sum")
    with pytest.raises(ValueError, match="read only with basis='profile'"):
        M(profile="x.json")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"rank \(17\) exceeds the head dimension 16"):
        with ts.sparsify(model, M(rank=17)):
            pass
    monkeypatch.setattr("tokensparse.methods.sparsifiner.find_kind_profile", lambda model, kind: None)
    with pytest.raises(ValueError, match="tokensparse calibrate --method sparsifiner"):
        with ts.sparsify(model, M(basis="profile")):
            pass
