"""Real-model checks on the bundled SmolLM2-135M-Instruct (opt in: ``make test-slow`` / ``-m slow``).

Each method at a moderate budget must still retrieve a pass key at ~2K tokens that dense attention
retrieves, with a plain completion prompt.
"""

import pytest
import torch

import tokensparse as ts
from tokensparse.eval import tasks
from tokensparse.eval.harness import run_sample

pytestmark = pytest.mark.slow

CONFIGS = {
    # late layers: on SmolLM2 dropping tokens in the early layers the drift profile picks loses
    # needles placed early in the context (docs/results/README.md)
    "token_sparse": {"layers": list(range(20, 30)), "coverage": 0.05, "window": 16, "min_tokens": 256},
    "token_select": {"budget": 0.25, "n_sink": 64, "n_local": 128, "reuse_threshold": 0.8},
    "snapkv": {"budget": 0.5},
    # a share is fixed at the prompt's length (the cache stays bounded): at 0.5 the needle at depth
    # 0.5 sits on the window's oldest edge and is evicted while the answer is generated (' 2515.'
    # for '25150'; it passed before only because the share used to grow with every new token)
    "streaming_llm": {"budget": 0.6},
    "tidal_decode": {"budget": 0.25},
    "tova": {"budget": 0.5},
    "zero_tuning": {"gamma": 1.5},
    "hip": {},
    "biformer": {},
    "xattention": {},
    "rectified": {},  # over XAttention at its defaults
    "dhsa": {},
    "sparsifiner": {},
    "superlinear": {},
    "minference": {},
    "hisa": {},
    "cca": {},  # passes at 2K (half the prompt in its 1024-token window); 1/6 at 4K (prefill_family/cca.md)
    "quest": {"budget": 0.25},
    "h2o": {"budget": 0.5},
    "pyramid_kv": {"budget": 0.5},
    "ada_kv": {"budget": 0.5},
    "tca": {},  # the shipped tca_budgets profile of SmolLM2
    "frugal_prompt": {"keep": 0.8},
    # the paper's K=2 ranks the context with layer 1's attention and loses the pass key on text
    # (docs/results/fast_v: 0/9 at 4K); layer 7's attention finds it (7/9)
    "fast_v": {"layer": 8},
    "razor_attention": {},
    "recycled_attention": {"budget": 0.25, "stride": 16},
    "landmark": {"budget": 0.25},
    "spatten": {},
    "fasa": {"budget": 0.25},
}

#: configurations measured to lose this pass key (kept in the table so that a fix shows up as XPASS)
KNOWN_MISSES = {
    "quest": "Quest's min/max page bound is loose on SmolLM2 (docs/results/quest: 5/9 at 4K; an exact-page oracle 9/9)",
    "h2o": "accumulated attention drops a mid-context needle after the prefill (docs/results/quest: 2/9 at 4K, 50%)",
}


@pytest.fixture(scope="module")
def bundled():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return ts.load_model()


@pytest.fixture(scope="module")
def sample(bundled):
    return tasks.passkey(bundled[1], 2048, depth=0.5)


def test_dense_retrieves(bundled, sample):
    r = run_sample(*bundled, sample)
    assert r.correct, r.prediction


def test_every_method_has_a_real_model_config():
    assert set(CONFIGS) == set(ts.methods.names())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_retrieves_at_moderate_budget(bundled, sample, name, request):
    if name in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_MISSES[name], strict=False))
    method = ts.methods.get(name)(**CONFIGS[name])
    r = run_sample(*bundled, sample, method, telemetry=True)
    assert r.correct, f"{name}: {r.prediction!r}"
    # the method did skip tokens (a re-weighting method skips none)
    if method.phase == "prompt":
        assert r.stats["prompt_kept_tokens"] < r.stats["prompt_context_tokens"]
    elif method.phase == "prune":
        assert r.stats["rows_kept"] < r.stats["rows_total"]
    elif method.phase == "reweight":  # ZeroTuning re-weights attention and skips nothing (density 1)
        assert r.telemetry is not None
    else:
        assert r.telemetry["density"] < 0.95


def test_eviction_reduces_kv_bytes(bundled, sample):
    dense = run_sample(*bundled, sample)
    snap = run_sample(*bundled, sample, ts.methods.get("snapkv")(budget=0.5))
    assert snap.kv_bytes < 0.6 * dense.kv_bytes


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if ts.methods.get(n).dense_prefill is True) + ["tidal_decode"])
def test_shared_prefill_equals_own_prefill_on_the_bundled_model(bundled, sample, name):
    """A decode method started from a copy of dense's prefill (the runner's ``share_prefill``) gives
    the tokens and answer scores of its own prefill (measured bit for bit at 2K)."""
    model, tok = bundled
    method = ts.methods.get(name)(**CONFIGS[name])
    answer = torch.tensor([tok(" " + sample.answers[0], add_special_tokens=False).input_ids])
    dense = run_sample(model, tok, sample, None, keep_prefill=True)
    own = run_sample(model, tok, sample, method, teacher_ids=answer)
    shared = run_sample(model, tok, sample, method, teacher_ids=answer, start=dense.prefilled)
    assert shared.prediction == own.prediction
    torch.testing.assert_close(shared.teacher.logits, own.teacher.logits, atol=1e-4, rtol=1e-4)


