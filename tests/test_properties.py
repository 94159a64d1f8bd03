"""Property-based tests (hypothesis) for every registered method and the selection helpers.

For each method in ``ts.methods.names()`` (a config strategy per method is required: a new method
without one fails :func:`test_every_method_has_a_strategy`), over random configs, prompt lengths
1..64, batch 1 or a batch of 2 with left padding on row 0, prefill / generate / chunked prefill,
on a tiny Llama and a tiny Qwen3 mixing sliding and global layers:

1. a config either fails at construction with ``ValueError``/``TypeError`` or runs, and the logits
   of every real (non-pad) position are finite;
2. every selection the method reports to the telemetry hook respects the invariants of
   :class:`~tokensparse.engine.telemetry.Selection` (indices in range, sorted, valid entries unique
   and never padding) and the method's documented ones (sinks, windows, budgets), counted over each
   row's real tokens;
3. ``select_topk`` / ``topk_sorted`` / ``indices_from_mask`` equal a brute-force reference, ties
   included.

All tests are derandomized (the same examples on every run) and keep no example database.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import tokensparse as ts
from tokensparse.engine import Telemetry, exercise_sparse_paths
from tokensparse.engine.selection import GQA_REDUCTIONS, indices_from_mask, select_topk, topk_sorted
from tokensparse.testing import MODEL_VARIANTS, tiny_inputs, tiny_model

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: a global-attention model and one mixing sliding (layer 0, run dense by the engine) and global layers
VARIANTS = ("llama", "qwen3-mixed-sw8")
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model_for(variant: str):
    if variant not in _MODELS:
        family, overrides = MODEL_VARIANTS[variant]
        _MODELS[variant] = tiny_model(family, **overrides)
    return _MODELS[variant]


# ---- config strategies, one per registered method ------------------------------------------------
# Mostly valid configs sized for 1..64-token prompts; a few are invalid on purpose (they must fail at
# construction with ValueError/TypeError). Budgets: an int, or a float share in (0, 1].

SHARES = st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1]), st.floats(0.01, 1.0))


@st.composite
def token_sparse_configs(draw):
    return dict(
        coverage=draw(st.one_of(st.sampled_from([0.0, 0.005, 0.3, 0.6, 0.95]), st.floats(0.0, 0.99))),
        window=draw(st.integers(1, 16)),
        pool_kernel=draw(st.integers(1, 7)),
        min_tokens=draw(st.integers(0, 24)),
        sink_tokens=draw(st.integers(0, 8)),
        select_per=draw(st.sampled_from(["query_head", "kv_head"])),
        gqa_reduce=draw(st.sampled_from(GQA_REDUCTIONS)),
        layers=draw(st.sampled_from(["all", "second_half", [0], [1], [0, 1]])),
        drift_quantile=draw(st.floats(0.0, 1.0)),
        score_chunk=draw(st.sampled_from([1, 3, 7, 8192])),  # small chunks take the two-pass path
    )


@st.composite
def token_select_configs(draw):
    n_sink = draw(st.integers(0, 6))
    n_local = draw(st.integers(1, 10))
    budget = draw(st.one_of(SHARES, st.integers(-1, 30).map(lambda extra: n_sink + n_local + extra)))
    return dict(
        budget=budget,
        n_sink=n_sink,
        n_local=n_local,
        pool_kernel=draw(st.integers(0, 5)),
        logit_scale=draw(st.sampled_from([1.0, None, 0.1])),
        select_per=draw(st.sampled_from(["layer", "kv_head"])),
        reuse_threshold=draw(st.sampled_from([None, -1.0, 0.5, 0.9, 1.0])),
        impl=draw(st.sampled_from(["fast", "reference"])),
        shadow=draw(st.sampled_from([None, None, "int8", "bf16"])),
    )


@st.composite
def snapkv_configs(draw):
    window = draw(st.integers(1, 12))
    budget = draw(st.one_of(SHARES, st.integers(-1, 40).map(lambda extra: window + extra)))
    return dict(
        budget=budget,
        window=window,
        pool_kernel=draw(st.integers(1, 7)),
        pool=draw(st.sampled_from(["max", "avg"])),
        gqa_reduce=draw(st.sampled_from(GQA_REDUCTIONS)),
        impl=draw(st.sampled_from(["fast", "reference"])),
    )


@st.composite
def tca_configs(draw):
    return dict(
        block=draw(st.integers(1, 8)),
        window=draw(st.integers(1, 12)),
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
        budgets="uniform",
        mu=draw(st.sampled_from([-1.0, 0.0, 1.0, 2.0, 5.0])),
        sigma=draw(st.sampled_from([0.5, 1.0, 2.0])),
        n_query=draw(st.integers(1, 4)),
    )


@st.composite
def pyramid_kv_configs(draw):
    return dict(**draw(snapkv_configs()), beta=draw(st.integers(1, 30)))


@st.composite
def ada_kv_configs(draw):
    return dict(**draw(snapkv_configs()), floor=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])))


@st.composite
def streaming_llm_configs(draw):
    n_sink = draw(st.integers(0, 6))
    budget = draw(st.one_of(SHARES, st.integers(0, 40).map(lambda extra: n_sink + extra)))
    return dict(budget=budget, n_sink=n_sink)


# ---- what a run records ----------------------------------------------------------------------------


@dataclass
class Record:
    """One observed selection with the facts of its call (tensors detached, on the CPU)."""

    call_kind: str
    layer: int
    q_len: int
    k_len: int
    n_kv_heads: int
    key_valid: torch.Tensor  # (B, Lk) bool
    key_rank: torch.Tensor  # (B, Lk) long, 1-based among real keys, 0 on padding
    n_real: torch.Tensor  # (B,) long
    kind: str
    idx: torch.Tensor | None  # (B, H, n)
    valid: torch.Tensor | None  # (B, H, n) bool, True everywhere when the method passed None
    slots: torch.Tensor | None  # (B, Hkv, Lk) absolute token index of each cache row, -1 empty
    seen: int | None  # tokens fed to the evicting cache so far (this call's included)


class Recorder(Telemetry):
    """Telemetry that also keeps every (call, selection) pair for the invariant checks."""

    def __init__(self):
        super().__init__(sample_queries=4)
        self.seen: list[Record] = []

    def observe(self, call, selection):
        super().observe(call, selection)  # the real telemetry must cope with every selection too
        b, lk = call.batch, call.k_len
        kv = call.key_valid
        kv = torch.ones(b, lk, dtype=torch.bool) if kv is None else kv.detach().cpu().clone()
        idx = valid = None
        if selection.kind == "blocks":  # (B, H, nQB, n) key-block indices, kept as they are
            idx = selection.idx.detach().cpu().clone()
            valid = torch.ones_like(idx, dtype=torch.bool) if selection.valid is None else selection.valid.detach().cpu().clone()
        elif selection.idx is not None:
            full, full_valid = selection.full_idx(call.k_len)  # sinks/window ranges listed too
            idx = full.detach().cpu().clone()
            valid = torch.ones_like(idx, dtype=torch.bool) if full_valid is None else full_valid.detach().cpu().clone()
        ev = call.evicting
        self.seen.append(
            Record(
                call_kind=call.kind,
                layer=call.layer_idx,
                q_len=call.q_len,
                k_len=lk,
                n_kv_heads=call.n_kv_heads,
                key_valid=kv,
                key_rank=call.key_rank.detach().cpu().clone().expand(b, lk),
                n_real=call.n_real.detach().cpu().flatten().clone(),
                kind=selection.kind,
                idx=idx,
                valid=valid,
                slots=None if ev is None else ev.slots.detach().cpu().clone(),
                seen=None if ev is None else ev.seen,
            )
        )


@dataclass
class Scenario:
    variant: str
    batch: int
    length: int
    pad: int  # left pads on row 0
    mode: str  # "prefill", "generate" or "chunked"
    new_tokens: int
    cut: int  # chunked: length of the first call
    seed: int
    forced: bool  # under exercise_sparse_paths()
    stock_cache: bool  # non-eviction methods: transformers' DynamicCache instead of session.new_cache()

    def pads(self) -> list[int]:
        return [self.pad] + [0] * (self.batch - 1)

    def first_call_real(self) -> list[int]:
        """Real tokens per row in the first call (the first prefill)."""
        first = self.cut if self.mode == "chunked" else self.length
        return [first - p for p in self.pads()]


@st.composite
def scenarios(draw):
    length = draw(st.integers(1, 64))
    batch = draw(st.sampled_from([2, 2, 1]))
    pad = draw(st.integers(0, length - 1)) if batch == 2 else 0
    mode = draw(st.sampled_from(["prefill", "generate", "chunked"]))
    cut = 0
    if mode == "chunked":
        if length - 1 >= pad + 1:  # the first call must end on a real token in every row
            cut = draw(st.integers(pad + 1, length - 1))
        else:
            mode = "generate"
    return Scenario(
        variant=draw(st.sampled_from(VARIANTS)),
        batch=batch,
        length=length,
        pad=pad,
        mode=mode,
        new_tokens=draw(st.integers(1, 3)),
        cut=cut,
        seed=draw(st.integers(0, 3)),
        forced=draw(st.booleans()),
        stock_cache=draw(st.booleans()),
    )


def _finite(logits: torch.Tensor, where: torch.Tensor | None, what: str) -> None:
    x = logits if where is None else logits[where.bool()]
    assert torch.isfinite(x).all(), f"non-finite logits at real positions ({what})"


def _real_rows(session, mask: torch.Tensor) -> torch.Tensor:
    """The pass's real positions as the logits hold them: a method that dropped hidden rows (FastV)
    returns only the kept rows (fillers of shorter sequences are not real)."""
    rows = session.rows
    if rows is None:
        return mask
    where = mask.gather(1, rows.index).bool()
    return where if rows.valid is None else where & rows.valid


def run_scenario(method, sc: Scenario) -> Recorder:
    """Run the scenario under ``method``; checks that real positions get finite logits."""
    model = model_for(sc.variant)
    ids, mask = tiny_inputs(sc.batch, sc.length, pad=sc.pad, seed=sc.seed)
    rec = Recorder()
    forced = exercise_sparse_paths() if sc.forced else contextlib.nullcontext()
    with torch.no_grad(), forced, ts.sparsify(model, method, telemetry=rec) as session:
        if method.needs_evicting_cache or method.needs_cache_state or not sc.stock_cache:
            cache = session.new_cache()
        else:
            cache = DynamicCache(config=model.config)
        if sc.mode == "prefill":
            _finite(model(ids, attention_mask=mask, cache=cache).logits, _real_rows(session, mask), "prefill")
        elif sc.mode == "generate":
            out = model.generate(
                ids, attention_mask=mask, cache=cache, max_new_tokens=sc.new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
            _finite(torch.stack(out.logits, 1), None, "generate")
        else:
            c = sc.cut
            first = model(ids[:, :c], attention_mask=mask[:, :c], cache=cache).logits
            _finite(first, _real_rows(session, mask[:, :c]), "first chunk")
            logits = model(ids[:, c:], attention_mask=mask, cache=cache).logits
            _finite(logits, None, "second chunk")
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            _finite(model(nxt, attention_mask=mask, cache=cache).logits, None, "decode after chunks")
    return rec


# ---- invariants --------------------------------------------------------------------------------------


def _rows(r: Record):
    """Per (row, head): the valid selected positions (1-D long tensor, as selected)."""
    b, h, _ = r.idx.shape
    for i in range(b):
        for j in range(h):
            yield i, j, r.idx[i, j][r.valid[i, j]]


def _ranks(r: Record, i: int, pos: torch.Tensor) -> set[int]:
    return set(r.key_rank[i, pos].tolist())


def check_general(r: Record) -> None:
    assert r.kind in ("dense", "rows", "keys", "keep", "blocks"), r.kind
    if r.kind == "dense":
        return
    if r.kind == "blocks":  # key-block indices per query block: sorted, unique, causal on each row's grid
        assert r.idx.dim() == 4 and r.valid.shape == r.idx.shape
        for i in range(r.idx.shape[0]):
            for j in range(r.idx.shape[1]):
                for qb in range(r.idx.shape[2]):
                    blocks = r.idx[i, j, qb][r.valid[i, j, qb]]
                    assert bool((blocks.diff() > 0).all()), f"row {i}, head {j}, query block {qb}: {blocks.tolist()}"
                    assert blocks.numel() == 0 or int(blocks.min()) >= 0
        return
    idx, valid = r.idx, r.valid
    assert idx.dtype == torch.long and idx.dim() == 3 and idx.shape[0] == r.key_valid.shape[0]
    assert valid.shape == idx.shape and valid.dtype == torch.bool
    if idx.numel():
        assert int(idx.min()) >= 0 and int(idx.max()) < r.k_len, "index out of [0, k_len)"
        assert bool((idx.diff(dim=-1) >= 0).all()), "indices not sorted"
    if r.kind == "keys":  # causality: nothing past the last query's physical position
        assert idx.numel() == 0 or int(idx.max()) <= r.k_len - 1
    for i, j, pos in _rows(r):
        assert bool((pos.diff() > 0).all()), f"duplicate valid entries in row {i}, head {j}: {pos.tolist()}"
        assert bool(r.key_valid[i, pos].all()), f"row {i}, head {j} selects padding keys"
        if r.slots is not None:  # an eviction: one row set per KV head, never an empty cache row
            assert r.idx.shape[1] in (1, r.slots.shape[1])  # one set per KV head, or one for all
            assert bool((r.slots[i, j, pos] >= 0).all()), f"row {i}, head {j} keeps empty cache rows"


def _resolve(budget, total: int) -> int:
    """Per-row budget as ``resolve_budget_rows`` documents it (a share rounds half to even)."""
    if isinstance(budget, float):
        return max(1, round(budget * total))
    return int(budget)


def check_token_sparse(m, r: Record, sc: Scenario) -> None:
    if r.kind == "dense":
        return
    assert r.call_kind == "prefill" and r.kind == "rows"
    n_cand = r.k_len - min(m.window, r.k_len)  # candidates [0, n_cand), then the window tail
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        window = set(range(real - min(m.window, real) + 1, real + 1))
        assert window <= got, f"row {i}, head {j}: last {m.window} real tokens not all kept"
        sinks = set(range(1, min(m.sink_tokens, real) + 1))
        assert sinks <= got, f"row {i}, head {j}: sink tokens {sorted(sinks - got)} dropped"


def check_token_select(m, r: Record, sc: Scenario) -> None:
    if r.kind == "dense":  # a budget that covers the call (observed as dense)
        return
    assert r.call_kind in ("decode", "chunk") and r.kind == "keys"
    assert r.q_len <= m.n_local
    # one set per layer, or per KV head (a single set still when no top-k token is chosen)
    assert r.idx.shape[1] in ((1,) if m.select_per == "layer" else (1, r.n_kv_heads))
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        assert set(range(1, min(m.n_sink, real) + 1)) <= got, f"row {i}: sinks missing"
        assert set(range(real - min(m.n_local, real) + 1, real + 1)) <= got, f"row {i}: local window missing"
        budget = _resolve(m.budget, real)
        if budget >= m.n_sink + m.n_local:
            assert len(pos) == min(budget, real), f"row {i}: {len(pos)} tokens for a budget of {budget} ({real} real)"
        else:  # a share below sinks + window: the row attends to everything
            assert len(pos) == real, f"row {i}: short budget {budget} must attend to all {real} tokens, got {len(pos)}"


def check_snapkv(m, r: Record, sc: Scenario) -> None:
    assert r.call_kind == "prefill"
    if r.kind == "dense":  # the budget holds the whole prompt: nothing evicted
        return
    assert r.kind == "keep" and r.slots is not None
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        keep = min(_resolve(m.budget, real), real)
        w = min(m.window, real)
        assert len(pos) == max(keep, w), f"row {i}, head {j}: kept {len(pos)}, expected {max(keep, w)}"
        assert set(range(real - w + 1, real + 1)) <= _ranks(r, i, pos), f"row {i}, head {j}: window not kept"


def _kept_by_head(m, r: Record):
    """Per row: the window, the number of kept rows per KV head, SnapKV's per-head keep."""
    assert r.call_kind == "prefill" and r.kind == "keep" and r.slots is not None
    out = {}
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        w = min(m.window, real)
        assert set(range(real - w + 1, real + 1)) <= _ranks(r, i, pos), f"row {i}, head {j}: window not kept"
        out.setdefault(i, (w, [], max(min(_resolve(m.budget, real), real), w)))[1].append(len(pos))
    return out


