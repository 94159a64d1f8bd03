"""A shared dense prefill (``Method.dense_prefill``, the runner's ``share_prefill``): a method that
declares it must generate the same tokens and score the answer the same way from a copy of dense's
prefill as from its own prefill, for every registered method that declares it; methods that act on
the prefill are refused; the grid option gives the same rows as separate prefills."""

import pytest
import torch

import tokensparse as ts
from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)
from tokensparse.eval import grid as G
from tokensparse.eval import runner, tasks
from tokensparse.eval.harness import run_sample

torch.set_num_threads(1)

LENGTH, NEW = 160, 5


def _declaring() -> list:
    """Every registered method declaring ``dense_prefill``, at a budget that really selects on a
    160-token prompt (TidalDecode once per scorer)."""
    out = []
    for name in ts.methods.names():
        cls = ts.methods.get(name)
        if name == "tidal_decode":
            out += [cls(budget=6, selection_layers=[0], scorer=s) for s in (None, "quest", "landmark", "token_select")]
        elif getattr(cls, "dense_prefill", False) is True:
            out.append(cls.at_sparse_budget())
    return out


DECLARING = _declaring()


def test_the_decode_methods_declare_it():
    names = {m.name for m in DECLARING}
    assert {"quest", "fasa", "landmark", "recycled_attention", "token_select", "tidal_decode"} <= names
    assert not ts.methods.get("spatten").dense_prefill  # its prefill accumulates importance
    assert not ts.methods.get("snapkv").dense_prefill  # eviction acts on the prefill


@pytest.fixture
def sample(tok):
    return tasks.make_samples("passkey", tok, LENGTH, depth=0.3)[0]


@pytest.fixture
def dense(model, tok, sample):
    return run_sample(model, tok, sample, None, max_new_tokens=NEW, keep_prefill=True)


@pytest.mark.parametrize("method", DECLARING, ids=lambda m: repr(m.config_dict()))
def test_a_run_from_the_shared_prefill_equals_its_own(model, tok, sample, dense, method):
    answer = torch.tensor([tok(" " + sample.answers[0], add_special_tokens=False).input_ids])
    own = run_sample(model, tok, sample, method, max_new_tokens=NEW, teacher_ids=answer)
    shared = run_sample(model, tok, sample, method, max_new_tokens=NEW, teacher_ids=answer, start=dense.prefilled)
    assert shared.prefill_shared and not own.prefill_shared
    assert shared.prediction == own.prediction and shared.new_tokens == own.new_tokens == NEW
    torch.testing.assert_close(shared.teacher.logits, own.teacher.logits, atol=1e-5, rtol=1e-5)
    assert shared.prefill_s == dense.prefilled.prefill_s
    # the method really selected (else this compares dense with dense)
    assert shared.stats and own.stats


def test_the_shared_prefill_is_never_decoded_on(model, tok, sample, dense):
    before = [layer.n for layer in dense.prefilled.cache.layers]
    m = ts.methods.get("quest").at_sparse_budget()
    a = run_sample(model, tok, sample, m, max_new_tokens=NEW, start=dense.prefilled)
    b = run_sample(model, tok, sample, m, max_new_tokens=NEW, start=dense.prefilled)
    assert [layer.n for layer in dense.prefilled.cache.layers] == before
    assert a.prediction == b.prediction
    assert run_sample(model, tok, sample, None, max_new_tokens=NEW, start=dense.prefilled).prediction == dense.prediction


def test_refusals(model, tok, sample, dense):
    with pytest.raises(ValueError, match="does not leave the prefill dense"):
        run_sample(model, tok, sample, ts.methods.get("spatten").at_sparse_budget(), start=dense.prefilled)
    with pytest.raises(ValueError, match="does not leave the prefill dense"):
        run_sample(model, tok, sample, ts.methods.get("snapkv").at_sparse_budget(), start=dense.prefilled)
    other = tasks.make_samples("passkey", tok, LENGTH, depth=0.7)[0]
    with pytest.raises(ValueError, match="another prompt"):
        run_sample(model, tok, other, ts.methods.get("quest").at_sparse_budget(), start=dense.prefilled)
    with pytest.raises(ValueError, match="placement 'inside'"):
        run_sample(model, tok, sample, ts.methods.get("quest").at_sparse_budget(), placement="after",
                   start=dense.prefilled)
    with pytest.raises(ValueError, match="keep_prefill keeps a dense"):
        run_sample(model, tok, sample, ts.methods.get("quest").at_sparse_budget(), keep_prefill=True)
    with pytest.raises(ValueError, match="telemetry"):
        run_sample(model, tok, sample, ts.methods.get("quest").at_sparse_budget(), telemetry=True,
                   start=dense.prefilled)
    with pytest.raises(G.ConfigError, match="share_prefill needs telemetry false"):
        G.build_grid({"name": "x", "tasks": ["passkey"], "share_prefill": True})
    with pytest.raises(G.ConfigError, match="share_prefill must be true or false"):
        G.build_grid({"name": "x", "tasks": ["passkey"], "share_prefill": 1, "telemetry": False})


