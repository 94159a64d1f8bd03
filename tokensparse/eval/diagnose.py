"""Why a method loses: where the gold answer's probability goes, step by step and layer by layer.

For each sample, every configuration scores the gold answer on the decode path (prefill with the
placement rules, then the answer one token per step, :mod:`tokensparse.eval.scoring`) while a
:class:`SelectionTrace` records, for every attention call of the answer's decode steps:

* which keys the method let the step attend to, and from that the share of the gold needle's
  prompt tokens among them ("needle in selection"; 1.0 for dense attention);
* for TokenSelect with a Selection Cache, whether the step reused the previous step's selection
  (read from the session's ``reuse`` counter, which the method increments on a hit).

For eviction methods the cache itself is inspected after the prefill: the share of the needle's
tokens each layer still holds. Per answer token, the log-probability under the method minus dense
attention's tells *where in the answer* the loss happens.

Run it from the command line (it writes ``diagnosis.json`` and ``diagnosis.md``)::

    python -m tokensparse.eval.diagnose --out docs/results/diagnosis --tasks long_answer,multikey,needle_uuid \\
        --lengths 2048 --samples 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import tokensparse as ts

from . import tasks as task_lib
from .harness import encode_sample, kept_positions, prefill
from .scoring import answer_target, teacher_force

__all__ = ["SelectionTrace", "trace_sample", "CONFIGS", "run", "render", "main"]

#: (name, method factory, placement): the configurations the diagnosis compares with dense
CONFIGS = [
    ("token_select θ=0.8", lambda: ts.methods.get("token_select")(budget=0.25, n_sink=128, n_local=256,
                                                                   reuse_threshold=0.8), "inside"),
    ("token_select no cache", lambda: ts.methods.get("token_select")(budget=0.25, n_sink=128, n_local=256), "inside"),
    ("snapkv 50% inside", lambda: ts.methods.get("snapkv")(budget=0.5), "inside"),
    ("snapkv 50% after", lambda: ts.methods.get("snapkv")(budget=0.5), "after"),
]

#: answer positions (1-based) grouped for the tables
BUCKETS = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 10**9)]


def _bucket(pos: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= pos <= hi:
            return f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f"{lo}+")
    raise ValueError(pos)


class SelectionTrace(ts.Telemetry):
    """A telemetry that only records what each decode step selected (no attention statistics):
    ``records`` holds ``{"layer", "step", "needle_in_selection", "reused"}`` per call with one query."""

    def __init__(self, needle: list[int]):
        super().__init__()
        self.needle = torch.tensor(sorted(needle), dtype=torch.long)
        self.step = -1  # set by the caller before each decode step
        self._reuse_seen = 0

    def observe(self, call, selection) -> None:
        if call.q_len != 1 or self.step < 0:
            return
        reused_now = call.session.stats.get("reuse", 0)
        reused = reused_now > self._reuse_seen
        self._reuse_seen = reused_now
        if selection.kind == "dense" or selection.idx is None:
            share = 1.0
        else:
            held = selection.mask(call.k_len)[0]  # (H, L) of the first (only) sequence
            needle = self.needle[self.needle < call.k_len].to(held.device)
            share = float(held[:, needle].float().mean()) if needle.numel() else float("nan")
        self.records.append({"layer": call.layer_idx, "step": self.step, "needle_in_selection": share,
                             "reused": reused})


@torch.no_grad()
def trace_sample(model, tokenizer, sample, method=None, placement: str = "inside") -> dict:
    """Score ``sample``'s gold answer on the decode path under ``method`` and trace it (see the module doc)."""
    if method is not None and method.phase == "prompt":
        raise ValueError(f"{method.name} is a prompt step: it selects nothing inside attention, there is nothing to trace")
    ctx, q = encode_sample(tokenizer, sample)
    ans = torch.tensor([tokenizer(answer_target(sample), add_special_tokens=False).input_ids])
    needle = task_lib.needle_token_positions(sample, tokenizer)
    trace = SelectionTrace(needle)
    sparsify = ts.sparsify(model, method, telemetry=trace) if method is not None else None
    session = sparsify.__enter__() if sparsify is not None else None
    try:
        kv = session.new_cache() if session is not None else ts.KVCache(model)
        out = prefill(model, ctx, q, kv, placement)
        held = None
        kept = kept_positions(kv)
        if kept is not None:
            nd = torch.tensor(needle)
            held = [float(sum(torch.isin(nd, h).float().mean() for h in heads) / len(heads)) for heads in kept]

        def tag(t: int) -> None:
            trace.step = t  # decode step t predicts answer token t + 1 (1-based)

        scored = teacher_force(model, kv, out.logits[0, -1], ans, before_step=tag)
        stats = dict(session.stats) if session is not None else {}
    finally:
        if sparsify is not None:
            sparsify.__exit__(None, None, None)
    logp = scored.token_logprobs
    pred = scored.logits.argmax(-1)
    return {"token_logprobs": [float(x) for x in logp], "top1_is_gold": [bool(x) for x in (pred == ans[0])],
            "records": trace.records, "needle_held_per_layer": held, "stats": stats,
            "answer_tokens": int(ans.shape[1]), "needle_tokens": len(needle)}


