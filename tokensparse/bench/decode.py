"""Decode benchmark: ms/token at long contexts for dense (stock ``DynamicCache`` and the engine's
preallocated ``KVCache``) and the decode-time methods (TokenSelect, TidalDecode, Quest) over the
preallocated cache; eviction methods (SnapKV, ...) given with ``--variants`` decode over the cache
their own prefill compressed (that prefill is untimed; ``kv_bytes_at_start`` shows what it kept).

For each length a pass key prompt is prefilled densely once (untimed); every variant then decodes
``steps`` greedy tokens from its own copy of that cache, one timed step at a time. Variants are
interleaved over ``repeats`` rounds (after one untimed round of 2 steps per variant) and the
median step time is reported with its spread. Beyond
the trained 8K context the model is loaded with YaRN RoPE scaling through its config.
TokenSelect's Selection Cache hit rate (reused selections / all selections) is reported, and for
every method the share of the step time spent selecting (scoring and top-k, timed by the session
around each selection: ``Session.time_selection``). ``variants`` (``--variants FILE``) replaces the
default method configurations; means are reported next to medians (a method with a periodic full
step is judged on the mean).

Any device and dtype (``--device``, ``--dtype``), on the bundled model or a named shape with random
weights (``--model-config``, ``--layers``: random prompt ids, no RoPE change). Each step is timed
between two device synchronisations (the next step needs this step's token anyway, so that is the
latency a user sees). On CUDA the session's selection timer would read the host clock around
asynchronous launches, so the selection share is measured instead in one extra, untimed round per
method with the device synchronised around every selection (which serialises it: that round's step
times are not reported, only the share). Each variant's peak device memory over its timed runs is
recorded (CUDA only); it includes the weights, the shared prefilled cache and the variant's copy.

``warm_state`` (``--warm-state``): a method that keeps state with the cache (page summaries, the
int8 key shadow, FASA's chunk copy) otherwise builds it over the whole prompt in the first timed
step of every round, since each round decodes from a fresh copy of the prefilled cache; a real
generation pays that build once. With the flag such a method first decodes one untimed step on its
own copy (the build, reported as ``state_build_s``: the step's seconds, build included) and every
round starts from a copy of that cache, so the timed steps and the selection share are the steady
state. Without it (the default, as in the results committed before the flag) the build is in the
means and the selection share.

``static`` (``--static eager,compile,reduce-overhead``: one or more modes) adds static-shape variants
(:mod:`tokensparse.engine.static`): dense and every variant that has a fixed-shape form, a share
budget resolved to a token count at the prompt length. One dense prefill into a
:class:`~transformers.StaticCache` (untimed) is the snapshot every static variant's own working
cache is restored from, in place, before each run (so a captured CUDA graph keeps its addresses);
the first, untimed round includes the compile (``compile_s`` in the row). Their cache is
``max_cache_len`` rows whatever the method.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import tokensparse as ts
from tokensparse.engine.executors import decode_backends

from . import (MEMORY_NOTE, bench_prompt, bundled_rope, check_fits, environment, load_bench_model, max_or_none, peak_memory_bytes,
               reset_peak_memory, spread, sync, timed)


#: decode-time variants: label, method, settings. Exactly the configurations of the v2 standard suite
#: (tokensparse/eval/suites/standard.json), so every decode speed-up this benchmark reports has an
#: accuracy row measured on the same configuration (docs/results/README.md pairs them)
SELECT_CONFIGS = [
    ("token_select 25%", "token_select", {"budget": 0.25, "n_sink": 128, "n_local": 256}),
    ("token_select 25% + selection cache θ=0.8", "token_select",
     {"budget": 0.25, "n_sink": 128, "n_local": 256, "reuse_threshold": 0.8}),
    ("tidal_decode 25%", "tidal_decode", {"budget": 0.25, "selection_layers": "paper", "select_per": "kv_head"}),
    ("quest 25%", "quest", {"budget": 0.25}),
]


def _dynamic_copy(model, kv: ts.KVCache):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(kv.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


def _decode(model, cache, first_token: torch.Tensor, steps: int, device=None) -> list[float]:
    """Seconds of each of ``steps`` greedy steps, each between two synchronisations of ``device``."""
    tok, times = first_token, []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        with decode_backends():  # every variant, dense too: flash before cuDNN on CUDA (no effect on CPU)
            logits = model(input_ids=tok, cache=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _synchronised_selection(session, device) -> None:
    """Make ``session.selecting()`` (the block methods run their scoring and top-k in) synchronise
    ``device`` before and after the block and add the time to ``stats["selection_s"]``: on CUDA the
    session's own timer (host clock only) would measure kernel launches. Set on this session
    instance only; the engine is unchanged."""

    @contextlib.contextmanager
    def selecting():
        sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(device)
            session.stats["selection_s"] += time.perf_counter() - t0

    session.selecting = selecting


def load_variants(path: str) -> list[tuple[str, str, dict]]:
    """Decode variants from a JSON file: a list of ``{"label": ..., "method": ..., "config": {...}}``
    (each config is built and checked here, so a typo fails before any model is loaded)."""
    import json

    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{label, method, config}} objects")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"label", "method", "config"} or "method" not in item:
            raise ValueError(f"{path}: item {i} must be an object with 'method' and optional 'label', 'config'")
        cfg = item.get("config", {})
        ts.methods.get(item["method"])(**cfg)  # refuse an unknown method or a bad config now
        out.append((item.get("label") or f"{item['method']} {cfg}", item["method"], cfg))
    labels = [v[0] for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: labels must be unique, got {labels}")
    return out


@torch.no_grad()
def run(lengths, repeats: int = 3, steps: int = 16, fill_threads: int | None = None,
        variants: list[tuple[str, str, dict]] | None = None, dynamic: bool = True, *,
        device="cpu", dtype: torch.dtype = torch.float32, model_config: str | None = None,
        layers: int | None = None, seed: int = 0, static: list[str] | None = None,
        warm_state: bool = False) -> dict:
    """Decode ms/token per variant and length (see the module docstring). ``model_config`` (with
    ``layers``) benchmarks that shape with random weights instead of the bundled model."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    cuda = device.type == "cuda"
    out = {"env": environment(device, dtype), "kind": "decode", "steps": steps, "model": None,
           "memory_note": MEMORY_NOTE + "; decode: the shared prefilled cache and the variant's copy of it both count",
           "selection_timing": ("separate untimed round, device synchronised around each selection" if cuda
                                else "session timer during the timed rounds"),
           "results": []}
    threads = torch.get_num_threads()
    fill_threads = fill_threads or os_cpus()
    model = None
    for length in lengths:
        rope = bundled_rope(length) if model_config is None else None
        if model is None or model_config is None:  # the bundled model's RoPE scaling depends on the length
            model, tok, info = load_bench_model(device=device, dtype=dtype, model_config=model_config,
                                                layers=layers, seed=seed, rope_scaling=rope)
            out["model"] = out["model"] or info
        runs = ([("dense DynamicCache", None)] if dynamic else []) + [("dense KVCache (prealloc)", None)] + [
            (label, ts.methods.get(name)(**kw)) for label, name, kw in (variants or SELECT_CONFIGS)
        ]
        check_fits(model, runs)
        ids = bench_prompt(model, tok, length, seed=seed)
        kv = ts.KVCache(model, capacity=ids.shape[1] + steps * repeats + 8)
        torch.set_num_threads(fill_threads)
        holder = {}
        fill_s = timed(lambda: holder.update(logits=model(input_ids=ids, cache=kv, logits_to_keep=1).logits), device)
        torch.set_num_threads(threads)
        first = holder.pop("logits")[:, -1].argmax(-1, keepdim=True)
        start = {label: (kv, first) for label, _ in runs}
        build_s = {}  # --warm-state: seconds of the untimed step that built a method's cache state
        for label, method in runs:  # eviction methods compress the prompt in their own prefill (untimed)
            if method is not None and method.needs_evicting_cache:
                with ts.sparsify(model, method) as s:
                    own = s.new_cache(capacity=ids.shape[1] + steps * repeats + 8)
                    logits = model(input_ids=ids, cache=own, logits_to_keep=1).logits
                start[label] = (own, logits[:, -1].argmax(-1, keepdim=True))
                del logits
            elif warm_state and method is not None and method.needs_cache_state:  # build its state once, untimed
                with ts.sparsify(model, method) as s:
                    own, holder = kv.clone(), {}
                    build_s[label] = timed(
                        lambda: holder.update(logits=model(input_ids=first, cache=own, use_cache=True).logits), device)
                start[label] = (own, holder.pop("logits")[:, -1].argmax(-1, keepdim=True))
        torch.set_num_threads(fill_threads)  # the static variants' own (untimed) prefills
        shared = {}
        statics = [v for mode in (static or ()) for v in _static_variants(model, ids, runs, steps, mode, shared)]
        del shared
        torch.set_num_threads(threads)
        runs += [(label, None) for label, _ in statics]
        statics = dict(statics)
        times = {label: [] for label, _ in runs}
        hits = {label: [0, 0] for label, _ in runs}
        selection_s = {label: 0.0 for label, _ in runs}
        peaks = {label: None for label, _ in runs}
        for r in tqdm(range(repeats + 1), desc=f"decode @{ids.shape[1]}"):
            warm = r == 0  # a first untimed round of 2 steps per variant
            for label, method in runs:
                n = 2 if warm else steps
                reset_peak_memory(device)
                if label in statics:
                    dec, snapshot, work = statics[label]
                    t = dec.decode(work.copy_from(snapshot), n)[2]
                elif method is None:
                    cache = _dynamic_copy(model, kv) if "Dynamic" in label else kv.clone()
                    t = _decode(model, cache, first, n, device)
                    del cache
                else:
                    cache0, tok0 = start[label]
                    with ts.sparsify(model, method) as s:
                        s.time_selection = not cuda
                        t = _decode(model, cache0.clone(), tok0, n, device)
                    if not warm:
                        selection_s[label] += s.stats.get("selection_s", 0.0)
                        hits[label][0] += s.stats.get("reuse", 0)
                        hits[label][1] += s.stats.get("reuse", 0) + s.stats.get("select", 0)
                if not warm:
                    times[label] += t
                    peaks[label] = max_or_none(peaks[label], peak_memory_bytes(device))
        step_s = {label: sum(times[label]) for label, _ in runs}
        if cuda:  # the selection share from its own synchronised round (see the module docstring)
            for label, method in runs:
                if method is not None:
                    cache0, tok0 = start[label]
                    with ts.sparsify(model, method) as s:
                        s.time_selection = True
                        _synchronised_selection(s, device)
                        step_s[label] = sum(_decode(model, cache0.clone(), tok0, steps, device))
                    selection_s[label] = s.stats.get("selection_s", 0.0)
        base = statistics.median(times["dense KVCache (prealloc)"])
        base_mean = statistics.fmean(times["dense KVCache (prealloc)"])
        for label, method in runs:
            ms = [1000 * t for t in times[label]]
            row = {
                "length": int(ids.shape[1]), "rope_scaling": rope, "variant": label, "ms_per_token": spread(ms),
                "mean_ms_per_token": statistics.fmean(ms),
                "tokens_per_s": 1000 / statistics.median(ms),
                "speedup_vs_dense_prealloc": base / statistics.median(times[label]),
                # periodic methods (a full step every S steps) are judged on the mean: the median hides the full steps
                "mean_speedup_vs_dense_prealloc": base_mean / statistics.fmean(times[label]),
                "selection_share": selection_s[label] / step_s[label] if method is not None else None,
                "fill_prefill_s": fill_s, "fill_threads": fill_threads,
                "peak_device_bytes": peaks[label],
                # K/V bytes a step starts from: the whole prompt's, or what an eviction method kept of it
                "kv_bytes_at_start": (int(start[label][0].bytes_held()) if label not in statics
                                      else _static_bytes(statics[label][2])),
            }
            if label in statics:
                row["static"] = label.rsplit("[", 1)[1].rstrip("]")
                row["compile_s"] = statics[label][0].compile_seconds
                if statics[label][0].method is not None:
                    row["config"] = statics[label][0].method.config_dict()
            if method is not None:
                row["config"] = method.config_dict()
                if label in build_s:  # timed steps start from the state built by one untimed step
                    row["state_build_s"] = build_s[label]
                if method.name == "token_select":
                    row["selection_cache_hit_rate"] = hits[label][0] / hits[label][1] if hits[label][1] else 0.0
            out["results"].append(row)
            extra = f"  hit rate {row['selection_cache_hit_rate']:.2f}" if "selection_cache_hit_rate" in row else ""
            if row["selection_share"] is not None:
                extra += f"  selection {100 * row['selection_share']:.1f}% of step time"
            if peaks[label] is not None:
                extra += f"  peak {peaks[label] / 2**30:.1f} GiB"
            print(f"{ids.shape[1]:>6} {label:<46} {statistics.median(ms):7.1f} ms/token "
                  f"({min(ms):.1f}-{max(ms):.1f}; mean {row['mean_ms_per_token']:.1f})  "
                  f"x{row['speedup_vs_dense_prealloc']:.2f} (mean x{row['mean_speedup_vs_dense_prealloc']:.2f}) "
                  f"vs dense prealloc{extra}")
        del kv, start
        if model_config is None:
            del model
            model = None
    return out


