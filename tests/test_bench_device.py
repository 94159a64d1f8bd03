"""Benchmarks on any device: --device/--dtype/--model-config options, device-synchronised timers,
the environment record (GPU identity), random-weight model shapes, and the executor bench's
sampled correctness gate.

No test needs a GPU: the CUDA paths are checked by standing in for ``torch.cuda`` where the point is
*what* is called (synchronise around a timed region, read the peak, name the GPU); timings are never
asserted. The bench runs use a 2-layer SmolLM2-shaped model with random weights.
"""

import json
from types import SimpleNamespace

import pytest
import torch

import tokensparse as ts
import tokensparse.bench as bench
from tokensparse.bench import executors as bx
from tokensparse.bench import model_configs as mc
from tokensparse.cli import main, make_parser
from tokensparse.engine.executors import compress_attend_scatter
from tokensparse.eval import env as eval_env

pytestmark = pytest.mark.usefixtures("one_thread")

#: the keys every stored benchmark result file has in its "env" (docs/results/*.json rely on them)
OLD_ENV_KEYS = {"torch", "transformers", "tokensparse", "threads", "cpu", "cpus", "loadavg", "dtype", "time"}


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Any model load or build fails loudly: argument errors must come before it."""
    import tokensparse.models

    def refuse(*a, **k):
        raise AssertionError("arguments must be validated before a model is loaded or built")

    monkeypatch.setattr(ts, "load_model", refuse)
    monkeypatch.setattr(tokensparse.models, "load_model", refuse)
    monkeypatch.setattr(mc, "random_model", refuse)
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _fails(argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    assert match in msg, msg
    return msg


# ---- command line -------------------------------------------------------------------------------


def test_parser_accepts_the_device_options():
    args = make_parser().parse_args(["bench", "decode", "--device", "cuda:1", "--dtype", "bf16",
                                     "--model-config", "llama-3.1-8b", "--layers", "2", "--seed", "3"])
    assert (args.device, args.dtype, args.model_config, args.layers, args.seed) == ("cuda:1", "bf16", "llama-3.1-8b", 2, 3)
    args = make_parser().parse_args(["bench", "prefill"])
    assert (args.device, args.dtype, args.model_config, args.layers, args.seed) == ("cpu", "fp32", None, None, 0)
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(["bench", "prefill", "--dtype", "int8"])
    assert e.value.code == 2


def test_help_names_every_model_config():
    sub = next(a for a in make_parser()._actions if a.dest == "command").choices["bench"]
    text = sub.format_help().replace("\n", " ")
    for name in mc.MODEL_CONFIGS:
        assert name in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is unavailable")
@pytest.mark.parametrize("what", ["prefill", "decode", "attention", "executors"])
def test_cuda_without_cuda_is_an_error_not_a_cpu_run(no_model, what):
    msg = _fails(["bench", what, "--device", "cuda"], "CUDA is not available")
    assert "does not fall back to the CPU" in msg


@pytest.mark.parametrize("argv, match", [
    (["bench", "prefill", "--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["bench", "prefill", "--device", "meta"], "support cpu and cuda devices"),
    (["bench", "decode", "--model-config", "gpt-5"], "--model-config: unknown 'gpt-5'; known: llama-3.1-8b"),
    (["bench", "decode", "--layers", "2"], "--layers needs --model-config NAME"),
    (["bench", "decode", "--model-config", "smollm2-135m", "--layers", "31"], "--layers must be an integer in 1..30"),
    (["bench", "prefill", "--model-config", "qwen3-8b", "--layers", "0"], "in 1..36"),
    (["bench", "executors", "--model-config", "qwen3-8b", "--layers", "2"], "executors has no layers"),
])
def test_bad_device_and_model_options_fail_before_loading(no_model, argv, match):
    _fails(argv, match)


def test_resolve_device_and_dtype():
    assert bench.resolve_device("cpu") == torch.device("cpu")
    assert [bench.resolve_dtype(x) for x in ("fp32", "bf16", "fp16", "bfloat16", torch.float16)] == [
        torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="--dtype must be one of fp32, bf16, fp16"):
        bench.resolve_dtype("fp8")


def test_cuda_build_without_a_visible_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(ValueError, match="built with CUDA but sees no usable GPU"):
        bench.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"only 1 CUDA device\(s\) visible"):
        bench.resolve_device("cuda:3")


# ---- timers, peak memory, environment (CUDA paths with torch.cuda stood in for) -----------------


def test_timed_synchronises_cuda_before_and_after(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    t = bench.timed(lambda: events.append("work"), torch.device("cuda", 0))
    assert events == ["sync", "work", "sync"] and t >= 0
    events.clear()
    bench.timed(lambda: events.append("work"), torch.device("cpu"))
    bench.timed(lambda: events.append("work"))
    assert events == ["work", "work"]  # nothing to wait for on the CPU


def test_decode_selection_timer_synchronises_on_cuda(monkeypatch):
    """On CUDA the decode bench times selections between two synchronisations (the session's own
    timer reads the host clock only), set on the session instance."""
    from collections import Counter

    from tokensparse.bench.decode import _synchronised_selection

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    session = SimpleNamespace(stats=Counter())
    _synchronised_selection(session, torch.device("cuda", 0))
    with session.selecting():
        events.append("select")
    assert events == ["sync", "select", "sync"] and session.stats["selection_s"] > 0


def test_peak_memory_is_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    cuda = torch.device("cuda", 0)
    bench.reset_peak_memory(cuda)
    assert bench.peak_memory_bytes(cuda) == 123 and calls == ["reset"]
    bench.reset_peak_memory("cpu")
    assert bench.peak_memory_bytes("cpu") is None and calls == ["reset"]
    assert bench.max_or_none(None, 5) == 5 and bench.max_or_none(7, None) == 7 and bench.max_or_none(3, 9) == 9


def _fake_gpu(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(eval_env, "_nvidia_driver", lambda index: "570.86")


def test_environment_records_the_dtype_run_and_the_gpu(monkeypatch):
    env = bench.environment("cpu", torch.bfloat16)
    assert OLD_ENV_KEYS <= env.keys()
    assert (env["dtype"], env["device"], env["gpu"]) == ("bfloat16", "cpu", None)
    assert set(env["git"]) == {"commit", "dirty"}
    json.dumps(env)
    _fake_gpu(monkeypatch)
    gpu = bench.environment(torch.device("cuda", 0), torch.float16)["gpu"]
    assert gpu["name"] == "NVIDIA H200" and gpu["capability"] == "9.0" and gpu["index"] == 0
    assert gpu["total_memory_bytes"] == 150_000_000_000 and gpu["cuda"] == "12.8" and gpu["driver"] == "570.86"


def test_eval_environment_keeps_its_keys_and_adds_dtype_and_gpu_when_asked(monkeypatch):
    before = eval_env.environment(command="x")
    assert set(before) == {"versions", "git", "torch_threads", "hardware", "command"}
    assert set(before["hardware"]) == {"cpu", "cpu_count", "platform", "device"} and before["hardware"]["device"] == "cpu"
    assert eval_env.environment(command="x", dtype=torch.bfloat16)["dtype"] == "bfloat16"
    _fake_gpu(monkeypatch)
    hw = eval_env.environment(command="x", device="cuda:0")["hardware"]
    assert hw["device"] == "cuda: NVIDIA H200" and hw["gpu"]["capability"] == "9.0"


# ---- model shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [
    ("llama-3.1-8b", 8_030_261_248), ("qwen3-8b", 8_190_735_360),
    ("llama-3.2-1b", 1_235_814_400), ("smollm2-135m", 134_515_008),
])
def test_model_shapes_have_the_published_parameter_counts(name, params):
    """Built on the meta device (no memory): the counts are those of the released checkpoints."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc.build_config(name), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params


