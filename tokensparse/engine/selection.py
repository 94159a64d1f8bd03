"""Scorers and selectors shared by methods: windowed softmax scores, pooling, GQA aggregation, budgets.

Conventions as in :mod:`tokensparse.engine.executors`. Scores are "higher = keep".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Spec, check_value
from .hostsync import host_read_is_free

GQA_REDUCTIONS = ("mean", "max", "sum")


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``q (B, Hq, W, D)`` · ``k (B, Hkv, C, D)`` → ``(B, Hq, W, C)`` in fp32 without repeating K."""
    b, hq, w, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = hq // hkv
    s = q.float().reshape(b, hkv, g * w, d) @ k.float().transpose(-1, -2)
    return (s * scale).view(b, hkv, g, w, c).reshape(b, hq, w, c)


def grouped_dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q (B, Hkv, M, D)`` · ``k (B, Hkv, C, D)``ᵀ → ``(B, Hkv, M, C)`` in ``k``'s dtype.

    One batched matmul, except for bf16/fp16 keys on a CPU: there a batched matmul over a strided
    cache view (a prefix of a preallocated buffer) was measured taking a slow path (1.44 vs 0.21 ms
    for 3 heads × 7.8K keys) while one ``F.linear`` per (sequence, KV head) reads the view in
    place, so that loop stays for them (on the 2-core test machine of torch 2.13 the batched
    matmul was not slower there either: 2.4 vs 3.2 ms; kept for the machine that measured it).
    Everywhere else the loop would cost a kernel launch per head; fp32 on that CPU: 0.79 vs 0.74 ms
    at 3 heads × 7.8K keys, 6.3 vs 6.6 ms at 8 × 16K, 0.018 vs 0.084 ms at 2 × 40 (same values).
    """
    if k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float16):
        b, h = k.shape[:2]
        out = torch.empty(b, h, q.shape[2], k.shape[2], dtype=k.dtype, device=k.device)
        for i in range(b):
            for j in range(h):
                torch.nn.functional.linear(q[i, j], k[i, j], out=out[i, j])
        return out
    return torch.matmul(q.to(k.dtype), k.transpose(-1, -2))


def window_scores(
    q_win: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """Mean softmax probability that the last ``W`` queries give each key: ``(B, Hq, Lk)``.

    ``q_win (B, Hq, W, D)`` are the queries at absolute positions ``Lk-W .. Lk-1``; the causal mask
    only bites inside that window. Memory is ``O(W · chunk)`` per head, never ``Lk × Lk``: when
    ``Lk <= chunk`` one fused softmax runs over the ``W × Lk`` logits; longer contexts take two
    passes over key chunks (online max/sum, then probabilities), as the official kernel does.
    ``key_valid (B, Lk)``: False keys (padding) get probability 0.
    """
    b, hq, w, d = q_win.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    neg = torch.finfo(torch.float32).min
    qs = (q_win.float() * scale).reshape(b, hkv, g * w, d)  # scale folded into the W queries
    kf = k.float()
    causal_tail = torch.ones(w, w, dtype=torch.bool, device=q_win.device).triu_(1)  # (W, W) True = masked

    def logits(start: int, stop: int) -> torch.Tensor:
        s = (qs @ kf[:, :, start:stop].transpose(-1, -2)).view(b, hkv, g, w, stop - start)
        lo = max(start, lk - w)  # keys inside the window: causal mask
        if lo < stop:
            s[..., lo - start :].masked_fill_(causal_tail[:, lo - (lk - w) : stop - (lk - w)], neg)
        if key_valid is not None:
            s.masked_fill_(~key_valid[:, None, None, None, start:stop], neg)
        return s

    if lk <= chunk:
        return torch.softmax(logits(0, lk), dim=-1).mean(3).reshape(b, hq, lk)
    m = torch.full((b, hkv, g, w, 1), neg, device=q_win.device)
    l = torch.zeros(b, hkv, g, w, 1, device=q_win.device)
    for start in range(0, lk, chunk):
        s = logits(start, min(lk, start + chunk))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        l = l * torch.exp(m - m_new) + torch.exp(s - m_new).sum(-1, keepdim=True)
        m = m_new
    out = torch.empty(b, hkv, g, lk, device=q_win.device)
    for start in range(0, lk, chunk):
        stop = min(lk, start + chunk)
        s = logits(start, stop)
        out[..., start:stop] = s.sub_(m).exp_().div_(l).mean(3)
    return out.reshape(b, hq, lk)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention probability each key receives, summed over the call's queries: ``(B, Hq, Lk)`` fp32.

    ``q (B, Hq, Lq, D)`` are the last ``Lq`` positions of the ``Lk`` keys; ``mask`` bool
    ``(B, 1|Hkv|Hq, Lq, Lk)`` (True = attend) or ``None`` for bottom-right causal;
    ``query_valid (B, Lq)`` False for padding queries, which add nothing. Queries run in chunks of
    ``chunk`` rows (memory ``O(chunk · Lk)`` per head). The scores H2O accumulates.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, lk, device=q.device)
    neg = torch.finfo(torch.float32).min
    for c0 in range(0, lq, chunk):
        c1 = min(lq, c0 + chunk)
        s = grouped_logits(q[:, :, c0:c1], k, scale)  # (B, Hq, c, Lk)
        if mask is None:
            qpos = torch.arange(lk - lq + c0, lk - lq + c1, device=q.device)
            allowed = (torch.arange(lk, device=q.device)[None, :] <= qpos[:, None])[None, None]
        else:
            allowed = mask[:, :, c0:c1]
            if allowed.shape[1] not in (1, hq):
                allowed = allowed.repeat_interleave(hq // allowed.shape[1], dim=1)
        p = s.masked_fill(~allowed, neg).softmax(-1) * allowed.any(-1, keepdim=True)  # rows that see nothing: 0
        if query_valid is not None:
            p = p * query_valid[:, None, c0:c1, None]
        out += p.sum(2)
    return out


def window_scores_reference(q_win, k, scale, key_valid=None) -> torch.Tensor:
    """Unchunked twin of :func:`window_scores` (full ``W × Lk`` softmax), for tests."""
    b, hq, w, _ = q_win.shape
    lk = k.shape[2]
    s = grouped_logits(q_win, k, scale)
    qpos = torch.arange(lk - w, lk, device=q_win.device)
    allowed = (torch.arange(lk, device=q_win.device)[None, :] <= qpos[:, None])[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return s.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1).mean(2)


def pool1d(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Smooth scores ``(..., L)`` along the last axis with stride 1 and same length.

    ``kernel <= 1`` returns the input. Even kernels are allowed (padding ``kernel // 2`` then trimmed).
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    pad = kernel // 2
    if kind == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=True)
    elif kind == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=pad)
    else:
        raise ValueError(f"pooling kind must be 'avg' or 'max', got {kind!r}")
    return y[..., : shape[-1]].reshape(shape)


def aggregate_gqa(scores: torch.Tensor, n_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Per-query-head scores ``(B, Hq, L)`` → per-KV-head ``(B, Hkv, L)`` over each query group."""
    b, hq, length = scores.shape
    s = scores.view(b, n_kv_heads, hq // n_kv_heads, length)
    if how == "mean":
        return s.mean(2)
    if how == "max":
        return s.amax(2)
    if how == "sum":
        return s.sum(2)
    raise ValueError(f"GQA reduction must be one of {GQA_REDUCTIONS}, got {how!r}")


def coverage_keep_count(
    scores: torch.Tensor, tau: float, min_keep: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Token Sparse Attention's Dynamic Token Coverage: how many tokens each row keeps, ``(B, 1)`` long.

    ``scores (B, H, N)`` are per-head candidate scores. They are averaged over heads and normalised
    to sum to 1; the lowest-scored tokens whose cumulative mass stays below ``tau`` may be dropped
    (plus one more when any is dropped, as in the official code). The count is at least
    ``min_keep``. ``valid (B, N)``: real candidates; padding takes no part and is never counted, so
    a row of a padded batch gets the count it would get alone.
    """
    b, _, n = scores.shape
    n_real = torch.full((b, 1), n, dtype=torch.long, device=scores.device) if valid is None else valid.long().sum(-1, keepdim=True)
    if tau <= 0:
        return n_real
    glob = scores.float().mean(1)  # (B, N)
    if valid is not None:
        glob = glob * valid
    glob = glob / glob.sum(-1, keepdim=True).clamp_min(1e-30)
    if valid is not None:
        glob = glob.masked_fill(~valid, float("inf"))  # padding sorts last and never counts as dropped
    csum = glob.sort(-1).values.cumsum(-1)
    n_drop = (csum < tau).long().sum(-1, keepdim=True)
    n_drop = torch.where(n_drop > 0, n_drop + 1, n_drop)
    keep = (n_real - n_drop).clamp(max=n_real)
    return torch.maximum(n_real.clamp(max=min_keep), keep)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last axis, sorted ascending (long).

    Deterministic on every device: ties are broken by position (the earlier token wins), see
    :func:`select_topk`.
    """
    return select_topk(scores, min(k, scores.shape[-1]))[0]


def _topk_by_threshold(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """:func:`select_topk`'s set (no ``counts``), ascending, from one float top-k and its k-th value
    ``t``: every score above ``t``, then the earliest positions equal to ``t`` (ties broken as the
    order keys break them). When the top set has no tie at ``t`` (the usual case for unpooled
    scores) the top-k's own indices, sorted. ``None`` where the values do not order (NaN): the
    caller takes the keys. Reads the device (a CPU path)."""
    vals, ids = scores.topk(k, dim=-1, sorted=False)
    kth = vals.amin(-1, keepdim=True)
    at_least = scores >= kth
    if bool((at_least.sum(-1) == k).all()):
        return ids.sort(-1).values
    above = scores > kth
    tied = at_least & ~above
    room = k - above.sum(-1, keepdim=True)  # positions left for the tied scores
    take = above | (tied & (tied.cumsum(-1) <= room))
    pos = take.nonzero()[:, -1]  # row-major: each row's positions ascending
    if pos.numel() != vals.numel():  # NaN somewhere in the top set
        return None
    return pos.view(vals.shape)


#: :func:`_topk_prefiltered` runs where rows with per-row counts are at least this long (twice as
#: long without counts: one plain float top-k is then the path it must beat), and over at most
#: this many rows (it loops over them in Python). Below, its fixed per-row cost loses
#: (``docs/results/decode_suite/topk_shortlist.md``: 1-thread AMD EPYC, k = 1023)
PREFILTER_MIN_LEN = 16384
PREFILTER_MAX_ROWS = 64


def _topk_prefiltered(scores: torch.Tensor, k: int, counts: torch.Tensor | None = None,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`select_topk`'s answer (same set, same ties, same padding) from a shortlist: a CPU path.

    The row's first ``n · block`` scores fall into ``n`` disjoint groups of ``block`` (strided:
    group ``i`` holds positions ``i, i + n, ...``, a reduction over contiguous rows), the rest into
    groups of one; their maxima are distinct scores, so the smallest of their best ``k`` is no larger than the row's
    ``k``-th best score: every score at or above it is a candidate, and nothing of the top-``k``
    (nor a score tied with its ``k``-th) is outside. A row's candidates (~1.1 ``k`` for Gaussian
    scores with groups of 8) are compacted and ranked by :func:`_topk_by_threshold`, whose ties go
    to the earliest candidate, i.e. the earliest position. ``block`` defaults to ``L // (4k)``
    capped at 8 (at least ``4k`` groups, so the floor is a tight one); below 4 the shortlist is
    too long to pay and the function declines. Timings against one top-k over the row:
    ``docs/results/decode_suite/topk_shortlist.md``. ``None`` (the caller goes on) where it
    declines or a row holds NaN. Reads the device."""
    length = scores.shape[-1]
    lead = scores.shape[:-1]
    if block is None:
        block = min(8, length // max(4 * k, 1))
        if block < 4:
            return None
    n_blocks = length // block
    if k == 0 or n_blocks < k or scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    rows = scores.reshape(-1, length)
    maxima = rows[:, : n_blocks * block].view(-1, block, n_blocks).amax(1)
    if length > n_blocks * block:  # the remainder joins as groups of one (so a NaN there is seen too)
        maxima = torch.cat([maxima, rows[:, n_blocks * block :]], -1)
    floor = maxima.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # <= each row's k-th best
    if bool(floor.isnan().any()):
        return None
    take = [k] * rows.shape[0] if counts is None else \
        counts.to(dtype=torch.long).expand(*lead, 1).clamp(0, k).reshape(-1).tolist()
    above = rows >= floor
    out = torch.full((rows.shape[0], k), length - 1, dtype=torch.long)
    for r, n in enumerate(take):
        if n == 0:
            continue
        pos = above[r].nonzero().squeeze(-1)  # ascending
        best = _topk_by_threshold(rows[r].index_select(0, pos)[None], n)
        if best is None:  # NaN among the candidates
            return None
        out[r, :n] = pos.index_select(0, best[0])
    idx = out.view(*lead, k)
    if counts is None:
        return idx, None
    return idx, torch.arange(k) < torch.tensor(take).view(*lead, 1)


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys ordered as (score, then earlier position): ``(..., L)``.

    The fp32 bits of a score are mapped to an int32 that sorts like the float (negative values
    have their magnitude bits flipped), shifted into the high half; the low half holds
    ``L - 1 - position``, so among equal scores the earlier position has the larger key.
    """
    length = scores.shape[-1]
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they tie)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # sorts like the float values
    rev_pos = torch.arange(length - 1, -1, -1, device=scores.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | rev_pos


def _cpu_topk(scores: torch.Tensor, k: int, counts: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`select_topk` on a CPU without the order keys: the block-maxima shortlist for long
    rows (:func:`_topk_prefiltered`), else (no ``counts``) one float top-k and its ties
    (:func:`_topk_by_threshold`). ``None``: the keys decide (NaN, or per-row counts on short rows)."""
    length = scores.shape[-1]
    rows = scores.numel() // max(length, 1)
    if length >= PREFILTER_MIN_LEN * (1 if counts is not None else 2) and rows <= PREFILTER_MAX_ROWS:
        fast = _topk_prefiltered(scores, k, counts)
        if fast is not None:
            return fast
    if counts is None:
        fast = _topk_by_threshold(scores, k)
        return None if fast is None else (fast, None)
    return None


def select_topk(
    scores: torch.Tensor, k: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic top-k: ``(idx, valid)`` with ``idx (..., k)`` sorted ascending.

    Order: higher score first, then lower position. ``torch.topk`` breaks ties differently on
    CPU and CUDA (pooled scores tie often), so it runs on distinct keys that encode the score and
    the position (:func:`_order_keys`): the chosen set no longer depends on the device or kernel.

    ``counts`` (broadcastable to ``scores.shape[:-1] + (1,)``, long): per-row number to take
    (``<= k``). Entries past a row's count are invalid: ``valid`` is False there and their index
    is the row's last position (``L - 1``), so ``idx`` stays sorted and in range. ``valid`` is
    ``None`` when ``counts`` is ``None`` (every entry valid).
    """
    length = scores.shape[-1]
    if not 0 <= k <= length:
        raise ValueError(f"top-k of {k} out of {length} scores")
    lead = scores.shape[:-1]
    dev = scores.device
    if k == 0:
        idx = torch.empty(*lead, 0, dtype=torch.long, device=dev)
        return idx, (None if counts is None else torch.ones_like(idx, dtype=torch.bool))
    low = (1 << 32) - 1
    if scores.dtype == torch.float64:  # wider than the keys hold: a stable sort gives the same order
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        if counts is None:
            return best.sort(-1).values, None
        n = counts.to(device=dev, dtype=torch.long).expand(*lead, 1).clamp(0, k)
        taken = torch.arange(k, device=dev) < n
        return torch.where(taken, best, length).sort(-1).values.clamp_max(length - 1), taken
    # CPU fast paths (the keys cost ~3x a top-k; ``_cpu_topk``): the same set from float top-ks,
    # ties at the k-th value resolved by position. They read the device, so an accelerator always
    # takes the keys
    if host_read_is_free(scores):
        fast = _cpu_topk(scores, k, counts)
        if fast is not None:
            return fast
    if counts is None:
        top = _order_keys(scores).topk(k, dim=-1, sorted=False).values
        return ((length - 1) - (top & low)).sort(-1).values, None
    top = _order_keys(scores).topk(k, dim=-1, sorted=True).values  # best first
    n = counts.to(device=dev, dtype=torch.long).expand(*lead, 1).clamp(0, k)
    taken = torch.arange(k, device=dev) < n
    pos = torch.where(taken, (length - 1) - (top & low), length)  # not taken: sorts last
    idx = pos.sort(-1).values.clamp_max(length - 1)
    return idx, taken


def mask_from_indices(idx: torch.Tensor, length: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., length)`` bool, True at the positions ``idx (..., k)`` holds; the inverse of
    :func:`indices_from_mask`. Entries with ``valid`` False are ignored (``scatter_add``, not
    ``scatter``: a filler entry may repeat a selected position and must not clear it)."""
    marks = torch.ones_like(idx) if valid is None else valid.long()
    out = torch.zeros(*idx.shape[:-1], length, dtype=torch.long, device=idx.device)
    return out.scatter_add_(-1, idx, marks) > 0


def indices_from_mask(mask: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of ``mask (..., L)``, ascending, padded to a common width.

    Returns ``(idx (..., k), valid (..., k))``; ``k`` defaults to the largest count over rows (one
    host synchronisation). Padding entries repeat position ``L - 1`` and are invalid.
    """
    length = mask.shape[-1]
    counts = mask.long().sum(-1, keepdim=True)
    if k is None:
        k = int(counts.max()) if mask.numel() else 0
    slot = torch.where(mask, mask.long().cumsum(-1) - 1, k)
    slot = slot.clamp_max(k)
    idx = torch.full((*mask.shape[:-1], k + 1), length - 1, dtype=torch.long, device=mask.device)
    idx.scatter_(-1, slot, torch.arange(length, device=mask.device).expand_as(slot))
    return idx[..., :k], torch.arange(k, device=mask.device) < counts


def resolve_budget(budget: int | float, total: int) -> int:
    """An absolute token count from ``budget``: ``int`` = tokens, ``float`` in (0, 1] = share of ``total``."""
    if isinstance(budget, float):
        return max(1, int(round(budget * total)))
    return int(budget)


def resolve_budget_rows(budget: int | float, totals: torch.Tensor) -> torch.Tensor:
    """:func:`resolve_budget` per row: ``totals`` (long tensor of real-token counts) → long tensor.

    A share rounds half to even, as Python's ``round`` does in :func:`resolve_budget`, so a row of
    a padded batch gets exactly the count it would get alone.
    """
    if isinstance(budget, float):
        return torch.round(totals.double() * budget).long().clamp_min(1)
    return torch.full_like(totals, int(budget))


def validate_budget(name: str, budget) -> None:
    """Reject booleans, non-positive counts and ratios outside (0, 1] with a clear message (the
    rule of a ``param(..., "budget")`` method field, for budgets that are not config fields)."""
    check_value("budget", name, Spec("budget"), budget)


# --------------------------------------------------------------------------------------------------
# what a method chose for one call
# --------------------------------------------------------------------------------------------------

SELECTION_KINDS = ("dense", "rows", "keys", "keep", "blocks")


@dataclass(eq=False)
class Selection:
    """What a method chose for one attention call; the engine's executor for ``kind`` applies it.

    ``kind``:

    * ``"dense"``: the method looked at the call and chose every key (observed as dense);
    * ``"rows"``: compress → attend → scatter (prefill): the selected positions restrict both the
      queries and the keys, per query head or per KV head (``idx`` with ``Hq`` or ``Hkv`` heads);
      with a ``route``, attention among the kept rows is block-sparse on a grid over them;
    * ``"keys"``: every query of the call attends only to the selected keys of the full cache
      (decode-time selection; ``idx`` with 1 or ``Hkv`` heads);
    * ``"keep"``: the call attends densely, then the evicting cache keeps only the selected rows
      (eviction; ``idx`` with ``Hkv`` heads);
    * ``"blocks"``: block-sparse attention (prefill): ``idx (B, H, nQB, n)`` lists, for each query
      block of ``block_q`` rows, the key blocks of ``block_k`` keys it reads, on a grid laid over
      each row's real tokens (see :mod:`tokensparse.engine.blocks`; ``H`` is 1, ``Hkv`` or ``Hq``).

    ``idx (B, H, n)`` are sorted physical key positions; ``valid`` (like ``idx``, or ``None`` =
    all valid) marks filler entries of rows that selected fewer than the widest row. ``prefix`` and
    ``suffix`` add the key ranges ``[0, prefix)`` and ``[Lk - suffix, Lk)`` to every row without
    listing them (sinks and a local window of an unpadded call: the decode executor reads them as
    views of the cache instead of gathering them); ``idx`` then lies strictly between the two.
    ``complete``: the selection holds every real key, so the engine runs the call dense unless the
    sparse paths are forced (:func:`tokensparse.engine.exercise_sparse_paths`).
    """

    kind: str
    idx: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    prefix: int = 0
    suffix: int = 0
    complete: bool = False
    block_q: int = 0
    block_k: int = 0
    #: ``"keys"`` only, optional: ``idx`` lists whole pages of ``page`` tokens aligned at multiples of
    #: ``page`` (Quest, Landmark); the decode executor then copies page by page instead of row by row
    page: int = 0
    #: ``"keep"`` only: synthetic rows the cache appends after the kept rows of each KV head
    #: (:class:`~tokensparse.engine.cache.SyntheticRows`, e.g. RazorAttention's compensation token)
    synthetic: object | None = None
    #: ``"keep"`` only, optional: the real rows each sequence keeps (the same in every KV head) as
    #: Python ints, when the method knows them on the host; the cache then keeps its host record of
    #: its rows without reading the device (``EvictingLayer.keep(kept_rows=...)``)
    kept_rows: tuple[int, ...] | None = None
    #: ``"rows"`` only, optional: attend among the selected rows block-sparse instead of densely — a
    #: :class:`~tokensparse.engine.compressed.BlockRoute` (a block router's rule applied to the
    #: compressed rows; :func:`~tokensparse.engine.compressed.compress_blocks_attend_scatter`)
    route: object | None = None

    def __post_init__(self):
        if self.kind not in SELECTION_KINDS:
            raise ValueError(f"selection kind must be one of {SELECTION_KINDS}, got {self.kind!r}")
        if self.route is not None and self.kind != "rows":
            raise ValueError("a block route comes with a 'rows' selection only")
        if self.synthetic is not None and self.kind != "keep":
            raise ValueError("synthetic rows come with a 'keep' selection only")
        if self.kept_rows is not None and self.kind != "keep":
            raise ValueError("kept_rows come with a 'keep' selection only")
        if self.kind != "dense" and self.idx is None:
            raise ValueError(f"a {self.kind!r} selection needs idx")
        if self.kind == "blocks":
            if self.idx.dim() != 4 or self.block_q < 1 or self.block_k < 1:
                raise ValueError("a 'blocks' selection needs idx (B, H, nQB, n) and block_q, block_k >= 1")
            if self.prefix or self.suffix:
                raise ValueError("a 'blocks' selection lists its blocks; prefix/suffix do not apply")

    @classmethod
    def dense(cls):
        return cls("dense", complete=True)

    @classmethod
    def rows(cls, idx, valid=None, **kw):
        return cls("rows", idx, valid, **kw)

    @classmethod
    def keys(cls, idx, valid=None, **kw):
        return cls("keys", idx, valid, **kw)

    @classmethod
    def keep(cls, idx, valid=None, **kw):
        return cls("keep", idx, valid, **kw)

    @property
    def heads(self) -> int:
        return self.idx.shape[1]

    def full_idx(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(idx, valid)`` with the ``prefix``/``suffix`` ranges listed (sorted)."""
        if not (self.prefix or self.suffix):
            return self.idx, self.valid
        b, h = self.idx.shape[:2]
        dev = self.idx.device
        pre = torch.arange(0, self.prefix, device=dev).expand(b, h, self.prefix)
        suf = torch.arange(length - self.suffix, length, device=dev).expand(b, h, self.suffix)
        idx = torch.cat([pre, self.idx, suf], dim=-1)
        if self.valid is None:
            return idx, None
        ones = torch.ones(b, h, 1, dtype=torch.bool, device=dev)
        valid = torch.cat([ones.expand(b, h, self.prefix), self.valid, ones.expand(b, h, self.suffix)], dim=-1)
        return idx, valid

    def mask(self, length: int) -> torch.Tensor:
        """``(B, H, length)`` bool: the positions this selection holds (filler entries ignored).
        Not defined for ``"blocks"`` (it depends on the query row): see
        :func:`tokensparse.engine.blocks.token_mask`."""
        if self.kind == "blocks":
            raise ValueError("a 'blocks' selection has a key set per query block; use engine.blocks.token_mask")
        out = mask_from_indices(self.idx, length, self.valid)
        if self.prefix:
            out[..., : self.prefix] = True
        if self.suffix:
            out[..., length - self.suffix :] = True
        return out

    def kept(self) -> float:
        """Selected keys per row and head, averaged (filler entries not counted; for ``"blocks"``:
        listed key blocks × ``block_k`` per query block, before causality trims the diagonal)."""
        return float(self.kept_count())

    def kept_count(self) -> float | torch.Tensor:
        """:meth:`kept` without a host synchronisation: a float when ``valid`` is ``None``, else a
        0-dim float tensor on the selection's device (what ``session.count`` sums there)."""
        if self.valid is None:
            n = float(self.idx.shape[-1])
            return n * self.block_k if self.kind == "blocks" else n + self.prefix + self.suffix
        n = self.valid.float().sum(-1).mean()
        n = n if n.device.type == "mps" else n.double()  # as kept() always added: in double
        return n * self.block_k if self.kind == "blocks" else n + (self.prefix + self.suffix)


@dataclass(eq=False)
class KeyBias:
    """An additive logit bias on a few key columns: ``value[b, h, j]`` is added to the logit of key
    ``pos[b, j]`` for every query of query head ``h`` (ZeroTuning's ``log γ`` on the first token,
    a compensation token's ``log N``).

    ``pos (B, n)`` long physical key positions; ``value (1 | B, Hq, n)`` float. Every executor applies
    it exactly, fast paths included (see :func:`tokensparse.engine.executors.with_key_bias`).
    """

    pos: torch.Tensor
    value: torch.Tensor

    def dense(self, b: int, hq: int, length: int) -> torch.Tensor:
        """The bias as a dense ``(B, Hq, 1, Lk)`` float tensor (the reference executors add it)."""
        out = torch.zeros(b, hq, length, dtype=torch.float32, device=self.pos.device)
        val = self.value.float().expand(b, hq, self.pos.shape[-1])
        out.scatter_add_(-1, self.pos[:, None, :].expand(b, hq, self.pos.shape[-1]), val)
        return out[:, :, None, :]
