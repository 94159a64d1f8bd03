"""Page selection over a full cache: the shared mechanics of page-based decode methods (Quest's
bounds, Landmark-style representative keys).

A method supplies how a page is summarised (a :class:`~tokensparse.engine.cache.PageSummary` kind,
kept by the cache on write) and how a query ranks the summaries (``top(query, summaries, k) ->
(B, Hkv, k)`` page indices); :func:`page_select` turns that into a ``"keys"`` selection: the chosen
pages plus the current (partial) page, read as one gathered set per KV head. Unpadded calls read
the cache-kept summaries (bytes read per step: the summaries, not the keys); in a left-padded batch
the page grid starts at each row's first real token, so a row chooses what it would alone, and the
summaries are computed per step from that row's keys.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .cache import PAGE_SUMMARIES, PageSummary
from .executors import gather_rows
from .pipeline import everything
from .selection import Selection, select_topk

#: ``top(query (B, Hq, 1, D), summaries: tuple of (B, Hkv, P, D), k) -> (B, Hkv, k)`` ascending page indices
TopPages = Callable[[torch.Tensor, tuple, int], torch.Tensor]


def _select_pages(call, page: int, n_pages: Callable[[int], int], choose) -> Selection:
    """The ``"keys"`` selection of whole pages plus the current one. ``choose(query, start, rows, k)``
    returns ``(rows of B, Hkv, k)`` ascending indices of the chosen pages among the full pages of the
    keys ``[start, Lk)`` (the current, last page excluded). Unpadded: one call over the cache
    (``start == 0``, every row); a left-padded batch: one call per row on its own grid."""
    p, n = page, call.k_len
    if call.key_valid is None:
        n_all, n_sel = -(-n // p), n_pages(n)
        if n_all <= n_sel:
            return everything(call, "keys")
        chosen = choose(call.query, 0, slice(None), n_sel - 1)
        idx = (chosen[..., None] * p + torch.arange(p, device=chosen.device)).flatten(-2)
        return Selection.keys(idx, suffix=n - (n_all - 1) * p, page=p)
    real = call.host_real  # each row's real tokens, on the host where the cache recorded its padding
    if real is None:
        real = call.n_real[:, 0].tolist()  # (a host synchronisation: not on a recorded full cache)
    if all(n_pages(r) >= -(-r // p) for r in real):
        return everything(call, "keys")
    rows = []
    for r, n_real in enumerate(real):
        start = n - n_real
        n_all, n_sel = -(-n_real // p), n_pages(n_real)
        if n_all <= n_sel:
            pages = torch.arange(n_all, device=call.key.device).expand(1, call.n_kv_heads, n_all)
            width = n_real
        else:
            chosen = choose(call.query[r : r + 1], start, slice(r, r + 1), n_sel - 1)
            pages = torch.cat([chosen, torch.full_like(chosen[..., :1], n_all - 1)], -1)
            width = (n_sel - 1) * p + n_real - (n_all - 1) * p  # full chosen pages + the partial last one
        rows.append((pages, start, width))
    return _row_pages(call, rows, p)


def _summaries(call, layer, kind: str, page: int, start: int, rows: slice, dtype: torch.dtype | None = None) -> tuple:
    """The ``kind`` summaries of pages of ``page`` keys, stored in ``dtype`` (``None``: the cache's):
    the cache-kept ones for an unpadded call (``start == 0``, every row), else one padded row's,
    computed from its real keys ``[start, Lk)`` on its own grid, rounded and laid out the same way
    (token-major with a ``dtype``, see :class:`~tokensparse.engine.cache.PageSummary`)."""
    if start == 0 and rows == slice(None):
        name = f"pages.{kind}.{page}" + ("" if dtype is None else f".{dtype}")
        return layer.state(name, lambda: PageSummary(page, kind, dtype)).summaries
    parts = PAGE_SUMMARIES[kind](call.key[rows, :, start:], page)
    if dtype is None:
        return parts
    return tuple(x.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for x in parts)  # token-major, as kept


def page_select(call, page: int, n_pages: Callable[[int], int], kind: str, top: TopPages, stats_prefix: str,
                layer=None, summary_dtype: torch.dtype | None = None) -> Selection:
    """The ``"keys"`` selection of a page method for one decode call (see the module doc).

    ``n_pages(n_real)``: pages attended for a row of ``n_real`` real tokens, the current page
    included (at least 2). ``layer``: the call's tokensparse cache layer (its page summaries);
    ``summary_dtype``: the dtype they are kept in (``None``: the cache's). Counts
    ``<stats_prefix>_summary_rows`` (summary rows read) and ``<stats_prefix>_cache_rows``.
    """
    session = call.session

    def choose(query, start, rows, k):
        parts = _summaries(call, layer, kind, page, start, rows, summary_dtype)
        if start == 0 and rows == slice(None):  # unpadded: the cache's page summaries were read
            session.count(f"{stats_prefix}_summary_rows", len(parts) * parts[0].shape[2])
            session.count(f"{stats_prefix}_cache_rows", call.k_len)
        return top(query, tuple(x[:, :, :-1] for x in parts), k)

    return _select_pages(call, page, n_pages, choose)


#: ``score(query (B, Hq, 1, D), summaries: tuple of (B, Hkv, P, D)) -> (B, Hkv, P)`` page scores
PageScores = Callable[[torch.Tensor, tuple], torch.Tensor]


def coarse_candidates(k: int, ratio: int, widen: float) -> int:
    """Coarse pages kept as candidates to choose ``k`` fine pages, ``ratio`` fine pages each:
    ``ceil(widen · k / ratio)``."""
    return -(-int(math.ceil(widen * k)) // ratio)


def page_select_coarse(call, page: int, n_pages: Callable[[int], int], kind: str, score: PageScores,
                       stats_prefix: str, coarse: int, widen: float, layer=None,
                       summary_dtype: torch.dtype | None = None) -> Selection:
    """:func:`page_select` in two levels: the query first scores the summaries of the full *coarse*
    pages of ``coarse`` tokens (a multiple of ``page``; the cache keeps them too), keeps the top
    :func:`coarse_candidates` of them (``widen`` × the fine pages it needs), and ranks by ``score``
    only the fine pages inside those plus the full fine pages after the last full coarse page (the
    most recent tokens, always candidates). Summary rows read per KV head: ``L / coarse`` plus the
    candidates (``≈ widen · k``) instead of ``L / page``.

    ``score(query, summaries)`` gives ``(B, Hkv, P)`` scores of the pages it is shown, computed
    from those pages alone (a softmax over them is over the candidates). When the candidates
    cover every full fine page the choice is :func:`page_select`'s with the top-k of ``score`` over
    all of them (tested). Counts ``<stats_prefix>_summary_rows`` (coarse plus candidate fine rows)
    and ``<stats_prefix>_cache_rows`` as :func:`page_select` does; ``summary_dtype`` as there
    (both levels kept in it)."""
    if coarse % page or coarse <= page:
        raise ValueError(f"coarse pages ({coarse}) must be a multiple of the page ({page}) larger than it")
    if widen < 1:
        raise ValueError(f"widen ({widen}) must be at least 1: the candidates must hold the pages to choose")
    session = call.session
    ratio = coarse // page

    def choose(query, start, rows, k):
        fine = _summaries(call, layer, kind, page, start, rows, summary_dtype)
        n_full = fine[0].shape[2] - 1  # full fine pages (the last, partial one is always read)
        n_big = n_full // ratio  # coarse pages made of full fine pages
        m = coarse_candidates(k, ratio, widen)
        cached = start == 0 and rows == slice(None)
        if cached:
            session.count(f"{stats_prefix}_cache_rows", call.k_len)
        if m >= n_big:  # the candidates would hold every full page: one level
            if cached:
                session.count(f"{stats_prefix}_summary_rows", len(fine) * fine[0].shape[2])
            return select_topk(score(query, tuple(x[:, :, :-1] for x in fine)), k)[0]
        big = tuple(x[:, :, :n_big] for x in _summaries(call, layer, kind, coarse, start, rows, summary_dtype))
        picked = select_topk(score(query, big), m)[0]  # (b, Hkv, m) coarse pages, ascending
        dev = picked.device
        cand = (picked[..., None] * ratio + torch.arange(ratio, device=dev)).flatten(-2)
        tail = torch.arange(n_big * ratio, n_full, device=dev).expand(*cand.shape[:-1], -1)
        cand = torch.cat([cand, tail], -1)  # ascending fine pages, every one full
        if cached:
            session.count(f"{stats_prefix}_summary_rows", len(fine) * (n_big + cand.shape[-1]))
        top = select_topk(score(query, tuple(gather_rows(x, cand) for x in fine)), k)[0]
        return cand.gather(-1, top)  # ascending: the candidates ascend and top is sorted

    return _select_pages(call, page, n_pages, choose)


def _keys_from_pages(call, page: int, page_scores) -> torch.Tensor:
    """Every key's score as its page's score, ``(B, Hkv, Lk)`` fp32 (``-inf`` on padding), from
    ``page_scores(start, rows)``: ``(rows of B, Hkv, P)`` scores of the pages of the keys ``[start,
    Lk)`` (``rows``: a slice of the batch). Unpadded calls score the whole cache at once; a padded
    batch scores each row's real keys on its own grid (the row scores as it would alone)."""
    n = call.k_len
    if call.key_valid is None:
        return page_scores(0, slice(None)).float().repeat_interleave(page, -1)[..., :n]
    out = torch.full((call.batch, call.n_kv_heads, n), float("-inf"), device=call.query.device)
    real = call.host_real
    for r, n_real in enumerate(real if real is not None else call.n_real[:, 0].tolist()):
        start = n - n_real
        out[r, :, start:] = page_scores(start, slice(r, r + 1)).float().repeat_interleave(page, -1)[0, :, :n_real]
    return out


def page_token_scores(call, page: int, kind: str, score: PageScores, layer=None,
                      summary_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every key's score as its page's score, ``(B, Hkv, Lk)`` fp32 (``-inf`` on padding): a page
    method used as a token scorer (:meth:`~tokensparse.engine.method.Method.key_scores`). Pages
    as in :func:`page_select` (the cache's summaries unpadded; each row's own grid when padded)."""
    return _keys_from_pages(call, page, lambda start, rows: score(
        call.query[rows], _summaries(call, layer, kind, page, start, rows, summary_dtype)))


def page_max_token_scores(call, page: int, token_scores) -> torch.Tensor:
    """:func:`page_token_scores` with each page scored by the maximum of its keys' scores
    (``token_scores(query, start, rows)`` as in :func:`page_select_by_max`): the scorer twin of
    :func:`page_select_by_max`."""
    return _keys_from_pages(call, page,
                            lambda start, rows: page_maxima(token_scores(call.query[rows], start, rows), page))


def minmax_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, P)``: Quest's upper bound of ``q·key`` over each page's keys from the page's
    elementwise min ``kmin`` and max ``kmax`` (``(B, Hkv, P, D)``), maximised over the query heads of
    each KV head: ``Σ_d max(q_d·M_d, q_d·m_d) = q⁺·M + q⁻·m``. ``q (B, Hq, 1, D)``, one token."""
    b, hq, _, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    bound = qg.clamp_min(0) @ kmax.float().transpose(-1, -2) + qg.clamp_max(0) @ kmin.float().transpose(-1, -2)
    return bound.amax(2)


def page_maxima(scores: torch.Tensor, page: int) -> torch.Tensor:
    """``scores (B, H, n)`` → ``(B, H, ceil(n / page))``: the maximum over each page (a partial last
    page over the rows it has)."""
    b, h, n = scores.shape
    n_pages = -(-n // page)
    padded = scores.new_full((b, h, n_pages * page), float("-inf"))
    padded[..., :n] = scores
    return padded.view(b, h, n_pages, page).amax(-1)


def page_select_by_max(call, page: int, n_pages: Callable[[int], int], token_scores, stats_prefix: str) -> Selection:
    """:func:`page_select` with each page scored by the maximum of its keys' scores:
    ``token_scores(query, start, rows)`` returns ``(rows of B, Hkv, n)`` scores of the keys
    ``[start, Lk)`` (``rows``: a slice of the batch). Unpadded calls score the whole cache once; a
    left-padded batch scores each row's real keys on its own grid (so a row chooses what it would
    alone). Counts ``<stats_prefix>_scored_rows``."""

    def choose(query, start, rows, k):
        scores = token_scores(query, start, rows)
        call.session.count(f"{stats_prefix}_scored_rows", scores.shape[-1])
        return select_topk(page_maxima(scores, page)[..., :-1], k)[0]

    return _select_pages(call, page, n_pages, choose)


def _row_pages(call, rows: list, page: int) -> Selection:
    """The selection of a padded batch from each row's chosen pages ``(pages (1, Hkv, k), start,
    width)`` (pages on the row's own grid from its first real token; the last may be partial, so
    only the first ``width`` of their tokens exist, a count the caller knows on the host)."""
    n = call.k_len
    widest = max(w for _, _, w in rows)
    idx = torch.full((call.batch, call.n_kv_heads, widest), n - 1, dtype=torch.long, device=call.query.device)
    valid = torch.zeros_like(idx, dtype=torch.bool)
    for r, (pages, start, width) in enumerate(rows):
        tok = (pages[..., None] * page + torch.arange(page, device=pages.device)).flatten(-2)[..., :width] + start
        idx[r, :, :width] = tok
        valid[r, :, :width] = True
    return Selection.keys(idx, None if all(w == widest for _, _, w in rows) else valid)
