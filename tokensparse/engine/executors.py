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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def reference_attention(q, k, v, mask=None, scale=None):
    """Plain matmul/softmax attention in fp32 (the oracle). Masked logits use ``finfo.min``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qf = q.float().reshape(b, hkv, g * lq, d)
    s = (qf @ k.float().transpose(-1, -2) * scale).view(b, hkv, g, lq, lk).reshape(b, hq, lq, lk)
    allowed = _expand_heads(mask, hq) if mask is not None else causal_mask(lq, lk, q.device)
    s = s.masked_fill(~allowed, torch.finfo(torch.float32).min)
    p = s.softmax(-1)
    out = (p.view(b, hkv, g * lq, lk) @ v.float()).view(b, hq, lq, v.shape[-1])
    return out.to(q.dtype)


def dense_attention(q, k, v, mask=None, scale=None):
    """SDPA over un-repeated GQA K/V. ``mask=None`` means bottom-right causal."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    if mask is None and lq == 1:
        # one query: fold the G query heads of a group into the query axis (no K/V copy, no mask)
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, g, d), k, v, scale=scale)
        return out.reshape(b, hq, 1, v.shape[-1])
    if mask is None and lq != lk:
        mask = causal_mask(lq, lk, q.device)[None, None]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=lq > 1, scale=scale, enable_gqa=g > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=g > 1)


# --------------------------------------------------------------------------------------------------
# compress -> attend -> scatter (Token Sparse Attention)
# --------------------------------------------------------------------------------------------------


def _rows(idx: torch.Tensor, heads_of_idx: torch.Tensor, n_heads_src: int, length: int) -> torch.Tensor:
    """Flat row numbers into a ``(B * n_heads_src * length, D)`` view for ``idx (B, H, k)``.

    ``heads_of_idx`` ``(H,)`` gives, for each head of ``idx``, the head of the source tensor.
    """
    b = idx.shape[0]
    base = (torch.arange(b, device=idx.device).view(b, 1, 1) * n_heads_src + heads_of_idx.view(1, -1, 1)) * length
    return (idx + base).reshape(-1)


def _gather_heads(x: torch.Tensor, idx: torch.Tensor, heads_of_idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx (B, H, k)`` of ``x (B, Hx, L, D)`` taken from head ``heads_of_idx[h]`` → ``(B, H, k, D)``."""
    b, hx, length, d = x.shape
    rows = _rows(idx, heads_of_idx, hx, length)
    return x.reshape(b * hx * length, d).index_select(0, rows).view(*idx.shape, d)


def compress_attend_scatter(q, k, v, idx, scale=None, key_valid=None, impl: str = "fast"):
    """Token-sparse attention: per head, attend among the selected tokens only; other rows get 0.

    Parameters
    ----------
    idx:
        ``(B, Hq, n)`` (one selection per query head, as in the paper) or ``(B, Hkv, n)`` (one per KV
        head, shared by its query group, K/V never expanded). Sorted ascending, so causal masking in
        compressed index space equals causal masking in original positions.
    key_valid:
        Optional ``(B, Lk)`` bool: False for padding tokens, which are never attended to.
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
    if impl == "reference":
        sel = torch.zeros(b, idx.shape[1], lk, dtype=torch.bool, device=q.device)
        sel.scatter_(2, idx, True)
        sel = _expand_heads(sel[:, :, None, :], hq)[:, :, 0]  # (B, Hq, L)
        allowed = causal_mask(lq, lk, q.device)[None, None] & sel[:, :, None, :] & sel[:, :, :, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :]
        allowed = allowed | torch.eye(lq, dtype=torch.bool, device=q.device)  # keep rows finite; zeroed below
        out = reference_attention(q, k, v, allowed, scale)
        return out * sel[..., None].to(out.dtype)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")

    dev = q.device
    if per_query_head:
        qheads = torch.arange(hq, device=dev)
        kheads = qheads // g
        qs = _gather_heads(q, idx, qheads)  # (B, Hq, n, D)
        ks = _gather_heads(k, idx, kheads)  # (B, Hq, n, D): per-query-head copies are inherent here
        vs = _gather_heads(v, idx, kheads)
        sel_idx = idx
    else:
        qidx = idx[:, :, None].expand(b, hkv, g, n).reshape(b, hq, n)
        qs = _gather_heads(q, qidx, torch.arange(hq, device=dev))
        ks = _gather_heads(k, idx, torch.arange(hkv, device=dev))  # (B, Hkv, n, D), GQA preserved
        vs = _gather_heads(v, idx, torch.arange(hkv, device=dev))
        sel_idx = qidx
    mask = None
    if key_valid is not None and not bool(key_valid.all()):
        kv_sel = key_valid.gather(1, idx.reshape(b, -1)).view(b, idx.shape[1], 1, n)
        mask = causal_mask(n, n, dev)[None, None] & kv_sel
        mask = mask | torch.eye(n, dtype=torch.bool, device=dev)  # padded query rows stay finite
    if mask is None:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=ks.shape[1] != hq)
    else:
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=ks.shape[1] != hq)
    out = q.new_zeros(b * hq * lq, v.shape[-1])
    out.index_copy_(0, _rows(sel_idx, torch.arange(hq, device=dev), hq, lq), o.reshape(-1, v.shape[-1]))
    return out.view(b, hq, lq, v.shape[-1])


# --------------------------------------------------------------------------------------------------
# decode-time selection over a full cache
# --------------------------------------------------------------------------------------------------


def gather_attend(q, k, v, idx, scale=None, mask=None, impl: str = "fast"):
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
    if impl == "reference":
        full = torch.zeros(b, idx.shape[1], lq, lk, dtype=torch.bool, device=q.device)
        src = torch.ones(b, idx.shape[1], lq, n, dtype=torch.bool, device=q.device) if mask is None else mask.expand(b, idx.shape[1], lq, n)
        full.scatter_(3, idx[:, :, None, :].expand(b, idx.shape[1], lq, n), src)
        return reference_attention(q, k, v, full, scale)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    heads = torch.zeros(1, dtype=torch.long, device=q.device) if idx.shape[1] == 1 else torch.arange(hkv, device=q.device)
    if idx.shape[1] == 1:
        idx = idx.expand(b, hkv, n)
        heads = torch.arange(hkv, device=q.device)
        if mask is not None and mask.shape[1] == 1:
            mask = mask.expand(b, hkv, lq, n)
    ks = _gather_heads(k, idx, heads)  # (B, Hkv, n, D)
    vs = _gather_heads(v, idx, heads)
    if lq == 1 and mask is None:
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, g, d), ks, vs, scale=scale)
        return out.reshape(b, hq, 1, v.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, ks, vs, scale=scale, enable_gqa=g > 1)
    return F.scaled_dot_product_attention(q, ks, vs, attn_mask=_expand_heads(mask, hq), scale=scale, enable_gqa=g > 1)
