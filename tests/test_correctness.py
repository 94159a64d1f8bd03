"""Correctness beyond the full-budget matrix: a padded row equals the prompt alone at a *sparse*
budget, static caches are refused, short prompts run, shares of the context behave as documented,
sliding-window layers keep their padding bookkeeping exact.
"""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import exercise_sparse_paths
from tokensparse.engine import UnsupportedCacheError
from tokensparse.testing import MODEL_VARIANTS, TOLERANCE, max_diff, tiny_inputs, tiny_model

_models: dict = {}


def model_for(variant):
    if variant not in _models:
        family, overrides = MODEL_VARIANTS[variant]
        _models[variant] = tiny_model(family, **overrides)
    return _models[variant]


def generate(model, method, ids, mask, new=6, **kw):
    """Greedy generation under ``method`` (``None`` = dense): (logits per step, sequences, cache).
    EOS is suppressed (``min_new_tokens``) so that a row alone and in a batch run the same steps."""
    kw.setdefault("min_new_tokens", new)
    with torch.no_grad():
        if method is None:
            cache = ts.KVCache(model)
            out = model.generate(
                ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw,
            )
        else:
            with ts.sparsify(model, method) as s:
                cache = s.new_cache()
                out = model.generate(
                    ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw,
                )
    return torch.stack(out.logits, 1), out.sequences, cache


def prefill_logits(model, method, ids, mask):
    with torch.no_grad(), ts.sparsify(model, method) as s:
        return model(ids, attention_mask=mask, cache=s.new_cache()).logits


# a sparse config per method from the method itself, plus share-of-context budgets, which resolve
# against each row's real tokens
# (prompt-step methods act before the model, not inside attention: tests/test_prompt_step.py)
SPARSE = {name: ts.methods.get(name).at_sparse_budget() for name in ts.methods.names()
          if ts.methods.get(name).phase != "prompt"}
SPARSE.update(
    {
        "token_select-share": ts.methods.get("token_select")(budget=0.4, n_sink=2, n_local=4, pool_kernel=3),
        "token_select-per-kv-head": ts.methods.get("token_select")(budget=12, n_sink=2, n_local=4, select_per="kv_head"),
        "snapkv-share": ts.methods.get("snapkv")(budget=0.4, window=4, pool="avg"),
        "quest-int8": ts.methods.get("quest")(budget=8, page=2, dense_layers=0, bound="int8"),
        "quest-bf16": ts.methods.get("quest")(budget=8, page=2, dense_layers=0, bound="bf16"),
        "token_select-int8": ts.methods.get("token_select")(budget=12, n_sink=2, n_local=4, shadow="int8"),
        "tidal_decode-quest": ts.methods.get("tidal_decode")(budget=6, selection_layers=[0], scorer="quest"),
        "tidal_decode-token_select": ts.methods.get("tidal_decode")(budget=0.3, selection_layers=[0],
                                                                    scorer="token_select"),
        "tidal_decode-pool": ts.methods.get("tidal_decode")(budget=8, selection_layers=[0], pool_kernel=5),
        "tidal_decode-quest-pool": ts.methods.get("tidal_decode")(budget=0.3, selection_layers=[0], scorer="quest",
                                                                  pool_kernel=3),
        "streaming_llm-share": ts.methods.get("streaming_llm")(budget=0.5, n_sink=2),
        "spatten-share-int4-heads": ts.methods.get("spatten")(budget=0.2, budget_first=0.5, dense_layers=0, n_local=2,
                                                              quant="int4", threshold=0.3, head_prune=0.5),
        "spatten-zero-heads": ts.methods.get("spatten")(budget=6, budget_first=12, dense_layers=0, n_local=2,
                                                        head_prune=0.25, head_output="zero", prompt_window=None),
        "token_sparse-sinks-kv-head": ts.methods.get("token_sparse")(
            coverage=0.3, window=4, min_tokens=2, layers="all", sink_tokens=2, select_per="kv_head"
        ),
    }
)


def test_every_method_has_a_sparse_config():
    for name in ts.methods.names():
        assert isinstance(ts.methods.get(name).at_sparse_budget(), ts.methods.get(name))


@pytest.mark.parametrize("variant", ["llama", "qwen3-mixed-sw8", "mistral-sw8"])
@pytest.mark.parametrize("config", list(SPARSE))
def test_padded_row_equals_the_prompt_alone_at_a_sparse_budget(config, variant):
    model = model_for(variant)
    method = SPARSE[config]
    pad = 6
    ids, mask = tiny_inputs(2, 30, pad=pad, seed=3)
    logits, seq, _ = generate(model, method, ids, mask)
    for row, start in ((0, pad), (1, 0)):
        alone_ids = ids[row : row + 1, start:]
        alone_logits, alone_seq, _ = generate(model, method, alone_ids, torch.ones_like(alone_ids))
        assert torch.equal(seq[row, ids.shape[1] :], alone_seq[0, alone_ids.shape[1] :]), f"row {row}"
        assert max_diff(logits[row], alone_logits[0]) <= TOLERANCE[torch.float32], f"row {row}"
    # every layer of mistral-sw8 is sliding, so it stays dense; qwen3-mixed-sw8 has one global layer,
    # and TidalDecode needs a global selection layer before the global layers that reuse its choice
    # (FastV likewise a global layer before the layer that prunes)
    if variant != "mistral-sw8" and not (variant == "qwen3-mixed-sw8"
                                         and (config.startswith("tidal_decode") or config == "fast_v")):
        dense_logits, _, _ = generate(model, None, ids, mask)
        assert max_diff(logits, dense_logits) > 1e-3, "the method did not act"


