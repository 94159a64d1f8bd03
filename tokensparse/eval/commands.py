"""The ``tokensparse eval`` and ``tokensparse report`` subcommands.

``cli.py`` registers them with ``add_commands(sub)``; each parser sets ``func(args) -> int``.

    tokensparse eval --suite smoke --out results                 # a few minutes on 2 cores
    tokensparse eval --suite standard --threads 2 --out results    # v2: ~100 min + ~25 min of kvpress peers
    tokensparse eval --suite passkey --threads 2 --out results     # the v1 suite (pass key + multi-key)
    tokensparse eval --config grid.json --set lengths=[1024] --set seeds=[0,1] --out results
    tokensparse eval --suite standard --skip-peers --out results  # without the kvpress peers
    tokensparse eval --suite standard --ray --ray-workers 4 --threads 1 --out results   # samples on Ray
    tokensparse report --results results --out results/report [--bench decode.json]

``--ray [ADDRESS]`` runs the grid's samples as Ray tasks (:mod:`tokensparse.eval.distributed`):
without an address on a private local Ray instance of ``--ray-workers`` × ``--threads`` CPUs, with
one (``auto``, ``ray://host:10001``) on an existing cluster. Each worker loads the model once
(``--model`` must then exist at the same path on every node); ``--threads`` is per worker (default:
the config's, else 1). The rows are those of a serial run with the same ``--threads``, up to
:data:`tokensparse.eval.runner.VOLATILE_FIELDS` (times, memory, ``env``), appended in completion
order, and resume works the same way; peers run in the driver afterwards. Ray is an optional extra:
``pip install 'tokensparse[ray]'``.
"""

from __future__ import annotations

import json
import shlex
import sys


def add_commands(subparsers) -> None:
    """Register ``eval`` and ``report`` on an ``argparse`` subparsers object."""
    from .grid import suite_names

    s = subparsers.add_parser(
        "eval", help="run an evaluation grid (a built-in suite or a JSON config); results are appended as JSONL",
        description="Run methods × configs × tasks × lengths × depths × seeds × placements, dense always "
                    "included. Rows already in the results file are skipped, so an interrupted run resumes.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--suite", choices=suite_names(), help="a built-in grid (tokensparse/eval/suites/)")
    src.add_argument("--config", metavar="FILE", help="a JSON grid config (format: tokensparse/eval/grid.py)")
    s.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE",
                   help="override a config key, repeatable; dotted paths and JSON values, e.g. lengths=[1024], "
                        "tasks.0.depths=[0.5], methods.0.configs=[{\"budget\":0.1}], telemetry=false")
    s.add_argument("--out", default="results", metavar="DIR",
                   help="directory of the results file <DIR>/<grid name>.jsonl, or a .jsonl path (default: results)")
    s.add_argument("--threads", type=int, help="torch threads (default: the config's, else torch's default)")
    s.add_argument("--model", help="local HF model directory (default: the bundled SmolLM2)")
    s.add_argument("--skip-peers", action="store_true",
                   help="run no peer library (the grid's 'peers', e.g. kvpress); they are reported as skipped. "
                        "Without it a grid with peers needs their environment (make kvpress-env)")
    s.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the samples as Ray tasks: alone, on a local Ray instance of --ray-workers × --threads "
                        "CPUs; with an ADDRESS (auto, ray://host:10001), on that cluster. Each worker loads the model "
                        "once; same rows as a serial run with the same --threads. Needs: pip install 'tokensparse[ray]'")
    s.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray workers (model copies), with --ray (default: 2)")
    s.add_argument("--dry-run", action="store_true", help="print the grid and exit without loading the model")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("report", help="Markdown summary and PNG plots from eval results",
                              description="Turn result JSONL files into report.md and PNG plots "
                                          "(the dense rows are the reference).")
    r.add_argument("--results", required=True, nargs="+", metavar="DIR_OR_JSONL",
                   help="results directories (every *.jsonl inside) or .jsonl files")
    r.add_argument("--out", default="report", metavar="DIR", help="where report.md and the PNGs go (default: report)")
    r.add_argument("--no-plots", action="store_true", help="only the Markdown")
    r.add_argument("--bench", nargs="+", default=[], metavar="JSON",
                   help="benchmark JSON files (tokensparse bench ... --json): their speed-ups are shown next to the "
                        "accuracy rows of the same method configurations (exact config match)")
    r.set_defaults(func=cmd_report)


