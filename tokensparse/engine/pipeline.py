"""The selection pipeline: a method selects, the engine executes, observes and counts.

A score-based method implements one hook, ``Method.select(call) -> Selection | None``, usually as
"score the candidates → ``KeyPlan.select``". Everything around it happens here, once, for every
method:

1. ``None`` from ``select``: the method does not act on this call (another phase, a layer it
   leaves alone); the call runs dense and is not observed.
2. A ``complete`` selection (it holds every real key) runs dense, observed as ``dense``, unless
   the sparse paths are forced (:func:`exercise_sparse_paths`, used by the full-budget tests),
   in which case the real executor runs on the "everything" selection. A method cannot forget
   this switch: it never sees it.
3. Otherwise telemetry observes the selection, ``session.stats`` counts it (``sparse_calls``,
   ``kept_keys``, ``total_keys``) and the executor for its kind runs (:func:`execute`).

The method's ``key_bias(call)`` (a logit bias on a few key columns) is applied by whichever
executor runs, dense included.

:class:`KeyPlan` is the shared "always keep sinks and a local window, pick the top candidates in
between" helper: in rank space over each row's real tokens, so a row of a left-padded batch makes
the choice it would make alone; an unpadded call gets sinks and window as ``prefix``/``suffix``
ranges (read as cache views by the decode executor, never gathered).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .blocks import block_attend
from .compressed import compress_blocks_attend_scatter
from .executors import compress_attend_scatter, gather_attend, gather_kv_rows, gather_pages, segments_attend
from .selection import (Selection, indices_from_mask, mask_from_indices, pool1d, resolve_budget,
                        resolve_budget_rows, select_topk)

_force_sparse = threading.local()


def sparse_paths_forced() -> bool:
    """True inside :func:`exercise_sparse_paths` (tests): complete selections still run sparse."""
    return getattr(_force_sparse, "on", False)


@contextlib.contextmanager
def exercise_sparse_paths():
    """Run the sparse executors even when a selection covers every token.

    The engine normally runs a complete selection as plain dense attention; under this context it
    runs the real gather/scatter/eviction code on the "all tokens" selection instead, which lets
    the full-budget equality tests check those paths.
    """
    old = sparse_paths_forced()
    _force_sparse.on = True
    try:
        yield
    finally:
        _force_sparse.on = old


# --------------------------------------------------------------------------------------------------
# always-kept keys and candidates
# --------------------------------------------------------------------------------------------------


class KeyPlan:
    """The keys one call always keeps — the first ``n_sink`` and the last ``window`` real tokens of
    each row — and the candidates between them, which a method scores and :meth:`select` ranks.

    Candidates always lie in the physical range ``[lo, hi)`` with ``hi = Lk - min(window, Lk)``:
    ``lo = min(n_sink, hi)`` for an unpadded call (sinks are the first rows), ``0`` for a padded
    one (each row's sinks sit after its padding; :attr:`cand_mask` says which rows compete). A
    method scores ``[lo, hi)`` and passes the scores to :meth:`select`.

    Counts exist twice: as device tensors (:attr:`n_cand`, :meth:`counts`), which give the values,
    and, where the call knows each row's real tokens on the host (:attr:`AttentionCall.host_real`:
    an unpadded call, or a left-padded one on a cache that recorded its padding), as Python ints
    (:attr:`host_cand`, :meth:`host_counts`), which give shapes and branches without reading a
    tensor (see docs/ARCHITECTURE.md, "Host synchronisation"). A budget given as an ``int`` (or,
    to :meth:`covers` and :meth:`host_counts`, a per-row list of ints; to :meth:`top` as ``host``
    next to its device twin) takes the host path; a tensor alone reads the device (one sync per
    decision), as before.

    ``host_real``: each row's real keys as ints where the caller knows them and the call does not
    (an evicting cache's :attr:`~tokensparse.engine.cache.EvictingLayer.host_valid`: rows may have
    holes, which the counts here do not mind); default :attr:`AttentionCall.host_real`.
    """

    def __init__(self, call, n_sink: int = 0, window: int = 0, host_real: list[int] | tuple[int, ...] | None = None):
        self.call = call
        length = call.k_len
        self.n_sink = int(n_sink)
        self.window = int(window)
        self.hi = length - min(self.window, length)
        valid = call.key_valid
        self.padded = valid is not None
        real = self.host_real = call.host_real if host_real is None else list(host_real)
        #: candidates per row on the host (``None``: unknown without reading the device)
        self.host_cand: list[int] | None = None
        if not self.padded:
            self.lo = min(self.n_sink, self.hi)
            self.cand_mask = None
            self.n_cand = torch.full((call.batch, 1), self.hi - self.lo, dtype=torch.long, device=call.query.device)
            self.host_cand = [self.hi - self.lo] * call.batch
            return
        self.lo = 0
        rank, real_t = call.key_rank, call.n_real  # (B, L), (B, 1)
        always = valid & ((rank <= self.n_sink) | (rank > real_t - self.window))
        self._always = always
        self.cand_mask = (valid & ~always)[:, : self.hi]  # (B, hi)
        self.n_cand = self.cand_mask.long().sum(-1, keepdim=True)
        if real is not None:  # left padding: rank r sits at Lk - real + r - 1, below hi iff r <= real - window
            self.host_cand = [max(0, r - self.window - self.n_sink) for r in real]

    @property
    def n_always(self) -> torch.Tensor:
        """``(B, 1)`` long: sinks plus window actually held by each row."""
        return (self.call.n_real - self.n_cand).clamp_min(0)

    def host_counts(self, n_top) -> list[int] | None:
        """:meth:`counts` on the host for an ``int`` or per-row list ``n_top`` (``None`` for a tensor,
        or when the candidates are not known on the host)."""
        if self.host_cand is None or isinstance(n_top, torch.Tensor):
            return None
        per_row = [int(n_top)] * len(self.host_cand) if isinstance(n_top, int) else [int(n) for n in n_top]
        return [max(0, min(n, c)) for n, c in zip(per_row, self.host_cand)]

    def covers(self, n_top: torch.Tensor | int | list) -> bool:
        """True when taking ``n_top`` candidates would take all of them in every row: on the host for
        an ``int`` or per-row list when the candidates are known there, else one sync."""
        host = self.host_counts(n_top)
        if host is not None:
            return all(n == c for n, c in zip(host, self.host_cand))
        if isinstance(n_top, list):
            n_top = torch.tensor(n_top, device=self.call.query.device)[:, None]  # (not on a decode path)
        return bool((self._as_tensor(n_top).clamp_min(0) >= self.n_cand).all())

    def _as_tensor(self, n_top) -> torch.Tensor:
        """``n_top`` as a long tensor on the call's device, built there for an int (no host→device copy)."""
        if isinstance(n_top, torch.Tensor):
            return n_top.long()
        if not isinstance(n_top, int):
            raise TypeError(f"KeyPlan: n_top must be an int or a tensor (per-row ints go in `host`), got {type(n_top).__name__}")
        return torch.full((self.call.batch, 1), n_top, dtype=torch.long, device=self.call.query.device)

    def counts(self, n_top: torch.Tensor | int) -> torch.Tensor:
        """``n_top`` (an int, ``(B, 1)`` or ``(B, H)`` per head) clamped to each row's candidates."""
        call = self.call
        n = self._as_tensor(n_top)
        n = n.expand(call.batch, 1) if n.dim() < 2 else n  # (B, 1), or (B, H): one count per head
        return n.minimum(self.n_cand).clamp_min(0)

    def pooled(self, scores: torch.Tensor, kernel: int) -> torch.Tensor:
        """Candidate ``scores (B, H, hi - lo)`` max-pooled over ``kernel`` neighbouring keys (a key
        next to a high-scoring one ranks with it: the rest of a span being read). Non-candidates (a
        padded row's padding, sinks and window) are set to ``-inf`` first, so they never spread;
        ``kernel <= 1`` returns ``scores``."""
        if kernel <= 1:
            return scores
        if self.cand_mask is not None:
            scores = scores.masked_fill(~self.cand_mask[:, None, :], float("-inf"))
        return pool1d(scores, kernel, "max")

    def top(self, scores: torch.Tensor, n_top: torch.Tensor | int, host: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Physical positions ``(B, H, k)`` of the ``n_top`` best candidates by ``scores (B, H, hi -
        lo)`` (higher = keep), sorted, and their validity (``None`` when every row took ``k``).
        Non-candidates (a padded row's padding, sinks and window) are never taken; ties go to the
        earlier position (:func:`select_topk`), so the choice does not depend on the device.

        ``host``: the per-row ``n_top`` as ints when the caller knows them and ``n_top`` is their
        device twin (a tensor); an ``int`` ``n_top`` needs none. With host counts the width ``k``
        and whether every row takes it are decided without reading the device (else one sync each).
        """
        if scores.shape[-1] != self.hi - self.lo:
            raise ValueError(f"KeyPlan: scores cover {scores.shape[-1]} keys, the candidates [{self.lo}, {self.hi})")
        k, per_row = self._width(n_top, host)
        if k == 0:
            return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device), None
        if self.cand_mask is not None:
            scores = scores.masked_fill(~self.cand_mask[:, None, :], float("-inf"))
        top, valid = select_topk(scores, k, per_row)
        return top + self.lo, valid

    def top_of(self, cand: torch.Tensor, cand_valid: torch.Tensor | None, scores: torch.Tensor,
               n_top: torch.Tensor | int, host: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`top` of ``n_top`` among a shortlist: ``cand (B, H, m)`` physical positions (sorted,
        e.g. a wider :meth:`top`), ``cand_valid`` their validity (``None``: all valid), ``scores (B,
        H, m)`` their new ranking (higher = keep). Each row takes as many as :meth:`top` would
        (``n_top`` clamped to its candidates, which the shortlist must hold); ties go to the earlier
        position. Returns sorted positions and their validity (``None`` when every row took ``k``)."""
        if scores.shape != cand.shape:
            raise ValueError(f"KeyPlan.top_of: scores {tuple(scores.shape)} for a shortlist {tuple(cand.shape)}")
        k, per_row = self._width(n_top, host)
        if k > cand.shape[-1]:
            raise ValueError(f"KeyPlan.top_of: {k} keys asked of a shortlist of {cand.shape[-1]}")
        if k == 0:
            return cand[..., :0], None
        if cand_valid is not None:
            scores = scores.masked_fill(~cand_valid, float("-inf"))
        pick, valid = select_topk(scores, k, per_row)
        return cand.gather(-1, pick), valid  # sorted: ``cand`` and ``pick`` both are

    def _width(self, n_top, host) -> tuple[int, torch.Tensor | None]:
        """What :meth:`top` takes: the width ``k`` (the most any row takes) and, when rows take
        different counts, the per-row counts ``(B, 1 | H, 1)`` for :func:`select_topk` (else
        ``None``). From the host counts when known (no device read), else one sync each."""
        counts = self.host_counts(host if host is not None else n_top)
        if counts is not None:
            k = max(counts, default=0)
            if all(n == k for n in counts):
                return k, None
            return k, self.counts(n_top)[:, :, None]
        per_row = self.counts(n_top)
        k = int(per_row.max()) if per_row.numel() else 0
        if k == 0:
            return 0, None
        return k, None if bool((per_row == k).all()) else per_row[:, :, None]

    def selection(self, top: torch.Tensor | None, top_valid: torch.Tensor | None = None, kind: str = "keys",
                  heads: int = 1, complete: bool = False, taken: list[int] | None = None) -> Selection:
        """The chosen candidates ``top`` (from :meth:`top`, possibly reused from an earlier call) plus
        the always-kept keys, as a :class:`Selection` of ``kind``. ``top=None``: none taken
        (``heads`` then gives the selection's head count). ``taken``: the valid entries of each
        row of ``top`` on the host (its :meth:`host_counts`), which lets a padded call size its
        selection without reading the device (and, for ``"keep"``, tells the evicting cache what
        each row then holds)."""
        call = self.call
        dev = call.query.device
        if top is None:
            top = torch.empty(call.batch, heads, 0, dtype=torch.long, device=dev)
            taken = [0] * call.batch
        elif top_valid is None:
            taken = [top.shape[-1]] * call.batch
        if not self.padded:
            return Selection(kind, top, top_valid, prefix=self.lo, suffix=call.k_len - self.hi, complete=complete)
        keep = self._always[:, None, :].expand(call.batch, top.shape[1], call.k_len).clone()
        if top.shape[-1]:
            keep |= mask_from_indices(top, call.k_len, top_valid)
        real = self.host_real
        if real is None or taken is None or self.host_cand is None:
            idx, valid = indices_from_mask(keep)  # widths from the device (one sync each)
            return Selection(kind, idx, None if bool(valid.all()) else valid, complete=complete)
        widths = [r - c + t for r, c, t in zip(real, self.host_cand, taken)]  # always-kept + taken, per row
        idx, valid = indices_from_mask(keep, max(widths))
        kept = tuple(widths) if kind == "keep" else None  # every head of a row keeps that many: the cache's count
        return Selection(kind, idx, None if len(set(widths)) == 1 else valid, complete=complete, kept_rows=kept)

    def select(self, scores: torch.Tensor | None, n_top: torch.Tensor | int, kind: str = "keys",
               host: list[int] | None = None) -> Selection:
        """:meth:`top` then :meth:`selection`; ``scores`` may be ``None`` when ``n_top`` is 0.
        ``host``: the per-row ``n_top`` as ints (see :meth:`top`)."""
        counts = self.host_counts(host if host is not None else n_top)
        complete = self.covers(host if host is not None else n_top)
        if scores is None:
            taking = any(counts) if counts is not None else bool((self.counts(n_top) > 0).any())
            if taking:
                raise ValueError("KeyPlan.select: scores are needed to take candidates")
            return self.selection(None, None, kind, complete=complete)
        top, valid = self.top(scores, n_top, host)
        return self.selection(top, valid, kind, heads=scores.shape[1], complete=complete, taken=counts)


def fixed_budget(call, budget: int | float, name: str, minimum: int = 1) -> torch.Tensor:
    """Rows an evicting cache may hold per sequence, ``(B, 1)`` long: ``budget`` resolved against
    the real tokens of the first prefill (a share) and stored with the cache (``seq_state[name]``),
    so the cache stays that size while generating; at least ``minimum``. Its host copy (a tuple of
    ints, ``seq_host[name]``; see :func:`fixed_budget_host`) is recorded at the same time: for a
    share, by reading the device once, at the prefill."""
    cache = call.evicting
    if call.kind == "prefill" or name not in cache.seq_state:
        rows = cache.seq_state[name] = resolve_budget_rows(budget, call.n_real).clamp_min(minimum)
        if isinstance(budget, int):
            cache.seq_host[name] = (max(int(budget), minimum),) * call.batch
        else:
            cache.seq_host[name] = tuple(rows[:, 0].tolist())
    return cache.seq_state[name]


def fixed_budget_host(call, name: str) -> tuple[int, ...] | None:
    """The host copy of :func:`fixed_budget` ``name`` (call that first), or ``None`` when a batch
    operation the copy could not follow dropped it."""
    return call.evicting.seq_host.get(name)


class HostEviction:
    """An eviction decided on the host: each sequence's budget (:func:`fixed_budget_host`) and the
    real rows its cache holds (``EvictingLayer.host_valid``), as ints. Build it with
    :func:`host_eviction`; a method that keeps the same number of rows in every KV head of a
    sequence then sizes its choice without reading the device."""

    def __init__(self, budgets: tuple[int, ...], held: tuple[int, ...]):
        self.budgets, self.held = tuple(budgets), tuple(held)

    @property
    def fits(self) -> bool:
        """Every sequence holds no more rows than its budget: nothing to evict."""
        return all(v <= b for v, b in zip(self.held, self.budgets))

    @property
    def kept(self) -> tuple[int, ...]:
        """The rows each sequence holds after the eviction (``min(held, budget)``)."""
        return tuple(min(v, b) for v, b in zip(self.held, self.budgets))


def host_eviction(call, name: str) -> HostEviction | None:
    """:class:`HostEviction` of budget ``name`` (call :func:`fixed_budget` first), or ``None`` when
    the cache lost either host record (a batch reorder of unequal rows, a pruned pass): the caller
    then reads the counts from the device."""
    budgets, held = fixed_budget_host(call, name), call.evicting.host_valid
    if budgets is None or held is None:
        return None
    return HostEviction(budgets, held)


def uniform_or(host: list[int] | tuple[int, ...] | None, on_device):
    """``host[0]`` when the host counts are known and every row has the same (an ``int``: nothing
    to build on the device), else ``on_device()`` (their device twin, or the device value when
    ``host`` is ``None``)."""
    if host is not None and len(set(host)) == 1:
        return host[0]
    return on_device()


def row_budgets(call, budget: int | float, offset: int = 0) -> tuple[torch.Tensor | int, list[int] | None]:
    """``resolve_budget_rows(budget, call.n_real) + offset`` for a :class:`KeyPlan`: ``(value,
    host)``. ``host`` lists the per-row counts as ints when the call knows its rows on the host
    (:attr:`~tokensparse.engine.call.AttentionCall.host_real`), else ``None``; ``value`` is then an
    ``int`` when every row gets the same count (nothing to build on the device), else the ``(B, 1)``
    tensor (the device twin of ``host``)."""
    real = call.host_real
    host = None if real is None else [resolve_budget(budget, r) + offset for r in real]
    return uniform_or(host, lambda: resolve_budget_rows(budget, call.n_real) + offset), host


def everything(call, kind: str) -> Selection:
    """"Every key" for a method whose budget covers the whole call: ``Selection.dense()``, or, when
    the sparse paths are forced (tests), a concrete selection of every real key (every valid cache
    row for ``keep``) so that the executor of ``kind`` runs on it."""
    if not sparse_paths_forced():
        return Selection.dense()
    if kind == "blocks":
        raise ValueError("everything(call, 'blocks') needs block sizes: use engine.blocks.everything_blocks")
    if kind == "keep":
        valid = call.evicting.valid_rows()  # (B, Hkv, n): per-head holes of an evicted cache included
    elif call.key_valid is None:
        idx = torch.arange(call.k_len, device=call.query.device).expand(call.batch, 1, call.k_len)
        return Selection(kind, idx, complete=True)
    else:
        valid = call.key_valid[:, None, :]
    idx, ok = indices_from_mask(valid)
    return Selection(kind, idx, None if bool(ok.all()) else ok, complete=True)


# --------------------------------------------------------------------------------------------------
# running a method on one call
# --------------------------------------------------------------------------------------------------


def run(method, call) -> torch.Tensor:
    """The default ``Method.forward``: select, then :func:`execute`."""
    if method.needs_evicting_cache and call.require_evicting_cache(method.name) is None:
        return call.dense(method.key_bias(call))  # use_cache=False: nothing is stored, nothing to evict
    with call.session.selecting():
        selection = method.select(call)
    return execute(call, selection, impl=getattr(method, "impl", "fast"), bias=method.key_bias(call))


def execute(call, selection: Selection | None, impl: str = "fast", bias=None) -> torch.Tensor:
    """Attention output ``(B, Hq, Lq, D)`` of ``call`` under ``selection`` (see the module doc)."""
    session = call.session
    if selection is None:
        return call.dense(bias)
    session.count("calls")
    if selection.kind == "dense" or (selection.complete and not sparse_paths_forced()):
        session.count("dense_calls")
        session.observe(call, Selection.dense())
        return call.dense(bias)
    record_sparse(call, selection, counted=True)
    kind = selection.kind
    if kind == "rows":
        idx, valid = selection.full_idx(call.k_len)
        if idx.shape[1] == 1:  # one set for every head: the per-KV-head form keeps K/V unexpanded
            idx = idx.expand(call.batch, call.n_kv_heads, idx.shape[-1])
            valid = None if valid is None else valid.expand_as(idx)
        if selection.route is not None:  # block-sparse among the kept rows (engine/compressed.py)
            return compress_blocks_attend_scatter(call.query, call.key, call.value, idx, selection.route, call.scale,
                                                  call.key_valid, impl=impl, valid=valid, bias=bias,
                                                  forced=sparse_paths_forced())
        return compress_attend_scatter(call.query, call.key, call.value, idx, call.scale, call.key_valid, impl=impl,
                                       valid=valid, bias=bias)
    if kind == "keys":
        return _attend_keys(call, selection, impl, bias)
    if kind == "blocks":
        ev = call.evicting
        if ev is not None and (ev.evicted or ev.has_empty_rows):
            raise ValueError("a 'blocks' selection needs cache rows at their token positions (no evicted or empty rows)")
        return block_attend(call.query, call.key, call.value, selection, call.scale, key_valid=call.key_valid,
                            impl=impl, bias=bias)
    if kind == "keep":
        out = call.dense(bias)
        idx, valid = selection.full_idx(call.k_len)
        if idx.shape[1] == 1:  # one set for every KV head
            idx = idx.expand(call.batch, call.n_kv_heads, idx.shape[-1])
            valid = None if valid is None else valid.expand_as(idx)
        if selection.synthetic is not None:
            call.evicting.keep(idx, valid, synthetic=selection.synthetic)
        else:
            call.evicting.keep(idx, valid, kept_rows=selection.kept_rows)
        return out
    raise AssertionError(kind)


def record_dense(call) -> None:
    """Count and observe a call the method attended densely itself (e.g. with
    :meth:`~tokensparse.engine.call.AttentionCall.dense_with_probs`), as :func:`execute` does for a
    dense selection."""
    call.session.count("calls")
    call.session.count("dense_calls")
    call.session.observe(call, Selection.dense())


def record_sparse(call, selection: Selection, counted: bool = False) -> None:
    """Count and observe a sparse ``selection`` that a method executes itself (e.g. Rectified
    SpaAttn's corrected block-sparse attention), as :func:`execute` does (``counted``: the call
    is already counted in ``calls``)."""
    session = call.session
    if not counted:
        session.count("calls")
    session.count("sparse_calls")
    session.count("kept_keys", selection.kept_count())  # a device count with filler entries: no sync
    session.count("total_keys", call.k_len)
    session.observe(call, selection)


def _attend_keys(call, sel: Selection, impl: str, bias) -> torch.Tensor:
    """Decode-time selection over the full cache.

    One decode query of an unpadded fp32 call with ``prefix``/``suffix`` ranges: one softmax over
    cache views of the two ranges plus the gathered middle rows (:func:`segments_attend`), the
    gathered rows kept in the layer's state and reused while the method returns the same ``idx``
    tensor (a reused selection) on the same cache buffer. Otherwise (chunks, bf16/fp16 where SDPA's
    own rounding is the dense reference, padded batches): a flat ``index_select`` of every selected
    row and SDPA under the call's mask.
    """
    q, k, v = call.query, call.key, call.value
    length, lq = call.k_len, call.q_len
    if sel.heads not in (1, call.n_kv_heads):
        raise ValueError(f"a 'keys' selection needs 1 or {call.n_kv_heads} heads, got {sel.heads}")
    structured = sel.prefix or sel.suffix
    if impl == "fast" and structured and lq == 1 and q.dtype == torch.float32 and call.mask is None and sel.valid is None:
        lo, hi = sel.prefix, length - sel.suffix
        segments = [(k[:, :, :lo], v[:, :, :lo])]
        if sel.idx.shape[-1]:
            segments.append(_gathered(call, sel.idx, sel.page))
        segments.append((k[:, :, hi:], v[:, :, hi:]))
        positions = None
        if bias is not None:  # key positions of the segments, only where a bias needs them
            positions = [torch.arange(0, lo, device=q.device)[None, None]]
            if sel.idx.shape[-1]:
                positions.append(sel.idx)
            positions.append(torch.arange(hi, length, device=q.device)[None, None])
        return segments_attend(q, segments, call.scale, bias=bias, positions=positions)
    idx, valid = sel.full_idx(length)
    if idx.shape[1] == 1:
        idx = idx.expand(call.batch, call.n_kv_heads, idx.shape[-1])
        valid = None if valid is None else valid.expand_as(idx)
    full = call.mask
    mask = None
    if full is not None:  # padding, evicted holes, causality: the call's own mask at the selected keys
        full = full.expand(call.batch, call.n_kv_heads, lq, length)
        mask = full.gather(-1, idx[:, :, None, :].expand(-1, -1, lq, -1))
    elif lq > 1:
        qpos = torch.arange(length - lq, length, device=q.device)
        mask = idx[:, :, None, :] <= qpos[None, None, :, None]  # causal inside the chunk
    if valid is not None:
        mask = valid[:, :, None, :] if mask is None else mask & valid[:, :, None, :]
    return gather_attend(q, k, v, idx, call.scale, mask, impl=impl, bias=bias)


def _gathered(call, idx: torch.Tensor, page: int = 0):
    """K/V rows ``idx (B, 1|Hkv, n)`` of the call's cache, gathered once per ``idx`` tensor and cache
    buffer (cache rows never change in place on a growing cache, so a reused selection reuses them)."""
    state = call.layer.gathered
    key = (idx, call.key.untyped_storage().data_ptr(), getattr(call.cache_layer, "generation", 0))
    if state is not None and state[0][0] is idx and state[0][1:] == key[1:]:
        return state[1]
    sel = idx.expand(call.batch, call.n_kv_heads, idx.shape[-1])
    if page:  # whole aligned pages: one copy per page
        pages = sel[..., ::page] // page
        rows = (gather_pages(call.key, pages, page), gather_pages(call.value, pages, page))
    else:
        rows = gather_kv_rows(call.key, call.value, sel)
    call.layer.gathered = (key, rows)
    return rows
