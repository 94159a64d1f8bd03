"""PNG plots of evaluation results (matplotlib, Agg backend): needle heatmaps, accuracy vs
attention budget, latency vs context length (log-log, fitted scaling exponent), accuracy vs
speed-up with its Pareto front, per-layer attention-output error and needle retention. Dense is drawn in every plot, in black.

Each function takes the :class:`tokensparse.eval.report.Group` list of :func:`report.summarize`
and returns the written path, or ``None`` when the results hold nothing to plot (e.g. a single
context length for the latency plot).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DENSE_COLOR = "black"
LINESTYLES = {"inside": "-", "after": "--"}
MARKERS = "osD^vP*X<>"


def _styles(groups) -> dict[str, dict]:
    """Per group name: a colour per method (dense black), a line style per placement, a marker per config."""
    methods = sorted({g.method for g in groups if not g.is_dense})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    configs: dict[str, list[str]] = defaultdict(list)
    out = {}
    for g in groups:
        if g.label not in configs[g.method]:
            configs[g.method].append(g.label)
        out[g.name] = {
            "color": DENSE_COLOR if g.is_dense else color[g.method],
            "linestyle": LINESTYLES.get(g.placement, ":"),
            "marker": MARKERS[configs[g.method].index(g.label) % len(MARKERS)],
        }
    return out


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend(ax, **kw):
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


# --------------------------------------------------------------------------------------------------
# needle heatmaps


#: realised needle depths of random-depth samples are shown in these bins
DEPTH_BINS = 4


def _depth_cell(r: dict):
    """``(sort key, label)`` of a row's depth cell: the requested depth, or for a random-depth sample
    (``depth`` null) the bin of its realised needle depth (``needle_depth``); ``None`` without either."""
    if r.get("depth") is not None:
        d = round(r["depth"], 4)
        return d, f"{d:g}"
    nd = r.get("needle_depth")
    if nd is None:
        return None
    b = min(int(nd * DEPTH_BINS), DEPTH_BINS - 1)
    return b / DEPTH_BINS, f"{b / DEPTH_BINS:g}–{(b + 1) / DEPTH_BINS:g}"


def needle_heatmap(groups, task: str, out: Path) -> Path | None:
    """Accuracy per (needle depth, length) of ``task``, one panel per method config and placement.
    Depth: the requested one, or for random-depth samples the bin of the realised needle depth."""
    panels = []
    for g in groups:
        rs = [r for r in g.rows if r["task"] == task and _depth_cell(r) is not None]
        if rs:
            panels.append((g, rs))
    if not panels:
        return None
    depths = sorted({_depth_cell(r) for _, rs in panels for r in rs})
    lengths = sorted({r["length"] for _, rs in panels for r in rs})
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, layout="constrained",
                             figsize=(1.5 + (0.6 * len(lengths) + 0.9) * ncol, 1.0 + (0.42 * len(depths) + 0.9) * nrow))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    img = None
    for ax, (g, rs) in zip(axes.flat, panels):
        cells: dict[tuple, list] = defaultdict(list)
        for r in rs:
            cells[(_depth_cell(r), r["length"])].append(r["score"])
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (d, L), sc in cells.items():
            grid[depths.index(d), lengths.index(L)] = sum(sc) / len(sc)
        img = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = grid[i, j]
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}" if v in (0, 1) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [label for _, label in depths], fontsize=7)
        ax.set_title(textwrap.fill(g.name, 30), fontsize=8, fontweight="bold" if g.is_dense else "normal")
    fig.supxlabel("context length (tokens)", fontsize=9)
    fig.supylabel("needle depth (fraction of the context)", fontsize=9)
    fig.suptitle(f"{task}: accuracy by needle depth and context length (mean over {_cell_n(panels)} per cell)",
                 fontsize=10)
    fig.colorbar(img, ax=axes, shrink=0.8, label="accuracy (mean score; grey = no run)")
    return _save(fig, out / f"needle_{task}.png")


def _cell_n(panels) -> str:
    counts = set()
    for _, rs in panels:
        c: dict[tuple, int] = defaultdict(int)
        for r in rs:
            c[(_depth_cell(r), r["length"])] += 1
        counts |= set(c.values())
    lo, hi = min(counts), max(counts)
    return f"{lo} run{'s' if hi > 1 else ''}" if lo == hi else f"{lo}–{hi} runs"


# --------------------------------------------------------------------------------------------------
# accuracy vs budget


def _budget(g) -> float | None:
    """The measured attention density (telemetry), else a ratio ``budget`` setting, else None; for a
    peer (kvpress) group, its nominal KV share kept (``1 - compression_ratio``)."""
    if g.is_dense:
        return 1.0
    if getattr(g, "peer", None) is not None:
        return g.config.get("kv_kept_share")
    if g.stats.get("density") is not None:
        return g.stats["density"]
    b = g.config.get("budget")
    return b if isinstance(b, float) and 0 < b <= 1 else None


def accuracy_vs_budget(groups, out: Path) -> Path | None:
    style = _styles(groups)
    series: dict[tuple, list] = defaultdict(list)
    for g in groups:
        if not g.is_dense and _budget(g) is not None:
            series[(g.method, g.placement)].append(g)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for g in groups:
        if g.is_dense:
            y = 100 * g.stats["accuracy"]
            ax.axhline(y, color=DENSE_COLOR, lw=0.8, ls=style[g.name]["linestyle"], alpha=0.6)
            ax.plot(1.0, y, marker="*", ms=12, color=DENSE_COLOR, ls="none",
                    mfc="none" if g.placement == "after" else DENSE_COLOR, label=f"{g.name} (n={g.stats['n']})")
    for (method, placement), gs in sorted(series.items()):
        gs = sorted(gs, key=_budget)
        st = style[gs[0].name]
        ax.plot([_budget(g) for g in gs], [100 * g.stats["accuracy"] for g in gs], color=st["color"],
                ls=st["linestyle"], lw=1, alpha=0.6)
        for g in gs:
            ax.plot(_budget(g), 100 * g.stats["accuracy"], color=st["color"], marker=style[g.name]["marker"],
                    ls="none", ms=7, mfc="none" if placement == "after" else st["color"],
                    label=f"{g.name} (n={g.stats['n']})")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-3, 103)
    peers = sorted({g.peer for g in groups if getattr(g, "peer", None)})
    ax.set_xlabel("attention density kept (share of causal query–key pairs, from telemetry)"
                  + (f"\n{', '.join(peers)}: nominal KV share kept = 1 − compression_ratio" if peers else ""))
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs attention budget (filled: question inside, hollow: after)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, out / "accuracy_vs_budget.png")


# --------------------------------------------------------------------------------------------------
# latency vs context length


def scaling_exponent(xs, ys) -> float | None:
    """Least-squares slope of log y against log x (``y ∝ x^slope``); None with < 2 distinct x."""
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def _by_length(g, field: str):
    per: dict[int, list] = defaultdict(list)
    for r in g.rows:
        v = r.get(field)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            per[r["length"]].append((r.get("prompt_tokens") or r["length"], v))
    xs = [statistics.median(p for p, _ in per[L]) for L in sorted(per)]
    ys = [statistics.median(v for _, v in per[L]) for L in sorted(per)]
    return xs, ys


def _log_axes(ax, xticks) -> None:
    """Log-log axes with plain-number ticks (the measured lengths on x, 1-2-5 steps on y)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xticks, [f"{x:g}" for x in xticks])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")


