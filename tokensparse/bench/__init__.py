"""Speed benchmarks: prefill, decode and attention-only on a model (the bundled SmolLM2-135M, or a
named model shape with random weights: :mod:`.model_configs`); and an attention-only
microbenchmark of the executors on random tensors (:mod:`.executors`, no model).

Every ratio is against dense attention measured in the same process, on the same prompt, with the
same thread count; runs of the variants are interleaved and medians reported with their spread
(min–max). Results carry the environment (versions, threads, load average, dtype, device and, on
CUDA, the GPU's identity). Speed is never asserted in tests; these numbers back the claims in
``docs/results/``.

Any device: every bench takes ``--device cpu|cuda|cuda:N`` and ``--dtype fp32|bf16|fp16``. CUDA runs
asynchronously, so a host clock read right after a launch measures the launch, not the work:
:func:`timed` synchronises the device before starting the clock and before stopping it (no-op on
CPU). :func:`reset_peak_memory` / :func:`peak_memory_bytes` give the peak device memory of a variant
(CUDA's allocator high-water mark; ``None`` on CPU, where there is no device allocator to ask —
``tokensparse eval`` records the process RSS peak for CPU runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["main", "timed", "sync", "spread", "resolve_device", "resolve_dtype", "environment",
           "reset_peak_memory", "peak_memory_bytes", "DTYPES"]

#: --dtype names → torch dtypes (the long names are accepted too)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

#: what a row's ``peak_device_bytes`` is, written next to the rows
MEMORY_NOTE = ("peak_device_bytes: torch.cuda.max_memory_allocated over the variant's timed runs (weights, "
               "caches and activations included); None on CPU (no device allocator to query)")


class BenchError(ValueError):
    """A benchmark setting that cannot run (the CLI prints it as a one-line error)."""


def check_fits(model, variants) -> None:
    """Raise :class:`BenchError` naming the first ``(label, method)`` the model cannot run (e.g.
    SmolLM2's late-layer configuration, layers 20-29, on a model cut to 2 layers), before anything
    is timed: entering ``sparsify`` runs the method's setup checks and nothing else."""
    import warnings

    import tokensparse as ts

    for label, method in variants:
        if method is None:
            continue
        try:
            with warnings.catch_warnings():  # (a setup warning is given again when the method runs)
                warnings.simplefilter("ignore")
                with ts.sparsify(model, method):
                    pass
        except ValueError as e:
            raise BenchError(f"configuration {label!r} does not fit this model "
                             f"({model.config.num_hidden_layers} layers): {e}; leave it out "
                             "(--methods / --variants) or use a deeper model") from None


def resolve_device(text) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; ``ValueError`` naming the problem.

    A CUDA device that is not there is an error, never a silent fall back to the CPU: a CPU number
    labelled as a GPU run would be worse than no number. ``cuda`` is pinned to the current index so
    the environment record names the GPU actually used."""
    try:
        dev = torch.device(str(text))
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device {text}: the benchmarks support cpu and cuda devices, got a {dev.type!r} device")
    if not torch.cuda.is_available():
        why = ("CUDA is not available in this torch build" if torch.version.cuda is None
               else "CUDA is not available: torch was built with CUDA but sees no usable GPU (driver, CUDA_VISIBLE_DEVICES?)")
        raise ValueError(f"--device {text}: {why} (torch {torch.__version__}); the benchmark does not fall back to the CPU")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"--device {text}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(text) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or ``float32``/``bfloat16``/``float16``, or a ``torch.dtype``) as a
    ``torch.dtype``; ``ValueError`` otherwise."""
    if isinstance(text, torch.dtype):
        if text in DTYPES.values():
            return text
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {text}")
    key = _DTYPE_ALIASES.get(str(text), str(text))
    if key not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device=None) -> float:
    """Seconds ``fn()`` takes on ``device``: the device is synchronised before the clock starts (so
    earlier queued work is not charged to ``fn``) and before it stops (so ``fn``'s work is)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (no-op elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> int | None:
    """Peak bytes allocated on a CUDA ``device`` since :func:`reset_peak_memory`; ``None`` elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def max_or_none(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def environment(device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The benchmark environment record: the keys result files have always had (``torch``,
    ``transformers``, ``tokensparse``, ``threads``, ``cpu``, ``cpus``, ``loadavg``, ``dtype``,
    ``time``), with ``dtype`` the one actually run (it used to be hard-coded ``"float32"``), plus
    ``device``, ``gpu`` (:func:`tokensparse.eval.env.gpu_identity`: name, capability, memory, CUDA
    and driver versions; ``None`` on CPU) and ``git`` (commit and whether the checkout was dirty)."""
    from tokensparse.demo import environment as base_environment
    from tokensparse.eval.env import git_state, gpu_identity

    device = torch.device(device)
    env = base_environment()
    env.update(dtype=dtype_name(dtype), device=str(device), gpu=gpu_identity(device), git=dict(git_state()))
    return env


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def save_json(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


TRAINED_CONTEXT = 8192
"""The bundled model's trained context; longer benchmark prompts run it with YaRN (:func:`bundled_rope`)."""


def bundled_rope(length: int) -> dict | None:
    """The RoPE scaling the bundled model runs a ``length``-token benchmark with: none within its
    trained context, else YaRN ×2 up to 16K, ×4 up to 32K, ×8 up to 64K (a power of two). Speed does
    not depend on the factor; accuracy does: at 16K the bundled model answers the pass key densely
    with ×4 but not with ×2 (``docs/results/long_context``), so evaluations choose their own
    ``rope_scaling``."""
    if length <= TRAINED_CONTEXT:
        return None
    return {"rope_type": "yarn", "factor": float(2 ** (length // TRAINED_CONTEXT - 1).bit_length())}


def load_bench_model(*, device="cpu", dtype: torch.dtype = torch.float32, model_config: str | None = None,
                     layers: int | None = None, seed: int = 0, rope_scaling: dict | None = None):
    """``(model, tokenizer, info)`` for a benchmark: the bundled SmolLM2-135M (``model_config=None``;
    ``rope_scaling`` applies to it) or the named shape with random weights (no tokenizer: ``None``).
    ``info`` goes into the result file as ``"model"``."""
    if model_config is None:
        import tokensparse as ts

        model, tok = ts.load_model(dtype=dtype, device=device, rope_scaling=rope_scaling)
        info = {"source": "bundled SmolLM2-135M-Instruct", "model_config": None,
                "layers": model.config.num_hidden_layers, "rope_scaling": rope_scaling}
    else:
        from .model_configs import random_model

        model, info = random_model(model_config, layers=layers, device=device, dtype=dtype, seed=seed)
        tok = None
    info.update(dtype=dtype_name(dtype), device=str(device))
    return model, tok, info


def bench_prompt(model, tokenizer, length: int, *, seed: int = 0) -> torch.Tensor:
    """``(1, ~length)`` prompt ids on the model's device: the pass key prompt (needle at depth 0.5)
    with a tokenizer; otherwise (random weights) ``length`` seeded random ids."""
    if tokenizer is None:
        from .model_configs import random_prompt

        return random_prompt(length, model.config.vocab_size, seed=seed, device=model.device)
    from tokensparse.eval import tasks
    from tokensparse.eval.harness import encode_sample

    ctx, q = encode_sample(tokenizer, tasks.passkey(tokenizer, length, depth=0.5))
    return torch.cat([ctx, q], dim=1).to(model.device)


def _model_options(args):
    """``(device, dtype, model_config, layers, seed)`` from the command line, checked before any model
    or tensor is built."""
    from .model_configs import MODEL_CONFIGS, build_config

    try:
        device = resolve_device(getattr(args, "device", None) or "cpu")
        dtype = resolve_dtype(getattr(args, "dtype", None) or "fp32")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    name, layers = getattr(args, "model_config", None), getattr(args, "layers", None)
    if name is not None and name not in MODEL_CONFIGS:
        raise SystemExit(f"--model-config: unknown {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    if layers is not None:
        if args.what == "executors":
            raise SystemExit("--layers applies to bench prefill, decode and attention (executors has no layers)")
        if name is None:
            raise SystemExit("--layers needs --model-config NAME (the bundled model is benchmarked whole)")
        try:
            build_config(name, layers)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return device, dtype, name, layers, getattr(args, "seed", 0) or 0


def main(args) -> int:
    executors = args.what == "executors"
    default_lengths = "2048,4096,8192" if executors else "8192"
    text = default_lengths if args.lengths is None else args.lengths
    try:
        lengths = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 64:
        raise SystemExit(f"--lengths must be comma-separated lengths >= 64, got {text!r}")
    repeats = args.repeats if args.repeats is not None else (5 if executors else 3)
    if repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {repeats}")
    if args.what == "context-parallel":
        return _main_context_parallel(args, lengths, repeats)
    if args.what == "decode" and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1 (decode steps timed per run), got {args.steps}")
    device, dtype, model_config, layers, seed = _model_options(args)
    if executors:
        if getattr(args, "methods", None) or getattr(args, "variants", None):
            raise SystemExit("bench executors times executors on random tensors: --methods applies to bench prefill "
                             "and attention, --variants applies to bench decode, prefill and attention")
        return _main_executors(args, lengths, repeats, device, dtype, model_config)
    kw = {}
    if getattr(args, "methods", None):
        if args.what not in ("prefill", "attention"):
            raise SystemExit("--methods applies to bench prefill and bench attention")
        from .prefill import CONFIGS

        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = sorted({name for _, name, _ in CONFIGS})
        unknown = [m for m in wanted if m not in known]
        if unknown or not wanted:
            raise SystemExit(f"--methods: {', '.join(unknown) or 'none given'}; benchmarked methods: {', '.join(known)}")
        kw["configs"] = [c for c in CONFIGS if c[1] in wanted]
    if getattr(args, "variants", None):
        if args.what not in ("decode", "prefill", "attention"):
            raise SystemExit("--variants applies to bench decode, prefill and attention")
        if kw:
            raise SystemExit("--methods and --variants: give one of them")
        from .decode import load_variants

        try:
            variants = load_variants(args.variants)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"--variants: {e}") from None
        if args.what == "decode":
            kw["variants"] = variants
            kw["dynamic"] = not getattr(args, "no_dynamic", False)
        else:  # prefill/attention: the variants replace CONFIGS (dense SDPA always runs)
            kw["configs"] = variants
    if getattr(args, "static", None):
        if args.what != "decode":
            raise SystemExit("--static applies to bench decode")
        modes = [m.strip() for m in args.static.split(",") if m.strip()]
        bad = [m for m in modes if m not in ("eager", "compile", "reduce-overhead")]
        if bad or not modes:
            raise SystemExit(f"--static: unknown mode(s) {bad or args.static!r}; modes: eager, compile, reduce-overhead")
        kw["static"] = modes
    if getattr(args, "warm_state", False):
        if args.what != "decode":
            raise SystemExit("--warm-state applies to bench decode")
        kw["warm_state"] = True
    if args.what == "prefill":
        from .prefill import run
    elif args.what == "decode":
        from .decode import run
    else:
        from .prefill import run_attention_only as run
    kw.update(device=device, dtype=dtype, model_config=model_config, layers=layers, seed=seed)
    try:
        result = run(lengths=lengths, repeats=repeats, steps=args.steps, **kw)
    except BenchError as e:
        raise SystemExit(f"tokensparse bench {args.what}: {e}") from None
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0


def _main_context_parallel(args, lengths: list[int], repeats: int) -> int:
    """``bench context-parallel``: gloo ranks on this machine (see :mod:`.context_parallel`)."""
    if args.device != "cpu" or args.dtype != "fp32" or args.model_config or args.methods or args.variants:
        raise SystemExit("bench context-parallel runs the bundled model in fp32 on gloo ranks on this CPU; "
                         "--device/--dtype/--model-config/--methods/--variants do not apply")
    if args.ranks < 2:
        raise SystemExit(f"--ranks must be at least 2, got {args.ranks}")
    if args.block < 1:
        raise SystemExit(f"--block must be >= 1, got {args.block}")
    text = args.densities or "1,0.25,0.1"
    try:
        densities = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        densities = []
    if not densities or not all(0 < d <= 1 for d in densities):
        raise SystemExit(f"--densities must be comma-separated shares in (0, 1], got {text!r}")
    from .context_parallel import format_table, run

    result = run(args.ranks, lengths, densities, repeats, args.block)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0


def _main_executors(args, lengths: list[int], repeats: int, device: torch.device, dtype: torch.dtype,
                    model_config: str | None) -> int:
    from .executors import DEFAULT_DENSITIES, format_table, run, validate
    from .model_configs import attention_shape

    text = getattr(args, "densities", None)
    try:
        densities = list(DEFAULT_DENSITIES) if text is None else [float(x) for x in text.split(",") if x.strip()]
        validate(lengths, densities, repeats)
    except ValueError:
        raise SystemExit(f"--densities must be comma-separated numbers in (0, 1], got {text!r}") from None
    shape = attention_shape(model_config) if model_config else {}
    result = run(lengths=lengths, densities=densities, repeats=repeats, device=device, dtype=dtype,
                 model_config=model_config, seed=getattr(args, "seed", 0) or 0, progress=True, **shape)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return 0
