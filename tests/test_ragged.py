"""Per-head and per-layer budgets that free memory (Engine v2 part 2): :class:`RaggedLayer` stores
each KV head at its own length after an eviction. Its padded view holds the same (token, key, value)
rows per head as :class:`EvictingLayer` through writes, evictions, beams, batch operations, clones
and resets; a model runs the same under both caches (logits, greedy and beam search); allocated
bytes stay near the held bytes; PyramidKV's layer counts and AdaKV's head counts against their
definitions."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import EvictingLayer, RaggedLayer
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _kv(b, h, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, 8, generator=g), torch.randn(b, h, t, 8, generator=g)


def _rows(layer):
    """Per (sequence, KV head): {token: (key row, value row)} of the rows the layer holds."""
    k, v, s = layer.keys, layer.values, layer.slots
    out = {}
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            out[b, h] = {int(t): (k[b, h, i], v[b, h, i]) for i, t in enumerate(s[b, h].tolist()) if t >= 0}
    return out


def _same(a, b):
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert ra[key].keys() == rb[key].keys(), key
        for t in ra[key]:
            assert torch.equal(ra[key][t][0], rb[key][t][0]) and torch.equal(ra[key][t][1], rb[key][t][1])


def _pair():
    return EvictingLayer(headroom=4), RaggedLayer(headroom=4, ragged_headroom=2)


def test_ragged_rows_follow_the_padded_layer():
    pad, rag = _pair()
    for layer in (pad, rag):
        layer.update(*_kv(2, 3, 10, 0))
    _same(pad, rag)
    idx = torch.tensor([[[0, 2, 5, 9], [1, 3, 9, 9], [4, 9, 9, 9]], [[0, 1, 2, 3], [5, 6, 7, 8], [2, 8, 9, 9]]])
    valid = idx.new_ones(idx.shape, dtype=torch.bool)
    valid[0, 1, 3] = valid[0, 2, 2:] = False
    valid[1, 2, 3] = False
    valid[0, 2, 1] = False  # head 2 of row 0 keeps one row
    for layer in (pad, rag):
        layer.keep(idx, valid)
    _same(pad, rag)
    assert rag.ragged and rag.n == 4 and rag._len.tolist() == [[4, 3, 1], [4, 4, 3]]
    for step in range(7):  # past the segments' room: repacks
        for layer in (pad, rag):
            out = layer.update(*_kv(2, 3, 1, step + 1))
        assert out[0].shape == (2, 3, rag.n, 8)
        _same(pad, rag)
    # the view is right-aligned: the last written row is the last column of every head
    assert bool((rag.slots[:, :, -1] == rag.seen - 1).all())
    for layer in (pad, rag):  # a second eviction, from the view's columns
        s = layer.slots
        keep = torch.stack([torch.stack([torch.nonzero(s[b, h] >= 0).flatten()[-3:] for h in range(3)]) for b in range(2)])
        layer.keep(keep, None)
    _same(pad, rag)
    for fn in (lambda l: l.reorder_cache(torch.tensor([1, 0])), lambda l: l.batch_repeat_interleave(2),
               lambda l: l.batch_select_indices(torch.tensor([0, 3]))):
        for layer in (pad, rag):
            fn(layer)
        _same(pad, rag)
    copy = rag.clone()
    rag.update(*_kv(2, 3, 1, 50))
    assert copy.seen == rag.seen - 1 and rag.n == copy.n + 1
    pad.update(*_kv(2, 3, 1, 50))
    _same(pad, rag)
    assert rag.bytes_held() == pad.bytes_held()
    rag.reset()
    assert not rag.ragged and rag.seen == 0 and rag.bytes_held() == 0
    rag.update(*_kv(1, 3, 5, 0))
    assert rag.n == 5
    with pytest.raises(NotImplementedError):
        rag.state("x")


def test_ragged_memory_is_what_is_held():
    """A 4K prefill kept at ~50% per head with very different head counts: the padded layer
    allocates the widest head (+ headroom) for every head; the ragged one within 10% of what it holds."""
    b, h, n = 1, 3, 4096
    pad, rag = EvictingLayer(), RaggedLayer()
    for layer in (pad, rag):
        layer.update(*_kv(b, h, n, 0))
    counts = [3200, 2048, 896]  # mean 2048
    idx = torch.stack([torch.arange(3200).clamp_max(c - 1) for c in counts])[None]
    valid = torch.stack([torch.arange(3200) < c for c in counts])[None]
    for layer in (pad, rag):
        layer.keep(idx, valid)
    assert pad.bytes_held() == rag.bytes_held() == sum(counts) * 16 * 4
    assert rag.bytes_allocated() <= 1.10 * rag.bytes_held()
    assert pad.bytes_allocated() >= 1.5 * pad.bytes_held()
    for step in range(40):  # generation: appends stay within the room and a repack's new room
        rag.update(*_kv(b, h, 1, step))
        assert rag.bytes_allocated() <= 1.10 * rag.bytes_held()
    assert rag.bytes_transient() == h * rag.n * 16 * 4


@pytest.mark.parametrize("name", ["ada_kv", "pyramid_kv"])
@pytest.mark.parametrize("batch", [1, 2])
def test_model_runs_the_same_on_ragged_and_padded_caches(name, batch):
    model = tiny_model("llama", torch.float32)
    ids, mask = tiny_inputs(batch, 36, pad=5 if batch == 2 else 0, seed=1)
    method = ts.methods.get(name)(budget=14, window=4)
    outs = []
    for ragged in (True, False):
        with torch.no_grad(), ts.sparsify(model, method) as s:
            cache = s.new_cache() if ragged else ts.KVCache(model, evicting=True)
            assert isinstance(cache.layers[0], RaggedLayer) == ragged
            out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        outs.append((torch.stack(out.logits, 1), out.sequences, cache))
    (la, sa, ca), (lb, sb, cb) = outs
    assert torch.equal(sa, sb) and max_diff(la, lb) <= 1e-5
    assert ca.bytes_held() == cb.bytes_held()
    assert ca.bytes_allocated() < cb.bytes_allocated()


def test_beam_search_on_a_ragged_cache():
    model = tiny_model("llama", torch.float32)
    ids, mask = tiny_inputs(1, 30, seed=2)
    method = ts.methods.get("ada_kv")(budget=12, window=4)
    seqs = []
    for ragged in (True, False):
        with torch.no_grad(), ts.sparsify(model, method) as s:
            cache = s.new_cache() if ragged else ts.KVCache(model, evicting=True)
            seqs.append(model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, num_beams=2,
                                       do_sample=False, pad_token_id=0))
    assert torch.equal(seqs[0], seqs[1])


def test_pyramid_layer_counts():
    m = ts.methods.get("pyramid_kv")(budget=100, window=4, beta=20)
    mean, cand = torch.tensor([[96]]), torch.tensor([[1000]])
    c = m.layer_counts(mean, cand, 30)[0]
    assert int(c[0]) - (2 * 96 - 96 // 20) in (0, 1) and bool((c.diff() <= 0).all())
    assert int(c.sum()) == 30 * 96 and int(c[-1]) - 96 // 20 in (0, 1)  # the mean budget exactly
    c = m.layer_counts(mean, torch.tensor([[120]]), 30)[0]  # the first layer's share capped at the candidates
    assert c[0] == 120 and int(c[-1]) - (2 * 96 - 120) in (0, 1) and int(c.sum()) == 30 * 96


def test_ada_head_counts_against_their_definition():
    from types import SimpleNamespace

    torch.manual_seed(0)
    scores = torch.rand(2, 3, 50)
    scores[:, 0] *= 10  # a head whose scores dominate
    plan = SimpleNamespace(cand_mask=None, counts=lambda n: n)
    for floor in (0.0, 0.2, 1.0):
        m = ts.methods.get("ada_kv")(budget=0.5, floor=floor)
        counts = m.head_counts(scores, torch.tensor([[20], [10]]), plan)
        for r, c in enumerate((20, 10)):
            f = int(floor * c)
            assert int(counts[r].sum()) == 3 * c and int(counts[r].min()) >= f
            # brute force: each head's top f, then the best of the rest across heads
            ranked = scores[r].sort(-1, descending=True).values
            if c > f:
                rest = ranked[:, f:].flatten().topk(3 * (c - f)).values.min()
                ref = f + (ranked[:, f:] >= rest).sum(-1)
            else:
                ref = torch.full((3,), f)
            assert counts[r].tolist() == ref.tolist()
        if floor < 1.0:
            assert counts[0, 0] > counts[0, 1]
