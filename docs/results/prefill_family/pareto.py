"""Accuracy against speed-up for the prefill family: one table and one plot from the committed files.

``.venv/bin/python docs/results/prefill_family/pareto.py`` reads, in this folder,

* every ``*.jsonl`` evaluation file: pass key rows at 4K (correct answers, answer log-likelihood
  paired with dense on the same sample) and standard-suite rows (accuracy paired with dense);
* ``attention_8k*.json`` (``tokensparse bench attention``): attention-only time at 8K, split into
  selection and executor;
* ``prefill_8k*.json`` and ``prefill_32k*.json`` (``tokensparse bench prefill``): end-to-end
  prefill time at 8K and 32K (YaRN ×4);

(earlier runs on another host are kept in ``earlier/`` and not read);

joins them on the method's full configuration (``config`` in both kinds of rows), prints a
Markdown table and writes ``pareto.png``: the pass key's mean Δ answer log-likelihood (marker:
all correct or not) and the suite's paired Δ accuracy where measured, against the attention-only
speed-up, the Pareto front (correct answers, then log-likelihood, vs speed-up) marked.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def accuracy() -> tuple[dict, dict]:
    """``(passkey, suite)``: per configuration key, pass key ``(correct, n, mean Δ log-lik)``; per
    (configuration key, prompt length), suite ``(n, Δ accuracy in points, wins, losses)`` paired with
    dense on the same samples."""
    rows = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.jsonl"))):
        rows += [r for r in (json.loads(line) for line in open(path)) if "error" not in r]
    dense = {(r["task"], r["sample_id"]): r for r in rows if r["method"] == "dense"}
    passkey, suite = {}, {}
    seen = set()
    for r in rows:
        if r["method"] == "dense":
            continue
        ident = (_key(r["config"]), r["task"], r["sample_id"])
        if ident in seen:  # the same row copied into two files
            continue
        seen.add(ident)
        d = dense.get((r["task"], r["sample_id"]))
        if d is None:
            continue
        k = _key(r["config"])
        if r["task"] == "passkey" and r["length"] == 4096:
            passkey.setdefault(k, []).append((bool(r["correct"]), r["answer_loglik"] - d["answer_loglik"]))
        elif r["task"] != "passkey":
            suite.setdefault((k, r["length"]), []).append(float(r["score"]) - float(d["score"]))
    pk = {k: (sum(c for c, _ in v), len(v), statistics.fmean(x for _, x in v)) for k, v in passkey.items()}
    st = {k: (len(v), 100 * statistics.fmean(v), sum(x > 0 for x in v), sum(x < 0 for x in v)) for k, v in suite.items()}
    return pk, st


def _rows(pattern: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, pattern))):
        for r in json.load(open(path))["results"]:
            out[_key(r["config"]) if "config" in r else "dense"] = r
    return out


def speed() -> tuple[dict, dict, dict]:
    """``(attention 8K, end to end 8K, end to end 32K)`` rows per configuration key (dense under
    ``"dense"``)."""
    return _rows("attention_8k*.json"), _rows("prefill_8k*.json"), _rows("prefill_32k*.json")


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point beats on both axes (higher is better on both)."""
    return [not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points) for x, y in points]


def main(plot: bool = True) -> None:
    pk, st = accuracy()
    att, e2e, e2e32 = speed()
    rows = []
    for k, a in att.items():
        if k == "dense":
            continue
        p = pk.get(k)
        rows.append({
            "label": a["variant"], "passkey": p, "suite": st.get((k, 2048)), "suite4k": st.get((k, 4096)), "kept": a.get("mean_kept_share_in_sparse_layers"),
            "att": a["speedup_vs_dense"], "sel_share": a["selection_s"] / a["executor_s"] if a.get("executor_s") else None,
            "e2e": e2e[k]["speedup_vs_dense"] if k in e2e else None,
            "e2e32": e2e32[k]["speedup_vs_dense"] if k in e2e32 else None,
        })
    scored = [r for r in rows if r["passkey"]]
    # the front on (speed-up, pass key correct, answer log-likelihood): more correct answers first,
    # then the likelihood of the right answer (continuous, so 6/6 configurations are ordered too)
    front = pareto([(r["att"], r["passkey"][0] / r["passkey"][1] + 1e-3 * r["passkey"][2]) for r in scored])
    for r, f in zip(scored, front):
        r["front"] = f
    print("| configuration | pass key 4K | Δ answer log-lik | suite 2K Δ acc (wins/losses of n) | suite 4K Δ acc | kept share (sparse layers) "
          "| attention-only ×, 8K | selection / executor | end to end ×, 8K | end to end ×, 32K | Pareto |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|")
    for r in sorted(rows, key=lambda r: -r["att"]):
        p, s, s4 = r["passkey"], r["suite"], r["suite4k"]
        cells = [r["label"], f"{p[0]}/{p[1]}" if p else "—", f"{p[2]:+.2f}" if p else "—",
                 f"{s[1]:+.1f} pt ({s[2]}/{s[3]} of {s[0]})" if s else "—",
                 f"{s4[1]:+.1f} pt ({s4[2]}/{s4[3]} of {s4[0]})" if s4 else "—", f"{r['kept']:.2f}", f"{r['att']:.2f}",
                 f"{100 * r['sel_share']:.0f}%" if r["sel_share"] is not None else "—",
                 f"{r['e2e']:.2f}" if r["e2e"] else "—", f"{r['e2e32']:.2f}" if r["e2e32"] else "—",
                 "●" if r.get("front") else ""]
        print("| " + " | ".join(cells) + " |")
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for n, r in enumerate(sorted(scored, key=lambda r: r["att"])):
        y = r["passkey"][2]
        marker = "o" if r["passkey"][0] == r["passkey"][1] else "x"
        ax.scatter(r["att"], y, s=40, marker=marker, color="C3" if r["front"] else "C0", zorder=3)
        ax.annotate(f"{r['label']} ({r['passkey'][0]}/{r['passkey'][1]})", (r["att"], y), fontsize=6,
                    xytext=(3, 3 + 7 * (n % 3)), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("attention-only speed-up vs dense SDPA at 8K (1 thread)")
    ax.set_ylabel("pass key 4K: mean Δ answer log-lik vs dense (nats)")
    ax.set_title("pass key, 6 depths (o: 6/6, x: misses; red: Pareto front)")
    ax = axes[1]
    for r in rows:
        if r["suite"]:
            ax.scatter(r["att"], r["suite"][1], s=40, color="C0", zorder=3)
            ax.annotate(r["label"], (r["att"], r["suite"][1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("attention-only speed-up vs dense SDPA at 8K (1 thread)")
    ax.set_ylabel("standard suite v2, 2K half: Δ accuracy vs dense (points, paired)")
    ax.set_title("standard suite (2K half)")
    fig.tight_layout()
    out = os.path.join(HERE, "pareto.png")
    fig.savefig(out, dpi=130)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(plot="--no-plot" not in sys.argv)