CONFIG = {
    "name": "shared",
    "lengths": [LENGTH],
    "max_new_tokens": NEW,
    "telemetry": False,
    "tasks": [{"task": "passkey", "depths": [0.3, 0.6]}],
    "methods": [
        {"method": "quest", "configs": [{"budget": 12, "page": 4, "dense_layers": 0}]},
        {"method": "spatten", "configs": [{}]},  # acts on the prefill: runs its own
        {"method": "recycled_attention", "configs": [{"budget": 12, "stride": 2, "n_sink": 1, "n_local": 2}]},
        {"method": "snapkv", "configs": [{"budget": 0.5, "window": 8}], "placements": ["after"]},
    ],
}

COMPARED = ("prediction", "score", "new_tokens", "prompt_tokens", "kv_bytes", "answer_tokens")


def _compare(rows_a, rows_b):
    assert [r["key"] for r in rows_a] == [r["key"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert "error" not in a and "error" not in b
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
        assert a["answer_loglik"] == pytest.approx(b["answer_loglik"], abs=1e-5)
        if a["fidelity"] is not None:
            assert a["fidelity"]["kl"] == pytest.approx(b["fidelity"]["kl"], abs=1e-6)


def test_the_grid_option_gives_the_rows_of_separate_prefills(model, tok, tmp_path):
    separate = runner.run_grid(model, tok, G.build_grid(CONFIG), tmp_path / "a", progress=False)
    shared = runner.run_grid(model, tok, G.build_grid({**CONFIG, "share_prefill": True}), tmp_path / "b",
                             progress=False)
    assert separate["errors"] == shared["errors"] == 0
    rows_a, rows_b = runner.read_rows(separate["path"]), runner.read_rows(shared["path"])
    _compare(rows_a, rows_b)
    assert not any(r["prefill_shared"] for r in rows_a)
    flags = {(r["method"], r["placement"]): r["prefill_shared"] for r in rows_b}
    assert flags == {("dense", "inside"): False, ("dense", "after"): False, ("quest", "inside"): True,
                     ("spatten", "inside"): False, ("recycled_attention", "inside"): True,
                     ("snapkv", "after"): False}
    for sid in {r["sample_id"] for r in rows_b}:  # the shared rows carry dense's prefill time
        dense = next(r for r in rows_b if r["sample_id"] == sid and r["method"] == "dense" and r["placement"] == "inside")
        for r in rows_b:
            if r["sample_id"] == sid and r["prefill_shared"]:
                assert r["prefill_s"] == dense["prefill_s"]


def test_a_resumed_grid_prefills_once_without_its_dense_row(model, tok, tmp_path, monkeypatch):
    """When dense's row is already done, the runner makes the shared prefill itself, and the dense
    reference logits (fidelity) come from that same pass: one dense prefill per sample."""
    grid = G.build_grid({**CONFIG, "share_prefill": True, "methods": CONFIG["methods"][:1]})
    first = runner.run_grid(model, tok, grid, tmp_path, progress=False)
    rows = runner.read_rows(first["path"])
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows if r["method"] == "dense"))
    dense_passes = []
    real = runner.run_sample

    def counted(model_, tok_, sample_, method=None, **kw):
        if method is None:
            dense_passes.append(sample_.sample_id)
        return real(model_, tok_, sample_, method, **kw)

    monkeypatch.setattr(runner, "run_sample", counted)
    monkeypatch.setattr(runner, "_dense_reference", lambda *a, **k: pytest.fail("a second dense pass"))
    again = runner.run_grid(model, tok, grid, tmp_path, progress=False)
    assert again["ran"] == 2 and again["errors"] == 0
    assert sorted(dense_passes) == sorted({r["sample_id"] for r in rows})  # one dense pass per sample
    redone = [r for r in runner.read_rows(path) if r["method"] == "quest"]
    _compare([r for r in rows if r["method"] == "quest"], redone)
    assert all(r["prefill_shared"] and r["prefill_s"] > 0 and r["fidelity"] is not None for r in redone)
