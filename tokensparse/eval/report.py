"""Turn result JSONL files of :mod:`tokensparse.eval.runner` into a Markdown report and PNG plots.

Every sparse row is paired with the dense row of the *same sample* (same model, task, options,
length, depth, seed and index), preferring one from the same run and placement, so accuracy
deltas and speed ratios compare like with like. Speed-ups are ``dense time / method time`` per
row, then the median over rows; accuracy is the mean score with the number of runs ``n``.

The report holds: a summary per method config and placement (accuracy, paired delta vs dense,
mean answer log-likelihood, logit fidelity vs dense, telemetry density and kept attention mass,
median prefill seconds, decode ms/token and KV bytes with their ratios to dense), the time spent
inside attention and the peak memory per group, per-layer attention-output error and needle
retention, accuracy per task and length, failed runs, the environment that produced the numbers, and the plots of
:mod:`tokensparse.eval.plots`.

Peer rows (NVIDIA kvpress presses, ``method`` ``"kvpress:<press>"``, see ``docs/peers.md``) are
groups like any other: in the summary table and the plots, paired with tokensparse's dense row of
the same sample. A "Peer libraries" section adds what only they have: the ratios against the
peer's own dense run (its driver differs from tokensparse's) and the share of needle tokens kept,
and a table that lines up every method that shrinks the KV cache at the same kept share
(kvpress ``compression_ratio`` 0.75 == tokensparse ``budget`` 0.25).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import stats as stats_lib
from .harness import PLACEMENTS
from .runner import read_rows

DENSE = "dense"


# --------------------------------------------------------------------------------------------------
# loading


def result_files(sources: str | Path | Iterable[str | Path]) -> list[Path]:
    """JSONL files named by ``sources``: files as given, directories searched for ``*.jsonl``."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"{p} holds no *.jsonl result files; run `tokensparse eval --out {p}` first")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass a results directory or a .jsonl file")
    return files


def load_results(sources) -> tuple[list[dict], list[dict]]:
    """``(rows, errors)``: one row per key (the last successful one) and the failed runs that
    never succeeded."""
    ok: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    for f in result_files(sources):
        for i, row in enumerate(read_rows(f)):
            key = row.get("key") or f"{f}:{i}"
            if row.get("error"):
                failed[key] = row
            else:
                ok[key] = row
    return list(ok.values()), [r for k, r in failed.items() if k not in ok]


# --------------------------------------------------------------------------------------------------
# pairing with dense and per-group summaries


def sample_key(row: dict) -> str:
    m = row.get("model") or {}
    return json.dumps([m.get("fingerprint"), m.get("dtype"), row["task"], row.get("task_options") or {},
                       row["length"], row.get("depth"), row["seed"], row.get("index", 0)], sort_keys=True)


def pair_with_dense(rows: list[dict]) -> dict[int, dict]:
    """``id(row) -> dense row`` of the same sample: same run and placement first, then same run,
    then same placement, then any."""
    dense: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == DENSE:
            dense[sample_key(r)].append(r)
    out = {}
    for r in rows:
        cands = dense.get(sample_key(r))
        if not cands:
            continue
        out[id(r)] = max(cands, key=lambda d: (d.get("run_id") == r.get("run_id"), d["placement"] == r["placement"]))
    return out


def pair_with_peer_dense(rows: list[dict]) -> dict[int, dict]:
    """``id(peer row) -> the same peer's dense row`` of the same sample (same run and placement first)."""
    dense: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        c = r.get("config") or {}
        if c.get("peer") and c.get("press") == DENSE:
            dense[(c["peer"], sample_key(r))].append(r)
    out = {}
    for r in rows:
        c = r.get("config") or {}
        cands = dense.get((c.get("peer"), sample_key(r))) if c.get("peer") else None
        if cands:
            out[id(r)] = max(cands, key=lambda d: (d.get("run_id") == r.get("run_id"), d["placement"] == r["placement"]))
    return out


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def generation_seconds(row: dict) -> float | None:
    """Prefill plus the timed decode steps (the first new token comes from the prefill)."""
    p, d, n = row.get("prefill_s"), row.get("decode_ms_per_token"), row.get("new_tokens") or 1
    if p is None:
        return None
    if n <= 1 or d is None or math.isnan(d):
        return p
    return p + d * (n - 1) / 1000


def _mib(x):
    return None if x is None else x / 2**20


def _sub(a, b):
    return None if a is None or b is None else a - b


