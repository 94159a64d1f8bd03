"""The decoder-layer hook (engine.rows) and FastV, its proof method.

The fast path drops hidden rows after layer K-1; its reference keeps every row and masks the dropped
tokens as keys in layers >= K (a dropped row's own output never reaches a kept row except through
its key/value, so both must give the same logits). Generation continues from the pruned cache with
the kept tokens at their original positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import CacheRequiredError, Method, Phase
from tokensparse.engine.executors import causal_mask, dense_attention
from tokensparse.engine.rows import RowKeep
from tokensparse.eval.metrics import perplexity, prefill_answer_loglik
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

FastV = ts.methods.get("fast_v")
_models: dict = {}

pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(family="llama", layers=3):
    key = (family, layers)
    if key not in _models:
        _models[key] = tiny_model(family, num_hidden_layers=layers)
    return _models[key]


@dataclass(eq=False)
class MaskedReference(Method):
    """Dense attention in which layers >= ``first`` do not see the keys ``allowed`` marks False."""

    name = ""  # not registered
    phase = Phase.PREFILL

    def forward(self, call):
        if call.layer_idx < self.first:
            return call.dense()
        m = call.mask
        if m is None:
            m = causal_mask(call.q_len, call.k_len, call.query.device)[None, None]
        m = m & self.allowed[:, None, None, : call.k_len]
        return dense_attention(call.query, call.key, call.value, m, call.scale)


def generate(model, method, ids, mask, new=5, cache=None):
    with torch.no_grad():
        ctx = ts.sparsify(model, method) if method is not None else None
        session = ctx.__enter__() if ctx is not None else None
        try:
            kv = cache if cache is not None else (session.new_cache() if session is not None else ts.KVCache(model))
            out = model.generate(ids, attention_mask=mask, cache=kv, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            stats = dict(session.stats) if session is not None else {}
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return torch.stack(out.logits, 1), out.sequences, kv, stats


def kept_tokens(cache, layer: int, total: int) -> torch.Tensor:
    """``(B, total)`` bool: the absolute positions a layer of an evicting cache holds."""
    slots = cache.layers[layer].slots[:, 0]  # every KV head holds the same rows
    allowed = torch.zeros(slots.shape[0], total + 1, dtype=torch.bool)
    allowed.scatter_(1, torch.where(slots >= 0, slots, total), True)
    return allowed[:, :total]


@pytest.mark.parametrize("family, pool", [("llama", 1), ("qwen3", 1), ("llama", 5)])
@pytest.mark.parametrize("pad", [0, 5])
def test_pruned_rows_equal_the_masked_reference_and_generation_continues_at_the_right_positions(family, pool, pad):
    model = model_for(family)
    ids, mask = tiny_inputs(2, 28, pad=pad, seed=1)
    method = FastV(layer=2, keep=0.4, n_sink=1, tail=3, pool_kernel=pool)
    logits, seq, cache, stats = generate(model, method, ids, mask)
    assert stats["rows_pruned_passes"] == 1 and stats["rows_kept"] < stats["rows_total"]
    total = seq.shape[1] - 1  # the last generated token is never fed back
    L = ids.shape[1]
    for layer in (0, 1):  # layers before K keep every row
        assert kept_tokens(cache, layer, total)[:, pad:].all()
    kept = kept_tokens(cache, 2, total)
    assert kept[:, L:].all(), "generated tokens are cached at their absolute positions"
    assert (kept[:, L - 3 : L]).all() and kept[1, 0], "the tail and the first token stay"
    n_real = mask.sum(1)
    span = n_real - 1 - 3
    assert kept[:, :L].sum(1).tolist() == (n_real - span + torch.ceil(0.4 * span).long()).tolist()
    ref = MaskedReference()
    ref.first, ref.allowed = 2, kept
    ref_logits, ref_seq, _, _ = generate(model, ref, ids, mask)
    assert torch.equal(seq, ref_seq)
    assert max_diff(logits, ref_logits) <= TOLERANCE[torch.float32]
    dense_logits, _, _, _ = generate(model, None, ids, mask)
    assert max_diff(logits, dense_logits) > 1e-3, "the method did not act"


def test_keep_all_equals_dense_and_runs_the_gathers():
    model = model_for()
    ids, mask = tiny_inputs(2, 24, pad=4, seed=2)
    logits, seq, cache, stats = generate(model, FastV(layer=1, keep=1.0, n_sink=0, tail=1), ids, mask)
    ref_logits, ref_seq, _, _ = generate(model, None, ids, mask)
    assert stats["rows_pruned_passes"] == 1 and stats["rows_kept"] == stats["rows_total"] == 24
    assert torch.equal(seq, ref_seq) and max_diff(logits, ref_logits) <= TOLERANCE[torch.float32]


def test_marked_span_limits_what_is_dropped():
    model = model_for()
    ids, mask = tiny_inputs(1, 30, seed=3)
    with torch.no_grad(), ts.sparsify(model, FastV(layer=1, keep=0.5)) as s:
        s.mark_span(10, 20)
        cache = s.new_cache()
        model(ids, attention_mask=mask, cache=cache)
    kept = kept_tokens(cache, 1, 30)[0]
    assert kept[:10].all() and kept[20:].all() and int(kept[10:20].sum()) == 5


def test_single_pass_without_cache_and_prefill_answer_loglik():
    model = model_for()
    ids, mask = tiny_inputs(1, 30, seed=4)
    with torch.no_grad(), ts.sparsify(model, FastV(layer=1, keep=0.5, n_sink=1, tail=4)) as s:
        out = model(ids, use_cache=False).logits
        assert out.shape[1] == 30 - 12, "the pass returns the kept rows only"
        assert torch.isfinite(out).all()
        assert s.stats["rows_kept"] == 18
        ll = prefill_answer_loglik(model, ids[:, :26], ids[:, 26:3 + 26])  # 4 scored rows: the tail
        assert math.isfinite(ll)
    with torch.no_grad(), ts.sparsify(model, FastV(layer=1, keep=0.1)) as s:
        s.mark_span(1, 29)  # 3 of 28 kept: scored rows are dropped
        with pytest.raises(ValueError, match="mark the span"):
            prefill_answer_loglik(model, ids[:, :25], ids[:, 25:])
        with pytest.raises(ValueError, match="mark the span"):
            perplexity(model, ids)


def test_stock_cache_is_refused_with_the_fix():
    from transformers import DynamicCache

    model = model_for()
    ids, mask = tiny_inputs(1, 20)
    with torch.no_grad(), ts.sparsify(model, FastV(layer=1, keep=0.5, tail=2)):
        with pytest.raises(CacheRequiredError, match="session.new_cache"):
            model(ids, cache=DynamicCache(config=model.config))


def test_layer_beyond_the_model_prunes_nothing_and_warns():
    model = model_for(layers=3)
    ids, _ = tiny_inputs(1, 20)
    with pytest.warns(UserWarning, match="layer=3 is not below"):
        with torch.no_grad(), ts.sparsify(model, FastV(layer=3, tail=2)) as s:
            model(ids, cache=s.new_cache())
    assert s.stats["rows_pruned_passes"] == 0 and "nothing is pruned" in s.info["fast_v"]


def test_a_method_that_drops_the_last_row_is_refused():
    @dataclass(eq=False)
    class DropLast(Method):
        name = ""
        phase = Phase.PRUNE
        prunes_rows = True
        needs_evicting_cache = True

        def keep_rows(self, session, layer_idx, hidden):
            return RowKeep(torch.arange(hidden.shape[1] - 1)[None]) if layer_idx == 0 else None

    model = model_for()
    ids, _ = tiny_inputs(1, 10)
    with torch.no_grad(), ts.sparsify(model, DropLast()) as s:
        with pytest.raises(ValueError, match="last row"):
            model(ids, cache=s.new_cache())


def test_mark_span_checks_its_arguments():
    model = model_for()
    with ts.sparsify(model, FastV()) as s:
        with pytest.raises(ValueError):
            s.mark_span(5, 2)
        with pytest.raises(TypeError):
            s.mark_span(0.5, 2)
        s.mark_span(0, 3)
        assert s.span == (0, 3)
        s.clear_span()
        assert s.span is None


def test_sliding_only_model_prunes_nothing_and_says_so():
    model = tiny_model("mistral", sliding_window=8, num_hidden_layers=2)
    ids, mask = tiny_inputs(1, 20)
    with torch.no_grad(), ts.sparsify(model, FastV(layer=1, keep=0.5, tail=2)) as s:
        model(ids, cache=s.new_cache())
        assert "nothing is pruned" in s.info["fast_v"] and s.stats["rows_pruned_passes"] == 0


def test_pooling_keeps_the_neighbours_of_a_peak():
    from types import SimpleNamespace

    scores = torch.full((1, 20), 0.01)
    scores[0, 10] = 1.0  # the last token attends to position 10 only
    for pool, want in ((1, {10}), (3, {9, 10, 11})):
        method = FastV(layer=1, keep=0.2, n_sink=0, tail=5, pool_kernel=pool)
        session = SimpleNamespace(carry={"fast_v": (scores, None)}, span=(0, 15))
        keep = method.keep_rows(session, 0, torch.zeros(1, 20, 4))
        kept_span = {p for p in keep.index[0].tolist() if p < 15}
        assert want <= kept_span and len(kept_span) == 3  # ceil(0.2 * 15)
