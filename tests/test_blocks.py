"""Block-sparse attention: the executors against the reference (outputs and log-sum-exp), the
grid over padded rows, :func:`merge_partials`, errors; HiP's tree search against a brute-force
reference, its telemetry, and compiled FlexAttention (when a C++ compiler is present)."""

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import KeyBias, Selection, Telemetry
from tokensparse.engine.blocks import (
    block_attend,
    blocks_from_sets,
    everything_blocks,
    flex_available,
    merge_partials,
    token_mask,
)
from tokensparse.engine.executors import reference_attention
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("gather", "sdpa")


def qkv(b=2, hq=6, hkv=2, lq=70, lk=70, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


def random_blocks(b, h, lq, lk, bq, bk, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    sets = torch.rand(b, h, nqb, nkb, generator=g) < p
    sets[0, 0, min(1, nqb - 1)] = False  # a query block that reads nothing
    return blocks_from_sets(sets, bq, bk)


def close(a, b, tol=2e-5):
    return (a.float() - b.float()).abs().max().item() <= tol


def lse_close(a, b, tol=2e-5):
    assert torch.equal(a.isinf(), b.isinf())
    fin = a.isfinite()
    return close(a[fin], b[fin], tol)


@pytest.mark.parametrize("heads", [1, 2, 6], ids=["one-set", "per-kv-head", "per-q-head"])
@pytest.mark.parametrize("blocks", [(8, 8), (4, 8), (8, 3)], ids=["square", "q<k", "k<q"])
def test_gather_equals_reference_with_lse(heads, blocks):
    q, k, v = qkv()
    sel = random_blocks(2, heads, 70, 70, *blocks)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl="gather", return_lse=True)
    assert close(out, ref) and lse_close(lse, ref_lse)
    assert torch.equal(out, block_attend(q, k, v, sel, 0.3, impl="gather"))


@pytest.mark.parametrize("heads", [1, 2, 6], ids=["one-set", "per-kv-head", "per-q-head"])
@pytest.mark.parametrize("block", [8, 5])
def test_sdpa_equals_reference_with_lse(heads, block):
    q, k, v = qkv()
    sel = random_blocks(2, heads, 70, 70, block, block)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl="sdpa", return_lse=True)
    assert close(out, ref) and lse_close(lse, ref_lse)


def test_rows_that_read_nothing_output_zero_and_lse_minus_inf():
    q, k, v = qkv(b=1)
    sets = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    sets[..., 3, 0] = True
    sel = blocks_from_sets(sets, 8, 8)
    for impl in ("reference", *FAST):
        out, lse = block_attend(q, k, v, sel, 0.3, impl=impl, return_lse=True)
        dead = torch.ones(70, dtype=torch.bool)
        dead[24:32] = False
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead])), impl
        assert bool(lse[:, :, dead].isneginf().all()) and bool(lse[:, :, ~dead].isfinite().all()), impl


@pytest.mark.parametrize("impl", ["reference", *FAST])
def test_every_block_equals_dense_attention(impl):
    q, k, v = qkv()
    sel = everything_blocks(2, 1, 70, 70, 8, 8)
    dense = reference_attention(q, k, v, None, 0.3, return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl=impl, return_lse=True)
    assert close(out, dense[0]) and close(lse, dense[1])


def test_chunk_queries_are_bottom_right_aligned():
    q, k, v = qkv(lq=20, lk=70)
    sel = random_blocks(2, 2, 20, 70, 8, 8, p=0.6)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl="gather", return_lse=True)
    assert close(out, ref) and lse_close(lse, ref_lse)
    full = block_attend(q, k, v, everything_blocks(2, 1, 20, 70, 8, 8), 0.3, impl="gather")
    assert close(full, reference_attention(q, k, v, None, 0.3))


def test_key_bias_on_the_gather_path():
    q, k, v = qkv()
    sel = random_blocks(2, 2, 70, 70, 8, 8, p=0.7)
    bias = KeyBias(torch.tensor([[0], [3]]), torch.linspace(-1, 2, 6).view(1, 6, 1))
    ref = block_attend(q, k, v, sel, 0.3, impl="reference", bias=bias)
    assert close(block_attend(q, k, v, sel, 0.3, impl="gather", bias=bias), ref)
    assert close(block_attend(q, k, v, sel, 0.3, impl="auto", bias=bias), ref)  # auto leaves sdpa/flex out
    assert not close(ref, block_attend(q, k, v, sel, 0.3, impl="reference"))


