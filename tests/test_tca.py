"""TCA-Attention: the vectorised per-block choice equals a plain loop, the candidate configurations,
calibration and profile loading (the sparsest candidate retaining ``tau``), full budget = dense,
a padded row = the same prompt alone, and clear errors."""

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.calibration import calibrate
from tokensparse.methods.tca import TCA, block_keep, candidate_configs, choose, counts_set, log_gaussian
from tokensparse.testing import full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _keep_loop(s, block_id, cand, p, block, alpha):
    """The rule of the module docstring, one head and one block at a time."""
    b, h, n = s.shape
    ks = counts_set(block)
    out = torch.zeros(b, h, n, dtype=torch.bool)
    for i in range(b):
        ids = sorted({int(block_id[i, t]) for t in range(n) if cand[i, t]})
        for j in range(h):
            scores = []
            for blk in ids:
                tok = [t for t in range(n) if cand[i, t] and int(block_id[i, t]) == blk]
                mass = sum(float(s[i, j, t]) for t in tok)
                sq = sum(float(s[i, j, t]) ** 2 for t in tok)
                conc = sq / mass**2 if mass > 0 else 1.0
                scores.append(((1 - alpha) * mass + alpha * (1 - conc), blk, tok))
            order = sorted(range(len(scores)), key=lambda r: (-scores[r][0], r))
            cum = torch.tensor(list(reversed(p[j].tolist()))).cumsum(0).tolist()
            for place, r in enumerate(order):
                frac = (place + 0.5) / len(scores)
                level = next((lv for lv, c in enumerate(cum) if c >= frac), len(cum) - 1)
                k = list(reversed(ks))[level]
                tok = sorted(scores[r][2], key=lambda t: (-float(s[i, j, t]), t))
                for t in tok[:k]:
                    out[i, j, t] = True
    return out


def test_counts_and_configs():
    assert counts_set(64) == [1, 2, 4, 8, 16, 32, 64]
    assert counts_set(6) == [1, 2, 4, 6] and counts_set(1) == [1]
    p = log_gaussian(64, 2.0, 1.0)
    assert p.shape == (7,) and math.isclose(float(p.sum()), 1.0) and int(p.argmax()) == 2
    cfg = candidate_configs(64)
    assert cfg.shape == (15, 7) and torch.allclose(cfg.sum(-1), torch.ones(15, dtype=torch.float64))
    expected = cfg @ torch.tensor(counts_set(64), dtype=torch.float64)
    assert bool((expected[1:] > expected[:-1]).all()) and float(expected[-1]) == 64.0


@pytest.mark.parametrize("block, alpha, mu", [(4, 0.5, 1.0), (3, 0.0, 0.0), (8, 1.0, 2.5), (1, 0.5, 0.0)])
def test_block_keep_equals_the_loop(block, alpha, mu):
    g = torch.Generator().manual_seed(block)
    b, h, n = 2, 3, 29
    s = torch.rand(b, h, n, generator=g).softmax(-1)
    s[0, 0, 5:9] = s[0, 0, 5]  # ties inside a block go to the earlier token
    cand = torch.ones(b, n, dtype=torch.bool)
    cand[1, :6] = False  # a padded row: its blocks start at its first real token
    rank = cand.long().cumsum(-1)
    block_id = ((rank - 1).clamp_min(0)) // block
    p = torch.stack([log_gaussian(block, mu + d, 1.0) for d in (0.0, 1.0, -1.0)])
    got = block_keep(s, block_id, cand, p, block, alpha)
    assert torch.equal(got, _keep_loop(s, block_id, cand, p, block, alpha))
    assert not got[1, :, :6].any()


def test_choose_takes_the_sparsest_candidate_retaining_tau():
    payload = {"mass": [[[0.5, 0.85, 0.95, 1.0], [0.92, 0.97, 0.99, 1.0]]],
               "kept_share": [[[0.1, 0.2, 0.4, 1.0], [0.1, 0.2, 0.4, 1.0]]]}
    choice, share = choose(payload, 0.9)
    assert choice.tolist() == [[2, 0]] and share.tolist() == [[0.4, 0.1]]
    assert choose(payload, 1.0)[0].tolist() == [[3, 3]]  # only "every token" retains everything


def test_full_budget_equals_dense():
    model = tiny_model("llama")
    dense, runs = full_budget_runs(model, TCA.at_full_budget())
    for forced, logits, _ in runs:
        assert max_diff(logits, dense) < 1e-5, forced


