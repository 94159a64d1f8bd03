"""The diagnosis tracer (tokensparse.eval.diagnose) on a tiny random model: it records what each
decode step selected, detects Selection Cache reuse, reads eviction retention from the cache, and
its log-probabilities are the decode-path scorer's."""

import pytest
import torch

import tokensparse as ts
from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)
from tokensparse.eval import diagnose, scoring, tasks

torch.set_num_threads(1)


def _tsel(theta=None):
    return ts.methods.get("token_select")(budget=0.3, n_sink=2, n_local=8, reuse_threshold=theta)


CONFIGS = [
    ("token_select θ=0.8", lambda: _tsel(-1.0), "inside"),  # θ=-1: reuse whenever the budget allows
    ("token_select no cache", lambda: _tsel(), "inside"),
    ("snapkv 50% inside", lambda: ts.methods.get("snapkv")(budget=0.5, window=8), "inside"),
    ("snapkv 50% after", lambda: ts.methods.get("snapkv")(budget=0.5, window=8), "after"),
]


def test_trace_matches_the_scorer_and_records_every_decode_call(model, tok):
    sample = tasks.make_samples("niah_single", tok, 200, depth=0.3)[0]
    n_layers = model.config.num_hidden_layers
    for name, make, placement in CONFIGS:
        tr = diagnose.trace_sample(model, tok, sample, make(), placement)
        ref = scoring.score_sample(model, tok, sample, make(), placement)
        assert tr["token_logprobs"] == pytest.approx(ref.token_logprobs.tolist(), abs=1e-5)
        steps = tr["answer_tokens"] - 1
        if name.startswith("token_select"):
            assert len(tr["records"]) == steps * n_layers
            assert all(0.0 <= r["needle_in_selection"] <= 1.0 for r in tr["records"])
            assert any(r["needle_in_selection"] < 1.0 for r in tr["records"])  # a budget of 30% misses some
            reused = [r["reused"] for r in tr["records"]]
            if "θ" in name:
                assert any(reused) and tr["stats"]["reuse"] == sum(reused)
            else:
                assert not any(reused)
            assert tr["needle_held_per_layer"] is None
        else:
            held = tr["needle_held_per_layer"]
            assert len(held) == n_layers and all(0.0 <= h <= 1.0 for h in held)
    dense = diagnose.trace_sample(model, tok, sample)
    assert dense["needle_held_per_layer"] is None and dense["records"] == []  # no session: nothing observed


def test_run_and_render(model, tok):
    data = diagnose.run(model, tok, ["niah_single"], [200], samples=2, configs=CONFIGS, progress=lambda m: None)
    assert len(data["samples"]) == 2 and set(data["samples"][0]["runs"]) == {"dense", *(c[0] for c in CONFIGS)}
    md = diagnose.render(data)
    assert "By answer position" in md and "Per layer" in md and "| 0 |" in md
    assert "reuse" in md and "niah_single | 200" in md
