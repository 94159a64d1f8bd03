"""CCA-Attention, training-free (methods/cca.py) and the band executor it runs on (engine/blocks.py):
the 1-based coverage rule against hand-made loops, the fast path against the reference (shapes,
GQA, padding, fp32 and bf16), a window covering everything = dense, a padded row = the prompt
alone, the observed selection, config errors, tiny models."""

from __future__ import annotations


import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import band_attend
from tokensparse.engine.executors import logit_softcap
from tokensparse.methods.cca import core_tokens
from tokensparse.testing import full_budget_runs, max_diff, padded_row_and_alone, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

M = ts.methods.get("cca")
SCALE = 0.3


def qkv(b=2, hq=4, hkv=2, length=45, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def dense(q, k, v, scale=SCALE):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vv


# ---- the rule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("group,window,tail,length", [(4, 6, 0, 40), (3, 1, 0, 20), (16, 32, 0, 100), (4, 6, 9, 40),
                                                       (2, 50, 0, 30)])
def test_visible_groups_follow_the_paper_rule(group, window, tail, length):
    """1-based query ``t`` reads core tokens ``j ≤ ⌊(t−w)/g⌋`` (none while ``t ≤ w``) and raw tokens
    ``(t − w_t, t]``, ``w_t = w + r_t``: together every token ``1 … t`` exactly once."""
    n = M(group=group, window=window, dense_tail=tail).visible_groups(length).tolist()
    tail_from = (length - tail) // group if tail else None
    for t in range(1, length + 1):
        if tail_from is not None and (t - 1) // group >= tail_from:
            assert n[t - 1] == 0
            continue
        nt = (t - window) // group if t > window else 0
        assert n[t - 1] == nt
        if t > window:
            wt = window + (t - window) % group
            raw = set(range(t - wt + 1, t + 1))
            assert window <= len(raw) <= window + group - 1
        else:
            raw = set(range(1, t + 1))
        pooled = set(range(1, nt * group + 1))
        assert not raw & pooled and raw | pooled == set(range(1, t + 1))


def test_reference_averages_the_right_values():
    """Zero keys: every logit is 0, so each query's output is the plain mean of the values it reads —
    group means for the visible core tokens, raw values for its window (spelled out by hand)."""
    g, w, length = 3, 4, 23
    q = torch.randn(1, 1, length, 2)
    k = torch.zeros(1, 1, length, 2)
    v = torch.randn(1, 1, length, 2)
    got = M(group=g, window=w, dense_tail=0, impl="reference").reference(q, k, v, SCALE)
    for t in range(1, length + 1):
        nt = max(0, (t - w) // g)
        vals = [v[0, 0, j * g : (j + 1) * g].mean(0) for j in range(nt)] + [v[0, 0, i] for i in range(nt * g, t)]
        assert max_diff(got[0, 0, t - 1], torch.stack(vals).mean(0)) < 1e-6, t
    fast = M(group=g, window=w, dense_tail=0).fast(q, k, v, SCALE)
    assert max_diff(fast, got) < 1e-6


def test_core_tokens_weight_each_group_by_its_last_query():
    b, hq, hkv, length, d, g = 1, 4, 2, 24, 8, 4
    q, k, v = qkv(b, hq, hkv, length, d)
    for probe in ("query_head", "kv_head"):
        kc, vc = core_tokens(q, k, v, g, 5, SCALE, probe)
        assert kc.shape == (b, hq if probe == "query_head" else hkv, 5, d)
        for h in range(hq):
            kv = h // (hq // hkv)
            hc = h if probe == "query_head" else kv
            for j in range(5):
                heads = [h] if probe == "query_head" else [kv * 2, kv * 2 + 1]
                logits = torch.stack([(q[0, x, j * g + g - 1] @ k[0, kv, j * g : j * g + g].T) * SCALE for x in heads])
                alpha = torch.softmax(logits.mean(0), -1)
                assert max_diff(kc[0, hc, j], alpha @ k[0, kv, j * g : j * g + g]) < 1e-5
                assert max_diff(vc[0, hc, j], alpha @ v[0, kv, j * g : j * g + g]) < 1e-5


# ---- the band executor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled_heads", [0, 2, 4])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_band_attend_against_an_explicit_mask(pooled_heads, cap):
    b, hq, hkv, length, d, m = 2, 4, 2, 37, 8, 6
    q, k, v = qkv(b, hq, hkv, length, d, seed=1)
    gen = torch.Generator().manual_seed(2)
    pos = torch.arange(length)
    lo = (pos - torch.randint(0, 12, (length,), generator=gen)).clamp_min(0)
    lo[-5:] = 0  # rows reading everything (a dense tail) after narrow ones
    n = torch.randint(0, m + 1, (length,), generator=gen) if pooled_heads else None
    pooled = None
    if pooled_heads:
        pooled = (torch.randn(b, pooled_heads, m, d, generator=gen), torch.randn(b, pooled_heads, m, d, generator=gen))
    with logit_softcap(cap), pytest.MonkeyPatch.context() as mp:
        mp.setattr("tokensparse.engine.blocks.BAND_CHUNK_ELEMS", 500)  # several chunks
        got = band_attend(q, k, v, lo, SCALE, pooled=pooled, n_pooled=n)
    g = hq // hkv
    keys, vals = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    allowed = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= pos[:, None])
    if pooled_heads:
        r = hq // pooled_heads
        keys = torch.cat([pooled[0].repeat_interleave(r, 1), keys], 2)
        vals = torch.cat([pooled[1].repeat_interleave(r, 1), vals], 2)
        allowed = torch.cat([torch.arange(m)[None, :] < n[:, None], allowed], 1)
    s = (q.double() @ keys.double().transpose(-1, -2)) * SCALE
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    expect = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vals.double()
    assert max_diff(got, expect) < 1e-5


