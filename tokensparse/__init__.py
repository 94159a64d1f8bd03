"""tokensparse: training-free token-level sparse attention and KV selection for transformers.

Public API::

    import tokensparse as ts
    model, tokenizer = ts.load_model()                 # bundled SmolLM2-135M-Instruct, or ts.load_model(path)
    ts.methods.names()
    method = ts.methods.get("token_sparse")(coverage=0.005)
    with ts.sparsify(model, method) as session:
        model.generate(..., cache=session.new_cache())
    ts.methods.get(name).at_full_budget()              # a config that must equal dense attention
    with ts.time_attention(model) as timer: ...        # seconds inside attention (dense or sparse)
    with ts.observe(model, ts.analysis.SinkDetector()) as s: ...   # read attention, change nothing
    with ts.context_parallel(model, sparsity=ts.BlockSparsity(density=0.1)) as run:   # on every rank
        res = run.prefill(input_ids)                  # this rank's chunk; run.gather_cache(res) to decode
"""

from . import analysis, methods
from .engine import KVCache, Observer, Telemetry, cache_bytes, observe, sparsify, time_attention
from .engine.context_parallel import BlockSparsity, context_parallel
from .models import load_model, model_fingerprint

__version__ = "0.1.0"

__all__ = ["BlockSparsity", "KVCache", "Observer", "Telemetry", "analysis", "cache_bytes", "context_parallel", "load_model", "methods",
           "model_fingerprint", "observe", "sparsify", "time_attention", "__version__"]
