"""Peer libraries in the evaluation harness (kvpress): the grid's ``peers`` section, the runner's
peer stage with a fake ``run_kvpress`` (rows converted into the runner's schema, same token ids,
resume, skip, missing env), the report's peer tables, the ``--skip-peers`` flag; and, marked slow,
the real worker in ``.venv-kvpress`` when it exists."""

import argparse
import ast
import json
from pathlib import Path

import pytest
import torch

import tokensparse as ts
from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)
from tokensparse.eval import grid as G
from tokensparse.eval import metrics, report, runner, tasks
from tokensparse.eval.commands import add_commands
from tokensparse.eval.harness import encode_sample
from tokensparse.eval.peers import kvpress as kvpress_peer
from tokensparse.testing import tiny_model

torch.set_num_threads(1)

PEER = {"peer": "kvpress", "presses": [["snapkv", 0.5], "tova:0.75"], "placements": ["inside", "after"],
        "include_dense": ["inside"]}
CONFIG = {
    "name": "tiny",
    "lengths": [160],
    "max_new_tokens": 4,
    "telemetry": False,
    "tasks": [{"task": "passkey", "depths": [0.3]}],
    "methods": [{"method": "snapkv", "configs": [{"budget": 0.5, "window": 8}], "placements": ["after"]}],
    "dense_placements": ["inside", "after"],
    "peers": [PEER],
}


# --------------------------------------------------------------------------------------------------
# the grid


def test_peer_runs_from_every_press_form():
    g = G.build_grid({**CONFIG, "peers": [{"peer": "kvpress", "placements": ["after"], "compression_ratios": [0.5, 0.75],
                                           "presses": [["snapkv", 0.5], "tova:0.75", "dense", "knorm",
                                                       {"press": "expected_attention", "compression_ratio": 0.25}]}]})
    runs = [(r.label, r.placement, r.kv_kept_share) for r in g.peer_runs()]
    assert runs == [
        ("kvpress:dense", "after", 1.0),
        ("kvpress:snapkv(compression_ratio=0.5)", "after", 0.5),
        ("kvpress:tova(compression_ratio=0.75)", "after", 0.25),
        ("kvpress:knorm(compression_ratio=0.5)", "after", 0.5),
        ("kvpress:knorm(compression_ratio=0.75)", "after", 0.25),
        ("kvpress:expected_attention(compression_ratio=0.25)", "after", 0.75),
    ]
    snap = g.peer_runs()[1]
    assert snap.name == "kvpress:snapkv" and snap.full_config() == {
        "method": "kvpress:snapkv", "peer": "kvpress", "press": "snapkv", "compression_ratio": 0.5, "kv_kept_share": 0.5}
    assert g.size() == (1, 3) and g.peer_size() == 6  # tokensparse runs and peer runs are counted apart


def test_peer_placements_dense_and_duplicates():
    g = G.build_grid({**CONFIG, "placements": ["after"],
                      "peers": [PEER, {"peer": "kvpress", "presses": ["snapkv:0.5"]}]})  # a duplicate run
    assert [(r.label, r.placement) for r in g.peer_runs()] == [
        ("kvpress:dense", "inside"),
        ("kvpress:snapkv(compression_ratio=0.5)", "inside"), ("kvpress:tova(compression_ratio=0.75)", "inside"),
        ("kvpress:snapkv(compression_ratio=0.5)", "after"), ("kvpress:tova(compression_ratio=0.75)", "after"),
        ("kvpress:dense", "after"),  # the second entry's own dense run; its snapkv run was already there
    ]
    assert [len(p.runs) for p in g.peers] == [5, 1]
    default = G.build_grid({**CONFIG, "placements": ["after"], "peers": [{"peer": "kvpress", "presses": ["knorm:0.5"]}]})
    assert [(r.press, r.placement) for r in default.peer_runs()] == [("dense", "after"), ("knorm", "after")]
    none = G.build_grid({**CONFIG, "peers": [{**PEER, "include_dense": False}]})
    assert all(r.press != "dense" for r in none.peer_runs())
    assert G.build_grid({**CONFIG, "peers": []}).peer_runs() == []
    assert G.build_grid(G.apply_overrides(CONFIG, ["skip_peers=true"])).skip_peers


