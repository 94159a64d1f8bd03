"""The grid runner and the eval/report commands end to end on a tiny random model with a fake
tokenizer: row contents, resume, failed runs, the teacher-forced pass against metrics.answer_loglik."""

import argparse
import json

import pytest
import torch

import tokensparse as ts
from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)
from tokensparse.eval import grid as G
from tokensparse.eval import metrics, runner, tasks
from tokensparse.eval.commands import add_commands
from tokensparse.eval.harness import encode_sample

torch.set_num_threads(1)

CONFIG = {
    "name": "tiny",
    "lengths": [160],
    "max_new_tokens": 4,
    "tasks": [{"task": "passkey", "depths": [0.3]}],
    "methods": [
        {"method": "snapkv", "configs": [{"budget": 0.5, "window": 8}], "placements": ["after"]},
        {"method": "token_select", "configs": [{"budget": 0.5, "n_sink": 4, "n_local": 16}]},
    ],
}


def test_end_to_end_rows(model, tok, tmp_path):
    grid = G.build_grid(CONFIG)
    out = runner.run_grid(model, tok, grid, tmp_path, progress=False, command="pytest")
    assert out == {"path": str(tmp_path / "tiny.jsonl"), "total": 4, "skipped": 0, "ran": 4, "errors": 0,
                   "peer_runs": 0, "peers_skipped": 0}
    rows = runner.read_rows(out["path"])
    assert [(r["method"], r["placement"]) for r in rows] == [
        ("dense", "inside"), ("dense", "after"), ("snapkv", "after"), ("token_select", "inside")]
    sample = tasks.make_samples("passkey", tok, 160, depth=0.3)[0]
    for r in rows:
        assert "error" not in r
        assert r["task"] == "passkey" and r["length"] == 160 and r["depth"] == 0.3 and r["seed"] == 0
        assert r["sample_id"] == sample.sample_id and r["answers"] == sample.answers
        assert r["prompt_tokens"] == sum(x.shape[1] for x in encode_sample(tok, sample))
        assert r["new_tokens"] == 4 and r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["kv_bytes"] > 0
        assert 0 < r["attention_prefill_s"] < r["prefill_s"] and 0 < r["attention_decode_ms_per_token"] < r["decode_ms_per_token"]
        mem = r["memory"]
        assert mem["peak_rss_bytes"] >= mem["rss_start_bytes"] > 0 and mem["scope"] in ("block", "process")
        assert r["score"] == metrics.score(r["prediction"], r["answers"], "all") and 0 <= r["score"] <= 1
        assert r["answer_tokens"] == 6 and r["loglik_target"] == " " + sample.answers[0] and r["answer_loglik"] < 0
        assert r["model"]["fingerprint"] == ts.model_fingerprint(model) and r["model"]["dtype"] == "float32"
        env = r["env"]
        assert env["torch_threads"] == 1 and env["command"] == "pytest" and env["versions"]["torch"]
        assert {"cpu", "cpu_count", "device"} <= set(env["hardware"]) and "commit" in env["git"]
    dense, dense_after, snap, sel = rows
    assert dense["config"] == {"method": "dense"} and dense["telemetry"] is None and dense["fidelity"] is None
    assert dense_after["answer_loglik"] == pytest.approx(dense["answer_loglik"], abs=1e-4)  # placement-free
    assert snap["config"]["budget"] == 0.5 and snap["config"]["pool_kernel"] == 7  # the full config
    assert snap["kv_bytes"] < dense["kv_bytes"]  # eviction keeps about half the rows
    ret = snap["needle_retention"]  # per-layer share of the needle's tokens the evicted cache holds
    assert len(ret["per_layer"]) == model.config.num_hidden_layers
    assert 0 <= ret["min"] <= ret["mean"] <= 1
    assert dense["needle_retention"] is None and sel["needle_retention"] is None  # full caches
    for r in (snap, sel):
        assert 0 < r["telemetry"]["density"] < 1 and 0 < r["telemetry"]["mass"] <= 1
        assert r["telemetry"]["error"] > 0 and r["telemetry"]["layers_observed"] == len(r["telemetry"]["per_layer"])
        assert r["fidelity"]["positions"] == 6 and r["fidelity"]["kl"] >= 0
    assert len({r["key"] for r in rows}) == 4 and len({r["run_id"] for r in rows}) == 1


