"""Named model shapes with random weights, so the speed benchmarks run at real model sizes without
downloading any weights.

Why random weights are enough: the time of a forward pass depends on the shapes (hidden size,
heads, layers, vocabulary, context length), the dtype and the kernels, not on the values of the
weights. What random weights do change is *which* tokens a method selects (the attention pattern),
so a random-weight run measures the cost of a method at a given kept share, never its accuracy;
accuracy is measured on real models (``tokensparse eval``).

Each entry reproduces the published ``config.json`` of the model in the fields that set the cost:
hidden size, layers, query/KV heads, head size, MLP width, vocabulary, RoPE (type and base, which
cost the same but are kept faithful), tied embeddings and, for Qwen3, the q/k RMSNorm that its
transformers class applies. ``layers`` cuts the depth (time per layer is the same at any depth,
so a shallow model of the right width is a cheap stand-in on small machines, and lets CPU tests
build a real-width model).

Weights are created directly on the target device in the target dtype (no fp32 CPU copy first: an
8B model in fp32 is 32 GB of host memory) and drawn after ``torch.manual_seed(seed)``, so a run is
reproducible on one device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MODEL_CONFIGS", "ModelShape", "build_config", "random_model", "random_prompt", "attention_shape"]


@dataclass(frozen=True)
class ModelShape:
    """A named model shape: the transformers config class and its arguments."""

    name: str
    family: str  # transformers model_type
    source: str  # where the numbers come from
    kwargs: tuple  # ((key, value), ...): kept hashable, turned into a dict by ``config_kwargs``

    def config_kwargs(self) -> dict:
        return {k: (dict(v) if isinstance(v, tuple) else v) for k, v in self.kwargs}


def _shape(name: str, family: str, source: str, **kwargs) -> ModelShape:
    return ModelShape(name, family, source, tuple((k, tuple(v.items()) if isinstance(v, dict) else v)
                                                  for k, v in kwargs.items()))


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: name -> shape. The parameter counts (8.03B, 8.19B, 1.24B, 135M) are checked by the tests on the
#: meta device (no memory).
MODEL_CONFIGS: dict[str, ModelShape] = {s.name: s for s in (
    _shape("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B config.json",
           hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
           rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False,
           bos_token_id=128000, eos_token_id=128001),
    _shape("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B config.json",
           hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
           rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}, rms_norm_eps=1e-5, tie_word_embeddings=True,
           bos_token_id=128000, eos_token_id=128001),
    _shape("qwen3-8b", "qwen3", "Qwen/Qwen3-8B config.json (native 40960 positions, no YaRN)",
           hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
           tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
    _shape("smollm2-135m", "llama", "the bundled SmolLM2-135M-Instruct (its GGUF's config)",
           hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
           num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
           rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
)}


def _get(name: str) -> ModelShape:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(MODEL_CONFIGS)}") from None


def build_config(name: str, layers: int | None = None):
    """The transformers config of shape ``name``, cut to ``layers`` decoder layers if given.

    Raises ``ValueError`` for an unknown name or a layer count outside ``1 .. full depth`` (a
    deeper model than the real one is not that model)."""
    import transformers as tf

    shape = _get(name)
    kw = shape.config_kwargs()
    full = kw["num_hidden_layers"]
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= full:
            raise ValueError(f"--layers must be an integer in 1..{full} for {name}, got {layers!r}")
        kw["num_hidden_layers"] = layers
    cls = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[shape.family]
    return cls(**kw)


def attention_shape(name: str) -> dict:
    """``{"q_heads", "kv_heads", "head_dim"}`` of shape ``name`` (for the executor microbenchmark)."""
    kw = _get(name).config_kwargs()
    return {"q_heads": kw["num_attention_heads"], "kv_heads": kw["num_key_value_heads"], "head_dim": kw["head_dim"]}


def random_model(name: str, *, layers: int | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0):
    """A random-weight causal LM of shape ``name`` on ``device`` in ``dtype``, eval mode, SDPA attention.

    The parameters are allocated and initialised on ``device`` in ``dtype`` (constructed under
    ``torch.device(device)``, ``from_config(dtype=...)`` building in that dtype), never as an fp32
    CPU copy first; both are checked afterwards.
    Returns ``(model, info)``: ``info`` is what a result file records about the model.
    """
    from transformers import AutoModelForCausalLM

    from tokensparse.models import check_supported

    config = build_config(name, layers)
    device = torch.device(device)
    torch.manual_seed(seed)  # seeds every device's generator
    with torch.device(device):  # allocate (and initialise) on the device; from_config casts to dtype at construction
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    check_supported(model)
    model.eval()
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype} | \
            {str(p.device) for p in model.parameters() if p.device.type != device.type}
    if wrong:  # transformers changed how from_config places/casts weights: refuse rather than mismeasure
        raise RuntimeError(f"random_model({name!r}): parameters ended up as {sorted(wrong)}, wanted {dtype} on {device}")
    info = {
        "source": "random weights", "model_config": name, "layers": config.num_hidden_layers,
        "full_layers": _get(name).config_kwargs()["num_hidden_layers"], "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()), "shape_source": _get(name).source,
    }
    return model, info


def random_prompt(length: int, vocab_size: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """``(1, length)`` token ids drawn uniformly from ``[0, vocab_size)`` (seeded, drawn on the CPU so
    the ids are the same on every device). A random-weight model has no tokenizer and no text it
    understands; the prompt only has to have the requested length."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=g).to(device)