def _static_variants(model, ids, runs, steps: int, mode: str, shared: dict):
    """``[(label, (decoder, snapshot, work))]``: static-shape dense and every method of ``runs`` with
    a static form (share budgets resolved at the prompt length); others are skipped with a note.
    The dense prefill is the same for all of them: one snapshot (``shared``) serves every variant,
    each of which gets its own working cache (filled from a one-token prompt, then overwritten) and
    its own method buffers built from the snapshot's keys (:meth:`StaticDecoder.with_buffers`)."""
    import dataclasses

    from tokensparse.engine.static import StaticDecoder

    compile = {"eager": False, "compile": True}.get(mode, mode)
    length = ids.shape[1]
    out = []
    for label, method in [("dense", None)] + [(lb, m) for lb, m in runs if m is not None]:
        if method is not None and isinstance(getattr(method, "budget", None), float):
            method = dataclasses.replace(method, budget=max(1, round(method.budget * length)))
        try:
            dec = StaticDecoder(model, method, max_cache_len=length + steps + 4, compile=compile)
        except NotImplementedError as e:
            print(f"static decode: {label} skipped ({e})")
            continue
        if "snapshot" not in shared:
            shared["snapshot"] = dec.prefill(ids, max_new_tokens=steps + 2)
        snapshot = dec.with_buffers(shared["snapshot"])  # its own page summaries / key shadow of the prompt
        work = dec.prefill(ids[:, -1:], max_new_tokens=steps + 2).copy_from(snapshot)
        out.append((f"static {label} [{mode}]", (dec, snapshot, work)))
    return out


def _static_bytes(state) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in state.cache.layers)


def os_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
