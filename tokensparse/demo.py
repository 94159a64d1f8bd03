"""The main demo: pass key retrieval at ~4K tokens over several depths, dense vs the core methods.

Every method runs on the same prompts in the same process, with the dense baseline first, and is
reported with accuracy, prefill seconds, decode ms/token and the KV bytes held after generation.
Eviction methods are run with the question inside the compressed prompt and after it (the
question is then fed as a second chunk on the compressed cache), so the comparison is explicit.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

import tokensparse as ts
from tokensparse.eval import tasks
from tokensparse.eval.harness import run_sample


@dataclass(frozen=True)
class Entry:
    label: str
    method: str | None  # None = dense
    kwargs: tuple = ()
    placement: str = "inside"

    def build(self):
        return None if self.method is None else ts.methods.get(self.method)(**dict(self.kwargs))


def default_entries(placements=("inside", "after")) -> list[Entry]:
    """Dense, Token Sparse (paper defaults), TokenSelect (25% budget), SnapKV/StreamingLLM (50% KV)."""
    entries = [
        Entry("dense", None),
        Entry("token_sparse", "token_sparse"),
        Entry("token_select@25%", "token_select", (("budget", 0.25), ("n_sink", 128), ("n_local", 256))),
    ]
    for name in ("snapkv", "streaming_llm"):
        for p in placements:
            entries.append(Entry(f"{name}@50% (q {p})", name, (("budget", 0.5),), p))
    return entries


def depths_grid(n: int) -> list[float]:
    if n < 1:
        raise ValueError(f"need at least one depth, got {n}")
    if n == 1:
        return [0.5]
    return [round(0.05 + 0.9 * i / (n - 1), 3) for i in range(n)]


def run(length: int = 4096, n_depths: int = 4, placements=("inside", "after"), seed: int = 0,
        entries: list[Entry] | None = None, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the comparison and return ``{"env": ..., "rows": [...], "summary": [...]}``."""
    from tqdm.auto import tqdm

    if model is None:
        model, tokenizer = ts.load_model()
    entries = entries or default_entries(placements)
    samples = tasks.passkey_grid(tokenizer, [length], depths_grid(n_depths), seed=seed)
    rows = []
    bar = tqdm(total=len(samples) * len(entries), desc="passkey", disable=not progress, unit="run")
    for sample in samples:
        for e in entries:
            bar.set_postfix_str(f"depth {sample.depth:.2f} {e.label}")
            r = run_sample(model, tokenizer, sample, e.build(), placement=e.placement)
            rows.append(
                {
                    "label": e.label, "method": e.method or "dense", "config": dict(e.kwargs),
                    "placement": e.placement, "depth": sample.depth, "sample_id": sample.sample_id,
                    "answer": sample.answers[0], "prediction": r.prediction, "correct": r.correct,
                    "prompt_tokens": r.prompt_tokens, "prefill_s": r.prefill_s,
                    "decode_ms_per_token": r.decode_ms_per_token, "kv_bytes": r.kv_bytes, "stats": r.stats,
                }
            )
            bar.update(1)
    bar.close()
    return {"env": environment(), "length": length, "seed": seed, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        out.append(
            {
                "label": label,
                "correct": sum(r["correct"] for r in rs),
                "n": len(rs),
                "prefill_s": statistics.median(r["prefill_s"] for r in rs),
                "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rs),
                "kv_mib": statistics.median(r["kv_bytes"] for r in rs) / 2**20,
            }
        )
    return out


def format_table(summary: list[dict]) -> str:
    head = f"{'method':<30} {'correct':>8} {'prefill s':>10} {'decode ms/tok':>14} {'KV MiB':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(
            f"{s['label']:<30} {s['correct']:>4}/{s['n']:<3} {s['prefill_s']:>10.2f} "
            f"{s['decode_ms_per_token']:>14.1f} {s['kv_mib']:>8.1f}"
        )
    return "\n".join(lines)


def environment() -> dict:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensparse": ts.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "dtype": "float32",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
