"""Engine behaviour: restore on exit, errors, cache bookkeeping after eviction, selection invariants,
fast vs reference paths at sparse budgets, calibration profiles."""

import json
from pathlib import Path

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import CacheRequiredError, EvictingLayer, PreallocLayer, Telemetry
from tokensparse.engine.calibration import StaleProfileError
from tokensparse.methods import UnknownMethodError
from tokensparse.methods.drift_profile import DriftProfile, calibrate_drift
from tokensparse.models import UnsupportedModelError, model_fingerprint
from tokensparse.testing import max_diff, tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


# ---- sparsify ------------------------------------------------------------------------------------


def test_exit_restores_previous_attention_even_on_error(model):
    ids, _ = tiny_inputs(1, 30)
    with torch.no_grad():
        ref = model(ids).logits
        method = ts.methods.get("token_sparse")(coverage=0.5, layers="all", min_tokens=2, window=4)
        with pytest.raises(RuntimeError, match="boom"):
            with ts.sparsify(model, method):
                assert model.config._attn_implementation == "tokensparse"
                sparse = model(ids).logits
                raise RuntimeError("boom")
        assert model.config._attn_implementation == "sdpa"
        assert max_diff(sparse, ref) > 1e-3  # the method did change something
        assert torch.equal(model(ids).logits, ref)  # and nothing of it is left


def test_nesting_and_bad_arguments(model):
    method = ts.methods.get("snapkv")()
    with ts.sparsify(model, method):
        with pytest.raises(RuntimeError, match="already inside"):
            with ts.sparsify(model, method):
                pass
    with pytest.raises(TypeError, match="method config"):
        with ts.sparsify(model, "snapkv"):
            pass
    with pytest.raises(UnknownMethodError, match="registered methods"):
        ts.methods.get("no_such_method")


def test_registry_phases_are_exact_and_a_free_text_phase_is_refused(monkeypatch):
    import sys
    import types
    from dataclasses import dataclass

    from tokensparse import methods
    from tokensparse.engine import Method

    from tokensparse.engine import Phase

    for name in methods.names():
        cls = methods.get(name)
        assert isinstance(cls.phase, Phase) and cls.phase in methods.PHASES and cls.schedule, name
    assert {r["phase"] for r in methods.table()} == set(methods.PHASES)  # every phase has a method
    assert Phase.EVICTION == "eviction" and str(Phase.DECODE) == "decode"  # compares and prints as its value

    @dataclass(eq=False)
    class Bad(Method):
        name = "bad_phase"
        phase = "eviction"  # a plain string, even a valid value, is refused: code relies on the enum

    module = types.ModuleType("tokensparse.methods.bad_phase")
    module.Bad = Bad
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(methods, "_MODULES", methods._MODULES + ("bad_phase",))
    monkeypatch.setattr(methods, "_REGISTRY", {})
    with pytest.raises(ValueError, match=r"phase='eviction'; phase must be a tokensparse.engine.Phase, one of "
                                         r"PREFILL, DECODE, EVICTION, REWEIGHT"):
        methods.names()
    assert methods._REGISTRY == {}  # nothing half-registered


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("snapkv", {"budget": -0.5}),
        ("snapkv", {"budget": 1.5}),
        ("snapkv", {"budget": 0}),
        ("snapkv", {"budget": 0.0}),
        ("streaming_llm", {"budget": 2, "n_sink": 4}),
        ("token_select", {"budget": 100, "n_sink": 64, "n_local": 64}),
        ("token_select", {"budget": -1}),
        ("token_select", {"reuse_threshold": 2.0}),
        ("token_sparse", {"coverage": -0.1}),
        ("token_sparse", {"coverage": 1.0}),
        ("token_sparse", {"select_per": "token"}),
        ("token_sparse", {"layers": "odd"}),
    ],
)
def test_bad_configs_raise(name, kwargs):
    with pytest.raises((ValueError, TypeError)):
        ts.methods.get(name)(**kwargs)


def test_unsupported_model_is_rejected():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    gpt2 = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="Supported families"):
        with ts.sparsify(gpt2, ts.methods.get("snapkv")()):
            pass


def test_eviction_without_engine_cache_names_the_fix(model):
    ids, _ = tiny_inputs(1, 30)
    with ts.sparsify(model, ts.methods.get("snapkv")(budget=10, window=4)):
        with pytest.raises(CacheRequiredError, match="new_cache"):
            model(ids)
        model(ids, use_cache=False)  # nothing cached: nothing to evict, runs dense


def test_out_of_range_layers(model):
    with pytest.raises(ValueError, match="out of range"):
        with ts.sparsify(model, ts.methods.get("token_sparse")(layers=[0, 7])):
            pass


# ---- caches --------------------------------------------------------------------------------------


