"""Shared mechanics: executors, selection helpers, cache layers, transformers integration, telemetry,
calibration-profile files (lookup by model fingerprint, format/version checks; what a profile holds
belongs to its method, e.g. :mod:`tokensparse.methods.drift_profile`). The engine knows no method
names."""

from .cache import EvictingLayer, KVCache, PreallocLayer, cache_bytes
from .call import AttentionCall, CacheRequiredError
from .session import Method, Session, exercise_sparse_paths, sparse_paths_forced, sparsify
from .telemetry import Selection, Telemetry
from .timing import AttentionTimer, time_attention

__all__ = [
    "AttentionCall",
    "AttentionTimer",
    "CacheRequiredError",
    "EvictingLayer",
    "KVCache",
    "Method",
    "PreallocLayer",
    "Selection",
    "Session",
    "Telemetry",
    "cache_bytes",
    "exercise_sparse_paths",
    "sparse_paths_forced",
    "sparsify",
    "time_attention",
]
