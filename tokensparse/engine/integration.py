"""transformers integration: the registered attention function and mask function, ``sparsify``.

Integration goes only through public extension points:

* ``AttentionInterface.register("tokensparse", fn)`` and ``AttentionMaskInterface.register(
  "tokensparse", sdpa_mask)`` (without the mask registration transformers passes ``mask=None`` and
  padding/chunking masks are silently lost), done lazily on the first :func:`sparsify`, never at
  import time;
* ``model.set_attn_implementation(...)`` to switch in and back out;
* ``Cache(layers=[...])`` for the engine's cache layers (:mod:`tokensparse.engine.cache`).

Per-layer state lives in the :class:`~tokensparse.engine.session.Session`, reached from the
attention module through a weak map, never through ``generate`` kwargs (``generate`` rejects
unknown kwargs). A forward pre-hook on the model (``register_forward_pre_hook``, removed on exit)
marks the start of each forward pass for the cross-layer carry.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from transformers.masking_utils import sdpa_mask

from ..models import check_supported
from .attach import attached, attention_modules
from .cache import EvictingLayer, consume_last_update
from .call import AttentionCall
from .executors import logit_softcap
from .hostsync import device_check
from .method import Method
from .rows import RowPruner
from .session import Session
from .telemetry import Telemetry

ATTN_NAME = "tokensparse"

_registered = False
_register_lock = threading.Lock()
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Session]" = weakref.WeakKeyDictionary()


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(
            f"attention implementation {ATTN_NAME!r} is active on a model that is not inside ts.sparsify(...); "
            "use the context manager, which restores the previous implementation on exit"
        )
    if dropout and dropout > 0:
        raise RuntimeError("tokensparse methods are for inference; call model.eval() (attention dropout is on)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"tokensparse expects a boolean attention mask, got {attention_mask.dtype}")
    call = AttentionCall(
        module=module,
        query=query,
        key=key,
        value=value,
        hf_mask=attention_mask,
        scale=module.scaling if scaling is None else scaling,
        session=session,
        layer=session.layers[module.layer_idx],
        cache_layer=consume_last_update(key),
        use_cache=bool(kwargs.get("use_cache", True)),
        extra=kwargs,
    )
    if attention_mask is not None:
        _mark_padding(call, attention_mask)
    if session._call_observers:
        session.observe_call(call)
    softcap = kwargs.get("softcap")  # Gemma 2: every executor applies it (executors.logit_softcap)
    with logit_softcap(softcap) if softcap else contextlib.nullcontext():
        if call.is_sliding:
            # methods assume global attention; a sliding layer's window already bounds its cost
            session.count("sliding_dense_calls")
            out = call.dense()
        else:
            out = session.method.forward(call)
    return out.transpose(1, 2).contiguous(), None


_RIGHT_PADDING = ("tokensparse supports left padding only: the last token of a row is padding (right padding). "
                  "Set tokenizer.padding_side = 'left'.")


def _mark_padding(call: AttentionCall, attention_mask: torch.Tensor) -> None:
    """Check the padding side and record this call's padding rows in the cache.

    A new token is padding exactly when it cannot see itself: transformers' mask functions
    (causal, sliding window, chunked) all keep the diagonal, and its padding mask removes a padded
    key from every query, its own included. So the diagonal of the call's mask is exact on any
    layer type (the last mask row is not: on a sliding layer it misses everything outside the
    window). Recording padding *before* the method runs lets eviction policies count sinks,
    windows and budgets over real tokens only; a full cache records the prompt's left padding on
    the host (``PreallocLayer.left_pad``), so that its decode steps know each row's real tokens
    without reading the mask.

    A decode step's one token is padding only in a right-padded batch, an error: checked by
    :func:`~tokensparse.engine.hostsync.device_check`, which reads the mask on a CPU (free there)
    and is a device-side assertion on CUDA, so the step never waits for the device (a right-padded
    decode step then fails asynchronously, as a device-side assert does).
    """
    lq = call.q_len
    i = torch.arange(lq, device=attention_mask.device)
    # the call's own tokens are the mask's last Lq columns, whatever layer transformers sized it from
    real = attention_mask[:, :, i, attention_mask.shape[-1] - lq + i].any(1, keepdim=True)  # (B, 1, Lq)
    if lq == 1 and call.past_len > 0:  # a decode step (padding recorded at the prompt)
        device_check(real.all(), _RIGHT_PADDING)
        return
    if bool(real.all()):  # the common case (a prompt without padding): one host sync
        return
    if not bool(real[:, :, -1].all()):
        raise ValueError(_RIGHT_PADDING)
    layer = call.cache_layer
    if layer is not None and layer.n == call.k_len and not isinstance(layer, EvictingLayer):
        left = bool((real[..., 1:] >= real[..., :-1]).all())  # padding first, then real tokens
        layer.left_pad = tuple((~real).long().sum((1, 2)).tolist()) if left and call.past_len == 0 else None
    ev = call.evicting
    if ev is not None:
        empty = torch.zeros(call.batch, 1, ev.n, dtype=torch.bool, device=real.device)
        empty[:, :, ev.n - lq :] = ~real
        ev.mark_empty(empty)


class UnsupportedCacheError(ValueError):
    """A cache whose key/value rows extend past the current token (e.g. transformers' static cache)."""


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, **kwargs):
    """transformers' ``sdpa_mask``, after checking that the cache's keys end at the current token.

    Every tokensparse method reads ``key.shape[-2]`` as the context length and ``mask=None`` as
    bottom-right causal. A static cache (``cache_implementation="static"``) hands back all
    ``max_cache_len`` preallocated rows, most of them unwritten, and transformers then passes
    ``mask=None``: methods would attend to and select empty slots. It is refused here, before the
    first layer runs, instead of producing silently wrong results.
    """
    end_q = int(q_offset) + int(q_length)
    end_kv = int(kv_offset) + int(kv_length)
    if end_kv != end_q:
        raise UnsupportedCacheError(
            f"tokensparse cannot run on a cache whose key rows ({end_kv}) extend past the current token ({end_q}), "
            "such as transformers' static cache (cache_implementation='static'). Pass cache=session.new_cache() "
            "(preallocated and written in place, the fastest cache here) or use the default dynamic cache."
        )
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, **kwargs)