@pytest.mark.parametrize("peers, message", [
    ([{"peer": "vllm", "presses": ["snapkv:0.5"]}], r"peers.0: unknown peer 'vllm'; supported: kvpress"),
    ([{"peer": "kvpress", "presses": ["snapkvv:0.5"]}], r"peers.0.presses.0: unknown kvpress press 'snapkvv'; known: dense, snapkv"),
    ([{"peer": "kvpress", "presses": [["snapkv", 1.0]]}], r"compression_ratio of 'snapkv' must be a number in \[0, 1\)"),
    ([{"peer": "kvpress", "presses": [["snapkv", -0.1]]}], r"must be a number in \[0, 1\) \(the share of the KV cache removed"),
    ([{"peer": "kvpress", "presses": ["tova:half"]}], r"compression_ratio of 'tova' must be a number in \[0, 1\) .*, got 'half'"),
    ([{"peer": "kvpress", "presses": [{"press": "tova", "compression_ratio": True}]}], r"got True"),
    ([{"peer": "kvpress", "presses": ["tova"]}], r"press 'tova' needs a compression ratio"),
    ([{"peer": "kvpress", "presses": ["tova"], "compression_ratios": [0.5, 1]}], r"compression_ratios.*\[0, 1\)"),
    ([{"peer": "kvpress", "presses": []}], r"peers.0.presses must be a non-empty list"),
    ([{"peer": "kvpress", "presses": [42]}], r"peers.0.presses.0 must be \"name:ratio\""),
    ([{"peer": "kvpress", "presses": ["dense:0.5"]}], r"dense takes no compression ratio"),
    ([{"peer": "kvpress", "presses": ["dense"], "include_dense": False}], r"'dense' is listed in presses"),
    ([{"peer": "kvpress", "presses": ["tova:0.5"], "placements": ["before"]}], r"peers.0.placements must be a list"),
    ([{"peer": "kvpress", "presses": ["tova:0.5"], "ratio": 0.5}], r"peers.0: unknown keys \['ratio'\]; allowed: peer"),
    ([{"peer": "kvpress", "presses": ["tova:0.5"], "timeout_s": 0}], r"timeout_s must be null or a number"),
    ([{"peer": "kvpress", "presses": ["tova:0.5"], "include_dense": "yes"}], r"include_dense"),
    ([{"presses": ["tova:0.5"]}], r"peers.0 must be an object with a 'peer' key"),
    ({"peer": "kvpress"}, r"'peers' must be a list"),
])
def test_bad_peers_name_the_fix(peers, message):
    with pytest.raises(G.ConfigError, match=message):
        G.build_grid({**CONFIG, "peers": peers})


def test_skip_peers_must_be_bool():
    with pytest.raises(G.ConfigError, match="skip_peers must be true or false"):
        G.build_grid({**CONFIG, "skip_peers": "yes"})


