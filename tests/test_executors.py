"""Fast executors and scorers against their plain-PyTorch reference twins."""

import pytest
import torch

from tokensparse.engine.executors import (
    compress_attend_scatter,
    dense_attention,
    gather_attend,
    gather_rows,
    reference_attention,
    segments_attend,
)
from tokensparse.engine.selection import (
    aggregate_gqa,
    coverage_keep_count,
    grouped_dot,
    pool1d,
    resolve_budget,
    topk_sorted,
    validate_budget,
    window_scores,
    window_scores_reference,
)

B, HQ, HKV, D = 2, 6, 2, 16


def qkv(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g)
    k = torch.randn(B, HKV, lk, D, generator=g)
    v = torch.randn(B, HKV, lk, D, generator=g)
    return q, k, v


def random_idx(heads, length, n, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    cand = length - window
    top = torch.stack([torch.randperm(cand, generator=g)[: n] for _ in range(B * heads)]).view(B, heads, n)
    tail = torch.arange(cand, length).expand(B, heads, window)
    return torch.cat([top.sort(-1).values, tail], -1)


@pytest.mark.parametrize("lq,lk", [(32, 32), (5, 32), (1, 32)])
def test_dense_matches_reference(lq, lk):
    q, k, v = qkv(lq, lk)
    torch.testing.assert_close(dense_attention(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    mask = torch.rand(B, 1, lq, lk, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(dense_attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [HQ, HKV], ids=["per-query-head", "per-kv-head"])
def test_compress_scatter_fast_matches_reference(heads):
    q, k, v = qkv(40, 40)
    idx = random_idx(heads, 40, 12, 6)
    fast = compress_attend_scatter(q, k, v, idx)
    ref = compress_attend_scatter(q, k, v, idx, impl="reference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # unselected query rows are exactly zero, selected rows are not
    sel = torch.zeros(B, heads, 40, dtype=torch.bool).scatter_(2, idx, True)
    sel = sel.repeat_interleave(HQ // heads, 1)
    assert fast[~sel].abs().max() == 0
    assert fast[sel].abs().min() > 0


def test_compress_scatter_all_tokens_is_dense():
    q, k, v = qkv(24, 24)
    idx = torch.arange(24).expand(B, HQ, 24)
    torch.testing.assert_close(compress_attend_scatter(q, k, v, idx), dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_compress_scatter_padding_keys_are_ignored():
    q, k, v = qkv(20, 20)
    valid = torch.ones(B, 20, dtype=torch.bool)
    valid[0, :4] = False
    idx = random_idx(HKV, 20, 8, 4)
    fast = compress_attend_scatter(q, k, v, idx, key_valid=valid)
    ref = compress_attend_scatter(q, k, v, idx, key_valid=valid, impl="reference")
    real = valid[:, None, :, None].expand_as(fast)  # padded query rows are don't-care
    torch.testing.assert_close(fast[real], ref[real], atol=1e-5, rtol=1e-5)
    # changing a padding key changes nothing
    k2 = k.clone()
    k2[0, :, :4] += 10
    torch.testing.assert_close(compress_attend_scatter(q, k2, v, idx, key_valid=valid)[real], fast[real])


def test_compress_scatter_no_future_leakage():
    q, k, v = qkv(30, 30)
    idx = random_idx(HQ, 30, 10, 5)
    out = compress_attend_scatter(q, k, v, idx)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 5
    v2[:, :, 20:] -= 5
    out2 = compress_attend_scatter(q, k2, v2, idx)
    torch.testing.assert_close(out[:, :, :20], out2[:, :, :20])


@pytest.mark.parametrize("heads", [1, HKV])
@pytest.mark.parametrize("lq", [1, 4])
def test_gather_attend_fast_matches_reference(heads, lq):
    q, k, v = qkv(lq, 50)
    idx = random_idx(heads, 50, 10, 8)
    mask = None
    if lq > 1:
        qpos = torch.arange(50 - lq, 50)
        mask = idx[:, :, None, :] <= qpos[None, None, :, None]
    fast = gather_attend(q, k, v, idx, mask=mask)
    ref = gather_attend(q, k, v, idx, mask=mask, impl="reference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_gather_attend_all_rows_is_dense():
    q, k, v = qkv(1, 30)
    idx = torch.arange(30).expand(B, 1, 30)
    torch.testing.assert_close(gather_attend(q, k, v, idx), dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_window_scores_chunked_matches_reference():
    q, k, _ = qkv(8, 37)
    valid = torch.ones(B, 37, dtype=torch.bool)
    valid[1, :5] = False
    ref = window_scores_reference(q, k, 0.25, valid)
    fast = window_scores(q, k, 0.25, valid, chunk=10)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.sum(-1), torch.ones(B, HQ), atol=1e-5, rtol=0)  # mean of probability rows
    assert fast[1, :, :5].abs().max() == 0


def test_pool_gqa_topk_budget_helpers():
    s = torch.tensor([[[0.0, 0, 1, 0, 0, 0, 0]]])
    assert pool1d(s, 3, "max").tolist() == [[[0, 1, 1, 1, 0, 0, 0]]]
    assert pool1d(s, 1).data_ptr() == s.data_ptr()
    assert pool1d(torch.rand(2, 3, 11), 4, "avg").shape == (2, 3, 11)
    x = torch.arange(12.0).view(1, 4, 3)
    assert aggregate_gqa(x, 2, "max").tolist() == [[[3, 4, 5], [9, 10, 11]]]
    assert aggregate_gqa(x, 2, "mean").tolist() == [[[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]]
    idx = topk_sorted(torch.tensor([[5.0, 1, 7, 3, 9]]), 3)
    assert idx.tolist() == [[0, 2, 4]]
    assert resolve_budget(0.25, 400) == 100 and resolve_budget(64, 400) == 64
    for bad in (0, -3, 0.0, 1.5, -0.1, True, "10"):
        with pytest.raises((ValueError, TypeError)):
            validate_budget("budget", bad)


def test_coverage_keep_count():
    scores = torch.tensor([[[0.5, 0.3, 0.1, 0.06, 0.03, 0.01]]])
    assert coverage_keep_count(scores, 0.0, 0) == 6
    # masses ascending: .01 .03 .06 ... ; cumsum < 0.05 → 2 tokens, plus one (official) → drop 3
    assert coverage_keep_count(scores, 0.05, 0) == 3
    assert coverage_keep_count(scores, 0.05, 5) == 5  # min_keep wins
    taus = [0.0, 0.01, 0.05, 0.2, 0.5]
    counts = [coverage_keep_count(scores, t, 1) for t in taus]
    assert counts == sorted(counts, reverse=True)


def test_gather_rows_reads_strided_views_in_place():
    buf = torch.randn(B, HKV, 40, D)
    view = buf[:, :, :25]  # a cache view: prefix of a preallocated buffer (not contiguous)
    idx = torch.tensor([[[0, 3, 24], [1, 2, 5]], [[7, 8, 9], [0, 10, 20]]])
    expect = torch.stack([torch.stack([view[b, h, idx[b, h]] for h in range(HKV)]) for b in range(B)])
    assert torch.equal(gather_rows(view, idx), expect)
    q = torch.randn(B, 25, HQ, D).transpose(1, 2)  # the transposed query view transformers passes
    qidx = idx.repeat(1, HQ // HKV, 1)
    heads = torch.arange(HQ).flip(0)
    got = gather_rows(q, qidx, heads)
    expect = torch.stack([torch.stack([q[b, heads[h], qidx[b, h]] for h in range(HQ)]) for b in range(B)])
    assert torch.equal(got, expect)


@pytest.mark.parametrize("lq", [1, 3])
def test_segments_attend_matches_reference_and_concatenated_dense(lq):
    q, k, v = qkv(lq, 60)
    top = torch.tensor([5, 9, 17, 30])
    segs = [(k[:, :, :4], v[:, :, :4]), (k[:, :, top], v[:, :, top]), (k[:, :, 50:], v[:, :, 50:]), (k[:, :, :0], v[:, :, :0])]
    fast = segments_attend(q, segs, 0.3)
    ref = segments_attend(q, segs, 0.3, impl="reference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    kk, vv = torch.cat([s[0] for s in segs], 2), torch.cat([s[1] for s in segs], 2)
    full = torch.ones(B, 1, lq, kk.shape[2], dtype=torch.bool)
    torch.testing.assert_close(fast, dense_attention(q, kk, vv, full, 0.3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        segments_attend(q, [(k[:, :, :0], v[:, :, :0])])


def test_grouped_dot_matches_matmul_on_views():
    buf = torch.randn(B, HKV, 50, D)
    k = buf[:, :, 3:41]
    q = torch.randn(B, HKV, 3, D)
    torch.testing.assert_close(grouped_dot(q, k), q @ k.transpose(-1, -2), atol=1e-5, rtol=1e-5)


def test_gather_pages_equals_gather_rows_on_cache_views():
    from tokensparse.engine.executors import gather_pages, gather_rows, page_rows

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(2, 3, 40, 8, generator=g)
    x = buf[:, :, :27]  # a cache view: a prefix of a preallocated buffer (27 rows, pages of 4: 6 full)
    pages = torch.tensor([[[0, 2, 5], [1, 3, 4], [0, 1, 2]], [[5, 4, 3], [2, 3, 5], [0, 4, 5]]]).sort(-1).values
    rows = (pages[..., None] * 4 + torch.arange(4)).flatten(-2)
    assert torch.equal(gather_pages(x, pages, 4), gather_rows(x, rows))
    assert torch.equal(page_rows(pages, 4), rows)  # (the path off a CPU: gather_rows(x, page_rows(...)))


def test_decode_backends_is_a_no_op_without_cuda_and_sdpa_equals_torch():
    from tokensparse.engine.executors import decode_backends, sdpa

    q, k, v = (torch.randn(1, 2, n, 8) for n in (1, 5, 5))
    with decode_backends():
        out = sdpa(q, k, v, scale=0.3)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_gather_kv_rows_equals_two_gathers_with_shared_or_different_layouts():
    from tokensparse.engine.executors import gather_kv_rows, gather_rows

    g = torch.Generator().manual_seed(0)
    buf_k = torch.randn(2, 3, 20, 8, generator=g)
    buf_v = torch.randn(2, 3, 20, 8, generator=g)
    idx = torch.randint(0, 12, (2, 3, 5), generator=g)
    for k, v in ((buf_k[:, :, :12], buf_v[:, :, :12]),  # cache views: same layout, one index
                 (buf_k[:, :, :12], buf_v[:, :, :12].transpose(0, 1).contiguous().transpose(0, 1))):  # different strides
        ks, vs = gather_kv_rows(k, v, idx)
        assert torch.equal(ks, gather_rows(k, idx)) and torch.equal(vs, gather_rows(v, idx))