def _per_layer_mean(dicts: list[dict[int, float]]) -> dict[int, float]:
    """Per layer, the mean over the rows that have that layer."""
    acc: dict[int, list] = defaultdict(list)
    for d in dicts:
        for k, v in d.items():
            if v is not None:
                acc[k].append(v)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) and not math.isnan(a) and not math.isnan(b) else None


@dataclass
class Group:
    """All rows of one method config at one placement, with paired-dense statistics."""

    label: str
    method: str
    placement: str
    config: dict
    rows: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    #: per layer means over the rows: ``{"error": {layer: attention-output error}, "needle_held": {...}}``
    per_layer: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.label} [{self.placement}]"

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    @property
    def peer(self) -> str | None:
        """The peer library of a peer group (``"kvpress"``), else ``None``."""
        return self.config.get("peer") if isinstance(self.config, dict) else None

    @property
    def is_peer_dense(self) -> bool:
        return self.peer is not None and self.config.get("press") == DENSE

    @property
    def kv_kept_share(self) -> float | None:
        """The nominal share of the KV cache kept: a peer's ``1 - compression_ratio``, a tokensparse
        eviction method's ratio ``budget``, 1 for dense; ``None`` when the method keeps the whole cache
        (or its budget is not a ratio)."""
        if self.is_dense:
            return 1.0
        if self.peer is not None:
            return self.config.get("kv_kept_share")
        budget = self.config.get("budget")
        if not isinstance(budget, float) or not 0 < budget <= 1:
            return None
        try:
            import tokensparse as ts

            phase = ts.methods.get(self.method).phase
        except Exception:
            return None
        return budget if phase == "eviction" else None


def summarize(rows: list[dict]) -> list[Group]:
    """One :class:`Group` per (method config, placement), dense groups first."""
    paired = pair_with_dense(rows)
    own = pair_with_peer_dense(rows)
    groups: dict[tuple, Group] = {}
    for r in rows:
        k = (json.dumps(r["config"], sort_keys=True), r["placement"])
        if k not in groups:
            groups[k] = Group(r["label"], r["method"], r["placement"], r["config"])
        groups[k].rows.append(r)
    for g in groups.values():
        rs = g.rows
        d = [paired.get(id(r)) for r in rs]
        tele = [r.get("telemetry") or {} for r in rs]
        fid = [r.get("fidelity") or {} for r in rs]
        g.stats = {
            "n": len(rs),
            "accuracy": _mean([r["score"] for r in rs]),
            "delta_vs_dense": _mean([r["score"] - x["score"] for r, x in zip(rs, d) if x is not None]),
            # samples scored better / worse than dense (with n this small, the counts say more than the mean)
            "wins": sum(r["score"] > x["score"] for r, x in zip(rs, d) if x is not None),
            "losses": sum(r["score"] < x["score"] for r, x in zip(rs, d) if x is not None),
            "paired": sum(x is not None for x in d),
            "loglik": _mean([r.get("answer_loglik") for r in rs]),
            "loglik_n": sum(r.get("answer_loglik") is not None for r in rs),
            "kl": _mean([f.get("kl") for f in fid]),
            "top1": _mean([f.get("top1") for f in fid]),
            "density": _mean([t.get("density") for t in tele]),
            "mass": _mean([t.get("mass") for t in tele]),
            "error": _mean([t.get("error") for t in tele]),
            # share of the gold needle's tokens an evicting cache still holds (mean over layers)
            "needle_held": _mean([(r.get("needle_retention") or {}).get("mean",
                                  (r.get("peer") or {}).get("needle_kept_mean")) for r in rs]),
            "prefill_s": _median([r.get("prefill_s") for r in rs]),
            "decode_ms": _median([r.get("decode_ms_per_token") for r in rs]),
            "kv_mib": _median([r["kv_bytes"] / 2**20 if r.get("kv_bytes") is not None else None for r in rs]),
            "prefill_speedup": _median([_ratio(x.get("prefill_s"), r.get("prefill_s")) for r, x in zip(rs, d) if x]),
            "decode_speedup": _median([_ratio(x.get("decode_ms_per_token"), r.get("decode_ms_per_token"))
                                       for r, x in zip(rs, d) if x]),
            "speedup": _median([_ratio(generation_seconds(x), generation_seconds(r)) for r, x in zip(rs, d) if x]),
            "kv_ratio": _median([_ratio(r.get("kv_bytes"), x.get("kv_bytes")) for r, x in zip(rs, d) if x]),
            # time inside the attention function (tokensparse runs) and peak memory of the run
            "attn_prefill_s": _median([r.get("attention_prefill_s") for r in rs]),
            "attn_decode_ms": _median([r.get("attention_decode_ms_per_token") for r in rs]),
            "attn_share": _median([_ratio(r.get("attention_prefill_s"), r.get("prefill_s")) for r in rs]),
            "attn_prefill_speedup": _median([_ratio(x.get("attention_prefill_s"), r.get("attention_prefill_s"))
                                             for r, x in zip(rs, d) if x]),
            "attn_decode_speedup": _median([_ratio(x.get("attention_decode_ms_per_token"),
                                                   r.get("attention_decode_ms_per_token")) for r, x in zip(rs, d) if x]),
            "peak_rss_mib": _median([_mib((r.get("memory") or {}).get("peak_rss_bytes")) for r in rs]),
            "peak_added_mib": _median([_mib(_sub((r.get("memory") or {}).get("peak_rss_bytes"),
                                                 (r.get("memory") or {}).get("rss_start_bytes"))) for r in rs]),
            "rss_scope": _distinct(rs, lambda r: r["memory"]["scope"]),
        }
        g.per_layer = {
            "error": _per_layer_mean([{int(k): v["error"] for k, v in ((r.get("telemetry") or {}).get("per_layer")
                                                                      or {}).items() if "error" in v} for r in rs]),
            "needle_held": _per_layer_mean([dict(enumerate((r.get("needle_retention") or {}).get("per_layer")
                                                           or (r.get("peer") or {}).get("needle_kept_per_layer") or []))
                                            for r in rs]),
        }
        if g.peer is not None:
            o = [own.get(id(r)) for r in rs]
            peer = [r.get("peer") or {} for r in rs]
            g.stats.update({
                "own_paired": sum(x is not None for x in o),
                "own_delta": _mean([r["score"] - x["score"] for r, x in zip(rs, o) if x is not None]),
                "own_prefill_speedup": _median([_ratio(x.get("prefill_s"), r.get("prefill_s")) for r, x in zip(rs, o) if x]),
                "own_decode_speedup": _median([_ratio(x.get("decode_ms_per_token"), r.get("decode_ms_per_token"))
                                               for r, x in zip(rs, o) if x]),
                "own_kv_ratio": _median([_ratio(r.get("kv_bytes"), x.get("kv_bytes")) for r, x in zip(rs, o) if x]),
                "compress_s": _median([p.get("compress_s") for p in peer]),
                "needle_kept": _mean([p.get("needle_kept_mean") for p in peer]),
                "versions": _distinct(rs, lambda r: ", ".join(f"{k} {v}" for k, v in r["env"]["versions"].items() if v)),
            })
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    return sorted(groups.values(), key=lambda g: (not g.is_dense, g.peer is not None, g.peer or "",
                                                  not g.is_peer_dense, g.method, g.label, order.get(g.placement, 9)))