def _command_line(args) -> str:
    parts = ["tokensparse", "eval", *(["--suite", args.suite] if args.suite else ["--config", args.config])]
    for o in args.overrides or []:
        parts += ["--set", o]
    parts += ["--out", str(args.out)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.model:
        parts += ["--model", args.model]
    if getattr(args, "skip_peers", False):
        parts += ["--skip-peers"]
    if getattr(args, "ray", None) is not None:
        parts += ["--ray"] + ([] if args.ray == "local" else [args.ray])
        if args.ray_workers is not None:
            parts += ["--ray-workers", str(args.ray_workers)]
    return shlex.join(parts)


def cmd_eval(args) -> int:
    import torch

    from ..cli import check_model_arg, load_model_or_exit
    from .grid import ConfigError, apply_overrides, build_grid, load_config, load_suite
    from .peers.kvpress import KvpressEnvMissing
    from .runner import PeerSetupError, results_path, run_grid, shares_prefill

    # arguments first (``--threads 0`` is an error, not "the config's threads"), then the grid
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"tokensparse eval: --threads must be >= 1, got {args.threads}")
    use_ray = getattr(args, "ray", None) is not None
    if getattr(args, "ray_workers", None) is not None and not use_ray:
        raise SystemExit("tokensparse eval: --ray-workers needs --ray")
    if use_ray and args.ray_workers is not None and args.ray_workers < 1:
        raise SystemExit(f"tokensparse eval: --ray-workers must be >= 1, got {args.ray_workers}")
    check_model_arg(args.model, "eval")
    try:
        raw = load_suite(args.suite) if args.suite else load_config(args.config)
        grid = build_grid(apply_overrides(raw, args.overrides))
    except ConfigError as e:
        raise SystemExit(f"tokensparse eval: {e}") from None
    threads = args.threads if args.threads is not None else grid.threads  # (the grid's is validated by build_grid)
    if use_ray and threads is None:
        threads = 1  # per worker; torch's default (every core) in each of several workers would oversubscribe
    if threads is not None:
        torch.set_num_threads(threads)
    workers = (args.ray_workers or 2) if use_ray else None
    n_samples, n_runs = grid.size()
    path = results_path(args.out, grid)
    compute = (f"Ray ({'local' if args.ray == 'local' else args.ray}): {workers} workers × {threads} torch threads"
               if use_ray else f"{torch.get_num_threads()} torch threads")
    print(f"grid {grid.name!r}: {n_samples} samples × {len(grid.methods)} method runs = {n_runs} runs "
          f"-> {path} ({compute})")
    if grid.rope_scaling is not None:
        print(f"model loaded with rope_scaling {json.dumps(grid.rope_scaling)}")
    if grid.share_prefill:
        shared = [m.label for m in grid.methods if shares_prefill(m, grid)]
        print(f"share_prefill: one dense prefill per sample, shared by {', '.join(shared) or 'no method'}")
    skip_peers = args.skip_peers or grid.skip_peers
    if grid.peers:
        names = ", ".join(dict.fromkeys(p.peer for p in grid.peers))
        specs = grid.sample_specs()
        parts = " + ".join(f"{sum(p.covers(s) for s in specs)} samples × {len(p.runs)}" for p in grid.peers)
        if skip_peers:
            print(f"peers SKIPPED (--skip-peers or skip_peers): {parts} {names} runs = "
                  f"{grid.peer_size()} runs will not be run")
        else:
            print(f"peers: {parts} {names} runs = {grid.peer_size()} runs, "
                  "after the tokensparse runs, in their own environment (docs/peers.md)")
    if args.dry_run:
        for t in grid.tasks:
            options = f", options {t.options}" if t.options else ""
            print(f"  task {t.task}: lengths {t.lengths}, depths {t.depths}{options}")
        for m in grid.methods:
            print(f"  {m.label} [{m.placement}]")
        for r in grid.peer_runs():
            print(f"  {r.label} [{r.placement}] (kv kept {r.kv_kept_share:g}){' - skipped' if skip_peers else ''}")
        for i, p in enumerate(grid.peers):
            if p.lengths is not None:
                print(f"  (peers.{i} runs only on the samples of lengths {p.lengths})")
        return 0
    if use_ray:
        from .distributed import LocalModel, RayRunError, RayUnavailable, import_ray, run_grid_ray

        try:
            import_ray()  # before anything starts
            summary = run_grid_ray(LocalModel(args.model, grid.rope_scaling), grid, args.out,
                                   address=None if args.ray == "local" else args.ray, workers=workers,
                                   threads_per_worker=threads, progress=not args.no_progress,
                                   command=_command_line(args), skip_peers=skip_peers)
        except (RayUnavailable, RayRunError, KvpressEnvMissing, PeerSetupError) as e:
            raise SystemExit(f"tokensparse eval: {e}") from None
    else:
        model, tokenizer = load_model_or_exit(args.model, "eval", rope_scaling=grid.rope_scaling)
        try:
            summary = run_grid(model, tokenizer, grid, args.out, progress=not args.no_progress,
                               command=_command_line(args), skip_peers=skip_peers)
        except (KvpressEnvMissing, PeerSetupError) as e:
            raise SystemExit(f"tokensparse eval: {e}") from None
    print(f"{summary['ran']} runs written to {summary['path']} ({summary['skipped']} already there, "
          f"{summary['errors']} failed).")
    if summary.get("peers_skipped"):
        print(f"peers skipped (--skip-peers): {summary['peers_skipped']} peer runs were not run.")
    report_dir = shlex.quote(str(path.parent / "report"))
    print(f"report: tokensparse report --results {shlex.quote(summary['path'])} --out {report_dir}")
    return 1 if summary["errors"] else 0


def cmd_report(args) -> int:
    from .report import write_report

    try:
        md = write_report(args.results, args.out, plots=not args.no_plots, bench=args.bench)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"tokensparse report: {e}") from None
    print(f"report written to {md}", file=sys.stdout)
    return 0
