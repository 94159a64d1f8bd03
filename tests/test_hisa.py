"""HISA (training-free two-level selection) against its plain-loop reference: the token mask of the
vectorised choice, the fast executor on it, full budget = dense, padded rows = the prompt alone,
config errors, a tiny model end to end."""

from __future__ import annotations


import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import block_attend, blocks_from_sets, n_blocks, token_mask
from tokensparse.engine.executors import reference_attention
from tokensparse.testing import full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

M = ts.methods.get("hisa")


def _qkv(length, hq=4, hkv=2, d=16, batch=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, length, d, generator=g) for h in (hq, hkv, hkv))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask_of(method, q, k):
    """The token mask ``(b, Hkv, L, L)`` of the vectorised choice, through the engine's grid."""
    length = q.shape[2]
    sets, complete = method.choose(q, k)
    sel = blocks_from_sets(sets, method.block, method.fine, complete=complete)
    return token_mask(sel, length, length), sel


CASES = [  # length, hq, hkv, method settings
    (64, 4, 2, dict(candidates=16, budget=5, block=8, fine=1, n_sink=8, window=8, dense_tail=0)),
    (61, 4, 2, dict(candidates=24, budget=8, block=8, fine=2, n_sink=8, window=16, dense_tail=8, refine="mean")),
    (77, 6, 2, dict(candidates=0.5, budget=0.25, block=8, fine=4, n_sink=0, window=8, dense_tail=0)),
    (50, 4, 4, dict(candidates=12, budget=3, block=4, fine=1, n_sink=4, window=4, dense_tail=12)),
    (45, 3, 1, dict(candidates=0.3, budget=7, block=9, fine=3, n_sink=9, window=9, dense_tail=0, refine="mean")),
    (96, 4, 2, dict(candidates=1 << 20, budget=1 << 20, block=8, fine=1, n_sink=0, window=8, dense_tail=0)),
]


@pytest.mark.parametrize("length,hq,hkv,kw", CASES)
def test_choice_is_the_reference_mask(length, hq, hkv, kw):
    method = M(dense_layers=0, **kw)
    q, k, _ = _qkv(length, hq, hkv, batch=2, seed=length)
    got, sel = _mask_of(method, q, k)
    expect = method.reference_mask(q, k)
    assert torch.equal(got, expect)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert not (got & ~causal).any()
    if kw["budget"] == 1 << 20:  # every candidate key kept, every block a candidate: dense
        assert sel.complete and torch.equal(got, causal.expand_as(got))
    else:
        assert not sel.complete and (got.sum() < causal.sum() * got.shape[0] * got.shape[1])


def test_refinement_is_token_level():
    """A key that one query of a block aligns with is kept, its block neighbours are not."""
    length, bs = 64, 8
    q, k, _ = _qkv(length, 2, 1, seed=3)
    q, k = q * 0.01, k * 0.01
    k[0, 0, 21] = q[0, 1, 50] / q[0, 1, 50].norm() * 10  # token 21 (key block 2) for query 50 (block 6)
    method = M(candidates=24, budget=2, block=bs, fine=1, n_sink=0, window=8, dense_layers=0, dense_tail=0)
    got, _ = _mask_of(method, q, k)
    assert bool(got[0, 0, 50, 21]) and bool(got[0, 0, 48, 21])  # the whole query block reads it
    assert int(got[0, 0, 50, 16:24].sum()) <= 2 and int(got[0, 0, 50, :48].sum()) == 2
    assert torch.equal(got, method.reference_mask(q, k))
    mean = M(candidates=24, budget=2, block=bs, refine="mean", n_sink=0, window=8, dense_layers=0, dense_tail=0)
    assert torch.equal(_mask_of(mean, q, k)[0], mean.reference_mask(q, k))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", range(len(CASES) - 1))
