"""Static-shape decoding: fixed-budget decode that ``torch.compile`` (and CUDA graphs) can capture.

The engine's own decode path (:func:`~tokensparse.engine.integration.sparsify` with
``session.new_cache()``) reads the context length on the host, grows its views of the cache and
picks executors per step: right for a CPU, where a step is bandwidth-bound, but every step is a new
shape for ``torch.compile`` and a few thousand small launches on a GPU (measured on an H200: 1,494
kernel launches in a 29.7 ms dense step at 32K of which 15 ms is kernel time; see
``docs/results/gpu/README.md``). Here every tensor of a decode step has a shape fixed at
construction:

* the cache is transformers' :class:`~transformers.StaticCache` (``max_cache_len`` preallocated
  rows, written in place at a device-side position);
* the 2-D attention mask is ``max_cache_len`` wide (left padding zeros, then ones; unwritten slots
  are excluded by causality), position ids and the cache position are device tensors;
* a fixed-budget method selects exactly ``k`` rows per KV head with ``torch.topk`` over the whole
  preallocated length (unwritten and padding rows score ``-1`` and are masked out after the
  gather), so the gathered keys/values are ``(B, Hkv, k, D)`` whatever the context length.

No decode step reads a value on the host, so ``torch.compile(fullgraph=True)`` captures the whole
model step (tested), and ``mode="reduce-overhead"`` replays it as a CUDA graph on a GPU.

Supported methods (the ones with a fixed number of attended rows per step), each equal to the
engine's path for the same config (tested step by step):

* ``None``: dense attention;
* :class:`~tokensparse.methods.token_select.TokenSelect` with an integer budget, no Selection
  Cache, no pooling: the same soft vote (per-head softmax over the candidates
  ``[n_sink, L - n_local)``, summed over the query group or over all heads) and the same
  ``n_sink`` + ``n_local`` + top-k set. Without a shadow the vote's ``q·k`` are reused as the
  attention logits of the chosen rows (only the values are gathered); with ``shadow="int8"``
  the vote reads a low-precision copy of K kept in fixed-size buffers (built at the prompt, the
  current token's row written each step, the same per-row quantisation as the engine's
  :class:`~tokensparse.engine.shadow.ShadowKeys`) and the chosen keys are gathered in full
  precision for the attention;
* :class:`~tokensparse.methods.streaming_llm.StreamingLLM` with an integer budget: the rows its
  eviction keeps (``n_sink`` first, then the most recent), attended over the full cache instead of
  evicted. Outputs equal the evicting cache's; KV memory is the full ``max_cache_len`` (the point
  here is a fixed-shape step, not the memory);
* :class:`~tokensparse.methods.quest.Quest` with an integer budget and the min/max bound: per-page
  min/max keys in fixed-size buffers (``(B, Hkv, ⌈max_cache_len / page⌉, D)`` per layer, built at
  the prompt, the current token folded into its page each step, in place), the same bound, the
  current page plus the ``n_pages - 1`` best full pages, pages counted from each row's first real
  token; the first ``dense_layers`` layers dense.

Prefill runs dense (as every supported method's prefill does) under the same attention function.
Anything else raises :class:`NotImplementedError` naming what is supported: TidalDecode's
cross-layer reuse and eviction policies that score rows would need a fixed-shape form of their
state, which is not built yet.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import check_supported
from .attach import attached, attention_modules
from .cache import summarize_pages
from .pages import minmax_bound
from .shadow import int8_products, quantize_rows

STATIC_ATTN = "tokensparse_static"
_registered = False
_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, StaticPlan]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StaticPlan:
    """What a decode step attends to, with every count fixed.

    ``kind``: ``"dense"``, ``"vote"`` (TokenSelect's soft vote picks ``n_top`` rows besides the
    ``n_sink`` first and ``n_local`` last), ``"recent"`` (the ``n_sink`` first and ``n_local``
    last rows only) or ``"pages"`` (Quest: the current page and the ``n_pages - 1`` full pages with
    the highest min/max bound, from page summaries kept in fixed-size buffers). ``scale``: multiplier of q·k in the vote (``None``: the attention scale).
    ``per_kv_head``: one set per KV head (else one per layer).
    """

    kind: str = "dense"
    n_sink: int = 0
    n_local: int = 0
    n_top: int = 0
    scale: float | None = None
    per_kv_head: bool = False
    page: int = 0  # "pages": tokens per page
    n_pages: int = 0  # "pages": pages attended, the current one included
    dense_layers: int = 0  # the first layers run dense
    shadow: str | None = None  # "vote" / "pages": score on an "int8" copy of K kept in fixed-size buffers

    @property
    def rows(self) -> int:
        if self.kind == "pages":
            return self.n_pages * self.page
        return self.n_sink + self.n_local + self.n_top


def plan_for(method) -> StaticPlan:
    """The :class:`StaticPlan` of a method config; ``NotImplementedError`` for what has none."""
    if method is None:
        return StaticPlan()
    name = getattr(method, "name", type(method).__name__)
    if name == "token_select":
        problems = []
        if not isinstance(method.budget, int):
            problems.append(f"budget={method.budget!r} (a share of the context is not a fixed count; give an int)")
        if method.reuse_threshold is not None:
            problems.append("reuse_threshold (the Selection Cache branches on the host)")
        if method.shadow not in (None, "int8"):
            # a bf16 product is rounded to bf16 by whichever kernel the shapes pick, so two equal
            # votes can break ties differently; int8 products are exact integers on every path
            problems.append(f"shadow={method.shadow!r} (int8 only: bf16 products are rounded kernel-dependently)")
        if method.pool_kernel > 1:
            problems.append(f"pool_kernel={method.pool_kernel}")
        if problems:
            raise NotImplementedError("static-shape token_select does not support " + "; ".join(problems))
        return StaticPlan("vote", method.n_sink, method.n_local, method.budget - method.n_sink - method.n_local,
                          method.logit_scale, method.select_per == "kv_head", shadow=method.shadow)
    if name == "streaming_llm":
        if not isinstance(method.budget, int):
            raise NotImplementedError(
                f"static-shape streaming_llm needs an integer budget, got {method.budget!r} (a share of the prompt "
                "is fixed only once the prompt is seen; give an int)")
        # the evicting cache holds `budget` rows before a step and attends to them plus the new token
        return StaticPlan("recent", method.n_sink, method.budget - method.n_sink + 1)
    if name == "quest":
        if not isinstance(method.budget, int) or method.bound not in ("minmax", "int8"):
            raise NotImplementedError(
                f"static-shape quest needs an integer budget and bound='minmax' or 'int8', got "
                f"budget={method.budget!r}, bound={method.bound!r}")
        return StaticPlan("pages", page=method.page, n_pages=method.n_pages(method.budget),
                          dense_layers=method.dense_layers, shadow=None if method.bound == "minmax" else "int8")
    raise NotImplementedError(
        f"no static-shape decode for {name!r}; supported: dense (method=None), token_select (int budget, no "
        "Selection Cache/pooling), streaming_llm (int budget), quest (int budget, min/max or int8 bound)")


def _valid_rows(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the rows the step's (last) query may attend to: written, real, causal."""
    if attention_mask is None:  # a static cache always has unwritten rows, so transformers builds a mask
        raise RuntimeError("static decode needs the attention mask of the static cache (got None)")
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"static decode expects a boolean attention mask, got {attention_mask.dtype}")
    return attention_mask[:, 0, -1, :].expand(query.shape[0], key.shape[2])


