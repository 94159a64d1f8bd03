"""Quest: the cache-kept page summaries (:class:`PageSummary`) equal a summary computed from the
full keys after a prefill, decode steps, a crop and beam reordering; the page score is an upper
bound of every key's score in the page and the top pages equal a brute-force ranking; a decode
step reads the page summaries instead of every key; an evicting cache is refused."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import EvictingLayer, PreallocLayer
from tokensparse.engine.cache import PageSummary, summarize_pages
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
Quest = ts.methods.get("quest")


def _kv(b, h, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, 8, generator=g), torch.randn(b, h, t, 8, generator=g)


def _agrees(layer, st, page):
    kmin, kmax = summarize_pages(layer.keys, page)
    got_min, got_max = st.bounds
    return torch.equal(got_min, kmin) and torch.equal(got_max, kmax)


def test_summarize_pages_brute_force():
    k = torch.randn(2, 3, 11, 4)
    kmin, kmax = summarize_pages(k, 4)
    assert kmin.shape == (2, 3, 3, 4)
    for p, (s, e) in enumerate([(0, 4), (4, 8), (8, 11)]):
        assert torch.equal(kmin[:, :, p], k[:, :, s:e].amin(2))
        assert torch.equal(kmax[:, :, p], k[:, :, s:e].amax(2))


@pytest.mark.parametrize("page", [1, 3, 4])
def test_page_summary_follows_prefill_decode_crop_and_beams(page):
    layer = PreallocLayer(headroom=2)
    layer.update(*_kv(2, 2, 7, 0))
    st = layer.state(f"p{page}", lambda: PageSummary(page))  # created after the prefill: sees its rows
    assert _agrees(layer, st, page)
    for step in range(6):  # across page boundaries and a buffer growth
        layer.update(*_kv(2, 2, 1, step + 1))
        assert _agrees(layer, st, page), step
    layer.update(*_kv(2, 2, 5, 20))  # a chunk
    assert _agrees(layer, st, page)
    layer.crop(-9)
    assert _agrees(layer, st, page)
    layer.update(*_kv(2, 2, 1, 21))
    assert _agrees(layer, st, page)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert _agrees(layer, st, page)
    copy = layer.clone()
    copy.batch_repeat_interleave(2)
    assert _agrees(copy, copy.states[f"p{page}"], page)


def test_page_summary_refuses_eviction():
    layer = EvictingLayer()
    layer.update(*_kv(1, 2, 8, 0))
    layer.state("p", lambda: PageSummary(4))
    with pytest.raises(NotImplementedError, match="full cache"):
        layer.keep(torch.tensor([[[0, 1], [2, 3]]]), None)
    with pytest.raises(ValueError, match="page size"):
        PageSummary(0)


def test_top_pages_bound_and_ranking_against_brute_force():
    torch.manual_seed(0)
    b, hkv, g, d, page, n_pages = 2, 2, 3, 8, 4, 9
    q = torch.randn(b, hkv * g, 1, d)
    k = torch.randn(b, hkv, n_pages * page, d)
    kmin, kmax = summarize_pages(k, page)
    top = Quest.top_pages(q, kmin, kmax, 4)
    assert top.shape == (b, hkv, 4)
    qg = q.view(b, hkv, g, d)
    for bi in range(b):
        for h in range(hkv):
            qj = qg[bi, h][:, None, :]  # (g, 1, d)
            bound = torch.where(qj > 0, qj * kmax[bi, h][None], qj * kmin[bi, h][None]).sum(-1)  # (g, pages)
            exact = (qg[bi, h] @ k[bi, h].T).view(g, n_pages, page).amax(-1)  # the best key of each page
            assert bool((bound >= exact - 1e-5).all())  # an upper bound, per query head
            ref = bound.amax(0).topk(4).indices.sort().values
            assert top[bi, h].tolist() == ref.tolist()


def test_decode_reads_page_summaries_not_keys():
    model = tiny_model("llama", torch.float32)
    ids, mask = tiny_inputs(1, 64)
    method = Quest(budget=16, page=4, dense_layers=0)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 67
    st = s.stats
    assert st["quest_summary_rows"] > 0
    # per decode call: 2 summaries per full page against every cache row
    assert st["quest_summary_rows"] < st["quest_cache_rows"]


def test_quest_needs_the_sessions_cache():
    model = tiny_model("llama", torch.float32)
    ids, mask = tiny_inputs(1, 24)
    with torch.no_grad(), ts.sparsify(model, Quest(budget=8, page=2, dense_layers=0)), pytest.raises(Exception, match="new_cache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_config_errors():
    with pytest.raises(ValueError):
        Quest(page=0)
    with pytest.raises(ValueError):
        Quest(budget=0)
    assert Quest(budget=40, page=16).n_pages(1000) == 3  # rounded up, at least 3
    assert Quest(budget=100, page=16).n_pages(1000) == 7