def test_prealloc_layer_grows_in_place_and_matches_dynamic(model):
    ids, _ = tiny_inputs(1, 20)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = ts.KVCache(model, capacity=8)
        layer = cache.layers[0]
        out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    assert isinstance(layer, PreallocLayer) and layer.get_seq_length() == 31
    assert layer.capacity >= 31 and layer.keys.shape[2] == 31
    assert cache.bytes_held() == 3 * 31 * 2 * (2 * 16 * 4)  # layers × rows × (K,V) × heads·D·fp32


def reference_logits_with_kept(model, ids, prefill_len, kept_slots):
    """Dense forward over the whole sequence where queries after ``prefill_len`` see only the kept
    prefill tokens (per KV head) and the later tokens: what an evicting cache must reproduce."""
    b, length = ids.shape
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)).expand(b, hq, length, length).clone()
    for bi in range(b):
        for h in range(hq):
            keep = torch.zeros(length, dtype=torch.bool)
            s = kept_slots[bi, h // (hq // hkv)]
            keep[s[s >= 0]] = True
            keep[prefill_len:] = True
            allowed[bi, h, prefill_len:] &= keep
    with torch.no_grad():
        return model(ids, attention_mask=allowed).logits


@pytest.mark.parametrize(
    "method",
    [
        ts.methods.get("streaming_llm")(budget=9, n_sink=2),
        ts.methods.get("snapkv")(budget=10, window=4, pool_kernel=3),
    ],
    ids=["streaming_llm", "snapkv"],
)
def test_chunked_prefill_after_eviction_matches_masked_dense(model, method):
    ids, _ = tiny_inputs(1, 36)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model(ids[:, :24], cache=cache)
        layer = cache.layers[0]
        assert isinstance(layer, EvictingLayer)
        assert layer.get_seq_length() == 24  # absolute, not physical
        assert layer.n < 24
        assert layer.get_mask_sizes(5) == (layer.n + 5, 24 - layer.n)
        slots = [lyr.slots.clone() for lyr in cache.layers]
        # chunked prefill on the evicted cache, without position_ids (inferred from get_seq_length)
        got = model(ids[:, 24:31], cache=cache).logits
    assert cache.layers[0].get_seq_length() == 31
    per_layer = {tuple(sl.flatten().tolist()) for sl in slots}
    if len(per_layer) == 1:  # StreamingLLM keeps the same rows in every layer
        ref = reference_logits_with_kept(model, ids[:, :31], 24, slots[0])
        assert max_diff(got, ref[:, 24:31]) < 1e-4
    # evicted rows are really gone from memory
    assert cache.layers[0]._kbuf.shape[2] <= layer.n + cache.layers[0].headroom + 7


def test_snapkv_per_layer_eviction_matches_masked_dense_one_layer():
    model = tiny_model("qwen3", num_hidden_layers=1)
    ids, _ = tiny_inputs(1, 30)
    method = ts.methods.get("snapkv")(budget=12, window=4, pool_kernel=3)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model(ids[:, :22], cache=cache)
        slots = cache.layers[0].slots.clone()
        assert (slots.sort(-1).values == slots).all()  # kept rows stay in arrival order
        assert slots.shape[-1] == 12 and (slots[..., -4:] == torch.arange(18, 22)).all()  # window kept
        got = model(ids[:, 22:], cache=cache).logits
    ref = reference_logits_with_kept(model, ids, 22, slots)
    assert max_diff(got, ref[:, 22:]) < 1e-4


def test_left_padded_batch_eviction_never_keeps_padding():
    model = tiny_model("mistral")
    ids, mask = tiny_inputs(2, 30, pad=6)
    method = ts.methods.get("snapkv")(budget=12, window=4)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    slots = cache.layers[0].slots
    kept = slots[0][slots[0] >= 0]
    assert (kept >= 6).all()  # padding positions 0..5 of row 0 are never kept


# ---- selection invariants ------------------------------------------------------------------------


def test_token_sparse_selection_invariants(model):
    ids, _ = tiny_inputs(1, 64)
    tel = Telemetry(keep_indices=True)
    method = ts.methods.get("token_sparse")(coverage=0.3, layers="all", min_tokens=8, window=6, sink_tokens=2)
    with torch.no_grad(), ts.sparsify(model, method, telemetry=tel):
        model(ids)
    assert set(tel.last_selection) == {0, 1, 2}
    for idx in tel.last_selection.values():
        assert idx.shape[1] == model.config.num_attention_heads
        assert (idx.sort(-1).values == idx).all() and (idx.diff(dim=-1) > 0).all()  # sorted, unique
        assert (idx[..., -6:] == torch.arange(58, 64)).all()  # window kept
        assert (idx[..., :2] == torch.arange(2)).all()  # sinks kept
        assert 8 + 6 <= idx.shape[-1] < 64  # at least min_tokens + window, and sparse
        assert int(idx.max()) < 64


def test_token_select_selection_invariants_and_reuse(model):
    ids, _ = tiny_inputs(1, 60)
    tel = Telemetry(keep_indices=True)
    method = ts.methods.get("token_select")(budget=20, n_sink=3, n_local=5, pool_kernel=3, reuse_threshold=-1.0)
    with torch.no_grad(), ts.sparsify(model, method, telemetry=tel) as s:
        model.generate(ids, cache=s.new_cache(), max_new_tokens=4, do_sample=False)
    for idx in tel.last_selection.values():
        assert idx.shape == (1, 1, 20)  # one set per layer, budget respected
        assert (idx.diff(dim=-1) > 0).all()
        assert (idx[..., :3] == torch.arange(3)).all()
        assert (idx[..., -5:] == torch.arange(58, 63)).all()  # local window includes the current token
    # 4 new tokens = 3 decode steps; threshold -1: every step after the first reuses the selection
    assert s.stats["select"] == 3 and s.stats["reuse"] == 3 * 2


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("token_select", {"budget": 20, "n_sink": 2, "n_local": 6, "select_per": "kv_head"}),
        ("token_select", {"budget": 0.4, "n_sink": 2, "n_local": 6, "pool_kernel": 3}),
        ("snapkv", {"budget": 14, "window": 4}),
    ],
)
def test_fast_and_reference_paths_agree_at_sparse_budget(model, name, kwargs):
    ids, mask = tiny_inputs(2, 48, pad=4)
    outs = []
    for impl in ("fast", "reference"):
        method = ts.methods.get(name)(impl=impl, **kwargs)
        with torch.no_grad(), ts.sparsify(model, method) as s:
            out = model.generate(
                ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=5, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
        outs.append(out)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert max_diff(torch.stack(outs[0].logits), torch.stack(outs[1].logits)) < 1e-4


@pytest.mark.parametrize("select_per", ["layer", "kv_head"])
@pytest.mark.parametrize("reuse", [None, 0.3])
def test_token_select_segmented_decode_matches_reference(model, select_per, reuse):
    """Unpadded fp32 decode takes the segments path (cache views + gathered top-k, reused rows on a
    selection-cache hit); the reference attends under a full-length key mask."""
    ids, _ = tiny_inputs(1, 48)
    outs, stats = [], []
    for impl in ("fast", "reference"):
        method = ts.methods.get("token_select")(
            budget=16, n_sink=2, n_local=5, select_per=select_per, reuse_threshold=reuse, impl=impl
        )
        with torch.no_grad(), ts.sparsify(model, method) as s:
            out = model.generate(
                ids, cache=s.new_cache(), max_new_tokens=8, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        outs.append(out)
        stats.append(dict(s.stats))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert max_diff(torch.stack(outs[0].logits), torch.stack(outs[1].logits)) < 1e-4
    assert stats[0] == stats[1]
    if reuse is not None:
        assert stats[0].get("reuse", 0) > 0  # the reuse branch was exercised


def test_telemetry_reports_density_and_mass(model):
    ids, _ = tiny_inputs(1, 64)
    method = ts.methods.get("token_sparse")(coverage=0.3, layers=[1], min_tokens=8, window=6)
    with torch.no_grad(), ts.sparsify(model, method, telemetry=True) as s:
        model(ids)
    summ = s.telemetry.summary()
    assert list(summ) == [1]
    assert 0 < summ[1]["density"] < 1 and 0 < summ[1]["mass"] < 1


# ---- calibration ---------------------------------------------------------------------------------


def test_drift_profile_roundtrip_and_staleness(model, tmp_path):
    ids, _ = tiny_inputs(1, 40)
    prof = calibrate_drift(model, ids, source="random ids")
    assert len(prof.drift) == 3 and abs(sum(prof.drift) - 1) < 1e-6
    path = prof.save(tmp_path / "p.json")
    loaded = DriftProfile.load(path)
    loaded.check(model)
    assert loaded.sparse_layers(1.0) == [0, 1, 2]
    assert len(loaded.sparse_layers(0.5)) in (1, 2)
    method = ts.methods.get("token_sparse")(profile=str(path), drift_quantile=0.0)
    with ts.sparsify(model, method) as s:
        assert s.info["token_sparse_layers"] == [min(range(3), key=lambda i: prof.drift[i])]
    # a profile made for another model is refused
    other = tiny_model("llama", num_hidden_layers=3, seed=1)
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(StaleProfileError, match="calibrate"):
        with ts.sparsify(other, method):
            pass
    # a profile from another format version is refused
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(StaleProfileError, match="version"):
        DriftProfile.load(path)


@pytest.mark.parametrize("text, match", [
    ("{\"model_fingerprint\": \"abc\", ", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"format\": \"something.else\", \"version\": 1}", "format='something.else'"),
    ("{\"format\": \"tokensparse.drift-profile\", \"version\": 1, \"drift\": []}", "missing fields"),
])
def test_broken_profile_files_are_named_not_raw_json_errors(model, tmp_path, text, match):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(StaleProfileError, match=match) as e:
        DriftProfile.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(StaleProfileError, match=match):  # also through the method that uses it
        with ts.sparsify(model, ts.methods.get("token_sparse")(profile=str(path))):
            pass


def test_shipped_profile_still_loads():
    from importlib import resources

    from tokensparse.engine.calibration import Profile

    shipped = sorted(Path(str(resources.files("tokensparse") / "profiles")).glob("*/*.json"))
    assert shipped
    for path in shipped:
        generic = Profile.load(path)
        assert (generic.format, generic.version, generic.kind) == ("tokensparse.profile", 1, path.parent.name)
        if generic.kind == "drift":
            prof = DriftProfile.load(path)
            assert prof.model_fingerprint == path.stem and len(prof.drift) == prof.num_layers


def test_drift_profile_of_the_earlier_format_still_loads(model, tmp_path):
    ids, _ = tiny_inputs(1, 40)
    prof = calibrate_drift(model, ids, source="random ids")
    legacy = {"model_fingerprint": prof.model_fingerprint, "model_type": prof.model_type,
              "num_layers": prof.num_layers, "tokens": prof.tokens, "source": prof.source, "drift": prof.drift,
              "format": "tokensparse.drift-profile", "version": 1, "created": prof.created}
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(legacy))
    assert DriftProfile.load(path) == prof


def test_generic_profiles_roundtrip_refuse_other_kinds_and_run_from_the_cli_api(model, tmp_path, monkeypatch):
    from dataclasses import dataclass

    from tokensparse.engine import Method, Phase
    from tokensparse.engine.calibration import Profile, calibrate, find_kind_profile, kind_profile_path

    @dataclass(eq=False)
    class Norms(Method):  # a test method calibrated offline: mean key norm per layer
        name = ""
        phase = Phase.PREFILL
        profile_kind = "test.norms"
        profile_version = 3

        @classmethod
        def calibrate(cls, model, input_ids):
            return {"layers": model.config.num_hidden_layers, "tokens": int(input_ids.shape[1])}

    ids, _ = tiny_inputs(1, 20)
    prof = calibrate(model, Norms, ids, source="random ids")
    assert (prof.kind, prof.kind_version, prof.payload) == ("test.norms", 3, {"layers": 3, "tokens": 20})
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path))
    assert find_kind_profile(model, "test.norms") is None
    path = prof.save(kind_profile_path(prof.model_fingerprint, prof.kind))
    assert find_kind_profile(model, "test.norms") == path
    loaded = Profile.load(path, "test.norms", 3)
    loaded.check(model)
    assert loaded == prof
    with pytest.raises(StaleProfileError, match="is a 'test.norms' profile, expected 'drift'"):
        DriftProfile.load(path)
    with pytest.raises(StaleProfileError, match="version 3, this tokensparse reads version 4"):
        Profile.load(path, "test.norms", 4)
    with pytest.raises(StaleProfileError, match="calibrate"):
        loaded.check(tiny_model("llama", num_hidden_layers=3, seed=1))
    with pytest.raises(ValueError, match="needs no calibration"):
        calibrate(model, ts.methods.get("snapkv"), ids, source="x")


def test_missing_profile_warns_and_uses_second_half(model):
    with pytest.warns(UserWarning, match="fallback"):
        with ts.sparsify(model, ts.methods.get("token_sparse")()) as s:
            assert s.info["token_sparse_layers"] == [1, 2]


@pytest.mark.parametrize("evicting", [False, True])
def test_cache_clone_is_independent_and_keeps_capacity(model, evicting):
    ids, _ = tiny_inputs(1, 30)
    with torch.no_grad():
        cache = ts.KVCache(model, evicting=evicting)
        model(ids[:, :20], cache=cache)
        copy = cache.clone()
        assert [lyr.capacity for lyr in copy.layers] == [lyr.capacity for lyr in cache.layers]
        a = model(ids[:, 20:25], cache=copy).logits
        assert cache.get_seq_length() == 20 and copy.get_seq_length() == 25  # the original is untouched
        b = model(ids[:, 20:25], cache=cache).logits
        ref = model(ids[:, :25], cache=ts.KVCache(model)).logits[:, 20:]
    assert torch.equal(a, b)
    assert max_diff(a, ref) < 1e-4