def select_rows(plan: StaticPlan, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                scale: float, shadow: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(idx, ok, logits)``: ``idx`` and ``ok`` each ``(B, h, plan.rows)`` (``h`` = 1 or ``Hkv``),
    the rows a one-token step attends to and which of them are real (fewer real rows than
    ``plan.rows`` leave picks that ``ok`` masks out), in no particular order; ``logits``: for the
    vote, its ``q·k`` over all ``L`` rows ``(B, Hkv, G, L)`` in fp32 *without* any scale (the
    attention reuses them instead of gathering the keys and multiplying again), else ``None`` (also
    when the vote reads ``shadow``, the buffers of :func:`_init_shadow`: its products only rank).
    Fixed shapes, no host reads."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    k = min(plan.rows, length)
    n = valid.sum(-1, keepdim=True)  # (B, 1) real rows, the current token included
    first = valid.long().argmax(-1, keepdim=True)  # (B, 1) the first real column (left padding)
    if plan.kind == "recent":  # the n_sink first and the n_local last real rows: arithmetic, no top-k
        j = torch.arange(k, device=key.device)
        n_sink = min(plan.n_sink, k)
        # a row with fewer than k real rows takes each of its rows once, in order
        rank = torch.where(n >= k, torch.where(j < n_sink, j, n - k + j), j)  # (B, k)
        return (first + rank).clamp_max(length - 1).unsqueeze(1), (rank < n).unsqueeze(1), None
    if plan.kind != "vote":
        raise ValueError(f"unknown static plan kind {plan.kind!r}")
    rank = valid.long().cumsum(-1) - 1  # position among the real rows
    keep = valid & ((rank < plan.n_sink) | (rank >= n - plan.n_local))  # (B, L)
    cand = valid & ~keep
    s = scale if plan.scale is None else plan.scale
    if shadow is not None:  # the engine's shadow vote: q scaled first, then quantised like the keys
        logits = shadow_products((query[:, :, -1].float() * s).reshape(b, hkv, hq // hkv, d), shadow)
        p = logits.masked_fill(~cand[:, None, None, :], torch.finfo(torch.float32).min).softmax(-1)
        logits = None
    else:
        q = query[:, :, -1].float().reshape(b, hkv, hq // hkv, d).to(key.dtype)
        logits = torch.matmul(q, key.transpose(-1, -2)).float()  # (B, Hkv, G, L), unscaled
        p = (logits * s).masked_fill(~cand[:, None, None, :], torch.finfo(torch.float32).min).softmax(-1)
    vote = p.sum(2) if plan.per_kv_head else p.sum((1, 2)).unsqueeze(1)  # (B, h, L), each in [0, hq]
    vote = vote.masked_fill(~cand[:, None, :], -1.0)
    score = torch.where(keep[:, None, :], torch.full_like(vote, float(hq + 1)), vote)
    # a set, not a ranking: the unsorted top-k is half the cost of the sorted one on a CPU
    top, idx = score.topk(k, dim=-1, sorted=False)
    return idx, top > -0.5, logits


def _init_shadow(key: torch.Tensor, kind: str) -> tuple:
    """The vote's shadow of a static cache's keys ``(B, Hkv, N, D)``: ``(int8 keys, fp32 row
    scales)``, quantised per row as :class:`~tokensparse.engine.shadow.ShadowKeys` does (a row's
    quantisation depends on that row only, so padding changes nothing)."""
    if kind != "int8":
        raise NotImplementedError(f"static shadow {kind!r}")
    parts = quantize_rows(key)
    if not torch.compiler.is_compiling():  # fixed addresses: a CUDA graph updates them in place
        for t in parts:
            torch._dynamo.mark_static_address(t)
    return parts


def _current_column(valid: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the cache column of each row's current (last real) token."""
    return valid.long().argmax(-1) + valid.sum(-1) - 1


def _update_shadow(parts: tuple, key: torch.Tensor, valid: torch.Tensor) -> None:
    """Write the current token's key into the shadow, in place, with ``index_copy_`` at one column
    (as :class:`~transformers.StaticCache` writes its rows: a left-padded batch writes every row at
    the same column, so row 0's says where; a ``scatter_`` with per-row positions made inductor copy
    the whole buffer every step). Fixed shapes, no host reads."""
    b, hkv, _, d = key.shape
    col = _current_column(valid[:1])  # (1,)
    q8, sc = quantize_rows(key.index_select(2, col))  # (B, Hkv, 1, D), (B, Hkv, 1)
    parts[0].index_copy_(2, col, q8)
    parts[1].index_copy_(2, col, sc)


def shadow_products(q: torch.Tensor, parts: tuple) -> torch.Tensor:
    """``q (B, Hkv, G, D)`` against a shadow from :func:`_init_shadow`: ``(B, Hkv, G, N)`` fp32,
    the same numbers as :func:`~tokensparse.engine.shadow.shadow_logits` (both are
    :func:`~tokensparse.engine.shadow.int8_products`)."""
    return int8_products(q, *parts)


def _init_pages(key: torch.Tensor, valid: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page min/max keys ``(B, Hkv, ⌈L / page⌉, D)`` of each row's real tokens, pages counted
    from the row's first real token (as the engine's Quest does in a padded batch); the buffers the
    decode steps then update in place. A prompt call: reads the mask on the host."""
    b, hkv, length, d = key.shape
    kmin = key.new_zeros(b, hkv, -(-length // page), d)
    kmax = torch.zeros_like(kmin)
    for r in range(b):
        cols = valid[r].nonzero()[:, 0]
        start, n = int(cols[0]), cols.numel()
        lo, hi = summarize_pages(key[r : r + 1, :, start : start + n], page)
        kmin[r, :, : lo.shape[2]] = lo[0]
        kmax[r, :, : hi.shape[2]] = hi[0]
    if not torch.compiler.is_compiling():  # fixed addresses: a CUDA graph updates them in place
        torch._dynamo.mark_static_address(kmin)
        torch._dynamo.mark_static_address(kmax)
    return kmin, kmax


def _update_pages(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, page: int) -> None:
    """Fold the current token's key into its page's min/max, in place (a page's first token resets
    it). Fixed shapes, no host reads."""
    b, hkv, _, d = key.shape
    n = valid.sum(-1)  # (B,) real tokens, the current one included
    cur = _current_column(valid)
    k_new = key.gather(2, cur.view(b, 1, 1, 1).expand(b, hkv, 1, d))
    at = ((n - 1) // page).view(b, 1, 1, 1).expand(b, hkv, 1, d)
    first = ((n - 1) % page == 0).view(b, 1, 1, 1)
    kmin.scatter_(2, at, torch.where(first, k_new, torch.minimum(kmin.gather(2, at), k_new)))
    kmax.scatter_(2, at, torch.where(first, k_new, torch.maximum(kmax.gather(2, at), k_new)))


def select_pages(plan: StaticPlan, query: torch.Tensor, buffers: tuple,
                 valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's choice with fixed shapes: ``(idx, ok)``, each ``(B, Hkv, n_pages · page)``: the
    current (last) page and the ``n_pages - 1`` full pages with the largest score, as cache columns.
    The score: the min/max bound ``Σ_d max(q_d·M_d, q_d·m_d)`` from the page summaries
    ``buffers = (kmin, kmax)``, or with ``plan.shadow`` the exact maximum over the page of ``q·k``
    on the int8 key shadow ``buffers`` (both maximised over the query group, as the engine's Quest)."""
    page = plan.page
    n = valid.sum(-1, keepdim=True)  # (B, 1)
    pad = valid.long().argmax(-1, keepdim=True)  # the first real column
    last = (n - 1) // page  # the current page
    if plan.shadow is None:
        bound = minmax_bound(query[:, :, -1:], *buffers)  # (B, Hkv, P)
    else:
        bound = _shadow_page_maxima(query, buffers, valid, pad, page)
    n_p = bound.shape[-1]
    p_idx = torch.arange(n_p, device=query.device)
    score = bound.masked_fill(~(p_idx < last)[:, None, :], float("-inf"))
    score = torch.where((p_idx == last)[:, None, :], torch.full_like(score, float("inf")), score)
    top, chosen = score.topk(min(plan.n_pages, n_p), dim=-1)
    rank = (chosen[..., None] * page + torch.arange(page, device=query.device)).flatten(-2)  # (B, Hkv, k·page)
    ok = (top > float("-inf")).repeat_interleave(page, -1) & (rank < n[:, :, None])
    return (pad[:, :, None] + rank).clamp_max(valid.shape[-1] - 1), ok


def _shadow_page_maxima(query: torch.Tensor, parts: tuple, valid: torch.Tensor, pad: torch.Tensor,
                        page: int) -> torch.Tensor:
    """``(B, Hkv, ⌈N / page⌉)``: per page (counted from each row's first real column) the maximum
    over its real keys and the query group of ``q·k`` on the int8 shadow (unscaled, the raw query as
    the engine's ``shadow_token_scores``); ``-inf`` where a page has no real key."""
    b, hq, _, d = query.shape
    hkv, length = parts[0].shape[1], parts[0].shape[2]
    s = shadow_products(query[:, :, -1].float().reshape(b, hkv, hq // hkv, d), parts).amax(2)  # (B, Hkv, N)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    n_p = -(-length // page)
    cols = pad + torch.arange(n_p * page, device=query.device)  # (B, P·page): each row's own page grid
    g = s.gather(2, cols.clamp_max(length - 1)[:, None, :].expand(b, hkv, -1))
    g = g.masked_fill(~(cols < length)[:, None, :], float("-inf"))
    return g.view(b, hkv, n_p, page).amax(-1)


def static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``"tokensparse_static"``: dense for prompts and for the
    dense plan, else the plan's fixed-size row set gathered per KV head and attended with SDPA
    (the query group as rows of one call per KV head: no repeated keys)."""
    plan = _MODULES.get(module)
    if plan is None:
        raise RuntimeError(f"attention implementation {STATIC_ATTN!r} is active outside tokensparse's StaticDecoder")
    if dropout and dropout > 0:
        raise RuntimeError("tokensparse methods are for inference; call model.eval() (attention dropout is on)")
    scale = module.scaling if scaling is None else scaling
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    dense = plan.kind == "dense" or module.layer_idx < plan.dense_layers
    prompt = bool(kwargs.get("ts_prompt", False))  # StaticDecoder.prefill says so: a prompt may be one token
    if not prompt and lq != 1:
        raise ValueError(f"static decode steps take one token per sequence, got {lq}")
    valid = None if dense else _valid_rows(attention_mask, query, key)  # the last query's rows, all N wide
    buffers = kwargs.get("ts_buffers")
    if plan.shadow is not None and not dense:
        if buffers is None:
            raise RuntimeError("a static method on a key shadow needs its buffers (ts_buffers), which StaticDecoder passes")
        if prompt:  # every row of the static cache, unwritten ones (zeros) included: fixed size from here on
            buffers[module.layer_idx] = _init_shadow(key, plan.shadow)
        else:
            _update_shadow(buffers[module.layer_idx], key, valid)
    elif plan.kind == "pages" and not dense:
        if buffers is None:
            raise RuntimeError("static quest needs the page summaries (ts_buffers), which StaticDecoder passes")
        if prompt:  # summarise the prompt's pages (eager)
            buffers[module.layer_idx] = _init_pages(key, valid, plan.page)
        else:
            _update_pages(*buffers[module.layer_idx], key, valid, plan.page)
    if prompt and not torch.compiler.is_compiling():  # only the rows written so far
        key, value, attention_mask = _written(key, value, attention_mask)
    if dense or prompt:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                             enable_gqa=hkv != hq, is_causal=attention_mask is None)
        return out.transpose(1, 2).contiguous(), None
    logits = None
    if plan.kind == "pages":
        idx, ok = select_pages(plan, query, buffers[module.layer_idx], valid)
    else:
        shadow = buffers[module.layer_idx] if plan.shadow is not None else None
        idx, ok, logits = select_rows(plan, query, key, valid, scale, shadow)
    idx = idx.expand(b, hkv, idx.shape[-1])
    ok = ok.expand(b, hkv, ok.shape[-1])
    v_sel = value.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, value.shape[-1]))
    if logits is not None:  # the vote's q·k of the chosen rows: no key gather, no second product
        g = hq // hkv
        s = logits.gather(3, idx.unsqueeze(2).expand(b, hkv, g, idx.shape[-1])) * scale
        p = s.masked_fill(~ok.unsqueeze(2), float("-inf")).softmax(-1).to(value.dtype)
        out = torch.matmul(p, v_sel)  # (B, Hkv, G, D)
        return out.reshape(b, hq, 1, -1).transpose(1, 2).contiguous(), None
    k_sel = key.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1]))
    q = query.reshape(b, hkv, hq // hkv, d)  # one token: the group's heads are the rows
    out = F.scaled_dot_product_attention(q, k_sel, v_sel, attn_mask=ok.unsqueeze(2), scale=scale)
    return out.reshape(b, hq, 1, -1).transpose(1, 2).contiguous(), None


def _written(key, value, attention_mask):
    """A prompt call on a static cache: the keys/values up to the last row any query sees (one host
    read; prompts are not captured), and no mask at all when the call's queries are all its rows
    and nothing is padded (causal SDPA then needs neither the L x L mask nor the unwritten rows)."""
    if attention_mask is None:
        return key, value, attention_mask
    seen = attention_mask.any(-2).any(1).any(0)  # (L,) the columns some query sees
    end = int(seen.nonzero().max()) + 1 if bool(seen.any()) else key.shape[2]
    key, value, mask = key[:, :, :end], value[:, :, :end], attention_mask[..., :end]
    lq = mask.shape[-2]
    if lq == end and bool((mask == torch.ones(lq, end, dtype=torch.bool, device=mask.device).tril()).all()):
        return key, value, None
    return key, value, mask


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(STATIC_ATTN, static_attention)
    AttentionMaskInterface.register(STATIC_ATTN, sdpa_mask)
    _registered = True


@dataclass(eq=False)
class StaticState:
    """A sequence mid-generation: the static cache, the fixed-width 2-D mask, the next position id
    ``(B, 1)`` and cache position ``(1,)`` (device tensors), and the last step's token and logits."""

    cache: object
    mask: torch.Tensor
    pos: torch.Tensor
    cpos: torch.Tensor
    token: torch.Tensor
    logits: torch.Tensor
    buffers: dict  # layer -> fixed-size method state, updated in place: Quest's (min, max) page
    # summaries, or the vote's low-precision key shadow (keys[, row scales])

    def copy_from(self, other: "StaticState") -> "StaticState":
        """Overwrite this state with ``other`` in place (same shapes; every tensor keeps its address,
        as a captured CUDA graph needs)."""
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys.copy_(theirs.keys)
            mine.values.copy_(theirs.values)
            mine.cumulative_length.copy_(theirs.cumulative_length)
        for name in ("mask", "pos", "cpos", "token", "logits"):
            getattr(self, name).copy_(getattr(other, name))
        for layer, parts in other.buffers.items():
            for mine, theirs in zip(self.buffers[layer], parts):
                mine.copy_(theirs)
        return self


class StaticDecoder:
    """Greedy generation with fixed-shape decode steps, optionally compiled.

    ``decoder = StaticDecoder(model, method, max_cache_len=4096, compile=True)`` then
    ``decoder.generate(input_ids, attention_mask, max_new_tokens=32)`` returns
    ``(tokens (B, max_new_tokens), step_logits list, step_seconds list)`` (entry 0: the prefill;
    every step runs to ``max_new_tokens``: no EOS stop, the point is a fixed-shape loop).
    :meth:`prefill` and :meth:`decode` are the two halves (a benchmark prefills once and restores
    the state with :meth:`StaticState.copy_from` before each timed run). ``compile``: ``False``
    (eager), ``True`` (``torch.compile(fullgraph=True, dynamic=False)``) or a ``torch.compile``
    mode string (``"reduce-overhead"``: CUDA graphs on a GPU). The first compiled step includes the
    compile time (``compile_seconds``). Left padding only.
    """

    def __init__(self, model, method=None, *, max_cache_len: int, compile: bool | str = False):
        check_supported(model)
        cfg = model.config
        if getattr(cfg, "attn_logit_softcapping", None) or any(
                t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
            raise NotImplementedError("static decode supports models with global attention and no logit soft-cap")
        if not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
        if compile not in (False, True) and not isinstance(compile, str):
            raise ValueError(f"compile must be a bool or a torch.compile mode, got {compile!r}")
        self.model = model
        self.method = method
        self.plan = plan_for(method)
        self.max_cache_len = max_cache_len
        self.compile = compile
        self.compile_seconds: float | None = None
        self._step = None

    def _forward(self, ids, mask, positions, cache_position, cache, buffers, prompt=False):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache_position=cache_position,
                          cache=cache, use_cache=True, logits_to_keep=1, ts_buffers=buffers,
                          ts_prompt=prompt).logits[:, -1].float()

    def _compiled(self):
        if self._step is None:
            if self.compile is False:
                self._step = self._forward
            else:
                mode = None if self.compile is True else self.compile
                self._step = torch.compile(self._forward, fullgraph=True, dynamic=False, mode=mode)
        return self._step

    @contextlib.contextmanager
    def _attached(self):
        _ensure_registered()
        with attached(self.model, list(attention_modules(self.model)), _MODULES, self.plan, STATIC_ATTN):
            yield

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                max_new_tokens: int = 16) -> StaticState:
        """Dense prefill into a new static cache; the state holds the first generated token."""
        from transformers import StaticCache

        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        b, lp = input_ids.shape
        if lp + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({lp}) + max_new_tokens ({max_new_tokens}) exceed max_cache_len "
                             f"({self.max_cache_len})")
        dev = input_ids.device
        am = torch.ones(b, lp, dtype=torch.long, device=dev) if attention_mask is None else attention_mask.long()
        if am.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(am.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if not bool(am[:, -1].all()):
            raise ValueError("static decode supports left padding only (the last token of a row is padding)")
        mask = torch.ones(b, self.max_cache_len, dtype=torch.long, device=dev)
        mask[:, :lp] = am  # future slots: ones (causality hides them until written)
        positions = (am.cumsum(-1) - 1).clamp(min=0)
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        buffers: dict = {}
        with self._attached():
            logits = self._forward(input_ids, mask, positions, torch.arange(lp, device=dev), cache, buffers, prompt=True)
        return StaticState(cache, mask, positions[:, -1:] + 1, torch.full((1,), lp, dtype=torch.long, device=dev),
                           logits.argmax(-1), logits, buffers)

    @torch.no_grad()
    def with_buffers(self, state: StaticState) -> StaticState:
        """``state`` (its cache and positions shared, not copied) with this decoder's method buffers
        rebuilt from the rows written so far: how a state prefilled by another decoder (a
        benchmark's one dense snapshot) becomes a valid start for this one. No buffers: ``state``."""
        import dataclasses

        if self.plan.kind != "pages" and self.plan.shadow is None:
            return state
        n = int(state.cpos)  # rows written (host read: outside any step)
        valid = state.mask.bool() & (torch.arange(state.mask.shape[1], device=state.mask.device) < n)
        buffers = {}
        for idx, layer in enumerate(state.cache.layers):
            if idx >= self.plan.dense_layers:
                buffers[idx] = (_init_shadow(layer.keys, self.plan.shadow) if self.plan.shadow is not None
                                else _init_pages(layer.keys, valid, self.plan.page))
        return dataclasses.replace(state, buffers=buffers)

    @torch.no_grad()
    def decode(self, state: StaticState, steps: int):
        """``steps`` greedy steps from ``state`` (advanced in place): ``(tokens (B, steps), logits
        list, seconds list)``, each step timed between two device synchronisations."""
        step = self._compiled()
        tokens, logits_out, seconds = [], [], []
        with self._attached():
            for _ in range(steps):
                t0 = _sync_time(state.token.device)
                logits = step(state.token[:, None], state.mask, state.pos, state.cpos, state.cache, state.buffers)
                seconds.append(_sync_time(state.token.device) - t0)
                if isinstance(self.compile, str):  # a CUDA-graph replay reuses its output buffer
                    logits = logits.clone()
                if self.compile is not False and self.compile_seconds is None:
                    self.compile_seconds = seconds[-1]
                state.logits, state.token = logits, logits.argmax(-1)
                state.pos.add_(1)
                state.cpos.add_(1)
                tokens.append(state.token)
                logits_out.append(logits)
        return (torch.stack(tokens, 1) if tokens else state.token[:, :0]), logits_out, seconds

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 16):
        """Prefill and ``max_new_tokens - 1`` decode steps: ``(tokens, logits, seconds)``, entry 0
        of each from the prefill."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        t0 = _sync_time(input_ids.device)
        state = self.prefill(input_ids, attention_mask, max_new_tokens=max_new_tokens)
        first_s = _sync_time(input_ids.device) - t0
        first = (state.token, state.logits)
        tokens, logits, seconds = self.decode(state, max_new_tokens - 1)
        return (torch.cat([first[0][:, None], tokens], 1), [first[1], *logits], [first_s, *seconds])


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
