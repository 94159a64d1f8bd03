"""Block-sparse attention: each query block attends to a chosen set of key blocks.

A ``"blocks"`` :class:`~tokensparse.engine.selection.Selection` holds ``idx (B, H, nQB, n)``: for
query block ``i`` of each row and head, the indices of the key blocks it reads (``valid`` marks
filler entries; ``H`` is 1, ``Hkv`` or ``Hq``; query head ``h`` uses selection head
``h // (Hq // H)``). Causality and padding are always applied on top: a query never sees a later
key or a padding key, whatever blocks are listed.

The block grid is laid over each row's *real* tokens: key block ``j`` holds the row's real keys
``[j·block_k, (j+1)·block_k)`` counted from its first real key, query block ``i`` the call's real
query rows ``[i·block_q, (i+1)·block_q)`` counted from its first real query. A row of a
left-padded batch therefore has exactly the grid (and, for a method that chooses on that grid,
the choice) it has alone. Padded batches run row by row on the real tokens (the
"row equals the prompt alone" property is then exact); padding query rows output 0.

Four executors, tested against each other (``tests/test_blocks.py``):

* ``"reference"``: the token-level boolean mask of the selection and the fp32 matmul/softmax
  oracle (:func:`~tokensparse.engine.executors.reference_attention`). Quadratic memory.
* ``"gather"``: for chunks of query blocks, gather the selected key blocks' rows and run an exact
  fp32 softmax over them. Pure PyTorch, any device, any block sizes, takes a key bias; memory
  grows with the selection, not with ``L²``.
* ``"sdpa"`` (CPU; square blocks on an aligned prefill grid): the CPU flash kernel, which returns
  the log-sum-exp, on each query block's gathered key blocks (its own block last, so one shared
  additive mask does causality), query blocks grouped by width.
* ``"flex"``: ``torch.compile``-d FlexAttention with a ``BlockMask`` built by
  ``BlockMask.from_kv_blocks`` (blocks entirely below the diagonal are "full": no mask function
  runs there). Compiled once per (shape bucket, block sizes): lengths are padded up to a multiple
  of ``FLEX_BUCKET`` tokens so that prompts of similar length share a compiled kernel. On CPU
  inductor's C++ template iterates only the listed blocks, but returns no log-sum-exp and takes
  no key bias.

Every executor returns the log-sum-exp on request (``-inf`` for a row that read nothing).
``"auto"`` (or ``"fast"``) is ``"gather"`` with a key bias, else ``"sdpa"`` where it applies,
else ``"flex"`` where compiled FlexAttention is available (CUDA with blocks that are multiples of
16, or CPU with a C++ compiler) and no log-sum-exp is asked for on CPU, else ``"gather"``.

:func:`merge_partials` combines attentions over disjoint key sets through their log-sum-exps.
"""

from __future__ import annotations

import functools
import math
import shutil

import torch

from .executors import active_softcap, bias_at, gather_rows, reference_attention
from .selection import KeyBias, Selection, indices_from_mask, mask_from_indices

FLEX_BUCKET = 512
"""Flex lengths are rounded up to a multiple of this (one compiled kernel per bucket)."""

IMPLS = ("auto", "sdpa", "flex", "gather", "reference")
"""Block executors; ``"fast"`` is accepted as ``"auto"``."""

SDPA_CHUNK_BYTES = 8 << 20
"""Gathered key bytes per call of the sdpa block executor. Larger buffers are fresh ``mmap``-ed
memory on every call with glibc (its threshold stops at 32 MiB), whose page faults cost more than
the copy itself (measured: 112 ms of a 0.50 s layer at 8K in 170 MB of gathers)."""

GATHER_CHUNK_ELEMS = 1 << 24
"""Score elements per chunk of the gather executor (64 MiB of fp32 scores)."""


# --------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------