def test_large_config_fields():
    llama = mc.build_config("llama-3.1-8b")
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads, llama.num_key_value_heads,
            llama.intermediate_size, llama.vocab_size, llama.max_position_embeddings) == (4096, 32, 32, 8, 14336, 128256, 131072)
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    qwen = mc.build_config("qwen3-8b", layers=4)
    assert qwen.model_type == "qwen3" and (qwen.num_hidden_layers, qwen.head_dim, qwen.intermediate_size,
                                           qwen.vocab_size) == (4, 128, 12288, 151936)
    assert mc.attention_shape("llama-3.1-8b") == {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
    with pytest.raises(ValueError, match="unknown model config"):
        mc.build_config("nope")


def test_random_model_is_built_in_the_dtype_and_seeded():
    a, info = mc.random_model("smollm2-135m", layers=1, dtype=torch.bfloat16, seed=5)
    b, _ = mc.random_model("smollm2-135m", layers=1, dtype=torch.bfloat16, seed=5)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16} and a.device.type == "cpu"
    assert a.config.num_hidden_layers == 1 and a.config._attn_implementation == "sdpa"
    assert info["model_config"] == "smollm2-135m" and info["layers"] == 1 and info["full_layers"] == 30
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ids = mc.random_prompt(100, a.config.vocab_size, seed=1)
    assert ids.shape == (1, 100) and torch.equal(ids, mc.random_prompt(100, a.config.vocab_size, seed=1))


