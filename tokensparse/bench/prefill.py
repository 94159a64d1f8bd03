"""Prefill benchmark: end-to-end prefill time and attention-only time, dense SDPA vs prefill methods.

End to end: ``model(ids, cache=KVCache, logits_to_keep=1)`` on a pass key prompt of the requested
length (the needle at depth 0.5), dense and each configuration interleaved, ``repeats`` times.

Attention only: the Q/K/V each layer receives in one dense prefill are captured, then per layer
dense SDPA, the method's ``select`` (scoring + coverage + top-k) and the engine's executor for
that selection (:func:`tokensparse.engine.execute`: compress → attend → scatter, or block-sparse) are timed
separately on those real tensors (one warm-up call, then
``repeats`` timed calls), and summed over layers per repetition (dense in the layers a
configuration leaves dense): medians over repetitions with min–max. The warm-up call of the first
sparse layer is timed on its own (``first_call_s``: FlexAttention compiles there).

Both run on any device and dtype (``--device``, ``--dtype``) and on the bundled model or a named
shape with random weights (``--model-config``, ``--layers``; the prompt is then random ids of the
requested length). The bundled model runs prompts past its 8K trained context with YaRN
(:func:`tokensparse.bench.bundled_rope`: ×4 at 32K; recorded per row as ``rope_scaling``). Every timed region is synchronised on CUDA (:func:`tokensparse.bench.timed`);
end to end, each variant's peak device memory over its timed runs is recorded (CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

import tokensparse as ts
from tokensparse.engine import Method, execute
from tokensparse.engine.executors import dense_attention

from . import (MEMORY_NOTE, bench_prompt, bundled_rope, check_fits, environment, load_bench_model, max_or_none, peak_memory_bytes,
               reset_peak_memory, spread, timed)

#: Configurations benchmarked (label, method, settings). Token Sparse first with the paper's
#: defaults (τ = 0.005, W = 128, min 1024 tokens, layers from the drift profile at δ = 0.5); HiP at
#: its defaults (512 tokens per query block of 64, sinks 64, window 128, last 128 tokens and first 3
#: layers dense) with each of its fast CPU executors, without dense layers, as the paper has it, and
#: with the first defaults' dense tail of 256 tokens (with and without the dense layers).
CONFIGS = [
    ("token_sparse (paper defaults)", "token_sparse", {}),
    ("token_sparse late layers τ=0.05", "token_sparse", {"layers": list(range(20, 30)), "coverage": 0.05, "window": 16}),
    ("token_sparse δ=0.95 τ=0.02", "token_sparse", {"drift_quantile": 0.95, "coverage": 0.02}),
    ("composition: token_sparse late layers τ=0.05 ∘ biformer (defaults) among the kept rows", "token_sparse",
     {"layers": list(range(20, 30)), "coverage": 0.05, "window": 16, "inner": "biformer"}),
    ("hip (defaults: sdpa executor)", "hip", {}),
    ("hip (defaults, flex executor)", "hip", {"impl": "flex"}),
    ("hip (no dense layers)", "hip", {"dense_layers": 0}),
    ("hip (paper: per query head, no dense tail)", "hip", {"select_per": "query_head", "dense_tail": 0}),
    ("hip (dense tail 256: the first defaults)", "hip", {"dense_tail": 256}),
    ("hip (no dense layers, dense tail 256)", "hip", {"dense_tail": 256, "dense_layers": 0}),
    ("biformer (defaults: 1/8 of the causal blocks)", "biformer", {}),
    ("biformer 1/16", "biformer", {"budget": 0.0625}),
    ("biformer 1/16, no dense layers", "biformer", {"budget": 0.0625, "dense_layers": 0}),
    ("xattention (defaults: τ=0.9, stride 8)", "xattention", {}),
    ("xattention τ=0.8, stride 16", "xattention", {"threshold": 0.8, "stride": 16}),
    ("rectified xattention τ=0.8", "rectified", {"base": "xattention", "base_config": {"threshold": 0.8}}),
    ("rectified biformer 1/16", "rectified", {"base": "biformer", "base_config": {"budget": 0.0625}}),
    ("dhsa (defaults: 1024 tokens, cosine-shift chunks of 128 on average)", "dhsa", {}),
    ("dhsa 512 tokens", "dhsa", {"budget": 512}),
    ("sparsifiner (defaults: rank 16, 1/8 of the causal blocks)", "sparsifiner", {}),
    ("superlinear (defaults: 8 spans of √L)", "superlinear", {}),
    ("minference (defaults: 2% columns, 5% diagonals)", "minference", {}),
    ("cca (defaults: groups of 16, window 1024, training-free)", "cca", {}),
    ("hisa (defaults: 16 candidate blocks, 256 tokens by max q·k, gather executor)", "hisa", {}),
]


@dataclass(eq=False)
class _Capture(Method):
    """Dense attention that keeps every layer's call (benchmark only, not registered)."""

    calls: dict = field(default_factory=dict)

    def forward(self, call):
        self.calls[call.layer_idx] = call
        return call.dense()


