"""Static-shape decode (:mod:`tokensparse.engine.static`): every step equals the engine's own path
for the same method config (dense = transformers' SDPA, TokenSelect per layer and per KV head,
StreamingLLM's evicting cache), a padded row equals the same prompt alone, unsupported configs are
refused, and ``torch.compile(fullgraph=True)`` captures a whole model step that equals the eager one
and is not recompiled for a prompt of another length."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.static import StaticDecoder, plan_for
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TokenSelect = ts.methods.get("token_select")
StreamingLLM = ts.methods.get("streaming_llm")
STEPS = 6
SEED = 8


@torch.no_grad()
def _engine_steps(model, method, ids, mask, steps=STEPS):
    """Greedy logits of each step on the engine's path (no EOS stop: the static decoder has none)."""
    import contextlib

    ctx = ts.sparsify(model, method) if method is not None else contextlib.nullcontext()
    with ctx as s:
        cache = s.new_cache() if method is not None else None
        kw = {"cache": cache} if cache is not None else {}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() builds them for left padding
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw)
        cache = out.past_key_values
        logits = [out.logits[:, -1].float()]
        am = mask.clone()
        for _ in range(steps - 1):
            nxt = logits[-1].argmax(-1, keepdim=True)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            pos = am.sum(-1, keepdim=True) - 1
            out = model(input_ids=nxt, attention_mask=am, position_ids=pos, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return logits


def _model(family):
    """A tiny model whose pad token has a non-zero embedding: greedy decoding of a random model
    emits it, and a zero embedding gives a zero query, i.e. a uniform vote whose top-k is a tie that
    two correct implementations may break differently."""
    model = tiny_model(family)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[model.config.pad_token_id] = emb[3]
    return model


def _static(model, method, ids, mask, **kw):
    return StaticDecoder(model, method, max_cache_len=ids.shape[1] + STEPS + 3, **kw).generate(
        ids, mask, max_new_tokens=STEPS)


CASES = [
    None,
    TokenSelect(budget=14, n_sink=2, n_local=4),
    TokenSelect(budget=14, n_sink=2, n_local=4, select_per="kv_head", logit_scale=None),
    TokenSelect(budget=14, n_sink=2, n_local=4, shadow="int8"),
    TokenSelect(budget=14, n_sink=2, n_local=4, select_per="kv_head", shadow="int8"),
    StreamingLLM(budget=12, n_sink=2),
    ts.methods.get("quest")(budget=12, page=4, dense_layers=1),
    ts.methods.get("quest")(budget=8, page=3, dense_layers=0),
    ts.methods.get("quest")(budget=12, page=4, dense_layers=1, bound="int8"),
    ts.methods.get("quest")(budget=8, page=3, dense_layers=0, bound="int8"),
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("method", CASES, ids=lambda m: "dense" if m is None else repr(m))
def test_static_steps_equal_the_engine(family, method):
    model = _model(family)
    ids, mask = tiny_inputs(2, 37, pad=5, seed=SEED)
    ref = _engine_steps(model, method, ids, mask)
    tokens, logits, seconds = _static(model, method, ids, mask)
    assert tokens.shape == (2, STEPS) and len(logits) == len(seconds) == STEPS
    for step, (a, b) in enumerate(zip(logits, ref)):
        assert max_diff(a, b) < 1e-4, (step, max_diff(a, b))
    if method is not None:  # the method acted: it differs from dense somewhere
        dense = _engine_steps(model, None, ids, mask)
        assert max(max_diff(a, b) for a, b in zip(logits, dense)) > 1e-3


@pytest.mark.parametrize("method", [TokenSelect(budget=400, n_sink=2, n_local=4), StreamingLLM(budget=400, n_sink=2)],
                         ids=["token_select", "streaming_llm"])
def test_full_budget_equals_dense(method):
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 30, pad=3, seed=2)
    _, dense, _ = _static(model, None, ids, mask)
    _, got, _ = _static(model, method, ids, mask)
    assert max(max_diff(a, b) for a, b in zip(got, dense)) < 1e-5


@pytest.mark.parametrize("shadow", [None, "int8"])
def test_padded_row_equals_alone(shadow):
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 33, pad=6, seed=7)
    method = TokenSelect(budget=13, n_sink=2, n_local=3, shadow=shadow)
    tok_b, log_b, _ = _static(model, method, ids, mask)
    tok_a, log_a, _ = _static(model, method, ids[:1, 6:], mask[:1, 6:])
    assert torch.equal(tok_b[:1], tok_a)
    assert max(max_diff(a[0], b[0]) for a, b in zip(log_b, log_a)) < 1e-4


