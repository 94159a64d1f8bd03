"""Per-configuration accuracy and answer log-likelihood (paired with dense on the same samples)
of a results file: ``.venv/bin/python docs/results/decode_family/summarize.py FILE.jsonl``."""

import collections
import json
import sys


def label(r):
    cfg = {k: v for k, v in r.get("config", {}).items() if k != "method"}
    return r["method"] if r["method"] == "dense" else f"{r['method']} {json.dumps(cfg, sort_keys=True)}"


def main(path):
    rows = [r for r in (json.loads(line) for line in open(path)) if "error" not in r]
    key = lambda r: r["sample_id"]  # noqa: E731
    dense = {key(r): r for r in rows if r["method"] == "dense"}
    groups = collections.defaultdict(list)
    for r in rows:
        groups[label(r)].append(r)
    print(f"{'configuration':<100} correct  mean Δ answer log-lik vs dense (nats)  misses (depth)")
    for name, rs in groups.items():
        ok = sum(bool(r["correct"]) for r in rs)
        deltas = [r["answer_loglik"] - dense[key(r)]["answer_loglik"] for r in rs if key(r) in dense]
        mean = sum(deltas) / len(deltas) if deltas else float("nan")
        misses = [r.get("depth") for r in rs if not r["correct"]]
        print(f"{name:<100} {ok:>3}/{len(rs):<3} {mean:+8.2f}  {misses}")


if __name__ == "__main__":
    main(sys.argv[1])
