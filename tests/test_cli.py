"""The command line: method table, method settings parsing and its errors, model-loading errors."""

from pathlib import Path

import pytest

import tokensparse as ts
from tokensparse.cli import build_method, main
from tokensparse.models import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


def test_methods_table_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ts.methods.names():
        assert name in out


def test_docs_method_table_is_current(capsys):
    main(["methods", "--markdown"])
    assert capsys.readouterr().out in (ROOT / "docs" / "methods.md").read_text()


def test_build_method_parses_literals_and_rejects_bad_settings():
    m = build_method("token_select", ["budget=0.25", "select_per=kv_head", "reuse_threshold=None"])
    assert m.budget == 0.25 and m.select_per == "kv_head" and m.reuse_threshold is None
    with pytest.raises(SystemExit, match="no setting 'budgt'"):
        build_method("token_select", ["budgt=3"])
    with pytest.raises(SystemExit, match="ratio must lie in"):
        build_method("snapkv", ["budget=1.5"])
    with pytest.raises(SystemExit, match="key=value"):
        build_method("snapkv", ["budget"])
    with pytest.raises(SystemExit, match="registered methods"):
        build_method("nope", [])


def test_load_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        ts.load_model(tmp_path)


@pytest.mark.parametrize("bad", [{"rope_type": "magic", "factor": 2.0}, {"rope_type": "yarn", "factor": 0.5}])
def test_rope_scaling_is_validated(tmp_path, bad):
    from tokensparse.models import _scaled_config
    from tokensparse.testing import tiny_config

    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling"):
        _scaled_config(tmp_path, {}, bad)
    cfg = _scaled_config(tmp_path, {}, {"rope_type": "yarn", "factor": 4.0})
    assert cfg.max_position_embeddings == 4 * 512
    assert cfg.rope_parameters["original_max_position_embeddings"] == 512


def test_demo_rejects_a_prompt_too_short_for_its_configurations(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the length is checked before the model is loaded")

    monkeypatch.setattr(ts, "load_model", no_model)
    with pytest.raises(SystemExit, match="at least 1536 tokens"):
        main(["demo", "--length", "1024", "--depths", "1"])
