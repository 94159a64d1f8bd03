"""One call of the attention function, with everything a method needs to decide what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .cache import EvictingLayer, PreallocLayer
from .executors import causal_mask, dense_attention, reference_attention, reference_probs


class CacheRequiredError(RuntimeError):
    """An eviction method ran without a tokensparse evicting cache."""


@dataclass(eq=False)
class AttentionCall:
    """Arguments of one attention call, plus derived facts.

    ``query (B, Hq, Lq, D)`` is post-RoPE; ``key/value (B, Hkv, Lk, D)`` are post-RoPE and already
    include this call's tokens (transformers updates the cache first). ``hf_mask`` is what
    transformers built (``None`` = causal, no padding). ``cache_layer`` is the tokensparse cache
    layer that produced ``key`` (``None`` for a stock cache or no cache). ``session`` is the
    :class:`~tokensparse.engine.session.Session` and ``layer`` its
    :class:`~tokensparse.engine.session.LayerState` for this layer (typed loosely here: this module
    sits below the session in the import graph).
    """

    module: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    hf_mask: torch.Tensor | None
    scale: float
    session: Any
    layer: Any
    cache_layer: PreallocLayer | None
    use_cache: bool = True
    extra: dict = field(default_factory=dict)

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def layer_idx(self) -> int:
        return self.layer.layer_idx

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def n_q_heads(self) -> int:
        return self.query.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def group(self) -> int:
        return self.n_q_heads // self.n_kv_heads

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def past_len(self) -> int:
        """Physical rows that were already cached before this call."""
        return self.k_len - self.q_len

    @property
    def kind(self) -> str:
        """``"prefill"`` (nothing cached before), ``"chunk"`` (several tokens on a cache) or ``"decode"``."""
        if self.past_len == 0:
            return "prefill"
        return "decode" if self.q_len == 1 else "chunk"

    @cached_property
    def sliding_window(self) -> int | None:
        """Width of this layer's sliding attention window, or ``None`` on a global-attention layer.

        Read from what the model tells its attention function (Mistral and Qwen2/3 pass
        ``sliding_window=`` to the attention interface; ``module.sliding_window`` as a fallback),
        then from ``config.layer_types``. Semantics as transformers' mask: a query at position
        ``p`` sees keys ``s`` with ``p - W < s <= p``.
        """
        w = self.extra.get("sliding_window", getattr(self.module, "sliding_window", None))
        if w is None:
            types = getattr(self.module.config, "layer_types", None)
            if types and types[self.layer_idx] == "sliding_attention":
                w = getattr(self.module.config, "sliding_window", None)
        return None if w is None else int(w)

    @property
    def is_sliding(self) -> bool:
        """True on sliding-window layers; the engine runs them dense (methods assume global attention)."""
        if self.sliding_window is not None:
            return True
        types = getattr(self.module.config, "layer_types", None)
        return bool(types) and types[self.layer_idx] not in ("full_attention", "sliding_attention")

    @property
    def evicting(self) -> EvictingLayer | None:
        return self.cache_layer if isinstance(self.cache_layer, EvictingLayer) else None

    # ---- masks -----------------------------------------------------------------------------------
    @cached_property
    def mask(self) -> torch.Tensor | None:
        """Bool ``(B, 1|Hkv, Lq, Lk)`` (True = attend) or ``None`` for plain bottom-right causal.

        When an evicting cache holds empty rows (padding) or has evicted, physical rows no longer
        sit at the absolute positions transformers' mask assumes, so the engine rebuilds the mask
        from the absolute token index of each row (``slots``), also when transformers sized the mask
        from another layer of the same type: an old row is visible where it holds
        a token and, on a sliding-window layer, where it lies inside the query's window; the
        call's own rows follow transformers' mask (exact for them: padding, causality, window).
        """
        ev = self.evicting
        foreign = self.hf_mask is not None and self.hf_mask.shape[-1] != self.k_len  # sized from another layer
        if ev is None or not (ev.evicted or ev.has_empty_rows or foreign):
            if foreign:
                raise ValueError(
                    f"layer {self.layer_idx}: transformers built a mask for {self.hf_mask.shape[-1]} keys, the cache "
                    f"holds {self.k_len}; layers of one attention type must hold the same rows"
                )
            return self.hf_mask
        b, lq, past = self.batch, self.q_len, self.past_len
        slots = ev.slots[:, :, :past]  # (B, Hkv, past) absolute token index, -1 = empty, <= -2 synthetic
        old = (slots != -1)[:, :, None, :]  # (B, Hkv, 1, past): tokens and synthetic rows
        w = self.sliding_window
        if w is not None:
            qabs = torch.arange(ev.seen - lq, ev.seen, device=slots.device)  # absolute query positions
            old = old & (slots[:, :, None, :] > qabs[None, None, :, None] - w)  # (B, Hkv, Lq, past)
        if self.hf_mask is not None:
            new = self.hf_mask[:, :, :, -lq:]
        else:
            new = causal_mask(lq, lq, self.query.device)[None, None]
        hk = old.shape[1]
        new = new.expand(b, hk if new.shape[1] == 1 else new.shape[1], lq, lq)
        return torch.cat([old.expand(b, hk, lq, past), new], dim=-1)

    @cached_property
    def key_valid(self) -> torch.Tensor | None:
        """``(B, Lk)`` bool: False for keys that hold no token (padding, empty rows), or ``None``.

        Derived from the last query row, which on a global-attention layer sees every real key of a
        left-padded (or unpadded) batch. Per-head holes of an evicted cache are not included here;
        use :attr:`mask` for those.
        """
        m = self.mask
        if m is None:
            return None
        return m[:, :, -1, :].any(1)

    @cached_property
    def n_real(self) -> torch.Tensor:
        """``(B, 1)`` long: number of real keys per row (``Lk`` without padding)."""
        v = self.key_valid
        if v is None:
            return torch.full((self.batch, 1), self.k_len, dtype=torch.long, device=self.query.device)
        return v.long().sum(-1, keepdim=True)

    @cached_property
    def host_real(self) -> list[int] | None:
        """Real keys per row as Python ints, known without reading a tensor, or ``None``.

        ``[Lk] * B`` for a call without padding (no mask); ``Lk`` minus each row's left padding on
        a full (non-evicting) tokensparse cache layer, which records the padding of a sequence when
        its prompt is written (:attr:`~tokensparse.engine.cache.PreallocLayer.left_pad`; later tokens
        are real: left padding only). ``None`` elsewhere (an evicting cache, a stock cache with a
        mask, a padding layout the layer could not record): callers then read :attr:`n_real` from
        the device. Methods take shapes and branches from it so that a decode step never waits for
        the device (docs/ARCHITECTURE.md, "Host synchronisation").
        """
        if self.key_valid is None:
            return [self.k_len] * self.batch
        layer = self.cache_layer
        if layer is None or isinstance(layer, EvictingLayer):
            return None
        pads = layer.left_pad
        if pads is None or len(pads) != self.batch or layer.n != self.k_len:
            return None
        return [self.k_len - p for p in pads]

    @cached_property
    def key_rank(self) -> torch.Tensor:
        """``(B, Lk)`` long: 1-based rank of each real key among its row's real keys (0 on padding).

        Sinks, windows and budgets are counted in this rank space, so a row of a padded batch makes
        the choices it would make alone.
        """
        v = self.key_valid
        if v is None:
            return torch.arange(1, self.k_len + 1, device=self.query.device).expand(self.batch, -1)
        r = v.long().cumsum(-1)
        return r * v

    # ---- helpers ---------------------------------------------------------------------------------
    def dense(self, bias=None) -> torch.Tensor:
        """Dense attention for this call, ``(B, Hq, Lq, D)``; ``bias``: an optional
        :class:`~tokensparse.engine.selection.KeyBias`."""
        return dense_attention(self.query, self.key, self.value, self.mask, self.scale, bias)

    def dense_with_probs(self, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense attention and the probabilities it used, ``((B, Hq, Lq, D), (B, Hq, Lq, Lk) fp32)``,
        for methods that rank keys by a dense step's attention (TidalDecode's selection layers,
        Recycled Attention's full steps). fp32: one pass
        (:func:`~tokensparse.engine.executors.reference_attention`), equal to :meth:`dense` up to
        fp32 rounding. bf16/fp16: the output is :meth:`dense` (SDPA's rounding is the dense
        reference there; an fp32 pass differs from it by more than that dtype's tolerance) and the
        probabilities a second, fp32 pass."""
        mask = self.mask
        if mask is None and self.q_len != self.k_len:
            mask = causal_mask(self.q_len, self.k_len, self.query.device)[None, None]
        if self.query.dtype != torch.float32:
            return self.dense(bias), reference_probs(self.query, self.key, mask, self.scale, bias)[0]
        return reference_attention(self.query, self.key, self.value, mask, self.scale, bias, return_probs=True)

    @property
    def carry(self) -> dict:
        """The session's channel between the layers of the current forward pass (cleared per pass)."""
        return self.session.carry

    def require_evicting_cache(self, method_name: str) -> EvictingLayer | None:
        """The evicting cache layer, or an error that names the fix when a stock cache is in use."""
        ev = self.evicting
        if ev is None and self.use_cache:
            raise CacheRequiredError(
                f"{method_name} evicts KV rows and needs a tokensparse evicting cache. Pass "
                "cache=session.new_cache() (the object returned by ts.sparsify) to model(...) or model.generate(...)."
            )
        return ev

    def require_cache(self, method_name: str) -> PreallocLayer | None:
        """The tokensparse cache layer (whose :meth:`~PreallocLayer.state` a method keeps its
        summaries in), ``None`` without a cache (``use_cache=False``), or an error naming the fix
        when a stock transformers cache is in use."""
        if self.cache_layer is not None:
            return self.cache_layer
        if self.use_cache:
            raise CacheRequiredError(
                f"{method_name} keeps state with the KV cache and needs a tokensparse cache. Pass "
                "cache=session.new_cache() (the object returned by ts.sparsify) to model(...) or model.generate(...)."
            )
        return None
