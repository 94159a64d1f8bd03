"""Shared mechanics: executors, selection helpers and the selection pipeline, cache layers,
transformers integration, telemetry, calibration-profile files (lookup by model fingerprint,
format/version checks; what a profile holds belongs to its method, e.g.
:mod:`tokensparse.methods.drift_profile`). The engine knows no method names.

Rooms (imports flow downwards only):

* :mod:`.config` (declared method fields), :mod:`.selection` (scores → indices, ``Selection``,
  ``KeyBias``), :mod:`.executors` (where a selection is applied), :mod:`.blocks` (block-sparse
  selections and executors, log-sum-exp merging), :mod:`.compressed` (block-sparse attention
  among the kept rows of a ``"rows"`` selection), :mod:`.cache` (cache layers);
* :mod:`.call` (one attention call), :mod:`.telemetry`, :mod:`.pipeline` (select → execute →
  observe, ``KeyPlan``);
* :mod:`.method` (the ``Method`` base and ``Phase``), :mod:`.session` (a method attached to a
  model);
* :mod:`.attach` (module → state maps), :mod:`.integration` (the registered attention function,
  ``sparsify``), :mod:`.timing`.
"""

from .blocks import block_attend, blocks_from_sets, merge_partials
from .compressed import BlockRoute
from .cache import CacheState, EvictingLayer, KVCache, PreallocLayer, RaggedLayer, RowState, cache_bytes
from .call import AttentionCall, CacheRequiredError
from .integration import UnsupportedCacheError, active_session, sparsify
from .method import Method, Phase
from .observers import Observer, observe
from .pipeline import KeyPlan, exercise_sparse_paths, execute, sparse_paths_forced
from .selection import KeyBias, Selection
from .session import LayerState, Session
from .telemetry import Telemetry
from .timing import AttentionTimer, time_attention

__all__ = [
    "AttentionCall",
    "BlockRoute",
    "AttentionTimer",
    "CacheState",
    "CacheRequiredError",
    "EvictingLayer",
    "KVCache",
    "KeyBias",
    "KeyPlan",
    "LayerState",
    "Method",
    "Observer",
    "Phase",
    "PreallocLayer",
    "RaggedLayer",
    "RowState",
    "Selection",
    "Session",
    "Telemetry",
    "UnsupportedCacheError",
    "active_session",
    "block_attend",
    "blocks_from_sets",
    "cache_bytes",
    "exercise_sparse_paths",
    "merge_partials",
    "observe",
    "execute",
    "sparse_paths_forced",
    "sparsify",
    "time_attention",
]