@pytest.mark.parametrize("method", [TokenSelect(budget=13, n_sink=2, n_local=3),
                                    TokenSelect(budget=13, n_sink=2, n_local=3, shadow="int8"),
                                    StreamingLLM(budget=9, n_sink=2),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=0),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=0, bound="int8")],
                         ids=["token_select", "token_select-int8", "streaming_llm", "quest", "quest-int8"])
def test_one_token_prompt(method):
    """A one-token prompt is a prompt (the page summaries / shadow are built), not a decode step;
    the first steps have fewer rows than the budget (every row attended once)."""
    model = _model("llama")
    ids, mask = tiny_inputs(1, 1, seed=3)
    ref = _engine_steps(model, method, ids, mask, steps=14)
    _, logits, _ = StaticDecoder(model, method, max_cache_len=20).generate(ids, mask, max_new_tokens=14)
    assert max(max_diff(a, b) for a, b in zip(logits, ref)) < 1e-4


@pytest.mark.parametrize("method", [TokenSelect(budget=13, n_sink=2, n_local=3),
                                    TokenSelect(budget=13, n_sink=2, n_local=3, shadow="int8"),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=0)],
                         ids=["token_select", "token_select-int8", "quest"])
def test_prefill_once_and_restore_the_state(method):
    """What the benchmark does: one prefill, then every run restores that state in place (the page
    summaries included)."""
    model = _model("llama")
    ids, mask = tiny_inputs(2, 30, pad=3, seed=2)
    tokens, logits, _ = _static(model, method, ids, mask)
    dec = StaticDecoder(model, method, max_cache_len=ids.shape[1] + STEPS + 3)
    snapshot = dec.prefill(ids, mask, max_new_tokens=STEPS)
    work = dec.prefill(ids[:, -1:], mask[:, -1:], max_new_tokens=STEPS)  # as the benchmark builds it
    for _ in range(2):
        before = work.cache.layers[0].keys.data_ptr()
        t, lg, sec = dec.decode(work.copy_from(snapshot), STEPS - 1)
        assert work.cache.layers[0].keys.data_ptr() == before and len(sec) == STEPS - 1
        assert torch.equal(t, tokens[:, 1:])
        assert max(max_diff(a, b) for a, b in zip(lg, logits[1:])) < 1e-5


@pytest.mark.parametrize("method", [TokenSelect(budget=13, n_sink=2, n_local=3, shadow="int8"),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=1),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=1, bound="int8")],
                         ids=["token_select-int8", "quest", "quest-int8"])
def test_a_dense_snapshot_with_rebuilt_buffers_decodes_as_the_method(method):
    """The benchmark's path: one dense prefill shared by every variant; a method with buffers (page
    summaries, key shadow) rebuilds them from the snapshot's keys (with_buffers) and then decodes
    exactly as after its own prefill."""
    model = _model("llama")
    ids, mask = tiny_inputs(2, 30, pad=3, seed=2)
    tokens, logits, _ = _static(model, method, ids, mask)
    shared = StaticDecoder(model, None, max_cache_len=ids.shape[1] + STEPS + 3).prefill(ids, mask, max_new_tokens=STEPS)
    dec = StaticDecoder(model, method, max_cache_len=ids.shape[1] + STEPS + 3)
    snapshot = dec.with_buffers(shared)
    assert snapshot.cache is shared.cache and snapshot.buffers and not shared.buffers
    work = dec.prefill(ids[:, -1:], mask[:, -1:], max_new_tokens=STEPS)
    for _ in range(2):
        t, lg, _ = dec.decode(work.copy_from(snapshot), STEPS - 1)
        assert torch.equal(t, tokens[:, 1:])
        assert max(max_diff(a, b) for a, b in zip(lg, logits[1:])) < 1e-5
    assert StaticDecoder(model, None, max_cache_len=40).with_buffers(shared) is shared