# ---- bench runs on a 2-layer SmolLM2-shaped model in bf16 ----------------------------------------


def test_bench_decode_bf16_random_model_writes_json(tmp_path, capsys):
    variants = tmp_path / "v.json"
    variants.write_text('[{"label": "quest 50%", "method": "quest", "config": {"budget": 0.5, "dense_layers": 0}},'
                        ' {"label": "snapkv 25%", "method": "snapkv", "config": {"budget": 0.25}}]')
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model-config", "smollm2-135m", "--layers", "2", "--lengths", "256",
                 "--repeats", "1", "--steps", "2", "--dtype", "bf16", "--variants", str(variants),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert OLD_ENV_KEYS <= res["env"].keys()
    assert (res["env"]["dtype"], res["env"]["device"], res["env"]["gpu"]) == ("bfloat16", "cpu", None)
    assert res["model"]["model_config"] == "smollm2-135m" and res["model"]["layers"] == 2
    assert res["model"]["source"] == "random weights" and res["model"]["dtype"] == "bfloat16"
    rows = {r["variant"]: r for r in res["results"]}
    assert set(rows) == {"dense DynamicCache", "dense KVCache (prealloc)", "quest 50%", "snapkv 25%"}
    assert all(r["length"] == 256 and r["peak_device_bytes"] is None for r in rows.values())
    # the eviction method decodes over the cache its own prefill compressed
    dense_kv = rows["dense KVCache (prealloc)"]["kv_bytes_at_start"]
    assert rows["quest 50%"]["kv_bytes_at_start"] == dense_kv
    assert rows["snapkv 25%"]["kv_bytes_at_start"] < 0.3 * dense_kv
    assert rows["quest 50%"]["selection_share"] is not None and rows["dense DynamicCache"]["selection_share"] is None
    assert "peak_device_bytes" in res["memory_note"]


def test_bench_decode_static_variants(tmp_path, capsys):
    """--static eager adds static-shape dense and the variants that have a static form (a share
    budget resolved at the prompt length); the others are skipped with a note."""
    variants = tmp_path / "v.json"
    variants.write_text('[{"label": "ts 50%", "method": "token_select", "config": {"budget": 0.5, "n_sink": 4, '
                        '"n_local": 8}}, {"label": "tidal 50%", "method": "tidal_decode", "config": {"budget": 0.5}}]')
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model-config", "smollm2-135m", "--layers", "2", "--lengths", "128",
                 "--repeats", "1", "--steps", "2", "--variants", str(variants), "--no-dynamic", "--static", "eager",
                 "--json", str(out)]) == 0
    assert "static decode: tidal 50% skipped" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"dense KVCache (prealloc)", "ts 50%", "tidal 50%", "static dense [eager]",
                         "static ts 50% [eager]"}
    st = rows["static ts 50% [eager]"]
    assert st["static"] == "eager" and st["config"]["budget"] == 64 and st["compile_s"] is None
    assert st["ms_per_token"]["n"] == 2 and st["kv_bytes_at_start"] > rows["dense KVCache (prealloc)"]["kv_bytes_at_start"]
    with pytest.raises(SystemExit, match="--static applies to bench decode"):
        main(["bench", "prefill", "--static", "eager"])
    with pytest.raises(SystemExit, match="unknown mode"):
        main(["bench", "decode", "--static", "eager,fast"])