# ---- correctness on the real model (issue: padded batches, short prompts, static caches) ------

SPARSE_REAL = {
    "streaming_llm": {"budget": 64},
    "snapkv": {"budget": 48, "window": 16},
    "token_select": {"budget": 96, "n_sink": 16, "n_local": 32, "pool_kernel": 3},
    "token_sparse": {"layers": list(range(20, 30)), "coverage": 0.05, "window": 16, "min_tokens": 32},
    "fast_v": {"layer": 8, "keep": 0.5, "tail": 16, "pool_kernel": 7},
    "razor_attention": {"window": 32},
    # decode-time selection and eviction (their decode steps size themselves on the host)
    "fasa": {"budget": 96},
    "fasa:head_top": {"budget": 96, "head_top": 0.34},  # "name:variant": a second configuration
    "recycled_attention": {"budget": 96, "stride": 3},
    "h2o": {"budget": 96},
    "tova": {"budget": 96},
    # the re-fetch threshold is a hard decision on a float: with the pooled default on this prompt one
    # query-head row's top int8 probability is within float noise of 0.1, so the padded row re-fetches
    # where the lone row does not (1.4e-3 in the logits, same tokens); threshold 0 keeps every row on
    # the int8 path (the same codes in both runs), "spatten:exact" checks the exact path
    "spatten": {"budget": 48, "budget_first": 160, "threshold": 0.0},
    "spatten:exact": {"budget": 48, "budget_first": 160, "quant": None},
}


@pytest.mark.parametrize("name", sorted(SPARSE_REAL))
def test_padded_row_equals_alone_on_the_bundled_model(bundled, name):
    model, tok = bundled
    method = ts.methods.get(name.split(":")[0])(**SPARSE_REAL[name])
    text = tasks.passkey(tok, 320, depth=0.3).prompt()
    short = tok(text, return_tensors="pt").input_ids[:, 40:]  # a shorter prompt, padded on the left
    long = tok(text, return_tensors="pt").input_ids
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.full((1, pad), tok.pad_token_id or 0), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        both = model.generate(ids, attention_mask=mask, cache=s.new_cache(), **kw)
        alone = model.generate(short, attention_mask=torch.ones_like(short), cache=s.new_cache(), **kw)
    assert torch.equal(both.sequences[0, ids.shape[1]:], alone.sequences[0, short.shape[1]:])
    diff = (torch.stack(both.logits)[:, 0] - torch.stack(alone.logits)[:, 0]).abs().max().item()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "token_select", "token_sparse"])
def test_default_configs_run_a_short_chat_prompt(bundled, name):
    model, tok = bundled
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    assert ids.input_ids.shape[1] < 40
    with torch.no_grad(), ts.sparsify(model, ts.methods.get(name)()) as s:
        out = model.generate(**ids, cache=s.new_cache(), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.input_ids.shape[1]


def test_static_cache_is_refused_on_the_bundled_model(bundled):
    from tokensparse.engine import UnsupportedCacheError

    model, tok = bundled
    ids = tok("The quick brown fox", return_tensors="pt")
    with torch.no_grad(), ts.sparsify(model, ts.methods.get("snapkv")()):
        with pytest.raises(UnsupportedCacheError, match="session.new_cache"):
            model.generate(**ids, max_new_tokens=4, cache_implementation="static")


def test_fast_v_generation_equals_the_masked_reference_on_the_bundled_model(bundled):
    """Rows dropped after layer 7 on SmolLM2: greedy generation from the pruned cache equals a dense
    run in which layers >= 8 do not see the dropped tokens (positions preserved)."""
    from test_rows import MaskedReference, generate, kept_tokens

    model, tok = bundled
    ids = tok(tasks.passkey(tok, 600, depth=0.4).prompt(), return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    logits, seq, cache, stats = generate(model, ts.methods.get("fast_v")(layer=8, keep=0.5, tail=16), ids, mask, new=8)
    assert stats["rows_kept"] < stats["rows_total"]
    ref = MaskedReference()
    ref.first, ref.allowed = 8, kept_tokens(cache, 8, seq.shape[1] - 1)
    ref_logits, ref_seq, _, _ = generate(model, ref, ids, mask, new=8)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() < 1e-3