def latency_vs_length(groups, out: Path) -> Path | None:
    if len({r["length"] for g in groups for r in g.rows}) < 2:
        return None
    style = _styles(groups)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), layout="constrained")
    panels = (("prefill_s", "prefill time (s), median"), ("decode_ms_per_token", "decode time (ms / token), median"))
    handles, labels = [], []
    for g in sorted(groups, key=lambda g: not g.is_dense):
        st = style[g.name]
        fits = []
        for ax, (field, _) in zip(axes, panels):
            xs, ys = _by_length(g, field)
            if not xs:
                fits.append(None)
                continue
            line, = ax.plot(xs, ys, color=st["color"], ls=st["linestyle"], marker=st["marker"],
                            lw=2.2 if g.is_dense else 1.2, ms=4)
            fits.append(scaling_exponent(xs, ys))
        fit = ", ".join(f"{name} ∝ L^{k:.2f}" for name, k in zip(("prefill", "decode"), fits) if k is not None)
        handles.append(line)
        labels.append(f"{g.name}: {fit}" if fit else g.name)
    xticks = sorted({r["length"] for g in groups for r in g.rows})  # the requested lengths
    for ax, (_, ylabel) in zip(axes, panels):
        _log_axes(ax, xticks)
        ax.set_xlabel("prompt length L (tokens, log scale)")
        ax.set_ylabel(f"{ylabel} (log scale)")
    axes[0].set_title("Prefill latency vs context length", fontsize=10)
    axes[1].set_title("Decode latency vs context length", fontsize=10)
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=7,
               title="least-squares scaling exponents: time ∝ L^k", title_fontsize=8)
    return _save(fig, out / "latency_vs_length.png")