def run(model, tokenizer, task_names, lengths, samples: int, seed: int = 0, progress=print,
        configs=None) -> dict:
    """Trace dense and every configuration (default :data:`CONFIGS`; ``(name, factory, placement)``
    entries whose names contain "θ" / "snapkv" are read as such by :func:`render`) on ``samples``
    samples per (task, length)."""
    configs = CONFIGS if configs is None else configs
    out = {"configs": [c[0] for c in configs], "samples": []}
    for task in task_names:
        for length in lengths:
            for s in task_lib.make_samples(task, tokenizer, length, n=samples, seed=seed):
                t0 = time.perf_counter()
                entry = {"task": task, "length": length, "sample_id": s.sample_id,
                         "corpus": s.metadata.get("corpus"), "runs": {}}
                entry["runs"]["dense"] = trace_sample(model, tokenizer, s)
                for name, make, placement in configs:
                    entry["runs"][name] = trace_sample(model, tokenizer, s, make(), placement)
                out["samples"].append(entry)
                progress(f"{s.sample_id}: {time.perf_counter() - t0:.1f}s")
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def _f(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def render(data: dict) -> str:
    """Markdown tables of a :func:`run` result."""
    samples = data["samples"]
    cells = sorted({(s["task"], s["length"]) for s in samples})
    lines = [f"{len(samples)} samples: " + ", ".join(f"{t} L={n}" for t, n in cells) + ".\n"]
    # 1. by answer position
    lines += ["### By answer position (all samples)\n",
              "Δ logprob: the gold token's log-probability under the configuration minus dense's, mean over "
              "samples (nats). Needle in selection: share of the needle's prompt tokens that the step's attention "
              "could read, mean over layers and samples. Reuse: share of (layer, step) calls that reused the "
              "previous step's selection. Position 1 is predicted by the prefill.\n",
              "| configuration | " + " | ".join(f"pos {_bucket(lo)}" for lo, _ in BUCKETS) + " |",
              "|---|" + "--:|" * len(BUCKETS)]
    for name in data["configs"]:
        cells = []
        for lo, hi in BUCKETS:
            dl, needle, reuse = [], [], []
            for s in samples:
                d, r = s["runs"]["dense"], s["runs"][name]
                for i in range(len(r["token_logprobs"])):
                    if lo <= i + 1 <= hi:
                        dl.append(r["token_logprobs"][i] - d["token_logprobs"][i])
                for rec in r["records"]:
                    if lo <= rec["step"] + 1 <= hi:
                        needle.append(rec["needle_in_selection"])
                        reuse.append(float(rec["reused"]))
            if not dl:
                cells.append("—")
                continue
            txt = f"Δ {_f(_mean(dl))}"
            if needle and "snapkv" not in name:
                txt += f"; needle {_f(_mean(needle))}"
            if reuse and "θ" in name:
                txt += f"; reuse {_f(_mean(reuse))}"
            cells.append(txt + f" (n={len(dl)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # 2. per task: answer log-likelihood and exact greedy-on-gold agreement
    lines += ["", "### Per task and length\n",
              "Answer log-likelihood (decode path, nats, mean over samples) and the share of answer tokens that "
              "are the argmax under teacher forcing (top-1 = gold).\n",
              "| task | L | dense | " + " | ".join(data["configs"]) + " |", "|---|--:|--:|" + "--:|" * len(data["configs"])]
    cells_by = defaultdict(list)
    for s in samples:
        cells_by[(s["task"], s["length"])].append(s)
    for (task, length), ss in sorted(cells_by.items()):
        row = [task, str(length)]
        for name in ["dense", *data["configs"]]:
            ll = _mean([sum(s["runs"][name]["token_logprobs"]) for s in ss])
            top1 = _mean([_mean([float(x) for x in s["runs"][name]["top1_is_gold"]]) for s in ss])
            row.append(f"{_f(ll, '.1f')} ({_f(100 * top1, '.0f')}%)")
        lines.append("| " + " | ".join(row) + " |")
    # 3. per layer
    layers = sorted({rec["layer"] for s in samples for rec in s["runs"][data["configs"][0]]["records"]})
    lines += ["", "### Per layer\n",
              "TokenSelect: share of the needle in the step's selection, mean over answer steps and samples (for θ=0.8 "
              "split into steps that reused the previous selection / made a fresh one), and the reuse rate. SnapKV: "
              "share of the needle's tokens the layer still holds after the prefill's eviction.\n",
              "| layer | θ=0.8 needle (reused / fresh) | θ=0.8 reuse rate | no cache needle | SnapKV inside held | SnapKV after held |",
              "|--:|--:|--:|--:|--:|--:|"]
    for layer in layers:
        def recs(name):
            return [rec for s in samples for rec in s["runs"][name]["records"] if rec["layer"] == layer]
        th = recs("token_select θ=0.8")
        nc = recs("token_select no cache")
        reused = _mean([r["needle_in_selection"] for r in th if r["reused"]])
        fresh = _mean([r["needle_in_selection"] for r in th if not r["reused"]])
        held = {}
        for name in ("snapkv 50% inside", "snapkv 50% after"):
            held[name] = _mean([s["runs"][name]["needle_held_per_layer"][layer] for s in samples
                                if s["runs"][name]["needle_held_per_layer"]])
        lines.append(f"| {layer} | {_f(reused)} / {_f(fresh)} | {_f(_mean([float(r['reused']) for r in th]))} "
                     f"| {_f(_mean([r['needle_in_selection'] for r in nc]))} | {_f(held['snapkv 50% inside'])} "
                     f"| {_f(held['snapkv 50% after'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokensparse.eval.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for diagnosis.json and diagnosis.md")
    p.add_argument("--tasks", default="multikey,long_answer")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="a local HF model directory (default: the bundled SmolLM2)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    task_names = [t for t in a.tasks.split(",") if t]
    for t in task_names:
        if t not in task_lib.TASKS:
            p.error(f"unknown task {t!r}")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    model, tok = ts.load_model(a.model) if a.model else ts.load_model()
    data = run(model, tok, task_names, lengths, a.samples, a.seed,
               progress=lambda m: print(m, file=sys.stderr, flush=True))
    data["command"] = "python -m tokensparse.eval.diagnose " + " ".join(argv if argv is not None else sys.argv[1:])
    data["threads"] = torch.get_num_threads()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(data))
    (out / "diagnosis.md").write_text(render(data))
    print(out / "diagnosis.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
