"""The Markdown report and plots (tokensparse.eval.report / plots) from the fixed synthetic results
in tests/data/eval_results.jsonl (written by tests/data/make_eval_fixture.py), and the pairing,
ratio and fitting helpers on hand-made rows."""

import copy
import json
from pathlib import Path

import matplotlib.image
import pytest

from tokensparse.eval import plots, report

FIXTURE = Path(__file__).parent / "data" / "eval_results.jsonl"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report.write_report(FIXTURE, out), out


def test_markdown_has_the_tables(written):
    md_path, _ = written
    md = md_path.read_text()
    assert md.startswith("# tokensparse evaluation report")
    assert "64 runs from" in md and "1 failed run" in md
    assert "| method (settings) | placement | n | accuracy | Δ vs dense (paired) |" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| `")]
    summary = lines[:8]
    assert summary[0].startswith("| `dense` | inside | 8 |") and summary[1].startswith("| `dense` | after | 8 |")
    assert any(ln.startswith("| `snapkv(budget=0.25)` | after | 8 |") for ln in summary)
    assert "| `token_select(budget=16)` | inside | 1 | ValueError: token_select: budget too small |" in md
    for text in ("**passkey**", "**niah_multikey**", "| L=1024 | L=4096 |", "torch threads: `2`",
                 "git commit: `0000000", "tokensparse eval --suite fixture", "load average"):
        assert text in md
    for png in ("needle_passkey.png", "accuracy_vs_budget.png", "latency_vs_length.png", "accuracy_vs_speedup.png",
                "per_layer.png"):
        assert f"]({png})" in md
    assert "## Time inside attention and peak memory" in md and "## Per-layer fidelity" in md
    assert "| attn output error |" in md and "| attention speed-up (prefill) |" in md
    # snapkv's fixture needle retention rises with depth: layer 0 held least; error is worst in layer 3
    snap = next(ln for ln in md.split("## Per-layer fidelity")[1].splitlines()
                if ln.startswith("| `snapkv(budget=0.25)` | after |"))
    assert "| L3 0.38, L2 0.25, L1 0.13 |" in snap and "| L0 0.41, L1 0.49, L2 0.57 |" in snap


def test_summary_numbers_match_a_hand_computation():
    rows, errors = report.load_results(FIXTURE)
    assert len(rows) == 64 and len(errors) == 1
    groups = {g.name: g for g in report.summarize(rows)}
    dense = [r for r in rows if r["label"] == "dense" and r["placement"] == "inside"]
    snap = [r for r in rows if r["label"] == "snapkv(budget=0.25)" and r["placement"] == "inside"]
    g = groups["snapkv(budget=0.25) [inside]"]
    assert g.stats["n"] == 8 and g.stats["accuracy"] == pytest.approx(sum(r["score"] for r in snap) / 8)
    by_sample = {r["sample_id"]: r for r in dense}
    ratios = sorted(by_sample[r["sample_id"]]["prefill_s"] / r["prefill_s"] for r in snap)
    assert g.stats["prefill_speedup"] == pytest.approx((ratios[3] + ratios[4]) / 2)
    delta = sum(r["score"] - by_sample[r["sample_id"]]["score"] for r in snap) / 8
    assert g.stats["delta_vs_dense"] == pytest.approx(delta)
    assert g.stats["wins"] == sum(r["score"] > by_sample[r["sample_id"]]["score"] for r in snap)
    assert g.stats["losses"] == sum(r["score"] < by_sample[r["sample_id"]]["score"] for r in snap)
    assert g.stats["wins"] + g.stats["losses"] > 0  # the fixture has both kinds of sample
    assert report._delta(g.stats) == f"{100 * delta:+.1f} pt (↑{g.stats['wins']} ↓{g.stats['losses']})"
    assert g.stats["density"] == pytest.approx(0.27) and g.stats["kv_ratio"] == pytest.approx(0.26, abs=0.01)
    assert g.stats["error"] == pytest.approx((1 - 0.81) / 2)
    attn = sorted(by_sample[r["sample_id"]]["attention_prefill_s"] / r["attention_prefill_s"] for r in snap)
    assert g.stats["attn_prefill_speedup"] == pytest.approx((attn[3] + attn[4]) / 2)
    added = sorted((r["memory"]["peak_rss_bytes"] - r["memory"]["rss_start_bytes"]) / 2**20 for r in snap)
    assert g.stats["peak_added_mib"] == pytest.approx((added[3] + added[4]) / 2)
    assert g.per_layer["error"] == pytest.approx({i: (1 - 0.81) * i / 3 for i in range(4)}, abs=1e-4)
    assert list(g.per_layer["needle_held"]) == [0, 1, 2, 3]