def check_tca(m, r: Record, sc: Scenario) -> None:
    """Once at the prefill: every head keeps its row's window and at least one token of every block
    of candidates before it (each block's count is at least 1), never more than the real tokens."""
    assert r.call_kind == "prefill"
    if r.kind == "dense":
        return
    assert r.kind == "keep" and r.slots is not None
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        w = min(m.window, real)
        ranks = _ranks(r, i, pos)
        assert set(range(real - w + 1, real + 1)) <= ranks, f"row {i}, head {j}: window not kept"
        n_cand = real - w
        blocks = {(rank - 1) // m.block for rank in ranks if rank <= n_cand}
        assert blocks == set(range((n_cand + m.block - 1) // m.block)), f"row {i}, head {j}: a block kept nothing"
        assert len(pos) <= real


def check_pyramid_kv(m, r: Record, sc: Scenario) -> None:
    """The layer's count, the same for every KV head; never more than the row's real tokens."""
    if r.kind == "dense":
        return
    for i, (w, counts, _) in _kept_by_head(m, r).items():
        assert len(set(counts)) == 1, f"row {i}: heads keep {counts}"
        assert w <= counts[0] <= int(r.n_real[i])


def check_ada_kv(m, r: Record, sc: Scenario) -> None:
    """The layer keeps SnapKV's total over its heads, each head at least its window and floor."""
    if r.kind == "dense":
        return
    for i, (w, counts, keep) in _kept_by_head(m, r).items():
        assert sum(counts) == len(counts) * keep, f"row {i}: heads keep {counts}, {keep} each on average"
        assert min(counts) >= w + int(m.floor * (keep - w)), f"row {i}: {counts} below the floor"


def check_streaming_llm(m, r: Record, sc: Scenario) -> None:
    if r.kind == "dense":  # the cache still fits the budget
        return
    assert r.kind == "keep" and r.slots is not None
    first = sc.first_call_real()
    for i, j, pos in _rows(r):
        keep = max(_resolve(m.budget, first[i]), m.n_sink + 1)
        real_tokens = list(range(sc.pads()[i], r.seen))  # absolute indices of the row's real tokens so far
        recent = max(0, len(real_tokens) - (keep - m.n_sink))
        expected = set(real_tokens[: m.n_sink]) | set(real_tokens[recent:])
        got = set(r.slots[i, j, pos].tolist())
        assert len(pos) <= keep, f"row {i}, head {j}: {len(pos)} rows kept for a budget of {keep}"
        assert got == expected, f"row {i}, head {j}: kept tokens {sorted(got)}, expected {sorted(expected)}"


@st.composite
def tidal_decode_configs(draw):
    return dict(
        budget=draw(st.one_of(SHARES, st.integers(0, 30))),
        selection_layers=draw(st.sampled_from(["paper", "periodic", [0], [1], [0, 1]])),  # the test models have 2 layers
        gqa_reduce=draw(st.sampled_from(GQA_REDUCTIONS)),
        scorer=draw(st.sampled_from([None, None, "quest", "landmark", "token_select", "fasa"])),
        pool_kernel=draw(st.sampled_from([1, 1, 3])),
        select_per=draw(st.sampled_from(["kv_head", "layer"])),
    )


def check_tidal_decode(m, r: Record, sc: Scenario) -> None:
    """``budget`` distinct keys per row and head, the current token among them (also FASA's rule)."""
    assert r.call_kind == "decode", r.call_kind
    if r.kind == "dense":  # a selection layer, or a budget that covers the step
        return
    assert r.kind == "keys"
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        assert real in got, f"row {i}, head {j}: the current token is not attended"
        assert len(got) == len(pos) == min(_resolve(m.budget, real), real), f"row {i}, head {j}: {len(pos)} keys"


@st.composite
def tova_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(0, 40))))


