"""Grid configs (tokensparse.eval.grid): built-in suites, overrides, validation messages."""

import json

import pytest

from tokensparse.eval import grid as G

SMALL = {
    "name": "small",
    "lengths": [256],
    "tasks": [{"task": "passkey", "depths": [0.5]}, "common_words"],
    "methods": [{"method": "snapkv", "configs": [{"budget": 0.5}], "placements": ["inside", "after"]},
                {"method": "streaming_llm", "configs": [{"budget": 0.5}, {"budget": 0.25}]}],
}


V2_TASKS = {"needle_number", "needle_uuid", "multikey", "multivalue", "multiquery", "vartrack", "long_answer"}


def test_suites_load_and_are_sized():
    assert {"smoke", "standard", "standard-8k", "passkey"} <= set(G.suite_names())
    smoke = G.build_grid(G.load_suite("smoke"))
    assert smoke.size() == (7, 42)
    assert {t.task for t in smoke.tasks} == V2_TASKS and smoke.tasks[0].lengths == [512]
    methods = {m.name for m in smoke.methods}
    assert methods == {"dense", "token_sparse", "token_select", "snapkv", "streaming_llm"}
    # v2: every task, 2K and 4K, >= 5 samples per cell, dense + 12 method runs per sample, eviction
    # methods with the question inside and after, decode-path scores without a second prefill
    standard = G.build_grid(G.load_suite("standard"))
    assert {t.task for t in standard.tasks} == V2_TASKS and standard.samples >= 5
    assert {L for t in standard.tasks for L in t.lengths} == {2048, 4096}
    assert standard.size() == (70, 910)
    assert {m.name for m in standard.methods} == methods | {"tidal_decode", "tova", "quest", "h2o", "hip", "frugal_prompt"}
    assert {m.placement for m in standard.methods if m.name == "snapkv"} == {"inside", "after"}
    assert standard.answer_loglik and not standard.telemetry
    eight = G.build_grid(G.load_suite("standard-8k"))
    assert [m.label for m in eight.methods] == [m.label for m in standard.methods]
    assert {L for t in eight.tasks for L in t.lengths} == {7936}
    # prompt (+2% tolerance) and the longest answer stay inside SmolLM2's 8192 positions
    assert 7936 * 1.02 + 64 < 8192
    # the v1 suite stays available as `passkey`
    v1 = G.build_grid(G.load_suite("passkey"))
    assert {t.task for t in v1.tasks} == {"passkey", "niah_multikey"} and v1.name == "passkey"


def test_dense_first_union_of_placements_and_duplicates_dropped():
    snap_default = {"method": "snapkv", "configs": [{"budget": 0.5}, {}]}  # 0.5 is snapkv's default budget
    cfg = {**SMALL, "methods": SMALL["methods"] + [snap_default, "dense"]}
    g = G.build_grid(cfg)
    assert [(m.name, m.placement) for m in g.methods[:2]] == [("dense", "inside"), ("dense", "after")]
    labels = [(m.label, m.placement) for m in g.methods]
    assert len(labels) == len(set(labels)) == 6
    assert ("streaming_llm(budget=0.25)", "inside") in labels
    assert g.tasks[1].depths == [None] and g.tasks[1].lengths == [256]
    assert g.size() == (2, 12)
    only = G.build_grid({**SMALL, "dense_placements": ["inside"]})
    assert [m.placement for m in only.methods if m.name == "dense"] == ["inside"]
    full = g.methods[2].full_config()
    assert full["method"] == "snapkv" and full["budget"] == 0.5 and "window" in full  # defaults included
    json.dumps(g.config)


def test_overrides():
    cfg = G.apply_overrides(SMALL, ["lengths=[1024, 2048]", "tasks.0.depths=[0.1,0.9]", "name=quick",
                                    'methods.1.configs=[{"budget": 0.1}]', "telemetry=false",
                                    'tasks.1={"task": "common_words", "options": {"freq_uncommon": 2}}'])
    assert SMALL["lengths"] == [256]  # the input is not modified
    g = G.build_grid(cfg)
    assert g.name == "quick" and not g.telemetry
    assert g.tasks[0].lengths == [1024, 2048] and g.tasks[0].depths == [0.1, 0.9]
    assert g.tasks[1].options == {"freq_uncommon": 2}
    assert [m.settings for m in g.methods if m.name == "streaming_llm"] == [{"budget": 0.1}]


@pytest.mark.parametrize("override, message", [
    ("lengths", "must look like key=value"),
    ("lenghts=[1]", "unknown config key 'lenghts'; known keys: name"),
    ("tasks.5.depths=[0.5]", "tasks.5 needs an index below 2"),
    ("name.x=1", "name is a value"),
])
def test_bad_overrides_name_the_fix(override, message):
    with pytest.raises(G.ConfigError, match=message):
        G.apply_overrides(SMALL, [override])


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"method": "snapkvv"}]}, r"unknown method 'snapkvv'; registered: ada_kv, biformer, cca, dhsa, fasa, fast_v, frugal_prompt, h2o, hip, hisa, landmark, minference, pyramid_kv, quest, razor_attention, rectified, recycled_attention, snapkv, sparsifiner, spatten, streaming_llm, superlinear"),
    ({"methods": [{"method": "snapkv", "configs": [{"budgt": 0.5}]}]}, "snapkv has no setting 'budgt'; settings: budget"),
    ({"methods": [{"method": "snapkv", "configs": [{"budget": 2.5}]}]}, r"bad snapkv settings: snapkv: budget must be an int > 0 \(tokens\) or a float ratio in \(0, 1\], got 2.5"),
    ({"methods": [{"method": "snapkv", "placements": ["before"]}]}, r"placements from \['inside', 'after'\]"),
    ({"tasks": ["pasky"]}, "unknown task 'pasky'; available: passkey"),
    ({"tasks": [{"task": "common_words", "depths": [0.5]}]}, "common_words has no needle depth; remove 'depths'"),
    ({"tasks": [{"task": "passkey", "depths": [1.5]}]}, r"1.5 is not a number in \[0, 1\]"),
    ({"tasks": [{"task": "niah_single", "options": {"hay": "essay"}}]}, "niah_single has no option 'hay'; options: .*haystack"),
    ({"tasks": []}, "non-empty 'tasks' list"),
    ({"lengths": [0]}, "lengths must be a non-empty list of integers >= 16"),
    ({"samples": 0}, "samples must be an integer >= 1"),
    ({"telemetry": "yes"}, "telemetry must be true or false"),
    ({"extra": 1}, r"unknown config keys \['extra'\]"),
])
def test_bad_configs_name_the_fix(change, message):
    with pytest.raises(G.ConfigError, match=message):
        G.build_grid({**SMALL, **change})


def test_load_config_errors(tmp_path):
    with pytest.raises(G.ConfigError, match="does not exist; pass a JSON file or use --suite"):
        G.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(G.ConfigError, match="not valid JSON"):
        G.load_config(bad)
    with pytest.raises(G.ConfigError, match="unknown suite 'big'; built-in suites: passkey, smoke, standard, standard-8k"):
        G.load_suite("big")
