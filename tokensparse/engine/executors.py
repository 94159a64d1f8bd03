"""Attention executors: where a selection is applied. Each has a plain reference and a fast path.

Shapes: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` (never repeated for GQA), ``G = Hq // Hkv``,
query head ``h`` uses KV head ``h // G`` (the transformers ``repeat_kv`` convention). Boolean masks
are True where attention is allowed, shaped ``(B, 1 | Hkv | Hq, Lq, Lk)``; ``None`` means causal
aligned bottom-right (query ``i`` is at absolute position ``Lk - Lq + i``). All executors return
``(B, Hq, Lq, D)``.

* :func:`reference_attention`: matmul + softmax in fp32, the oracle the others are tested against.
* :func:`dense_attention`: ``F.scaled_dot_product_attention`` with GQA handled without copies.
* :func:`compress_attend_scatter` (Token Sparse Attention): gather the selected rows of Q, K, V per
  head, run causal attention on the reduced set, scatter outputs back (unselected rows get 0).
* :func:`gather_attend` (decode-time selection): read only the selected K/V rows with one flat
  ``index_select`` and run SDPA; ``torch.gather`` with expanded indices measured slower than dense
  on CPU, so it is never used on the hot path.

Every executor takes an optional ``bias`` (:class:`~tokensparse.engine.selection.KeyBias`: an
additive logit bias on a few key columns per row and query head). The references add it to the
logits; the SDPA paths apply it exactly through :func:`with_key_bias`, which appends ``n`` columns
to Q, K and V (Q: the bias over the scale, K: a one-hot of the biased positions, V: zeros) so that
``scale · q'·k' = scale · q·k + bias`` and the output is unchanged otherwise. SDPA keeps its fused
CPU kernel only when Q, K and V have the same head size, hence the zero columns of V.

Logit soft-capping (Gemma 2: ``logits = cap · tanh(logits / cap)`` before the mask and softmax) is
set for the duration of an attention call with :func:`logit_softcap` (the engine does it when the
model passes ``softcap=``). SDPA and the CPU flash kernels cannot soft-cap, so while a cap is active
*every* executor runs its reference path, which applies it (correct, not fast: soft-capped models
get no speed-up from the fast executors), and :func:`dense_attention` runs :func:`reference_attention`.
A key bias is added after the cap.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from .selection import KeyBias, mask_from_indices


DECODE_ROWS = 16
"""Query rows up to which an SDPA call counts as a decode call (see :func:`sdpa`)."""


def _decode_order():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def decode_backends():
    """Prefer SDPA's flash and memory-efficient kernels over cuDNN's (then cuDNN, then MATH).

    Measured on an H200 (torch 2.11 + CUDA 13, Llama-3.1-8B shape, bf16, decode at 32K): SDPA picks
    cuDNN attention for a one-query call, and cuDNN builds an execution plan for every new key length,
    i.e. on every decode step: 1.35 ms of host time per call, 43 of the 64 ms of a dense decode step
    (docs/results/gpu/README.md). Flash reads the same bytes without it. Every SDPA call of the engine
    with at most :data:`DECODE_ROWS` query rows on CUDA runs under this order (:func:`sdpa`); wrap a
    plain transformers decode loop in it for the same effect on dense decoding. Calls the preferred
    kernels cannot take (a boolean mask with GQA in bf16) still reach cuDNN. No effect on CPU."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_decode_order(), set_priority=True):
        yield


def sdpa(q, k, v, **kw):
    """``F.scaled_dot_product_attention``; decode-sized calls on CUDA under :func:`decode_backends`."""
    if q.is_cuda and q.shape[-2] <= DECODE_ROWS:
        with decode_backends():
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


_SOFTCAP: contextvars.ContextVar[float | None] = contextvars.ContextVar("tokensparse_softcap", default=None)


@contextlib.contextmanager
def logit_softcap(cap: float | None):
    """Soft-cap attention logits at ``cap`` in every executor inside the block (``None``: no cap)."""
    if cap is not None and not (float(cap) > 0):
        raise ValueError(f"a logit soft-cap must be > 0, got {cap!r}")
    token = _SOFTCAP.set(None if cap is None else float(cap))
    try:
        yield
    finally:
        _SOFTCAP.reset(token)


def active_softcap() -> float | None:
    """The soft-cap of the current attention call (see :func:`logit_softcap`), or ``None``."""
    return _SOFTCAP.get()


