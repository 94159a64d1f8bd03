"""The ``tokensparse`` command: methods | generate | calibrate | demo | bench | eval | report."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_method(name: str, settings: list[str] | None):
    """A method config from ``name`` and ``key=value`` strings (values parsed as Python literals)."""
    import tokensparse as ts

    try:
        cls = ts.methods.get(name)
    except KeyError as e:
        raise SystemExit(str(e)) from None
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in settings or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key not in fields:
            raise SystemExit(f"{name} has no setting {key!r}; settings: {', '.join(sorted(fields))}")
        kwargs[key] = _parse_value(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad {name} settings: {e}") from None


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (CLI errors are one line, never a traceback)."""
    return " ".join(str(e).split())


def check_model_arg(path: str | None, command: str) -> None:
    """Refuse a ``--model`` that is not a supported local model directory, before anything is loaded
    (reads only its ``config.json``)."""
    if path is None:
        return
    from tokensparse.models import ModelLoadError, UnsupportedModelError, check_model_dir

    try:
        check_model_dir(path)
    except (ModelLoadError, UnsupportedModelError) as e:
        raise SystemExit(f"tokensparse {command}: --model: {_one_line(e)}") from None


def load_model_or_exit(path: str | None, command: str, rope_scaling: dict | None = None):
    """``tokensparse.load_model(path, rope_scaling=...)``, with its errors (missing bundled package,
    unsupported family, missing weights or tokenizer files) turned into a one-line ``SystemExit``."""
    import tokensparse as ts
    from tokensparse.models import ModelLoadError, UnsupportedModelError

    try:
        return ts.load_model(path, rope_scaling=rope_scaling)
    except (ModelLoadError, UnsupportedModelError, OSError) as e:
        where = f"--model {path}" if path is not None else "the bundled model"
        raise SystemExit(f"tokensparse {command}: cannot load {where}: {_one_line(e)}") from None