def _setup(model, tokenizer, device, dtype, model_config, layers, seed, length=None):
    """The model to benchmark (loaded unless passed in) and the ``"model"`` record of the result.
    The bundled model runs prompts past its trained context with YaRN (:func:`bundled_rope`)."""
    if model is None:
        rope = bundled_rope(length) if model_config is None and length is not None else None
        return load_bench_model(device=device, dtype=dtype, model_config=model_config, layers=layers, seed=seed,
                                rope_scaling=rope)
    info = {"source": "passed in", "model_config": model_config, "layers": model.config.num_hidden_layers,
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
    return model, tokenizer, info


def _per_length(lengths, model, tokenizer, device, dtype, model_config, layers, seed):
    """``(length, model, tokenizer, info)`` for each length: a passed-in model or a named shape is
    loaded once; the bundled model again whenever a length needs another RoPE scaling."""
    loaded, rope = None, None
    for length in lengths:
        want = bundled_rope(length) if model is None and model_config is None else None
        if loaded is None or want != rope:
            loaded, rope = _setup(model, tokenizer, device, dtype, model_config, layers, seed, length), want
        yield (length, *loaded)


@torch.no_grad()
def run(lengths, repeats: int = 3, steps: int = 0, configs=CONFIGS, model=None, tokenizer=None, *,
        device="cpu", dtype: torch.dtype = torch.float32, model_config: str | None = None,
        layers: int | None = None, seed: int = 0) -> dict:
    """End-to-end prefill time of dense SDPA and of each configuration (see the module docstring).

    ``model``/``tokenizer`` may be passed in (tests); otherwise the bundled model is loaded, or the
    ``model_config`` shape with random weights (cut to ``layers``) on ``device`` in ``dtype``."""
    from tqdm.auto import tqdm

    out = {"kind": "prefill end-to-end", "memory_note": MEMORY_NOTE, "results": []}
    for length, model, tokenizer, info in _per_length(lengths, model, tokenizer, device, dtype, model_config, layers,
                                                      seed):
        device = model.device
        out.setdefault("env", environment(device, model.dtype))
        out.setdefault("model", info)
        ids = bench_prompt(model, tokenizer, length, seed=seed)
        variants = [("dense (sdpa)", None)] + [(label, ts.methods.get(name)(**kw)) for label, name, kw in configs]
        check_fits(model, variants)

        def once(method):
            """Seconds of one prefill, and the session's stats/info (empty for dense)."""
            if method is None:
                return timed(lambda: model(input_ids=ids, cache=ts.KVCache(model), logits_to_keep=1), device), {}, {}
            with ts.sparsify(model, method) as s:
                t = timed(lambda: model(input_ids=ids, cache=s.new_cache(), logits_to_keep=1), device)
            return t, dict(s.stats), dict(s.info)

        model(input_ids=ids[:, :512], logits_to_keep=1)  # warm-up
        for _, method in variants[1:]:  # compile what compiles (FlexAttention) before timing
            once(method)
        times = {label: [] for label, _ in variants}
        peaks = {label: None for label, _ in variants}
        meta = {}
        for _ in tqdm(range(repeats), desc=f"prefill {ids.shape[1]}"):
            for label, method in variants:
                reset_peak_memory(device)
                t, st, info_ = once(method)
                peaks[label] = max_or_none(peaks[label], peak_memory_bytes(device))
                times[label].append(t)
                if method is not None:
                    meta[label] = {
                        "layers": info_.get("token_sparse_layers"),
                        "kept_share": st.get("kept_keys", 0) / max(st.get("total_keys", 1), 1),
                        "sparse_layers": st.get("sparse_calls", 0),
                        "config": method.config_dict(),
                    }
        dense = spread(times["dense (sdpa)"])
        for label, _ in variants:
            s = spread(times[label])
            row = {"length": int(ids.shape[1]), "rope_scaling": info.get("rope_scaling"), "variant": label, "seconds": s,
                   "speedup_vs_dense": dense["median"] / s["median"], "peak_device_bytes": peaks[label],
                   **meta.get(label, {})}
            out["results"].append(row)
            print(f"{ids.shape[1]:>6} {label:<40} {s['median']:7.2f} s  ({s['min']:.2f}-{s['max']:.2f})  "
                  f"x{row['speedup_vs_dense']:.2f}" + (f"  kept {row['kept_share']:.2f}" if "kept_share" in row else "")
                  + (f"  peak {peaks[label] / 2**30:.1f} GiB" if peaks[label] is not None else ""))
    return out


def _timed_repeats(fn, repeats: int, device=None) -> list[float]:
    """One untimed warm-up call, then ``repeats`` timed calls."""
    fn()
    return [timed(fn, device) for _ in range(repeats)]


@torch.no_grad()
def run_attention_only(lengths, repeats: int = 3, steps: int = 0, configs=CONFIGS, model=None, tokenizer=None, *,
                       device="cpu", dtype: torch.dtype = torch.float32, model_config: str | None = None,
                       layers: int | None = None, seed: int = 0) -> dict:
    """Per-layer attention time on captured real Q/K/V: dense vs selection + executor.

    Every timed call is warmed up once and repeated ``repeats`` times; a total is the sum over
    layers of the calls of one repetition, reported as the median over repetitions with its spread
    (min–max). A layer a configuration leaves dense counts with dense's time of that repetition.
    The model options are :func:`run`'s.
    """
    out = {"kind": "prefill attention-only", "repeats": repeats, "results": []}
    for length, model, tokenizer, info in _per_length(lengths, model, tokenizer, device, dtype, model_config, layers,
                                                      seed):
        device = model.device
        check_fits(model, [(label, ts.methods.get(name)(**kw)) for label, name, kw in configs])
        out.setdefault("env", environment(device, model.dtype))
        out.setdefault("model", info)
        ids = bench_prompt(model, tokenizer, length, seed=seed)
        cap = _Capture()
        with ts.sparsify(model, cap):
            model(input_ids=ids, cache=ts.KVCache(model), logits_to_keep=1)
        calls = [cap.calls[i] for i in sorted(cap.calls)]
        dense_t = [_timed_repeats(lambda: dense_attention(call.query, call.key, call.value, None, call.scale), repeats, device)
                   for call in calls]
        dense_tot = spread([sum(t[r] for t in dense_t) for r in range(repeats)])
        out["results"].append({"length": int(ids.shape[1]), "rope_scaling": info.get("rope_scaling"), "variant": "dense (sdpa)",
                               "attention_s": dense_tot["median"], "attention_spread": dense_tot})
        print(f"{ids.shape[1]:>6} dense attention {dense_tot['median']:.2f} s ({dense_tot['min']:.2f}-{dense_tot['max']:.2f}) "
              f"over {len(calls)} layers")
        for label, name, kw in configs:
            method = ts.methods.get(name)(**kw)
            attend = getattr(method, "attend", execute)  # a method that executes its own way (Rectified SpaAttn)
            sel_r, exe_r, kept, first = [0.0] * repeats, [0.0] * repeats, {}, None
            with ts.sparsify(model, method) as session:  # the method's own session (its layers, profile)
                for call, td in zip(calls, dense_t):
                    call = replace(call, session=session, layer=session.layers[call.layer_idx])
                    sel = method.select(call)
                    if sel is None or sel.complete:  # a call the method leaves dense
                        exe_r = [a + b for a, b in zip(exe_r, td)]
                        continue
                    if first is None:
                        first = timed(lambda: attend(call, sel), device)
                    sel_r = [a + b for a, b in zip(sel_r, _timed_repeats(lambda: method.select(call), repeats, device))]
                    exe = _timed_repeats(lambda: attend(call, sel), repeats, device)
                    exe_r = [a + b for a, b in zip(exe_r, exe)]
                    kept[call.layer_idx] = sel.kept() / call.k_len
            sel, exe = spread(sel_r), spread(exe_r)
            tot = spread([a + b for a, b in zip(sel_r, exe_r)])
            row = {
                "length": int(ids.shape[1]), "rope_scaling": info.get("rope_scaling"), "variant": label,
                "selection_s": sel["median"], "executor_s": exe["median"],
                "attention_s": tot["median"], "attention_spread": tot, "selection_spread": sel, "executor_spread": exe,
                "speedup_vs_dense": dense_tot["median"] / tot["median"],
                "executor_speedup_vs_dense": dense_tot["median"] / exe["median"],
                "mean_kept_share_in_sparse_layers": sum(kept.values()) / len(kept) if kept else 1.0,
                "sparse_layers": len(kept),
                "kept_share_per_layer": {str(i): round(x, 4) for i, x in sorted(kept.items())},
                "first_call_s": first,
                "config": method.config_dict(),
            }
            out["results"].append(row)
            print(f"{ids.shape[1]:>6} {label:<40} selection {sel['median']:.2f} s + executor {exe['median']:.2f} s "
                  f"= {tot['median']:.2f} s ({tot['min']:.2f}-{tot['max']:.2f}) x{row['speedup_vs_dense']:.2f} "
                  f"(executor alone x{row['executor_speedup_vs_dense']:.2f}), "
                  f"{len(kept)} sparse layers keeping {row['mean_kept_share_in_sparse_layers']:.2f}")
    return out