def test_band_attend_refuses_a_row_without_its_own_key():
    q, k, v = qkv(1, 2, 1, 5, 4)
    with pytest.raises(ValueError, match="its own key"):
        band_attend(q, k, v, torch.tensor([0, 0, 3, 0, 0]), SCALE)


# ---- fast path = reference ------------------------------------------------------------------------------


CASES = [  # (b, hq, hkv, length, group, window, dense_tail, probe)
    (1, 4, 2, 45, 4, 6, 0, "query_head"),
    (2, 4, 1, 64, 3, 5, 0, "kv_head"),
    (1, 6, 2, 100, 16, 20, 0, "query_head"),
    (2, 4, 4, 33, 2, 1, 7, "query_head"),
    (1, 4, 2, 50, 5, 7, 11, "kv_head"),
    (1, 2, 2, 9, 4, 3, 0, "query_head"),
]


@pytest.mark.parametrize("b,hq,hkv,length,group,window,tail,probe", CASES)
def test_fast_path_equals_the_reference(b, hq, hkv, length, group, window, tail, probe):
    q, k, v = qkv(b, hq, hkv, length, seed=length)
    m = M(group=group, window=window, dense_tail=tail, probe=probe)
    ref = m.reference(q, k, v, SCALE)
    assert max_diff(m.fast(q, k, v, SCALE), ref) < 1e-5
    assert max_diff(ref, dense(q, k, v)) > 1e-2, "the rule did not act"
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    fast_bf16 = m.fast(qb, kb, vb, SCALE)
    assert fast_bf16.dtype == torch.bfloat16
    assert max_diff(fast_bf16, m.reference(qb, kb, vb, SCALE)) < 4e-2  # one bf16 ulp of outputs below 4


def test_fast_path_equals_the_reference_on_a_padded_batch():
    q, k, v = qkv(3, 4, 2, 40, seed=7)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[0, :9] = False
    valid[2, :33] = False
    m = M(group=3, window=4, dense_tail=5)
    got = m.fast(q, k, v, SCALE, valid)
    assert max_diff(got, m.reference(q, k, v, SCALE, valid)) < 1e-5
    for r, start in ((0, 9), (1, 0), (2, 33)):  # each row = that row alone on its real tokens
        alone = m.fast(q[r : r + 1, :, start:], k[r : r + 1, :, start:], v[r : r + 1, :, start:], SCALE)
        assert max_diff(got[r : r + 1, :, start:], alone) < 1e-6
        assert float(got[r, :, :start].abs().sum()) == 0.0  # padding query rows output 0