@pytest.mark.parametrize("impl", ["reference", *FAST])
def test_padded_row_equals_the_row_alone(impl):
    q, k, v = qkv()
    pad = 13
    key_valid = torch.ones(2, 70, dtype=torch.bool)
    key_valid[0, :pad] = False
    sel = random_blocks(2, 2, 70, 70, 8, 8, p=0.5)
    out, lse = block_attend(q, k, v, sel, 0.3, impl=impl, key_valid=key_valid, return_lse=True)
    n = -(-(70 - pad) // 8)
    alone = Selection("blocks", sel.idx[:1, :, :n], None if sel.valid is None else sel.valid[:1, :, :n], block_q=8, block_k=8)
    a_out, a_lse = block_attend(q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], alone, 0.3, impl=impl, return_lse=True)
    same, same_lse = (torch.equal, torch.equal) if impl != "reference" else (close, lse_close)  # fast paths: bitwise
    assert same(out[0, :, pad:], a_out[0]) and same_lse(lse[0, :, pad:], a_lse[0])
    assert torch.equal(out[0, :, :pad], torch.zeros_like(out[0, :, :pad])) and bool(lse[0, :, :pad].isneginf().all())
    unpadded = block_attend(q[1:], k[1:], v[1:], Selection("blocks", sel.idx[1:], None if sel.valid is None else sel.valid[1:],
                                                            block_q=8, block_k=8), 0.3, impl=impl)
    assert same(out[1], unpadded[0])


def test_token_mask_holds_causality_padding_and_the_grid():
    sel = blocks_from_sets(torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), 4, 4)
    valid = torch.tensor([[False, False] + [True] * 10])
    m = token_mask(sel, 12, 12, valid)[0, 0]
    assert torch.equal(m, torch.ones(12, 12, dtype=torch.bool).tril() & valid[0][None, :] & valid[0][:, None])
    one = blocks_from_sets(torch.eye(3, dtype=torch.bool)[None, None], 4, 4)  # only the diagonal block
    m = token_mask(one, 12, 12, valid)[0, 0]
    assert bool(m[2, 2]) and not bool(m[6, 2]) and bool(m[6, 6])  # row 6 = real token 4: block 1 starts there


def test_merge_partials_equals_attention_over_the_union():
    q, k, v = qkv()
    allowed = torch.rand(2, 1, 70, 70, generator=torch.Generator().manual_seed(3)) < 0.5
    causal = torch.ones(70, 70, dtype=torch.bool).tril()
    m1, m2 = allowed & causal, ~allowed & causal
    p1 = reference_attention(q, k, v, m1, 0.3, return_lse=True)
    p2 = reference_attention(q, k, v, m2, 0.3, return_lse=True)
    live1, live2 = m1.any(-1), m2.any(-1)  # rows that saw no key in a part: output ignored
    p1 = (p1[0], p1[1].masked_fill(~live1, float("-inf")))
    p2 = (p2[0], p2[1].masked_fill(~live2, float("-inf")))
    out, lse = merge_partials([p1, p2])
    full = reference_attention(q, k, v, None, 0.3, return_lse=True)
    assert close(out, full[0]) and close(lse, full[1])
    with pytest.raises(ValueError):
        merge_partials([])