# --------------------------------------------------------------------------------------------------
# Markdown


def _fmt(x, spec: str = ".3g", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _delta(s: dict) -> str:
    """Paired Δ vs dense in points, with the samples won and lost against dense: ``-33.3 pt (↑0 ↓3)``."""
    if s["delta_vs_dense"] is None:
        return "—"
    return f"{100 * s['delta_vs_dense']:+.1f} pt (↑{s['wins']} ↓{s['losses']})"


def summary_table(groups: list[Group]) -> str:
    head = ("| method (settings) | placement | n | accuracy | Δ vs dense (paired) | answer loglik (nats) "
            "| KL vs dense | top-1 vs dense | density | mass kept | attn output error | needle tokens held | prefill s (median) "
            "| prefill speed-up | decode ms/token (median) | decode speed-up | generation speed-up | KV MiB (median) "
            "| KV vs dense |\n"
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
    lines = []
    for g in groups:
        s = g.stats
        ref = g.is_dense
        lines.append("| " + " | ".join([
            f"`{g.label}`", g.placement, str(s["n"]), _fmt(100 * s["accuracy"], ".1f", "%"),
            "ref" if ref else _delta(s),
            _fmt(s["loglik"], ".2f"), "ref" if ref else _fmt(s["kl"], ".3g"),
            "ref" if ref else _fmt(None if s["top1"] is None else 100 * s["top1"], ".0f", "%"),
            "1 (dense)" if ref else _fmt(s["density"], ".3f"), "1 (dense)" if ref else _fmt(s["mass"], ".3f"),
            "0 (dense)" if ref else _fmt(s["error"], ".3f"),
            "1 (dense)" if ref else _fmt(None if s["needle_held"] is None else 100 * s["needle_held"], ".0f", "%"),
            _fmt(s["prefill_s"], ".3g"), "ref" if ref else _fmt(s["prefill_speedup"], ".2f", "×"),
            _fmt(s["decode_ms"], ".3g"), "ref" if ref else _fmt(s["decode_speedup"], ".2f", "×"),
            "ref" if ref else _fmt(s["speedup"], ".2f", "×"),
            _fmt(s["kv_mib"], ".3g"), "ref" if ref else _fmt(s["kv_ratio"], ".2f", "×"),
        ]) + " |")
    return head + "\n".join(lines) + "\n"


def time_memory_table(groups: list[Group]) -> str:
    """Where the time goes (inside attention or not) and the peak memory of each group."""
    if not any(g.stats.get("attn_prefill_s") is not None or g.stats.get("peak_rss_mib") is not None for g in groups):
        return ""
    lines = ["## Time inside attention and peak memory\n",
             "Attention time is measured inside the model's attention function (`tokensparse.time_attention`: "
             "for dense, SDPA; for a method, its selection, executor and cache bookkeeping; Q/K/V projections, "
             "RoPE and the MLPs are outside), in the same runs as the end-to-end times; speed-ups are paired "
             "with the dense run of the same sample, median over samples. Peak RSS is the process's resident "
             "high-water mark over the generation run (the model weights included); \"added\" subtracts what "
             "was resident when the run started. Peer rows have no attention time.\n",
             "| method (settings) | placement | n | prefill s | attention s in prefill | attention share "
             "| attention speed-up (prefill) | decode ms/token | attention ms/token | attention speed-up (decode) "
             "| peak RSS MiB | peak added MiB |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for g in groups:
        s = g.stats
        ref = g.is_dense
        lines.append("| " + " | ".join([
            f"`{g.label}`", g.placement, str(s["n"]), _fmt(s["prefill_s"], ".3g"), _fmt(s["attn_prefill_s"], ".3g"),
            _fmt(None if s["attn_share"] is None else 100 * s["attn_share"], ".0f", "%"),
            "ref" if ref else _fmt(s["attn_prefill_speedup"], ".2f", "×"),
            _fmt(s["decode_ms"], ".3g"), _fmt(s["attn_decode_ms"], ".3g"),
            "ref" if ref else _fmt(s["attn_decode_speedup"], ".2f", "×"),
            _fmt(s["peak_rss_mib"], ".0f"), _fmt(s["peak_added_mib"], ".0f"),
        ]) + " |")
    scopes = {sc for g in groups for sc in g.stats.get("rss_scope") or []}
    if "process" in scopes:
        lines.append("\nSome peaks could not be reset per run (no `/proc/self/clear_refs`): those are the "
                     "process's peak since it started, an upper bound.")
    return "\n".join(lines) + "\n"


def per_layer_table(groups: list[Group], worst: int = 3) -> str:
    """Per method: mean attention-output error over the layers it reports and its worst layers; for
    eviction methods, the layers that held the least of the needle."""
    rows = [g for g in groups if (g.per_layer.get("error") or g.per_layer.get("needle_held")) and not g.is_peer_dense]
    if not rows:
        return ""

    def top(d: dict, reverse: bool) -> str:
        items = sorted(d.items(), key=lambda kv: kv[1], reverse=reverse)[:worst]
        return ", ".join(f"L{k} {v:.2f}" for k, v in items) if items else "—"

    lines = ["## Per-layer fidelity\n",
             "Attention-output relative error per layer (engine telemetry on sampled query rows, mean over "
             f"heads, calls and runs) and the share of the needle's tokens each layer held (eviction methods); "
             f"the {worst} worst layers of each. The per-layer curves are in the plot below.\n",
             "| method (settings) | placement | layers observed | mean error | worst layers (error) "
             "| needle held, mean | least needle held (layers) |",
             "|---|---|--:|--:|---|--:|---|"]
    for g in rows:
        err, held = g.per_layer.get("error") or {}, g.per_layer.get("needle_held") or {}
        lines.append("| " + " | ".join([
            f"`{g.label}`", g.placement, str(len(err)) if err else "—",
            _fmt(sum(err.values()) / len(err) if err else None, ".3f"), top(err, True),
            _fmt(100 * sum(held.values()) / len(held) if held else None, ".0f", "%"),
            top(held, False),
        ]) + " |")
    return "\n".join(lines) + "\n"


def peer_section(groups: list[Group]) -> str:
    """Peer groups against their own dense run, and every KV-shrinking method lined up by kept share."""
    peers = [g for g in groups if g.peer is not None]
    if not peers:
        return ""
    out = ["## Peer libraries\n",
           "Presses of " + ", ".join(f"`{p}`" for p in dict.fromkeys(g.peer for g in peers))
           + " run in their own environment on the same samples (identical token ids), scored the same way. "
           "In the summary above their Δ and ratios are against tokensparse's dense run of each sample; here "
           "against the peer's own dense run (`<peer>:dense`, its own generation loop), so the two drivers' "
           "difference is visible in the `<peer>:dense` row of the summary. `compression_ratio` is the share of "
           "the KV cache the press removes; KV kept = 1 − compression_ratio.\n",
           "| peer method | placement | compression ratio | KV kept (nominal) | n | accuracy "
           "| Δ vs own dense | prefill speed-up vs own dense | decode speed-up vs own dense | KV vs own dense "
           "| compress s (median) | needle tokens kept |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for g in peers:
        s = g.stats
        ref = g.is_peer_dense
        out.append("| " + " | ".join([
            f"`{g.label}`", g.placement, _fmt(g.config.get("compression_ratio"), "g"), _fmt(g.kv_kept_share, "g"),
            str(s["n"]), _fmt(100 * s["accuracy"], ".1f", "%"),
            "ref" if ref else _fmt(None if s.get("own_delta") is None else 100 * s["own_delta"], "+.1f", " pt"),
            "ref" if ref else _fmt(s.get("own_prefill_speedup"), ".2f", "×"),
            "ref" if ref else _fmt(s.get("own_decode_speedup"), ".2f", "×"),
            "ref" if ref else _fmt(s.get("own_kv_ratio"), ".2f", "×"),
            _fmt(s.get("compress_s"), ".3g"), _fmt(s.get("needle_kept"), ".2f"),
        ]) + " |")
    out.append("\nPeer environment: " + "; ".join(
        f"`{v}`" for v in dict.fromkeys(v for g in peers for v in g.stats.get("versions") or [])) + ".\n")
    out.append(matched_budget_table(groups))
    return "\n".join(out) + "\n"


def matched_budget_table(groups: list[Group]) -> str:
    """Methods that shrink the KV cache, side by side at the same kept share and placement."""
    shrink = [g for g in groups if not g.is_dense and not g.is_peer_dense and g.kv_kept_share is not None]
    if not shrink:
        return ""
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    shrink.sort(key=lambda g: (g.kv_kept_share, order.get(g.placement, 9), g.peer is not None, g.method, g.label))
    lines = ["### Matched KV budgets\n",
             "Every method that shrinks the KV cache, grouped by the nominal share of it kept "
             "(tokensparse `budget`, kvpress 1 − `compression_ratio`) and placement; Δ and KV ratio against "
             "tokensparse's dense run.\n",
             "| KV kept | placement | method (settings) | n | accuracy | Δ vs dense (paired) | KV vs dense "
             "| generation speed-up |",
             "|--:|---|---|--:|--:|--:|--:|--:|"]
    for g in shrink:
        s = g.stats
        lines.append("| " + " | ".join([
            _fmt(g.kv_kept_share, "g"), g.placement, f"`{g.label}`", str(s["n"]), _fmt(100 * s["accuracy"], ".1f", "%"),
            _delta(s), _fmt(s["kv_ratio"], ".2f", "×"), _fmt(s["speedup"], ".2f", "×"),
        ]) + " |")
    return "\n".join(lines) + "\n"


#: paired log-likelihood differences smaller than this (nats) are ties: the decode path at full budget
#: is equal to dense only up to floating-point summation order
LOGLIK_TIE_NATS = 1e-3


def paired_tests(rows: list[dict], groups: list[Group]) -> list[dict]:
    """Per non-dense group, over all its tasks and per task: :func:`stats.paired` of the accuracy
    and answer log-likelihood differences against dense on the same samples."""
    dense_of = pair_with_dense(rows)
    out = []
    for g in groups:
        if g.is_dense:
            continue
        tasks = sorted({r["task"] for r in g.rows})
        for task in [None, *tasks]:
            rs = [r for r in g.rows if (task is None or r["task"] == task) and id(r) in dense_of]
            if not rs:
                continue
            ds = [dense_of[id(r)] for r in rs]
            acc = stats_lib.paired([r["score"] - d["score"] for r, d in zip(rs, ds)])
            ll_pairs = [(r.get("answer_loglik"), d.get("answer_loglik")) for r, d in zip(rs, ds)]
            ll_pairs = [(a, b) for a, b in ll_pairs if a is not None and b is not None]
            ll = stats_lib.paired([a - b for a, b in ll_pairs], tol=LOGLIK_TIE_NATS)
            out.append({"group": g, "task": task or "all tasks", "n": len(rs),
                        "accuracy": _mean([r["score"] for r in rs]), "dense_accuracy": _mean([d["score"] for d in ds]),
                        "acc": acc, "ll": ll})
    return out


def _ci(p: dict, scale: float, spec: str) -> str:
    if p["mean"] is None:
        return "—"
    return f"{scale * p['mean']:+{spec}} [{scale * p['low']:+{spec}}, {scale * p['high']:+{spec}}]"


def _flag(t: dict) -> str:
    marks = []
    for key, what in (("acc", "accuracy"), ("ll", "loglik")):
        f = t[key]["flag"]
        if f:
            marks.append(f"{'⚠ ' if f == 'below' else ''}{what} {f}")
    return ", ".join(marks)


def paired_section(rows: list[dict], groups: list[Group]) -> str:
    tests = paired_tests(rows, groups)
    if not tests:
        return ""
    flagged = [t for t in tests if t["task"] != "all tasks" and (t["acc"]["flag"] == "below" or t["ll"]["flag"] == "below")]
    lines = [
        "## Paired differences vs dense, per method and task\n",
        "Each run minus dense attention's run on the same sample. Δ accuracy in points and Δ answer "
        "log-likelihood (decode path, nats) with 95% percentile-bootstrap intervals over samples "
        "(10,000 resamples, seed 0); ↑/↓/= counts samples above / below / equal to dense (log-likelihood "
        f"ties: within {LOGLIK_TIE_NATS:g} nats); sign p: exact two-sided sign test on ↑ vs ↓. **Flag**: the "
        "interval excludes zero (only with at least 5 pairs). With 5-10 samples per cell, no flag does not "
        "mean \"equal to dense\".\n",
    ]
    if flagged:
        lines.append("Flagged below dense (task level): " + "; ".join(
            f"`{t['group'].label}` [{t['group'].placement}] on {t['task']}" for t in flagged) + ".\n")
    lines += ["| method (settings) | placement | task | n | accuracy (dense) | Δ accuracy, pt [95% CI] | ↑/↓/= "
              "| sign p | Δ loglik, nats [95% CI] | ↑/↓/= | sign p | flag |",
              "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for t in tests:
        g, a, ll = t["group"], t["acc"], t["ll"]
        name = f"**{t['task']}**" if t["task"] == "all tasks" else t["task"]
        lines.append("| " + " | ".join([
            f"`{g.label}`", g.placement, name, str(t["n"]),
            f"{_fmt(100 * t['accuracy'], '.0f', '%')} ({_fmt(100 * t['dense_accuracy'], '.0f', '%')})",
            _ci(a, 100, ".1f"), f"{a['wins']}/{a['losses']}/{a['ties']}", _fmt(a["p_sign"], ".2g"),
            _ci(ll, 1, ".2f"), f"{ll['wins']}/{ll['losses']}/{ll['ties']}" if ll["n"] else "—",
            _fmt(ll["p_sign"], ".2g"), _flag(t),
        ]) + " |")
    return "\n".join(lines) + "\n"


def load_bench(paths) -> list[dict]:
    """The result rows of benchmark JSON files (``tokensparse bench ... --json``), each with its file."""
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data.get("results", []):
            out.append({**r, "file": str(p), "kind": data.get("kind")})
    return out


def _paired_at(rows: list[dict], g: Group, dense_of: dict, length: int | None) -> dict | None:
    """Paired accuracy / log-likelihood statistics of ``g``'s runs whose prompt length is within 5%
    of ``length`` (every run when ``length`` is None); None when there is no such run."""
    rs = [r for r in g.rows if id(r) in dense_of and (length is None or abs(r["length"] - length) <= 0.05 * length)]
    if not rs:
        return None
    ds = [dense_of[id(r)] for r in rs]
    ll = [(r.get("answer_loglik"), d.get("answer_loglik")) for r, d in zip(rs, ds)]
    ll = [(a, b) for a, b in ll if a is not None and b is not None]
    return {"n": len(rs), "accuracy": _mean([r["score"] for r in rs]), "dense_accuracy": _mean([d["score"] for d in ds]),
            "acc": stats_lib.paired([r["score"] - d["score"] for r, d in zip(rs, ds)]),
            "ll": stats_lib.paired([a - b for a, b in ll], tol=LOGLIK_TIE_NATS),
            "lengths": sorted({r["length"] for r in rs})}


def speed_accuracy_section(rows: list[dict], groups: list[Group], bench: list[dict]) -> str:
    """Each benchmarked method configuration next to the accuracy rows of the *same* configuration
    (exact match of every config field) at the benchmark's context length (within 5%), or, when the
    report has no run at that length, at every length it has, said so: a speed-up is only reported
    with the accuracy it costs."""
    if not bench:
        return ""
    dense_of = pair_with_dense(rows)
    lines = ["## Speed next to accuracy, same configurations\n",
             "Speed from the benchmark files (ratios against dense in the same benchmark run); accuracy and "
             "answer log-likelihood from this report's runs of the identical method config, paired with dense "
             "(95% bootstrap intervals, all tasks), at the benchmark's context length (±5%) when this report has "
             "runs there, else at the lengths it has (listed). A benchmarked config without accuracy rows says so.\n",
             "| benchmark | L | variant | ms/token (median) | speed-up vs dense | accuracy rows | placement | accuracy at L "
             "| n | accuracy (dense) | Δ accuracy, pt [95% CI] | Δ loglik, nats [95% CI] |",
             "|---|--:|---|--:|--:|---|---|---|--:|--:|--:|--:|"]
    for b in bench:
        cfg = b.get("config")
        if not cfg:
            continue
        key = json.dumps(cfg, sort_keys=True)
        match = [g for g in groups if json.dumps(g.config, sort_keys=True) == key]
        ms = (b.get("ms_per_token") or {}).get("median")
        speed = b.get("speedup_vs_dense_prealloc") or b.get("speedup_vs_dense")
        length = b.get("length")
        head = [Path(b["file"]).name, str(length or "—"), b.get("variant", "—"), _fmt(ms, ".1f"), _fmt(speed, ".2f", "×")]
        if not match:
            lines.append("| " + " | ".join(head + ["**none: no accuracy measured for this config**"] + ["—"] * 6) + " |")
            continue
        for g in match:
            t = _paired_at(rows, g, dense_of, length) if isinstance(length, int) else None
            where = "yes"
            if t is None:
                t = _paired_at(rows, g, dense_of, None)
                if t is None:
                    continue
                where = "**no**: at " + ", ".join(str(n) for n in t["lengths"])
            lines.append("| " + " | ".join(head + [
                f"`{g.label}`", g.placement, where, str(t["n"]),
                f"{_fmt(100 * t['accuracy'], '.0f', '%')} ({_fmt(100 * t['dense_accuracy'], '.0f', '%')})",
                _ci(t["acc"], 100, ".1f"), _ci(t["ll"], 1, ".2f"),
            ]) + " |")
    return "\n".join(lines) + "\n"


def task_tables(groups: list[Group]) -> str:
    """Accuracy (n) per task, one table per task: a row per group, a column per length."""
    out = []
    tasks = sorted({r["task"] for g in groups for r in g.rows})
    for task in tasks:
        lengths = sorted({r["length"] for g in groups for r in g.rows if r["task"] == task})
        out.append(f"**{task}**\n\n| method (settings) | placement | " + " | ".join(f"L={L}" for L in lengths)
                   + " |\n|---|---|" + "--:|" * len(lengths))
        for g in groups:
            cells = []
            for L in lengths:
                sc = [r["score"] for r in g.rows if r["task"] == task and r["length"] == L]
                cells.append(f"{100 * sum(sc) / len(sc):.0f}% ({len(sc)})" if sc else "—")
            if any(c != "—" for c in cells):
                out.append(f"| `{g.label}` | {g.placement} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _distinct(rows, get) -> list:
    seen = []
    for r in rows:
        try:
            v = get(r)
        except (KeyError, TypeError):
            continue
        if v is not None and v not in seen:
            seen.append(v)
    return seen


def _model(r):
    m = r["model"]
    return f"{m['path'] or 'model'} (fingerprint {m['fingerprint']}, {m['dtype']})"


def _hardware(r):
    hw = r["env"]["hardware"]
    return f"{hw['cpu']}, {hw['cpu_count']} CPUs, {hw['device']}"


def _git(r):
    git = r["env"]["git"]
    return f"{git['commit']}{' (uncommitted changes)' if git['dirty'] else ''}"


def environment_section(rows: list[dict]) -> str:
    """Every distinct model, thread count, hardware, version set, commit and command of the rows."""
    items = [
        ("suite(s)", _distinct(rows, lambda r: r["suite"])),
        ("runs", _distinct(rows, lambda r: r["run_id"])),
        ("model", _distinct(rows, _model)),
        ("seeds", sorted(_distinct(rows, lambda r: r["seed"]))),
        ("torch threads", _distinct(rows, lambda r: r["env"]["torch_threads"])),
        ("hardware", _distinct(rows, _hardware)),
        ("versions", _distinct(rows, lambda r: ", ".join(f"{k} {v}" for k, v in r["env"]["versions"].items() if v))),
        ("git commit", _distinct(rows, _git)),
        ("command", _distinct(rows, lambda r: r["env"]["command"])),
    ]
    loads = [r["loadavg"][0] for r in rows if r.get("loadavg")]
    lines = [f"- {name}: " + "; ".join(f"`{v}`" for v in vals) for name, vals in items if vals]
    if loads:
        lines.append(f"- 1-min load average during the runs: {min(loads):.2f} to {max(loads):.2f}")
    return "\n".join(lines) + "\n"


def errors_section(errors: list[dict]) -> str:
    if not errors:
        return ""
    by: dict[tuple, list] = defaultdict(list)
    for e in errors:
        by[(e.get("label"), e.get("placement"), e.get("error"))].append(e)
    lines = ["## Failed runs (not in the tables above)\n", "| method (settings) | placement | runs | error |",
             "|---|---|--:|---|"]
    for (label, placement, err), es in sorted(by.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| `{label}` | {placement} | {len(es)} | {str(err).replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n\n"


NOTES = """\
Notes: accuracy is the mean score per run (each task's metric: RULER's string_match_all, or the
first word for the character probes); Δ vs dense is the mean paired difference on the same
samples, with (↑ won, ↓ lost) the number of samples scored better / worse than dense. Speed-ups
are dense time / method time per sample, median over samples, against the
dense run of the same sample (same run and placement when present); generation time is the
prefill plus the timed decode steps. KL vs dense and top-1 agreement compare the teacher-forced
logits of the gold answer; density, kept mass and attention-output error (relative, against dense
attention over the same keys) are the engine's telemetry (sampled query rows),
averaged over the layers and calls the method reports (e.g. only the sparse layers of
token_sparse, only the decode steps of token_select).
Needle tokens held: for methods that evict KV rows, the share of the gold needle's prompt tokens
still in the cache after generation, averaged over layers (and KV heads); empty for full caches.
Placement `inside`: the question is part of the prompt the method may compress; `after`: it is
fed after the context was prefilled (and possibly compressed).
Peer rows (`kvpress:<press>`) ran in the peer's own environment on identical token ids and are
scored the same way; they have no telemetry nor logit fidelity, their prefill time is the time to
the first answer logits (compressed prefill plus the question tail) and their generation stops at
EOS. `kvpress:dense` is kvpress's driver without a press: its gap to `dense` is the drivers' own.
"""


def render_markdown(rows: list[dict], errors: list[dict], groups: list[Group], plots: dict[str, Path],
                    sources: list[Path], out_dir: Path, bench: list[dict] | None = None) -> str:
    parts = [
        "# tokensparse evaluation report\n",
        f"{len(rows)} runs from " + ", ".join(f"`{s}`" for s in sources)
        + (f"; {len(errors)} failed run{'s' if len(errors) > 1 else ''} listed below" if errors else "") + ".\n",
        "## Environment\n", environment_section(rows),
        "## Summary per method, config and placement\n", summary_table(groups), NOTES,
        paired_section(rows, groups), speed_accuracy_section(rows, groups, bench or []),
        time_memory_table(groups), per_layer_table(groups),
        peer_section(groups),
        "## Accuracy by task and context length\n", "Accuracy (runs) per cell.\n", task_tables(groups),
    ]
    if plots:
        parts.append("## Plots\n")
        for title, path in plots.items():
            rel = path.relative_to(out_dir) if path.is_relative_to(out_dir) else path
            parts.append(f"### {title}\n\n![{title}]({rel})\n")
    parts.append(errors_section(errors))
    return "\n".join(parts)


def write_report(sources, out_dir: str | Path, *, plots: bool = True, bench=()) -> Path:
    """Write ``out_dir/report.md`` (and the PNGs next to it); returns the Markdown path. ``bench``:
    benchmark JSON files whose speed-ups are shown next to the accuracy of the same configs."""
    from . import plots as plot_lib

    files = result_files(sources)
    rows, errors = load_results(files)
    if not rows:
        raise ValueError(f"no successful runs in {', '.join(map(str, files))}"
                         + (f" ({len(errors)} failed runs)" if errors else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = summarize(rows)
    made = plot_lib.make_all(rows, groups, out) if plots else {}
    md = out / "report.md"
    md.write_text(render_markdown(rows, errors, groups, made, files, out, load_bench(bench)))
    return md