def test_press_names_match_the_worker():
    """``kvpress.PRESSES`` (validated in the main env) lists exactly the worker's factories."""
    tree = ast.parse(Path(kvpress_peer.WORKER).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_press_factories")
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    assert tuple(k.value for k in ret.value.keys) == kvpress_peer.PRESSES
    for name in ("snapkv", "streaming_llm", "expected_attention", "tova", "knorm"):
        assert name in kvpress_peer.PRESSES


def test_worker_measures_without_autograd():
    """The worker's timed ``run_one`` runs under ``torch.no_grad`` (with autograd on, its prefill
    was slower and its peak RSS 4× higher; this env cannot import the worker, so read its source)."""
    tree = ast.parse(Path(kvpress_peer.WORKER).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_one")
    assert any(ast.unparse(d) == "torch.no_grad()" for d in fn.decorator_list)


def test_standard_suite_has_matched_kvpress_presses():
    std = G.build_grid(G.load_suite("standard"))
    ts_runs = {(m.name, m.settings["budget"], m.placement) for m in std.methods
               if m.name in ("snapkv", "streaming_llm", "tova")}
    runs = std.peer_runs()
    assert {r.press for r in runs} == {"dense", "snapkv", "streaming_llm", "tova"}
    peer_runs = {(r.press, r.kv_kept_share, r.placement) for r in runs if r.press != "dense"}
    assert ts_runs == peer_runs  # every tokensparse eviction run has a kvpress twin at the same kept share
    assert all(p.lengths == [2048] for p in std.peers) and std.peer_size() == 35 * 5
    assert not std.skip_peers
    smoke = G.build_grid(G.load_suite("smoke"))
    assert smoke.peers == [] and smoke.peer_size() == 0
    v1 = G.build_grid(G.load_suite("passkey"))
    assert {r.press for r in v1.peer_runs()} == {"dense", "snapkv", "streaming_llm", "expected_attention", "tova", "knorm"}


def test_peer_lengths_filter_and_errors():
    base = {"tasks": [{"task": "passkey", "depths": [0.5]}], "lengths": [128, 256]}
    g = G.build_grid({**base, "peers": [{"peer": "kvpress", "presses": [["snapkv", 0.5]], "lengths": [256],
                                         "include_dense": False}]})
    assert g.peer_size() == 1 and g.peers[0].lengths == [256]
    for bad in ([], [0], "256", [True]):
        with pytest.raises(G.ConfigError, match="lengths must be null or a non-empty list"):
            G.build_grid({**base, "peers": [{"peer": "kvpress", "presses": [["snapkv", 0.5]], "lengths": bad}]})


# --------------------------------------------------------------------------------------------------
# the runner, with a fake worker


class FakeKvpress:
    """Stands in for ``run_kvpress``: records each call and returns worker-style rows (dense and
    SnapKV find the pass key, the others do not)."""

    def __init__(self, fail_after: int | None = None, exc: BaseException | None = None):
        self.calls = []
        self.fail_after = fail_after
        self.exc = exc or kvpress_peer.KvpressWorkerError("kvpress worker exited with status 1: boom")

    def __call__(self, samples, presses, placement, out_path, threads=1, python=None, *, model_dir=None,
                 timeout=None, echo=True):
        self.calls.append({"samples": samples, "presses": list(presses), "placement": placement,
                           "out_path": Path(out_path), "threads": threads, "model_dir": model_dir})
        rows = []
        for s in samples:
            for name, ratio in presses:
                hit = name in ("dense", "snapkv")
                rows.append({
                    "sample_id": s["sample_id"], "peer": "kvpress", "peer_version": "0.5.5",
                    "press": {"dense": "none", "snapkv": "SnapKVPress", "tova": "TOVAPress"}[name],
                    "press_spec": name, "compression_ratio": float(ratio), "placement": placement,
                    "task": s["task"], "answers": s["answers"], "max_new_tokens": s["max_new_tokens"],
                    "prediction": f" {s['answers'][0]}." if hit else " I do not know",
                    "generated_ids": [5, 6, 7], "prefill_tokens": len(s["context_ids"]),
                    "context_tokens": len(s["context_ids"]), "question_tokens": len(s["question_ids"]),
                    "prefill_s": 0.02, "compress_s": 0.001 if name != "dense" else 0.0, "question_s": 0.01,
                    "ttft_s": 0.03, "decode_ms_per_token": 4.0, "decode_steps": 2,
                    "kv_kept_per_layer": [int(len(s["context_ids"]) * (1 - ratio))] * 2,
                    "kv_bytes": int(4000 * (1 - ratio)), "kv_bytes_end": int(4000 * (1 - ratio)) + 100,
                    "answer_loglik": -1.5 if s.get("answer_ids") else None,
                    "needle_kept_per_layer": [1.0, 0.5], "needle_kept_mean": 0.75, "needle_kept_min": 0.5,
                    "error": None, "loadavg_1m": 0.5,
                    "env": {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.2.0", "kvpress": "0.5.5",
                            "threads": threads},
                })
        if self.fail_after is not None:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            with open(out_path, "a") as f:
                for r in rows[: self.fail_after]:
                    f.write(json.dumps(r) + "\n")
            raise self.exc
        return rows


@pytest.fixture
def fake(monkeypatch):
    f = FakeKvpress()
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: True)
    monkeypatch.setattr(kvpress_peer, "run_kvpress", f)
    return f


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_peer_rows_are_converted_and_appended(model, tok, fake, model_dir, tmp_path):
    grid = G.build_grid(CONFIG)
    out = runner.run_grid(model, tok, grid, tmp_path, progress=False, command="pytest", peer_model_dir=model_dir)
    assert out == {"path": str(tmp_path / "tiny.jsonl"), "total": 8, "skipped": 0, "ran": 8, "errors": 0,
                   "peer_runs": 5, "peers_skipped": 0}
    rows = runner.read_rows(out["path"])
    assert [(r["method"], r["placement"]) for r in rows] == [
        ("dense", "inside"), ("dense", "after"), ("snapkv", "after"),  # tokensparse first
        ("kvpress:dense", "inside"), ("kvpress:snapkv", "inside"), ("kvpress:tova", "inside"),
        ("kvpress:snapkv", "after"), ("kvpress:tova", "after")]
    # one worker call per placement, with the runner's token ids, answer ids and needle positions
    assert [(c["placement"], c["presses"]) for c in fake.calls] == [
        ("inside", [("dense", 0.0), ("snapkv", 0.5), ("tova", 0.75)]), ("after", [("snapkv", 0.5), ("tova", 0.75)])]
    sample = tasks.make_samples("passkey", tok, 160, depth=0.3)[0]
    ctx, q = encode_sample(tok, sample)
    sent = fake.calls[0]["samples"][0]
    assert sent["context_ids"] == ctx[0].tolist() and sent["question_ids"] == q[0].tolist()
    assert sent["answer_ids"] == tok(runner.answer_target(sample), add_special_tokens=False).input_ids
    assert sent["max_new_tokens"] == 4 and sent["sample_id"].startswith(sample.sample_id + "#")
    assert sent["needle_positions"] == tasks.needle_token_positions(sample, tok)  # the context comes first
    assert sample.answers[0] in tok.decode([sent["context_ids"][i] for i in sent["needle_positions"]])
    assert fake.calls[0]["model_dir"] == model_dir and fake.calls[0]["threads"] == 1
    assert fake.calls[0]["out_path"].parent == tmp_path / "tiny.peers"

    dense = rows[0]
    assert fake.calls[0]["out_path"].name == f"{dense['run_id']}-kvpress-inside.jsonl"  # one per run of the grid
    peer_rows = rows[3:]
    for r in peer_rows:
        assert "error" not in r
        for k in ("task", "task_options", "length", "depth", "seed", "index", "model", "suite", "run_id",
                  "sample_id", "needle_depth", "answers", "metric"):
            assert r[k] == dense[k], k
        assert r["prompt_tokens"] == dense["prompt_tokens"] == ctx.shape[1] + q.shape[1]
        assert r["score"] == metrics.score(r["prediction"], r["answers"], r["metric"]) and r["correct"] == (r["score"] == 1)
        assert r["prefill_s"] == 0.03 and r["decode_ms_per_token"] == 4.0 and r["new_tokens"] == 3
        assert r["kv_bytes"] == r["peer"]["kv_bytes_end"] and r["peer"]["kv_bytes"] < r["kv_bytes"]
        assert r["answer_loglik"] == -1.5 and r["answer_tokens"] == len(sent["answer_ids"])
        assert r["loglik_target"] == runner.answer_target(sample)
        assert r["telemetry"] is None and r["fidelity"] is None and r["stats"] == {}
        assert r["kv_kept_share"] == pytest.approx(1 - r["compression_ratio"])
        assert r["config"]["kv_kept_share"] == r["kv_kept_share"] and r["config"]["peer"] == "kvpress"
        assert r["env"]["versions"]["kvpress"] == "0.5.5" and r["env"]["versions"]["transformers"] == "5.2.0"
        assert r["env"]["versions"]["tokensparse"] == dense["env"]["versions"]["tokensparse"]
        assert r["env"]["command"] == "pytest" and r["env"]["git"] == dense["env"]["git"]
        assert r["peer"]["name"] == "kvpress" and r["peer"]["needle_kept_mean"] == 0.75
    snap = peer_rows[1]
    assert snap["label"] == "kvpress:snapkv(compression_ratio=0.5)" and snap["score"] == 1.0
    assert snap["config"] == {"method": "kvpress:snapkv", "peer": "kvpress", "press": "snapkv",
                              "compression_ratio": 0.5, "kv_kept_share": 0.5}
    assert snap["peer"]["press"] == "SnapKVPress" and peer_rows[2]["score"] == 0.0
    assert len({r["key"] for r in rows}) == 8


def test_peer_runs_resume(model, tok, fake, model_dir, tmp_path):
    grid = G.build_grid({**CONFIG, "answer_loglik": False})
    path = tmp_path / "res.jsonl"
    runner.run_grid(model, tok, grid, path, progress=False, peer_model_dir=model_dir)
    assert len(fake.calls) == 2
    text = path.read_text()
    again = runner.run_grid(model, tok, grid, path, progress=False, peer_model_dir=model_dir)
    assert again["ran"] == 0 and again["skipped"] == 8 and len(fake.calls) == 2 and path.read_text() == text
    # drop one peer row: only that press of that placement is asked of the worker again
    rows = runner.read_rows(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "kvpress:tova(compression_ratio=0.75)"
                            or r["placement"] != "after"))
    third = runner.run_grid(model, tok, grid, path, progress=False, peer_model_dir=model_dir)
    assert third["ran"] == 1 and fake.calls[-1]["presses"] == [("tova", 0.75)] and fake.calls[-1]["placement"] == "after"
    assert sorted(r["key"] for r in runner.read_rows(path)) == sorted(r["key"] for r in rows)
    # no answer ids when the grid has no likelihood pass
    assert "answer_ids" not in fake.calls[0]["samples"][0]
    assert all(r["answer_loglik"] is None for r in runner.read_rows(path))


