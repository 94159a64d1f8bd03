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
else ``"flex"`` where compiled FlexAttention is available (CUDA, or CPU with a C++ compiler) and
no log-sum-exp is asked for on CPU, else ``"gather"``.

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
        elif flex_available(q.device) and not (return_lse and q.device.type == "cpu"):
            impl = "flex"
        else:
            impl = "gather"
    if impl == "flex" and bias is not None:
        raise ValueError("the flex block executor takes no key bias; use impl='gather' or 'auto'")
    if impl == "flex" and return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention returns no log-sum-exp on CPU; use impl='gather' or 'auto'")
    if impl == "flex" and not flex_available(q.device):
        raise RuntimeError("compiled FlexAttention is not available here (no C++ compiler on CPU?); use impl='gather'")
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
    a mask per query block.
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
    qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x for x in (q, k, v))
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
    q6 = qp.view(b, h, gh, nb, bs, d)
    out = torch.zeros(b, nb, h, gh * bs, dv, dtype=q.dtype, device=dev)
    lse = torch.full((b, nb, h, gh * bs), float("-inf"), device=dev)
    for width, group in width_groups(earlier, keep_empty=True):
        step = max(1, SDPA_CHUNK_BYTES // (b * h * (width + 1) * bs * max(d, dv) * qp.element_size()))
        shared = torch.cat([causal.new_zeros(gh * bs, width * bs), causal], -1)[None, None]  # (1, 1, G·bs, (w+1)·bs)
        for blocks in group.split(step):
            m = len(blocks)
            e_idx, e_valid = indices_from_mask(earlier[:, :, blocks], width)  # (B, H, m, width)
            a_idx = torch.cat([e_idx, blocks.expand(b, h, m)[..., None]], -1)  # the diagonal block last
            a_valid = torch.cat([e_valid, diag[:, :, blocks, None]], -1)
            ke, ve = _gather_blocks(kp, a_idx, heads, bs), _gather_blocks(vp, a_idx, heads, bs)
            qe = q6[:, :, :, blocks].permute(0, 3, 1, 2, 4, 5).reshape(b * m, h, gh * bs, d)
            mask = shared
            if not bool(a_valid.all()):
                drop = torch.zeros(b, m, h, 1, width + 1, bs, dtype=q.dtype, device=dev)
                drop.masked_fill_(~a_valid.transpose(1, 2)[:, :, :, None, :, None], float("-inf"))
                mask = shared + drop.view(b * m, h, 1, (width + 1) * bs)
            o, l = _flash_cpu(qe, ke, ve, scale, mask=mask)
            none = ~a_valid.any(-1).transpose(1, 2)  # (B, m, H): read nothing (the kernel reports garbage there)
            out[:, blocks] = o.view(b, m, h, gh * bs, dv).masked_fill(none[..., None, None], 0)
            lse[:, blocks] = l.float().view(b, m, h, gh * bs).masked_fill(none[..., None], float("-inf"))
    out = out.view(b, nb, h, gh, bs, dv).permute(0, 2, 3, 1, 4, 5).reshape(b, hq, nb * bs, dv)[:, :, :lq]
    if not return_lse:
        return out
    return out, lse.view(b, nb, h, gh, bs).permute(0, 2, 3, 1, 4).reshape(b, hq, nb * bs)[:, :, :lq]


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
    if h != hq:  # the mask names query heads (always Hq: one compiled kernel for every selection width)
        sel = sel.repeat_interleave(hq // h, dim=1)
    # a block is "full" when every key in it is real and before the block's first query
    first_q = off + torch.arange(nqb_p, device=q.device) * bq
    last_k = torch.arange(nkb_p, device=q.device) * bk + bk - 1
    full = (last_k[None, :] <= first_q[:, None]) & (last_k[None, :] < lk)
    kv_num, kv_idx = _counts_and_indices(sel & ~full)
    full_num, full_idx = _counts_and_indices(sel & full)
    limits = torch.tensor([off, lk], device=q.device)  # tensors, not ints: no recompile per length

    def mask_mod(bb, hh, q_idx, kv_idx_):
        return (kv_idx_ <= q_idx + limits[0]) & (kv_idx_ < limits[1])

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                  seq_lengths=(lq_p, lk_p), compute_q_blocks=False)
    res = _compiled_flex()(qp, kp, vp, block_mask=bm, scale=scale, enable_gqa=hq != hkv, return_lse=return_lse)
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


def _counts_and_indices(sel: torch.Tensor):
    """``(num (B, H, nQB) int32, idx (B, H, nQB, nKB) int32)`` for ``BlockMask.from_kv_blocks``."""
    num = sel.sum(-1, dtype=torch.int32)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # selected blocks first, ascending
    return num, order.to(torch.int32)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, n_blocks, D)`` float64: the mean row of each ``block``-row block of ``x (B, H, L, D)``
    (the last block may be partial). float64 because pooled rows feed block rankings that two code
    paths (one process, context-parallel ranks) must reproduce exactly: near-ties of fp32 dot
    products can flip with the summation order, those of float64 sums of fp32 values practically
    cannot."""
    b, h, length, d = x.shape
    nb = n_blocks(length, block)
    pad = nb * block - length
    xp = torch.nn.functional.pad(x.double(), (0, 0, 0, pad)) if pad else x.double()
    counts = torch.full((nb,), float(block), dtype=torch.float64, device=x.device)
    counts[-1] = block - pad
    return xp.view(b, h, nb, block, d).sum(3) / counts[:, None]


def route_blocks(q_pooled: torch.Tensor, k_pooled: torch.Tensor, first_block: int, *, keep: torch.Tensor,
                 sink_blocks: int, local_blocks: int, dense_from: int | None = None) -> torch.Tensor:
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
    earlier block."""
    b, hq, nqb, d = q_pooled.shape
    hkv, nkb = k_pooled.shape[1], k_pooled.shape[2]
    g = hq // hkv
    dev = q_pooled.device
    qi = torch.arange(first_block, first_block + nqb, device=dev)[:, None]  # global query block
    kj = torch.arange(nkb, device=dev)[None, :]
    causal = kj <= qi
    scores = (q_pooled.double().view(b, hkv, g, nqb, d) @ k_pooled.double()[:, :, None].transpose(-1, -2)).amax(2)
    forced = (kj < sink_blocks) | (kj > qi - local_blocks)
    if dense_from is not None:
        forced = forced | (qi >= dense_from)
    scores = scores.masked_fill(forced, math.inf).masked_fill(~causal, -math.inf)
    keep = torch.maximum(keep.to(dev)[:, None], (forced & causal).sum(-1, keepdim=True))
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