def _read_text(path: str, option: str, command: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"tokensparse {command}: cannot read {option} {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"tokensparse {command}: {option} {path!r} is not UTF-8 text ({e.reason})") from None


def cmd_methods(args) -> int:
    import tokensparse as ts

    if args.markdown:
        print(ts.methods.markdown_table(), end="")
        return 0
    rows = ts.methods.table()
    cols = [("name", "method"), ("phase", "phase"), ("schedule", "schedule"), ("kv_memory", "KV memory"),
            ("calibration", "calibration"), ("paper", "paper")]
    widths = {k: max(len(t), *(len(r[k]) for r in rows)) for k, t in cols}
    print("  ".join(t.ljust(widths[k]) for k, t in cols).rstrip())
    print("  ".join("-" * widths[k] for k, _ in cols))
    for r in rows:
        print("  ".join(r[k].ljust(widths[k]) for k, _ in cols).rstrip())
    return 0


def cmd_generate(args) -> int:
    import torch

    import tokensparse as ts

    # every argument is checked before the model is loaded
    if args.max_new_tokens < 1:
        raise SystemExit(f"tokensparse generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.method == "dense":
        if args.set:
            raise SystemExit(f"tokensparse generate: dense attention has no settings, got --set {args.set[0]!r}; "
                             "pass --method NAME to use a method's settings (see `tokensparse methods`)")
        if args.telemetry:
            raise SystemExit("tokensparse generate: --telemetry reports what a method changes; "
                             "dense has nothing to report (pass --method NAME)")
        method = None
    else:
        method = build_method(args.method, args.set)
    if args.prompt is not None:
        prompt, source = args.prompt, "--prompt"
    else:
        prompt, source = _read_text(args.prompt_file, "--prompt-file", "generate"), f"--prompt-file {args.prompt_file!r}"
    if not prompt.strip():
        raise SystemExit(f"tokensparse generate: the prompt is empty ({source}); pass some text to continue")
    check_model_arg(args.model, "generate")
    _threads(args.threads)
    model, tok = load_model_or_exit(args.model, "generate")
    ids = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        if method is None:
            out = model.generate(**ids, cache=ts.KVCache(model), max_new_tokens=args.max_new_tokens, do_sample=False)
            stats, tele = {}, None
        else:
            with ts.sparsify(model, method, telemetry=args.telemetry) as s:
                out = model.generate(**ids, cache=s.new_cache(), max_new_tokens=args.max_new_tokens, do_sample=False)
                stats, tele = dict(s.stats), (s.telemetry.overall() if s.telemetry else None)
    dt = time.perf_counter() - t0
    print(tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True))
    print(f"\n[{args.method}: {ids.input_ids.shape[1]} prompt tokens, {dt:.2f} s]", file=sys.stderr)
    if stats:
        print(f"[stats: {stats}]", file=sys.stderr)
    if tele:
        print(f"[telemetry: density {tele['density']:.3f}, dense attention mass kept {tele['mass']:.3f}, "
              f"attention-output error {tele['error']:.3f} (sampled rows, layers the method touched)]", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from pathlib import Path

    import torch

    import tokensparse as ts
    from tokensparse.engine.calibration import calibrate, kind_profile_path
    from tokensparse.eval.corpus import load_corpus

    # every argument is checked before the model is loaded and anything is computed or saved
    try:
        cls = ts.methods.get(args.method)
    except KeyError as e:
        raise SystemExit(f"tokensparse calibrate: {e}") from None
    if not cls.profile_kind:
        needing = [n for n in ts.methods.names() if ts.methods.get(n).profile_kind]
        raise SystemExit(f"tokensparse calibrate: method {args.method!r} needs no calibration; "
                         f"methods with a profile: {', '.join(needing)}")
    if args.tokens < 16:
        raise SystemExit(f"tokensparse calibrate: --tokens must be >= 16, got {args.tokens}")
    if args.out is not None and Path(args.out).is_dir():
        raise SystemExit(f"tokensparse calibrate: --out {args.out!r} is a directory; pass the profile's file path")
    text = _read_text(args.text, "--text", "calibrate") if args.text else load_corpus("kjv")
    if not text.strip():
        raise SystemExit(f"tokensparse calibrate: the calibration text {args.text!r} is empty")
    check_model_arg(args.model, "calibrate")
    _threads(args.threads)
    model, tok = load_model_or_exit(args.model, "calibrate")
    ids = tok(text[: args.tokens * 8], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"tokensparse calibrate: the calibration text has only {ids.shape[1]} tokens, "
                         f"fewer than --tokens {args.tokens}")
    src = args.text or "tokensparse/data/kjv.txt.gz"
    t0 = time.perf_counter()
    with torch.no_grad():
        prof = calibrate(model, cls, ids, source=f"{src} (first {args.tokens} tokens)")
    out = args.out or str(kind_profile_path(prof.model_fingerprint, prof.kind))
    try:
        prof.save(out)
    except OSError as e:
        raise SystemExit(f"tokensparse calibrate: cannot write the profile to {out!r}: {e.strerror or e}") from None
    print(f"{prof.kind} profile ({args.method}) for model {prof.model_fingerprint} ({prof.num_layers} layers, "
          f"{args.tokens} tokens, {time.perf_counter() - t0:.1f} s) written to {out}")
    text = cls.describe_profile(prof.payload)
    if text:
        print(text)
    return 0


def cmd_sinks(args) -> int:
    import json

    import torch

    from tokensparse.analysis import SinkDetector
    from tokensparse.engine.observers import observe
    from tokensparse.eval.corpus import load_corpus

    if args.tokens < 16:
        raise SystemExit(f"tokensparse sinks: --tokens must be >= 16, got {args.tokens}")
    try:
        det = SinkDetector(primary_threshold=args.primary, secondary_threshold=args.secondary,
                           min_queries=args.min_queries, min_lifetime=args.min_lifetime)
    except ValueError as e:
        raise SystemExit(f"tokensparse sinks: {e}") from None
    if args.json is not None and os.path.isdir(args.json):
        raise SystemExit(f"tokensparse sinks: --json {args.json!r} is a directory; pass a file path")
    text = _read_text(args.text, "--text", "sinks") if args.text else load_corpus("kjv")
    check_model_arg(args.model, "sinks")
    _threads(args.threads)
    model, tok = load_model_or_exit(args.model, "sinks")
    ids = tok(text[: args.tokens * 8], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"tokensparse sinks: the text has only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    t0 = time.perf_counter()
    with torch.no_grad(), observe(model, det):
        model(ids, use_cache=False)
    rep = det.report()
    src = args.text or "tokensparse/data/kjv.txt.gz"
    rep.update(source=f"{src} (first {args.tokens} tokens)", tokens=int(ids.shape[1]),
               decoded_secondary={str(d["position"]): tok.decode(ids[0, d["position"]]) for d in rep["secondary_sinks"]})
    print(f"attention sinks over {ids.shape[1]} tokens of {src} ({time.perf_counter() - t0:.1f} s); "
          f"sink score = mean attention a key receives from the queries that see it")
    print("layer  first-token  heads>{:.2f}  strongest later tokens (position: score)".format(args.primary))
    for layer, v in rep["per_layer"].items():
        later = ", ".join(f"{d['position']}: {d['score']:.3f}" for d in v["secondary"][:3])
        print(f"{layer:>5}  {v['first_token']:11.3f}  {v['heads_with_first_token_sink']:9.2f}  {later}")
    print(f"layers with a first-token sink (head mean > {args.primary}): {rep['layers_with_primary_sink']}")
    runs = rep["secondary_sinks"]
    print(f"secondary sinks (score > {args.secondary} in consecutive layers): {len(runs)}")
    for d in runs[:10]:
        print(f"  position {d['position']} ({rep['decoded_secondary'][str(d['position'])]!r}): onset layer "
              f"{d['onset']}, lifetime {d['lifetime']}, peak {d['peak']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"report written to {args.json}")
    return 0


def cmd_demo(args) -> int:
    from tokensparse import demo

    from tokensparse.models import ModelLoadError

    try:  # checked before the model is loaded
        demo.check_args(args.length, args.depths)
    except ValueError as e:
        raise SystemExit(f"tokensparse demo: {e}") from None
    if args.json is not None and os.path.isdir(args.json):
        raise SystemExit(f"tokensparse demo: --json {args.json!r} is a directory; pass a file path")
    _threads(args.threads)
    placements = ("inside", "after") if args.placement == "both" else (args.placement,)
    print(f"tokensparse demo: pass key retrieval at ~{args.length} tokens, {args.depths} depths, bundled "
          "SmolLM2-135M-Instruct (fp32, plain completion prompt). Loading the model...", flush=True)
    try:
        result = demo.run(length=args.length, n_depths=args.depths, placements=placements, seed=args.seed,
                          extended=args.extended)
    except (ValueError, ModelLoadError) as e:
        raise SystemExit(f"tokensparse demo: {_one_line(e)}") from None
    print()
    print(demo.format_table(result["summary"]))
    env = result["env"]
    print(f"\n(torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, fp32; "
          "prefill/decode are medians over depths; KV = bytes held after generation)")
    if args.json:
        demo.save(result, args.json)
        print(f"results written to {args.json}")
    return 0


def cmd_bench(args) -> int:
    from tokensparse.bench import main as bench_main

    _threads(args.threads)
    return bench_main(args)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokensparse", description="Training-free token-level sparse attention for transformers")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="list registered methods")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/methods.md)")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("generate", help="generate from a prompt with a method")
    s.add_argument("--method", default="dense", help="method name or 'dense' (see `tokensparse methods`)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method setting, repeatable (e.g. --set budget=0.25)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--model", help="local HF model directory (default: the bundled SmolLM2)")
    s.add_argument("--telemetry", action="store_true", help="report density, kept dense attention mass and attention-output error")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("calibrate", help="run a method's offline calibration and save its profile "
                       "(default: Token Sparse Attention's Representation Drift)")
    s.add_argument("--method", default="token_sparse", help="the method to calibrate (default: token_sparse)")
    s.add_argument("--model", help="local HF model directory (default: the bundled SmolLM2)")
    s.add_argument("--tokens", type=int, default=8192, help="length of the calibration prompt")
    s.add_argument("--text", help="plain-text file to calibrate on (default: the bundled King James Bible)")
    s.add_argument("--out", help="profile path (default: the user cache, where lookups find it)")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("sinks", help="attention sinks per layer/head on a text (first-token and secondary sinks)")
    s.add_argument("--tokens", type=int, default=2048, help="prompt length")
    s.add_argument("--text", help="plain-text file (default: the bundled King James Bible)")
    s.add_argument("--model", help="local HF model directory (default: the bundled SmolLM2)")
    s.add_argument("--primary", type=float, default=0.3, help="first-token sink threshold (Gu et al.'s epsilon)")
    s.add_argument("--secondary", type=float, default=0.05, help="secondary-sink threshold (head-mean score)")
    s.add_argument("--min-queries", type=int, default=32, help="queries that must see a key for it to count")
    s.add_argument("--min-lifetime", type=int, default=1, help="consecutive layers for a secondary sink")
    s.add_argument("--json", help="write the report as JSON")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_sinks)

    s = sub.add_parser("demo", help="pass key retrieval: dense vs the core methods on the bundled model")
    s.add_argument("--length", type=int, default=4096)
    s.add_argument("--depths", type=int, default=3)
    s.add_argument("--placement", choices=("inside", "after", "both"), default="both",
                   help="question placement for the eviction methods")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="also write all rows as JSON")
    s.add_argument("--extended", action="store_true", help="add the configurations the speed benchmarks report")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="speed benchmarks (prefill, decode, attention-only, executors on random tensors)")
    s.add_argument("what", choices=("prefill", "decode", "attention", "executors", "context-parallel"))
    s.add_argument("--lengths", help="comma-separated context lengths (default 8192; executors: 2048,4096,8192)")
    s.add_argument("--repeats", type=int, help="interleaved timing rounds (default 3; executors: 5)")
    s.add_argument("--densities", help="executors and context-parallel: comma-separated kept shares in (0, 1] "
                                         "(default 0.1,0.25,0.5; context-parallel: 1,0.25,0.1)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; an unavailable device is an error")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and activations (executors: the random tensors); default fp32")
    s.add_argument("--model-config", metavar="NAME",
                   help="benchmark a named model shape with random weights instead of the bundled model "
                        "(llama-3.1-8b, llama-3.2-1b, qwen3-8b, smollm2-135m; prompts are random token ids); "
                        "executors: take the attention shape (heads, head size) from it")
    s.add_argument("--layers", type=int, help="with --model-config: keep only the first N decoder layers")
    s.add_argument("--seed", type=int, default=0, help="seed of random weights, random prompts and random tensors")
    s.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    s.add_argument("--methods", help="prefill/attention only: comma-separated method names whose configurations run "
                                     "(default: all of tokensparse.bench.prefill.CONFIGS)")
    s.add_argument("--variants", help="decode, prefill, attention: a JSON file listing {label, method, config} "
                                      "objects to time instead of the default configurations")
    s.add_argument("--no-dynamic", action="store_true", help="decode with --variants: leave out dense DynamicCache")
    s.add_argument("--warm-state", action="store_true",
                   help="decode only: methods that keep state with the cache (page summaries, key shadows) build it "
                        "in one untimed step before the timed rounds (steady-state steps; the build time is "
                        "reported as state_build_s), instead of in the first timed step of every round")
    s.add_argument("--static", metavar="MODES",
                   help="decode only: also time static-shape decode (tokensparse.engine.static) for dense and every "
                        "variant it supports (share budgets resolved at the prompt length); comma-separated modes "
                        "of eager, compile (fullgraph) and reduce-overhead (compiled with CUDA graphs)")
    s.add_argument("--ranks", type=int, default=2, help="context-parallel only: gloo ranks on this machine, one "
                                                         "thread each (default 2)")
    s.add_argument("--block", type=int, default=64, help="context-parallel only: block size of the sparse variants")
    s.add_argument("--json", help="write results as JSON")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_bench)

    from tokensparse.eval.commands import add_commands

    add_commands(sub)  # eval, report
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
