"""No host synchronisation in decode steps.

The detector (:mod:`tokensparse.engine.hostsync`) is checked first: each kind of synchronisation it
claims to catch is built and must be recorded (and harmless operations must not be), so the decode
checks below can fail. Then the decode steps of the fixed-budget decode methods (TokenSelect, Quest,
Landmark in one and two levels, TidalDecode, FASA with and without its re-rank, Recycled Attention
(fixed stride), RazorAttention's compensated cache, SpAtten's cascade, and the evictions of H2O,
TOVA and StreamingLLM at a fixed budget) and dense decode on the
engine's cache are run on a tiny model, after an untracked prefill, under :func:`accelerator_paths`
(the branches an accelerator takes: CPU-only fast paths off) and must record nothing beyond
:data:`ALLOWED`, each entry of which says why it stays. The CPU fast paths are checked to give the same logits and to be
the only extra reads on a CPU (:data:`CPU_FAST_PATHS`).
"""

import contextlib
import operator

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.hostsync import (
    HostSyncError, accelerator_paths, count_host_syncs, device_check, forbid_host_syncs, host_read_is_free,
)
from tokensparse.engine.selection import indices_from_mask, select_topk
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the detector ---------------------------------------------------------------------------------

x = torch.tensor([3, 1, 2])
f = torch.tensor(1.5)
b = torch.tensor(True)
m = torch.tensor([True, False, True])

SYNCS = {  # name -> (operation, kind)
    "bool": (lambda: bool(b), "read"),
    "if": (lambda: 1 if b else 0, "read"),
    "if any": (lambda: 1 if (x > 2).any() else 0, "read"),
    "int": (lambda: int(x[0]), "read"),
    "float": (lambda: float(f), "read"),
    "index": (lambda: [0, 1, 2, 3][x[0]], "read"),
    "range": (lambda: range(x[1]), "read"),
    "operator.index": (lambda: operator.index(x[0]), "read"),
    "item": (lambda: x[0].item(), "read"),
    "tolist": (lambda: x.tolist(), "read"),
    "numpy": (lambda: x.numpy(), "read"),
    "cpu": (lambda: x.cpu(), "read"),
    "equal": (lambda: torch.equal(x, x), "read"),
    "format": (lambda: f"{f:.2f}", "read"),
    "complex": (lambda: complex(f), "read"),
    "repr": (lambda: repr(x), "read"),
    "contains": (lambda: 1 in x, "read"),
    "repeat_interleave(1-element tensor)": (lambda: x.repeat_interleave(torch.tensor(2)), "read"),
    "max of two": (lambda: max(x[0], x[1]), "read"),
    "0-dim index": (lambda: x[x[1]], "read"),
    "tensor slice": (lambda: x[: x[1]], "read"),
    "nonzero": (lambda: x.nonzero(), "shape"),
    "nonzero tuple": (lambda: torch.nonzero(x, as_tuple=True), "shape"),
    "argwhere": (lambda: torch.argwhere(x), "shape"),
    "where(cond)": (lambda: torch.where(m), "shape"),
    "masked_select": (lambda: x.masked_select(m), "shape"),
    "unique": (lambda: torch.unique(x), "shape"),
    "unique_consecutive": (lambda: torch.unique_consecutive(x), "shape"),
    "bincount": (lambda: torch.bincount(x), "shape"),
    "bool-mask index": (lambda: x[m], "shape"),
    "bool-mask assign": (lambda: x.clone().__setitem__(m, 0), "shape"),
    "index_put_ mask": (lambda: x.clone().index_put_((m,), torch.tensor(0)), "shape"),
    "repeat_interleave(tensor)": (lambda: x.repeat_interleave(x), "shape"),
    "tensor(data, device)": (lambda: torch.tensor([1, 2], device=x.device), "h2d"),
    "as_tensor(int, device)": (lambda: torch.as_tensor(5, device=x.device), "h2d"),
    "asarray(list, device)": (lambda: torch.asarray([1, 2], device=x.device), "h2d"),
}

