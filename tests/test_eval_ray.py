"""``tokensparse eval --ray``: a grid run on a 2-worker local Ray cluster writes the same rows as the
serial run, field for field outside ``runner.VOLATILE_FIELDS`` (floats bit for bit, one torch
thread on both sides), resumes from the rows already there, runs the peers (a fake kvpress worker)
in the driver afterwards, and without Ray says how to install it.

The model is a tiny random Llama saved to disk with the bundled SmolLM2 tokenizer and loaded by
path, as ``--model DIR`` is: the workers load it themselves, and a real tokenizer is stateless
(the tests' fake ``WordTokenizer`` grows its vocabulary as it reads, so two processes that see
different samples would number the same word differently). One Ray start (~10-30 s on 2 busy
cores: Ray itself, then each worker imports torch and transformers) serves the whole comparison."""

import argparse
import json
import math
import sys

import pytest
import torch

import tokensparse as ts
from tokensparse.eval import distributed, runner
from tokensparse.eval.commands import add_commands

CONFIG = {
    "name": "tiny",
    "lengths": [256],
    "seeds": [0, 1],
    "max_new_tokens": 4,
    "tasks": [{"task": "passkey", "depths": [0.3]}, {"task": "needle_number"}],
    "methods": [
        {"method": "snapkv", "configs": [{"budget": 0.5, "window": 8}], "placements": ["after"]},
        {"method": "token_select", "configs": [{"budget": 0.5, "n_sink": 4, "n_local": 16}]},
        {"method": "frugal_prompt", "configs": [{}]},  # a prompt step: its stats carry a timing
    ],
    "peers": [{"peer": "kvpress", "presses": [["snapkv", 0.5]], "placements": ["inside"]}],  # + its dense run
}


def fake_kvpress(samples, presses, placement, out_path, threads=1, python=None, *, model_dir=None, timeout=None,
                 echo=True):
    """Stands in for the kvpress worker (its own environment, which CI does not have): worker-style
    rows, with the runner's token ids echoed back so a row depends on what the driver sent."""
    return [{"sample_id": s["sample_id"], "peer": "kvpress", "peer_version": "0.5.5", "press_spec": name,
             "compression_ratio": float(ratio), "placement": placement, "prediction": f" {s['answers'][0]}",
             "generated_ids": s["context_ids"][-3:], "ttft_s": 0.03, "prefill_s": 0.02, "decode_ms_per_token": 4.0,
             "kv_bytes_end": 1000 + len(s["context_ids"]), "answer_loglik": -1.5 if s.get("answer_ids") else None,
             "env": {"threads": threads}} for s in samples for name, ratio in presses]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the bundled tokenizer's vocabulary, saved as a model directory."""
    from tokensparse.testing import tiny_model

    _, tok = ts.load_model()
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _eval(*argv) -> int:
    p = argparse.ArgumentParser(prog="tokensparse")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", *map(str, argv)])
    return args.func(args)