def _ensure_registered() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _attention)
        AttentionMaskInterface.register(ATTN_NAME, _mask)
        _registered = True


def active_session(model) -> Session | None:
    """The :class:`Session` of ``model`` while it is inside :func:`sparsify`, else ``None``."""
    for m in attention_modules(model):
        return _SESSIONS.get(m)
    return None


@contextlib.contextmanager
def sparsify(model, method: Method, *, telemetry: bool | Telemetry = False, observers=()):
    """Run ``model`` with ``method`` inside the block; the previous attention implementation and all
    engine state are restored on exit, also when the block raises.

    ``telemetry=True`` (or a :class:`Telemetry`) records per layer/head density, kept attention
    mass and attention-output error in ``session.telemetry`` (computed inside the attention call:
    do not time a run with telemetry on). ``observers``: more
    :class:`~tokensparse.engine.observers.Observer` s to attach (telemetry is one of them). Yields the :class:`Session`; eviction methods need its
    ``session.new_cache()`` passed as ``cache=`` to ``model(...)`` / ``model.generate(...)``.
    """
    if not isinstance(method, Method):
        raise TypeError(
            f"sparsify expects a method config (e.g. ts.methods.get('token_sparse')()), got {type(method).__name__}"
        )
    check_supported(model)
    modules = list(attention_modules(model))
    if not modules:
        raise ValueError("found no attention modules with layer_idx in this model")
    if any(m in _SESSIONS for m in modules):
        raise RuntimeError("this model is already inside ts.sparsify(...); nesting is not supported")
    _ensure_registered()
    tele = telemetry if isinstance(telemetry, Telemetry) else (Telemetry() if telemetry else None)
    session = Session(model, method, tele, observers)
    method.setup(session)
    from .timing import timed_name  # (lazy: timing builds on this module)

    # Entered inside ts.time_attention(...): switch to the timed wrapper of the method's attention
    # instead, so that the timer (still mapped to the modules) counts the attention actually
    # running in both nesting orders; the timed previous implementation is restored on exit.
    attn_name = timed_name(model, ATTN_NAME)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # runs on every path into the layers
    hook = decoder.register_forward_pre_hook(lambda *_: session.begin_forward())
    pruner = RowPruner(session, model).install() if method.prunes_rows else None
    try:
        with attached(model, modules, _SESSIONS, session, attn_name):
            yield session
    finally:
        hook.remove()
        if pruner is not None:
            pruner.remove()
