"""The four first methods select and compute exactly what they did before the Engine v2 port.

``tests/data/pipeline_regression.pt`` was recorded by ``tests/data/make_pipeline_regression.py``
on the code before the port (token_sparse, token_select, snapkv, streaming_llm at sparse budgets,
tiny Llama/Qwen3, batch 1 and a left-padded batch of 2, prefill / chunked prefill / decode). Every
selection (as a key mask, in call order) must be identical, and the logits equal to fp32 round-off.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "data"))

from make_pipeline_regression import OUT, RecordingTelemetry, cases, run_case  # noqa: E402

import tokensparse as ts  # noqa: E402

_REF = torch.load(OUT, weights_only=False) if OUT.exists() else {}
_KIND = {"keep": "keys"}
_CASES = {key: rest for key, *rest in cases()}


def test_fixture_covers_every_case():
    assert set(_REF) == set(_CASES)


@pytest.mark.parametrize("key", sorted(_CASES))
def test_same_selections_and_logits_as_before_the_port(key):
    model, name, cfg, mode, ids, mask = _CASES[key]
    ref = _REF[key]
    logits = run_case(model, ts.methods.get(name)(**cfg), mode, ids, mask, False)
    assert logits.shape == ref["logits"].shape
    # fp32 round-off: the fixture was recorded on an AMD EPYC; an Intel Xeon's kernels differ by up
    # to 1.1e-5 (llama/b1/token_sparse-qhead/decode). A changed selection moves logits by far more,
    # and the selections themselves are compared exactly below.
    assert (logits - ref["logits"]).abs().max().item() <= 5e-5
    tele = RecordingTelemetry()
    run_case(model, ts.methods.get(name)(**cfg), mode, ids, mask, tele)
    assert len(tele.selections) == len(ref["selections"])
    for (layer, kind, sel), (ref_layer, ref_kind, ref_sel) in zip(tele.selections, ref["selections"]):
        # Engine v2 names an eviction's selection "keep"; before the port it was recorded as "keys"
        assert (layer, _KIND.get(kind, kind)) == (ref_layer, ref_kind)
        if ref_sel is None:
            assert sel is None
        else:
            assert torch.equal(sel, ref_sel), f"layer {layer}: selection changed"
