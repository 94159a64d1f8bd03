"""Cache-carried state (Engine v2 part 2): a :class:`RowState` follows every change of its layer's
rows (writes, eviction with per-head holes, crop, beam reordering, batch expansion and selection,
clone, reset); :func:`attention_mass` against brute force; H2O's accumulator against brute force
over a prefill and decode steps; beam search under H2O equals dense at full budget."""

from dataclasses import dataclass, field

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import EvictingLayer, Method, PreallocLayer, RowState, exercise_sparse_paths
from tokensparse.engine.selection import attention_mass
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _kv(b, h, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, 8, generator=g), torch.randn(b, h, t, 8, generator=g)


def _tag(layer, st, start):
    """Write each row's absolute token index into the state (what the test then tracks)."""
    st.values[:, :, start:] = layer.slots[:, :, start:].float()


def _agrees(layer, st):
    return torch.equal(st.values, layer.slots.float())  # empty rows: -1 in both


def test_row_state_follows_writes_eviction_beams_batches_and_clones():
    layer = EvictingLayer(headroom=2)
    layer.update(*_kv(2, 2, 5, 0))
    st = layer.state("tag", lambda: RowState(fill=-1.0))
    assert st.values.shape == (2, 2, 5) and bool((st.values == -1).all())  # created late: sees the rows held
    _tag(layer, st, 0)
    for step in range(4):  # decode steps past the capacity: the buffers grow
        layer.update(*_kv(2, 2, 1, step + 1))
        assert st.values[:, :, -1].eq(-1).all()
        _tag(layer, st, layer.n - 1)
    assert _agrees(layer, st)
    idx = torch.tensor([[[0, 3, 8], [1, 2, 8]], [[4, 5, 6], [0, 7, 7]]])
    valid = torch.tensor([[[True] * 3] * 2, [[True] * 3, [True, True, False]]])  # one KV head keeps fewer rows
    layer.keep(idx, valid)
    assert _agrees(layer, st) and st.values[1, 1, 2] == -1
    layer.update(*_kv(2, 2, 1, 9))
    _tag(layer, st, layer.n - 1)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert _agrees(layer, st)
    copy = layer.clone()
    layer.states["tag"].values.add_(100)
    assert _agrees(copy, copy.states["tag"]) and not _agrees(layer, st)
    copy.batch_repeat_interleave(2)
    assert copy.states["tag"].values.shape[0] == 4 and _agrees(copy, copy.states["tag"])
    copy.batch_select_indices(torch.tensor([0, 3]))
    assert _agrees(copy, copy.states["tag"])
    copy.reset()
    assert copy.states == {}


def test_row_state_follows_a_crop_of_a_full_cache():
    layer = PreallocLayer(headroom=1)
    layer.update(*_kv(1, 2, 6, 0))
    st = layer.state("x")
    st.values.fill_(1.0)
    layer.crop(-2)
    assert st.values.shape == (1, 2, 4)
    layer.update(*_kv(1, 2, 3, 1))
    assert st.values[..., :4].eq(1).all() and st.values[..., 4:].eq(0).all()


@pytest.mark.parametrize("padded", [False, True])
def test_attention_mass_equals_brute_force(padded):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 7, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    allowed = torch.ones(11, 11, dtype=torch.bool).tril()[-7:].expand(2, 1, 7, 11).clone()
    qv = None
    if padded:
        allowed[1, :, :, :3] = False  # row 1 is left-padded by 3 keys
        qv = torch.ones(2, 7, dtype=torch.bool)
        allowed[1, :, :1] = False  # ... and its first query is padding
        qv[1, 0] = False
    s = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 0.3
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    want = p.sum(2)
    got = attention_mass(q, k, 0.3, allowed if padded else None, qv, chunk=3)
    assert torch.allclose(got, want, atol=1e-5)