@pytest.mark.parametrize("warm", [False, True])
def test_bench_decode_warm_state_builds_cache_state_once(tmp_path, monkeypatch, warm):
    """Without --warm-state Landmark builds its block means over the prompt in the first step of every
    round (each round copies the prefilled cache); with it, once, in an untimed step, and every round
    starts from a copy of that cache: one full build per layer (state_build_s reported)."""
    from tokensparse.engine.cache import PageSummary

    builds = []
    on_write = PageSummary.on_write

    def counting(self, layer, start, end):
        if start == 0 and end > 1:
            builds.append(end)
        return on_write(self, layer, start, end)

    monkeypatch.setattr(PageSummary, "on_write", counting)
    variants = tmp_path / "v.json"
    variants.write_text('[{"label": "lm", "method": "landmark", "config": {"budget": 32, "block": 4}},'
                        ' {"label": "ts", "method": "token_select", "config": {"budget": 32, "n_sink": 4, "n_local": 8}}]')
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model-config", "smollm2-135m", "--layers", "2", "--lengths", "128",
                 "--repeats", "2", "--steps", "2", "--variants", str(variants), "--no-dynamic", "--json", str(out)]
                + (["--warm-state"] if warm else [])) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert len(builds) == (2 if warm else 2 * 3)  # 2 layers; without: the untimed round and 2 timed rounds
    assert ("state_build_s" in rows["lm"]) == warm and "state_build_s" not in rows["ts"]
    assert rows["lm"]["selection_share"] is not None
    if not warm:
        with pytest.raises(SystemExit, match="--warm-state applies to bench decode"):
            main(["bench", "prefill", "--warm-state"])


def test_bench_prefill_bf16_random_model_writes_json(tmp_path, monkeypatch):
    from tokensparse.bench import prefill

    one = [c for c in prefill.CONFIGS if c[0] == "hip (no dense layers)"]
    monkeypatch.setattr(prefill, "CONFIGS", one)  # --methods hip picks it alone: keeps the bf16 CPU run short
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--model-config", "smollm2-135m", "--layers", "2", "--lengths", "256",
                 "--repeats", "1", "--dtype", "bf16", "--methods", "hip", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["env"]["dtype"], res["env"]["device"]) == ("bfloat16", "cpu")
    assert (res["model"]["model_config"], res["model"]["layers"]) == ("smollm2-135m", 2)
    assert [r["variant"] for r in res["results"]] == ["dense (sdpa)", "hip (no dense layers)"]
    assert all(r["length"] == 256 and r["peak_device_bytes"] is None for r in res["results"])


def test_bench_attention_reports_selection_executor_and_kept_share_per_layer(tmp_path):
    """``bench attention --variants``: one row per variant with its selection and executor times,
    the layers it left dense absent from ``kept_share_per_layer`` and the mean over the others."""
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps([{"label": "biformer, layer 0 dense", "method": "biformer",
                                     "config": {"dense_layers": 1, "dense_tail": 0}}]))
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--model-config", "smollm2-135m", "--layers", "3", "--lengths", "512",
                 "--repeats", "1", "--variants", str(variants), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    dense, row = res["results"]
    assert dense["variant"] == "dense (sdpa)" and row["variant"] == "biformer, layer 0 dense"
    assert row["sparse_layers"] == 2 and sorted(row["kept_share_per_layer"]) == ["1", "2"]
    shares = list(row["kept_share_per_layer"].values())
    assert all(0 < x < 1 for x in shares)
    assert row["mean_kept_share_in_sparse_layers"] == pytest.approx(sum(shares) / 2, abs=1e-4)
    assert row["attention_s"] == pytest.approx(row["selection_s"] + row["executor_s"], rel=1e-6)
    assert row["config"]["method"] == "biformer" and row["config"]["dense_layers"] == 1