def check_tova(m, r: Record, sc: Scenario) -> None:
    if r.kind == "dense":  # the cache still fits the budget
        return
    assert r.kind == "keep" and r.slots is not None
    keep = [max(_resolve(m.budget, n), 1) for n in sc.first_call_real()]
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        assert len(pos) == min(keep[i], real), f"row {i}: kept {len(pos)} rows for a budget of {keep[i]}"
        assert real in _ranks(r, i, pos), f"row {i}: the current token was evicted"


@st.composite
def h2o_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(0, 40))),
                window=draw(st.one_of(st.sampled_from([0.5, 0.1, 0.99]), st.integers(0, 12))))


def check_h2o(m, r: Record, sc: Scenario) -> None:
    """Each KV head keeps ``budget`` rows (or all it holds): its ``window`` most recent real rows,
    the current token among them, the rest chosen by score among the older real rows."""
    if r.kind == "dense":  # the cache still fits the budget
        return
    assert r.kind == "keep" and r.slots is not None
    keeps = [max(_resolve(m.budget, n), 2) for n in sc.first_call_real()]
    for i, j, pos in _rows(r):
        keep = keeps[i]
        held = r.slots[i, j][r.slots[i, j] >= 0]
        window = keep * m.window if isinstance(m.window, float) else m.window
        window = min(max(int(window), 1), keep - 1)
        assert len(pos) == min(keep, len(held)), f"row {i}, head {j}: kept {len(pos)} of {len(held)} for {keep}"
        got = set(r.slots[i, j, pos].tolist())
        recent = set(held.sort().values[-window:].tolist())
        assert recent <= got, f"row {i}, head {j}: recent rows {sorted(recent - got)} evicted"