# --------------------------------------------------------------------------------------------------
# accuracy vs speed-up


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better), by increasing x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def accuracy_vs_speedup(groups, out: Path) -> Path | None:
    pts = [(g, g.stats["speedup"], 100 * g.stats["accuracy"]) for g in groups
           if not g.is_dense and g.stats.get("speedup")]
    if not pts:
        return None
    style = _styles(groups)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    dense = [g for g in groups if g.is_dense]
    n_dense = sum(g.stats["n"] for g in dense)
    dense_acc = 100 * sum(g.stats["accuracy"] * g.stats["n"] for g in dense) / n_dense if dense else None
    if dense_acc is not None:
        ax.plot(1.0, dense_acc, marker="*", ms=14, color=DENSE_COLOR, ls="none",
                label=f"dense (speed-up 1 by definition, n={n_dense})")
    for g, x, y in pts:
        st = style[g.name]
        ax.plot(x, y, marker=st["marker"], color=st["color"], ls="none", ms=7,
                mfc="none" if g.placement == "after" else st["color"], label=f"{g.name} (n={g.stats['n']})")
    front = pareto_front([(x, y) for _, x, y in pts] + ([(1.0, dense_acc)] if dense_acc is not None else []))
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="grey", lw=1, ls=":", label="Pareto front")
    from matplotlib import ticker

    xs = [x for _, x, _ in pts] + [1.0]
    log = max(xs) / min(xs) > 8
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_xlabel("generation speed-up vs dense (median of per-sample ratios"
                  + (", log scale" if log else "") + "; >1 = faster)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Accuracy vs speed-up (filled: question inside, hollow: after)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(fig, out / "accuracy_vs_speedup.png")


# --------------------------------------------------------------------------------------------------
# per-layer fidelity


def per_layer(groups, out: Path) -> Path | None:
    """Attention-output error per layer (telemetry) and, for eviction methods, the share of the
    needle's tokens each layer held; one line per method config and placement."""
    err = [g for g in groups if g.per_layer.get("error")]
    held = [g for g in groups if g.per_layer.get("needle_held") and not g.is_peer_dense]
    if not err and not held:
        return None
    styles = _styles(groups)
    panels = [p for p in ((err, "error", "attention-output relative error vs dense\n(sampled query rows; 0 = exact)"),
                          (held, "needle_held", "share of the needle's tokens held\n(eviction methods; 1 = all)"))
              if p[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 3.2 * len(panels)), squeeze=False)
    for ax, (gs, key, ylabel) in zip(axes[:, 0], panels):
        ax.axhline(0.0 if key == "error" else 1.0, color=DENSE_COLOR, linewidth=1.5,
                   label="dense (exact)" if key == "error" else "dense / full cache (all held)")
        for g in gs:
            d = g.per_layer[key]
            st = styles[g.name]
            ax.plot(list(d), list(d.values()), label=textwrap.shorten(g.name, 60), color=st["color"],
                    linestyle=st["linestyle"], marker=st["marker"], markersize=3, linewidth=1.2)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=max(1.05, ax.get_ylim()[1]) if key == "needle_held" else None)
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0, 0].set_title("Per-layer fidelity (mean over runs)")
    return _save(fig, out / "per_layer.png")


# --------------------------------------------------------------------------------------------------


def make_all(rows, groups, out: Path) -> dict[str, Path]:
    """Every plot the results allow: ``{title: path}``."""
    made: dict[str, Path] = {}
    for task in sorted({r["task"] for r in rows if r.get("depth") is not None or r.get("needle_depth") is not None}):
        p = needle_heatmap(groups, task, out)
        if p:
            made[f"Needle retrieval: {task}"] = p
    for title, fn in (("Accuracy vs attention budget", accuracy_vs_budget),
                      ("Latency vs context length", latency_vs_length),
                      ("Accuracy vs speed-up", accuracy_vs_speedup),
                      ("Per-layer fidelity", per_layer)):
        p = fn(groups, out)
        if p:
            made[title] = p
    return made