@pytest.mark.parametrize("config", ["token_sparse", "token_sparse-sinks-kv-head"])
def test_padded_row_prefill_logits_equal_the_prompt_alone(config):
    model = model_for("llama")
    method = SPARSE[config]
    pad = 6
    ids, mask = tiny_inputs(2, 30, pad=pad, seed=4)
    batched = prefill_logits(model, method, ids, mask)
    alone = prefill_logits(model, method, ids[:1, pad:], mask[:1, pad:])
    assert max_diff(batched[0, pad:], alone[0]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ts.methods.names())
def test_static_cache_is_refused_with_an_error_that_names_the_fix(name):
    model = model_for("llama")
    ids, mask = tiny_inputs(1, 20)
    with torch.no_grad(), ts.sparsify(model, ts.methods.get(name).at_full_budget()):
        with pytest.raises(UnsupportedCacheError, match="session.new_cache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           cache_implementation="static", pad_token_id=0)


def test_right_padding_is_refused():
    model = model_for("llama")
    ids, mask = tiny_inputs(2, 20)
    mask[0, -3:] = 0
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("snapkv").at_full_budget()) as s:
        with pytest.raises(ValueError, match="left padding"):
            model(ids, attention_mask=mask, cache=s.new_cache())


@pytest.mark.parametrize("length", [1, 2, 20, 33, 64])
@pytest.mark.parametrize("name", ts.methods.names())
def test_short_prompts_run_at_the_default_config_and_equal_dense_at_full_budget(name, length):
    model = model_for("llama")
    ids, mask = tiny_inputs(1, length, seed=length)
    logits, _, _ = generate(model, ts.methods.get(name)(), ids, mask, new=3)
    assert torch.isfinite(logits).all()
    ref_logits, ref_seq, _ = generate(model, None, ids, mask, new=3)
    for forced in (False, True):
        with exercise_sparse_paths() if forced else torch.no_grad():
            full_logits, full_seq, _ = generate(model, ts.methods.get(name).at_full_budget(), ids, mask, new=3)
        assert torch.equal(full_seq, ref_seq)
        assert max_diff(full_logits, ref_logits) <= TOLERANCE[torch.float32]


def test_streaming_llm_share_is_fixed_at_the_first_prefill():
    model = model_for("llama")
    ids, mask = tiny_inputs(1, 40)
    _, seq, cache = generate(model, ts.methods.get("streaming_llm")(budget=0.5), ids, mask, new=60, min_new_tokens=60)
    assert seq.shape[1] == 100
    assert cache.physical_lengths() == [20] * len(cache.layers)
    assert all(layer.get_seq_length() == 99 for layer in cache.layers)  # the last token is never fed back


def test_streaming_llm_share_per_row_of_a_padded_batch():
    model = model_for("llama")
    ids, mask = tiny_inputs(2, 40, pad=10)
    _, _, cache = generate(model, ts.methods.get("streaming_llm")(budget=0.5), ids, mask, new=5)
    held = cache.layers[0].valid_rows().sum(-1)  # (B, Hkv)
    assert held[0].tolist() == [15] * held.shape[1]  # round(0.5 × 30 real tokens)
    assert held[1].tolist() == [20] * held.shape[1]


def test_readme_token_select_share_runs_dense_on_short_prompts_and_says_so():
    model = model_for("llama")
    ids, mask = tiny_inputs(1, 50)
    method = ts.methods.get("token_select")(budget=0.25)
    ref_logits, ref_seq, _ = generate(model, None, ids, mask, new=4)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref_seq)
    assert s.stats["dense_short"] == 3 * model.config.num_hidden_layers  # every decode step, every layer
    assert s.stats["select"] == 0


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_evicting_cache_marks_only_padding_as_empty(variant):
    model = model_for(variant)
    ids, mask = tiny_inputs(2, 40, pad=5)
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("snapkv").at_full_budget()) as s:
        cache = s.new_cache()
        model(ids, attention_mask=mask, cache=cache)
    for layer in cache.layers:
        empty = ~layer.valid_rows()  # (B, Hkv, 40)
        assert empty[0, :, :5].all() and not empty[0, :, 5:].any()
        assert not empty[1].any()


def test_sliding_window_is_kept_after_an_eviction():
    """A global layer evicts; the sliding layer of the same model keeps its window over the cache."""
    model = model_for("qwen3-mixed-sw8")
    ids, mask = tiny_inputs(1, 30)
    method = ts.methods.get("snapkv")(budget=12, window=4)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model(ids[:, :20], attention_mask=mask[:, :20], cache=cache)
        assert cache.physical_lengths() == [20, 12]  # sliding layer 0 untouched, global layer 1 evicted
        assert s.stats["sliding_dense_calls"] == 1
        chunk = model(ids[:, 20:], attention_mask=mask, cache=cache).logits
    # reference: the same evicted cache contents, computed densely with explicit masks
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache2 = s.new_cache()
        model(ids[:, :20], attention_mask=mask[:, :20], cache=cache2)
        with exercise_sparse_paths():
            step = [model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache2).logits for i in range(20, 30)]
    assert max_diff(chunk, torch.cat(step, 1)) <= TOLERANCE[torch.float32]


def test_no_method_calls_topk_directly():
    """Selections go through the engine's deterministic top-k (ties: the earlier position wins)."""
    import pathlib

    root = pathlib.Path(ts.__file__).parent
    for path in (root / "methods").glob("*.py"):
        assert ".topk(" not in path.read_text(), path.name