def n_blocks(length: int, block: int) -> int:
    return -(-length // block)


def spread_blocks(x: torch.Tensor, ratio: int, n: int) -> torch.Tensor:
    """``(…, m)`` per-group values spread to the ``ratio`` finer blocks of each group, the first ``n``
    of them (a group of blocks → its blocks; the last group may be partial)."""
    return x.repeat_interleave(ratio, dim=-1)[..., :n]


def row_starts(key_valid: torch.Tensor | None, batch: int) -> list[int]:
    """First real key of each row (0 for an unpadded call). Refuses masks that are not left padding:
    the block grid assumes each row's real tokens are contiguous and end at the last position."""
    if key_valid is None:
        return [0] * batch
    n_real = key_valid.long().sum(-1)
    length = key_valid.shape[-1]
    starts = (length - n_real).tolist()
    expect = torch.arange(length, device=key_valid.device)[None, :] >= (length - n_real)[:, None]
    if not torch.equal(expect, key_valid):
        raise ValueError("block-sparse attention needs left-padded rows (real tokens contiguous at the end)")
    return starts


def width_groups(sets: torch.Tensor, keep_empty: bool = False) -> list[tuple[int, torch.Tensor]]:
    """Query blocks grouped by how many key blocks they read: ``[(width, blocks)]`` where
    ``sets (B, H, nQB, nKB)`` bool lists each query block's key blocks and ``blocks`` (a long
    tensor) holds the query blocks whose widest row/head reads exactly ``width`` blocks (width 0
    only with ``keep_empty``). The gathered executors run one call per group (and chunk), so no
    query block is padded to the widest one (a dense tail would otherwise make the whole call
    dense); a method whose heads read equally many blocks gets no filler entries at all."""
    counts = sets.sum(-1).amax((0, 1)).tolist() if sets.numel() else []
    by_width: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        if c or keep_empty:
            by_width.setdefault(int(c), []).append(i)
    return [(w, torch.tensor(ix, device=sets.device)) for w, ix in sorted(by_width.items())]


def token_mask(sel: Selection, lq: int, lk: int, key_valid: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, query_start: int | None = None) -> torch.Tensor:
    """``(B, H, len(rows), Lk)`` bool: the (query row, key) pairs ``sel`` allows, causality and
    padding included (``rows``: call query rows to build, default all; ``query_start``: the key
    position of the first query, default ``lk - lq``, see :func:`block_attend`)."""
    idx, valid = sel.idx, sel.valid
    b, h, nqb, _ = idx.shape
    dev = idx.device
    bq, bk = sel.block_q, sel.block_k
    nkb = n_blocks(lk, bk)
    rows = torch.arange(lq, device=dev) if rows is None else rows
    off = lk - lq if query_start is None else query_start
    starts = torch.tensor(row_starts(key_valid, b), device=dev)  # (B,)
    blockset = _blockset(idx, valid, nkb)
    q_first = (starts - off).clamp_min(0)  # first real query row of each row
    qlog = rows[None, :] - q_first[:, None]  # (B, S) logical query row
    klog = torch.arange(lk, device=dev)[None, :] - starts[:, None]  # (B, Lk)
    qb = (qlog.clamp_min(0) // bq).clamp_max(nqb - 1)
    kb = (klog.clamp_min(0) // bk).clamp_max(nkb - 1)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    hi = torch.arange(h, device=dev)[None, :, None, None]
    m = blockset[bi, hi, qb[:, None, :, None], kb[:, None, None, :]]  # (B, H, S, Lk)
    real = (qlog >= 0)[:, None, :, None] & (klog >= 0)[:, None, None, :]
    causal = torch.arange(lk, device=dev)[None, None, None, :] <= (rows + off)[None, None, :, None]
    return m & real & causal


# --------------------------------------------------------------------------------------------------
# log-sum-exp helpers
# --------------------------------------------------------------------------------------------------


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from attentions over each set.

    ``parts``: ``[(out (B, H, Lq, D), lse (B, H, Lq))]``; a part whose row saw no key has
    ``lse = -inf`` there (its output is ignored). Returns ``(out, lse)`` in fp32-accurate form
    (``out`` in the dtype of the first part).
    """
    if not parts:
        raise ValueError("merge_partials needs at least one part")
    lse = parts[0][1].float()
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse.float())
    out = None
    for part_out, part_lse in parts:
        w = torch.exp(part_lse.float() - lse).nan_to_num_(0.0)[..., None]  # -inf - -inf: no part saw a key
        out = part_out.float() * w if out is None else out.addcmul_(part_out.float(), w)
    return out.to(parts[0][0].dtype), lse


# --------------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------------


def block_attend(q, k, v, sel: Selection, scale: float, *, key_valid: torch.Tensor | None = None,
                 impl: str = "auto", bias: KeyBias | None = None, return_lse: bool = False,
                 query_start: int | None = None):
    """Attention output ``(B, Hq, Lq, D)`` of ``q`` over ``k, v`` under the ``"blocks"`` selection
    ``sel`` (see the module doc); with ``return_lse`` also the log-sum-exp ``(B, Hq, Lq)`` fp32
    of each row's logits over the keys it read (``-inf`` for rows that read none).

    ``query_start``: the key position of the first query row (query ``i`` sees keys ``<=
    query_start + i``). Default ``Lk - Lq``: the queries are the last ``Lq`` keys (prefill, or a
    chunk on a cache). Context-parallel prefill passes ``Lk`` for keys that all precede the
    queries (another rank's earlier chunk). Only the ``"gather"`` and ``"reference"`` executors
    take it (``"auto"`` picks ``"gather"``), on unpadded calls."""
    if sel.kind != "blocks":
        raise ValueError(f"block_attend needs a 'blocks' selection, got {sel.kind!r}")
    b, hq, lq, _ = q.shape
    h, hkv = sel.idx.shape[1], k.shape[1]
    if sel.idx.shape[0] != b or hq % h or (h != 1 and h % hkv):
        raise ValueError(f"blocks selection shaped {tuple(sel.idx.shape)} for {b} rows, {hq} query and {hkv} KV heads "
                         "(its heads must be 1, a multiple of the KV heads, dividing the query heads)")
    if sel.idx.shape[2] != n_blocks(lq, sel.block_q):
        raise ValueError(f"blocks selection has {sel.idx.shape[2]} query blocks of {sel.block_q}; the call has {lq} "
                         f"query rows ({n_blocks(lq, sel.block_q)} blocks)")
    impl = {"fast": "auto"}.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"block executor must be one of {', '.join(IMPLS)}, got {impl!r}")
    if active_softcap() is not None:  # a soft-capped call: only the reference applies the cap
        impl = "reference"
    if query_start is not None:
        if key_valid is not None:
            raise ValueError("block_attend: query_start is for unpadded calls (key_valid must be None)")
        if impl not in ("auto", "gather", "reference"):
            raise ValueError(f"block_attend: only the 'gather' and 'reference' executors take query_start, got {impl!r}")
        impl = "gather" if impl == "auto" else impl
    if impl == "reference":
        return _reference(q, k, v, sel, scale, key_valid, bias, return_lse, query_start)
    if impl == "auto":
        aligned = sel.block_q == sel.block_k and lq == k.shape[2]
        if bias is not None:
            impl = "gather"
        elif aligned and sdpa_blocks_available(q.device):
            impl = "sdpa"
        elif (flex_available(q.device) and flex_block_ok(q.device, sel.block_q, sel.block_k)
              and not (return_lse and q.device.type == "cpu")):
            impl = "flex"
        else:
            impl = "gather"
    if impl == "flex" and bias is not None:
        raise ValueError("the flex block executor takes no key bias; use impl='gather' or 'auto'")
    if impl == "flex" and return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention returns no log-sum-exp on CPU; use impl='gather' or 'auto'")
    if impl == "flex" and not flex_available(q.device):
        raise RuntimeError("compiled FlexAttention is not available here (no C++ compiler on CPU?); use impl='gather'")
    if impl == "flex" and not flex_block_ok(q.device, sel.block_q, sel.block_k):
        raise ValueError(f"compiled FlexAttention on CUDA needs blocks that are multiples of 16, got {sel.block_q}x"
                         f"{sel.block_k}; use impl='gather' or 'auto'")
    if impl == "sdpa" and not sdpa_blocks_available(q.device):
        raise RuntimeError("the sdpa block executor uses the CPU flash kernel; on other devices use impl='flex' or 'auto'")
    if query_start is not None:
        return _gather(q, k, v, sel.idx, sel.valid, sel.block_q, sel.block_k, scale, bias, return_lse, query_start)
    run = {"flex": _flex, "gather": _gather, "sdpa": _sdpa}[impl]
    if key_valid is None:
        return run(q, k, v, sel.idx, sel.valid, sel.block_q, sel.block_k, scale, bias, return_lse)
    # padded batch: each row on its real tokens (exactly what it computes alone)
    lk = k.shape[2]
    off = lk - lq
    out = q.new_zeros(q.shape)
    lse = torch.full((b, hq, lq), float("-inf"), device=q.device) if return_lse else None
    for r, start in enumerate(row_starts(key_valid, b)):
        q0 = max(0, start - off)
        if q0 >= lq:
            continue
        nqb = n_blocks(lq - q0, sel.block_q)  # the row's own query blocks
        idx = sel.idx[r : r + 1, :, :nqb]
        valid = None if sel.valid is None else sel.valid[r : r + 1, :, :nqb]
        rb = None
        if bias is not None:
            rb = KeyBias(bias.pos[r : r + 1] - start, bias.value[r : r + 1] if bias.value.shape[0] > 1 else bias.value)
        res = run(q[r : r + 1, :, q0:], k[r : r + 1, :, start:], v[r : r + 1, :, start:], idx, valid,
                  sel.block_q, sel.block_k, scale, rb, return_lse)
        if return_lse:
            out[r : r + 1, :, q0:], lse[r : r + 1, :, q0:] = res
        else:
            out[r : r + 1, :, q0:] = res
    return (out, lse) if return_lse else out


def _reference(q, k, v, sel, scale, key_valid, bias, return_lse, query_start=None):
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    allowed = token_mask(sel, lq, lk, key_valid, query_start=query_start)  # (B, H, Lq, Lk)
    h = allowed.shape[1]
    if h not in (1, k.shape[1], hq):  # a selection head count between Hkv and Hq: spell it out per query head
        allowed = allowed.repeat_interleave(hq // h, dim=1)
    out, lse = reference_attention(q, k, v, allowed, scale, bias, return_lse=True)
    live = allowed.any(-1)
    if live.shape[1] != hq:
        live = live.repeat_interleave(hq // live.shape[1], dim=1)
    out = out * live[..., None]
    lse = lse.masked_fill(~live, float("-inf"))
    return (out, lse) if return_lse else out


def _key_rows(idx, valid, bk, lk):
    """Key positions ``(B, H, nQB, n·bk)`` of the selected blocks and whether each is a real key."""
    tok = (idx[..., None] * bk + torch.arange(bk, device=idx.device)).flatten(-2)
    ok = tok < lk
    if valid is not None:
        ok &= valid[..., None].expand(*valid.shape, bk).flatten(-2)
    return tok.clamp_max(lk - 1), ok


def _gather(q, k, v, idx, valid, bq, bk, scale, bias, return_lse, query_start=None):
    """Exact block-sparse attention by gathering the selected key blocks (unpadded rows)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    h = idx.shape[1]
    if h == 1:
        idx = idx.expand(b, hkv, *idx.shape[2:])
        valid = None if valid is None else valid.expand_as(idx)
        h = hkv
    g = hq // h  # query heads per selection head
    heads = torch.arange(h, device=q.device) * hkv // h  # the KV head each selection head reads
    nqb = idx.shape[2]
    off = lk - lq if query_start is None else query_start
    pad = nqb * bq - lq
    if pad < 0:
        raise ValueError(f"blocks selection has {nqb} query blocks of {bq}; the call has {lq} query rows")
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
    # (B, H, nQB, G·bq, D): the G query heads of a selection head share its gathered keys
    qb = qp.reshape(b, h, g, nqb, bq, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h, nqb, g * bq, d)
    qrow = off + torch.arange(nqb * bq, device=q.device).view(nqb, 1, bq)  # absolute position of each query
    out = torch.zeros(b, h, nqb, g * bq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, nqb, g * bq), float("-inf"), dtype=torch.float32, device=q.device)
    sets = _blockset(idx, valid, n_blocks(lk, bk))
    for width, blocks in width_groups(sets):
        g_idx, g_valid = indices_from_mask(sets[:, :, blocks], width)
        tok, ok = _key_rows(g_idx, g_valid, bk, lk)  # (B, H, m, width·bk)
        nk = tok.shape[-1]
        step = max(1, GATHER_CHUNK_ELEMS // max(1, b * h * g * bq * nk))
        for c0 in range(0, len(blocks), step):
            cb = blocks[c0 : c0 + step]
            c = len(cb)
            t = tok[:, :, c0 : c0 + c]
            flat = t.reshape(b, h, -1)
            kc = gather_rows(k, flat, heads).view(b, h, c, nk, d).float()
            vc = gather_rows(v, flat, heads).view(b, h, c, nk, v.shape[-1]).float()
            s = qb[:, :, cb].float() @ kc.transpose(-1, -2) * scale  # (B, H, c, G·bq, nk)
            allow = ok[:, :, c0 : c0 + c, None, :] & (t[:, :, :, None, :] <= qrow[cb].repeat(1, g, 1).view(1, 1, c, g * bq, 1))
            if bias is not None:
                bv = bias_at(bias, flat, hq).view(b, h, g, c, 1, nk).permute(0, 1, 3, 2, 4, 5)
                s = (s.view(b, h, c, g, bq, nk) + bv).view_as(s)
            s = s.masked_fill(~allow, float("-inf"))
            m = torch.logsumexp(s, -1)  # (B, H, c, G·bq)
            p = torch.exp(s - m[..., None]).nan_to_num(0.0)
            out[:, :, cb] = p @ vc
            lse[:, :, cb] = m
    out = out.view(b, h, nqb, g, bq, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nqb * bq, -1)[:, :, :lq]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse.view(b, h, nqb, g, bq).permute(0, 1, 3, 2, 4).reshape(b, hq, nqb * bq)[:, :, :lq]


# --------------------------------------------------------------------------------------------------
# CPU: SDPA's flash kernel on gathered blocks
# --------------------------------------------------------------------------------------------------


def sdpa_blocks_available(device) -> bool:
    """The CPU flash kernel with log-sum-exp (``aten::_scaled_dot_product_flash_attention_for_cpu``)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash_cpu(q, k, v, scale, causal=False, mask=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _sdpa(q, k, v, idx, valid, bq, bk, scale, bias, return_lse):
    """Block-sparse prefill on CPU: the CPU flash kernel over each query block's gathered key blocks.

    Needs square blocks on an aligned grid (``block_q == block_k``, as many queries as keys). Query
    blocks are grouped by how many *earlier* key blocks they read (:func:`width_groups`); for each
    chunk of a group the earlier blocks are gathered (one row copy per block, at most
    ``SDPA_CHUNK_BYTES``) with the query block's own (diagonal) block appended *last*, and one
    kernel call attends the query heads of each selection head (folded into its query rows) to
    them. Keys stay in ascending order, so the output is rounded once, in dense attention's key
    order, in every dtype. With the diagonal last, one additive mask shared by every query block
    (zeros, then the causal triangle) does causality; only a chunk with filler entries (a row or
    head that reads fewer blocks than its group, or a query block that skips its own block) builds
    a mask per query block. A partial last query block (``Lq`` not a multiple of the block) runs
    alone on its real rows and keys (:func:`_sdpa_last_block`). The output is written in the
    ``(B, Lq, Hq, D)`` order the attention interface returns and handed back as a ``(B, Hq, Lq, D)``
    view of it (docs/results/sdpa_executor/: these layouts took ~12 % of a DHSA layer at 8K).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if bq != bk or lq != lk:
        raise ValueError("the sdpa block executor needs block_q == block_k and a prefill (as many queries as keys)")
    if bias is not None:
        raise ValueError("the sdpa block executor takes no key bias; use impl='gather' or 'auto'")
    bs, nb, h = bq, idx.shape[2], idx.shape[1]
    dv, dev = v.shape[-1], q.device
    pad = nb * bs - lq
    # keys and values addressable as rows of whole blocks, copied at most once here: a cache view
    # (a prefix of a longer buffer) would otherwise be copied whole by every chunk's block gather
    kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x.contiguous() for x in (k, v))
    sets = _blockset(idx, valid, nb)  # (B, H, nb, nb)
    if h == 1:
        sets, h = sets.expand(b, hkv, nb, nb), hkv
    gh = hq // h
    heads = torch.arange(h, device=dev) * hkv // h
    i = torch.arange(nb, device=dev)
    diag = sets[:, :, i, i]  # (B, H, nb): query blocks that read their own block
    earlier = sets & (i[None, :] < i[:, None])
    local = torch.arange(gh * bs, device=dev) % bs  # each folded query row's position in its block
    causal = torch.zeros(gh * bs, bs, dtype=q.dtype, device=dev)
    causal.masked_fill_(torch.arange(bs, device=dev)[None, :] > local[:, None], float("-inf"))
    # the output in the caller's (B, L, Hq, Dv) order: returned as a (B, Hq, L, Dv) view, so the
    # attention interface's transpose back is free (a permuting copy of the whole output otherwise)
    out = torch.empty(b, nb, bs, h, gh, dv, dtype=q.dtype, device=dev)
    lse = torch.full((b, nb, h, gh * bs), float("-inf"), device=dev)
    widths = earlier.sum(-1)  # (B, H, nb)
    if not (bool((widths == widths[:1, :1]).all()) and bool((diag == diag[:1, :1]).all())):
        # rows or heads differ in what they read: one unit per (row, head, query block), no filler
        out.zero_()
        q6 = (torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q).view(b, h, gh, nb, bs, d)
        _sdpa_units(q6, kp, vp, earlier, diag, widths, heads, causal, scale, out, lse)
        groups = []
    else:
        groups = width_groups(earlier, keep_empty=True)
        if pad:  # the last query block holds bs - pad real rows: attended alone, without its filler rows
            _sdpa_last_block(q, kp, vp, earlier, diag, heads, causal, scale, out, lse)
            groups = [(w, g[g != nb - 1]) for w, g in groups]
            groups = [(w, g) for w, g in groups if len(g)]
        full = nb - (1 if pad else 0)
        # the full query blocks' rows block-major, (B, full, H, G, bs, D), in one copy: a chunk of
        # consecutive blocks (the usual group) is then a slice, its heads already folded
        qblk = q[:, :, : full * bs].view(b, h, gh, full, bs, d).permute(0, 3, 1, 2, 4, 5).contiguous()
    for width, group in groups:
        step = max(1, SDPA_CHUNK_BYTES // (b * h * (width + 1) * bs * max(d, dv) * q.element_size()))
        shared = _after_earlier(causal, width * bs)  # (1, 1, G·bs, (w+1)·bs)
        for blocks in group.split(step):
            m = len(blocks)
            e_idx, e_valid = indices_from_mask(earlier[:, :, blocks], width)  # (B, H, m, width)
            a_idx = torch.cat([e_idx, blocks.expand(b, h, m)[..., None]], -1)  # the diagonal block last
            a_valid = torch.cat([e_valid, diag[:, :, blocks, None]], -1)
            ke, ve = _gather_blocks(kp, a_idx, heads, bs), _gather_blocks(vp, a_idx, heads, bs)
            first = int(blocks[0])
            span = slice(first, first + m) if int(blocks[-1]) == first + m - 1 else blocks  # consecutive: a view
            qe = qblk[:, span].reshape(b * m, h, gh * bs, d)
            mask = shared
            if not bool(a_valid.all()):
                drop = torch.zeros(b, m, h, 1, width + 1, bs, dtype=q.dtype, device=dev)
                drop.masked_fill_(~a_valid.transpose(1, 2)[:, :, :, None, :, None], float("-inf"))
                mask = shared + drop.view(b * m, h, 1, (width + 1) * bs)
            o, l = _flash_cpu(qe, ke, ve, scale, mask=mask)
            none = ~a_valid.any(-1).transpose(1, 2)  # (B, m, H): read nothing (the kernel reports garbage there)
            o, l = o.view(b, m, h, gh, bs, dv), l.float().view(b, m, h, gh * bs)
            if bool(none.any()):  # (a copy of the chunk's output: only when some unit read nothing)
                o, l = o.masked_fill(none[..., None, None, None], 0), l.masked_fill(none[..., None], float("-inf"))
            out[:, span] = o.permute(0, 1, 4, 2, 3, 5)
            lse[:, span] = l
    out = out.view(b, nb * bs, hq, dv)[:, :lq].transpose(1, 2)
    if not return_lse:
        return out
    return out, lse.view(b, nb, h, gh, bs).permute(0, 2, 3, 1, 4).reshape(b, hq, nb * bs)[:, :, :lq]


def _after_earlier(tri: torch.Tensor, n_earlier: int) -> torch.Tensor:
    """The additive mask ``(1, 1, rows, n_earlier + cols)`` of a query block whose own keys come
    last: zeros over its ``n_earlier`` earlier keys, then the causal triangle ``tri (rows, cols)``."""
    return torch.cat([tri.new_zeros(tri.shape[0], n_earlier), tri], -1)[None, None]


def _sdpa_last_block(q, kp, vp, earlier, diag, heads, causal, scale, out, lse):
    """:func:`_sdpa`'s last query block when it is partial: one kernel call on its real rows of
    ``q (B, Hq, Lq, D)`` and its real keys only. A dense instruction tail makes that block read
    every key: attending its filler rows as well cost up to ``bs / rows`` times the work. Every
    row and head reads the same number of blocks here (the folded-heads path); ``causal``
    ``(G·bs, bs)`` is :func:`_sdpa`'s triangle. Writes ``out (B, nb, bs, H, G, Dv)`` and ``lse
    (B, nb, H, G·bs)`` in place (its filler rows are sliced off by the caller)."""
    b, hq, lq, d = q.shape
    h, nb, bs = earlier.shape[1], earlier.shape[2], causal.shape[1]
    gh, dv, last = hq // h, vp.shape[-1], nb - 1
    rows = lq - last * bs
    width, own = int(earlier[0, 0, last].sum()), bool(diag[0, 0, last])
    if width + own == 0:  # reads nothing: zero output, lse stays -inf
        out[:, last] = 0
        return
    ks, vs = [], []
    if width:
        e_idx = indices_from_mask(earlier[:, :, last : last + 1], width)[0]  # (B, H, 1, width)
        ks.append(_gather_blocks(kp, e_idx, heads, bs))  # (B, H, width·bs, D)
        vs.append(_gather_blocks(vp, e_idx, heads, bs))
    mask = None
    if own:  # its own real keys, last; the causal triangle over them
        lo = last * bs
        ks.append(kp[:, heads, lo : lo + rows])
        vs.append(vp[:, heads, lo : lo + rows])
        mask = _after_earlier(causal.view(gh, bs, bs)[:, :rows, :rows].reshape(gh * rows, rows), width * bs)
    ke, ve = (x[0] if len(x) == 1 else torch.cat(x, 2) for x in (ks, vs))
    qe = q[:, :, last * bs :].reshape(b, h, gh * rows, d)
    o, l = _flash_cpu(qe, ke, ve, scale, mask=mask)
    out[:, last, :rows] = o.view(b, h, gh, rows, dv).permute(0, 3, 1, 2, 4)
    lse.view(b, nb, h, gh, bs)[:, last, :, :, :rows] = l.float().view(b, h, gh, rows)


def _sdpa_units(q6, kp, vp, earlier, diag, widths, heads, causal, scale, out, lse):
    """:func:`_sdpa` when rows or heads of a query block read different numbers of blocks (e.g. a
    mass threshold per head): the units ``(row, selection head, query block)`` are grouped by
    (earlier blocks read, own block read) and each chunk of a group is one kernel call whose batch
    is its units (one head each), so no unit is padded to a wider one and no per-unit mask is
    built. Writes ``out (B, nb, bs, H, G, Dv)`` and ``lse (B, nb, H, G·bs)`` in place; units that
    read nothing keep 0 and ``-inf``."""
    b, h, gh, nb, bs, d = q6.shape
    hkv, dv, dev = kp.shape[1], vp.shape[-1], q6.device
    kb = kp.reshape(b * hkv * nb, bs * d)  # one row per key block
    vb = vp.reshape(b * hkv * nb, bs * dv)
    code = widths * 2 + diag.long()  # (B, H, nb)
    for c in torch.unique(code).tolist():
        width, own = divmod(int(c), 2)
        n = width + own
        if n == 0:
            continue
        units = (code == c).nonzero()  # (m, 3): row, head, query block
        step = max(1, SDPA_CHUNK_BYTES // (n * bs * max(d, dv) * kp.element_size()))
        mask = None
        if own:
            mask = _after_earlier(causal, width * bs)
        for chunk in units.split(step):
            m = chunk.shape[0]
            ub, uh, ui = chunk.unbind(1)
            blocks = indices_from_mask(earlier[ub, uh, ui], width)[0] if width else ui.new_zeros(m, 0)
            if own:
                blocks = torch.cat([blocks, ui[:, None]], -1)  # the diagonal block last
            rows = ((ub * hkv + heads[uh]) * nb)[:, None] + blocks
            ke = kb.index_select(0, rows.reshape(-1)).view(m, 1, n * bs, d)
            ve = vb.index_select(0, rows.reshape(-1)).view(m, 1, n * bs, dv)
            qe = q6[ub, uh, :, ui].reshape(m, 1, gh * bs, d)
            o, l = _flash_cpu(qe, ke, ve, scale, mask=mask)
            out[ub, ui, :, uh] = o.view(m, gh, bs, dv).transpose(1, 2)  # out: (B, nb, bs, H, G, Dv)
            lse[ub, ui, uh] = l.float().view(m, gh * bs)


def _gather_blocks(x, idx, heads, bs):
    """Key blocks ``idx (B, H, m, n)`` of ``x (B, Hkv, nKB·bs, D)`` read through ``heads``:
    ``(B·m, H, n·bs, D)``, one row copy per block."""
    b, h, m, n = idx.shape
    d = x.shape[-1]
    rows = gather_rows(x.reshape(b, x.shape[1], x.shape[2] // bs, bs * d), idx.reshape(b, h, m * n), heads)
    return rows.view(b, h, m, n * bs, d).transpose(1, 2).reshape(b * m, h, n * bs, d)


# --------------------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------------------


def flex_available(device) -> bool:
    """Compiled FlexAttention can run on ``device``: CUDA, or CPU with a C++ compiler for inductor."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and (shutil.which("g++") is not None or shutil.which("c++") is not None)


def flex_kernel_options(device, bq: int, bk: int) -> dict | None:
    """Triton tile sizes for compiled FlexAttention on CUDA that divide the selection's blocks.

    Inductor's default tile on Hopper (128 query rows) does not divide a 64-row block and refuses the
    kernel ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"; torch 2.11 on an H200):
    the tile is the largest power of two dividing the block, at most 128 rows and 64 keys (the
    defaults), and at least 16 (the smallest ``tl.dot``). Blocks that are not multiples of 16 cannot
    run on the CUDA flex kernel (:func:`flex_block_ok`). ``None`` (inductor's choice) on CPU."""
    if torch.device(device).type != "cuda":
        return None
    return {"BLOCK_M": min(bq & -bq, 128), "BLOCK_N": min(bk & -bk, 64)}


def flex_block_ok(device, bq: int, bk: int) -> bool:
    """Block sizes the compiled FlexAttention kernel takes on ``device`` (CUDA: multiples of 16)."""
    return torch.device(device).type != "cuda" or (bq % 16 == 0 and bk % 16 == 0)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, idx, valid, bq, bk, scale, bias, return_lse):
    from torch.nn.attention.flex_attention import BlockMask

    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    h = idx.shape[1]
    nqb = idx.shape[2]
    off = lk - lq
    # pad both lengths up to the bucket, keeping the bottom-right alignment: queries and keys are
    # padded at the end (padded queries' outputs are dropped, padded keys are never visible)
    bucket = math.lcm(FLEX_BUCKET, bq, bk)
    lq_p = -(-lq // bucket) * bucket
    lk_p = -(-(off + lq_p) // bucket) * bucket
    qp = torch.nn.functional.pad(q, (0, 0, 0, lq_p - lq))
    kp = torch.nn.functional.pad(k, (0, 0, 0, lk_p - lk))
    vp = torch.nn.functional.pad(v, (0, 0, 0, lk_p - lk))
    nqb_p, nkb_p = lq_p // bq, lk_p // bk
    sel = torch.zeros(b, h, nqb_p, nkb_p, dtype=torch.bool, device=q.device)
    sel[:, :, :nqb] = _blockset(idx, valid, nkb_p)
    # a block is "full" when every key in it is real and before the block's first query
    first_q = off + torch.arange(nqb_p, device=q.device) * bq
    last_k = torch.arange(nkb_p, device=q.device) * bk + bk - 1
    full = (last_k[None, :] <= first_q[:, None]) & (last_k[None, :] < lk)
    # counts and indices at the selection's own heads, then repeated to the query heads (the mask
    # always names Hq heads: one compiled kernel for every selection width)
    kv_num, kv_idx = _counts_and_indices(sel & ~full, hq // h)
    full_num, full_idx = _counts_and_indices(sel & full, hq // h)
    limits = torch.tensor([off, lk], device=q.device)  # tensors, not ints: no recompile per length

    def mask_mod(bb, hh, q_idx, kv_idx_):
        return (kv_idx_ <= q_idx + limits[0]) & (kv_idx_ < limits[1])

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                  seq_lengths=(lq_p, lk_p), compute_q_blocks=False)
    res = _compiled_flex()(qp, kp, vp, block_mask=bm, scale=scale, enable_gqa=hq != hkv, return_lse=return_lse,
                           kernel_options=flex_kernel_options(q.device, bq, bk))
    if return_lse:
        out, lse = res
        lse = lse[:, :, :lq].float()
        live = lse > float("-inf")
        return out[:, :, :lq] * live[..., None], lse
    return res[:, :, :lq]


def _blockset(idx: torch.Tensor, valid: torch.Tensor | None, nkb: int) -> torch.Tensor:
    """``(B, H, nQB, nKB)`` bool: the key blocks ``idx`` lists (filler entries ignored; a filler may
    name a block past ``nkb`` when a padded row's slice is read, hence the spare column)."""
    return mask_from_indices(idx.clamp(0, nkb), nkb + 1, valid)[..., :nkb]


def _counts_and_indices(sel: torch.Tensor, repeat: int = 1):
    """``(num (B, H·repeat, nQB) int32, idx (B, H·repeat, nQB, nKB) int32)`` for
    ``BlockMask.from_kv_blocks``: each row's selected blocks first, ascending (entries past ``num``
    are 0), each head repeated ``repeat`` times. One cumulative sum and one scatter at the
    selection's heads, no sort: a stable argsort of the head-repeated ``(1, 32, 2048, 2048)`` mask of
    a 128K prefill, twice per layer, cost DHSA 0.21 s of a 4.46 s prefill on an H200 (now 4.25 s)."""
    nkb = sel.shape[-1]
    num = sel.sum(-1, dtype=torch.int32)
    pos = sel.cumsum(-1, dtype=torch.int32) - 1  # slot of each selected block among its row's
    slot = torch.where(sel, pos, nkb).long()  # unselected blocks go to a spare column, then dropped
    idx = torch.zeros(*sel.shape[:-1], nkb + 1, dtype=torch.int32, device=sel.device)
    idx.scatter_(-1, slot, torch.arange(nkb, dtype=torch.int32, device=sel.device).expand_as(slot))
    idx = idx[..., :nkb]
    if repeat > 1:
        num, idx = num.repeat_interleave(repeat, dim=1), idx.repeat_interleave(repeat, dim=1)
    return num, idx.contiguous()


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, n_blocks, D)`` float64: the mean row of each ``block``-row block of ``x (B, H, L, D)``
    (the last block may be partial).

    The rows of a block are summed pairwise in a fixed tree (zero rows pad it to a power of two;
    each step one elementwise add of its two halves), then divided in float64. Pooled rows feed
    block rankings that two code paths (one process, context-parallel ranks holding a slice) must
    reproduce exactly: elementwise adds round the same way whatever the tensor's shape or layout,
    which a reduction kernel's summation order does not promise. (Converting ``x`` to float64
    first, the earlier way, made the pooling 20× slower on CPU: 72 ms of a query at 8K, most of
    BiFormer's selection time.)"""
    b, h, length, d = x.shape
    full, rest = divmod(length, block)
    p2 = 1 << (block - 1).bit_length()
    out = torch.empty(b, h, full + (1 if rest else 0), d, dtype=torch.float64, device=x.device)
    if full:
        y = x[:, :, : full * block].unflatten(2, (full, block))
        out[:, :, :full] = _tree_sum(torch.nn.functional.pad(y, (0, 0, 0, p2 - block)) if p2 != block else y)
        out[:, :, :full] /= block
    if rest:
        out[:, :, full] = _tree_sum(torch.nn.functional.pad(x[:, :, full * block :], (0, 0, 0, p2 - rest)))
        out[:, :, full] /= rest
    return out


def _tree_sum(y: torch.Tensor) -> torch.Tensor:
    """``y (..., n, D)`` with ``n`` a power of two summed over ``n`` by halving (see :func:`pool_blocks`)."""
    while y.shape[-2] > 1:
        half = y.shape[-2] // 2
        y = y[..., :half, :] + y[..., half:, :]
    return y[..., 0, :]


# --------------------------------------------------------------------------------------------------
# pooled estimates of key groups the sparse attention skipped
# --------------------------------------------------------------------------------------------------


def pool_segments(x: torch.Tensor, seg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean row, mean distance to it and size of each of ``n`` row groups of ``x (B, H, L, D)``:
    ``(mean (B, H, n, D) float64, spread (B, H, n) float64, count (n,) long)`` with ``spread =
    mean_s ‖x_s − x̄‖``; ``seg (L,)`` long names each row's group (any grouping; a group without
    rows has mean and spread 0). :func:`pool_blocks` is the case of contiguous ``block``-row
    groups. ``‖q‖ · spread`` bounds the mean ``|q·x_s − q·x̄|`` (Cauchy–Schwarz) whatever rotation
    RoPE applied to the rows, which Rectified SpaAttn's pooling-error test needs."""
    b, h, _, d = x.shape
    xd = x.double()
    count = torch.bincount(seg, minlength=n)
    denom = count.clamp_min(1).double()
    mean = xd.new_zeros(b, h, n, d).index_add_(2, seg, xd) / denom[:, None]
    dist = (xd - mean[:, :, seg]).norm(dim=-1)  # (B, H, L)
    spread = xd.new_zeros(b, h, n).index_add_(2, seg, dist) / denom
    return mean, spread, count


def pooled_scores(q: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, Hq, Lq, n)`` fp32 unscaled dot products of every query ``q (B, Hq, Lq, D)`` with the
    pooled rows ``pooled (B, Hkv, n, D)`` of its KV head (query head ``h`` reads KV head
    ``h // (Hq / Hkv)``): one row against ``n`` pooled keys, ``1/block`` of the dense logits."""
    b, hq, lq, d = q.shape
    hkv, n = pooled.shape[1], pooled.shape[2]
    g = hq // hkv
    s = q.float().reshape(b, hkv, g * lq, d) @ pooled.float().transpose(-1, -2)
    return s.view(b, hq, lq, n)


def pooled_attend(scores: torch.Tensor, scale: float, count: torch.Tensor, v_pooled: torch.Tensor | None,
                  allowed: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention of each query to key groups represented by their mean key and value, each group
    weighted by its size: ``(out (B, Hq, Lq, Dv) fp32 or None, lse (B, Hq, Lq) fp32)``.

    ``scores (B, Hq, Lq, n)``: unscaled ``q · k̄_g`` (:func:`pooled_scores`); ``count (n,)``: the
    groups' sizes; ``v_pooled (B, Hkv, n, Dv)`` their mean values (``None``: only the
    log-sum-exp); ``allowed (B, 1|Hq, Lq, n)`` bool: the groups each query row reads. A group
    ``g`` of ``n_g`` keys stands for ``Σ_{s∈g} exp(scale·q·k_s) ≈ n_g·exp(scale·q·k̄_g)`` (its
    log-mass ``log n_g + scale·q·k̄_g``) and for ``Σ_{s∈g} exp(scale·q·k_s)·v_s ≈ that mass ·
    v̄_g``: exact when the group's keys are identical, a lower bound of the mass otherwise
    (Jensen). The result is a partial in :func:`merge_partials` form (``lse = -inf`` and ``out =
    0`` on rows that read no group). The active logit soft-cap is applied to ``scale·q·k̄_g``."""
    b, hq, lq, n = scores.shape
    cap = active_softcap()
    s = scores * scale
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    s = (s + count.double().clamp_min(1).log().float()).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    if v_pooled is None:
        return None, lse
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)  # a row that reads no group: -inf - -inf
    hkv = v_pooled.shape[1]
    out = p.view(b, hkv, (hq // hkv) * lq, n) @ v_pooled.float()
    return out.view(b, hq, lq, -1), lse


def selection_rows(sel: Selection, lq: int, lk: int, key_valid: torch.Tensor | None = None):
    """Each row of a ``"blocks"`` selection on its real tokens, as the executors run a padded call:
    yields ``(row, k0, q0, sets)`` with ``k0`` the row's first real key, ``q0`` its first real query
    row and ``sets (1, H, nQB_r, nKB_r)`` bool the key blocks each of its own query blocks lists
    (on its grid; rows without a real query are skipped)."""
    off = lk - lq
    for r, start in enumerate(row_starts(key_valid, sel.idx.shape[0])):
        q0 = max(0, start - off)
        if q0 >= lq:
            continue
        nqb = n_blocks(lq - q0, sel.block_q)
        valid = None if sel.valid is None else sel.valid[r : r + 1, :, :nqb]
        yield r, start, q0, _blockset(sel.idx[r : r + 1, :, :nqb], valid, n_blocks(lk - start, sel.block_k))


def route_blocks(q_pooled: torch.Tensor | None, k_pooled: torch.Tensor | None, first_block: int, *,
                 keep: torch.Tensor, sink_blocks: int, local_blocks: int, dense_from: int | None = None,
                 prefer: str = "earlier", scores: torch.Tensor | None = None) -> torch.Tensor:
    """Region-to-region routing on a causal block grid: ``(B, Hkv, nQB, nKB)`` bool, the key blocks
    each query block reads.

    ``q_pooled (B, Hq, nQB, D)``: the mean query of each query block, the first being global block
    ``first_block``; ``k_pooled (B, Hkv, nKB, D)``: the mean key of every global key block up to
    the last query block. Query block ``i`` reads its ``sink_blocks`` first blocks, its
    ``local_blocks`` most recent ones (itself included) and the other earlier blocks with the
    highest routing score — ``keep[i]`` blocks in all (``keep (nQB,)`` long; at least the forced
    ones). The score of key block ``j`` is ``q̄_i · k̄_j`` maximised over the query heads of each
    KV head (one choice per KV head: its key blocks are gathered once for all its query heads).
    Query blocks from global block ``dense_from`` on read every earlier block. Ties go to the
    earlier block (``prefer="later"``: to the later, more recent one — e.g. for blocks that share
    one score because they belong to one pooled chunk). ``scores (B, H, nQB, nKB)``: route on
    these scores instead (``q_pooled`` and ``k_pooled`` are then unused; equal scores stay exactly
    equal, which recomputed dot products of equal rows need not)."""
    if prefer not in ("earlier", "later"):
        raise ValueError(f"route_blocks: prefer must be 'earlier' or 'later', got {prefer!r}")
    if scores is None:
        b, hq, nqb, d = q_pooled.shape
        hkv = k_pooled.shape[1]
        qk = q_pooled.double().view(b, hkv, hq // hkv, nqb, d) @ k_pooled.double()[:, :, None].transpose(-1, -2)
        scores = qk.amax(2)
    scores = scores.double()
    nqb, nkb = scores.shape[2], scores.shape[3]
    dev = scores.device
    qi = torch.arange(first_block, first_block + nqb, device=dev)[:, None]  # global query block
    kj = torch.arange(nkb, device=dev)[None, :]
    causal = kj <= qi
    forced = (kj < sink_blocks) | (kj > qi - local_blocks)
    if dense_from is not None:
        forced = forced | (qi >= dense_from)
    scores = scores.masked_fill(forced, math.inf).masked_fill(~causal, -math.inf)
    keep = torch.maximum(keep.to(dev)[:, None], (forced & causal).sum(-1, keepdim=True))
    if prefer == "later":  # a stable sort of the reversed blocks: among equal scores the later block first
        order = (nkb - 1) - torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)
    else:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order))
    return (rank < keep) & causal


def everything_blocks(b: int, h: int, lq: int, lk: int, block_q: int, block_k: int, device=None) -> Selection:
    """The "every key" blocks selection (each query block lists every key block; causality trims it)."""
    nqb, nkb = n_blocks(lq, block_q), n_blocks(lk, block_k)
    idx = torch.arange(nkb, device=device).expand(b, h, nqb, nkb)
    return Selection("blocks", idx, complete=True, block_q=block_q, block_k=block_k)


def blocks_from_sets(blockset: torch.Tensor, block_q: int, block_k: int, complete: bool = False) -> Selection:
    """A ``"blocks"`` selection from a boolean ``(B, H, nQB, nKB)`` set of chosen key blocks."""
    idx, valid = indices_from_mask(blockset)
    return Selection("blocks", idx, None if bool(valid.all()) else valid, complete=complete,
                     block_q=block_q, block_k=block_k)


def prefill_blocksets(call, heads: int, block: int, choose, block_k: int | None = None) -> Selection:
    """The ``"blocks"`` selection of a causal prefill ``call`` from a per-prompt rule.

    ``choose(q, k)`` gets one unpadded prompt's ``q (b, Hq, L, D)``, ``k (b, Hkv, L, D)`` and
    returns ``(set, complete)``: the key blocks ``(b, heads, nb, nkb)`` bool each query block of
    ``block`` rows reads (``nb = ⌈L / block⌉``; key blocks of ``block_k`` rows, default ``block``:
    ``nkb = ⌈L / block_k⌉``) and whether that is every causal key (``None``: counted here, square
    blocks only). An unpadded batch is chosen in one call; a padded batch row by row on each row's
    real tokens, so a row gets exactly the grid and the choice it gets alone (module doc); it is
    complete when every row's choice is."""
    bk = block if block_k is None else block_k

    def run(q, k):
        blockset, complete = choose(q, k)
        if complete is None:
            if bk != block:
                raise ValueError("prefill_blocksets: with block_k != block, choose must say whether its set is complete")
            n = blockset.shape[-1]
            complete = int(blockset.sum()) == blockset.shape[0] * heads * n * (n + 1) // 2
        return blockset, bool(complete)

    if call.key_valid is None:
        blockset, complete = run(call.query, call.key)
        return blocks_from_sets(blockset, block, bk, complete=complete)
    nb, nkb = n_blocks(call.q_len, block), n_blocks(call.q_len, bk)
    blockset = torch.zeros(call.batch, heads, nb, nkb, dtype=torch.bool, device=call.query.device)
    complete = True
    for r, start in enumerate((call.k_len - call.n_real[:, 0]).tolist()):
        rows, full = run(call.query[r : r + 1, :, start:], call.key[r : r + 1, :, start:])
        blockset[r : r + 1, :, : rows.shape[2], : rows.shape[3]] = rows
        complete &= full
    return blocks_from_sets(blockset, block, bk, complete=complete)


def forced_blocks(nqb: int, nkb: int, first_block: int = 0, *, sink_blocks: int, local_blocks: int,
                  dense_from: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(causal, forced)``, each ``(nQB, nKB)`` bool, for query blocks ``first_block …`` of a causal
    block grid: the key blocks each query block may read (``j <= i``) and those it always reads —
    its first ``sink_blocks``, its ``local_blocks`` most recent ones (itself included) and, from
    global query block ``dense_from`` on, every earlier block."""
    qi = torch.arange(first_block, first_block + nqb, device=device)[:, None]
    kj = torch.arange(nkb, device=device)[None, :]
    causal = kj <= qi
    forced = (kj < sink_blocks) | (kj > qi - local_blocks)
    if dense_from is not None:
        forced = forced | (qi >= dense_from)
    return causal, forced & causal


def top_blocks(scores: torch.Tensor, keep: torch.Tensor | int, allowed: torch.Tensor,
               forced: torch.Tensor | None = None) -> torch.Tensor:
    """``(…, n)`` bool: among the ``allowed`` entries, the ``forced`` ones plus the highest-scoring
    others, ``keep`` in all (at least the forced ones; fewer when fewer are allowed).

    ``scores (…, n)``: compared in float64; ``keep``: an int or a long tensor broadcastable to
    ``(…, 1)``; ``allowed`` / ``forced``: bool, broadcastable to ``scores``. Ties go to the earlier
    entry (a stable sort), so a choice is the same on every device and for a row of a padded batch
    scored alone. The rule both :func:`route_blocks`-style routers and score-estimating methods
    (Sparsifiner's low-rank mass, Superlinear's span scores) end with."""
    allowed = allowed.expand_as(scores)
    s = scores.double().masked_fill(~allowed, -math.inf)
    if forced is not None:
        forced = forced.expand_as(scores) & allowed
        s = s.masked_fill(forced, math.inf)
    if not torch.is_tensor(keep):
        keep = torch.tensor(int(keep), device=scores.device)
    keep = keep.to(scores.device).long()
    while keep.dim() < scores.dim():
        keep = keep[None]
    if forced is not None:
        keep = torch.maximum(keep, forced.sum(-1, keepdim=True))
    n = scores.shape[-1]
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return (rank < keep) & allowed


# --------------------------------------------------------------------------------------------------
# a causal band of raw keys plus pooled keys, in one softmax
# --------------------------------------------------------------------------------------------------

BAND_CHUNK_ELEMS = 1 << 22
"""Score elements per chunk of query rows in :func:`band_attend` (16 MiB of fp32 scores)."""


def band_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, scale: float, *,
                pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
                n_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Each query row attends, in **one** softmax, to a contiguous band of raw keys ending at itself
    and to a prefix of pooled keys: ``(B, Hq, Lq, Dv)`` in ``q``'s dtype (computed in fp32).

    ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``: one unpadded causal call whose queries are the
    last ``Lq`` keys (query ``i`` sits at key position ``p_i = Lk - Lq + i``). ``lo (Lq,)`` long:
    query ``i`` reads the raw keys ``[lo[i], p_i]`` (``lo[i] <= p_i``). ``pooled = (k_p, v_p)``,
    each ``(B, Hp, m, D)`` with ``Hp`` dividing ``Hq`` (``Hkv`` or ``Hq``; query head ``h`` reads
    pooled head ``h // (Hq / Hp)``): extra keys (e.g. weighted means of groups of raw keys, as
    CCA-Attention's core tokens), of which query ``i`` reads the first ``n_pooled[i]`` (``(Lq,)``
    long, ``<= m``). A pooled key counts as one key (no size weighting, unlike
    :func:`pooled_attend`). The active logit soft-cap is applied to every logit.

    Rows are processed in chunks of at most :data:`BAND_CHUNK_ELEMS` scores; a chunk reads the raw
    keys from its smallest ``lo`` to its last query and the pooled keys up to its largest
    ``n_pooled``, masked per row, so the cost is ``O(Lq · (band + m))``, not ``O(Lq · Lk)``."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    off = lk - lq
    dev = q.device
    lo = lo.to(dev).long()
    pos = off + torch.arange(lq, device=dev)
    if bool((lo > pos).any()) or bool((lo < 0).any()):
        raise ValueError("band_attend: every query must read its own key (0 <= lo[i] <= its position)")
    if pooled is None:
        n_pooled = torch.zeros(lq, dtype=torch.long, device=dev)
        kp = vp = None
        m = 0
    else:
        kp, vp = pooled
        m = kp.shape[2]
        if n_pooled is None or hq % kp.shape[1]:
            raise ValueError("band_attend: pooled keys need n_pooled and a head count dividing the query heads")
        n_pooled = n_pooled.to(dev).long().clamp(0, m)
    cap = active_softcap()
    band = int((pos - lo).max()) + 1 if lq else 0
    step = max(1, BAND_CHUNK_ELEMS // max(1, b * hq * (band + m)))
    out = torch.empty(b, hq, lq, v.shape[-1], dtype=q.dtype, device=dev)
    for a in range(0, lq, step):
        e = min(lq, a + step)
        k0, k1 = int(lo[a:e].min()), off + e
        mc = int(n_pooled[a:e].max()) if m else 0
        qc = q[:, :, a:e]
        s = pooled_scores(qc, k[:, :, k0:k1])  # (B, Hq, C, n) fp32, unscaled
        kpos = torch.arange(k0, k1, device=dev)
        allowed = (kpos[None, :] >= lo[a:e, None]) & (kpos[None, :] <= pos[a:e, None])  # (C, n)
        if mc:
            s = torch.cat([pooled_scores(qc, kp[:, :, :mc]), s], dim=-1)
            core = torch.arange(mc, device=dev)[None, :] < n_pooled[a:e, None]
            allowed = torch.cat([core, allowed], dim=-1)
        s = s * scale
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        o = _grouped_values(p[..., mc:], v[:, :, k0:k1])
        if mc:
            o = o + _grouped_values(p[..., :mc], vp[:, :, :mc])
        out[:, :, a:e] = o.to(q.dtype)
    return out


def _grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p (B, Hq, C, n) @ v (B, H, n, Dv)`` in fp32, query head ``h`` reading head ``h // (Hq / H)``."""
    b, hq, c, n = p.shape
    h = v.shape[1]
    return (p.reshape(b, h, (hq // h) * c, n) @ v.float()).view(b, hq, c, -1)