def test_ray_run_writes_the_serial_rows(tiny_dir, tmp_path, restore_threads, capsys, monkeypatch):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'tokensparse[ray]'); "
                                      "without it the Ray runner cannot be compared with the serial one")
    from tokensparse.eval.peers import kvpress as kvpress_peer

    peer_calls = []
    monkeypatch.setattr(kvpress_peer, "kvpress_available", lambda python=None: True)
    monkeypatch.setattr(kvpress_peer, "run_kvpress", lambda *a, **k: peer_calls.append(a[2]) or fake_kvpress(*a, **k))
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(CONFIG))
    common = ["--config", cfg, "--model", tiny_dir, "--threads", 1, "--no-progress"]
    assert _eval(*common, "--out", tmp_path / "serial") == 0
    serial = runner.read_rows(tmp_path / "serial" / "tiny.jsonl")
    assert len(serial) == 4 * (5 + 2) and not any(r.get("error") for r in serial)
    assert sum(r["method"].startswith("kvpress:") for r in serial) == 8 and peer_calls == ["inside"]

    # resume: the first sample's rows are already in the Ray run's file; the 3 others run on 2 workers
    first = serial[0]["sample_id"]
    seeded = [r for r in serial if r["sample_id"] == first]
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeded))
    capsys.readouterr()
    assert _eval(*common, "--out", tmp_path / "ray", "--ray", "--ray-workers", 2) == 0
    out = capsys.readouterr().out
    assert "Ray (local): 2 workers × 1 torch threads" in out and "21 runs written" in out and "7 already there" in out
    rows = runner.read_rows(tmp_path / "ray" / "tiny.jsonl")
    made = [r for r in rows[len(seeded):] if not r["method"].startswith("kvpress:")]
    peers = rows[len(seeded) + len(made):]  # the peers come last, from the driver
    assert len(made) == 15 and len(peers) == 6 and peer_calls == ["inside"] * 2
    assert all(r["method"].startswith("kvpress:") for r in peers)

    assert runner.row_differences(serial, rows) == []
    # the volatile fields are the ones that did differ: where and how each row was made
    assert {r["env"]["ray"]["worker"] for r in made} == {0, 1}  # both workers had samples
    assert all(r["env"]["torch_threads"] == 1 and "--ray --ray-workers 2" in r["env"]["command"] for r in made)
    assert len({r["run_id"] for r in made}) == 1 and made[0]["run_id"] != serial[0]["run_id"]
    # a sample's rows stay together, dense first, in the serial order
    for sid in {r["sample_id"] for r in made}:
        assert [r["key"] for r in made if r["sample_id"] == sid] == [
            r["key"] for r in serial if r["sample_id"] == sid and not r["method"].startswith("kvpress:")]
    # every measured field is there, and the comparison covered the deterministic ones
    for r in made:
        assert r["prefill_s"] > 0 and r["memory"]["peak_rss_bytes"] > 0 and r["answer_token_logprobs"]
        if r["method"] != "dense" and r["method"] != "frugal_prompt":
            assert r["fidelity"]["kl"] >= 0 and r["telemetry"]["layers_observed"] > 0
        if r["method"] == "frugal_prompt":
            assert r["stats"]["prompt_kept_tokens"] < r["stats"]["prompt_context_tokens"]


def test_row_differences_ignores_only_the_volatile_fields():
    row = {"key": "k1", "label": "snapkv", "sample_id": "s", "run_id": "a", "time": "t", "env": {"x": 1},
           "prefill_s": 0.1, "memory": {"peak_rss_bytes": 1}, "stats": {"prompt_step_s": 0.01, "calls": 3},
           "answer_loglik": -1.25, "answer_token_logprobs": [-0.5, -0.75], "fidelity": {"kl": math.nan}}
    other = {**row, "run_id": "b", "time": "u", "env": {"x": 2}, "prefill_s": 0.2, "memory": {"peak_rss_bytes": 2},
             "stats": {"prompt_step_s": 0.02, "calls": 3}, "fidelity": {"kl": math.nan}}
    assert runner.row_differences([row], [other]) == []
    assert runner.stable_fields(row)["stats"] == {"calls": 3} and "env" not in runner.stable_fields(row)
    off = {**other, "answer_token_logprobs": [-0.5, math.nextafter(-0.75, 0.0)], "stats": {"calls": 4}}
    diffs = runner.row_differences([row], [off])
    assert len(diffs) == 2 and "k1.answer_token_logprobs[1]" in diffs[0] and "k1.stats.calls: 3 != 4" in diffs[1]
    assert runner.row_differences([row], [{**other, "key": "k2"}]) == [
        "key k1 (snapkv on s) only in a", "key k2 (snapkv on s) only in b"]


def test_without_ray_the_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    from tokensparse.eval import grid as G

    with pytest.raises(distributed.RayUnavailable, match=r"pip install 'tokensparse\[ray\]'"):
        distributed.run_grid_ray(distributed.LocalModel(), G.build_grid(CONFIG), tmp_path)
    with pytest.raises(SystemExit, match=r"tokensparse eval: .*pip install 'tokensparse\[ray\]'"):
        _eval("--suite", "smoke", "--ray", "--out", tmp_path)


def test_ray_arguments(tmp_path, capsys, restore_threads):
    with pytest.raises(SystemExit, match="--ray-workers needs --ray"):
        _eval("--suite", "smoke", "--ray-workers", 3, "--dry-run")
    with pytest.raises(SystemExit, match="--ray-workers must be >= 1"):
        _eval("--suite", "smoke", "--ray", "--ray-workers", 0, "--dry-run")
    assert _eval("--suite", "smoke", "--ray", "ray://head:10001", "--ray-workers", 3, "--dry-run") == 0
    assert "Ray (ray://head:10001): 3 workers × 1 torch threads" in capsys.readouterr().out
    from tokensparse.eval import grid as G

    for bad in ({"workers": 0}, {"threads_per_worker": 1.5}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            distributed.run_grid_ray(distributed.LocalModel(), G.build_grid(CONFIG), tmp_path, **bad)