def _capped(s: torch.Tensor) -> torch.Tensor:
    cap = _SOFTCAP.get()
    return s if cap is None else torch.tanh(s / cap) * cap


def _expand_heads(mask: torch.Tensor | None, hq: int) -> torch.Tensor | None:
    """Broadcast a ``(B, 1|Hkv|Hq, Lq, Lk)`` mask to ``(B, Hq, Lq, Lk)`` (GQA-contiguous grouping)."""
    if mask is None or mask.shape[1] in (1, hq):
        return mask
    b, hkv, lq, lk = mask.shape
    g = hq // hkv
    return mask[:, :, None].expand(b, hkv, g, lq, lk).reshape(b, hq, lq, lk)


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """``(Lq, Lk)`` bool, bottom-right aligned causal mask."""
    qpos = torch.arange(lk - lq, lk, device=device)
    return torch.arange(lk, device=device)[None, :] <= qpos[:, None]


def bias_at(bias: KeyBias, key_pos: torch.Tensor, hq: int) -> torch.Tensor:
    """The bias of keys at positions ``key_pos (B|1, 1|Hkv|Hq, n)``: ``(B, Hq, n)`` float32."""
    kp = key_pos
    if kp.shape[1] not in (1, hq):
        kp = kp.repeat_interleave(hq // kp.shape[1], dim=1)
    match = kp[..., None] == bias.pos[:, None, None, :]  # (B, 1|Hq, n, nb)
    return (match.float() * bias.value.float()[:, :, None, :]).sum(-1).expand(match.shape[0], hq, kp.shape[-1])


def with_key_bias(q, k, v, bias: KeyBias, scale: float, key_pos: torch.Tensor | None = None):
    """``(q', k', v')`` with ``nb`` appended columns such that SDPA at ``scale`` over them adds
    ``bias`` to the logits of the biased keys (exactly, up to one rounding of ``bias / scale``).

    ``key_pos (B|1, 1|Hk, Lk)``: the position each row of ``k`` holds (default ``0 .. Lk-1``, i.e.
    ``k`` is the whole cache; a gathered ``k`` passes its indices). Output of SDPA on the result is
    sliced back to ``v``'s head size by the caller.
    """
    b, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    nb = bias.pos.shape[-1]
    if key_pos is None:
        key_pos = torch.arange(lk, device=k.device)[None, None]
    onehot = (key_pos[..., None] == bias.pos[:, None, None, :]).to(k.dtype).expand(b, hk, lk, nb)
    qe = (bias.value.float() / scale).to(q.dtype)[:, :, None, :].expand(b, hq, lq, nb)
    zeros = v.new_zeros(1, 1, 1, 1).expand(b, v.shape[1], v.shape[2], nb)
    return torch.cat([q, qe], -1), torch.cat([k, onehot], -1), torch.cat([v, zeros], -1)


def _sdpa(q, k, v, *, mask=None, is_causal=False, scale, bias=None, key_pos=None):
    """SDPA over un-repeated GQA K/V with an optional key bias; returns ``(B, Hq, Lq, Dv)``."""
    dv = v.shape[-1]
    if bias is not None:
        q, k, v = with_key_bias(q, k, v, bias, scale, key_pos)
    g = q.shape[1] // k.shape[1]
    out = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=g > 1)
    return out if bias is None else out[..., :dv]


def reference_attention(q, k, v, mask=None, scale=None, bias: KeyBias | None = None, return_lse: bool = False,
                        return_probs: bool = False):
    """Plain matmul/softmax attention in fp32 (the oracle). Masked logits use ``finfo.min``.

    ``return_lse``: also return the log-sum-exp ``(B, Hq, Lq)`` fp32 of each row's logits over its
    allowed keys (``-inf`` for a row that may see no key; its output is then the uniform average,
    as with ``finfo.min`` masking). ``return_probs``: also return the attention probabilities
    ``(B, Hq, Lq, Lk)`` fp32 the output was computed from (one pass: a method that ranks keys by
    the attention of a dense step reads them here instead of computing the logits twice)."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    p, lse = reference_probs(q, k, mask, scale, bias, return_lse)
    out = (p.view(b, hkv, g * lq, lk) @ v.float()).view(b, hq, lq, v.shape[-1]).to(q.dtype)
    extra = ((lse,) if return_lse else ()) + ((p,) if return_probs else ())
    return (out, *extra) if extra else out


def reference_probs(q, k, mask=None, scale=None, bias: KeyBias | None = None, return_lse: bool = False):
    """The probabilities ``(B, Hq, Lq, Lk)`` fp32 of :func:`reference_attention` (and its log-sum-exp
    ``(B, Hq, Lq)`` when ``return_lse``, else ``None``), without the product with V."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qf = q.float().reshape(b, hkv, g * lq, d)
    s = _capped((qf @ k.float().transpose(-1, -2) * scale).view(b, hkv, g, lq, lk).reshape(b, hq, lq, lk))
    if bias is not None:
        s = s + bias_at(bias, torch.arange(lk, device=q.device)[None, None], hq)[:, :, None, :]
    allowed = _expand_heads(mask, hq) if mask is not None else causal_mask(lq, lk, q.device)
    lse = s.masked_fill(~allowed, float("-inf")).logsumexp(-1) if return_lse else None
    return s.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1), lse


