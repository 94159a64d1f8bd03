"""Token Sparse Attention ∘ block-sparse (``token_sparse(inner=...)``, engine/compressed.py): the rows
are compressed, then a block router chooses key blocks on a grid over the compressed rows.

Checked: the executor against a token-level brute force (key ``j`` visible to query ``i`` iff both
are kept in the head, ``j <= i`` and ``j``'s compressed block is in the set of ``i``'s compressed
block; dense fp32 attention under that mask), per query head and per KV head, with filler entries
and left padding; at the inner method's full budget the composition equals plain Token Sparse; at
full coverage with a full inner budget it equals dense; a row of a padded batch equals the prompt
alone; config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import Method, exercise_sparse_paths
from tokensparse.engine.compressed import BlockRoute, compress_blocks_attend_scatter
from tokensparse.engine.executors import compress_attend_scatter
from tokensparse.engine.selection import KeyBias
from tokensparse.methods.token_sparse import INNERS
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TS = ts.methods.get("token_sparse")
SCALE = 0.3


def settings(method) -> dict:
    return {k: v for k, v in method.config_dict().items() if k != "method"}


def full_inner(name: str) -> dict:
    return settings(ts.methods.get(name).at_full_budget())


def sparse_inner(name: str) -> dict:
    return settings(ts.methods.get(name).at_sparse_budget())


def composed(inner: str, inner_config: dict, **kw) -> Method:
    base = dict(coverage=0.3, window=4, min_tokens=2, layers="all", pool_kernel=3)
    return TS(**{**base, **kw}, inner=inner, inner_config=inner_config)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def prefill(model, method, ids, mask):
    with torch.no_grad():
        if method is None:
            return model(ids, attention_mask=mask).logits
        with ts.sparsify(model, method) as s:
            return model(ids, attention_mask=mask, cache=s.new_cache()).logits


def generate(model, method, ids, mask, new=6):
    with torch.no_grad(), ts.sparsify(model, method) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return torch.stack(out.logits, 1), out.sequences


# ---- the executor against a token-level brute force -----------------------------------------------


def random_rows(b, h, length, seed, key_valid=None, ragged=False):
    """Sorted kept positions ``(B, H, n)`` per row and head (the last position always kept, as Token
    Sparse keeps its window), with filler entries (``valid`` False) at the end of rows that keep
    fewer when ``ragged``; padding (``key_valid`` False) is never kept."""
    g = torch.Generator().manual_seed(seed)
    counts = [int(torch.randint(length // 3, length // 2, (1,), generator=g)) for _ in range(b)]
    if not ragged:
        counts = [counts[0]] * b
    n = max(counts)
    idx = torch.zeros(b, h, n, dtype=torch.long)
    valid = torch.zeros(b, h, n, dtype=torch.bool)
    for r in range(b):
        real = torch.arange(length) if key_valid is None else key_valid[r].nonzero().flatten()
        c = min(counts[r], len(real))
        for j in range(h):
            pick = real[torch.randperm(len(real) - 1, generator=g)[: c - 1]].tolist() + [int(real[-1])]
            idx[r, j, :c] = torch.tensor(sorted(pick))
            idx[r, j, c:] = int(real[-1])  # filler repeats a kept position
            valid[r, j, :c] = True
    return idx, (None if bool(valid.all()) else valid)


def brute_force(q, k, v, idx, valid, inner, layer=0):
    """Token-level reference: per sequence, the compressed prompt built by loops, the inner method's
    own ``blockset`` on it, then dense fp32 attention under the token mask spelled out pair by pair."""
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    per_q = idx.shape[1] == hq
    out = torch.zeros(b, hq, length, v.shape[-1])
    for r in range(b):
        ok = torch.ones(idx.shape[1:], dtype=torch.bool) if valid is None else valid[r]
        pos = [idx[r, j][ok[j]].tolist() for j in range(idx.shape[1])]  # kept positions of each selection head
        n = len(pos[0])
        qpos = [pos[h if per_q else h // g] for h in range(hq)]  # the rows of each query head
        qc = torch.stack([q[r, h, qpos[h]] for h in range(hq)])[None]
        if per_q:  # each query head its own copy of its KV head's kept rows
            kc = torch.stack([k[r, h // g, pos[h]] for h in range(hq)])[None]
        else:
            kc = torch.stack([k[r, j, pos[j]] for j in range(hkv)])[None]
        choice = inner.blockset(qc, kc, layer)
        sets = None if choice is None else choice[0][0]
        block = inner.block
        for h in range(hq):
            sh = h if sets is None or sets.shape[0] == hq else h // (hq // sets.shape[0])
            kv = h // g
            for a in range(n):  # compressed query a at position qpos[h][a]
                keys = []
                for c in range(a + 1):
                    if sets is None or bool(sets[sh, a // block, c // block]):
                        keys.append(qpos[h][c])
                s = (q[r, h, qpos[h][a]].double() @ k[r, kv, keys].double().T) * SCALE
                out[r, h, qpos[h][a]] = (torch.softmax(s, -1) @ v[r, kv, keys].double()).float()
    return out


def qkv(b, hq, hkv, length, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g),
            torch.randn(b, hkv, length, d, generator=g))


def route_of(inner, layer=0):
    return BlockRoute(lambda q, k: inner.blockset(q, k, layer), inner.block, getattr(inner, "impl", "auto"), inner.name)


INNER_CASES = {
    "biformer": ts.methods.get("biformer")(budget=0.4, block=4, n_sink=4, window=4, dense_layers=0, dense_tail=0),
    "xattention": ts.methods.get("xattention")(threshold=0.6, stride=2, block=4, dense_layers=0, dense_tail=0),
    "hip": ts.methods.get("hip")(budget=8, block=4, n_sink=4, window=4, stride_q=2, rep_keys=2, dense_layers=0,
                                 dense_tail=0),
    "hip-per-query-head": ts.methods.get("hip")(budget=8, block=4, n_sink=4, window=4, stride_q=2, rep_keys=2,
                                                dense_layers=0, dense_tail=0, select_per="query_head"),
}


@pytest.mark.parametrize("inner", list(INNER_CASES))
@pytest.mark.parametrize("per", ["query_head", "kv_head"])
@pytest.mark.parametrize("case", ["unpadded", "ragged", "padded"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_executor_matches_the_token_level_brute_force(inner, per, case, impl):
    method = INNER_CASES[inner]
    b, hq, hkv, length = 2, 4, 2, 61
    q, k, v = qkv(b, hq, hkv, length, seed=len(inner) + length)
    key_valid = None
    if case == "padded":
        key_valid = torch.ones(b, length, dtype=torch.bool)
        key_valid[0, :9] = False
    idx, valid = random_rows(b, hq if per == "query_head" else hkv, length, seed=3, key_valid=key_valid,
                             ragged=case != "unpadded")
    if case == "ragged":
        assert valid is not None
    got = compress_blocks_attend_scatter(q, k, v, idx, route_of(method), SCALE, key_valid, impl=impl, valid=valid)
    want = brute_force(q, k, v, idx, valid, method)
    assert max_diff(got, want) < 1e-5
    # the choice is really sparse on this input (else the check would only test dense attention)
    plain = compress_attend_scatter(q, k, v, idx, SCALE, key_valid, valid=valid)
    assert max_diff(got, plain) > 1e-3


def test_a_declined_or_complete_choice_is_the_plain_executor_bit_for_bit():
    q, k, v = qkv(2, 4, 2, 30)
    idx, _ = random_rows(2, 4, 30, seed=1)
    plain = compress_attend_scatter(q, k, v, idx, SCALE)
    declined = BlockRoute(lambda q_, k_: None, 4)
    assert torch.equal(compress_blocks_attend_scatter(q, k, v, idx, declined, SCALE), plain)
    full = ts.methods.get("biformer").at_full_budget()
    assert torch.equal(compress_blocks_attend_scatter(q, k, v, idx, route_of(full), SCALE), plain)
    forced = compress_blocks_attend_scatter(q, k, v, idx, route_of(full), SCALE, forced=True)
    assert max_diff(forced, plain) < 1e-5


def test_executor_refusals():
    q, k, v = qkv(1, 4, 2, 20)
    idx, _ = random_rows(1, 4, 20, seed=2)
    route = route_of(INNER_CASES["biformer"])
    with pytest.raises(ValueError, match="no key bias"):
        compress_blocks_attend_scatter(q, k, v, idx, route, SCALE, bias=KeyBias(torch.zeros(1, 1, dtype=torch.long),
                                                                                torch.ones(1, 4, 1)))
    valid = torch.ones_like(idx, dtype=torch.bool)
    valid[0, 0, -1] = False  # a filler slot in one head only
    with pytest.raises(ValueError, match="same filler slots"):
        compress_blocks_attend_scatter(q, k, v, idx, route, SCALE, valid=valid)
    key_valid = torch.ones(1, 20, dtype=torch.bool)
    key_valid[0, : int(idx.max())] = False  # kept positions on padding
    with pytest.raises(ValueError, match="padding"):
        compress_blocks_attend_scatter(q, k, v, idx, route, SCALE, key_valid)
    with pytest.raises(ValueError, match="Lq == Lk"):
        compress_blocks_attend_scatter(q[:, :, :5], k, v, idx, route, SCALE)


# ---- the method on a model ------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("per", ["query_head", "kv_head"])
def test_full_inner_budget_equals_plain_token_sparse(model, inner, per):
    ids, mask = tiny_inputs(2, 40, pad=6, seed=3)
    plain = TS(coverage=0.3, window=4, min_tokens=2, layers="all", pool_kernel=3, select_per=per)
    comp = composed(inner, full_inner(inner), select_per=per)
    live = mask[..., None].bool()
    want = prefill(model, plain, ids, mask)
    assert torch.equal(prefill(model, comp, ids, mask).masked_fill(~live, 0), want.masked_fill(~live, 0))
    with exercise_sparse_paths():  # the block executor on the complete choice
        assert max_diff(prefill(model, comp, ids, mask), want, live.expand_as(want)) <= TOLERANCE[torch.float32]
    dense = prefill(model, None, ids, mask)
    assert max_diff(want, dense, live.expand_as(want)) > 1e-3, "token_sparse did not act"


@pytest.mark.parametrize("inner", INNERS)
def test_full_coverage_and_full_inner_budget_equal_dense(model, inner):
    ids, mask = tiny_inputs(2, 40, pad=6, seed=5)
    method = TS(coverage=0.0, layers="all", min_tokens=0, window=4, inner=inner, inner_config=full_inner(inner))
    dense = prefill(model, None, ids, mask)
    live = mask[..., None].bool().expand_as(dense)
    assert max_diff(prefill(model, method, ids, mask), dense, live) <= TOLERANCE[torch.float32]
    with exercise_sparse_paths():
        assert max_diff(prefill(model, method, ids, mask), dense, live) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("per", ["query_head", "kv_head"])
def test_padded_row_equals_the_prompt_alone(model, inner, per):
    pad = 6
    ids, mask = tiny_inputs(2, 30, pad=pad, seed=3)
    method = composed(inner, sparse_inner(inner), select_per=per)
    logits, seq = generate(model, method, ids, mask)
    for row, start in ((0, pad), (1, 0)):
        alone_ids = ids[row : row + 1, start:]
        alone_logits, alone_seq = generate(model, method, alone_ids, torch.ones_like(alone_ids))
        assert torch.equal(seq[row, ids.shape[1] :], alone_seq[0, alone_ids.shape[1] :]), f"row {row}"
        assert max_diff(logits[row], alone_logits[0]) <= TOLERANCE[torch.float32], f"row {row}"
    plain = TS(coverage=0.3, window=4, min_tokens=2, layers="all", pool_kernel=3, select_per=per)
    plain_logits, _ = generate(model, plain, ids, mask)
    assert max_diff(logits, plain_logits) > 1e-3, "the inner method did not act"


def test_short_prompt_routes_every_row(model):
    """Where Token Sparse keeps every row (here min_tokens covers the prompt) the inner router still
    runs over all of them, so a short row of a padded batch equals the prompt alone."""
    ids, mask = tiny_inputs(2, 30, pad=14, seed=2)
    method = composed("biformer", sparse_inner("biformer"), min_tokens=14)  # row 0 (16 real) is short
    batched = prefill(model, method, ids, mask)
    alone = {}
    for row, start in ((0, 14), (1, 0)):
        alone[row] = prefill(model, method, ids[row : row + 1, start:], mask[row : row + 1, start:])
        assert max_diff(batched[row, start:], alone[row][0]) <= TOLERANCE[torch.float32]
    plain_short = prefill(model, TS(coverage=0.3, window=4, min_tokens=14, layers="all", pool_kernel=3),
                          ids[:1, 14:], mask[:1, 14:])
    assert max_diff(plain_short, prefill(model, None, ids[:1, 14:], mask[:1, 14:])) < 1e-5  # plain: dense
    assert max_diff(alone[0], plain_short) > 1e-3  # composed: BiFormer over every row


# ---- config ---------------------------------------------------------------------------------------------


def test_config_errors_name_the_inner_method():
    with pytest.raises(ValueError, match=r"inner must be one of 'biformer', 'hip', 'xattention' or None, got 'nope'"):
        TS(inner="nope")
    with pytest.raises(ValueError, match=r"inner must be one of .* got 'snapkv'"):  # registered, not a block router
        TS(inner="snapkv")
    with pytest.raises(ValueError, match="inner_config must be None without an inner method"):
        TS(inner_config={"budget": 0.25})
    with pytest.raises(TypeError, match="inner_config must be settings of biformer"):
        TS(inner="biformer", inner_config={"no_such_field": 1})
    with pytest.raises(ValueError, match="inner_config must be settings of xattention"):
        TS(inner="xattention", inner_config={"threshold": 2.0})


def test_inner_names_are_exactly_the_block_routers():
    routers = {name for name in ts.methods.names() if ts.methods.get(name).block_router}
    assert set(INNERS) == routers, "token_sparse.INNERS must list every block router (block_router = True)"
    for name in routers:
        cls = ts.methods.get(name)
        assert "block" in {f.name for f in dataclasses.fields(cls)}, name
        assert cls.blockset is not Method.blockset, name


def test_stored_keys_do_not_change_without_inner():
    assert "inner" not in TS().config_dict() and "inner_config" not in TS().config_dict()
    cfg = TS(inner="biformer").config_dict()
    assert cfg["inner"] == "biformer" and "inner_config" not in cfg  # at its default: left out
