"""Context-parallel prefill benchmark: time and bytes exchanged vs density, ranks on one machine.

    tokensparse bench context-parallel --ranks 2 --lengths 8192 --densities 1,0.25,0.1 --repeats 3 \\
        --json docs/results/context_parallel/cp_8k.json
    (or python -m tokensparse.bench.context_parallel with the same options)

Every rank loads the bundled model (fp32) and runs one torch thread; the ranks talk over ``gloo``
on this machine. Each round runs, interleaved: dense ring attention over the ranks; block-sparse
context parallelism at every density; and, on rank 0 while the other ranks wait, the single-process
baselines — the model's own SDPA prefill with 1 thread and with as many threads as there are ranks
(the same cores as the context-parallel run), and the block-sparse prefill on one rank (the same
code with ``single=True``). A context-parallel time is the slowest rank's (a barrier before each
run). The prompt is the pass key prompt (needle at ``--depth``); after timing, each variant's first
``8`` greedy tokens (decoded on rank 0 from the gathered cache) are checked for the key, and its
last-position logits are compared with the single-process run of the same attention.

Bytes are what crossed the process group in the attention layers (all layers, all ranks):
key/value blocks on the ring, plus the pooled keys and block-need bits of the sparse variants.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import save_json, spread

STEPS_GREEDY = 8


def _prompt(tokenizer, length: int, depth: float):
    from tokensparse.eval import tasks
    from tokensparse.eval.harness import encode_sample

    sample = tasks.passkey(tokenizer, length, depth=depth)
    ctx, q = encode_sample(tokenizer, sample)
    return torch.cat([ctx, q], dim=1), sample.answers[0]


def _greedy(model, cache, first: torch.Tensor, steps: int) -> list[int]:
    out, tok = [], first
    for _ in range(steps):
        out.append(int(tok))
        tok = model(input_ids=tok.view(1, 1), cache=cache).logits[0, -1].argmax()
    return out


@torch.no_grad()
def _rank(rank: int, world: int, lengths, densities, repeats: int, block: int, depth: float) -> dict:
    import torch.distributed as dist

    import tokensparse as ts
    from tokensparse.engine.context_parallel import BlockSparsity, context_parallel

    model, tokenizer = ts.load_model()
    model.eval()
    rows = []
    for length in lengths:
        ids, key = _prompt(tokenizer, length, depth)
        variants = [("cp dense", None)] + [(f"cp sparse {d:g}", BlockSparsity(density=d, block=block)) for d in densities]
        singles = [("single sdpa 1 thread", "sdpa", 1), (f"single sdpa {world} threads", "sdpa", world)]
        singles += [(f"single sparse {d:g}", BlockSparsity(density=d, block=block), 1) for d in densities]
        times = {name: [] for name, *_ in variants + singles}
        stats, last = {}, {}

        def cp_once(name, sparsity, keep=False):
            dist.barrier()
            t0 = time.perf_counter()
            with context_parallel(model, sparsity=sparsity) as run:
                res = run.prefill(ids)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if keep:  # (outside the context: the model decodes with its own attention)
                stats[name] = res.stats.as_dict()
                last[name] = run.last_logits(res)
                cache = run.gather_cache(res)
                if rank == 0:
                    stats[name]["greedy"] = _greedy(model, cache, last[name][0].argmax(), STEPS_GREEDY)
            return float(elapsed)

        def single_once(name, what, threads, keep=False):
            dist.barrier()
            t = None
            if rank == 0:
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                if what == "sdpa":
                    res = model(input_ids=ids, use_cache=True)
                    logits, cache = res.logits, res.cache
                else:
                    with context_parallel(model, sparsity=what, single=True) as run:
                        res = run.prefill(ids)
                    logits, cache = res.logits, res.cache
                t = time.perf_counter() - t0
                torch.set_num_threads(1)
                if keep:
                    last[name] = logits[:, -1]
                    stats[name] = {"greedy": _greedy(model, cache, logits[0, -1].argmax(), STEPS_GREEDY)}
            dist.barrier()
            return t

        # untimed first pass: warm-up, and the outputs/stats the rows report
        for name, sparsity in variants:
            cp_once(name, sparsity, keep=True)
        for name, what, threads in singles:
            single_once(name, what, threads, keep=True)
        for _ in range(repeats):
            for name, sparsity in variants:
                times[name].append(cp_once(name, sparsity))
            for name, what, threads in singles:
                times[name].append(single_once(name, what, threads))
        # sum the exchanged bytes over ranks
        for name, _ in variants:
            totals = torch.tensor([stats[name]["bytes_sent"], stats[name]["bytes_pooled"],
                                   stats[name]["comm_seconds"], stats[name]["attention_seconds"]], dtype=torch.float64)
            summed, peak = totals.clone(), totals.clone()
            dist.all_reduce(summed)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            stats[name].update(bytes_sent_all_ranks=int(summed[0]), bytes_pooled_all_ranks=int(summed[1]),
                               comm_seconds_max_rank=float(peak[2]), attention_seconds_max_rank=float(peak[3]))
        if rank != 0:
            continue
        base1 = spread(times["single sdpa 1 thread"])["median"]
        basew = spread(times[f"single sdpa {world} threads"])["median"]
        decode = tokenizer.decode
        for name, *rest in variants + singles:
            s = spread(times[name])
            st = stats.get(name, {})
            ref = "single sdpa 1 thread" if name == "cp dense" else name.replace("cp ", "single ")
            if name.startswith("single"):
                ref = None
            text = decode(st["greedy"]) if "greedy" in st else None
            rows.append({
                "length": int(ids.shape[1]), "variant": name, "ranks": world if name.startswith("cp") else 1,
                "seconds": s, "speedup_vs_single_1_thread": base1 / s["median"],
                f"speedup_vs_single_{world}_threads": basew / s["median"],
                "answer": text, "correct": None if text is None else key in text,
                "last_logits_max_diff_vs_single": (None if ref is None else
                                                   float((last[name] - last[ref]).abs().max())),
                **{k: v for k, v in st.items() if k != "greedy"},
            })
    return {"rows": rows}


def run(ranks: int, lengths, densities, repeats: int = 3, block: int = 64, depth: float = 0.5) -> dict:
    from tokensparse.bench import environment
    from tokensparse.engine.context_parallel import launch

    results = launch(_rank, ranks, list(lengths), list(densities), repeats, block, depth, threads=1)
    return {"env": environment("cpu", torch.float32), "kind": "context-parallel prefill", "ranks": ranks,
            "threads_per_rank": 1, "block": block, "depth": depth, "results": results[0]["rows"]}


def format_table(result: dict) -> str:
    w = result["ranks"]
    lines = [f"| L | variant | s (median, min–max) | × single 1 thr | × single {w} thr | density | MB sent (all ranks) "
             "| comm s (max rank) | answer ok | max Δ last logits vs single |", "|" + "---|" * 10]
    for r in result["results"]:
        s = r["seconds"]
        mb = r.get("bytes_sent_all_ranks")
        mb = "" if mb is None else f"{(mb + r.get('bytes_pooled_all_ranks', 0)) / 1e6:.1f}"
        dens = r.get("density")
        diff = r["last_logits_max_diff_vs_single"]
        comm = r.get("comm_seconds_max_rank")
        lines.append(
            f"| {r['length']} | {r['variant']} | {s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f}) | "
            f"{r['speedup_vs_single_1_thread']:.2f} | {r[f'speedup_vs_single_{w}_threads']:.2f} | "
            f"{'' if dens is None else f'{dens:.2f}'} | {mb} | {'' if comm is None else f'{comm:.2f}'} | "
            f"{r['correct']} | {'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokensparse.bench.context_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--lengths", default="8192")
    p.add_argument("--densities", default="1,0.25,0.1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        densities = [float(x) for x in args.densities.split(",")]
    except ValueError as e:
        print(f"error: --lengths/--densities: {e}", file=sys.stderr)
        return 2
    if args.ranks < 2:
        print("error: --ranks must be at least 2", file=sys.stderr)
        return 2
    result = run(args.ranks, lengths, densities, args.repeats, args.block, args.depth)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