def test_resume_adds_nothing_then_only_what_is_missing(model, tok, tmp_path):
    grid = G.build_grid({**CONFIG, "answer_loglik": False, "telemetry": False})
    path = tmp_path / "res.jsonl"
    first = runner.run_grid(model, tok, grid, path, progress=False)
    assert first["ran"] == 4
    text = path.read_text()
    again = runner.run_grid(model, tok, grid, path, progress=False)
    assert again["ran"] == 0 and again["skipped"] == 4 and path.read_text() == text
    # a run killed mid-write: the last line is cut; the rerun redoes exactly that run
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])
    third = runner.run_grid(model, tok, grid, path, progress=False)
    assert third["ran"] == 1
    keys = [r["key"] for r in runner.read_rows(path)]
    assert len(keys) == 4 and set(keys) == {json.loads(line)["key"] for line in lines}
    # a new seed runs only the new cells
    more = runner.run_grid(model, tok, G.build_grid({**CONFIG, "answer_loglik": False, "telemetry": False,
                                                     "seeds": [0, 1]}), path, progress=False)
    assert more["ran"] == 4 and more["skipped"] == 4


def test_resumed_sparse_row_still_gets_fidelity(model, tok, tmp_path):
    grid = G.build_grid(CONFIG)
    path = tmp_path / "res.jsonl"
    runner.run_grid(model, tok, grid, path, progress=False)
    rows = runner.read_rows(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["method"] != "snapkv"))
    assert runner.run_grid(model, tok, grid, path, progress=False)["ran"] == 1
    redo = runner.read_rows(path)[-1]
    assert redo["method"] == "snapkv" and redo["run_id"] != rows[0]["run_id"]
    old = next(r for r in rows if r["method"] == "snapkv")
    assert redo["fidelity"]["kl"] == pytest.approx(old["fidelity"]["kl"], rel=1e-3, abs=1e-6)


def test_telemetry_comes_from_the_untimed_pass_even_without_loglik(model, tok, tmp_path):
    """Telemetry is recorded in the teacher-forced pass (never inside the timed generation); with the
    log-likelihood off that pass still runs for sparse runs, and its log-likelihood is not kept."""
    cfg = {**CONFIG, "answer_loglik": False, "methods": [CONFIG["methods"][1]]}
    rows = runner.read_rows(runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False)["path"])
    dense, sel = rows
    assert dense["telemetry"] is None and dense["answer_loglik"] is None
    assert sel["answer_loglik"] is None and sel["fidelity"] is None
    tele = sel["telemetry"]
    assert 0 < tele["density"] < 1 and tele["error"] > 0
    # the teacher-forced pass feeds the 6 answer tokens (5 decode steps), the generation only 3
    assert {v["calls"] for v in tele["per_layer"].values()} == {5}
    assert sel["stats"]["select"] + sel["stats"].get("reuse", 0) == 3 * 2


def test_failed_runs_are_recorded_and_retried(model, tok, tmp_path):
    cfg = {**CONFIG, "lengths": [20], "answer_loglik": False}  # too short for the pass key prompt
    out = runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False)
    assert out["errors"] == 4 and out["ran"] == 0
    rows = runner.read_rows(out["path"])
    assert all("length=20 is too small" in r["error"] for r in rows)
    assert runner.done_keys(out["path"]) == set()
    assert runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False)["errors"] == 4


