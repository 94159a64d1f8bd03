"""Measurement helpers: the telemetry's attention-output error against an independent computation,
attention-only timing through the attention interface, and the per-run peak memory."""

from types import SimpleNamespace

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import Selection, Telemetry, exercise_sparse_paths
from tokensparse.engine.executors import compress_attend_scatter, gather_attend, reference_attention
from tokensparse.eval.env import PeakMemory
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

B, HQ, HKV, D = 2, 6, 2, 16


def _call(lq, lk, layer=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g)
    k = torch.randn(B, HKV, lk, D, generator=g) * 2  # peaky attention: selection matters
    v = torch.randn(B, HKV, lk, D, generator=g)
    return SimpleNamespace(query=q, key=k, value=v, mask=None, scale=D**-0.5, layer_idx=layer,
                           kind="prefill" if lq == lk else "decode")


def _rel_err(out, ref):
    """Per head ‖out − ref‖_F / ‖ref‖_F over batch and rows, then the mean over heads."""
    return ((out - ref).pow(2).sum((0, 2, 3)) / ref.pow(2).sum((0, 2, 3))).sqrt().mean().item()


def _sorted_subsets(heads, length, n, seed, keep_last=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B * heads):
        pick = torch.randperm(length - keep_last, generator=g)[: n - keep_last]
        rows.append(torch.cat([pick, torch.arange(length - keep_last, length)]).sort().values)
    return torch.stack(rows).view(B, heads, n)


@pytest.mark.parametrize("heads", [HQ, HKV])
def test_error_of_a_row_selection_matches_the_executor(heads):
    call = _call(40, 40)
    idx = _sorted_subsets(heads, 40, 20, seed=1, keep_last=4)
    tel = Telemetry(sample_queries=40)  # every row sampled: the estimate is exact
    tel.observe(call, Selection.rows(idx))
    sparse = compress_attend_scatter(call.query, call.key, call.value, idx, call.scale, impl="reference")
    dense = reference_attention(call.query, call.key, call.value, scale=call.scale)
    err = tel.summary()[0]["error"]
    assert err == pytest.approx(_rel_err(sparse, dense), rel=1e-4)
    assert err > 0.2  # half the rows are skipped (error 1 on those), random keys for the rest


def test_error_of_a_key_selection_matches_the_executor():
    call = _call(1, 50, layer=3)
    idx = _sorted_subsets(HKV, 50, 12, seed=2, keep_last=1)
    tel = Telemetry()
    tel.observe(call, Selection.keys(idx))
    sparse = gather_attend(call.query, call.key, call.value, idx, call.scale, impl="reference")
    dense = reference_attention(call.query, call.key, call.value, scale=call.scale)
    assert tel.summary()[3]["error"] == pytest.approx(_rel_err(sparse, dense), rel=1e-4)


def test_error_is_zero_for_dense_and_for_everything_selected():
    call = _call(24, 24)
    tel = Telemetry()
    tel.observe(call, Selection.dense())
    tel.observe(call, Selection.keys(torch.arange(24).expand(B, HKV, 24)))
    tel.observe(call, Selection.rows(torch.arange(24).expand(B, HQ, 24)))
    assert all(e < 1e-6 for r in tel.records for e in r["error"])
    rep = tel.report()
    assert rep["error"] < 1e-6 and rep["layers_observed"] == 1 and set(rep["per_layer"]) == {"0"}
    assert set(rep["per_layer"]["0"]) == {"density", "mass", "error", "calls"} and rep["per_layer"]["0"]["calls"] == 3


@pytest.mark.parametrize("name", ["token_sparse", "token_select", "snapkv", "streaming_llm"])
def test_methods_at_full_budget_report_zero_error(name):
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = tiny_inputs(1, 40)
    method = ts.methods.get(name).at_full_budget()
    with torch.no_grad(), exercise_sparse_paths(), ts.sparsify(model, method, telemetry=True) as s:
        model.generate(ids, cache=s.new_cache(), max_new_tokens=3, do_sample=False)
    rep = s.telemetry.report()
    assert rep["layers_observed"] > 0 and rep["error"] < 1e-5 and rep["mass"] > 1 - 1e-5