def test_a_configuration_the_cut_model_lacks_is_a_clear_error(monkeypatch):
    from tokensparse.bench import prefill

    late = [c for c in prefill.CONFIGS if c[0] == "token_sparse late layers τ=0.05"]
    monkeypatch.setattr(prefill, "CONFIGS", late)
    _fails(["bench", "prefill", "--model-config", "smollm2-135m", "--layers", "2", "--lengths", "64",
            "--methods", "token_sparse"],
           "configuration 'token_sparse late layers τ=0.05' does not fit this model (2 layers)")


# ---- the executor bench's sampled correctness gate ------------------------------------------------


def test_rows_to_check_always_holds_the_last_row_and_selected_rows():
    g = torch.Generator().manual_seed(0)
    selected = torch.tensor([3, 40, 41, 77, 90, 99])
    rows = bx.rows_to_check(100, 9, g, selected)
    assert rows.numel() == 9 and rows[-1] == 99 and bool((rows[1:] > rows[:-1]).all())
    assert len(set(rows.tolist()) & {3, 40, 41, 77, 90}) == 4  # (9 - 1) // 2 drawn from the selection
    assert torch.equal(bx.rows_to_check(50, 64, g), torch.arange(50))  # short: every row


def test_sampled_gate_with_every_row_equals_the_full_reference():
    """With ``check_rows >= L`` the sampled oracle is the full one (the executor's own reference)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 96, 16, generator=g) for h in (4, 2, 2))
    idx = bx.random_selection(96, 30, 4, keep_last=8, generator=g)
    out = compress_attend_scatter(q, k, v, idx, 0.25)
    rows = torch.arange(96)
    for h in range(4):
        sel = torch.zeros(1, 96, dtype=torch.bool).scatter_(1, idx[:, h], True)
        got = bx.sampled_reference(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], rows, 0.25, sel)
        full = compress_attend_scatter(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1],
                                       idx[:, h : h + 1], 0.25, impl="reference")
        assert (got - full).abs().max() < 1e-6 and (got - out[:, h : h + 1]).abs().max() < 1e-5


def _wrong_on_selected_rows(q, k, v, idx, scale, **kw):
    """Right everywhere but in the selected rows other than the last one (a bug the uniform half of
    a small sample would mostly miss at low density)."""
    out = compress_attend_scatter(q, k, v, idx, scale, **kw).clone()
    hq = q.shape[1]
    for h in range(hq):
        rows = (idx[0, h] if idx.shape[1] == hq else idx[0, h // (hq // idx.shape[1])])[:-1]
        out[0, h, rows] += 0.5
    return out


def _wrong_on_unselected_rows(q, k, v, idx, scale, **kw):
    out = compress_attend_scatter(q, k, v, idx, scale, **kw)
    return out + (out == 0).to(out.dtype) * 0.5  # garbage where the definition says zero


@pytest.mark.parametrize("wrong", [_wrong_on_selected_rows, _wrong_on_unselected_rows])
def test_sampled_gate_catches_a_wrong_prefill_executor(monkeypatch, wrong):
    monkeypatch.setattr(bx, "compress_attend_scatter", wrong)
    with pytest.raises(RuntimeError, match=r"prefill query .* max abs error .* exceeds 0.001"):
        bx.run(lengths=[1024], densities=[0.05], repeats=1, decode_calls=1, warmup=0, check_rows=8)


def test_executors_bench_records_the_gate_and_the_model_shape(tmp_path):
    out = tmp_path / "ex.json"
    assert main(["bench", "executors", "--model-config", "llama-3.2-1b", "--lengths", "128", "--densities", "0.5",
                 "--repeats", "1", "--dtype", "bf16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert (cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"], cfg["model_config"]) == (32, 8, 64, "llama-3.2-1b")
    assert cfg["check_rows"] == bx.CHECK_ROWS and cfg["tolerance"] == bx.HALF_TOLERANCE
    assert res["env"]["dtype"] == "bfloat16"
    assert all(r["max_abs_err"] <= bx.HALF_TOLERANCE and r["peak_device_bytes"] is None for r in res["results"])