def test_worker_failure_keeps_written_rows_and_retries_the_rest(model, tok, monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: True)
    broken = FakeKvpress(fail_after=1)
    monkeypatch.setattr(kvpress_peer, "run_kvpress", broken)
    cfg = {**CONFIG, "methods": [], "peers": [{**PEER, "placements": ["inside"]}]}
    out = runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False, peer_model_dir=model_dir)
    assert out["ran"] == 3 and out["errors"] == 2  # 2 tokensparse dense runs + the worker's one row; 2 failed
    rows = runner.read_rows(out["path"])
    failed = [r for r in rows if r.get("error")]
    assert [r["method"] for r in failed] == ["kvpress:snapkv", "kvpress:tova"]
    assert all("KvpressWorkerError: kvpress worker exited with status 1: boom" in r["error"] for r in failed)
    fixed = FakeKvpress()
    monkeypatch.setattr(kvpress_peer, "run_kvpress", fixed)
    again = runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False, peer_model_dir=model_dir)
    assert again["ran"] == 2 and again["errors"] == 0
    assert fixed.calls[0]["presses"] == [("snapkv", 0.5), ("tova", 0.75)]


def test_interrupt_keeps_the_finished_peer_rows(model, tok, monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: True)
    monkeypatch.setattr(kvpress_peer, "run_kvpress", FakeKvpress(fail_after=2, exc=KeyboardInterrupt()))
    cfg = {**CONFIG, "methods": [], "dense_placements": ["inside"], "peers": [{**PEER, "placements": ["inside"]}]}
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False, peer_model_dir=model_dir)
    rows = runner.read_rows(tmp_path / "tiny.jsonl")
    assert [r["method"] for r in rows] == ["dense", "kvpress:dense", "kvpress:snapkv"]
    assert not any(r.get("error") for r in rows)