def test_a_window_covering_everything_is_dense_attention():
    q, k, v = qkv(2, 4, 2, 30, seed=3)
    for m in (M(group=4, window=30), M(group=4, window=1, dense_tail=1000)):
        assert max_diff(m.fast(q, k, v, SCALE), dense(q, k, v)) < 1e-5
        assert max_diff(m.reference(q, k, v, SCALE), dense(q, k, v)) < 1e-6


# ---- in the engine --------------------------------------------------------------------------------------


def test_full_budget_equals_dense():
    dense_logits, runs = full_budget_runs(tiny_model("llama"), M.at_full_budget())
    for forced, full, stats in runs:
        assert max_diff(full[0, 5:], dense_logits[0, 5:]) < 1e-4 and max_diff(full[1], dense_logits[1]) < 1e-4
        assert stats.get("sparse_calls", 0) == (2 if forced else 0)


@pytest.mark.parametrize("probe", ["query_head", "kv_head"])
def test_padded_row_equals_the_prompt_alone(probe):
    model = tiny_model("llama")
    pad = 7
    method = M(group=3, window=5, dense_layers=0, dense_tail=0, probe=probe)
    batched, alone, dense_logits = padded_row_and_alone(model, method, 50, pad)
    assert max_diff(batched[0, pad:], alone[0]) < 1e-4
    assert max_diff(alone, dense_logits) > 1e-2, "the method did not act"


def test_fast_and_reference_agree_in_a_model_and_decode_runs_dense():
    model = tiny_model("qwen2")
    ids, mask = tiny_inputs(2, 44, pad=4, seed=1)
    outs = []
    for impl in ("fast", "reference"):
        with torch.no_grad(), ts.sparsify(model, M(group=4, window=6, dense_layers=1, dense_tail=8, impl=impl)) as s:
            outs.append(model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=4,
                                       do_sample=False, output_logits=True, return_dict_in_generate=True,
                                       pad_token_id=0, min_new_tokens=4))
        assert s.stats["sparse_calls"] == 1  # layer 1 of the prefill; decode steps and layer 0 dense
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert max_diff(torch.stack(outs[0].logits), torch.stack(outs[1].logits)) < 1e-4


def test_observed_selection_lists_the_raw_groups():
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 40)
    seen = []

    class Spy(ts.Observer):
        def on_selection(self, call, sel):
            seen.append(sel)

    m = M(group=4, window=6, dense_layers=0, dense_tail=0)
    with ts.sparsify(model, m, observers=[Spy()]), torch.no_grad():
        model(input_ids=ids)
    assert len(seen) == 2
    n = m.visible_groups(40)
    for sel in seen:
        assert sel.kind == "blocks" and sel.block_q == sel.block_k == 4 and not sel.complete
        for i in range(10):
            got = sel.idx[0, 0, i] if sel.valid is None else sel.idx[0, 0, i][sel.valid[0, 0, i]]
            assert got.tolist() == list(range(int(n[4 * i]), i + 1))


def test_bf16_model_runs_finite_and_the_paths_agree():
    ids, mask = tiny_inputs(2, 40, pad=3, seed=2)
    model = tiny_model("llama", torch.bfloat16)
    logits = {}
    for impl in ("fast", "reference"):
        with torch.no_grad(), ts.sparsify(model, M(group=4, window=6, dense_layers=0, dense_tail=0, impl=impl)) as s:
            logits[impl] = model(input_ids=ids, attention_mask=mask, cache=s.new_cache()).logits
    assert logits["fast"].dtype == torch.bfloat16 and torch.isfinite(logits["fast"][mask.bool()]).all()
    assert max_diff(logits["fast"], logits["reference"], mask) <= 0.125  # TOLERANCE[bf16]


def test_config_errors():
    for field in ("group", "window"):
        with pytest.raises(ValueError, match=rf"cca: {field} must be an int >= 1, got 0"):
            M(**{field: 0})
    with pytest.raises(ValueError, match="dense_tail"):
        M(dense_tail=-1)
    with pytest.raises(ValueError, match="probe"):
        M(probe="mean")
    with pytest.raises(ValueError, match="impl"):
        M(impl="flex")
    with pytest.raises(TypeError, match="group"):
        M(group=2.5)
    assert M().config_dict() == {"method": "cca", "group": 16, "window": 1024, "probe": "query_head",
                                 "dense_layers": 2, "dense_tail": 128, "impl": "fast"}