def test_errors_name_the_problem():
    q, k, v = qkv()
    sel = random_blocks(2, 2, 70, 70, 8, 8)
    with pytest.raises(ValueError, match="'blocks' selection"):
        block_attend(q, k, v, Selection.keys(torch.zeros(2, 1, 3, dtype=torch.long)), 0.3)
    with pytest.raises(ValueError, match="query blocks"):
        block_attend(q[:, :, :30], k, v, sel, 0.3)
    with pytest.raises(ValueError, match="heads"):
        block_attend(q, k, v, random_blocks(2, 4, 70, 70, 8, 8), 0.3)
    with pytest.raises(ValueError, match="executor"):
        block_attend(q, k, v, sel, 0.3, impl="fastest")
    with pytest.raises(ValueError, match="block_q == block_k"):
        block_attend(q, k, v, random_blocks(2, 2, 70, 70, 4, 8), 0.3, impl="sdpa")
    with pytest.raises(ValueError, match="key bias"):
        block_attend(q, k, v, sel, 0.3, impl="sdpa", bias=KeyBias(torch.zeros(2, 1, dtype=torch.long), torch.ones(1, 6, 1)))
    holes = torch.ones(2, 70, dtype=torch.bool)
    holes[0, 30] = False
    with pytest.raises(ValueError, match="left-padded"):
        block_attend(q, k, v, sel, 0.3, key_valid=holes)
    with pytest.raises(ValueError, match="block_q"):
        Selection("blocks", torch.zeros(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="token_mask"):
        sel.mask(70)


@pytest.mark.skipif(not flex_available("cpu"), reason="compiled FlexAttention needs a C++ compiler on CPU")
def test_compiled_flex_equals_reference_across_lengths_of_one_bucket():
    """One compile (tens of seconds on the first call), then a second length of the same bucket."""
    for lq, heads in ((70, 2), (61, 6)):
        q, k, v = qkv(lq=lq, lk=lq)
        sel = random_blocks(2, heads, lq, lq, 16, 16, p=0.5)
        ref = block_attend(q, k, v, sel, 0.3, impl="reference")
        assert close(block_attend(q, k, v, sel, 0.3, impl="flex"), ref)
    with pytest.raises(ValueError, match="log-sum-exp"):
        block_attend(q, k, v, sel, 0.3, impl="flex", return_lse=True)


# ---- HiP ------------------------------------------------------------------------------------------


def brute_force_hip(m, q, k):
    """HiP's tree search spelled out per row, head and query block, scoring every child directly."""
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    g, bs = hq // hkv, m.block
    nb = -(-length // bs)
    budget = m.budget if isinstance(m.budget, int) else max(1, round(m.budget * length))
    n_keep = min(nb, -(-budget // bs))
    sink, win = -(-m.n_sink // bs), -(-m.window // bs)
    heads = range(hq) if m.select_per == "query_head" else range(hkv)
    out = torch.zeros(b, len(heads), nb, nb, dtype=torch.bool)

    def score(bi, h, qb, centre):
        qheads = [h] if m.select_per == "query_head" else range(h * g, (h + 1) * g)
        rows = [min(qb * bs + r, length - 1) for r in range(0, bs, m.stride_q)]
        keys = [min(max(centre * bs + bs // 2 - m.rep_keys // 2 + j, 0), length - 1) for j in range(m.rep_keys)]
        best = -math.inf
        for qh in qheads:
            kh = qh // g
            best = max(best, float((q[bi, qh, rows].float() @ k[bi, kh, keys].float().T).max()))
        return best

    for bi in range(b):
        for hi, h in enumerate(heads):
            for i in range(nb):
                chosen = {j for j in range(nb) if j <= i and (j < sink or j > i - win)}
                if m.dense_tail and i >= (length - m.dense_tail) // bs:
                    out[bi, hi, i, : i + 1] = True
                    continue
                lo, hi_ = sink, max(i - win + 1, sink)
                n_cand = max(0, hi_ - lo)
                if n_cand <= n_keep:
                    chosen |= set(range(lo, hi_))
                elif n_keep:
                    nodes = [(lo + n_cand * n // n_keep, n_cand * (n + 1) // n_keep - n_cand * n // n_keep) for n in range(n_keep)]
                    while max(s for _, s in nodes) > 1:
                        kids = [(st, (sz + 1) // 2) for st, sz in nodes] + [(st + (sz + 1) // 2, sz - (sz + 1) // 2) for st, sz in nodes]
                        scored = [(-math.inf if sz == 0 else score(bi, h, i, min(st + (sz - 1) // 2, nb - 1)), -pos, pos)
                                  for pos, (st, sz) in enumerate(kids)]
                        keep = sorted(scored, reverse=True)[:n_keep]
                        nodes = [kids[pos] for _, _, pos in sorted(keep, key=lambda t: t[2])]
                    chosen |= {st for st, sz in nodes if sz > 0}
                out[bi, hi, i, sorted(chosen)] = True
    return out


@pytest.mark.parametrize(
    "config",
    [
        dict(budget=12, block=4, n_sink=4, window=4, stride_q=2, rep_keys=2, dense_tail=0),
        dict(budget=16, block=5, n_sink=0, window=11, stride_q=1, rep_keys=3, select_per="query_head", dense_tail=12),
        dict(budget=0.3, block=3, n_sink=7, window=3, stride_q=3, rep_keys=1, dense_tail=1),
        dict(budget=1, block=4, n_sink=4, window=4, stride_q=4, rep_keys=4, dense_tail=20),
    ],
)
def test_hip_tree_search_equals_brute_force(config):
    m = ts.methods.get("hip")(**config)
    q, k, _ = qkv(b=2, hq=6, hkv=2, lq=83, lk=83, seed=4)
    got, complete = m.choose(q, k)
    assert not complete
    assert torch.equal(got, brute_force_hip(m, q, k))


def test_hip_complete_when_the_budget_covers_every_block():
    m = ts.methods.get("hip")(budget=1000, block=8, dense_tail=0)
    q, k, _ = qkv()
    sets, complete = m.choose(q, k)
    assert complete and torch.equal(sets[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())


def test_hip_prefill_only_dense_layers_and_telemetry():
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 40, pad=6)
    method = ts.methods.get("hip").at_sparse_budget()
    tele = Telemetry(sample_queries=8)
    with torch.no_grad(), ts.sparsify(model, method, telemetry=tele) as s:
        model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert s.stats["sparse_calls"] == model.config.num_hidden_layers  # the prefill of every layer, no decode step
    density = [r["density"] for r in tele.records if r["selection"] == "blocks"]
    assert density and all(0 < x < 1 for d in density for x in d)
    late = ts.methods.get("hip")(budget=8, block=4, n_sink=4, window=4, dense_layers=1, dense_tail=4)
    with torch.no_grad(), ts.sparsify(model, late) as s:
        model(ids, attention_mask=mask, cache=s.new_cache())
    assert s.stats["sparse_calls"] == model.config.num_hidden_layers - 1


@pytest.mark.parametrize("heads", [1, 6])
def test_sdpa_in_bf16_is_one_call_close_to_the_reference(heads):
    q, k, v = qkv(dtype=torch.bfloat16)
    sel = random_blocks(2, heads, 70, 70, 8, 8)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl="sdpa", return_lse=True)
    assert out.dtype == torch.bfloat16 and close(out, ref, 2e-2) and lse_close(lse, ref_lse, 2e-2)


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 1], ids=["one-call-per-width", "one-call-per-query-block"])
@pytest.mark.parametrize("impl", FAST)
def test_query_blocks_of_very_different_widths_run_in_groups(impl, chunk_bytes, monkeypatch):
    """A few query blocks read every earlier block (HiP's dense tail), the others a handful: the
    executors group query blocks by width instead of padding all to the widest."""
    from tokensparse.engine import blocks
    from tokensparse.engine.blocks import width_groups

    monkeypatch.setattr(blocks, "SDPA_CHUNK_BYTES", chunk_bytes)
    q, k, v = qkv(b=1, lq=300, lk=300)
    nb = 75
    sets = torch.zeros(1, 2, nb, nb, dtype=torch.bool)
    i = torch.arange(nb)
    sets[:, :, :, 0] = True
    sets[:, :, i, i] = True
    sets[:, 1, i, (i * 7) % nb] = True
    sets[:, :, -3:] = True  # the tail reads everything
    groups = width_groups(sets & (i[None, :] <= i[:, None]))
    assert len(groups) >= 3 and groups[-1][0] >= 72
    sel = blocks_from_sets(sets, 4, 4)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl=impl, return_lse=True)
    assert close(out, ref) and lse_close(lse, ref_lse)
    if impl == "sdpa":  # bf16: the one-call path, grouped the same way
        qb, kb, vb = (x.bfloat16() for x in (q, k, v))
        ref_b = block_attend(qb, kb, vb, sel, 0.3, impl="reference")
        assert close(block_attend(qb, kb, vb, sel, 0.3, impl="sdpa"), ref_b, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_runs_heads_of_different_widths_as_units(dtype, monkeypatch):
    """Heads (and rows) of one query block that read different numbers of blocks (a mass threshold
    per head) take the per-unit path, which pads nobody; equal ones keep the folded-heads path.
    Both equal the reference."""
    from tokensparse.engine import blocks

    calls = []
    real = blocks._sdpa_units
    monkeypatch.setattr(blocks, "_sdpa_units", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(blocks, "SDPA_CHUNK_BYTES", 4096)  # several chunks per group
    q, k, v = qkv(dtype=dtype, lq=77, lk=77)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    uneven = random_blocks(2, 2, 77, 77, 7, 7, p=0.5, seed=3)
    uneven_sets = blocks._blockset(uneven.idx, uneven.valid, 11)
    uneven_sets[1, 0, 4, 4] = False  # a query block that skips its own block in one head only
    cases = [(blocks_from_sets(uneven_sets, 7, 7), True), (everything_blocks(2, 2, 77, 77, 7, 7), False)]
    for sel, units in cases:
        calls.clear()
        ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
        out, lse = block_attend(q, k, v, sel, 0.3, impl="sdpa", return_lse=True)
        assert bool(calls) == units
        assert out.dtype == dtype and close(out, ref, tol) and lse_close(lse, ref_lse, tol)


def test_flex_tiles_divide_the_blocks_on_cuda_and_are_left_to_inductor_on_cpu():
    from tokensparse.engine.blocks import flex_block_ok, flex_kernel_options

    assert flex_kernel_options("cpu", 64, 64) is None
    assert flex_kernel_options("cuda", 64, 64) == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert flex_kernel_options("cuda", 256, 128) == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert flex_kernel_options("cuda", 48, 32) == {"BLOCK_M": 16, "BLOCK_N": 32}
    assert flex_block_ok("cuda", 64, 16) and not flex_block_ok("cuda", 64, 8) and flex_block_ok("cpu", 3, 8)


def test_flex_counts_and_indices_list_each_rows_blocks_in_order_then_repeat_heads():
    from tokensparse.engine.blocks import _counts_and_indices

    g = torch.Generator().manual_seed(3)
    sel = torch.rand(2, 3, 5, 9, generator=g) < 0.4
    sel[0, 0, 0] = False  # a row with no block
    num, idx = _counts_and_indices(sel, repeat=2)
    assert num.dtype == idx.dtype == torch.int32 and idx.shape == (2, 6, 5, 9) and idx.is_contiguous()
    for b in range(2):
        for h in range(6):
            for i in range(5):
                want = sel[b, h // 2, i].nonzero().flatten().tolist()
                assert num[b, h, i] == len(want)
                assert idx[b, h, i, : len(want)].tolist() == want
                assert idx[b, h, i, len(want):].eq(0).all()


@pytest.mark.parametrize("length", [65, 71, 72])
@pytest.mark.parametrize("heads", [1, 2])
def test_sdpa_attends_a_partial_last_query_block_on_its_real_rows_only(length, heads, monkeypatch):
    """A dense tail (the last query blocks read every key, as DHSA's and BiFormer's instruction
    tails do) over a prompt whose last query block is partial: that block runs as one kernel call
    on its real rows and keys (not ``bs`` rows, most of them filler), equal to the reference."""
    from tokensparse.engine import blocks

    shapes = []
    real = blocks._flash_cpu
    monkeypatch.setattr(blocks, "_flash_cpu", lambda q, k, v, *a, **kw: shapes.append((q.shape[-2], k.shape[-2])) or real(q, k, v, *a, **kw))
    q, k, v = qkv(b=2, hq=6, hkv=2, lq=length, lk=length)
    nb, bs = -(-length // 8), 8
    sets = torch.zeros(2, heads, nb, nb, dtype=torch.bool)
    i = torch.arange(nb)
    sets[..., 0] = True
    sets[:, :, i, i] = True
    sets[:, :, i[1:], i[1:] - 1] = True
    sets[:, :, -2:] = True  # the dense tail
    sel = blocks_from_sets(sets, bs, bs)
    ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.3, impl="sdpa", return_lse=True)
    assert close(out, ref) and lse_close(lse, ref_lse)
    rows = length - (nb - 1) * bs  # real rows of the last query block
    g = 6 // (heads if heads > 1 else 2)  # query heads folded per selection head
    assert (g * rows, length) in shapes  # the last block: its real rows, every real key
    assert all(kl <= nb * bs for _, kl in shapes)
    if rows < bs:
        assert (g * bs, nb * bs) not in shapes  # no call over the filler rows and keys


def test_sdpa_on_a_cache_view_equals_the_contiguous_keys():
    """Keys and values that are a prefix of a longer buffer (the engine's cache) give exactly the
    output of the same keys made contiguous, at a length that is a whole number of blocks."""
    q, k, v = qkv(b=1, lq=64, lk=64)
    kbuf, vbuf = torch.randn(1, 2, 75, 16), torch.randn(1, 2, 75, 16)
    kbuf[:, :, :64], vbuf[:, :, :64] = k, v
    kview, vview = kbuf[:, :, :64], vbuf[:, :, :64]
    assert not kview.is_contiguous()
    for sel in (random_blocks(1, 2, 64, 64, 8, 8, p=0.5, seed=5), everything_blocks(1, 1, 64, 64, 8, 8)):  # units, groups
        out, lse = block_attend(q, kview, vview, sel, 0.3, impl="sdpa", return_lse=True)
        ref, ref_lse = block_attend(q, k, v, sel, 0.3, impl="sdpa", return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