@dataclass(eq=False)
class _Capture(Method):
    """Dense attention that records each call's queries and keys (test only)."""

    calls: list = field(default_factory=list)

    def forward(self, call):
        self.calls.append((call.layer_idx, call.query.clone(), call.key.clone(), call.scale))
        return call.dense()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


def test_h2o_accumulates_the_attention_each_row_received(model):
    ids, _ = tiny_inputs(1, 12, seed=3)
    steps = [torch.tensor([[5]]), torch.tensor([[9]]), torch.tensor([[2]])]
    cap = _Capture()
    with torch.no_grad(), ts.sparsify(model, cap) as s:
        cache = s.new_cache()
        for x in [ids, *steps]:
            model(x, cache=cache)
    h2o = ts.methods.get("h2o")(budget=1 << 30, window=2)
    with torch.no_grad(), ts.sparsify(model, h2o) as s:
        cache = s.new_cache()
        for x in [ids, *steps]:
            model(x, cache=cache)
    hkv = model.config.num_key_value_heads
    for layer in range(model.config.num_hidden_layers):
        want = torch.zeros(1, hkv, 15)
        for li, q, k, scale in cap.calls:
            if li != layer:
                continue
            lq, lk = q.shape[2], k.shape[2]
            s = (q @ k.repeat_interleave(q.shape[1] // hkv, 1).transpose(-1, -2)) * scale
            causal = torch.ones(lk, lk, dtype=torch.bool).tril()[-lq:]
            p = s.masked_fill(~causal, float("-inf")).softmax(-1).sum(2)  # (1, Hq, Lk)
            want[:, :, :lk] += p.view(1, hkv, -1, lk).sum(2)
        got = cache.layers[layer].states["h2o.scores"].values
        assert torch.allclose(got, want, atol=1e-4), layer


def test_h2o_keeps_the_heaviest_rows_and_the_window_per_kv_head(model):
    ids, _ = tiny_inputs(1, 20, seed=4)
    h2o = ts.methods.get("h2o")(budget=8, window=3)
    with torch.no_grad(), ts.sparsify(model, h2o) as s:
        cache = s.new_cache()
        model(ids, cache=cache)
    full = ts.methods.get("h2o")(budget=1 << 30, window=3)
    with torch.no_grad(), ts.sparsify(model, full) as s:
        ref = s.new_cache()
        model(ids, cache=ref)
    for layer, want_layer in zip(cache.layers, ref.layers):
        scores = want_layer.states["h2o.scores"].values[0]  # (Hkv, 20) before eviction
        for h in range(scores.shape[0]):
            heavy = scores[h, :17].topk(5).indices.tolist()
            want = sorted(heavy + [17, 18, 19])
            assert layer.slots[0, h].tolist() == want
            assert torch.allclose(layer.states["h2o.scores"].values[0, h], scores[h, want])


@pytest.mark.parametrize("forced", [False, True], ids=["plain", "sparse-paths-forced"])
def test_beam_search_under_h2o_at_full_budget_equals_dense(model, forced):
    ids, mask = tiny_inputs(2, 14, pad=True, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        h2o = ts.methods.get("h2o").at_full_budget()
        with (exercise_sparse_paths() if forced else torch.no_grad()), ts.sparsify(model, h2o) as s:
            out = model.generate(ids, cache=s.new_cache(), **kw)
    assert torch.equal(out, dense)


def test_beam_search_under_h2o_reorders_the_scores_with_the_rows(model):
    ids, _ = tiny_inputs(1, 16, seed=6)
    h2o = ts.methods.get("h2o")(budget=10, window=3)
    with torch.no_grad(), ts.sparsify(model, h2o) as s:
        cache = s.new_cache()
        model.generate(ids, cache=cache, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    for layer in cache.layers:
        st = layer.states["h2o.scores"]
        assert st.values.shape == layer.slots.shape and bool(torch.isfinite(st.values).all())
        assert bool((st.values[layer.valid_rows()] > 0).all())  # every held row has received attention
