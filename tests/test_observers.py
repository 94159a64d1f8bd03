"""Observers (Engine v2 part 2): attached with ``sparsify(observers=...)`` or ``ts.observe``, inside
and outside ``sparsify``, they change nothing; telemetry as an observer gives the numbers it gave
before; the sink detector's scores against a brute-force attention matrix, padded rows equal the
prompt alone, secondary-sink runs."""

import pytest
import torch

import tokensparse as ts
from tokensparse.analysis import SinkDetector, sink_scores
from tokensparse.engine import Observer
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float32)


class Calls(Observer):
    def __init__(self):
        self.calls, self.selections = [], []

    def on_call(self, call):
        self.calls.append((call.layer_idx, call.kind))

    def on_selection(self, call, selection):
        self.selections.append((call.layer_idx, selection.kind))


def _brute_sigma(q, k, scale, mask):
    """σ from the explicit attention matrix (GQA by repetition)."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    m = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    p = s.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0.0)
    seen = m.sum(-2).float()
    return torch.where(seen > 0, p.sum(-2) / seen.clamp_min(1), torch.zeros(())), seen


def test_sink_scores_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 10, 8), torch.randn(2, 3, 10, 8)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    sig, seen = sink_scores(q, k, 0.35)
    ref, ref_seen = _brute_sigma(q, k, 0.35, causal)
    assert torch.allclose(sig, ref, atol=1e-6) and torch.equal(seen, ref_seen.expand_as(seen))
    pad = causal.expand(2, 1, 10, 10).clone()
    pad[0, :, :, :3] = False  # row 0 left-padded by 3
    pad[0, :, :3, :] = False
    sig, seen = sink_scores(q, k, 0.35, pad)
    ref, ref_seen = _brute_sigma(q, k, 0.35, pad)
    assert torch.allclose(sig, ref, atol=1e-6) and torch.equal(seen, ref_seen.expand_as(seen))
    assert float(sig[0, :, :3].abs().max()) == 0.0


def test_observe_outside_sparsify_changes_nothing_and_sees_every_call(model):
    ids, mask = tiny_inputs(1, 24)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        obs = Calls()
        with ts.observe(model, obs) as s:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        assert s.method.name == "observe_only"
    n = model.config.num_hidden_layers
    assert obs.calls == [(i, "prefill") for i in range(n)] + [(i, "decode") for i in range(n)] * 2
    assert obs.selections == []  # nothing selected
    assert max_diff(out.logits[0], ref[:, -1]) <= TOLERANCE[torch.float32]
    assert ts.engine.active_session(model) is None


def test_observe_inside_sparsify_joins_and_leaves_the_session(model):
    ids, mask = tiny_inputs(1, 24)
    method = ts.methods.get("token_sparse").at_sparse_budget()
    first, second = Calls(), Calls()
    with torch.no_grad(), ts.sparsify(model, method, observers=[first]) as s:
        with ts.observe(model, second) as s2:
            assert s2 is s and s.observers == [first, second]
            model(ids, attention_mask=mask)
        assert s.observers == [first]
        model(ids, attention_mask=mask)
    assert len(first.calls) == 2 * len(second.calls) and second.calls
    assert first.selections and len(first.selections) == 2 * len(second.selections)
    with pytest.raises(TypeError, match="Observer"):
        with ts.observe(model, object()):
            pass
    with pytest.raises(ValueError, match="already attached"):
        with ts.sparsify(model, method, observers=[first, first]):
            pass


def test_telemetry_as_an_observer_gives_the_same_numbers(model):
    ids, mask = tiny_inputs(2, 30, pad=4)
    method = ts.methods.get("token_select").at_sparse_budget()
    reports = []
    for how in ("flag", "observer", "observe"):
        tel = ts.Telemetry()
        with torch.no_grad():
            if how == "flag":
                with ts.sparsify(model, method, telemetry=tel) as s:
                    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=s.new_cache())
            elif how == "observer":
                with ts.sparsify(model, method, observers=[tel]) as s:
                    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=s.new_cache())
            else:
                with ts.sparsify(model, method) as s, ts.observe(model, tel):
                    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=s.new_cache())
        reports.append(tel.report())
    assert reports[0]["layers_observed"] > 0
    assert reports[0] == reports[1] == reports[2]


def test_sink_detector_inside_and_outside_sparsify(model):
    ids, mask = tiny_inputs(1, 48)
    outside = SinkDetector(min_queries=4)
    with torch.no_grad(), ts.observe(model, outside):
        model(ids, attention_mask=mask)
    inside = SinkDetector(min_queries=4)
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("tova").at_full_budget(), observers=[inside]) as s:
        model(ids, attention_mask=mask, cache=s.new_cache())
    a, b = outside.report(), inside.report()
    assert a["layers_observed"] == model.config.num_hidden_layers
    assert a.keys() == b.keys()
    for layer, v in a["per_layer"].items():
        w = b["per_layer"][layer]
        assert abs(v["first_token"] - w["first_token"]) < 1e-5
    # the prompt's first token: the mean over its T queries of a softmax column, in (0, 1]
    assert all(0 < v["first_token"] <= 1 for v in a["per_layer"].values())


def test_sink_detector_padded_row_equals_the_prompt_alone(model):
    pad = 5
    ids, mask = tiny_inputs(2, 40, pad=pad, seed=2)
    both = SinkDetector(secondary_threshold=0.02, min_queries=2)
    with torch.no_grad(), ts.observe(model, both):
        model(ids, attention_mask=mask)
    alone = SinkDetector(secondary_threshold=0.02, min_queries=2)
    with torch.no_grad(), ts.observe(model, alone):
        model(ids[:1, pad:], attention_mask=mask[:1, pad:])
    got = [r for r in both.records if r["row"] == 0]
    assert len(got) == len(alone.records)
    for r, a in zip(got, alone.records):
        assert r["layer"] == a["layer"]
        assert max(abs(x - y) for x, y in zip(r["first_token"], a["first_token"])) < 1e-5
        assert r["candidates"].keys() == a["candidates"].keys()


def test_secondary_sink_runs():
    det = SinkDetector()
    for layer, cands in enumerate([{}, {7: 0.1}, {7: 0.2, 9: 0.06}, {7: 0.1}, {}, {7: 0.3}]):
        det.records.append({"layer": layer, "row": 0, "first_token": [0.5, 0.1], "candidates": cands})
    runs = det.secondary_sinks()
    assert runs[0] == {"row": 0, "position": 7, "onset": 1, "lifetime": 3, "peak": 0.2}
    assert {"row": 0, "position": 7, "onset": 5, "lifetime": 1, "peak": 0.3} in runs
    assert {"row": 0, "position": 9, "onset": 2, "lifetime": 1, "peak": 0.06} in runs
    rep = det.report()
    assert rep["layers_with_primary_sink"] == []  # head mean 0.3 is not above ε = 0.3
    assert rep["per_layer"]["2"]["heads_with_first_token_sink"] == 0.5
    assert SinkDetector(min_lifetime=2).secondary_sinks() == []


@pytest.mark.parametrize("bad", [{"primary_threshold": 0}, {"secondary_threshold": 1.5}, {"min_queries": 0},
                                 {"min_lifetime": 1.5}])
def test_sink_detector_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        SinkDetector(**bad)


@pytest.mark.parametrize("argv, message", [
    (["sinks", "--tokens", "4"], "--tokens must be >= 16"),
    (["sinks", "--primary", "2"], "primary_threshold must be in"),
    (["sinks", "--min-queries", "0"], "min_queries must be an int >= 1"),
])
def test_sinks_cli_refuses_bad_arguments_before_loading_the_model(argv, message):
    from tokensparse.cli import main

    with pytest.raises(SystemExit, match=message):
        main(argv)
