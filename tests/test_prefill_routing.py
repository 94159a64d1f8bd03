"""Block-routing prefill methods against brute force: XAttention's antidiagonal scores and
threshold, BiFormer's routing (through the engine's route_blocks)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import n_blocks, pool_blocks
from tokensparse.methods.xattention import antidiagonal_mass, threshold_blocks
from tokensparse.testing import max_diff, tiny_inputs, tiny_model


def _brute_mass(q, k, stride, block):
    """Antidiagonal tile sums from the full logits, softmax per tile row (causal, real tiles),
    summed into blocks — term by term."""
    b, hq, length, d = q.shape
    g = hq // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    nb = n_blocks(length, block)
    lp = nb * block
    full = torch.zeros(b, hq, lp, lp)
    full[:, :, :length, :length] = q.float() @ kk.float().transpose(-1, -2)
    n, real = lp // stride, n_blocks(length, stride)
    tiles = torch.full((b, hq, n, n), float("-inf"))
    for i in range(n):
        for j in range(min(i, real - 1) + 1):
            tiles[:, :, i, j] = sum(full[:, :, i * stride + stride - 1 - t, j * stride + t] for t in range(stride))
    p = torch.softmax(tiles / (math.sqrt(d) * stride), -1)
    p[:, :, real:] = 0
    per = block // stride
    return p.view(b, hq, nb, per, nb, per).sum((3, 5))


@pytest.mark.parametrize("length,stride,block", [(64, 4, 8), (61, 4, 16), (45, 3, 9)])
def test_antidiagonal_mass_matches_brute_force(length, stride, block):
    torch.manual_seed(length)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    got = antidiagonal_mass(q, k, stride, block)
    assert max_diff(got, _brute_mass(q, k, stride, block)) < 1e-5


def test_threshold_blocks_brute_force():
    torch.manual_seed(0)
    mass = torch.rand(2, 3, 7, 7).tril()
    for tau in (0.3, 0.6, 0.9, 1.0):
        got = threshold_blocks(mass, tau)
        for b in range(2):
            for h in range(3):
                for i in range(7):
                    row = mass[b, h, i, : i + 1].double()
                    keep = {0, i}
                    kept = float(row[list(keep)].sum())
                    for j in sorted(set(range(i + 1)) - keep, key=lambda j: (-float(row[j]), j)):
                        if kept < tau * float(row.sum()):
                            keep.add(j)
                            kept += float(row[j])
                    assert set(got[b, h, i].nonzero().flatten().tolist()) == keep, (tau, b, h, i)
    assert threshold_blocks(mass, 0.5, dense_from=5)[:, :, 5:].sum() == 2 * 3 * (6 + 7)


def test_xattention_and_biformer_choose_from_their_scores():
    """The selections the engine executes are exactly the brute-force choices of each method."""
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 96)
    seen = {}

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.setdefault(type(call.session.method).__name__, []).append((call.query, call.key, sel))

    for method in (ts.methods.get("xattention")(threshold=0.6, stride=4, block=16, dense_layers=0, dense_tail=0),
                   ts.methods.get("biformer")(budget=0.4, block=16, n_sink=16, window=16, dense_layers=0, dense_tail=0)):
        with ts.sparsify(model, method, observers=[Spy()]), torch.no_grad():
            model(input_ids=ids)
    assert set(seen) == {"XAttention", "BiFormer"}
    for name, calls in seen.items():
        for q, k, sel in calls:
            nb = n_blocks(q.shape[2], 16)
            got = torch.zeros(1, sel.idx.shape[1], nb, nb, dtype=torch.bool)
            for h in range(sel.idx.shape[1]):
                for i in range(nb):
                    ok = sel.idx[0, h, i] if sel.valid is None else sel.idx[0, h, i][sel.valid[0, h, i]]
                    got[0, h, i, ok] = True
            if name == "XAttention":
                mass = _brute_mass(q, k, 4, 16).view(1, 2, 2, nb, nb).sum(2)
                expect = threshold_blocks(mass, 0.6)
            else:
                qp, kp = pool_blocks(q, 16), pool_blocks(k, 16)
                s = (qp.view(1, 2, 2, nb, -1) @ kp[:, :, None].transpose(-1, -2)).amax(2)
                expect = torch.zeros_like(got)
                for h in range(2):
                    for i in range(nb):
                        forced = {0, i}
                        keep = max(math.ceil(0.4 * (i + 1)), len(forced))
                        rest = sorted(set(range(i + 1)) - forced, key=lambda j: (-float(s[0, h, i, j]), j))
                        expect[0, h, i, list(forced) + rest[: keep - len(forced)]] = True
            assert torch.equal(got, expect), name


def test_xattention_config_errors():
    with pytest.raises(ValueError, match="multiple of stride"):
        ts.methods.get("xattention")(block=60, stride=8)
    with pytest.raises(ValueError):
        ts.methods.get("xattention")(threshold=0.0)