def test_padded_row_equals_alone_and_acts():
    model = tiny_model("qwen3")
    batched, alone, dense = padded_row_and_alone(model, TCA.at_sparse_budget(), length=40)
    assert max_diff(batched[0, 7:], alone[0]) < 1e-4
    # the eviction acts on the decode steps: compare a step after the prompt
    ids, mask = tiny_inputs(1, 40, seed=5)
    with torch.no_grad():
        with ts.sparsify(model, TCA.at_sparse_budget()) as s:
            cache = s.new_cache()
            model(input_ids=ids, cache=cache)
            step = model(input_ids=ids[:, -1:], cache=cache).logits
        full = model(input_ids=torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1:]
    assert cache.layers[0].bytes_held() < 0.8 * 40 * 2 * 2 * 16 * 4
    assert max_diff(step, full) > 1e-3


def test_calibrate_then_profile_budgets(tmp_path):
    model = tiny_model("llama", max_position_embeddings=2048)
    ids, _ = tiny_inputs(1, 700, seed=3)
    prof = calibrate(model, TCA, ids, source="random ids")
    pay = prof.payload
    assert prof.kind == "tca_budgets" and (pay["block"], pay["window"]) == (64, 256)
    assert set(pay["pool_kernels"]) == {"0", "7"}
    for measured in pay["pool_kernels"].values():
        mass, share = torch.tensor(measured["mass"]), torch.tensor(measured["kept_share"])
        assert mass.shape == share.shape == (2, 2, 15)
        assert bool((mass[..., -1] > 0.999).all()) and bool((share[..., -1] == 1.0).all())
        assert bool((mass <= 1 + 1e-5).all())
    path = prof.save(tmp_path / "tca.json")
    choice, _ = choose(pay["pool_kernels"]["7"], 0.5)
    with torch.no_grad(), ts.sparsify(model, TCA(profile=str(path), tau=0.5)) as s:
        cache = s.new_cache()
        model(input_ids=ids, cache=cache)
    p = s.state["tca_p"]
    assert torch.equal(p, torch.tensor(pay["candidates"], dtype=torch.float64)[choice])
    assert s.info["tca_profile"] == str(path)
    with ts.sparsify(model, TCA(profile=str(path), tau=0.5, pool_kernel=0)) as s:  # the paper's rule: measured too
        pass
    assert torch.equal(s.state["tca_p"],
                       torch.tensor(pay["candidates"], dtype=torch.float64)[choose(pay["pool_kernels"]["0"], 0.5)[0]])
    for bad in (dict(block=32), dict(pool_kernel=5)):
        with pytest.raises(ValueError, match="measured with"):
            with ts.sparsify(model, TCA(profile=str(path), **bad)):
                pass


def test_missing_profile_warns_and_records_the_uniform_budgets(tmp_path):
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="tokensparse calibrate --method tca"):
        with ts.sparsify(model, TCA()) as s:
            pass
    assert s.info["tca_budgets"] == "uniform"
    with pytest.raises(Exception, match="missing.json"):  # an explicit profile that is not there
        with ts.sparsify(model, TCA(profile=str(tmp_path / "missing.json"))):
            pass


def test_floor_mu_keeps_every_head_at_or_above_its_candidate(tmp_path):
    """``floor_mu``: each head's calibrated candidate is the cheapest qualifying one at or above
    the floor's candidate (an AdaKV-style floor); it is refused without a profile to floor."""
    from tokensparse.methods.tca import N_CANDIDATES, floor_candidate

    assert floor_candidate(None, 64) == 0
    assert floor_candidate(-5.0, 64) == 0
    assert floor_candidate(100.0, 64) == N_CANDIDATES  # above every centre: every token
    mus = torch.linspace(-1.0, 7.0, N_CANDIDATES).tolist()
    assert floor_candidate(4.0, 64) == min(i for i, m in enumerate(mus) if m >= 4.0)
    model = tiny_model("llama", max_position_embeddings=2048)
    ids, _ = tiny_inputs(1, 700, seed=3)
    prof = calibrate(model, TCA, ids, source="random ids")
    path = prof.save(tmp_path / "tca.json")
    measured = prof.payload["pool_kernels"]["7"]
    free, _ = choose(measured, 0.5)
    floor = floor_candidate(4.0, 64)
    floored, _ = choose(measured, 0.5, floor)
    assert bool((floored >= floor).all())
    assert torch.equal(torch.where(free >= floor, free, floored), floored)  # heads above the floor keep their choice
    with torch.no_grad(), ts.sparsify(model, TCA(profile=str(path), tau=0.5, floor_mu=4.0)) as s:
        pass
    assert torch.equal(s.state["tca_p"], torch.tensor(prof.payload["candidates"], dtype=torch.float64)[floored])
    with pytest.raises(ValueError, match="floor_mu"):
        TCA(budgets="uniform", floor_mu=4.0)
    with pytest.raises(ValueError, match="no tca_budgets profile"), torch.no_grad():  # nothing to floor
        with ts.sparsify(model, TCA(floor_mu=4.0)):
            pass