def test_missing_env_is_an_error_naming_the_fix(model, tok, monkeypatch, model_dir, tmp_path, capsys):
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: False)
    monkeypatch.setenv("TOKENSPARSE_KVPRESS_PYTHON", str(tmp_path / "no-env" / "python"))
    grid = G.build_grid(CONFIG)
    with pytest.raises(kvpress_peer.KvpressEnvMissing, match=r"make kvpress-env.*--skip-peers"):
        runner.run_grid(model, tok, grid, tmp_path, progress=False, peer_model_dir=model_dir)
    assert not (tmp_path / "tiny.jsonl").exists()  # raised before any run
    # skipping is explicit, and said
    out = runner.run_grid(model, tok, grid, tmp_path, progress=False, skip_peers=True)
    assert out["ran"] == 3 and out["peer_runs"] == 0 and out["peers_skipped"] == 5
    assert "PEERS SKIPPED" in capsys.readouterr().err
    assert {r["method"] for r in runner.read_rows(out["path"])} == {"dense", "snapkv"}
    skip = G.build_grid({**CONFIG, "skip_peers": True})
    assert runner.run_grid(model, tok, skip, tmp_path, progress=False)["peers_skipped"] == 5


def test_peer_model_must_be_on_disk_and_fp32(model, tok, fake, tmp_path):
    grid = G.build_grid(CONFIG)
    with pytest.raises(runner.PeerSetupError, match="loads the model from disk"):
        runner.run_grid(model, tok, grid, tmp_path, progress=False)
    with pytest.raises(runner.PeerSetupError, match="has no config.json"):
        runner.run_grid(model, tok, grid, tmp_path, progress=False, peer_model_dir=tmp_path)
    bf16 = tiny_model("llama", dtype=torch.bfloat16, vocab_size=256)
    with pytest.raises(runner.PeerSetupError, match="float32"):
        runner.run_grid(bf16, tok, grid, tmp_path / "bf16", progress=False, peer_model_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# report and commands


def test_report_shows_peer_rows(model, tok, fake, model_dir, tmp_path):
    out = runner.run_grid(model, tok, G.build_grid(CONFIG), tmp_path / "res", progress=False, peer_model_dir=model_dir)
    md = report.write_report(out["path"], tmp_path / "rep").read_text()
    summary = [ln for ln in md.split("## Summary")[1].split("## ")[0].splitlines() if ln.startswith("| `")]
    assert [ln.split(" | ")[0:2] for ln in summary] == [
        ["| `dense`", "inside"], ["| `dense`", "after"], ["| `snapkv(budget=0.5, window=8)`", "after"],
        ["| `kvpress:dense`", "inside"], ["| `kvpress:snapkv(compression_ratio=0.5)`", "inside"],
        ["| `kvpress:snapkv(compression_ratio=0.5)`", "after"], ["| `kvpress:tova(compression_ratio=0.75)`", "inside"],
        ["| `kvpress:tova(compression_ratio=0.75)`", "after"]]
    rows, _ = report.load_results(out["path"])
    groups = {g.name: g for g in report.summarize(rows)}
    snap = groups["kvpress:snapkv(compression_ratio=0.5) [after]"]
    assert snap.peer == "kvpress" and snap.kv_kept_share == 0.5 and not snap.is_dense
    dense = next(r for r in rows if r["method"] == "dense" and r["placement"] == "after")
    peer = snap.rows[0]
    # ratios against tokensparse's dense row of the same sample and placement
    assert snap.stats["paired"] == 1 and snap.stats["delta_vs_dense"] == peer["score"] - dense["score"]
    assert snap.stats["kv_ratio"] == pytest.approx(peer["kv_bytes"] / dense["kv_bytes"])
    assert snap.stats["prefill_speedup"] == pytest.approx(dense["prefill_s"] / 0.03)
    # and against kvpress's own dense row
    assert snap.stats["own_paired"] == 1 and snap.stats["own_kv_ratio"] == pytest.approx(2100 / 4100)
    assert groups["kvpress:tova(compression_ratio=0.75) [inside]"].stats["own_delta"] == -1.0
    assert groups["snapkv(budget=0.5, window=8) [after]"].kv_kept_share == 0.5
    assert "## Peer libraries" in md and "### Matched KV budgets" in md
    assert "| `kvpress:dense` | inside | 0 | 1 | 1 | 100.0% | ref |" in md
    assert "| `kvpress:tova(compression_ratio=0.75)` | inside | 0.75 | 0.25 | 1 | 0.0% | -100.0 pt |" in md
    matched = md.split("### Matched KV budgets")[1]
    assert "| 0.5 | after | `snapkv(budget=0.5, window=8)` |" in matched
    assert "| 0.5 | after | `kvpress:snapkv(compression_ratio=0.5)` |" in matched
    assert "`python 3.11.7, torch 2.13.0+cpu, transformers 5.2.0, kvpress 0.5.5" in md
    assert "accuracy_vs_budget.png" in md


def test_report_without_peers_has_no_peer_section(model, tok, tmp_path):
    out = runner.run_grid(model, tok, G.build_grid({**CONFIG, "peers": []}), tmp_path, progress=False)
    md = report.write_report(out["path"], tmp_path / "rep", plots=False).read_text()
    assert "Peer libraries" not in md


def _parser():
    p = argparse.ArgumentParser(prog="tokensparse")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_skip_peers_and_dry_run(model, tok, fake, monkeypatch, tmp_path, capsys):
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(CONFIG))
    args = _parser().parse_args(["eval", "--config", str(cfg), "--dry-run"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "peers: 1 samples × 5 kvpress runs = 5 runs" in text
    assert "kvpress:tova(compression_ratio=0.75) [after] (kv kept 0.25)" in text
    args = _parser().parse_args(["eval", "--config", str(cfg), "--skip-peers", "--dry-run"])
    assert args.func(args) == 0
    assert "peers SKIPPED (--skip-peers or skip_peers)" in capsys.readouterr().out
    monkeypatch.setattr(ts, "load_model", lambda path=None, **kw: (model, tok))
    args = _parser().parse_args(["eval", "--config", str(cfg), "--skip-peers", "--out", str(tmp_path / "res"),
                                 "--threads", "1", "--no-progress"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "peers skipped (--skip-peers): 5 peer runs were not run." in captured.out
    rows = runner.read_rows(tmp_path / "res" / "tiny.jsonl")
    assert len(rows) == 3 and rows[0]["env"]["command"].endswith("--skip-peers") and not fake.calls
    # without the flag the missing env stops the command with the fix
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: False)
    args = _parser().parse_args(["eval", "--config", str(cfg), "--out", str(tmp_path / "res2"), "--no-progress"])
    with pytest.raises(SystemExit, match="tokensparse eval: .*make kvpress-env"):
        args.func(args)


# --------------------------------------------------------------------------------------------------
# the real worker (slow: the bundled SmolLM2 in both environments)


@pytest.mark.slow
@pytest.mark.skipif(not kvpress_peer.kvpress_available(), reason="no .venv-kvpress (make kvpress-env)")
def test_real_kvpress_worker_through_the_runner(tmp_path):
    model, tok = ts.load_model()
    cfg = {"name": "kvpress-real", "lengths": [1024], "telemetry": False,
           "tasks": [{"task": "passkey", "depths": [0.5]}], "methods": [], "placements": ["after"],
           "peers": [{"peer": "kvpress", "presses": [["snapkv", 0.5]], "placements": ["after", "inside"],
                      "include_dense": ["after"]}]}
    out = runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False)
    assert out["errors"] == 0 and out["ran"] == 4 and out["peer_runs"] == 3
    rows = runner.read_rows(out["path"])
    assert [(r["method"], r["placement"]) for r in rows] == [
        ("dense", "after"), ("kvpress:dense", "after"), ("kvpress:snapkv", "after"), ("kvpress:snapkv", "inside")]
    dense, kv_dense, kv_snap, kv_snap_inside = rows
    assert kv_dense["env"]["versions"]["kvpress"] == "0.5.5"
    assert kv_dense["prompt_tokens"] == dense["prompt_tokens"]
    # identical token ids and weights: kvpress's dense driver gives tokensparse's dense answer likelihood
    assert kv_dense["answer_loglik"] == pytest.approx(dense["answer_loglik"], abs=1e-2)
    assert dense["prediction"].startswith(kv_dense["prediction"].rstrip())
    assert kv_dense["peer"]["needle_kept_mean"] == 1.0
    for snap in (kv_snap, kv_snap_inside):
        assert snap["kv_bytes"] < kv_dense["kv_bytes"] and snap["peer"]["press"] == "SnapKVPress"
        assert snap["peer"]["needle_kept_mean"] is not None
        kept = snap["peer"]["kv_kept_per_layer"]
        assert kept[0] == pytest.approx(snap["peer"]["prefill_tokens"] * 0.5, abs=1)
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("method", "placement", "prompt_tokens", "answers", "prediction",
                                                "score", "answer_loglik", "prefill_s", "decode_ms_per_token",
                                                "kv_bytes", "kv_kept_share")}))
