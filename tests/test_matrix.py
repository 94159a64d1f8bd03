"""Every registered method × {prefill, decode, chunked prefill} × {batch 1, batch 2 left-padded}
× {fp32, bf16} × tiny Llama/Qwen2/Qwen3/Mistral/Phi-3/Gemma 2 (logit soft-capping; its eager attention is the dense reference)/Gemma 3 text and sliding-window variants of them (a window of 8
shorter than the 40-token prompt: all layers sliding, or mixed with global layers): at ``at_full_budget()`` logits equal dense
attention (fp32 ≤ 1e-4; bf16 ≤ 0.125, the spread of PyTorch's
bf16 SDPA backends on these shapes (see ``tokensparse.testing.TOLERANCE``)) and greedy
generations are identical.

Each case runs twice: as configured (methods may short-circuit to dense when their budget covers
everything) and under ``exercise_sparse_paths()``, which forces the real gather/scatter/eviction
code with an "everything" selection.
"""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import exercise_sparse_paths
from tokensparse.testing import MODEL_VARIANTS, TOLERANCE, max_diff, tiny_inputs, tiny_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("prefill", "decode", "chunked")
_models: dict = {}


def model_for(variant, dtype):
    key = (variant, dtype)
    if key not in _models:
        family, overrides = MODEL_VARIANTS[variant]
        _models[key] = tiny_model(family, dtype, **overrides)
    return _models[key]


def run(model, mode, ids, mask, method=None, forced=False):
    """Logits (and generated tokens for decode) for one mode, dense when ``method`` is None."""
    ctx_forced = exercise_sparse_paths() if forced else torch.no_grad()
    with torch.no_grad(), ctx_forced:
        if method is None:
            return _run(model, mode, ids, mask, ts.KVCache(model))
        with ts.sparsify(model, method) as s:
            return _run(model, mode, ids, mask, s.new_cache())


def _run(model, mode, ids, mask, cache):
    if mode == "prefill":
        return model(ids, attention_mask=mask, cache=cache).logits, None
    if mode == "chunked":
        cut = ids.shape[1] - 7
        model(ids[:, :cut], attention_mask=mask[:, :cut], cache=cache)
        return model(ids[:, cut:], attention_mask=mask, cache=cache).logits, None
    out = model.generate(
        ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return torch.stack(out.logits, 1), out.sequences


@pytest.mark.parametrize("forced", [False, True], ids=["as-is", "forced-sparse"])
@pytest.mark.parametrize("family", list(MODEL_VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "b2-leftpad"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ts.methods.names())
def test_full_budget_equals_dense(name, mode, batch, dtype, family, forced):
    model = model_for(family, DTYPES[dtype])
    ids, mask = tiny_inputs(batch, 40, pad=5 if batch == 2 else 0)
    method = ts.methods.get(name).at_full_budget()
    ref_logits, ref_seq = run(model, mode, ids, mask)
    logits, seq = run(model, mode, ids, mask, method, forced)
    if mode == "chunked":
        valid = mask[:, -7:]
    elif mode == "prefill":
        valid = mask
    else:
        valid = None
    tol = TOLERANCE[DTYPES[dtype]]
    if seq is not None and not torch.equal(seq, ref_seq):
        # greedy decoding may flip a near-tie of the reference within the dtype's tolerance (bf16
        # kernels round differently from CPU to CPU): the first differing token must be such a tie,
        # and the logits are compared up to that step (after it the prefixes differ)
        new = seq[:, ids.shape[1]:] != ref_seq[:, ids.shape[1]:]
        first = int(new.any(0).nonzero()[0])
        for row in new[:, first].nonzero().flatten().tolist():
            top2 = ref_logits[row, first].float().topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * tol, f"row {row} step {first}: a token flipped without a near-tie"
        logits, ref_logits = logits[:, : first + 1], ref_logits[:, : first + 1]
    assert max_diff(logits, ref_logits, valid) <= tol
