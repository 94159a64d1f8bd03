"""The executor microbenchmark: rows, correctness gate, input validation, CLI wiring, table.

Tiny sizes only; timings are never asserted.
"""

import json

import pytest
import torch

from tokensparse.bench import executors as bx
from tokensparse.cli import main, make_parser

VARIANTS = {
    ("prefill", "dense_attention", None),
    ("prefill", "compress_attend_scatter", "query"),
    ("prefill", "compress_attend_scatter", "kv"),
    ("decode", "dense_attention", None),
    ("decode", "gather_attend", "kv"),
    ("decode", "segments_attend", "kv"),
}


@pytest.fixture(scope="module")
def result():
    return bx.run(lengths=[128], densities=[0.25, 1.0], repeats=1, decode_calls=3, warmup=1)


def test_run_returns_every_variant_with_small_errors(result):
    assert result["kind"] == "attention executors"
    assert {"torch", "threads", "loadavg"} <= result["env"].keys()
    assert result["env"]["dtype"] == "float32" and result["env"]["device"] == "cpu"
    rows = result["results"]
    assert len(rows) == 2 * len(VARIANTS)
    for rho in (0.25, 1.0):
        got = {(r["case"], r["executor"], r.get("idx_heads")) for r in rows if r["density"] == rho}
        assert got == VARIANTS
    for r in rows:
        assert r["length"] == 128 and r["ms"]["n"] == 1
        assert 0 < r["ms"]["min"] <= r["ms"]["median"] <= r["ms"]["max"]
        assert r["speedup_vs_dense"] > 0 and r["ideal_speedup"] > 0
        assert r["max_abs_err"] < 1e-4
        if r["executor"] == "dense_attention":
            assert r["n"] == 128 and r["ideal_speedup"] == 1.0
        else:
            assert r["n"] == round(r["density"] * 128)
            expected = (1 / r["density"]) ** (2 if r["case"] == "prefill" else 1)
            assert r["ideal_speedup"] == pytest.approx(expected)
    seg = next(r for r in rows if r["executor"] == "segments_attend" and r["density"] == 0.25)
    assert sum(seg["segments"].values()) == 32
    json.dumps(result)  # serialisable as written by --json


def test_random_selection_is_sorted_distinct_and_keeps_the_tail():
    idx = bx.random_selection(100, 30, heads=4, keep_last=16, batch=2, generator=torch.Generator().manual_seed(1))
    assert idx.shape == (2, 4, 30)
    assert bool((idx[..., 1:] > idx[..., :-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < 100
    assert bool((idx[..., -16:] == torch.arange(84, 100)).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"densities": [0.0]}, "densities"),
        ({"densities": [1.5]}, "densities"),
        ({"densities": []}, "densities"),
        ({"lengths": [32]}, "lengths"),
        ({"repeats": 0}, "repeats"),
        ({"q_heads": 4, "kv_heads": 3}, "multiple"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"lengths": [64], "densities": [0.5], "repeats": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        bx.run(**args)


def test_a_wrong_executor_fails_the_check(monkeypatch):
    monkeypatch.setattr(bx, "gather_attend", lambda q, k, v, idx, scale: torch.zeros_like(q))
    with pytest.raises(RuntimeError, match="decode gather .* max abs error"):
        bx.run(lengths=[64], densities=[0.5], repeats=1, decode_calls=1, warmup=0)


def test_format_table_has_one_line_per_row(result):
    text = bx.format_table(result)
    lines = text.splitlines()
    assert "ms median [min–max]" in lines[0] and "vs dense" in lines[0] and "max err" in lines[0]
    body = [ln for ln in lines[2:] if ln.strip() and not ln.startswith("(")]
    assert len(body) == len(result["results"])
    assert "segments_attend, 4 sink + 12 gathered + 16 local" in text and "16.0×" in text


def test_cli_parser_accepts_densities_and_other_kinds_ignore_them():
    args = make_parser().parse_args(["bench", "executors", "--lengths", "2048,4096", "--densities", "0.1,0.25",
                                     "--repeats", "5", "--json", "out.json"])
    assert (args.what, args.lengths, args.densities, args.repeats, args.json) == ("executors", "2048,4096", "0.1,0.25", 5, "out.json")
    assert args.device == "cpu"
    args = make_parser().parse_args(["bench", "prefill"])
    assert args.densities is None and args.lengths is None and args.repeats is None


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--densities", "0,0.5"], "--densities"),
        (["--densities", "a,b"], "--densities"),
        (["--densities", "1.2"], "--densities"),
        (["--lengths", "32"], "--lengths"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_cli_rejects_bad_inputs(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["bench", "executors", *argv])


def test_cli_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["bench", "executors", "--lengths", "64", "--densities", "0.5", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gather_attend" in out and "results written to" in out
    saved = json.loads(path.read_text())
    assert saved["kind"] == "attention executors" and len(saved["results"]) == len(VARIANTS)
