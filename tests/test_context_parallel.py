"""Context-parallel prefill (tokensparse.engine.context_parallel): ranks on gloo equal one process.

The multi-rank tests spawn real processes (``torch.multiprocessing``, gloo on CPU): one spawn per
world size runs every variant, so the whole file takes ~30 s on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokensparse as ts

from tokensparse.engine.blocks import block_attend, blocks_from_sets, pool_blocks
from tokensparse.engine.context_parallel import BlockSparsity, ContextParallel, context_parallel, launch
from tokensparse.testing import max_diff, tiny_inputs, tiny_model

LENGTH = 200
VARIANTS = {
    "dense": None,
    "full": BlockSparsity(density=1.0, block=16),
    "sparse": BlockSparsity(density=0.3, block=16),
    # a registered block-routing method: a dense first layer, a dense tail, sinks and a window
    "biformer": ts.methods.get("biformer")(budget=0.3, block=16, n_sink=16, window=32, dense_layers=1, dense_tail=24),
}


def _rank_run(rank, world, family):
    """One rank: every variant's chunk logits, last logits, a decode step on the gathered cache."""
    model = tiny_model(family)
    ids, _ = tiny_inputs(2, LENGTH)
    out = {}
    for name, sparsity in VARIANTS.items():
        with context_parallel(model, sparsity=sparsity) as run:
            res = run.prefill(ids)
            cache = run.gather_cache(res)
            last = run.last_logits(res)
        step = model(input_ids=torch.full((2, 1), 5), cache=cache).logits
        out[name] = dict(logits=res.logits, start=res.start, end=res.end, last=last, step=step,
                         stats=res.stats.as_dict())
    return out


@torch.no_grad()
def _single(family):
    """The single-process results the ranks must reproduce: HF's own attention for the dense
    variants, the same code on one rank for the block-sparse one."""
    torch.set_num_threads(1)
    model = tiny_model(family)
    ids, _ = tiny_inputs(2, LENGTH)
    dense = model(input_ids=ids, use_cache=True)
    step = model(input_ids=torch.full((2, 1), 5), cache=dense.cache).logits
    ref = {"dense": (dense.logits, step), "full": (dense.logits, step)}
    with context_parallel(model, sparsity=VARIANTS["sparse"]) as run:
        res = run.prefill(ids)
    sparse_step = model(input_ids=torch.full((2, 1), 5), cache=res.cache).logits
    ref["sparse"] = (res.logits, sparse_step)
    with ts.sparsify(model, VARIANTS["biformer"]) as session:  # the method itself, through the engine
        routed = model(input_ids=ids, use_cache=True)
        assert session.stats["sparse_calls"] > 0
    ref["biformer"] = (routed.logits, model(input_ids=torch.full((2, 1), 5), cache=routed.cache).logits)
    return ref


def _close(a, b):
    """fp32 agreement of two logits tensors: within 1e-5 of the logits' scale (the tiny random
    model's logits reach ~8; its own SDPA vs eager attention differ by the same order)."""
    return max_diff(a, b) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world):
    ranks = launch(_rank_run, world, "llama")
    ref = _single("llama")
    covered = []
    for rank, out in enumerate(ranks):
        for name, x in out.items():
            logits, step = ref[name]
            s, e = x["start"], x["end"]
            assert _close(x["logits"], logits[:, s:e]), (rank, name, max_diff(x["logits"], logits[:, s:e]))
            assert _close(x["last"], logits[:, -1]), (rank, name)
            assert _close(x["step"], step), (rank, name, max_diff(x["step"], step))  # the gathered cache decodes
            if name == "dense":
                covered.append((s, e))
    assert covered[0][0] == 0 and covered[-1][1] == LENGTH
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    # bytes: a dense chunk's K and V travel to every later rank, never back
    d = 16  # tiny head_dim
    for rank, out in enumerate(ranks):
        s, e = out["dense"]["start"], out["dense"]["end"]
        sent = out["dense"]["stats"]["bytes_sent"]
        # rank r forwards chunks 0..r to r+1 (the chunks r+1 still needs), K and V, 2 layers
        chunks = [ranks[c]["dense"]["end"] - ranks[c]["dense"]["start"] for c in range(rank + 1)]
        expect = 0 if rank == world - 1 else 2 * 2 * 2 * 2 * d * 4 * sum(chunks)
        assert sent == expect, (rank, sent, expect)
    # a sparse run reads fewer blocks than causal attention and never sends more than the dense one
    for out in ranks:
        st = out["sparse"]["stats"]
        assert st["blocks_read"] < st["blocks_causal"]
        assert st["bytes_sent"] <= out["full"]["stats"]["bytes_sent"]


def test_one_rank_full_density_is_dense_attention():
    for family in ("llama", "qwen3", "phi3"):
        model = tiny_model(family)
        ids, _ = tiny_inputs(1, 150)
        ref = model(input_ids=ids).logits
        for sparsity in (None, BlockSparsity(density=1.0, block=32), BlockSparsity(density=1.0, block=7)):
            with context_parallel(model, sparsity=sparsity) as run:
                got = run.prefill(ids).logits
            assert _close(got, ref), (family, sparsity, max_diff(got, ref))


