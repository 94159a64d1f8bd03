"""A low-precision shadow of the keys, kept by the cache, for scorers that read every key.

Decode on a CPU is bound by bytes read: a scorer that reads all of K in fp32 each step (TokenSelect's
vote, an exact per-page maximum) costs as much as a good part of the attention it is meant to save.
:class:`ShadowKeys` keeps a copy of every key written, in ``bf16`` (half the bytes of fp32) or
``int8`` (a quarter; symmetric per-row quantisation: ``k ≈ scale · q8`` with ``scale = max|k| /
127`` per row and KV head), maintained on write like any :class:`~tokensparse.engine.cache.CacheState`.
:func:`shadow_logits` scores queries against it: bf16 with a grouped ``linear``; int8 with
``torch._int_mm`` (queries quantised per row the same way, the int32 products rescaled), falling
back to dequantised fp32 where that kernel is unavailable. The shadow only ranks keys; attention
always reads the full-precision cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import CacheState, row_buffer

SHADOW_DTYPES = ("bf16", "int8")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last axis: ``(q8, scale)`` with ``x ≈ scale[..., None] · q8``."""
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127.0
    return (x.float() / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8), scale


class ShadowKeys(CacheState):
    """``kind`` ``"bf16"`` or ``"int8"``: a copy of the layer's keys, ``(B, Hkv, n, D)`` (+ int8 row
    scales ``(B, Hkv, n)``). Eviction is refused (the methods that use it read a full cache)."""

    def __init__(self, kind: str = "int8"):
        if kind not in SHADOW_DTYPES:
            raise ValueError(f"shadow kind must be one of {SHADOW_DTYPES}, got {kind!r}")
        self.kind = kind
        self.keys: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.n = 0

    def on_write(self, layer, start, end):
        d = layer._kbuf.shape[-1]
        self.keys = row_buffer(self.keys, layer, self.n, (d,), torch.bfloat16 if self.kind == "bf16" else torch.int8)
        if self.kind == "int8":
            self.scale = row_buffer(self.scale, layer, self.n, (), torch.float32)
        rows = layer.keys[:, :, start:end]
        if self.kind == "bf16":
            self.keys[:, :, start:end] = rows.to(torch.bfloat16)
        else:
            q8, s = quantize_rows(rows)
            self.keys[:, :, start:end] = q8
            self.scale[:, :, start:end] = s
        self.n = end

    def on_crop(self, layer):
        self.n = layer.n

    def on_keep(self, layer, idx, valid):
        raise NotImplementedError("a key shadow needs a full cache; it cannot follow an eviction")

    def map_batch(self, fn) -> None:
        if self.keys is not None:
            self.keys = fn(self.keys)
        if self.scale is not None:
            self.scale = fn(self.scale)

    def bytes_per_key(self, d: int) -> int:
        return d * (2 if self.kind == "bf16" else 1) + (4 if self.kind == "int8" else 0)


def shadow_of(call, kind: str) -> ShadowKeys:
    """The call's cache-kept shadow of ``kind`` (created on first use from the rows held)."""
    return call.cache_layer.state(f"shadow.{kind}", lambda: ShadowKeys(kind))


_INT_MM_OK: dict[str, bool] = {}


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    dev = a.device.type
    if _INT_MM_OK.get(dev) is False:
        return None
    try:
        out = torch._int_mm(a, b)
    except (RuntimeError, AttributeError, NotImplementedError):
        _INT_MM_OK[dev] = False
        return None
    _INT_MM_OK[dev] = True
    return out


def shadow_logits(q: torch.Tensor, shadow: ShadowKeys) -> torch.Tensor:
    """``q (B, Hkv, M, D)`` · shadow keysᵀ → ``(B, Hkv, M, n)`` fp32 (unscaled dot products)."""
    b, h, m, d = q.shape
    n = shadow.n
    out = torch.empty(b, h, m, n, dtype=torch.float32, device=q.device)
    keys = shadow.keys[:, :, :n]
    if shadow.kind == "bf16":
        qb = q.to(torch.bfloat16)
        for i in range(b):
            for j in range(h):
                out[i, j] = F.linear(qb[i, j], keys[i, j]).float()
        return out
    q8, qs = quantize_rows(q)  # (B, Hkv, M, D), (B, Hkv, M)
    ks = shadow.scale[:, :, :n]
    for i in range(b):
        for j in range(h):
            prod = _int_mm(keys[i, j], q8[i, j].t().contiguous()) if n > 16 and m <= 16 else None
            if prod is None:
                out[i, j] = q8[i, j].float() @ keys[i, j].float().t()
            else:
                out[i, j] = prod.t()
    return out * qs[..., None] * ks[:, :, None, :]


def shadow_token_scores(call, kind: str, query: torch.Tensor, start: int, rows: slice) -> torch.Tensor:
    """Per-KV-head key scores ``(rows, Hkv, Lk - start)`` fp32 from a ``kind`` shadow: the maximum over
    each KV head's query group of ``q·k`` (unscaled). ``start == 0`` and every row: the cache-kept
    shadow; otherwise (one row of a padded batch) the row's keys ``[start, Lk)`` quantised the same
    way on the fly (per-row quantisation: the row scores as it would alone)."""
    b, hq, _, d = query.shape
    hkv = call.n_kv_heads
    q = query[:, :, -1].reshape(b, hkv, hq // hkv, d)
    if start == 0 and rows == slice(None) and call.cache_layer is not None:
        shadow = shadow_of(call, kind)
    else:
        shadow = ShadowKeys(kind)
        keys = call.key[rows, :, start:]
        if kind == "bf16":
            shadow.keys = keys.to(torch.bfloat16)
        else:
            shadow.keys, shadow.scale = quantize_rows(keys)
        shadow.n = keys.shape[2]
    return shadow_logits(q, shadow).amax(2)
