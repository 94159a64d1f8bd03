"""Engine v2 extension points: the selection pipeline, key biases on every executor, the per-forward
carry, and the methods that prove them (TidalDecode, ZeroTuning)."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tokensparse as ts
from tokensparse.engine import KeyBias, KeyPlan, Method, Selection, Telemetry, exercise_sparse_paths
from tokensparse.engine import executors as ex
from tokensparse.engine.selection import grouped_logits
from tokensparse.testing import max_diff, tiny_inputs, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=4)


# ---- key bias: every executor, fast path against the reference and against the paper's formula --------


def _qkv(b=2, hq=4, hkv=2, lq=6, lk=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _bias(b=2, hq=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return KeyBias(torch.tensor([[0, 3], [2, 5]])[:b], torch.randn(1, hq, 2, generator=g))


def test_key_bias_equals_rescaling_the_probabilities():
    """ZeroTuning's formula: column j's weight times γ, rows renormalised == log γ added to its logit."""
    q, k, v = _qkv(lq=10)
    gamma = torch.tensor([0.5, 2.0, 4.0, 1.0])
    bias = KeyBias(torch.zeros(2, 1, dtype=torch.long), gamma.log().view(1, 4, 1))
    p = torch.softmax(grouped_logits(q, k, 16**-0.5).masked_fill(~ex.causal_mask(10, 10), float("-inf")), -1)
    p[..., 0] *= gamma.view(1, 4, 1)
    p = p / p.sum(-1, keepdim=True)
    want = (p.view(2, 2, 2 * 10, 10) @ v).view(2, 4, 10, 16)
    assert max_diff(ex.dense_attention(q, k, v, None, None, bias), want) < 1e-5
    assert max_diff(ex.reference_attention(q, k, v, None, None, bias), want) < 1e-5


@pytest.mark.parametrize("lq,lk", [(6, 10), (1, 10), (10, 10)])
def test_dense_executor_applies_the_bias_like_the_reference(lq, lk):
    q, k, v = _qkv(lq=lq, lk=lk)
    mask = ex.causal_mask(lq, lk)[None, None].expand(2, 1, lq, lk).clone()
    mask[0, :, :, :2] = False  # two padding keys in row 0
    for m in (None, mask):
        live = None if m is None else m.any(-1, keepdim=True).expand(2, 4, lq, 16)  # padding queries see nothing
        fast = ex.dense_attention(q, k, v, m, 0.3, _bias())
        ref = ex.reference_attention(q, k, v, m, 0.3, _bias())
        assert max_diff(fast, ref, live) < 1e-5
        assert max_diff(fast, ex.dense_attention(q, k, v, m, 0.3), live) > 1e-3  # the bias does something


def test_gather_and_segments_executors_apply_the_bias():
    q, k, v = _qkv(lq=1, lk=12)
    idx = torch.tensor([[[0, 2, 3, 7, 11], [1, 3, 5, 9, 11]]]).expand(2, 2, 5)
    bias = _bias()
    fast = ex.gather_attend(q, k, v, idx, 0.25, bias=bias)
    ref = ex.gather_attend(q, k, v, idx, 0.25, impl="reference", bias=bias)
    assert max_diff(fast, ref) < 1e-5
    top = torch.tensor([[[3, 5]]]).expand(2, 1, 2)
    segs = [(k[:, :, :2], v[:, :, :2]), (ex.gather_rows(k, top.expand(2, 2, 2)), ex.gather_rows(v, top.expand(2, 2, 2))),
            (k[:, :, 9:], v[:, :, 9:])]
    pos = [torch.arange(2)[None, None], top, torch.arange(9, 12)[None, None]]
    fast = ex.segments_attend(q, segs, 0.25, bias=bias, positions=pos)
    ref = ex.segments_attend(q, segs, 0.25, impl="reference", bias=bias, positions=pos)
    full_idx = torch.tensor([0, 1, 3, 5, 9, 10, 11]).expand(2, 2, 7)
    assert max_diff(fast, ref) < 1e-5
    assert max_diff(fast, ex.gather_attend(q, k, v, full_idx, 0.25, bias=bias)) < 1e-5
    with pytest.raises(ValueError, match="positions"):
        ex.segments_attend(q, segs, 0.25, bias=bias)


@pytest.mark.parametrize("per", ["query_head", "kv_head"])
def test_compress_executor_applies_the_bias(per):
    q, k, v = _qkv(lq=10, lk=10)
    heads = 4 if per == "query_head" else 2
    idx = torch.stack([torch.tensor([0, 2, 3, 5, 8, 9])] * heads)[None].expand(2, heads, 6)
    fast = ex.compress_attend_scatter(q, k, v, idx, 0.25, bias=_bias())
    ref = ex.compress_attend_scatter(q, k, v, idx, 0.25, impl="reference", bias=_bias())
    assert max_diff(fast, ref) < 1e-5


# ---- ZeroTuning on the real engine path ---------------------------------------------------------------


def test_zero_tuning_runs_on_the_sdpa_path_and_matches_the_reference(model, monkeypatch):
    ids, mask = tiny_inputs(2, 24, pad=5)
    method = ts.methods.get("zero_tuning")(gamma=3.0, heads=[0, 2], layers=[1, 3])
    with torch.no_grad(), ts.sparsify(model, method):
        fast = model(ids, attention_mask=mask).logits
    calls = {"sdpa": 0, "reference": 0}
    real_sdpa, real_ref = F.scaled_dot_product_attention, ex.reference_attention

    def sdpa(*a, **kw):
        calls["sdpa"] += 1
        return real_sdpa(*a, **kw)

    def reference(*a, **kw):
        calls["reference"] += 1
        return real_ref(*a, **kw)

    monkeypatch.setattr(ex.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(ex, "reference_attention", reference)
    with torch.no_grad(), ts.sparsify(model, method):
        again = model(ids, attention_mask=mask).logits
    assert calls == {"sdpa": 4, "reference": 0} and torch.equal(fast, again)
    monkeypatch.undo()

    @dataclass(eq=False)
    class ReferenceZeroTuning(type(method)):
        def forward(self, call):
            return ex.reference_attention(call.query, call.key, call.value, call.mask, call.scale, self.key_bias(call))

    ref_method = ReferenceZeroTuning(gamma=3.0, heads=[0, 2], layers=[1, 3])
    with torch.no_grad(), ts.sparsify(model, ref_method):
        ref = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(fast, ref, real) < 1e-4
    assert max_diff(fast, dense, real) > 1e-2  # γ = 3 changes the output


def test_zero_tuning_biases_each_rows_first_real_token(model):
    """A left-padded row rescales its first real token, so it equals the same prompt alone."""
    ids, mask = tiny_inputs(2, 20, pad=6)
    method = ts.methods.get("zero_tuning")(gamma=0.3)
    with torch.no_grad(), ts.sparsify(model, method):
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 6:]).logits
    assert max_diff(batch[:1, 6:], alone) < 1e-4


def test_zero_tuning_refuses_heads_the_model_does_not_have(model):
    with pytest.raises(ValueError, match="heads"):
        with ts.sparsify(model, ts.methods.get("zero_tuning")(gamma=2.0, heads=[4])):
            pass


# ---- the carry between layers ---------------------------------------------------------------------------


@dataclass(eq=False)
class _CarryProbe(Method):
    """Writes its layer index into the carry and records what each layer found there."""

    seen: list = None

    def select(self, call):
        self.seen.append((call.session.forward_passes, call.layer_idx, sorted(call.carry)))
        call.carry[call.layer_idx] = True
        return None


def test_carry_is_shared_by_the_layers_of_one_pass_and_cleared_between_passes(model):
    probe = _CarryProbe(seen=[])
    ids, _ = tiny_inputs(1, 8)
    with torch.no_grad(), ts.sparsify(model, probe) as s:
        model.generate(ids, cache=s.new_cache(), max_new_tokens=3, do_sample=False)
    assert s.forward_passes == 3
    for passes, layer, carried in probe.seen:
        assert carried == list(range(layer)), (passes, layer, carried)  # only this pass's earlier layers


@pytest.mark.parametrize("pool, per", [(1, "kv_head"), (5, "kv_head"), (1, "layer"), (5, "layer")])
def test_tidal_decode_reuses_the_selection_layers_positions(model, pool, per):
    """Layers after a selection layer attend to exactly its top positions (+ the current token), and
    the re-selection layer picks afresh; with ``pool_kernel`` the ranking is the max-pooled weights
    (ties to the earlier position); with ``select_per="layer"`` one set from every head's maximum."""
    ids, _ = tiny_inputs(1, 30)
    method = ts.methods.get("tidal_decode")(budget=8, selection_layers=[1, 2], pool_kernel=pool, select_per=per)
    tele = _AllSelections()
    with torch.no_grad(), ts.sparsify(model, method, telemetry=tele) as s:
        model.generate(ids, cache=s.new_cache(), max_new_tokens=3, do_sample=False)
    assert s.info["tidal_selection_layers"] == [1, 2]
    steps = [tele.calls[i : i + 3] for i in range(0, len(tele.calls), 3)]
    assert len(steps) == 2  # 2 decode steps x layers 1-3 (layer 0 is left dense and not observed)
    for step in steps:
        by_layer = {layer: (kind, mask, weights) for layer, kind, mask, weights in step}
        assert by_layer[1][0] == by_layer[2][0] == "dense"
        kind, mask, _ = by_layer[3]
        assert kind == "keys"
        weights = by_layer[2][2][..., :-1]  # layer 2's own attention weights decide layer 3's keys
        if per == "layer":
            weights = weights.amax(1, keepdim=True).expand_as(weights)
        if pool > 1:
            weights = torch.nn.functional.max_pool1d(weights, pool, stride=1, padding=pool // 2)
        top = torch.sort(-weights, dim=-1, stable=True).indices[..., :7]
        want = torch.zeros_like(mask)
        want.scatter_(-1, top, True)
        want[..., -1] = True
        assert torch.equal(mask, want)


@pytest.mark.parametrize("n_layers, config, want", [
    (30, {}, [2, 6, 10, 14, 18, 22, 26]),  # the default: every 4th layer from layer 2
    (30, {"selection_layers": "paper"}, [2, 12]),  # the paper's layers 2 and 13 of 32, scaled
    (32, {"selection_layers": "paper"}, [2, 13]),
    (30, {"selection_layers": "periodic", "period": 6}, [2, 8, 14, 20, 26]),
    (30, {"selection_layers": "periodic", "period": 10}, [2, 12, 22]),
    (2, {"selection_layers": "periodic"}, [1]),
    (30, {"selection_layers": [14]}, [14]),
])
def test_tidal_decode_selection_layer_schedules(n_layers, config, want):
    session = SimpleNamespace(num_layers=n_layers, state={}, info={})
    ts.methods.get("tidal_decode")(**config).setup(session)
    assert session.info["tidal_selection_layers"] == want
    assert session.state["tidal_selection_layers"] == frozenset(want)


def test_tidal_decode_refuses_layers_beyond_the_model():
    with pytest.raises(ValueError, match="out of range"):
        ts.methods.get("tidal_decode")(selection_layers=[30]).setup(SimpleNamespace(num_layers=30, state={}, info={}))
    with pytest.raises(ValueError, match="only applies to selection_layers='periodic'"):
        ts.methods.get("tidal_decode")(selection_layers="paper", period=3)


class _AllSelections(Telemetry):
    """Records (layer, kind, selection mask, per-KV-head max attention weight) for each observed call."""

    def __init__(self):
        super().__init__(sample_queries=1)
        self.calls = []

    def observe(self, call, selection):
        if call.kind != "decode":
            return
        p = grouped_logits(call.query, call.key, call.scale)[:, :, 0].softmax(-1)
        weights = p.view(call.batch, call.n_kv_heads, call.group, -1).amax(2)
        mask = None if selection.kind == "dense" else selection.mask(call.k_len).expand(call.batch, call.n_kv_heads, -1)
        self.calls.append((call.layer_idx, selection.kind, mask, weights))


# ---- the pipeline's own rules ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Everything(Method):
    """Selects every key as a 'rows' selection marked complete."""

    def select(self, call):
        if call.kind != "prefill":
            return None
        idx = torch.arange(call.k_len).expand(call.batch, call.n_kv_heads, call.k_len)
        return Selection.rows(idx, complete=True)


def test_a_complete_selection_runs_dense_unless_sparse_paths_are_forced(model, monkeypatch):
    ids, _ = tiny_inputs(1, 12)
    used = []
    real = ex.compress_attend_scatter
    monkeypatch.setattr("tokensparse.engine.pipeline.compress_attend_scatter",
                        lambda *a, **kw: used.append(1) or real(*a, **kw))
    with torch.no_grad(), ts.sparsify(model, _Everything()) as s:
        dense = model(ids).logits
    assert not used and s.stats["dense_calls"] == 4 and s.stats["sparse_calls"] == 0
    with torch.no_grad(), exercise_sparse_paths(), ts.sparsify(model, _Everything()) as s:
        forced = model(ids).logits
    assert len(used) == 4 and s.stats["sparse_calls"] == 4
    assert max_diff(dense, forced) < 1e-5


def test_key_plan_counts_sinks_and_window_per_row_over_real_tokens(model):
    """A padded row's sinks and window sit after its padding; candidates exclude them."""
    seen = {}

    @dataclass(eq=False)
    class Probe(Method):
        def select(self, call):
            if call.layer_idx == 0 and call.kind == "prefill":
                plan = KeyPlan(call, n_sink=2, window=3)
                seen.update(lo=plan.lo, hi=plan.hi, n_cand=plan.n_cand.flatten().tolist(), cand=plan.cand_mask.clone())
                scores = torch.arange(plan.hi - plan.lo, dtype=torch.float).expand(call.batch, 1, -1)
                seen["sel"] = plan.select(scores, 2, "keys").mask(call.k_len)
            return None

    ids, mask = tiny_inputs(2, 12, pad=4)
    with torch.no_grad(), ts.sparsify(model, Probe()):
        model(ids, attention_mask=mask)
    assert seen["lo"] == 0 and seen["hi"] == 9 and seen["n_cand"] == [3, 7]
    assert seen["cand"][0].nonzero().flatten().tolist() == [6, 7, 8]  # row 0: real tokens 4..11
    # row 0 keeps sinks 4, 5, the window 9..11 and the 2 best candidates (7, 8): every real token but 6
    assert seen["sel"][0, 0].nonzero().flatten().tolist() == [4, 5, 7, 8, 9, 10, 11]
    assert seen["sel"][1, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9, 10, 11]


def test_key_plan_top_of_a_shortlist_equals_top_over_all_candidates(model):
    """``KeyPlan.top_of`` (a re-rank among a wider top, FASA's ``rerank``) takes what :meth:`top`
    takes with the new scores when the shortlist holds every candidate, per-row counts included
    (padded rows hold 3 and 7 candidates: a budget of 5 takes 3 and 5), also given the counts on
    the host; it refuses a shortlist narrower than the budget and scores of another shape."""
    seen = {}

    class Probe(Method):
        def select(self, call):
            if call.layer_idx == 0 and call.kind == "prefill":
                plan = KeyPlan(call, n_sink=2, window=3)
                g = torch.Generator().manual_seed(0)
                first = torch.randn(call.batch, 2, plan.hi - plan.lo, generator=g)
                again = torch.randn(call.batch, 2, plan.hi - plan.lo, generator=g)
                wide, wide_valid = plan.top(first, 9)  # every candidate of each row
                full = again.gather(-1, wide - plan.lo)  # the new scores of the shortlist
                seen["top"] = plan.top(again, 5)
                seen["top_of"] = plan.top_of(wide, wide_valid, full, 5)
                seen["host"] = plan.top_of(wide, wide_valid, full, torch.full((call.batch, 1), 5), host=[5, 5])
                seen["narrow"] = (plan.top(first, 2), full)
                seen["plan"] = plan
            return None

    ids, mask = tiny_inputs(2, 12, pad=4)
    with torch.no_grad(), ts.sparsify(model, Probe()):
        model(ids, attention_mask=mask)
    (top, valid), (of, of_valid), (host, host_valid) = seen["top"], seen["top_of"], seen["host"]
    assert valid[:, 0, :].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    for got, got_valid in ((of, of_valid), (host, host_valid)):
        assert torch.equal(got_valid, valid) and torch.equal(got[valid], top[valid])
    (narrow, _), full = seen["narrow"]
    with pytest.raises(ValueError, match="shortlist of 2"):
        seen["plan"].top_of(narrow, None, full[..., :2], 5)
    with pytest.raises(ValueError, match="scores"):
        seen["plan"].top_of(narrow, None, full, 2)