def test_fast_executor_equals_reference(case, dtype, tol):
    length, hq, hkv, kw = CASES[case]
    method = M(dense_layers=0, **kw)
    q, k, v = _qkv(length, hq, hkv, batch=2, seed=case, dtype=dtype)
    mask, sel = _mask_of(method, q, k)
    if dtype == torch.float32:
        assert torch.equal(mask, method.reference_mask(q, k))
    scale = q.shape[-1] ** -0.5
    ref = reference_attention(q, k, v, mask, scale)
    fast = block_attend(q, k, v, sel, scale, impl="gather")
    plain = block_attend(q, k, v, sel, scale, impl="reference")
    assert max_diff(fast, ref) < tol and max_diff(plain, ref) < tol
    dense = reference_attention(q, k, v, None, scale)
    assert max_diff(ref, dense) > 0.05, "the selection did not act"


def test_full_budget_equals_dense():
    dense, runs = full_budget_runs(tiny_model("llama"), M.at_full_budget())
    for _, full, _ in runs:
        # forced: the gather executor's fp32 softmax over gathered keys sums in another order than SDPA
        assert max_diff(full[0, 5:], dense[0, 5:]) < 3e-5 and max_diff(full[1], dense[1]) < 3e-5


@pytest.mark.parametrize("fine,refine", [(1, "max"), (2, "mean")])
def test_padded_row_equals_the_prompt_alone(fine, refine):
    model = tiny_model("llama")
    pad = 7
    method = M(candidates=8, budget=4, block=4, fine=fine, refine=refine, n_sink=4, window=4, dense_layers=0, dense_tail=0)
    batched, alone, dense = padded_row_and_alone(model, method, 60, pad)
    assert max_diff(batched[0, pad:], alone[0]) < 1e-4
    assert max_diff(alone, dense) > 1e-2, "the method did not act"


def test_tiny_model_runs_the_reference_choice_and_generates():
    model = tiny_model("llama")
    ids, mask = tiny_inputs(1, 96)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append((call.query, call.key, sel))

    method = M(candidates=16, budget=6, block=8, fine=2, n_sink=8, window=8, dense_layers=1, dense_tail=16)
    with torch.no_grad(), ts.sparsify(model, method, observers=[Spy()]):
        model(input_ids=ids)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 99)
    prefill = [(q, k, sel) for q, k, sel in seen if q.shape[2] == 96]
    assert len(prefill) == 2 * (model.config.num_hidden_layers - 1)  # two prefills, the first layer dense
    for q, k, sel in prefill:
        assert sel.kind == "blocks" and (sel.block_q, sel.block_k) == (8, 2)
        assert torch.equal(token_mask(sel, 96, 96), method.reference_mask(q, k))


def test_expected_density():
    method = M(candidates=4, budget=6, block=8, fine=2, n_sink=8, window=8, dense_layers=0, dense_tail=0)
    length = 160
    q, k, _ = _qkv(length, seed=1)
    mask, _ = _mask_of(method, q, k)
    nb = n_blocks(length, 8)
    # the estimate counts the diagonal block whole; the mask trims it causally
    diag = sum(8 * 7 // 2 for _ in range(nb))
    measured = (float(mask[0, 0].sum()) + diag) / (length * (length + 1) / 2)
    assert abs(method.expected_density(length) - measured) < 1e-9


def test_config_errors():
    with pytest.raises(ValueError, match="fine must divide block"):
        M(block=8, fine=3)
    with pytest.raises(ValueError, match="candidates"):
        M(candidates=0)
    with pytest.raises(ValueError, match="budget"):
        M(budget=1.5)
    with pytest.raises(ValueError, match="block"):
        M(block=0)
    with pytest.raises(ValueError, match="refine"):
        M(refine="sum")
    with pytest.raises(ValueError, match="window"):
        M(window=0)
    with pytest.raises(ValueError, match="impl"):
        M(impl="flex")
    with pytest.raises(TypeError, match="fine"):
        M(fine=2.0)
