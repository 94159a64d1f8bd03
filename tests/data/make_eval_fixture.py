"""Write tests/data/eval_results.jsonl: a small *synthetic* results file in the runner's row
schema, for the report tests (no model is run; the numbers are made up but plausible: dense
near-perfect, eviction weaker with the question after the context, latency growing with length).

    .venv/bin/python tests/data/make_eval_fixture.py
"""

import hashlib
import json
import random
from pathlib import Path

GROUPS = [  # method, settings, placement, accuracy, prefill factor, decode factor, kv factor, density, mass
    ("dense", {}, "inside", 0.97, 1.00, 1.00, 1.00, None, None),
    ("dense", {}, "after", 0.97, 1.02, 1.00, 1.00, None, None),
    ("snapkv", {"budget": 0.25}, "inside", 0.85, 1.05, 0.45, 0.26, 0.27, 0.81),
    ("snapkv", {"budget": 0.25}, "after", 0.45, 1.06, 0.45, 0.26, 0.27, 0.62),
    ("snapkv", {"budget": 0.5}, "after", 0.70, 1.06, 0.65, 0.51, 0.52, 0.78),
    ("streaming_llm", {"budget": 0.25}, "after", 0.30, 1.01, 0.42, 0.26, 0.26, 0.55),
    ("token_select", {"budget": 0.25, "n_local": 256, "n_sink": 128}, "inside", 0.90, 1.00, 0.55, 1.00, 0.30, 0.93),
    ("token_sparse", {"coverage": 0.005}, "inside", 0.93, 0.70, 1.00, 1.00, 0.55, 0.99),
]
SAMPLES = [("passkey", L, d) for L in (1024, 4096) for d in (0.1, 0.5, 0.9)] + [
    ("niah_multikey", L, None) for L in (1024, 4096)]
ENV = {"versions": {"python": "3.11.7", "tokensparse": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0"},
       "git": {"commit": "0000000000000000000000000000000000000000", "dirty": False}, "torch_threads": 2,
       "hardware": {"cpu": "AMD EPYC (synthetic fixture)", "cpu_count": 2, "platform": "Linux", "device": "cpu"},
       "command": "tokensparse eval --suite fixture --out results"}


def main(path=Path(__file__).with_name("eval_results.jsonl")):
    rng = random.Random(0)
    rows = []
    for task, L, depth in SAMPLES:
        for method, settings, placement, acc, pf, df, kf, dens, mass in GROUPS:
            label = method + (f"({', '.join(f'{k}={v}' for k, v in sorted(settings.items()))})" if settings else "")
            config = {"method": method, **settings}
            key = hashlib.sha256(json.dumps([task, L, depth, label, placement]).encode()).hexdigest()[:20]
            # needles in the middle are lost first by the eviction methods
            p = acc - (0.3 if depth == 0.5 and method in ("snapkv", "streaming_llm") else 0) - 0.1 * (L // 4096)
            score = float(rng.random() < p)
            prompt = L + rng.randint(-10, 10)
            prefill_s = round(0.9 * (prompt / 1024) ** 1.45 * pf * rng.uniform(0.95, 1.05), 4)
            decode_ms = round(28 * (prompt / 1024) ** 0.6 * df * rng.uniform(0.95, 1.05), 3)
            # per-layer telemetry: early layers exact, error growing with depth; eviction loses needle tokens
            per_layer = None if dens is None else {
                str(i): {"density": dens, "mass": mass, "error": round((1 - mass) * i / 3, 4), "calls": 1}
                for i in range(4)}
            needle = (None if method not in ("snapkv", "streaming_llm") or depth is None else
                      [round(min(1.0, dens * (1.5 + 0.3 * i)), 3) for i in range(4)])
            rows.append({
                "key": key, "suite": "fixture", "run_id": "fixture-run", "time": "2026-01-01T00:00:00+00:00",
                "model": {"fingerprint": "0123456789abcdef", "path": "SmolLM2-135M-Instruct", "dtype": "float32"},
                "method": method, "label": label, "config": config, "placement": placement, "task": task,
                "task_options": {}, "length": L, "depth": depth, "seed": 0, "index": 0,
                "sample_id": f"{task}-L{L}-d{depth}-s0-0", "needle_depth": depth, "prompt_tokens": prompt,
                "answers": ["12345"], "prediction": " 12345." if score else " 54321.", "metric": "all",
                "score": score, "correct": bool(score), "new_tokens": 8,
                "prefill_s": prefill_s, "decode_ms_per_token": decode_ms,
                "attention_prefill_s": round(prefill_s * (0.4 if pf == 1 else 0.25), 4),
                "attention_decode_ms_per_token": round(decode_ms * 0.3, 3),
                "memory": {"peak_rss_bytes": 900 * 2**20 + int(prompt * 30 * 2 * 3 * 64 * 4 * kf),
                           "rss_start_bytes": 880 * 2**20, "scope": "block"},
                "kv_bytes": int(prompt * 30 * 2 * 3 * 64 * 4 * kf), "stats": {},
                "telemetry": None if dens is None else {
                    "density": dens, "mass": mass, "error": round((1 - mass) / 2, 4), "layers_observed": 4,
                    "per_layer": per_layer},
                "needle_retention": None if needle is None else {
                    "mean": sum(needle) / 4, "min": min(needle), "per_layer": needle},
                "answer_loglik": round(-0.5 - 8 * (1 - p) * rng.random(), 3), "answer_tokens": 6,
                "loglik_target": " 12345",
                "fidelity": None if method == "dense" else {"kl": round(2 * (1 - p) * rng.random(), 4),
                                                            "kl_max": 1.0, "top1": round(p, 2), "positions": 6},
                "loadavg": [2.1, 2.0, 1.9], "env": ENV,
            })
    rows.append({**rows[-1], "key": "failed-run", "error": "ValueError: token_select: budget too small",
                 "label": "token_select(budget=16)", "config": {"method": "token_select", "budget": 16}})
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