FREE = {  # operations that must not be recorded
    "arithmetic": lambda: (x + 1) * 2,
    "compare": lambda: x > 1,
    "full": lambda: torch.full((2, 3), 7, device=x.device),
    "arange": lambda: torch.arange(5, device=x.device),
    "shape": lambda: (x.shape[0], len(x), x.numel(), x.dim()),
    "slice": lambda: x[1:3],
    "int index": lambda: x[1],
    "long-tensor index": lambda: x[torch.tensor([0, 2])],
    "where(c, a, b)": lambda: torch.where(m, x, 0),
    "masked_fill": lambda: x.masked_fill(m, 0),
    "repeat_interleave(int)": lambda: x.repeat_interleave(2),
    "repeat_interleave(tensor, output_size)": lambda: x.repeat_interleave(x, output_size=6),
    "topk": lambda: x.float().topk(2),
    "to same device": lambda: x.to(x.device),
    "as_tensor(tensor)": lambda: torch.as_tensor(x, device=x.device),
    "tensor(data) on the host": lambda: torch.tensor([1, 2]),
    "assert_async": lambda: torch._assert_async(b),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_detector_records_each_kind_of_synchronisation(name):
    fn, kind = SYNCS[name]
    with count_host_syncs() as log:
        fn()
    assert len(log) >= 1, f"{name}: not recorded"
    assert {e.kind for e in log} == {kind}, log.report()
    assert all("test_hostsync.py" in e.origin for e in log), log.report()  # the line that synchronised


def test_detector_records_a_copy_to_the_host_from_another_device():
    """``.to("cpu")`` of a tensor on another device (a meta tensor stands in for an accelerator here:
    the copy itself then fails, after the mode recorded it); ``.to`` within the CPU is free."""
    with count_host_syncs() as log:
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.ones(2, device="meta").to("cpu")
        x.to("cpu")
    assert [(e.kind, e.op) for e in log] == [("read", "to")], log.report()


@pytest.mark.parametrize("name", list(FREE))
def test_detector_leaves_device_side_work_alone(name):
    with count_host_syncs() as log:
        FREE[name]()
    assert len(log) == 0, log.report()


def test_forbid_raises_at_the_first_synchronisation_and_names_it():
    with forbid_host_syncs():
        y = x * 2  # fine
    with pytest.raises(HostSyncError, match=r"read .*__int__.*test_hostsync.py:\d+"):
        with forbid_host_syncs():
            int(y[0])


def test_a_synchronisation_inside_tokensparse_is_located_there():
    with count_host_syncs() as log:
        indices_from_mask(torch.tensor([[True, False, True]]))  # no k: the width is read (int(...))
    (event,) = log.events
    assert event.kind == "read" and event.site.startswith("tokensparse/engine/selection.py:")
    assert event.site.endswith("in indices_from_mask")
    assert "indices_from_mask" in log.report()


def test_accelerator_paths_switch_the_cpu_fast_paths_off():
    assert host_read_is_free(x)
    with accelerator_paths():
        assert not host_read_is_free(x)
        with accelerator_paths():
            pass
        assert not host_read_is_free(x)
    assert host_read_is_free(x)


def test_device_check_reads_on_a_cpu_and_asserts_on_the_device_elsewhere():
    device_check(torch.tensor(True), "fine")
    with pytest.raises(IndexError, match="bad rows"):
        device_check(torch.tensor(False), "bad rows", IndexError)
    with accelerator_paths(), count_host_syncs() as log:
        device_check(torch.tensor(True), "fine")
        with pytest.raises(RuntimeError, match="bad rows"):  # torch._assert_async (CPU kernel here)
            device_check(torch.tensor(False), "bad rows", IndexError)
    assert len(log) == 0, log.report()


def test_select_topk_without_its_cpu_fast_path_takes_the_same_keys():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        # ties at the k-th value or none; -inf; NaN (the CPU path hands those to the keys)
        scores = torch.randint(0, 4 if trial % 2 else 1000, (2, 3, 50), generator=g).float()
        if trial % 3 == 0:
            scores[0, 1, trial % 50] = float("-inf")
        if trial % 10 == 9:
            scores[1, 2, 7] = float("nan")
        k = 1 + trial % 20
        fast, _ = select_topk(scores, k)
        with accelerator_paths(), count_host_syncs() as log:
            keys, _ = select_topk(scores, k)
        assert torch.equal(fast, keys)
        assert len(log) == 0, log.report()


def test_select_topk_long_rows_take_the_same_keys_as_the_accelerator_path(monkeypatch):
    """Rows long enough for the CPU's block shortlist (``PREFILTER_MIN_LEN``): the same set as the
    order keys with and without per-row counts, fp32 and bf16, ties, -inf runs and NaN."""
    from tokensparse.engine import selection

    answered = []
    real = selection._topk_prefiltered

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(selection, "_topk_prefiltered", spy)
    g = torch.Generator().manual_seed(2)
    length = 2 * selection.PREFILTER_MIN_LEN + 37  # long enough with and without counts
    for trial in range(12):
        if trial % 3 == 0:  # few distinct values: the k-th ties across many blocks
            scores = torch.randint(0, 5, (2, 3, length), generator=g).float()
        else:
            scores = torch.randn(2, 3, length, generator=g)
        if trial % 4 == 1:
            scores[1, :, : length // 2] = float("-inf")  # fewer finite scores than most of k
        if trial % 6 == 5:
            scores[0, 2, 11] = float("nan")
        if trial % 5 == 2:
            scores = scores.bfloat16()
        k = [1, 7, 300, 511, length // 8, length - 1][trial % 6]
        counts = None if trial % 2 else torch.randint(0, k + 1, (2, 3, 1), generator=g)
        fast, fast_valid = select_topk(scores, k, counts)
        with accelerator_paths():
            keys, keys_valid = select_topk(scores, k, counts)
        assert torch.equal(fast, keys), trial
        assert (fast_valid is None) == (keys_valid is None) and (fast_valid is None or torch.equal(fast_valid, keys_valid))
    assert sum(answered) >= 6, answered  # the shortlist answered (not only declined)


def test_select_topk_cpu_path_resolves_ties_itself():
    """The CPU path answers tied k-th values without the keys (earliest tied positions), and
    leaves NaN to them."""
    from tokensparse.engine.selection import _topk_by_threshold

    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        scores = torch.randint(0, 3, (2, 3, 40), generator=g).float()
        scores[0, 0, :5] = float("-inf")
        k = 2 + trial
        fast = _topk_by_threshold(scores, k)
        assert fast is not None
        with accelerator_paths():
            keys, _ = select_topk(scores, k)
        assert torch.equal(fast, keys)
    scores[1, 1, 3] = float("nan")
    assert _topk_by_threshold(scores, 4) is None


def test_session_counts_device_values_without_reading_them():
    model = tiny_model("llama", num_hidden_layers=1)
    with ts.sparsify(model, ts.methods.get("quest")()) as s:
        with accelerator_paths(), count_host_syncs() as log:
            s.count("a", torch.tensor(2))
            s.count("a", torch.tensor(3))
            s.count("a", 1)
            s.count("b", torch.tensor(0.25))
            s.count("b", torch.tensor(0.5, dtype=torch.float64))
        assert len(log) == 0, log.report()
        assert s.stats["a"] == 6 and isinstance(s.stats["a"], int)
        assert s.stats["b"] == 0.75 and isinstance(s.stats["b"], float)
        with pytest.raises(ValueError, match="0-dim"):
            s.count("c", torch.ones(2))
        s.count("d", torch.tensor(4))  # on a CPU: read at once
        assert not s._pending and s.stats["d"] == 4


# ---- decode steps ---------------------------------------------------------------------------------

#: what a tracked decode step may still synchronise, and why: ``(origin contains, at most per step,
#: reason)``. An entry names code tokensparse does not own or a documented per-step choice.
ALLOWED = [
    ("transformers/masking_utils.py", 1,
     "transformers' _ignore_causal_mask_sdpa reads the 2D attention mask (fast_all) once per forward pass to "
     "decide whether SDPA may run without a mask; transformers' code, present in stock dense decode too. "
     "A decode call without attention_mask has none (test_unpadded_decode_without_a_mask_never_synchronises)."),
]

#: the reads a decode step makes on a CPU only (``host_read_is_free``): free there, replaced by
#: branch-free code or device-side assertions on an accelerator
CPU_FAST_PATHS = {
    "tokensparse/engine/integration.py": "_mark_padding: is this call's token real (right padding; device_check)",
    "tokensparse/engine/selection.py": "select_topk: float top-ks (a block-maxima shortlist on long rows), ties at the k-th value resolved by position (nonzero)",
    "tokensparse/engine/cache.py": "_check_rows: keep() indices in range (device_check: asserted on CUDA)",
    "tokensparse/engine/session.py": "count: a device count read at once (summed on the device elsewhere)",
}

M = ts.methods.get
DECODE = {
    "dense": lambda: None,
    "token_select": lambda: M("token_select")(budget=24, n_sink=2, n_local=6),
    "token_select_share_kv_head": lambda: M("token_select")(budget=0.5, n_sink=2, n_local=6, pool_kernel=3,
                                                            select_per="kv_head"),
    "quest": lambda: M("quest")(budget=16, page=4, dense_layers=1),
    "landmark": lambda: M("landmark")(budget=12, block=2),
    "landmark_two_level": lambda: M("landmark")(budget=8, block=2, coarse=2, widen=1.0),
    "landmark_bf16_means": lambda: M("landmark")(budget=12, block=2, summary_dtype="bfloat16"),
    "tidal_decode": lambda: M("tidal_decode")(budget=12, selection_layers=[1]),
    "tidal_decode_share": lambda: M("tidal_decode")(budget=0.3, selection_layers=[1]),
    "fasa": lambda: M("fasa")(budget=10, chunks=2, fcs="low", dense_layers=1),
    "fasa_share_rerank": lambda: M("fasa")(budget=0.3, chunks=1, fcs="low", dense_layers=0, rerank=2),
    "fasa_share_head_top": lambda: M("fasa")(budget=0.3, chunks=1, fcs="low", dense_layers=0, head_top=0.34),
    "fasa_share_zscore": lambda: M("fasa")(budget=0.3, chunks=1, fcs="low", dense_layers=0, head_scale="zscore"),
    "recycled_attention": lambda: M("recycled_attention")(budget=16, stride=2, n_sink=2, n_local=2, pool_kernel=3),
    "recycled_attention_share": lambda: M("recycled_attention")(budget=0.4, stride=3, n_sink=1, n_local=1),
    "razor_attention": lambda: M("razor_attention")(window=4, n_sink=2, retrieval_heads=[1]),
    "h2o": lambda: M("h2o")(budget=16, window=4),
    "h2o_share": lambda: M("h2o")(budget=0.5, window=0.3),
    "tova": lambda: M("tova")(budget=16),
    "tova_share": lambda: M("tova")(budget=0.6),
    "spatten": lambda: M("spatten")(budget=10, budget_first=20, dense_layers=1, n_local=2, prompt_window=4),
    "spatten_share_heads": lambda: M("spatten")(budget=0.3, budget_first=0.6, dense_layers=0, n_local=2,
                                                prompt_window=4, head_prune=0.5, quant="int4"),
    "streaming_llm": lambda: M("streaming_llm")(budget=20, n_sink=2),
    "streaming_llm_share": lambda: M("streaming_llm")(budget=0.5, n_sink=2),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


def _decode(model, method, batch, pad, steps, accelerator, with_mask=True, length=40):
    """Prefill (untracked), then ``steps`` decode steps each under count_host_syncs: the logs, the
    logits of every step and the session's stats."""
    ids, mask = tiny_inputs(batch, length, pad=pad)
    with torch.no_grad(), (ts.sparsify(model, method) if method is not None else contextlib.nullcontext()) as s:
        cache = s.new_cache() if method is not None else ts.KVCache(model)
        out = model(ids, attention_mask=mask, cache=cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        logs, logits = [], []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            kw = dict(attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1) if with_mask else {}
            with accelerator_paths() if accelerator else contextlib.nullcontext(), count_host_syncs() as log:
                out = model(tok, cache=cache, **kw)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            logs.append(log)
            logits.append(out.logits)
        stats = dict(s.stats) if method is not None else {}
    return logs, torch.stack(logits), stats


def _unexplained(log, allowed):
    left = list(log.events)
    for origin, most, _ in allowed:
        hits = [e for e in left if origin in e.origin]
        assert len(hits) <= most, f"more than {most} allowed synchronisations at {origin}:\n{log.report()}"
        left = [e for e in left if e not in hits]
    return left


@pytest.mark.parametrize("batch,pad", [(1, 0), (2, 3)], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(DECODE))
def test_decode_steps_do_not_synchronise(model, name, batch, pad):
    logs, logits, stats = _decode(model, DECODE[name](), batch, pad, steps=4, accelerator=True)
    for step, log in enumerate(logs):
        left = _unexplained(log, ALLOWED)
        assert not left, f"{name} decode step {step}: host synchronisations\n{log.report()}"
    # the CPU takes its fast paths: same logits and stats, extra reads only at the documented sites
    cpu_logs, cpu_logits, cpu_stats = _decode(model, DECODE[name](), batch, pad, steps=4, accelerator=False)
    assert torch.equal(logits, cpu_logits)
    assert stats == pytest.approx(cpu_stats)  # (float counters: summed in another order)
    for log in cpu_logs:
        for e in _unexplained(log, ALLOWED):
            assert e.site.split(":")[0] in CPU_FAST_PATHS, f"{name}: undocumented CPU read\n{log.report()}"


def test_decode_steps_really_select(model):
    """The budgets above are sparse on a 40-token prompt: the zero-sync steps really ran the sparse
    executors and evictions (a dense fallback would pass the sync check trivially)."""
    for name in DECODE:
        if name == "dense":
            continue
        _, _, stats = _decode(model, DECODE[name](), 2, 3, steps=2, accelerator=True)
        assert stats.get("sparse_calls", 0) > 0, (name, stats)


def test_unpadded_decode_without_a_mask_never_synchronises(model):
    for name in DECODE:
        logs, _, _ = _decode(model, DECODE[name](), 1, 0, steps=3, accelerator=True, with_mask=False)
        for log in logs:
            assert len(log) == 0, f"{name}:\n{log.report()}"


def test_token_select_selection_cache_reads_one_similarity_per_layer():
    """The Selection Cache (``reuse_threshold``) decides on the host whether to skip the vote: its one
    documented read per layer and step; nothing else."""
    model = tiny_model("llama", num_hidden_layers=3)
    method = M("token_select")(budget=24, n_sink=2, n_local=6, reuse_threshold=0.5)
    logs, _, stats = _decode(model, method, 2, 3, steps=3, accelerator=True)
    assert stats.get("reuse", 0) + stats["select"] == 3 * 3
    for log in logs[1:]:  # from the second step on, a previous choice exists
        left = _unexplained(log, ALLOWED + [("methods/token_select.py", 3, "Selection Cache: skip the vote or not")])
        assert not left, log.report()


def test_padded_decode_after_an_untracked_batch_reorder_still_selects_correctly(model):
    """Rows moved by a device index with different padding: the cache drops its host record of the
    padding (``left_pad``) and the decode reads the device instead (synchronising), same results."""
    method = DECODE["token_select"]()
    ids, mask = tiny_inputs(2, 40, pad=3)
    outs = []
    for reorder in (False, True):
        with torch.no_grad(), ts.sparsify(model, method) as s:
            cache = s.new_cache()
            model(ids, attention_mask=mask, cache=cache)
            assert cache.layers[0].left_pad == (3, 0)
            if reorder:
                cache.reorder_cache(torch.tensor([0, 1]))
                assert cache.layers[0].left_pad is None
            step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            with count_host_syncs() as log:
                out = model(ids[:, -1:], attention_mask=step_mask, cache=cache, position_ids=step_mask.sum(-1, keepdim=True) - 1)
            outs.append(out.logits)
        if reorder:
            assert any("pipeline.py" in e.site or "selection.py" in e.site for e in log), log.report()
    assert torch.equal(outs[0], outs[1])


def test_streaming_llm_decode_evicts_in_place(model):
    """At a fixed budget a decode-time eviction drops one row a step: the cache keeps its buffers
    (same storage, same capacity) instead of allocating new ones every step."""
    method = DECODE["streaming_llm"]()
    ids, mask = tiny_inputs(1, 40)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        out = model(ids, cache=cache)
        layer = cache.layers[1]
        ptr, cap = layer._kbuf.data_ptr(), layer.capacity
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            out = model(tok, cache=cache)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            assert layer.n == 20 and layer.capacity == cap and layer._kbuf.data_ptr() == ptr
        assert layer.slots[0, 0].tolist() == [0, 1] + list(range(25, 43))
        assert not layer.has_empty_rows


def test_other_warnings_in_a_counted_block_are_passed_on():
    import warnings

    with pytest.warns(UserWarning, match="not a sync"):
        with count_host_syncs() as log:
            warnings.warn("not a sync")
    assert len(log) == 0


@pytest.mark.parametrize("name", ["snapkv", "ada_kv", "pyramid_kv"])
def test_decode_after_a_prefill_eviction_does_not_synchronise(model, name):
    """Per-head prefill evictions leave a ragged or padded evicting cache; its decode writes know
    where they go on the host (a ragged layer counts its segments' room down between repacks)."""
    logs, logits, _ = _decode(model, M(name).at_sparse_budget(), 2, 3, steps=6, accelerator=True)
    for log in logs:
        assert not _unexplained(log, ALLOWED), f"{name}:\n{log.report()}"
    _, cpu_logits, _ = _decode(model, M(name).at_sparse_budget(), 2, 3, steps=6, accelerator=False)
    assert torch.equal(logits, cpu_logits)


def test_a_right_padded_decode_step_is_still_refused(model):
    """The decode-step padding check became a device_check: a ValueError on a CPU as before, a
    device-side assertion (RuntimeError, asynchronous on CUDA) on the accelerator path."""
    ids, mask = tiny_inputs(2, 20, pad=3)
    for accelerator, error in ((False, ValueError), (True, RuntimeError)):
        with torch.no_grad(), ts.sparsify(model, DECODE["token_select"]()) as s:
            cache = s.new_cache()
            model(ids, attention_mask=mask, cache=cache)
            step = torch.cat([mask, torch.tensor([[1], [0]])], 1)  # row 1's new token is padding
            with accelerator_paths() if accelerator else contextlib.nullcontext():
                with pytest.raises(error, match="right padding"):
                    model(ids[:, -1:], attention_mask=step, cache=cache)


def test_recycled_attention_query_drift_reads_one_decision_per_layer():
    """Recycled Attention's drift trigger (``similarity``) decides on the host whether a step is
    full: at most two reads per layer and step (all rows drifted? any?), nothing else while no row
    drifts (here: a threshold no query falls under). A step where only some rows drift reads more
    (the rows then hold sets of different steps: documented in the method)."""
    model = tiny_model("llama", num_hidden_layers=3)
    method = M("recycled_attention")(budget=16, stride=4, similarity=-0.5, n_sink=2, n_local=2)
    logs, _, stats = _decode(model, method, 2, 3, steps=4, accelerator=True)
    assert stats["recycle_steps"] == 3 * 3 and stats["full_steps"] == 3
    for log in logs:
        left = _unexplained(log, ALLOWED + [("methods/recycled_attention.py", 2 * 3, "drift: full step or not")])
        assert not left, log.report()