# ---- attention-only time ----------------------------------------------------------------------------


def test_time_attention_counts_every_layer_and_changes_nothing():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, _ = tiny_inputs(1, 32)
    before = model.config._attn_implementation
    with torch.no_grad():
        ref = model(ids).logits
        with ts.time_attention(model) as timer:
            out = model(ids).logits
            assert timer.calls == 3 and timer.seconds > 0
            assert timer.lap("first") == (pytest.approx(timer.laps["first"][0]), 3) and timer.calls == 0
        assert model.config._attn_implementation == before
        assert torch.equal(out, ref)
        method = ts.methods.get("token_sparse")(coverage=0.3, layers="all", min_tokens=4, window=4)
        with ts.sparsify(model, method) as s:
            sparse_ref = model(ids).logits
            with ts.time_attention(model) as timer:
                sparse = model(ids).logits
            assert model.config._attn_implementation == "tokensparse"
        assert s.stats["sparse_calls"] == 6 and timer.calls == 3
        assert torch.equal(sparse, sparse_ref) and max_diff(sparse, ref) > 1e-4  # the method ran under the timer
        assert model.config._attn_implementation == before


@pytest.mark.parametrize("order", ["timer_outside", "timer_inside"])
def test_time_attention_counts_the_method_in_either_nesting_order(order):
    model = tiny_model("llama", num_hidden_layers=3)
    ids, _ = tiny_inputs(1, 32)
    before = model.config._attn_implementation
    method = ts.methods.get("token_sparse")(coverage=0.3, layers="all", min_tokens=4, window=4)
    with torch.no_grad():
        dense = model(ids).logits
        with ts.sparsify(model, method):
            ref = model(ids).logits
        if order == "timer_outside":
            with ts.time_attention(model) as timer:
                with ts.sparsify(model, method) as s:
                    assert model.config._attn_implementation == "tokensparse_timed_tokensparse"
                    out = model(ids).logits
                    calls_in_session = timer.calls
                assert model.config._attn_implementation == "tokensparse_timed_" + before
                model(ids)  # dense again, still timed
        else:
            with ts.sparsify(model, method) as s:
                with ts.time_attention(model) as timer:
                    out = model(ids).logits
                    calls_in_session = timer.calls
    assert model.config._attn_implementation == before
    # one timed call per layer, each of them through the method (which made all 3 layers sparse)
    assert calls_in_session == 3 and s.stats["sparse_calls"] == 3
    assert timer.calls == (6 if order == "timer_outside" else 3)
    assert torch.equal(out, ref) and max_diff(out, dense) > 1e-4


def test_time_attention_around_sparsify_restores_on_error():
    model = tiny_model("llama", num_hidden_layers=2)
    before = model.config._attn_implementation
    with ts.time_attention(model) as timer:
        with pytest.raises(RuntimeError, match="boom"), ts.sparsify(model, ts.methods.get("snapkv")()):
            raise RuntimeError("boom")
        assert model.config._attn_implementation == "tokensparse_timed_" + before
        with ts.sparsify(model, ts.methods.get("snapkv")()), pytest.raises(RuntimeError, match="nesting"):
            with ts.time_attention(model):
                pass
    assert model.config._attn_implementation == before and timer.calls == 0


def test_time_attention_restores_on_error_and_refuses_nesting_and_eager():
    model = tiny_model("llama", num_hidden_layers=2)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), ts.time_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    with ts.time_attention(model), pytest.raises(RuntimeError, match="nesting"):
        with ts.time_attention(model):
            pass
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="sdpa"), ts.time_attention(model):
        pass


# ---- peak memory ------------------------------------------------------------------------------------


def test_peak_memory_sees_a_temporary_allocation():
    mem = PeakMemory().start()
    x = torch.ones(32 * 2**20)  # 128 MiB, touched, then freed before stop()
    del x
    out = mem.stop()
    assert set(out) == {"peak_rss_bytes", "rss_start_bytes", "scope"}
    assert out["peak_rss_bytes"] >= out["rss_start_bytes"] > 0
    if out["scope"] == "block":  # Linux: the peak was reset at start(), so it is this block's
        assert out["peak_rss_bytes"] - out["rss_start_bytes"] >= 100 * 2**20
