"""The CI-sized smoke version of the v2 standard suite on the bundled SmolLM2-135M (part of the
default test run; a few minutes): `tokensparse eval --suite smoke` (no peers) and `tokensparse
report` end to end on the real model and its real tokenizer. Mechanics, not accuracy: every run
succeeds, rows carry the decode-path answer score, telemetry, fidelity and needle retention, dense
reads the needles of the single-needle tasks, and the report has its tables and plots."""

import os

import pytest
import torch

import tokensparse as ts
from tokensparse.eval import grid as G
from tokensparse.eval import report, runner


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    # other test modules pin torch to 1 thread at import; the real model runs on every core (restored after)
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    try:
        model, tok = ts.load_model()
        grid = G.build_grid(G.load_suite("smoke"))
        out_dir = tmp_path_factory.mktemp("smoke")
        out = runner.run_grid(model, tok, grid, out_dir, progress=False, skip_peers=True, command="pytest")
    finally:
        torch.set_num_threads(before)
    return grid, out, runner.read_rows(out["path"]), out_dir


def test_every_run_succeeds_with_its_measurements(smoke_run):
    grid, out, rows, _ = smoke_run
    assert out["errors"] == 0 and out["ran"] == grid.size()[1] == len(rows)
    assert {r["task"] for r in rows} == {t.task for t in grid.tasks}
    for r in rows:
        assert r["new_tokens"] == 12 and r["attention_prefill_s"] > 0 and r["memory"]["peak_rss_bytes"] > 0
        # the decode-path score covers the whole gold answer even though generation stops at 12 tokens
        assert r["answer_loglik"] < 0 and len(r["answer_token_logprobs"]) == r["answer_tokens"]
        if r["task"] == "needle_uuid":
            assert r["answer_tokens"] >= 30
        if r["task"] == "long_answer":
            assert r["answer_tokens"] >= 16
        if r["method"] != "dense":
            assert r["telemetry"]["layers_observed"] > 0 and r["fidelity"]["kl"] >= 0
        if r["method"] in ("snapkv", "streaming_llm"):
            assert len(r["needle_retention"]["per_layer"]) == 30


def test_dense_reads_the_single_needles(smoke_run):
    _, _, rows, _ = smoke_run
    dense = {r["task"]: r for r in rows if r["method"] == "dense"}
    assert dense["needle_number"]["score"] == 1.0, dense["needle_number"]["prediction"]
    # the UUID does not fit in 12 generated tokens: its first 8 hex digits must
    assert dense["needle_uuid"]["answers"][0][:8] in dense["needle_uuid"]["prediction"]


def test_report_of_the_smoke_run(smoke_run):
    _, out, _, out_dir = smoke_run
    md = report.write_report(out["path"], out_dir / "report").read_text()
    assert "## Paired differences vs dense, per method and task" in md and "## Per-layer fidelity" in md
    for task in ("needle_number", "long_answer", "vartrack"):
        assert f"**{task}**" in md
    assert (out_dir / "report" / "accuracy_vs_budget.png").stat().st_size > 10_000