@st.composite
def quest_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(0, 40))), page=draw(st.integers(1, 6)),
                dense_layers=draw(st.integers(0, 2)), bound=draw(st.sampled_from(["minmax", "minmax", "int8", "bf16"])))


def check_quest(m, r: Record, sc: Scenario) -> None:
    """Decode only: whole pages of each row's grid (over its real tokens), the current page among
    them, ``max(3, ceil(budget / page))`` pages or every page."""
    assert r.call_kind == "decode" and r.layer >= m.dense_layers, (r.call_kind, r.layer)
    if r.kind == "dense":
        return
    assert r.kind == "keys"
    p = m.page
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)  # 1-based ranks among the row's real tokens
        pages = {(x - 1) // p for x in got}
        for pg in pages:
            assert set(range(pg * p + 1, min((pg + 1) * p, real) + 1)) <= got, f"row {i}, head {j}: page {pg} partly read"
        n_all = -(-real // p)
        assert (real - 1) // p in pages, f"row {i}, head {j}: the current page is not read"
        want = min(n_all, max(3, -(-_resolve(m.budget, real) // p)))
        assert len(pages) == want, f"row {i}, head {j}: {len(pages)} pages, want {want}"


@st.composite
def zero_tuning_configs(draw):
    return dict(
        gamma=draw(st.one_of(st.sampled_from([1.0, 0.25, 4.0]), st.floats(0.01, 20.0), st.floats(-1.0, 0.0))),
        heads=draw(st.sampled_from(["all", [0], [1, 3], [3]])),
        layers=draw(st.sampled_from(["all", [0], [1], [0, 1]])),
    )


def check_zero_tuning(m, r: Record, sc: Scenario) -> None:
    raise AssertionError(f"zero_tuning selects nothing, yet a {r.kind!r} selection was observed")


@st.composite
def hip_configs(draw):
    return dict(
        budget=draw(st.one_of(SHARES, st.integers(0, 40))),
        block=draw(st.integers(1, 8)),
        n_sink=draw(st.integers(0, 8)),
        window=draw(st.integers(0, 12)),
        stride_q=draw(st.integers(1, 4)),
        rep_keys=draw(st.integers(1, 4)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        select_per=draw(st.sampled_from(["query_head", "kv_head"])),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),  # flex: tests/test_blocks.py (compiles)
    )


def routed_blocks(r: Record, bs: int, tail: int):
    """Walk a ``"blocks"`` record's query blocks of ``bs`` tokens: a block past the row's real
    tokens reads nothing, a block holding the prompt's last ``tail`` tokens reads every block up to
    its own; yields ``(row, head, query block, real tokens, blocks read)`` for every other block."""
    for i in range(r.idx.shape[0]):
        real = int(r.n_real[i])
        nb = -(-real // bs)
        for j in range(r.idx.shape[1]):
            for qb in range(r.idx.shape[2]):
                got = set(r.idx[i, j, qb][r.valid[i, j, qb]].tolist())
                if qb >= nb:
                    assert not got, f"row {i}: query block {qb} past the row's {nb} blocks reads {got}"
                    continue
                if tail and qb >= (real - tail) // bs:
                    assert got == set(range(qb + 1)), f"row {i}, head {j}, tail block {qb}: {sorted(got)}"
                    continue
                yield i, j, qb, real, got


def check_budget_blocks(r: Record, bs: int, sink_tokens: int, window_tokens: int, budget, tail: int) -> None:
    """Each routed query block reads its sinks and its window (diagonal included) and routed blocks
    up to its budget (a share of its causal blocks, or tokens) — exactly ``max(keep, forced)``
    blocks, nothing later than itself."""
    sink, win = -(-sink_tokens // bs), -(-window_tokens // bs)
    for i, j, qb, _, got in routed_blocks(r, bs, tail):
        always = {b for b in range(qb + 1) if b < sink or b > qb - win}
        keep = math.ceil(budget * (qb + 1)) if isinstance(budget, float) else -(-budget // bs)
        assert always <= got and max(got) <= qb, f"row {i}, head {j}, block {qb}: {sorted(got)}"
        assert len(got) == min(qb + 1, max(keep, len(always))), f"row {i}, head {j}, block {qb}: {sorted(got)}"


def check_hip(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads its sinks, its window (diagonal included),
    at most ``budget`` more tokens' worth of blocks between them, nothing later than itself."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":  # every candidate fits the budget: a complete selection runs dense
        return
    assert r.kind == "blocks"
    bs = m.block
    sink, win = -(-m.n_sink // bs), -(-m.window // bs)
    for i, j, qb, real, got in routed_blocks(r, bs, m.dense_tail):
        n_keep = min(-(-real // bs), -(-_resolve(m.budget, real) // bs))
        always = {b for b in range(qb + 1) if b < sink or b > qb - win}
        assert always <= got and max(got) <= qb, f"row {i}, head {j}, block {qb}: {sorted(got)}"
        n_cand = max(0, max(qb - win + 1, sink) - sink)
        assert len(got - always) == min(n_keep, n_cand), f"row {i}, head {j}, block {qb}: {sorted(got)}"


@st.composite
def frugal_prompt_configs(draw):
    return dict(keep=draw(SHARES), layers=draw(st.sampled_from(["second_half", "all", [0], [1, 0]])),
                n_sink=draw(st.integers(0, 3)))


def check_frugal_prompt(m, ids: torch.Tensor, out: torch.Tensor, step) -> None:
    """A prompt step: ``ceil(keep · n)`` tokens of the context, its first ``n_sink`` among them, in
    their original order (a subsequence of the context)."""
    n = ids.shape[1]
    want = min(n, math.ceil(m.keep * n - 1e-9))
    assert step.context_tokens == n and step.kept_tokens == want == out.shape[1]
    s = min(m.n_sink, want)
    assert torch.equal(out[0, :s], ids[0, :s])
    it = iter(ids[0].tolist())
    assert all(any(t == x for x in it) for t in out[0].tolist()), "not a subsequence of the context"


def run_prompt_scenario(method, sc: Scenario) -> None:
    """Each row's real tokens through the prompt step, then the model on what it kept (finite)."""
    from tokensparse.engine.prompt import apply_prompt_step

    model = model_for(sc.variant)
    ids, mask = tiny_inputs(sc.batch, sc.length, pad=sc.pad, seed=sc.seed)
    for r in range(sc.batch):
        real = ids[r : r + 1, mask[r].bool()]
        out, step = apply_prompt_step(model, method, real)
        check_frugal_prompt(method, real, out, step)
        with torch.no_grad():
            _finite(model(out).logits, None, "compressed prompt")


@st.composite
def fast_v_configs(draw):
    return dict(layer=1, keep=draw(SHARES), n_last=draw(st.integers(1, 4)), n_sink=draw(st.integers(0, 4)),
                tail=draw(st.integers(0, 8)), pool_kernel=draw(st.integers(1, 7)))  # the test models have 2 layers


@st.composite
def razor_attention_configs(draw):
    return dict(window=draw(st.one_of(SHARES, st.integers(1, 30))), n_sink=draw(st.integers(0, 6)),
                comp_weight=draw(st.sampled_from(["log_n", "none"])),
                retrieval_heads=draw(st.sampled_from(["none", [0], [1, 2], [3]])))  # 2 layers × 2 KV heads


def check_razor_attention(m, r: Record, sc: Scenario) -> None:
    """Kept per KV head after the prefill: every real token on a retrieval head, else the first
    ``n_sink`` and the last ``window`` real tokens (the compensation row is appended by the cache)."""
    assert r.call_kind == "prefill", r.call_kind
    if r.kind == "dense":  # nothing to drop
        return
    assert r.kind == "keep", r.kind
    heads = set(m.retrieval_heads) if isinstance(m.retrieval_heads, list) else set()
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        if r.layer * 2 + j in heads:
            assert got == set(range(1, real + 1)), f"row {i}, retrieval head {j}"
        else:
            w = _resolve(m.window, real)
            want = set(range(1, min(m.n_sink, real) + 1)) | set(range(max(1, real - w + 1), real + 1))
            assert got == want, f"row {i}, head {j}: kept {sorted(got)}, expected {sorted(want)}"


@st.composite
def recycled_attention_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(0, 30))), stride=draw(st.integers(1, 5)),
                similarity=draw(st.sampled_from([None, 0.5, 0.95, 1.0])), n_sink=draw(st.integers(0, 3)),
                n_local=draw(st.integers(0, 3)), gqa_reduce=draw(st.sampled_from(("first",) + GQA_REDUCTIONS)),
                pool_kernel=draw(st.integers(1, 5)))


def check_recycled_attention(m, r: Record, sc: Scenario) -> None:
    """A recycle step attends to at most the budget plus the tokens written since its full step,
    always to the current token and to the sinks, never to padding."""
    assert r.call_kind == "decode", r.call_kind
    if r.kind == "dense":  # a full step
        return
    assert r.kind == "keys"
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        assert real in got, f"row {i}, head {j}: the current token is not attended"
        assert set(range(1, min(m.n_sink, real) + 1)) <= got, f"row {i}, head {j}: a sink is missing"
        assert len(got) == len(pos), f"row {i}, head {j}: a key listed twice or padding attended"


@st.composite
def landmark_configs(draw):
    block = draw(st.integers(1, 6))
    two = draw(st.booleans())  # the two-level search: coarse blocks of 2-4 blocks, candidates 1-3x
    return dict(budget=draw(st.one_of(SHARES, st.integers(1, 30))), block=block,
                representative=draw(st.sampled_from(["mean", "max_norm"])), dense_layers=draw(st.integers(0, 1)),
                gqa_reduce=draw(st.sampled_from(GQA_REDUCTIONS)),
                summary_dtype=draw(st.sampled_from([None, None, "bfloat16"])),
                **(dict(coarse=draw(st.integers(2, 4)), widen=draw(st.sampled_from([1.0, 1.5, 3.0])))
                   if two else {}))


def check_landmark(m, r: Record, sc: Scenario) -> None:
    """Whole blocks of each row's grid plus the current block; never more than the budget allows."""
    assert r.call_kind == "decode", r.call_kind
    if r.kind == "dense":
        return
    assert r.kind == "keys"
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        assert real in got, f"row {i}, head {j}: the current token is not attended"
        blocks = {(x - 1) // m.block for x in got}
        assert len(blocks) <= m.n_blocks(real), f"row {i}, head {j}: {len(blocks)} blocks"
        for blk in blocks:  # whole blocks (the last one up to the current token)
            assert set(range(blk * m.block + 1, min((blk + 1) * m.block, real) + 1)) <= got


@st.composite
def fasa_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(2, 30))), chunks=draw(st.integers(1, 4)),
                layout=draw(st.sampled_from(["rotate_half", "adjacent"])), fcs=draw(st.sampled_from(["low", "high"])),
                dense_layers=draw(st.integers(0, 1)), gqa_reduce=draw(st.sampled_from(GQA_REDUCTIONS)))


@st.composite
def biformer_configs(draw):
    return dict(
        budget=draw(st.one_of(SHARES, st.integers(1, 40))),
        block=draw(st.integers(1, 8)),
        n_sink=draw(st.integers(0, 8)),
        window=draw(st.integers(1, 12)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),  # flex: tests/test_blocks.py (compiles)
    )


def check_biformer(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads its sinks, its window (diagonal included)
    and routed blocks up to its budget — exactly ``max(keep, forced)`` blocks, nothing later than
    itself; the prompt's tail reads everything."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":  # every causal block chosen: a complete selection runs dense
        return
    assert r.kind == "blocks"
    check_budget_blocks(r, m.block, m.n_sink, m.window, m.budget, m.dense_tail)


@st.composite
def spatten_configs(draw):
    return dict(budget=draw(st.one_of(SHARES, st.integers(1, 30))), budget_first=draw(st.one_of(SHARES, st.integers(1, 40))),
                dense_layers=draw(st.integers(0, 2)), n_local=draw(st.integers(1, 6)),
                prompt_window=draw(st.sampled_from([None, 0, 3, 32])), head_prune=draw(st.sampled_from([0.0, 0.25, 0.5])),
                head_output=draw(st.sampled_from(["last", "zero"])), quant=draw(st.sampled_from([None, "int8", "int4"])),
                threshold=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), pool_kernel=draw(st.integers(1, 4)))


def check_spatten(m, r: Record, sc: Scenario) -> None:
    """One set per sequence; the call's own tokens and the last ``n_local`` real tokens are always read
    (tests/test_spatten.py replays the whole cascade by brute force)."""
    assert r.call_kind in ("decode", "chunk"), r.call_kind
    if r.kind == "dense":  # nothing pruned (yet) in this layer
        return
    assert r.kind == "keys" and r.idx.shape[1] == 1
    for i, j, pos in _rows(r):
        real = int(r.n_real[i])
        got = _ranks(r, i, pos)
        recent = set(range(max(1, real - max(m.n_local, r.q_len) + 1), real + 1))
        assert recent <= got, f"row {i}: recent tokens {sorted(recent - got)} not read"


@st.composite
def xattention_configs(draw):
    stride = draw(st.integers(1, 4))
    return dict(
        threshold=draw(st.sampled_from([0.3, 0.6, 0.9, 1.0])),
        stride=stride,
        block=stride * draw(st.integers(1, 4)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        select_per=draw(st.sampled_from(["query_head", "kv_head"])),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),
    )


def check_xattention(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads its first block and its diagonal block,
    nothing later than itself; the prompt's tail reads everything (the threshold rule itself:
    tests/test_prefill_routing.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":
        return
    assert r.kind == "blocks"
    for i, j, qb, _, got in routed_blocks(r, m.block, m.dense_tail):
        assert {0, qb} <= got and max(got) <= qb, f"row {i}, head {j}, block {qb}: {sorted(got)}"


@st.composite
def rectified_configs(draw):
    base = draw(st.sampled_from(["biformer", "xattention", "hip"]))
    base_config = draw({"biformer": biformer_configs(), "xattention": xattention_configs(), "hip": hip_configs()}[base])
    return dict(base=base, base_config=base_config, gapr=draw(st.sampled_from(["sparse", "drop", "off"])),
                isolate=draw(st.integers(0, 5)), impl=draw(st.sampled_from(["fast", "fast", "reference"])))


def check_rectified(m, r: Record, sc: Scenario) -> None:
    """The selections are the base's, under the base's own rules (the rectified output itself:
    tests/test_rectified.py)."""
    METHODS[m.base][1](m.base_method, r, sc)


@st.composite
def cca_configs(draw):
    return dict(
        group=draw(st.integers(1, 8)),
        window=draw(st.integers(1, 12)),
        probe=draw(st.sampled_from(["query_head", "kv_head"])),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        impl=draw(st.sampled_from(["fast", "fast", "reference"])),
    )


def check_cca(m, r: Record, sc: Scenario) -> None:
    """Prefill calls after the first ``dense_layers`` only. The observed selection is the raw window
    on the group grid of each row's real tokens: query group ``qb`` lists exactly the key groups
    ``[n, qb]``, ``n = max(0, ⌊(qb·g + 1 − w)/g⌋)`` the core tokens its first query reads, or every
    earlier group in the dense tail (the output itself: tests/test_cca.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":
        return
    assert r.kind == "blocks" and r.idx.shape[1] == 1, f"one raw window for every head, got {r.idx.shape[1]} heads"
    g = m.group
    for i in range(r.idx.shape[0]):
        real = int(r.n_real[i])
        nb = -(-real // g)
        for qb in range(r.idx.shape[2]):
            got = r.idx[i, 0, qb][r.valid[i, 0, qb]].tolist()
            if qb >= nb:
                assert not got, f"row {i}: query group {qb} past the row's {nb} groups reads {got}"
                continue
            if m.dense_tail and qb >= (real - m.dense_tail) // g:
                first = 0
            else:
                first = max(0, (qb * g + 1 - m.window) // g)
            assert got == list(range(first, qb + 1)), f"row {i}, query group {qb}: {got}"


@st.composite
def minference_configs(draw):
    return dict(
        vertical=draw(st.one_of(SHARES, st.integers(1, 40))),
        slash=draw(st.one_of(SHARES, st.integers(1, 40))),
        last_q=draw(st.integers(1, 16)),
        n_sink=draw(st.integers(0, 12)),
        n_local=draw(st.integers(1, 12)),
        block=draw(st.integers(1, 8)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        select_per=draw(st.sampled_from(["query_head", "kv_head"])),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),
    )


def check_minference(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads the blocks of the first ``n_sink`` columns
    and of the ``n_local`` nearest diagonals (its own block included), nothing later than itself;
    the prompt's tail reads everything (the scores and the block mapping themselves:
    tests/test_minference.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":
        return
    assert r.kind == "blocks"
    bs = m.block
    back = (m.n_local + bs - 2) // bs  # block diagonals the nearest n_local diagonals pass through
    for i, j, qb, real, got in routed_blocks(r, bs, m.dense_tail):
        sinks = -(-min(m.n_sink, real) // bs)
        always = {b for b in range(qb + 1) if b < sinks or b >= qb - back}
        assert always <= got and max(got) <= qb, f"row {i}, head {j}, block {qb}: {sorted(got)}"


@st.composite
def sparsifiner_configs(draw):
    return dict(
        budget=draw(st.one_of(SHARES, st.integers(1, 40))),
        rank=draw(st.integers(1, 16)),  # the tiny models' head dim is 16
        block=draw(st.integers(1, 8)),
        score=draw(st.sampled_from(["mass", "max"])),
        n_sink=draw(st.integers(0, 8)),
        window=draw(st.integers(1, 12)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),
    )


@st.composite
def superlinear_configs(draw):
    return dict(
        spans=draw(st.integers(1, 6)),
        span=draw(st.one_of(st.none(), st.integers(1, 16))),
        block=draw(st.integers(1, 8)),
        n_sink=draw(st.integers(0, 8)),
        window=draw(st.integers(1, 12)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),
    )


def check_superlinear(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads its sinks, its window and the earlier blocks
    of its own span, plus whole earlier spans (of the row's span size), exactly ``spans`` of them
    where as many are candidates; nothing later than itself; the prompt's tail reads everything
    (the span scores and the choice: tests/test_superlinear.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":
        return
    assert r.kind == "blocks"
    bs = m.block
    sink, win = -(-m.n_sink // bs), -(-m.window // bs)
    for i, j, qb, real, got in routed_blocks(r, bs, m.dense_tail):
        sb = m.span_blocks(real)
        always = {b for b in range(qb + 1) if b < sink or b > qb - win or b // sb == qb // sb}
        assert always <= got and max(got) <= qb, f"row {i}, head {j}, block {qb}: {sorted(got)}"
        routed = {b // sb for b in got - always}
        candidates = {s for s in range(qb // sb) if not set(range(s * sb, s * sb + sb)) <= always}
        assert routed <= candidates, f"row {i}, head {j}, block {qb}: spans {sorted(routed)}"
        assert len(routed) == min(m.spans, len(candidates)), f"row {i}, head {j}, block {qb}: {sorted(got)}"
        for s in routed:
            assert set(range(s * sb, s * sb + sb)) <= got, f"row {i}, head {j}, block {qb}: span {s} partial"


@st.composite
def hisa_configs(draw):
    block = draw(st.integers(1, 8))
    fine = draw(st.sampled_from([f for f in range(1, block + 1) if block % f == 0]))
    return dict(
        candidates=draw(st.one_of(SHARES, st.integers(1, 40))),
        budget=draw(st.one_of(SHARES, st.integers(1, 24))),
        block=block,
        fine=fine,
        refine=draw(st.sampled_from(["max", "mean"])),
        n_sink=draw(st.integers(0, 8)),
        window=draw(st.integers(1, 12)),
        dense_layers=draw(st.integers(0, 2)),
        dense_tail=draw(st.integers(0, 12)),
        impl=draw(st.sampled_from(["gather", "reference"] + (["auto"] if fine == block else []))),
    )


def check_hisa(m, r: Record, sc: Scenario) -> None:
    """On a grid of ``block`` queries × ``fine`` keys over each row's real tokens, each query block
    reads its sink and window blocks whole, plus exactly ``min(keep, candidate groups)`` fine groups
    of at most ``m_i`` earlier candidate blocks (the coarse stage's survivors), nothing later than
    itself; the prompt's tail reads everything (the scores and the choice: tests/test_hisa.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":  # every causal key chosen: a complete selection runs dense
        return
    assert r.kind == "blocks" and r.idx.shape[1] == r.n_kv_heads
    bs, fine = m.block, m.fine
    ratio = bs // fine
    sink, win = -(-m.n_sink // bs), -(-m.window // bs)
    for i in range(r.idx.shape[0]):
        real = int(r.n_real[i])
        nb = -(-real // bs)
        for j in range(r.idx.shape[1]):
            for qb in range(r.idx.shape[2]):
                got = set(r.idx[i, j, qb][r.valid[i, j, qb]].tolist())
                if qb >= nb:
                    assert not got, f"row {i}: query block {qb} past the row's {nb} blocks reads {got}"
                    continue
                n_causal = -(-min(real, (qb + 1) * bs) // fine)  # fine groups up to the block's last query
                if m.dense_tail and qb >= (real - m.dense_tail) // bs:
                    assert got == set(range(n_causal)), f"row {i}, head {j}, tail block {qb}: {sorted(got)}"
                    continue
                forced_blocks = {b for b in range(qb + 1) if b < sink or b > qb - win}
                always = {f for f in range(n_causal) if f // ratio in forced_blocks}
                assert always <= got and max(got) < n_causal, f"row {i}, head {j}, block {qb}: {sorted(got)}"
                routed = got - always
                n_other = qb + 1 - len(forced_blocks)
                m_i = math.ceil(m.candidates * (qb + 1)) if isinstance(m.candidates, float) else -(-m.candidates // bs)
                n_cand = min(m_i, n_other)
                keep = (math.ceil(m.budget * (n_cand * bs) / fine) if isinstance(m.budget, float)
                        else -(-m.budget // fine))
                assert len({f // ratio for f in routed}) <= n_cand, f"row {i}, head {j}, block {qb}: {sorted(got)}"
                assert len(routed) == min(keep, n_cand * ratio), f"row {i}, head {j}, block {qb}: {sorted(got)}"


@st.composite
def dhsa_configs(draw):
    grain = draw(st.integers(1, 8))
    return dict(
        budget=draw(st.one_of(SHARES, st.integers(1, 48))),
        grain=grain,
        chunk=grain * draw(st.integers(1, 4)),
        boundaries=draw(st.sampled_from(["dynamic", "shared", "fixed"])),
        nms=draw(st.integers(0, 2)),
        global_tokens=draw(st.integers(0, 8)),
        local_tokens=draw(st.integers(1, 12)),
        instruction_tokens=draw(st.integers(0, 12)),
        dense_layers=draw(st.integers(0, 2)),
        select_per=draw(st.sampled_from(["shared", "kv_head"])),
        impl=draw(st.sampled_from(["auto", "sdpa", "gather", "reference"])),  # flex: tests/test_blocks.py (compiles)
    )


def check_dhsa(m, r: Record, sc: Scenario) -> None:
    """Each query block of each row's real tokens reads its sinks and its local window (diagonal
    included) and routed blocks up to its budget — exactly ``max(keep, forced)`` blocks, nothing
    later than itself; the instruction tail reads everything (the boundaries, chunk scores and the
    chunk-level choice: tests/test_dhsa.py)."""
    assert r.call_kind == "prefill" and r.layer >= m.dense_layers
    if r.kind == "dense":
        return
    assert r.kind == "blocks"
    if m.select_per == "shared":
        assert r.idx.shape[1] == 1, f"one mask for all heads, got {r.idx.shape[1]} selection heads"
    check_budget_blocks(r, m.grain, m.global_tokens, m.local_tokens, m.budget, m.instruction_tokens)


#: every registered method needs a config strategy and an invariant check (``None``: general only)
METHODS = {
    "token_sparse": (token_sparse_configs(), check_token_sparse),
    "token_select": (token_select_configs(), check_token_select),
    "snapkv": (snapkv_configs(), check_snapkv),
    "streaming_llm": (streaming_llm_configs(), check_streaming_llm),
    "tidal_decode": (tidal_decode_configs(), check_tidal_decode),
    "tova": (tova_configs(), check_tova),
    "h2o": (h2o_configs(), check_h2o),
    "quest": (quest_configs(), check_quest),
    "zero_tuning": (zero_tuning_configs(), check_zero_tuning),
    "hip": (hip_configs(), check_hip),
    "biformer": (biformer_configs(), check_biformer),
    "xattention": (xattention_configs(), check_xattention),
    "rectified": (rectified_configs(), check_rectified),
    "sparsifiner": (sparsifiner_configs(), check_biformer),  # the same rule: sinks, window, budget blocks
    "superlinear": (superlinear_configs(), check_superlinear),
    "hisa": (hisa_configs(), check_hisa),
    "minference": (minference_configs(), check_minference),
    "cca": (cca_configs(), check_cca),
    "dhsa": (dhsa_configs(), check_dhsa),
    "frugal_prompt": (frugal_prompt_configs(), check_frugal_prompt),
    "pyramid_kv": (pyramid_kv_configs(), check_pyramid_kv),
    "ada_kv": (ada_kv_configs(), check_ada_kv),
    "tca": (tca_configs(), check_tca),
    "fast_v": (fast_v_configs(), None),
    "recycled_attention": (recycled_attention_configs(), check_recycled_attention),
    "landmark": (landmark_configs(), check_landmark),
    "spatten": (spatten_configs(), check_spatten),
    "fasa": (fasa_configs(), check_tidal_decode),  # the same rule: budget keys, the current token among them
    "razor_attention": (razor_attention_configs(), check_razor_attention),  # no selections: tests/test_rows.py checks its rows against a reference  # a prompt step: run_prompt_scenario
}


def test_every_method_has_a_strategy():
    missing = sorted(set(ts.methods.names()) - set(METHODS))
    assert not missing, f"add a config strategy and an invariant check to METHODS in {__file__} for: {missing}"
    stale = sorted(set(METHODS) - set(ts.methods.names()))
    assert not stale, f"METHODS names unregistered methods: {stale}"


def _build(name: str, kwargs: dict):
    try:
        return ts.methods.get(name)(**kwargs)
    except (ValueError, TypeError):
        event("config refused at construction")
        return None


@pytest.mark.parametrize("name", ts.methods.names())
@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_runs_finite_and_selections_respect_invariants(name, data):
    if name not in METHODS:
        pytest.fail(f"no config strategy for method {name!r}: add one to METHODS in {__file__}")
    strategy, check = METHODS[name]
    method = _build(name, data.draw(strategy, label="config"))
    if method is None:
        return
    sc = data.draw(scenarios(), label="scenario")
    if method.phase == "prompt":
        run_prompt_scenario(method, sc)
        return
    rec = run_scenario(method, sc)
    kinds = set()
    for r in rec.seen:
        check_general(r)
        kinds.add(r.kind)
        if check is not None:
            check(method, r, sc)
    event(f"selections: {sorted(kinds) or 'none'}")


# ---- construction with adversarial values -------------------------------------------------------------

#: (out-of-range layer indices are left out: they can only be refused when the model is known, at sparsify)
ODD_VALUES = [-1, 0, 0.0, 1.5, 4.0, -0.5, 2.0, math.nan, math.inf, -math.inf, True, False, None, "x", "4", [0], (0, 1), []]


@pytest.mark.parametrize("name", ts.methods.names())
@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_construction_refuses_or_runs(name, data):
    """A valid config with one or two fields set to an odd value (wrong type, out of range, NaN...):
    ``ValueError``/``TypeError`` at construction, or it runs without any exception."""
    if name not in METHODS:
        pytest.fail(f"no config strategy for method {name!r}: add one to METHODS in {__file__}")
    kwargs = dict(data.draw(METHODS[name][0], label="config"))
    names = [f.name for f in fields(ts.methods.get(name))]
    for field_name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True), label="odd fields"):
        kwargs[field_name] = data.draw(st.sampled_from(ODD_VALUES), label=field_name)
    method = _build(name, kwargs)
    if method is None:
        return
    sc = data.draw(scenarios(), label="scenario")
    try:
        run_scenario(method, sc)
    except Exception as e:  # noqa: BLE001 - the property is "no exception at all"
        pytest.fail(f"{name}({kwargs}) constructs but fails at run time: {type(e).__name__}: {e}")


# ---- selection helpers against a brute-force reference ------------------------------------------------

TIED = st.sampled_from([0.0, -0.0, 0.5, 1.0])  # -0.0 == 0.0: a tie, broken by position
#: ±inf as the methods use them (forced picks, exclusions)
SCORES = st.one_of(TIED, st.sampled_from([-math.inf, math.inf, -1.0]), st.floats(-2, 2, width=32))
#: fp64 scores, including values that differ only below fp32 precision
WIDE = st.one_of(TIED, st.floats(-2, 2), st.sampled_from([1.0, 1.0 + 2.0**-40, 1.0 - 2.0**-40]))


def _reference_topk(row: list[float], n: int) -> list[int]:
    order = sorted(range(len(row)), key=lambda p: (-row[p], p))
    return sorted(order[:n])


@st.composite
def score_tensors(draw, min_len=0):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    length = draw(st.integers(min_len, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    elems = draw(st.sampled_from([TIED, SCORES] if dtype == torch.float32 else [TIED, WIDE]))
    vals = draw(st.lists(elems, min_size=b * h * length, max_size=b * h * length))
    return torch.tensor(vals, dtype=dtype).view(b, h, length)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_select_topk_matches_reference(data):
    scores = data.draw(score_tensors())
    b, h, length = scores.shape
    k = data.draw(st.integers(0, length), label="k")
    per = data.draw(st.sampled_from(["none", "row", "head"]), label="counts")
    counts = None
    if per != "none":
        shape = (b, 1, 1) if per == "row" else (b, h, 1)
        flat = data.draw(st.lists(st.integers(0, k), min_size=math.prod(shape), max_size=math.prod(shape)), label="n")
        counts = torch.tensor(flat, dtype=torch.long).view(shape)
    idx, valid = select_topk(scores, k, counts)
    assert idx.shape == (b, h, k) and idx.dtype == torch.long
    assert (valid is None) == (counts is None)
    for i in range(b):
        for j in range(h):
            n = k if counts is None else int(counts.expand(b, h, 1)[i, j, 0])
            want = _reference_topk(scores[i, j].tolist(), n) + [length - 1] * (k - n)
            assert idx[i, j].tolist() == want, (scores[i, j].tolist(), k, n)
            if valid is not None:
                assert valid[i, j].tolist() == [True] * n + [False] * (k - n)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_select_topk_block_shortlist_matches_reference(data):
    """The CPU shortlist path (block maxima, then a top-k among the scores at or above the
    smallest of their best ``k``) with small blocks, so short rows exercise it: the reference's
    set, padding and validity, or ``None`` only where it must decline (too few blocks, NaN)."""
    from tokensparse.engine.selection import _topk_prefiltered

    scores = data.draw(score_tensors(min_len=1)).float()
    b, h, length = scores.shape
    block = data.draw(st.integers(1, 4), label="block")
    k = data.draw(st.integers(0, length), label="k")
    counts = None
    if data.draw(st.booleans(), label="counts"):
        flat = data.draw(st.lists(st.integers(0, k), min_size=b * h, max_size=b * h), label="n")
        counts = torch.tensor(flat, dtype=torch.long).view(b, h, 1)
    if data.draw(st.booleans(), label="nan") and length:
        scores[0, 0, data.draw(st.integers(0, length - 1))] = float("nan")
    got = _topk_prefiltered(scores, k, counts, block=block)
    if k == 0 or length // block < k or bool(scores.isnan().any()):  # declines where it must (any NaN: the keys)
        assert got is None
        return
    assert got is not None
    idx, valid = got
    assert (valid is None) == (counts is None)
    for i in range(b):
        for j in range(h):
            n = k if counts is None else int(counts[i, j, 0])
            row = scores[i, j].tolist()
            want = _reference_topk(row, n) + [length - 1] * (k - n)
            assert idx[i, j].tolist() == want, (row, k, n, block)
            if valid is not None:
                assert valid[i, j].tolist() == [True] * n + [False] * (k - n)


@settings(max_examples=150, **SETTINGS)
@given(scores=score_tensors(), k=st.integers(0, 16))
def test_topk_sorted_matches_reference(scores, k):
    b, h, length = scores.shape
    idx = topk_sorted(scores, k)
    n = min(k, length)
    assert idx.shape == (b, h, n)
    for i in range(b):
        for j in range(h):
            assert idx[i, j].tolist() == _reference_topk(scores[i, j].tolist(), n)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_indices_from_mask_matches_reference(data):
    b, h, length = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(0, 12))
    flat = data.draw(st.lists(st.booleans(), min_size=b * h * length, max_size=b * h * length))
    mask = torch.tensor(flat, dtype=torch.bool).view(b, h, length)
    most = int(mask.sum(-1).max()) if mask.numel() else 0
    k = data.draw(st.one_of(st.none(), st.integers(most, most + 3)), label="k")
    idx, valid = indices_from_mask(mask, k)
    width = most if k is None else k
    assert idx.shape == valid.shape == (b, h, width)
    for i in range(b):
        for j in range(h):
            pos = [p for p in range(length) if mask[i, j, p]]
            assert idx[i, j].tolist() == pos + [length - 1] * (width - len(pos))
            assert valid[i, j].tolist() == [True] * len(pos) + [False] * (width - len(pos))


# ---- regressions: bugs these properties found, reproduced minimally ------------------------------------------------------


def test_regression_mixed_sliding_eviction_mask():
    model = model_for("qwen3-mixed-sw8")  # layer 0 sliding (never evicted), layer 1 global
    method = ts.methods.get("streaming_llm")(budget=4, n_sink=1)
    pad, cut = 7, 25
    ids, mask = tiny_inputs(2, 30, pad=pad)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        model(ids[:, :cut], attention_mask=mask[:, :cut], cache=cache)  # 18 real tokens in row 0: evicts to 4
        model(ids[:, cut:], attention_mask=mask, cache=cache)  # 5 more: row 0 should keep 7 (sink), 27, 28, 29
        kept = cache.layers[1].slots[0, 0].tolist()
        assert kept == [7, 27, 28, 29], f"row 0 keeps {kept}: real chunk tokens were marked as padding"
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        model(ids[:, -1:], attention_mask=mask, cache=cache)  # raised "right padding" ValueError


def test_regression_token_sparse_window_marks_padding_valid():
    model = model_for("llama")
    ids, mask = tiny_inputs(2, 20, pad=17)  # row 0: 3 real tokens, window 8
    rec = Recorder()
    method = ts.methods.get("token_sparse")(coverage=0.3, window=8, min_tokens=2, layers="all")
    with torch.no_grad(), ts.sparsify(model, method, telemetry=rec):
        model(ids, attention_mask=mask)
    assert rec.seen and all(r.kind == "rows" for r in rec.seen)
    for r in rec.seen:
        for i, j, pos in _rows(r):
            assert bool(r.key_valid[i, pos].all()), f"layer {r.layer} row {i} head {j}: padding {pos.tolist()} marked valid"


def test_regression_token_sparse_drops_sinks():
    model = model_for("llama")
    ids, _ = tiny_inputs(1, 32)
    tel = Telemetry(keep_indices=True)
    method = ts.methods.get("token_sparse")(coverage=0.9, window=4, min_tokens=0, sink_tokens=4, layers="all")
    with torch.no_grad(), ts.sparsify(model, method, telemetry=tel):
        model(ids)
    assert tel.last_selection
    for layer, idx in tel.last_selection.items():
        assert set(range(4)) <= set(idx[0, 0].tolist()), f"layer {layer} keeps {idx[0, 0].tolist()}"


def test_regression_topk_negative_zero():
    idx, _ = select_topk(torch.tensor([[-0.0, 0.0]]), 1)
    assert idx.tolist() == [[0]]


def test_regression_topk_float64():
    e = 2.0**-40
    idx, _ = select_topk(torch.tensor([[1.0, 1.0 + e, 1.0 + e]], dtype=torch.float64), 1)
    assert idx.tolist() == [[1]]