def test_sparse_changes_the_output_and_restores_the_model():
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 150)
    ref = model(input_ids=ids).logits
    before = model.config._attn_implementation
    with context_parallel(model, sparsity=BlockSparsity(density=0.2, block=16)) as run:
        got = run.prefill(ids)
    assert model.config._attn_implementation == before
    assert max_diff(got.logits, ref) > 1e-3
    assert got.stats.blocks_read < got.stats.blocks_causal


def test_route_keeps_sinks_local_blocks_and_the_budget():
    torch.manual_seed(0)
    sp = BlockSparsity(density=0.3, block=4, sink_blocks=1, local_blocks=2)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)  # 6 query blocks starting at global block 5
    k = torch.randn(2, 2, 11, 8, dtype=torch.float64)
    chosen = sp.route(q, k, 5, layer_idx=0, length=44)
    assert chosen.shape == (2, 2, 6, 11)
    for i in range(6):
        g = 5 + i
        row = chosen[:, :, i]
        assert not row[..., g + 1:].any()  # causal
        assert row[..., 0].all() and row[..., g].all() and row[..., g - 1].all()  # sink, local
        assert (row.sum(-1) == max(math.ceil(0.3 * (g + 1)), 3)).all()
    # the chosen others are the best-scoring ones
    s = (q.view(2, 2, 2, 6, 8) @ k[:, :, None].transpose(-1, -2)).amax(2)
    i, g = 5, 10
    others = [j for j in range(1, g - 1)]
    picked = [j for j in others if chosen[0, 0, i, j]]
    best = sorted(others, key=lambda j: -float(s[0, 0, i, j]))[: len(picked)]
    assert sorted(picked) == sorted(best)


def test_pool_blocks_with_a_partial_last_block():
    x = torch.arange(2 * 1 * 10 * 3, dtype=torch.float32).view(2, 1, 10, 3)
    p = pool_blocks(x, 4)
    assert p.shape == (2, 1, 3, 3)
    assert torch.allclose(p[:, :, 2], x[:, :, 8:].double().mean(2))
    assert torch.allclose(p[:, :, 0], x[:, :, :4].double().mean(2))


@pytest.mark.parametrize("impl", ["gather", "reference", "auto"])
def test_block_attend_query_start_places_queries_after_the_keys(impl):
    torch.manual_seed(1)
    q = torch.randn(1, 4, 20, 8)
    k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    sets = torch.rand(1, 2, 3, 2) > 0.3
    sets[..., 0] = True
    sel = blocks_from_sets(sets, 8, 8)
    out, lse = block_attend(q, k, v, sel, 0.35, impl=impl, return_lse=True, query_start=12)
    # oracle: every query sees every key of its chosen blocks
    allowed = sets.repeat_interleave(8, 2)[:, :, :20].repeat_interleave(8, 3)[..., :12]  # (1, 2, 20, 12)
    allowed = allowed.repeat_interleave(2, 1)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.35
    s = s.masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    assert max_diff(out, ref) < 1e-5
    assert max_diff(lse, torch.logsumexp(s, -1)) < 1e-5
    with pytest.raises(ValueError, match="query_start"):
        block_attend(q, k, v, sel, 0.35, impl="sdpa", query_start=12)


def test_errors():
    with pytest.raises(ValueError, match="density"):
        BlockSparsity(density=0)
    with pytest.raises(ValueError, match="local_blocks"):
        BlockSparsity(local_blocks=0)
    with pytest.raises(TypeError, match="BlockSparsity"):
        ContextParallel(tiny_model("llama"), sparsity={"density": 0.5})
    with pytest.raises(ValueError, match="sliding"):
        with context_parallel(tiny_model("gemma3_text")):
            pass
    with pytest.raises(ValueError, match="soft-capping"):
        with context_parallel(tiny_model("gemma2")):
            pass
    model = tiny_model("llama")
    ids, _ = tiny_inputs(1, 40)
    with context_parallel(model) as run:
        with pytest.raises(ValueError, match="batch, length"):
            run.prefill(ids[0])
        with pytest.raises(ValueError, match="use_cache=True"):
            run.gather_cache(run.prefill(ids, use_cache=False))
        first = run.prefill(ids)
        with pytest.raises(ValueError, match="empty cache"):  # a second chunk on the first one's cache
            run._bounds = [(0, 10)]
            try:
                run.attend(torch.randn(1, 4, 10, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16), 0.25)
            finally:
                run._bounds = None
        assert first.cache is not None
    with pytest.raises(RuntimeError, match="outside"):
        model.set_attn_implementation("tokensparse_cp")
        try:
            model(input_ids=ids)
        finally:
            model.set_attn_implementation("sdpa")
    two = ContextParallel.__new__(ContextParallel)
    two.sparsity, two.world = BlockSparsity(block=64), 4
    with pytest.raises(ValueError, match="too short"):
        two.bounds(150)
