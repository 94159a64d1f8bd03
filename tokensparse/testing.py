"""Shared test helpers: tiny random-weight models of each supported family, inputs, tolerances.

Tiny models check mechanics (masks, GQA, caches, dtypes); the bundled SmolLM2 checks quality.
Weights are drawn with a large init std so that logits are peaked and greedy decoding is rarely
decided by near-ties (rarely, not never: on one AMD EPYC a bf16 decode met a top-2 margin of 0.03
logits; the full-budget matrix allows a greedy flip only at such a tie, ``tests/test_matrix.py``).
"""

from __future__ import annotations

import torch

#: max |Δlogits| allowed against dense attention. bf16: PyTorch's own bf16 SDPA backends disagree
#: by up to 0.117 on the tiny models' 40-token prompts (math vs flash, measured 2026-12-03; eager vs
#: sdpa up to 0.234), so a kernel that reduces over keys in another grouping (the block-sparse
#: executors) cannot be held to less; fp32 (1e-4) is the sharp check.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.125}

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")

#: sliding-window variants, each with a window (8) shorter than the test prompts: every layer
#: sliding (Mistral without ``layer_types``, Qwen2 with ``layer_types``) and a mix of sliding and
#: global layers (Qwen3)
SLIDING_VARIANTS = {
    "mistral-sw8": ("mistral", {"sliding_window": 8}),
    "qwen2-sw8": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    "qwen3-mixed-sw8": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
}

#: every model variant the test matrices run: name -> (family, config overrides)
MODEL_VARIANTS = {**{f: (f, {}) for f in FAMILIES}, **SLIDING_VARIANTS}


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.25,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family in ("qwen2", "qwen3"):
        common["use_sliding_window"] = False
    if family == "mistral":
        common["sliding_window"] = None  # MistralConfig defaults to a 4096-token window
    common.update(overrides)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":  # q/k RMSNorm inside attention
        return tf.Qwen3Config(**common)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "phi3":  # fused QKV projection, partial rotary
        common.pop("head_dim")
        return tf.Phi3Config(**{"partial_rotary_factor": 0.5, **common})
    if family == "gemma2":  # logit soft-capping in attention, sliding/global alternation, query_pre_attn_scalar
        return tf.Gemma2Config(**{"attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0, "sliding_window": 8,
                                  "query_pre_attn_scalar": 16, **common})
    if family == "gemma3_text":  # sliding/global pattern, q/k norms, a local RoPE base
        return tf.Gemma3TextConfig(**{"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                                      "query_pre_attn_scalar": 16, **common})
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    # transformers' SDPA integration ignores Gemma 2's soft-cap: its eager attention is the dense reference
    impl = "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    return model.to(dtype).eval()


def tiny_inputs(batch: int, length: int, pad: int = 0, seed: int = 0, vocab: int = 97):
    """Token ids ``(batch, length)`` avoiding special ids, and a 2D mask with ``pad`` left pads on row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        ids[0, :pad] = 0
        mask[0, :pad] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return float(d.max()) if d.numel() else 0.0


def full_budget_runs(model, method, length: int = 41, pad: int = 5, seed: int = 3):
    """``(dense, runs)`` for a left-padded batch of 2 (row 0 has ``pad`` pads): dense logits, and for
    ``forced`` in (False, True) (``exercise_sparse_paths``) ``(forced, logits, session stats)`` of the
    prefill under ``method`` (typically ``at_full_budget()``)."""
    import contextlib

    import tokensparse as ts
    from tokensparse.engine import exercise_sparse_paths

    ids, mask = tiny_inputs(2, length, pad=pad, seed=seed)
    runs = []
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        for forced in (False, True):
            with exercise_sparse_paths() if forced else contextlib.nullcontext():
                with ts.sparsify(model, method) as s:
                    logits = model(input_ids=ids, attention_mask=mask, cache=s.new_cache()).logits
            runs.append((forced, logits, dict(s.stats)))
    return dense, runs


def padded_row_and_alone(model, method, length: int, pad: int = 7, seed: int = 5):
    """``(batched, alone, dense)`` logits: a batch of 2 whose row 0 has ``pad`` left pads under
    ``method``, row 0's real tokens run alone under ``method``, and the same alone densely (to check
    that the method acted). Compare ``batched[0, pad:]`` with ``alone[0]``."""
    import tokensparse as ts

    ids, mask = tiny_inputs(2, length, pad=pad, seed=seed)
    with torch.no_grad():
        with ts.sparsify(model, method) as s:
            batched = model(input_ids=ids, attention_mask=mask, cache=s.new_cache()).logits
        with ts.sparsify(model, method) as s:
            alone = model(input_ids=ids[:1, pad:], attention_mask=mask[:1, pad:], cache=s.new_cache()).logits
        dense = model(input_ids=ids[:1, pad:], attention_mask=mask[:1, pad:]).logits
    return batched, alone, dense
