"""Compact tables of docs/results/standard (the ones quoted in the READMEs), from standard.jsonl.

    .venv/bin/python docs/results/standard/summarize.py [RESULTS.jsonl]

Paired differences vs dense on the same samples (tokensparse rows vs tokensparse dense; kvpress
rows vs kvpress's own dense), 95% percentile-bootstrap intervals (tokensparse.eval.stats.paired);
then the matched-budget comparison of tokensparse and kvpress at 2K, paired on the same samples.
"""

import json
from collections import defaultdict
from pathlib import Path

from tokensparse.eval.stats import paired

import sys

# another results file of the same suite (e.g. docs/results/part2/standard.jsonl) as the first argument
ROWS = [json.loads(line) for line in Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "standard.jsonl").open()]
SHORT = {
    ("snapkv", "inside"): "SnapKV 50% [inside]", ("snapkv", "after"): "SnapKV 50% [after]",
    ("streaming_llm", "after"): "StreamingLLM 50% [after]",
    ("token_select", "inside", None): "TokenSelect no cache [inside]",
    ("token_select", "inside", 0.8): "TokenSelect θ=0.8 [inside]",
    ("token_sparse", "inside"): "TokenSparse L20-29 [inside]",
    ("tidal_decode", "inside"): "TidalDecode 25% [inside]",
    ("tova", "inside"): "TOVA 50% [inside]",
}


def config(r):
    key = (r["method"], r["placement"])
    if r["method"] == "fast_v":  # two configurations in docs/results/part2
        return key + (r["config"].get("layer"), r["config"].get("pool_kernel", 1))
    return key + (r["config"].get("reuse_threshold"),) if r["method"] == "token_select" else key


def dense_of(r):
    return ("kvpress:dense", "after") if r["method"].startswith("kvpress:") else ("dense", "inside")


by = {(config(r), r["sample_id"]): r for r in ROWS}
groups = defaultdict(list)
for r in ROWS:
    if r["method"] not in ("dense", "kvpress:dense"):
        groups[config(r)].append(r)


def diffs(rs, field):
    out = []
    for r in rs:
        d = by.get((dense_of(r), r["sample_id"]))
        if d is not None and r.get(field) is not None and d.get(field) is not None:
            out.append(r[field] - d[field])
    return out


def fmt(p, scale=1.0, digits=1):
    return f"{scale * p['mean']:+.{digits}f} [{scale * p['low']:+.{digits}f}, {scale * p['high']:+.{digits}f}]"


print("| configuration | placement | n | accuracy (dense) | Δ accuracy, pt [95% CI] | ↑/↓/= | Δ loglik, nats [95% CI] | flag |")
print("|---|---|--:|--:|--:|--:|--:|---|")
for key in sorted(groups, key=str):
    rs = groups[key]
    acc, ll = paired(diffs(rs, "score")), paired(diffs(rs, "answer_loglik"), tol=1e-3)
    dense_acc = sum(by[(dense_of(r), r["sample_id"])]["score"] for r in rs) / len(rs)
    label = rs[0]["label"]
    flags = ", ".join(f"⚠ {what} below" for what, p in (("accuracy", acc), ("loglik", ll)) if p["flag"] == "below")
    print(f"| `{label}` | {key[1]} | {len(rs)} | {100 * sum(r['score'] for r in rs) / len(rs):.0f}% ({100 * dense_acc:.0f}%) "
          f"| {fmt(acc, 100)} | {acc['wins']}/{acc['losses']}/{acc['ties']} | {fmt(ll, 1, 2)} | {flags} |")

print("\nΔ accuracy in points / Δ decode-path log-likelihood in nats vs dense, mean over the 10 samples of each task "
      "(5 at 2K + 5 at 4K); ⚠ = 95% interval below zero.\n")
cols = [k for k in SHORT if k in groups]
print("| task | dense acc | " + " | ".join(SHORT[k] for k in cols) + " |")
print("|---|--:|" + "--:|" * len(cols))
for task in sorted({r["task"] for r in ROWS}):
    dense = [r["score"] for r in ROWS if r["method"] == "dense" and r["task"] == task]
    cells = []
    for k in cols:
        rs = [r for r in groups[k] if r["task"] == task]
        acc, ll = paired(diffs(rs, "score")), paired(diffs(rs, "answer_loglik"), tol=1e-3)
        if not acc["n"]:
            cells.append("—")
            continue
        cells.append(f"{100 * acc['mean']:+.0f}{'⚠' if acc['flag'] == 'below' else ''} / "
                     f"{ll['mean']:+.1f}{'⚠' if ll['flag'] == 'below' else ''}")
    print(f"| {task} | {100 * sum(dense) / len(dense):.0f}% | " + " | ".join(cells) + " |")

print("\nMatched budgets at 2K, same samples: tokensparse minus kvpress.\n")
print("| tokensparse | kvpress | n | accuracy tokensparse / kvpress | Δ accuracy, pt [95% CI] | answer loglik tokensparse / kvpress | Δ loglik, nats [95% CI] |")
print("|---|---|--:|--:|--:|--:|--:|")
for ours, peer in ((("dense", "inside"), ("kvpress:dense", "after")), (("snapkv", "inside"), ("kvpress:snapkv", "inside")),
                   (("snapkv", "after"), ("kvpress:snapkv", "after")),
                   (("streaming_llm", "after"), ("kvpress:streaming_llm", "after")),
                   (("tova", "inside"), ("kvpress:tova", "inside"))):
    ids = sorted(s for (c, s) in by if c == peer and (ours, s) in by)
    if not ids:
        continue
    a = [by[(ours, s)] for s in ids]
    b = [by[(peer, s)] for s in ids]
    acc = paired([x["score"] - y["score"] for x, y in zip(a, b)])
    ll = paired([x["answer_loglik"] - y["answer_loglik"] for x, y in zip(a, b)], tol=1e-3)
    mean = lambda rs, f: sum(r[f] for r in rs) / len(rs)  # noqa: E731
    print(f"| `{a[0]['label']}` {ours[1]} | `{b[0]['label']}` {peer[1]} | {len(ids)} | "
          f"{100 * mean(a, 'score'):.1f}% / {100 * mean(b, 'score'):.1f}% | {fmt(acc, 100)} | "
          f"{mean(a, 'answer_loglik'):.2f} / {mean(b, 'answer_loglik'):.2f} | {fmt(ll, 1, 2)} |")
