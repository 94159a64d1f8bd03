"""A low-precision shadow of the keys, kept by the cache, for scorers that read every key.

Decode on a CPU is bound by bytes read: a scorer that reads all of K in fp32 each step (TokenSelect's
vote, an exact per-page maximum) costs as much as a good part of the attention it is meant to save.
:class:`ShadowKeys` keeps a copy of every key written, in ``bf16`` (half the bytes of fp32) or
``int8`` (a quarter; symmetric per-row quantisation: ``k ≈ scale · q8`` with ``scale = max|k| /
127`` per row and KV head), maintained on write like any :class:`~tokensparse.engine.cache.CacheState`.
:func:`shadow_logits` scores queries against it: bf16 with one batched ``matmul``; int8 with
:func:`int8_products` (queries quantised per row the same way, exact integer products rescaled:
``torch._int_mm`` on a CPU, one batched fp32 ``matmul`` of the same integers elsewhere). The shadow only ranks keys; attention
always reads the full-precision cache.
"""

from __future__ import annotations

import torch

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


#: whether :func:`int8_products` uses ``torch._int_mm`` on a CPU: only where PyTorch dispatches its
#: AVX-512 kernels (int8 dot products in hardware on the CPUs measured here). On an AVX2 CPU (an AMD
#: EPYC of family 23, 2026-12-07) it measured ~40x slower than the fp32 product of the same
#: integers, which is exact (see :func:`int8_products`) and used there instead. Read once at import
#: (a plain constant inside compiled static steps).
CPU_INT_MM = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int8_products(q: torch.Tensor, k8: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``q (B, Hkv, M, D)`` against int8 keys ``k8 (B, Hkv, n, D)`` with row scales ``ks (B, Hkv, n)``:
    ``(B, Hkv, M, n)`` fp32, the exact integer products of the per-row quantised query and keys,
    rescaled. On an AVX-512 CPU ``torch._int_mm`` per (row, KV head) (it is 2-D only;
    :data:`CPU_INT_MM`); elsewhere, and for shapes that kernel refuses (``n <= 16`` or ``M > 16``),
    one batched fp32 ``matmul`` over every row and KV head: the same integers, exact because every
    partial sum is an integer with ``|Σ| <= D · 127² < 2²⁴`` for ``D <= 1040``. Used by the engine's scorers and the static step."""
    b, h, m, d = q.shape
    if d > 1040:
        raise ValueError(f"int8 products are exact in fp32 up to head_dim 1040, got {d}")
    n = k8.shape[2]
    q8, qs = quantize_rows(q)
    if q.device.type == "cpu" and n > 16 and m <= 16 and CPU_INT_MM:
        prods = torch.stack([torch._int_mm(k8[i, j], q8[i, j].t().contiguous()).t()
                             for i in range(b) for j in range(h)]).view(b, h, m, n).float()
    else:
        prods = torch.matmul(q8.float(), k8.transpose(-1, -2).float())
    return prods * qs[..., None] * ks[:, :, None, :]


def shadow_logits(q: torch.Tensor, shadow: ShadowKeys) -> torch.Tensor:
    """``q (B, Hkv, M, D)`` · shadow keysᵀ → ``(B, Hkv, M, n)`` fp32 (unscaled dot products); one
    batched product over every row and KV head (bf16), or :func:`int8_products`."""
    n = shadow.n
    keys = shadow.keys[:, :, :n]
    if shadow.kind == "bf16":
        return torch.matmul(q.to(torch.bfloat16), keys.transpose(-1, -2)).float()
    return int8_products(q, keys, shadow.scale[:, :, :n])


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
