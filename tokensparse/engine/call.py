"""One call of the attention function, with everything a method needs to decide what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .cache import EvictingLayer, PreallocLayer
from .executors import causal_mask, dense_attention

if TYPE_CHECKING:
    from .session import LayerState, Session


class CacheRequiredError(RuntimeError):
    """An eviction method ran without a tokensparse evicting cache."""


@dataclass(eq=False)
class AttentionCall:
    """Arguments of one attention call, plus derived facts.

    ``query (B, Hq, Lq, D)`` is post-RoPE; ``key/value (B, Hkv, Lk, D)`` are post-RoPE and already
    include this call's tokens (transformers updates the cache first). ``hf_mask`` is what
    transformers built (``None`` = causal, no padding). ``cache_layer`` is the tokensparse cache
    layer that produced ``key`` (``None`` for a stock cache or no cache).
    """

    module: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    hf_mask: torch.Tensor | None
    scale: float
    session: "Session"
    layer: "LayerState"
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

    @property
    def is_sliding(self) -> bool:
        """True on sliding-window layers (methods that assume global attention leave them dense)."""
        types = getattr(self.module.config, "layer_types", None)
        return bool(types) and types[self.layer_idx] != "full_attention"

    @property
    def evicting(self) -> EvictingLayer | None:
        return self.cache_layer if isinstance(self.cache_layer, EvictingLayer) else None

    # ---- masks -----------------------------------------------------------------------------------
    @cached_property
    def mask(self) -> torch.Tensor | None:
        """Bool ``(B, 1|Hkv, Lq, Lk)`` (True = attend) or ``None`` for plain bottom-right causal.

        After an eviction, physical rows no longer sit at the absolute positions transformers'
        mask assumes, so for those calls the engine rebuilds the mask: old rows are visible where
        they hold a token (``slots >= 0``), new rows follow transformers' mask for the new columns
        (padding) or are causal.
        """
        ev = self.evicting
        if ev is None or not (ev.evicted or ev.has_empty_rows):
            return self.hf_mask
        b, lq, past = self.batch, self.q_len, self.past_len
        old = ev.valid_rows()[:, :, :past]  # (B, Hkv, past)
        if self.hf_mask is not None:
            new = self.hf_mask[:, :, :, -lq:]
        else:
            new = causal_mask(lq, lq, self.query.device)[None, None]
        hk = old.shape[1]
        new = new.expand(b, hk if new.shape[1] == 1 else new.shape[1], lq, lq)
        return torch.cat([old[:, :, None, :].expand(b, hk, lq, past), new], dim=-1)

    @cached_property
    def key_valid(self) -> torch.Tensor | None:
        """``(B, Lk)`` bool: False for keys no query of this call may see (padding), or ``None``.

        Derived from the last query row, which (for left padding, or right padding with a real last
        token) sees every real key. Per-head holes of an evicted cache are not included here; use
        :attr:`mask` for those.
        """
        m = self.mask
        if m is None:
            return None
        return m[:, :, -1, :].any(1)

    # ---- helpers ---------------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """Dense attention for this call, ``(B, Hq, Lq, D)``."""
        return dense_attention(self.query, self.key, self.value, self.mask, self.scale)

    def require_evicting_cache(self, method_name: str) -> EvictingLayer | None:
        """The evicting cache layer, or an error that names the fix when a stock cache is in use."""
        ev = self.evicting
        if ev is None and self.use_cache:
            raise CacheRequiredError(
                f"{method_name} evicts KV rows and needs a tokensparse evicting cache. Pass "
                "cache=session.new_cache() (the object returned by ts.sparsify) to model(...) or model.generate(...)."
            )
        return ev
