"""Mapping a model's attention modules to an object for the duration of a block.

How :func:`~tokensparse.engine.integration.sparsify` and :func:`~tokensparse.engine.timing.time_attention`
reach their state from inside an attention call (a weak map from module to object), and switch the
model's attention implementation in and back out. No other engine module is imported here.
"""

from __future__ import annotations

import contextlib
import weakref


def attention_modules(model):
    """The attention modules of ``model``: those with ``layer_idx``, ``num_key_value_groups`` and ``scaling``."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "num_key_value_groups") and hasattr(module, "scaling"):
            yield module


@contextlib.contextmanager
def attached(model, modules, registry: weakref.WeakKeyDictionary, obj, attn_name: str):
    """Map every attention module to ``obj`` in ``registry`` and switch the model to the registered
    attention implementation ``attn_name`` for the block; both are undone on exit, also on error.
    (How :func:`sparsify` and :func:`tokensparse.time_attention` reach their state from inside an
    attention call.)"""
    previous = model.config._attn_implementation
    for m in modules:
        registry[m] = obj
    try:
        model.set_attn_implementation(attn_name)
        yield obj
    finally:
        for m in modules:
            registry.pop(m, None)
        model.set_attn_implementation(previous)