def test_teacher_forced_pass_matches_answer_loglik(model, tok):
    sample = tasks.make_samples("passkey", tok, 160, depth=0.5)[0]
    ctx, q = encode_sample(tok, sample)
    ans = torch.tensor([tok(runner.answer_target(sample), add_special_tokens=False).input_ids])
    expect = metrics.prefill_answer_loglik(model, torch.cat([ctx, q], 1), ans)
    for placement in ("inside", "after"):
        ll, logits, n = runner.teacher_forced_answer(model, tok, sample, None, placement)
        assert n == ans.shape[1] == logits.shape[0] and logits.shape[1] == 256
        assert ll == pytest.approx(expect, abs=1e-3)
    # a method at full budget reproduces dense through its own cache and executors
    full = ts.methods.get("snapkv").at_full_budget()
    ll, logits, _ = runner.teacher_forced_answer(model, tok, sample, full, "after")
    assert ll == pytest.approx(expect, abs=1e-3)


def _parser():
    p = argparse.ArgumentParser(prog="tokensparse")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_commands_eval_and_report(model, tok, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(CONFIG))
    monkeypatch.setattr(ts, "load_model", lambda path=None, **kw: (model, tok))
    args = _parser().parse_args(["eval", "--config", str(cfg), "--set", "seeds=[3]", "--out", str(tmp_path / "res"),
                                 "--threads", "1", "--no-progress"])
    assert args.func(args) == 0
    rows = runner.read_rows(tmp_path / "res" / "tiny.jsonl")
    assert len(rows) == 4 and {r["seed"] for r in rows} == {3}
    assert rows[0]["env"]["command"].startswith("tokensparse eval --config") and "--set 'seeds=[3]'" in rows[0]["env"]["command"]
    args = _parser().parse_args(["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| `snapkv(budget=0.5, window=8)` | after | 1 |" in md
    assert (tmp_path / "rep" / "needle_passkey.png").stat().st_size > 5000


def test_commands_dry_run_and_errors(capsys):
    args = _parser().parse_args(["eval", "--suite", "smoke", "--dry-run"])
    assert args.func(args) == 0  # never loads the model
    out = capsys.readouterr().out
    assert "7 samples × 6 method runs = 42 runs" in out and "snapkv(budget=0.25) [after]" in out
    args = _parser().parse_args(["eval", "--suite", "smoke", "--set", "methods.0.method=nope", "--dry-run"])
    with pytest.raises(SystemExit, match="tokensparse eval: methods.0: unknown method 'nope'"):
        args.func(args)
    with pytest.raises(SystemExit):  # argparse: the suite must be one of the built-in ones
        _parser().parse_args(["eval", "--suite", "huge"])
    args = _parser().parse_args(["report", "--results", "/nonexistent/results"])
    with pytest.raises(SystemExit, match="does not exist; pass a results directory"):
        args.func(args)


def test_kept_positions_reads_evicting_cache_slots(model):
    from tokensparse.eval.harness import kept_positions

    cache = ts.KVCache(model, evicting=True)
    assert kept_positions(ts.KVCache(model)) is None  # a full cache keeps everything
    k = torch.randn(1, 2, 10, 16)
    for layer in cache.layers:
        layer.update(k, k)
    layer = cache.layers[0]
    layer.keep(torch.tensor([[[0, 3, 7], [1, 2, 9]]]), torch.tensor([[[True, True, True], [True, False, True]]]))
    kept = kept_positions(cache)
    assert [t.tolist() for t in kept[0]] == [[0, 3, 7], [1, 9]]
    assert [t.tolist() for t in kept[1]] == [list(range(10))] * 2
    ret = metrics.needle_retention(kept, [3, 9])
    assert ret["per_layer"][0] == pytest.approx(0.5) and ret["per_layer"][1] == 1.0


def test_without_telemetry_the_score_shares_the_generation_prefill(model, tok, tmp_path):
    """telemetry off: one prefill per run serves the timed generation and the decode-path score;
    the score equals a separate scoring pass, per answer token, for every method."""
    from tokensparse.eval import scoring

    cfg = {**CONFIG, "telemetry": False,
           "methods": CONFIG["methods"] + [{"method": "token_select", "configs": [
               {"budget": 0.5, "n_sink": 4, "n_local": 16, "reuse_threshold": 0.5}]}]}
    out = runner.run_grid(model, tok, G.build_grid(cfg), tmp_path, progress=False)
    assert out["errors"] == 0
    sample = tasks.make_samples("passkey", tok, 160, depth=0.3)[0]
    grid = G.build_grid(cfg)
    for r, spec in zip(runner.read_rows(out["path"]), grid.methods):
        assert r["telemetry"] is None
        alone = scoring.score_sample(model, tok, sample, spec.build(), spec.placement)
        assert r["answer_loglik"] == pytest.approx(alone.loglik, abs=1e-4)
        assert r["answer_token_logprobs"] == pytest.approx(alone.token_logprobs.tolist(), abs=1e-4)
        assert len(r["answer_token_logprobs"]) == r["answer_tokens"]
        if r["method"] != "dense":
            assert r["fidelity"]["kl"] >= 0


ROPE = {"rope_type": "yarn", "factor": 2.0}


def _scaled(model):
    import copy

    m = copy.deepcopy(model)
    m.config.rope_parameters = {**(m.config.rope_parameters or {}), **ROPE}
    return m


def test_rope_scaling_config_is_validated():
    assert G.build_grid(CONFIG).rope_scaling is None
    assert G.build_grid({**CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4}}).rope_scaling == \
        {"rope_type": "yarn", "factor": 4.0}
    for bad, msg in [({"rope_type": "yarn"}, "exactly rope_type and factor"), ("yarn", "exactly rope_type"),
                     ({"rope_type": "ntk", "factor": 2.0}, "rope_type must be one of"),
                     ({"rope_type": "yarn", "factor": 1.0}, "factor must be a number > 1"),
                     ({"rope_type": "yarn", "factor": True}, "factor must be a number > 1")]:
        with pytest.raises(G.ConfigError, match=msg):
            G.build_grid({**CONFIG, "rope_scaling": bad})
    with pytest.raises(G.ConfigError, match="not passed to peer libraries"):
        G.build_grid({**CONFIG, "rope_scaling": ROPE, "peers": [{"peer": "kvpress", "presses": [["snapkv", 0.5]]}]})


def test_rope_scaling_keys_rows_apart_and_refuses_an_unscaled_model(model, tok, tmp_path):
    plain, scaled = runner.model_id(model), runner.model_id(_scaled(model))
    assert "rope" not in plain and scaled["rope"] == ROPE and scaled["fingerprint"] == plain["fingerprint"]
    grid = G.build_grid({**CONFIG, "rope_scaling": ROPE})
    sample = grid.sample_specs()[0]
    spec = grid.methods[0]
    assert runner.row_key(plain, sample, spec, spec.full_config(), 4) != \
        runner.row_key(scaled, sample, spec, spec.full_config(), 4)
    with pytest.raises(ValueError, match=r"rope_scaling .* the model's config carries none"):
        runner.run_grid(model, tok, grid, tmp_path, progress=False)
    assert not (tmp_path / "tiny.jsonl").exists()  # refused before anything ran


def test_cli_eval_loads_the_model_with_the_grids_rope_scaling(model, tok, tmp_path, monkeypatch, capsys):
    seen = {}

    def load(path=None, **kw):
        seen.update(kw)
        return _scaled(model), tok

    monkeypatch.setattr(ts, "load_model", load)
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps({**CONFIG, "methods": [], "rope_scaling": ROPE}))
    args = _parser().parse_args(["eval", "--config", str(cfg), "--out", str(tmp_path / "res"), "--threads", "1",
                                 "--no-progress"])
    assert args.func(args) == 0
    assert seen == {"rope_scaling": ROPE}
    assert 'model loaded with rope_scaling {"rope_type": "yarn", "factor": 2.0}' in capsys.readouterr().out
    rows = runner.read_rows(tmp_path / "res" / "tiny.jsonl")
    assert len(rows) == 1 and rows[0]["model"]["rope"] == ROPE
