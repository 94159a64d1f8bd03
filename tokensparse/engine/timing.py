"""Attention-only time inside a real forward pass, for dense and sparse runs alike.

:func:`time_attention` wraps whatever attention implementation the model uses at that moment
(``"sdpa"`` for a dense model, ``"tokensparse"`` inside :func:`tokensparse.sparsify`) in a timing
function registered through ``transformers``' public ``AttentionInterface`` (and the inner
implementation's mask function through ``AttentionMaskInterface``, so masks are unchanged), and
switches the model to it for the block. :func:`tokensparse.sparsify` entered inside the block switches
to the timed wrapper of ``"tokensparse"`` (see :func:`timed_name`), so either nesting order times
the attention that actually runs. Everything the attention function does is timed: for
dense, SDPA; for a method, its selection, executor and cache bookkeeping. Q/K/V projections, RoPE
and the cache update happen before the attention function and are not included.

On CUDA the wrapper synchronises before and after each call, which serialises the GPU; compare
end-to-end times measured with and without the timer only on CPU.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from .attach import attached, attention_modules

_PREFIX = "tokensparse_timed_"
_TIMERS: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionTimer]" = weakref.WeakKeyDictionary()
_registered: set[str] = set()
_lock = threading.Lock()


@dataclass
class AttentionTimer:
    """Seconds spent inside the attention function and the number of calls since the last reset;
    ``laps`` keeps named ``(seconds, calls)`` intervals recorded with :meth:`lap`."""

    seconds: float = 0.0
    calls: int = 0
    laps: dict[str, tuple[float, int]] = field(default_factory=dict)

    def reset(self) -> tuple[float, int]:
        """Return ``(seconds, calls)`` so far and start again from zero."""
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out

    def lap(self, name: str) -> tuple[float, int]:
        """Record ``(seconds, calls)`` since the last reset/lap as ``laps[name]`` and reset."""
        self.laps[name] = self.reset()
        return self.laps[name]


def _wrapper(inner_name: str, inner):
    def timed_attention(module, query, *args, **kwargs):
        timer = _TIMERS.get(module)
        if timer is None:
            raise RuntimeError(f"attention implementation {_PREFIX + inner_name!r} is active outside "
                               "tokensparse.time_attention(...)")
        cuda = query.is_cuda
        if cuda:
            torch.cuda.synchronize(query.device)
        t0 = time.perf_counter()
        out = inner(module, query, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize(query.device)
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
        return out

    return timed_attention


def _register(inner_name: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + inner_name
    with _lock:
        if name in _registered:
            return name
        if inner_name not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"cannot time attention implementation {inner_name!r}: it is not registered in transformers' "
                "AttentionInterface (eager attention is model-specific); load the model with "
                "attn_implementation='sdpa' (the default of tokensparse.load_model)")
        inner = ALL_ATTENTION_FUNCTIONS[inner_name]
        AttentionInterface.register(name, _wrapper(inner_name, inner))
        if inner_name in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
        _registered.add(name)
    return name


def timed_name(model, inner_name: str) -> str:
    """The implementation name to switch ``model`` to when it should run ``inner_name``: its timed
    wrapper (registered on first use) while ``model`` is inside :func:`time_attention`, else
    ``inner_name`` itself. Without this, :func:`tokensparse.sparsify` entered inside the timer would
    replace the timed wrapper and the timer would silently count no calls."""
    if (model.config._attn_implementation or "").startswith(_PREFIX):
        return _register(inner_name)
    return inner_name


@contextlib.contextmanager
def time_attention(model):
    """Time every attention call of ``model`` inside the block; yields an :class:`AttentionTimer`.

    Either nesting order with ``tokensparse.sparsify(...)`` times the method: inside a session it
    wraps the implementation active on entry; around one, the session switches to the timed wrapper
    of its own implementation. The previous implementation is restored on exit, also when the block
    raises. Nesting two timers on one model is an error.
    """
    inner_name = model.config._attn_implementation or ""
    if inner_name.startswith(_PREFIX):
        raise RuntimeError("this model is already inside tokensparse.time_attention(...); nesting is not supported")
    name = _register(inner_name)
    modules = list(attention_modules(model))
    if not modules:
        raise ValueError("found no attention modules with layer_idx in this model")
    with attached(model, modules, _TIMERS, AttentionTimer(), name) as timer:
        yield timer