def test_pngs_exist_and_are_not_blank(written):
    _, out = written
    for name in ("needle_passkey.png", "accuracy_vs_budget.png", "latency_vs_length.png", "accuracy_vs_speedup.png",
                 "per_layer.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05
    assert not (out / "needle_niah_multikey.png").exists()  # no requested depths for that task


def test_pairing_prefers_same_run_and_placement():
    base = {"task": "passkey", "task_options": {}, "length": 100, "depth": 0.5, "seed": 0, "index": 0,
            "model": {"fingerprint": "f", "dtype": "float32"}, "score": 1.0, "new_tokens": 3,
            "decode_ms_per_token": 10.0, "kv_bytes": 1000}

    def row(method, placement, run, prefill, **kw):
        return {**copy.deepcopy(base), "method": method, "label": method, "config": {"method": method},
                "placement": placement, "run_id": run, "prefill_s": prefill, **kw}

    rows = [row("dense", "inside", "old", 9.0), row("dense", "after", "new", 4.0), row("dense", "inside", "new", 2.0),
            row("snapkv", "after", "new", 1.0, kv_bytes=250), row("snapkv", "inside", "new", 1.0, score=0.0),
            row("snapkv", "inside", "other", 3.0, length=200)]  # no dense row for this sample
    paired = report.pair_with_dense(rows)
    assert paired[id(rows[3])] is rows[1] and paired[id(rows[4])] is rows[2] and id(rows[5]) not in paired
    groups = {g.name: g for g in report.summarize(rows)}
    after = groups["snapkv [after]"].stats
    assert after["prefill_speedup"] == 4.0 and after["kv_ratio"] == 0.25 and after["delta_vs_dense"] == 0.0
    assert after["speedup"] == pytest.approx((4.0 + 0.02) / (1.0 + 0.02))  # prefill + 2 timed decode steps
    inside = groups["snapkv [inside]"].stats
    assert inside["n"] == 2 and inside["paired"] == 1 and inside["delta_vs_dense"] == -1.0


def test_load_results_dedupes_and_errors(tmp_path):
    ok = {"key": "k", "method": "dense", "label": "dense", "score": 1.0}
    (tmp_path / "a.jsonl").write_text(json.dumps({**ok, "error": "boom"}) + "\n" + json.dumps(ok) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"key": "k2", "error": "bad"}) + "\n")
    rows, errors = report.load_results(tmp_path)
    assert rows == [ok] and [e["key"] for e in errors] == ["k2"]
    with pytest.raises(FileNotFoundError, match="does not exist; pass a results directory or a .jsonl file"):
        report.load_results(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no \\*.jsonl result files; run `tokensparse eval"):
        report.load_results(empty)
    (empty / "only_errors.jsonl").write_text(json.dumps({"key": "k3", "error": "bad"}) + "\n")
    with pytest.raises(ValueError, match="no successful runs .* \\(1 failed runs\\)"):
        report.write_report(empty, tmp_path / "out")


def test_scaling_exponent_and_pareto_front():
    xs = [1000, 2000, 4000, 8000]
    assert plots.scaling_exponent(xs, [3e-7 * x ** 1.7 for x in xs]) == pytest.approx(1.7)
    assert plots.scaling_exponent([1000, 1000], [1.0, 2.0]) is None
    pts = [(1.0, 90.0), (2.0, 80.0), (1.5, 70.0), (3.0, 80.0), (0.5, 95.0)]
    assert plots.pareto_front(pts) == [(0.5, 95.0), (1.0, 90.0), (3.0, 80.0)]


def test_kv_kept_share_comes_from_the_method_phase():
    def group(method, budget):
        return report.Group(label=method, method=method, placement="inside", config={"budget": budget})

    assert group("snapkv", 0.25).kv_kept_share == 0.25 and group("streaming_llm", 0.5).kv_kept_share == 0.5
    assert group("token_select", 0.25).kv_kept_share is None  # decode selection keeps the whole cache
    assert group("snapkv", 256).kv_kept_share is None  # a token count is not a share
    assert group(report.DENSE, None).kv_kept_share == 1.0


# ---- paired statistics and speed next to accuracy ------------------------------------------------


def test_paired_section_matches_the_stats_module(written):
    rows, _ = report.load_results(FIXTURE)
    groups = report.summarize(rows)
    tests = report.paired_tests(rows, groups)
    by = {(t["group"].name, t["task"]): t for t in tests}
    dense = {r["sample_id"]: r for r in rows if r["label"] == "dense" and r["placement"] == "after"}
    snap = [r for r in rows if r["label"] == "snapkv(budget=0.25)" and r["placement"] == "after"]
    t = by[("snapkv(budget=0.25) [after]", "all tasks")]
    from tokensparse.eval import stats

    diffs = [r["score"] - dense[r["sample_id"]]["score"] for r in snap]
    assert t["acc"] == stats.paired(diffs) and t["n"] == len(snap) == 8
    assert {t2["task"] for (name, _), t2 in by.items() if name == "snapkv(budget=0.25) [after]"} == {
        "all tasks", "passkey", "niah_multikey"}
    md = written[0].read_text()
    assert "## Paired differences vs dense, per method and task" in md
    assert "| Δ accuracy, pt [95% CI] | ↑/↓/= | sign p | Δ loglik, nats [95% CI] |" in md
    assert not any(t["group"].is_dense for t in tests)


def test_speed_next_to_accuracy_matches_configs_exactly(tmp_path):
    rows, _ = report.load_results(FIXTURE)
    snap_cfg = next(r["config"] for r in rows if r["label"] == "snapkv(budget=0.25)")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"kind": "decode", "results": [
        {"length": 8193, "variant": "same config", "config": snap_cfg, "ms_per_token": {"median": 50.0},
         "speedup_vs_dense_prealloc": 1.5},
        {"length": 8193, "variant": "another config", "config": {**snap_cfg, "budget": 0.3},
         "ms_per_token": {"median": 40.0}, "speedup_vs_dense_prealloc": 2.0},
        {"length": 8193, "variant": "dense", "ms_per_token": {"median": 75.0}},  # no config: not a method row
        {"length": 4100, "variant": "at 4K", "config": snap_cfg, "ms_per_token": {"median": 50.0},
         "speedup_vs_dense_prealloc": 1.2},
    ]}))
    md = report.write_report(FIXTURE, tmp_path / "r", plots=False, bench=[bench]).read_text()
    sec = md.split("## Speed next to accuracy, same configurations")[1].split("\n## ")[0]
    same = [ln for ln in sec.splitlines() if "| same config |" in ln]
    assert len(same) == 2 and {("| inside |" in ln, "| after |" in ln) for ln in same} == {(True, False), (False, True)}
    assert all("| 1.50× |" in ln and "`snapkv(budget=0.25)`" in ln for ln in same)
    # the fixture has no run at 8K: accuracy comes from the lengths it has, and the row says so
    assert all("| **no**: at 1024, 4096 |" in ln for ln in same)
    other = [ln for ln in sec.splitlines() if "| another config |" in ln]
    assert len(other) == 1 and "no accuracy measured for this config" in other[0]
    assert "| dense |" not in sec
    at4k = [ln for ln in sec.splitlines() if "| at 4K |" in ln]
    assert len(at4k) == 2 and all("| yes |" in ln for ln in at4k)
    n4k = sum(1 for r in rows if r["label"] == "snapkv(budget=0.25)" and r["placement"] == "after" and r["length"] == 4096)
    assert any(f"| yes | {n4k} |" in ln for ln in at4k)


def test_needle_heatmap_bins_the_realised_depth_of_random_depth_samples(tmp_path):
    rows, _ = report.load_results(FIXTURE)
    rnd = []
    for i, r in enumerate(r for r in rows if r["task"] == "passkey"):
        r = copy.deepcopy(r)
        r.update(task="random_depth_task", depth=None, needle_depth=(i % 8) / 8 + 0.01)
        rnd.append(r)
    assert [plots._depth_cell(r) for r in rnd[:3]] == [(0.0, "0–0.25"), (0.0, "0–0.25"), (0.25, "0.25–0.5")]
    assert plots._depth_cell({"depth": 0.3}) == (0.3, "0.3") and plots._depth_cell({"depth": None}) is None
    assert plots._depth_cell({"depth": None, "needle_depth": 1.0}) == (0.75, "0.75–1")
    made = plots.make_all(rnd, report.summarize(rnd), tmp_path)
    png = made["Needle retrieval: random_depth_task"]
    assert png.name == "needle_random_depth_task.png" and matplotlib.image.imread(png).shape[0] > 100