@pytest.mark.parametrize("method, match", [
    (TokenSelect(budget=0.5, n_sink=2, n_local=4), "share"),
    (TokenSelect(budget=20, n_sink=2, n_local=4, reuse_threshold=0.9), "Selection Cache"),
    (TokenSelect(budget=20, n_sink=2, n_local=4, pool_kernel=3), "pool_kernel"),
    (TokenSelect(budget=20, n_sink=2, n_local=4, shadow="bf16"), "int8 only"),
    (StreamingLLM(budget=0.5), "integer budget"),
    (ts.methods.get("quest")(budget=0.25), "integer budget"),
    (ts.methods.get("quest")(bound="bf16"), "bound='minmax' or 'int8'"),
    (ts.methods.get("tidal_decode")(), "no static-shape decode for 'tidal_decode'"),
])
def test_unsupported_configs_are_refused(method, match):
    with pytest.raises(NotImplementedError, match=match):
        plan_for(method)


def test_bad_inputs_are_refused():
    model = tiny_model("llama")
    ids, mask = tiny_inputs(1, 10)
    dec = StaticDecoder(model, None, max_cache_len=12)
    with pytest.raises(ValueError, match="exceed max_cache_len"):
        dec.generate(ids, mask, max_new_tokens=5)
    right = mask.clone()
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        dec.generate(ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticDecoder(model, None, max_cache_len=1)
    with pytest.raises(NotImplementedError, match="soft-cap"):
        StaticDecoder(tiny_model("gemma2"), None, max_cache_len=32)


def test_attention_outside_the_decoder_is_refused():
    from tokensparse.engine.static import static_attention

    model = tiny_model("llama")
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="outside"):
        static_attention(model.model.layers[0].self_attn, q, q[:, :2], q[:, :2], None)


@pytest.mark.parametrize("method", [TokenSelect(budget=14, n_sink=2, n_local=4, select_per="kv_head"),
                                    TokenSelect(budget=14, n_sink=2, n_local=4, shadow="int8"),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=1),
                                    ts.methods.get("quest")(budget=8, page=3, dense_layers=1, bound="int8")],
                         ids=["token_select", "token_select-int8", "quest", "quest-int8"])
def test_compiled_step_is_one_graph_equal_to_eager_and_not_recompiled(method):
    """fullgraph=True fails on any graph break (a host read such as ``.item()`` included); a second
    prompt of another length reuses the compiled step (the decode step's shapes do not depend on it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model("llama")
    ids, mask = tiny_inputs(2, 29, pad=4, seed=1)
    dec = StaticDecoder(model, method, max_cache_len=48, compile=True)
    tok_c, log_c, _ = dec.generate(ids, mask, max_new_tokens=STEPS)
    tok_e, log_e, _ = StaticDecoder(model, method, max_cache_len=48).generate(ids, mask, max_new_tokens=STEPS)
    assert dec.compile_seconds is not None and dec.compile_seconds > 0
    assert torch.equal(tok_c, tok_e)
    assert max(max_diff(a, b) for a, b in zip(log_c, log_e)) < 1e-4
    frames = counters["stats"]["unique_graphs"]
    dec.generate(ids[:, 5:], mask[:, 5:], max_new_tokens=STEPS)
    assert counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()
