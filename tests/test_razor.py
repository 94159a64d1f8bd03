"""RazorAttention and the engine's synthetic cache rows (its compensation token)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.cache import SyntheticRows, synthetic_count, synthetic_slot
from tokensparse.engine.calibration import Profile, calibrate
from tokensparse.engine.executors import dense_attention, reference_attention
from tokensparse.engine.selection import KeyBias
from tokensparse.methods.razor_attention import measure_heads, retrieval_set
from tokensparse.testing import tiny_inputs, tiny_model

Razor = ts.methods.get("razor_attention")
pytestmark = pytest.mark.usefixtures("one_thread")
_models: dict = {}


def model_for(layers=3):
    if layers not in _models:
        _models[layers] = tiny_model("llama", num_hidden_layers=layers)
    return _models[layers]


def prefill(model, method, ids, mask):
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model(ids, attention_mask=mask, cache=cache)
    return cache, s


def test_synthetic_slot_codes_roundtrip():
    counts = torch.tensor([0, 1, 5])
    slots = synthetic_slot(counts)
    assert slots.tolist() == [-1, -2, -6]
    assert synthetic_count(torch.tensor([-1, -2, -6, 0, 7])).tolist() == [0, 1, 5, 0, 0]


def test_compensation_row_is_the_mean_of_the_dropped_rows_and_retrieval_heads_keep_all():
    model = model_for()
    ids, mask = tiny_inputs(2, 30, pad=6, seed=5)
    method = Razor(window=4, n_sink=2, retrieval_heads=[1, 2])  # layer 0 KV head 1, layer 1 KV head 0
    cache, s = prefill(model, method, ids, mask)
    dense, _ = prefill(model, Razor(window=1.0, retrieval_heads="none"), ids, mask)
    for layer, head, retrieval in ((0, 0, False), (0, 1, True), (1, 0, True), (2, 1, False)):
        lay, ref = cache.layers[layer], dense.layers[layer]
        slots = lay.slots
        for b, pad in ((0, 6), (1, 0)):
            row = slots[b, head]
            real = row[row >= 0]
            n_real = 30 - pad
            if retrieval:
                assert real.tolist() == list(range(pad, 30)) and not bool((row <= -2).any())
                continue
            want = list(range(pad, pad + 2)) + list(range(30 - 4, 30))
            assert real.tolist() == want
            syn = (row <= -2).nonzero()[:, 0]
            assert syn.numel() == 1 and int(synthetic_count(row[syn])) == n_real - 6
            dropped = [p for p in range(pad, 30) if p not in want]
            col = int(syn)
            assert torch.allclose(lay.keys[b, head, col], ref.keys[b, head, dropped].mean(0), atol=1e-5)
            assert torch.allclose(lay.values[b, head, col], ref.values[b, head, dropped].mean(0), atol=1e-5)
    # ragged: memory follows each head's rows (allocated = held + a room of 16 rows per segment here)
    assert cache.bytes_held() < dense.bytes_held() and cache.bytes_allocated() < dense.bytes_allocated()


def test_log_n_key_bias_weighs_the_compensation_row_as_n_copies():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8)
    n = 5  # the last row of KV head 0 stands for 5 tokens, of KV head 1 for none (value 0)
    bias = KeyBias(torch.tensor([[5, 5]]), torch.tensor([[[math.log(n), 0.0]] * 2 + [[0.0, 0.0]] * 2]))
    got = dense_attention(q, k, v, None, 0.3, bias)
    copies_k = torch.cat([k[:, :1], k[:, :1, 5:6].expand(1, 1, n - 1, 8)], 2)
    copies_v = torch.cat([v[:, :1], v[:, :1, 5:6].expand(1, 1, n - 1, 8)], 2)
    want0 = reference_attention(q[:, :2], copies_k, copies_v, torch.ones(1, 1, 1, 6 + n - 1, dtype=torch.bool), 0.3)
    assert torch.allclose(got[:, :2], want0, atol=1e-5)
    assert torch.allclose(got[:, 2:], dense_attention(q[:, 2:], k[:, 1:], v[:, 1:], None, 0.3), atol=1e-5)


def test_generation_runs_on_the_compressed_cache_greedy_and_beams_and_weighting_matters():
    model = model_for()
    ids, mask = tiny_inputs(2, 30, pad=4, seed=6)
    outs = {}
    for weight in ("log_n", "none"):
        with torch.no_grad(), ts.sparsify(model, Razor(window=4, n_sink=2, retrieval_heads=[1], comp_weight=weight)) as s:
            out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            outs[weight] = torch.stack(out.logits, 1)
            beams = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=3, num_beams=2,
                                   do_sample=False, pad_token_id=0)
            assert beams.shape == (2, 33)
    assert torch.isfinite(outs["log_n"]).all()
    assert (outs["log_n"] - outs["none"]).abs().max() > 1e-3


def test_synthetic_rows_are_checked():
    model = model_for()
    ids, mask = tiny_inputs(1, 12)
    cache, _ = prefill(model, Razor(window=1.0, retrieval_heads="none"), ids, mask)
    layer = cache.layers[0]
    idx = torch.arange(4).expand(1, 2, 4)
    with pytest.raises(ValueError, match="synthetic rows must be"):
        layer.keep(idx, synthetic=SyntheticRows(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), torch.ones(1, 2, 1)))
    with pytest.raises(ValueError, match="'keep' selection only"):
        ts.engine.Selection.keys(idx, synthetic=SyntheticRows(None, None, None))


def test_head_profile_payload_ratios_and_generic_profile(tmp_path):
    model = model_for()
    payload = measure_heads(model, 65)
    assert payload["repeat"] == 16 and payload["tokens"] == 65
    assert len(payload["echo"]) == 3 and all(len(x) == 2 for x in payload["echo"] + payload["induction"])
    assert all(0.0 <= x <= 1.0 for row in payload["echo"] + payload["induction"] for x in row)
    assert len(retrieval_set(payload, 0.0, 0.0)) == 0
    assert len(retrieval_set(payload, 1.0, 0.0)) == 6
    assert 1 <= len(retrieval_set(payload, 0.01, 0.14)) <= 2  # ceil(0.06) + ceil(0.84) over 6 pairs
    ids, _ = tiny_inputs(1, 65)
    prof = calibrate(model, Razor, ids, source="random")
    path = prof.save(tmp_path / "heads.json")
    assert Profile.load(path, "retrieval_heads", 1).payload == prof.payload
    _, s = prefill(model, Razor(profile=str(path), window=4), *tiny_inputs(1, 20))
    assert s.info["razor_profile"] == str(path)
    assert s.info["razor_retrieval_heads"] == [[i // 2, i % 2] for i in sorted(retrieval_set(prof.payload, 0.01, 0.14))]


def test_missing_profile_is_measured_with_a_warning_and_bad_heads_are_refused():
    model = model_for()
    with pytest.warns(UserWarning, match="measuring one now"):
        with ts.sparsify(model, Razor()) as s:
            assert "measured at attach" in s.info["razor_profile"]
    with pytest.raises(ValueError, match="out of range"):
        with ts.sparsify(model, Razor(retrieval_heads=[6])):
            pass