def dense_attention(q, k, v, mask=None, scale=None, bias: KeyBias | None = None):
    """SDPA over un-repeated GQA K/V. ``mask=None`` means bottom-right causal."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    if _SOFTCAP.get() is not None:  # SDPA cannot soft-cap
        if mask is None and lq != lk:
            mask = causal_mask(lq, lk, q.device)[None, None]
        return reference_attention(q, k, v, mask, scale, bias)
    if bias is not None:
        scale = d**-0.5 if scale is None else scale
        if mask is None and lq != lk:
            mask = causal_mask(lq, lk, q.device)[None, None]
        return _sdpa(q, k, v, mask=_expand_heads(mask, hq), is_causal=mask is None and lq > 1, scale=scale, bias=bias)
    if mask is None and lq == 1:
        # one query: fold the G query heads of a group into the query axis (no K/V copy, no mask)
        out = sdpa(q.reshape(b, hkv, g, d), k, v, scale=scale)
        return out.reshape(b, hq, 1, v.shape[-1])
    if mask is None and lq != lk:
        mask = causal_mask(lq, lk, q.device)[None, None]
    if mask is None:
        return sdpa(q, k, v, is_causal=lq > 1, scale=scale, enable_gqa=g > 1)
    return sdpa(q, k, v, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=g > 1)


# --------------------------------------------------------------------------------------------------
# compress -> attend -> scatter (Token Sparse Attention)
# --------------------------------------------------------------------------------------------------


def _row_table(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A ``(rows, D)`` view of the storage behind ``x (B, H, L, D)`` and the row strides of B, H, L.

    ``x[b, h, l] == rows[b * sb + h * sh + l * sl]``. Cache views (a prefix of a preallocated buffer)
    and the transposed query view transformers passes are addressed in place; only tensors whose
    rows are not contiguous in memory are copied first. Reshaping a cache view instead would copy
    the whole cache on every call.
    """
    d = x.shape[-1]
    st = x.stride()
    if st[-1] != 1 or any(s % d for s in st[:-1]):
        x = x.contiguous()
        st = x.stride()
    n_rows = sum((n - 1) * s for n, s in zip(x.shape[:-1], st[:-1])) // d + 1
    return x.as_strided((n_rows, d), (d, 1)), (st[0] // d, st[1] // d, st[2] // d)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``idx (B, H, k)`` of ``x (B, Hx, L, D)`` → ``(B, H, k, D)`` with one flat ``index_select``.

    Head ``h`` of ``idx`` reads head ``heads[h]`` of ``x`` (default: the same head). This is the
    decode hot path: ``torch.gather`` with an index expanded over ``D`` measured slower than dense
    attention on CPU, a flat row ``index_select`` about 10× faster.
    """
    rows, strides = _row_table(x)
    b, h, k = idx.shape
    return rows.index_select(0, _flat_rows(strides, idx, heads)).view(b, h, k, x.shape[-1])


def gather_kv_rows(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_rows` of ``k`` and ``v`` at the same ``idx``; the flat row index is built once
    when both have the same layout (the engine's cache: always), saving its ~8 small ops per call
    (a kernel launch each on a GPU)."""
    rk, sk = _row_table(k)
    rv, sv = _row_table(v)
    b, h, n = idx.shape
    fk = _flat_rows(sk, idx)
    fv = fk if sv == sk else _flat_rows(sv, idx)
    return rk.index_select(0, fk).view(b, h, n, k.shape[-1]), rv.index_select(0, fv).view(b, h, n, v.shape[-1])


def _flat_rows(strides: tuple[int, int, int], idx: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Flat row numbers of ``idx (B, H, k)`` in a :func:`_row_table` with row ``strides``."""
    sb, sh, sl = strides
    b, h, _ = idx.shape
    if heads is None:
        heads = torch.arange(h, device=idx.device)
    base = torch.arange(b, device=idx.device).view(b, 1, 1) * sb + heads.view(1, -1, 1) * sh
    return (idx * sl + base).reshape(-1)


def gather_pages(x: torch.Tensor, pages: torch.Tensor, page: int) -> torch.Tensor:
    """Whole pages ``pages (B, H, k)`` (page ``j`` = rows ``[j·page, (j+1)·page)``) of ``x (B, H, L, D)``
    → ``(B, H, k·page, D)``: one ``index_select`` per (sequence, head) over a view of its rows as
    ``(L // page, page·D)`` pages, i.e. one contiguous copy per page instead of one per row (the
    pages must lie below ``L``). Equals :func:`gather_rows` on the pages' rows, which is what runs
    off a CPU: one flat ``index_select`` there instead of a kernel launch per (sequence, head)."""
    if x.device.type != "cpu":
        return gather_rows(x, page_rows(pages, page))
    b, h, k = pages.shape
    d = x.shape[-1]
    n_full = x.shape[2] // page
    out = x.new_empty(b, h, k * page, d)
    for i in range(b):
        for j in range(h):
            rows = x[i, j, : n_full * page]
            if rows.stride(-1) != 1 or rows.stride(-2) != d:
                rows = rows.contiguous()
            torch.index_select(rows.view(n_full, page * d), 0, pages[i, j], out=out[i, j].view(k, page * d))
    return out


def page_rows(pages: torch.Tensor, page: int) -> torch.Tensor:
    """The rows ``(B, H, k·page)`` of pages ``(B, H, k)``, page by page in order."""
    b, h, k = pages.shape
    offs = torch.arange(page, device=pages.device, dtype=pages.dtype)
    return (pages.unsqueeze(-1) * page + offs).reshape(b, h, k * page)


def compress_attend_scatter(q, k, v, idx, scale=None, key_valid=None, impl: str = "fast", valid=None,
                            bias: KeyBias | None = None):
    """Token-sparse attention: per head, attend among the selected tokens only; other rows get 0.

    Parameters
    ----------
    idx:
        ``(B, Hq, n)`` (one selection per query head, as in the paper) or ``(B, Hkv, n)`` (one per KV
        head, shared by its query group, K/V never expanded). Sorted ascending, so causal masking in
        compressed index space equals causal masking in original positions.
    key_valid:
        Optional ``(B, Lk)`` bool: False for padding tokens, which are never attended to.
    valid:
        Optional bool shaped like ``idx``: False marks filler entries of a row that selected fewer
        tokens than the widest row (their position may repeat another entry's). Filler entries are
        neither attended to nor written back.
    impl:
        ``"fast"`` gathers rows and runs SDPA on the reduced tensors; ``"reference"`` computes dense
        masked attention over the full sequence in fp32 and zeroes unselected rows.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if lq != lk:
        raise ValueError(f"compress_attend_scatter is a prefill executor: needs Lq == Lk, got {lq} and {lk}")
    g = hq // hkv
    per_query_head = idx.shape[1] == hq
    if not per_query_head and idx.shape[1] != hkv:
        raise ValueError(f"idx must have {hq} (query heads) or {hkv} (KV heads) heads, got {idx.shape[1]}")
    n = idx.shape[-1]
    if _SOFTCAP.get() is not None:  # a soft-capped call: the reference applies the cap
        impl = "reference"
    if impl == "reference":
        sel = mask_from_indices(idx, lk, valid)
        sel = _expand_heads(sel[:, :, None, :], hq)[:, :, 0]  # (B, Hq, L)
        allowed = causal_mask(lq, lk, q.device)[None, None] & sel[:, :, None, :] & sel[:, :, :, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :]
        allowed = allowed | torch.eye(lq, dtype=torch.bool, device=q.device)  # keep rows finite; zeroed below
        out = reference_attention(q, k, v, allowed, scale, bias)
        return out * sel[..., None].to(out.dtype)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")

    dev = q.device
    qs, ks, vs, sel_idx, q_valid = compress_rows(q, k, v, idx, valid)
    if valid is not None and bool(valid.all()):
        valid = q_valid = None
    kv_sel = None
    if key_valid is not None and not bool(key_valid.all()):
        kv_sel = key_valid.gather(1, idx.reshape(b, -1)).view(b, idx.shape[1], 1, n)
    if valid is not None:
        kv_sel = valid[:, :, None, :] if kv_sel is None else kv_sel & valid[:, :, None, :]
    mask = None
    if kv_sel is not None:
        mask = causal_mask(n, n, dev)[None, None] & kv_sel
        mask = mask | torch.eye(n, dtype=torch.bool, device=dev)  # padded/filler query rows stay finite
    if bias is not None:
        o = _sdpa(qs, ks, vs, mask=_expand_heads(mask, hq), is_causal=mask is None, scale=d**-0.5 if scale is None else scale,
                  bias=bias, key_pos=idx)
    elif mask is None:
        o = sdpa(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=ks.shape[1] != hq)
    else:
        o = sdpa(qs, ks, vs, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=ks.shape[1] != hq)
    return scatter_rows(o, sel_idx, q_valid, lq)


def compress_rows(q, k, v, idx, valid=None):
    """The gather step of :func:`compress_attend_scatter` (also used by
    :func:`tokensparse.engine.compressed.compress_blocks_attend_scatter`): ``(qs, ks, vs, q_idx,
    q_valid)`` with ``qs (B, Hq, n, D)`` the selected query rows of every query head, ``ks, vs`` the
    selected K/V rows — ``(B, Hq, n, D)`` for a per-query-head ``idx`` (each query head its own
    copy of its KV head's rows), ``(B, Hkv, n, D)`` for a per-KV-head one (GQA preserved) — and
    ``q_idx``, ``q_valid`` (``(B, Hq, n)``) the positions and validity of the query rows, for
    :func:`scatter_rows`."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    g = hq // hkv
    n = idx.shape[-1]
    if idx.shape[1] == hq:
        qheads = torch.arange(hq, device=q.device)
        kheads = qheads // g
        # (B, Hq, n, D) each: per-query-head K/V copies are inherent here
        return gather_rows(q, idx, qheads), gather_rows(k, idx, kheads), gather_rows(v, idx, kheads), idx, valid
    qidx = idx[:, :, None].expand(b, hkv, g, n).reshape(b, hq, n)
    q_valid = None if valid is None else valid[:, :, None].expand(b, hkv, g, n).reshape(b, hq, n)
    return gather_rows(q, qidx), gather_rows(k, idx), gather_rows(v, idx), qidx, q_valid


def scatter_rows(o: torch.Tensor, q_idx: torch.Tensor, q_valid: torch.Tensor | None, lq: int) -> torch.Tensor:
    """The scatter step of :func:`compress_attend_scatter`: ``o (B, Hq, n, Dv)``, the outputs of the
    query rows ``q_idx (B, Hq, n)``, written into a zero ``(B, Hq, lq, Dv)`` output (filler entries,
    ``q_valid`` False, are dropped)."""
    b, hq, _, dv = o.shape
    dev = o.device
    # written in (B, Lq, Hq, D) order, the layout transformers wants back: the final transpose is free
    # (filler entries are written to one extra row per sequence, dropped at the end)
    lo = lq if q_valid is None else lq + 1
    if q_valid is not None:
        q_idx = torch.where(q_valid, q_idx, lq)
    out = o.new_zeros(b, lo, hq, dv)
    rows = (torch.arange(b, device=dev).view(b, 1, 1) * lo + q_idx) * hq + torch.arange(hq, device=dev).view(1, hq, 1)
    out.view(-1, dv).index_copy_(0, rows.reshape(-1), o.reshape(-1, dv))
    return out[:, :lq].transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# decode-time selection over a full cache
# --------------------------------------------------------------------------------------------------


def gather_attend(q, k, v, idx, scale=None, mask=None, impl: str = "fast", bias: KeyBias | None = None):
    """Attend only to the K/V rows ``idx`` ``(B, 1 | Hkv, n)`` (sorted; shared by the heads above them).

    ``mask``: optional bool ``(B, 1|Hkv, Lq, n)`` over the *selected* keys (causality inside the
    current chunk, padding). ``None``: every selected key is visible to every query.
    ``impl="reference"`` builds a full-length key mask and runs :func:`reference_attention`.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    if idx.shape[1] not in (1, hkv):
        raise ValueError(f"idx must have 1 or {hkv} heads, got {idx.shape[1]}")
    n = idx.shape[-1]
    if _SOFTCAP.get() is not None:  # a soft-capped call: the reference applies the cap
        impl = "reference"
    if impl == "reference":
        full = mask_from_indices(idx[:, :, None, :].expand(b, idx.shape[1], lq, n), lk, None if mask is None else mask.expand(b, idx.shape[1], lq, n))
        return reference_attention(q, k, v, full, scale, bias)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    if idx.shape[1] == 1:
        idx = idx.expand(b, hkv, n)
        if mask is not None and mask.shape[1] == 1:
            mask = mask.expand(b, hkv, lq, n)
    ks, vs = gather_kv_rows(k, v, idx)  # (B, Hkv, n, D)
    if bias is not None:
        return _sdpa(q, ks, vs, mask=_expand_heads(mask, hq), scale=d**-0.5 if scale is None else scale, bias=bias, key_pos=idx)
    if lq == 1 and mask is None:
        out = sdpa(q.reshape(b, hkv, g, d), ks, vs, scale=scale)
        return out.reshape(b, hq, 1, v.shape[-1])
    if mask is None:
        return sdpa(q, ks, vs, scale=scale, enable_gqa=g > 1)
    return sdpa(q, ks, vs, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=g > 1)


# --------------------------------------------------------------------------------------------------
# attention over several key segments without concatenating them (decode)
# --------------------------------------------------------------------------------------------------


def segments_attend(q, segments, scale=None, impl: str = "fast", bias: KeyBias | None = None, positions=None):
    """One softmax over the union of key segments, without copying them into one tensor.

    ``q (B, Hq, Lq, D)``; ``segments``: a list of ``(k_i, v_i)`` with ``k_i, v_i (B, Hkv, n_i, D)``,
    e.g. views of the cache (sink rows, the local window) and a small gathered set (top-k rows).
    Every query sees every key (decode: the current token is the last row of the local window).
    The fast path computes the logits of each segment with a grouped matmul, one softmax over
    their concatenation (only ``Lq × Σ n_i`` floats per head), and sums ``p_i @ v_i``: reading a
    cache view costs nothing, whereas ``torch.cat`` would copy every row each step.
    ``impl="reference"`` concatenates the segments and takes one plain fp32 softmax over them.
    ``bias`` needs ``positions``: one ``(B|1, 1|Hkv, n_i)`` long tensor per segment, the key
    positions its rows hold.
    """
    if bias is not None and (positions is None or len(positions) != len(segments)):
        raise ValueError("segments_attend: a bias needs the key positions of every segment")
    if bias is not None:
        positions = [p for (k, _), p in zip(segments, positions) if k.shape[2] > 0]
    segments = [(k, v) for k, v in segments if k.shape[2] > 0]
    if not segments:
        raise ValueError("segments_attend needs at least one non-empty key segment")
    b, hq, lq, d = q.shape
    hkv = segments[0][0].shape[1]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    if _SOFTCAP.get() is not None:  # a soft-capped call: the reference applies the cap
        impl = "reference"
    if impl == "reference":
        k = torch.cat([s[0] for s in segments], 2)
        v = torch.cat([s[1] for s in segments], 2)
        qf = q.float().reshape(b, hkv, g * lq, d)
        logits = _capped((qf @ k.float().transpose(-1, -2) * scale).view(b, hq, lq, k.shape[2]))
        if bias is not None:
            pos = torch.cat([p.expand(b, hkv, p.shape[-1]) for p in positions], -1)
            logits = logits + bias_at(bias, pos, hq)[:, :, None, :]
        p_ = logits.softmax(-1)
        return (p_.reshape(b, hkv, g * lq, -1) @ v.float()).view(b, hq, lq, -1).to(q.dtype)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    qg = (q.float() * scale).reshape(b, hkv, g * lq, d)
    logits = torch.cat([qg @ k.float().transpose(-1, -2) for k, _ in segments], dim=-1)  # (B, Hkv, G·Lq, Σn)
    if bias is not None:
        pos = torch.cat([p.expand(b, hkv, p.shape[-1]) for p in positions], -1)
        add = bias_at(bias, pos, hq)  # (B, Hq, Σn)
        logits = logits + add.view(b, hkv, g, 1, -1).expand(b, hkv, g, lq, add.shape[-1]).reshape(logits.shape)
    p = logits.softmax(-1)
    out, start = None, 0
    for k, v in segments:
        n = k.shape[2]
        part = p[..., start : start + n] @ v.float()
        out = part if out is None else out.add_(part)
        start += n
    return out.view(b, hq, lq, -1).to(q.dtype)
