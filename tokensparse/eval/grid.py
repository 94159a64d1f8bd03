"""The evaluation grid: a JSON config (or a built-in suite), ``key=value`` overrides, validation,
and its expansion into samples × method runs.

Config format (every key optional except ``tasks``; defaults shown)::

    {
      "name": "my-grid",                 # recorded in every result row
      "description": "",
      "seeds": [0],                      # task seeds
      "samples": 1,                      # samples per (task, length, depth, seed)
      "lengths": [4096],                 # prompt lengths in tokens, for tasks without their own
      "placements": ["inside"],          # question placement for methods without their own
      "tasks": [                         # a task name, or an object:
        "common_words",
        {"task": "passkey", "depths": [0.1, 0.9], "lengths": [2048], "options": {}}
      ],
      "methods": [                       # dense is always added; one run per config × placement
        {"method": "snapkv", "configs": [{"budget": 0.25}, {"budget": 0.5}], "placements": ["after"]}
      ],
      "dense_placements": null,          # null: every placement some method uses
      "answer_loglik": true,             # teacher-forced log-likelihood of the gold answer (+ fidelity)
      "loglik_max_length": null,         # skip that extra pass for prompts longer than this
      "telemetry": true,                 # density / kept attention mass of sparse runs
      "max_new_tokens": null,            # null: the task's own
      "threads": null,                   # torch threads (the CLI's --threads wins)
      "peers": [],                       # peer libraries run on the same samples (below)
      "skip_peers": false,               # true (or `tokensparse eval --skip-peers`): run no peer
      "share_prefill": false,            # decode-time methods start from a copy of dense's prefill (below)
      "rope_scaling": null               # e.g. {"rope_type": "yarn", "factor": 4.0}: prompts beyond the
    }                                    # trained context (below)

``depths`` apply only to needle tasks (:data:`tasks.DEPTH_TASKS`); ``null`` means a random depth
per sample, and is the default. ``options`` go to the task generator (e.g. ``{"haystack": "essay"}``).

``share_prefill`` prefills each sample once, densely, and starts every method that leaves the
prefill dense (``Method.dense_prefill``: the decode-time selection methods; placement ``"inside"``)
from a copy of that cache, instead of prefilling again per method: the answers, log-likelihoods and
decode times are what a run's own prefill gives (tests/test_shared_prefill.py), and a long-context
sweep of decode methods costs one prefill per sample. Such rows say ``prefill_shared: true`` and
carry the dense prefill's ``prefill_s``. It needs ``telemetry: false`` (the telemetry would count
the prefill's calls apart from the generation's).

``rope_scaling`` runs prompts beyond the model's trained context (the bundled SmolLM2: 8192 tokens)
with RoPE scaling set through the model config (:func:`tokensparse.load_model`'s ``rope_scaling``;
at 16K the bundled model keeps the pass key with YaRN ×4, not with the benchmarks' ×2:
``docs/results/long_context``). ``tokensparse eval`` loads the model with it;
:func:`~tokensparse.eval.runner.run_grid` refuses a model whose config does not carry the same
scaling, and the rows of a scaled model are keyed apart from unscaled ones (``model.rope``).

Overrides are ``key=value`` strings with a dotted path (list items by index) and a JSON value; a
value that is not JSON is taken as a string: ``lengths=[1024]``, ``telemetry=false``,
``tasks.0.depths=[0.5]``, ``methods.1.configs=[{"budget":0.1}]``, ``name=quick``.

Peers (``docs/peers.md``): other libraries run on the same samples with identical token ids, scored
by the same scorer, their rows appended to the same results file. One entry per library::

    "peers": [
      {"peer": "kvpress",                          # NVIDIA kvpress, in its own env (make kvpress-env)
       "presses": [["snapkv", 0.5], "tova:0.75",   # [name, compression_ratio], "name:ratio",
                   {"press": "knorm", "compression_ratio": 0.5},   # or an object,
                   "expected_attention"],          # or a bare name, crossed with compression_ratios
       "compression_ratios": [0.5, 0.75],          # for the bare names (optional otherwise)
       "placements": ["inside", "after"],          # default: the grid's placements
       "include_dense": true,                      # the peer's own dense run at each placement
                                                   # (or at a list of placements; false: none)
       "lengths": null,                            # only the samples of these lengths (null: all)
       "python": null,                             # the peer env's interpreter (default .venv-kvpress)
       "timeout_s": null}                          # per worker call; null: no limit
    ]

kvpress's ``compression_ratio`` is the share of the KV cache *removed*; tokensparse's ``budget`` is
the share *kept*. Rows record both (``kv_kept_share = 1 - compression_ratio``), so kvpress at 0.75
matches tokensparse's eviction methods at ``budget=0.25``. Press names: :data:`PEER_PRESSES`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import tasks as task_lib
from .harness import PLACEMENTS

DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "description": "",
    "seeds": [0],
    "samples": 1,
    "lengths": [4096],
    "placements": ["inside"],
    "tasks": None,
    "methods": [],
    "dense_placements": None,
    "answer_loglik": True,
    "loglik_max_length": None,
    "telemetry": True,
    "max_new_tokens": None,
    "threads": None,
    "peers": [],
    "skip_peers": False,
    "share_prefill": False,
    "rope_scaling": None,
}
TASK_KEYS = ("task", "lengths", "depths", "options")
METHOD_KEYS = ("method", "configs", "placements")
PEER_KEYS = ("peer", "presses", "compression_ratios", "placements", "include_dense", "lengths", "python", "timeout_s")
DENSE = "dense"


def _peer_presses() -> dict[str, tuple[str, ...]]:
    from .peers import kvpress

    return {"kvpress": kvpress.PRESSES}


PEER_PRESSES: dict[str, tuple[str, ...]] = _peer_presses()  # peer -> press names its worker knows


class ConfigError(ValueError):
    """A bad grid config or override; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# loading and overrides


def suite_names() -> list[str]:
    """The built-in suites (``tokensparse/eval/suites/*.json``)."""
    folder = resources.files("tokensparse").joinpath("eval", "suites")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_suite(name: str) -> dict:
    """The raw config dict of a built-in suite."""
    if name not in suite_names():
        raise ConfigError(f"unknown suite {name!r}; built-in suites: {', '.join(suite_names())}")
    text = resources.files("tokensparse").joinpath("eval", "suites", f"{name}.json").read_text()
    return json.loads(text)


def load_config(path: str | Path) -> dict:
    """The raw config dict of a JSON file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass a JSON file or use --suite "
                          f"({', '.join(suite_names())})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None


def parse_value(text: str) -> Any:
    """JSON if it parses (numbers, true/false/null, lists, objects), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """A copy of ``config`` with each ``dotted.path=value`` override applied (see module docstring)."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {item!r} must look like key=value, "
                              "e.g. lengths=[1024] or tasks.0.depths=[0.5]")
        keys = path.split(".")
        if keys[0] not in DEFAULTS:
            raise ConfigError(f"override {item!r}: unknown config key {keys[0]!r}; known keys: {', '.join(DEFAULTS)}")
        node: Any = config
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} needs an index below {len(node)}")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth])} is a value, not an object or list")
            if last:
                node[key] = parse_value(text)
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return config


# --------------------------------------------------------------------------------------------------
# the validated grid


@dataclass
class MethodSpec:
    """One method configuration at one placement (``name == "dense"`` for the baseline)."""

    name: str
    settings: dict[str, Any]
    placement: str

    @property
    def label(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.name}({inner})" if inner else self.name

    def build(self):
        """The method config object, ``None`` for dense."""
        if self.name == DENSE:
            return None
        import tokensparse as ts

        return ts.methods.get(self.name)(**self.settings)

    def full_config(self) -> dict:
        """Every field of the method config, defaults included (``{"method": "dense"}`` for dense)."""
        method = self.build()
        return {"method": DENSE} if method is None else _jsonable(method.config_dict())


@dataclass
class PeerRunSpec:
    """One peer-library run configuration at one placement, e.g. kvpress's SnapKV at ratio 0.5.

    ``press == "dense"`` is the peer's own dense run (its driver, no press). Duck-types
    :class:`MethodSpec` (``name``, ``label``, ``settings``, ``placement``, ``full_config``) so result
    rows have one schema; ``name`` is ``"<peer>:<press>"``, e.g. ``"kvpress:snapkv"``.
    """

    peer: str
    press: str
    compression_ratio: float  # share of the KV cache removed (kvpress's convention)
    placement: str

    @property
    def name(self) -> str:
        return f"{self.peer}:{self.press}"

    @property
    def kv_kept_share(self) -> float:
        """Share of the KV cache kept: ``1 - compression_ratio`` (tokensparse's ``budget``)."""
        return round(1.0 - self.compression_ratio, 6)

    @property
    def settings(self) -> dict[str, Any]:
        return {} if self.press == DENSE else {"compression_ratio": self.compression_ratio}

    @property
    def label(self) -> str:
        return self.name if self.press == DENSE else f"{self.name}(compression_ratio={self.compression_ratio:g})"

    def full_config(self) -> dict:
        return {"method": self.name, "peer": self.peer, "press": self.press,
                "compression_ratio": self.compression_ratio, "kv_kept_share": self.kv_kept_share}


@dataclass
class PeerSpec:
    """One ``peers`` entry: the runs of one library (dense first) and how to launch it."""

    peer: str
    runs: list[PeerRunSpec]
    python: str | None = None
    timeout_s: float | None = None
    lengths: list[int] | None = None  # run only on the samples of these lengths (None: every sample)

    def covers(self, sample: "SampleSpec") -> bool:
        return self.lengths is None or sample.length in self.lengths


@dataclass
class SampleSpec:
    """One sample to generate: a task at a length, depth (``None`` = random), seed and index."""

    task: str
    options: dict[str, Any]
    length: int
    depth: float | None
    seed: int
    index: int

    def make(self, tokenizer):
        gen = task_lib.TASKS[self.task]
        return gen(tokenizer, self.length, seed=self.seed, index=self.index, depth=self.depth, **self.options)


@dataclass
class TaskSpec:
    task: str
    lengths: list[int]
    depths: list[float | None]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Grid:
    name: str
    description: str
    seeds: list[int]
    samples: int
    tasks: list[TaskSpec]
    methods: list[MethodSpec]  # dense first
    answer_loglik: bool
    loglik_max_length: int | None
    telemetry: bool
    max_new_tokens: int | None
    threads: int | None
    config: dict  # the validated raw config (recorded with the results)
    peers: list[PeerSpec] = field(default_factory=list)
    skip_peers: bool = False
    rope_scaling: dict | None = None
    share_prefill: bool = False

    def sample_specs(self) -> list[SampleSpec]:
        """Tasks outer, then lengths, depths, seeds, sample index."""
        return [
            SampleSpec(t.task, dict(t.options), L, d, s, i)
            for t in self.tasks for L in t.lengths for d in t.depths for s in self.seeds for i in range(self.samples)
        ]

    def size(self) -> tuple[int, int]:
        """``(samples, runs)``: how many samples and method runs the grid holds."""
        n = len(self.sample_specs())
        return n, n * len(self.methods)

    def peer_runs(self) -> list[PeerRunSpec]:
        """Every peer run configuration (all entries; ``skip_peers`` is the runner's business)."""
        return [r for p in self.peers for r in p.runs]

    def peer_size(self) -> int:
        """How many peer runs the grid holds (the samples each entry covers × its run configurations)."""
        specs = self.sample_specs()
        return sum(len(p.runs) * sum(p.covers(s) for s in specs) for p in self.peers)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _is_int(v, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _int_list(value, what: str, minimum: int) -> list[int]:
    """A list of integers >= ``minimum`` (a bare integer is a list of one)."""
    if _is_int(value, minimum):
        value = [value]
    if not isinstance(value, list) or not value or not all(_is_int(v, minimum) for v in value):
        raise ConfigError(f"{what} must be a non-empty list of integers >= {minimum}, got {value!r}")
    return value


def _placements(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or any(p not in PLACEMENTS for p in value):
        raise ConfigError(f"{what} must be a list of placements from {list(PLACEMENTS)}, got {value!r}")
    return list(dict.fromkeys(value))


def _task_spec(entry, default_lengths: list[int], i: int) -> TaskSpec:
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or "task" not in entry:
        raise ConfigError(f"tasks.{i} must be a task name or an object with a 'task' key, got {entry!r}")
    unknown = set(entry) - set(TASK_KEYS)
    if unknown:
        raise ConfigError(f"tasks.{i}: unknown keys {sorted(unknown)}; allowed: {', '.join(TASK_KEYS)}")
    name = entry["task"]
    if name not in task_lib.TASKS:
        raise ConfigError(f"tasks.{i}: unknown task {name!r}; available: {', '.join(task_lib.TASKS)}")
    lengths = _int_list(entry.get("lengths", default_lengths), f"tasks.{i}.lengths", 16)
    depths = entry.get("depths", [None])
    if not isinstance(depths, list) or not depths:
        raise ConfigError(f"tasks.{i}.depths must be a non-empty list of numbers in [0, 1] or null, got {depths!r}")
    for d in depths:
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1):
            raise ConfigError(f"tasks.{i}.depths: {d!r} is not a number in [0, 1] or null")
    if name not in task_lib.DEPTH_TASKS and depths != [None]:
        raise ConfigError(f"tasks.{i}: {name} has no needle depth; remove 'depths' (needle tasks: "
                          f"{', '.join(sorted(task_lib.DEPTH_TASKS))})")
    options = entry.get("options") or {}
    params = inspect.signature(task_lib.TASKS[name]).parameters
    fixed = {"tokenizer", "length", "seed", "index", "depth", "task"}
    allowed = sorted(p for p in params if p not in fixed)
    bad = [k for k in options if k not in allowed or k in fixed]
    if bad:
        raise ConfigError(f"tasks.{i}.options: {name} has no option {bad[0]!r}; options: {', '.join(allowed)}")
    return TaskSpec(name, lengths, [None if d is None else float(d) for d in depths], dict(options))


def _method_specs(entry, default_placements: list[str], i: int) -> list[MethodSpec]:
    import tokensparse as ts

    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"methods.{i} must be a method name or an object with a 'method' key, got {entry!r}")
    unknown = set(entry) - set(METHOD_KEYS)
    if unknown:
        raise ConfigError(f"methods.{i}: unknown keys {sorted(unknown)}; allowed: {', '.join(METHOD_KEYS)}")
    name = entry["method"]
    if name != DENSE and name not in ts.methods.names():
        raise ConfigError(f"methods.{i}: unknown method {name!r}; "
                          f"registered: {', '.join(ts.methods.names())} (and dense)")
    configs = entry.get("configs", [{}])
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise ConfigError(f"methods.{i}.configs must be a non-empty list of objects (settings), got {configs!r}")
    placements = _placements(entry.get("placements", default_placements), f"methods.{i}.placements")
    specs = []
    for j, settings in enumerate(configs):
        if name == DENSE:
            if settings:
                raise ConfigError(f"methods.{i}.configs.{j}: dense takes no settings")
        else:
            cls = ts.methods.get(name)
            fields = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(settings) - fields)
            if bad:
                raise ConfigError(f"methods.{i}.configs.{j}: {name} has no setting {bad[0]!r}; "
                                  f"settings: {', '.join(sorted(fields))}")
            try:
                cls(**settings)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"methods.{i}.configs.{j}: bad {name} settings: {e}") from None
        specs += [MethodSpec(name, dict(settings), p) for p in placements]
    return specs


def _is_ratio(r) -> bool:
    return isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1


def _ratio(r, where: str, name: str) -> float:
    if isinstance(r, str):
        try:
            r = float(r)
        except ValueError:
            pass
    if not _is_ratio(r):
        raise ConfigError(f"{where}: compression_ratio of {name!r} must be a number in [0, 1) (the share of "
                          f"the KV cache removed; kv_kept_share = 1 - ratio), got {r!r}")
    return float(r)


def _press_list(entry: dict, peer: str, i: int) -> list[tuple[str, float]]:
    """The ``(press, compression_ratio)`` pairs of a peer entry, validated, in order."""
    known = PEER_PRESSES[peer]
    from .peers.kvpress import DENSE_NAMES

    ratios = entry.get("compression_ratios")
    if ratios is not None:
        if not isinstance(ratios, list) or not ratios:
            raise ConfigError(f"peers.{i}.compression_ratios must be a non-empty list of numbers in [0, 1), "
                              f"got {ratios!r}")
        ratios = [_ratio(r, f"peers.{i}.compression_ratios", "compression_ratios") for r in ratios]
    presses = entry.get("presses")
    if not isinstance(presses, list) or not presses:
        raise ConfigError(f"peers.{i}.presses must be a non-empty list, e.g. [[\"snapkv\", 0.5], \"tova:0.5\"], "
                          f"got {presses!r}")
    out: list[tuple[str, float]] = []
    for j, item in enumerate(presses):
        where = f"peers.{i}.presses.{j}"
        ratio: Any = None
        if isinstance(item, str):
            name, sep, text = item.partition(":")
            ratio = text.strip() if sep else None
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            name, ratio = item
        elif isinstance(item, dict) and isinstance(item.get("press"), str):
            bad = sorted(set(item) - {"press", "compression_ratio"})
            if bad:
                raise ConfigError(f"{where}: unknown keys {bad}; allowed: press, compression_ratio")
            name, ratio = item["press"], item.get("compression_ratio")
        else:
            raise ConfigError(f"{where} must be \"name:ratio\", [name, ratio], {{\"press\": name, "
                              f"\"compression_ratio\": ratio}} or a bare name, got {item!r}")
        name = name.strip().lower()
        if name in DENSE_NAMES:
            if ratio not in (None, "") and _ratio(ratio, where, DENSE) != 0:
                raise ConfigError(f"{where}: dense takes no compression ratio, got {ratio!r}")
            out.append((DENSE, 0.0))
            continue
        if name not in known:
            raise ConfigError(f"{where}: unknown {peer} press {name!r}; known: dense, {', '.join(known)}")
        if ratio is None:
            if ratios is None:
                raise ConfigError(f"{where}: press {name!r} needs a compression ratio: [\"{name}\", 0.5], "
                                  f"\"{name}:0.5\", or a 'compression_ratios' list on peers.{i}")
            out += [(name, r) for r in ratios]
        else:
            out.append((name, _ratio(ratio, where, name)))
    return out


def _peer_spec(entry, default_placements: list[str], i: int) -> PeerSpec:
    if not isinstance(entry, dict) or "peer" not in entry:
        raise ConfigError(f"peers.{i} must be an object with a 'peer' key, e.g. "
                          f"{{\"peer\": \"kvpress\", \"presses\": [[\"snapkv\", 0.5]]}}, got {entry!r}")
    unknown = set(entry) - set(PEER_KEYS)
    if unknown:
        raise ConfigError(f"peers.{i}: unknown keys {sorted(unknown)}; allowed: {', '.join(PEER_KEYS)}")
    peer = entry["peer"]
    if peer not in PEER_PRESSES:
        raise ConfigError(f"peers.{i}: unknown peer {peer!r}; supported: {', '.join(PEER_PRESSES)}")
    presses = _press_list(entry, peer, i)
    placements = _placements(entry.get("placements", default_placements), f"peers.{i}.placements")
    include_dense = entry.get("include_dense", True)
    if include_dense is True:
        dense_placements = placements
    elif include_dense is False:
        dense_placements = []
    elif isinstance(include_dense, (list, str)):
        dense_placements = _placements(include_dense, f"peers.{i}.include_dense")
    else:
        raise ConfigError(f"peers.{i}.include_dense must be true, false or a list of placements, got {include_dense!r}")
    python = entry.get("python")
    if python is not None and (not isinstance(python, str) or not python):
        raise ConfigError(f"peers.{i}.python must be null or the path of the {peer} env's interpreter, got {python!r}")
    timeout = entry.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"peers.{i}.timeout_s must be null or a number of seconds > 0, got {timeout!r}")
    if (DENSE, 0.0) in presses and not dense_placements:
        raise ConfigError(f"peers.{i}: 'dense' is listed in presses but include_dense is false")
    presses = [p for p in dict.fromkeys(presses) if p[0] != DENSE]  # dense runs follow include_dense
    lengths = entry.get("lengths")
    if lengths is not None and (not isinstance(lengths, list) or not lengths
                                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)):
        raise ConfigError(f"peers.{i}.lengths must be null or a non-empty list of positive token counts, got {lengths!r}")
    runs = [PeerRunSpec(peer, DENSE, 0.0, p) for p in dense_placements]
    runs += [PeerRunSpec(peer, name, r, p) for p in placements for name, r in presses]
    return PeerSpec(peer, runs, python, None if timeout is None else float(timeout), lengths)


def build_grid(config: dict) -> Grid:
    """Validate a raw config dict and expand it into a :class:`Grid` (dense added, duplicates dropped)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a grid config is a JSON object, got {type(config).__name__}")
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; known keys: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    if not cfg["tasks"] or not isinstance(cfg["tasks"], list):
        raise ConfigError("the config needs a non-empty 'tasks' list, e.g. \"tasks\": [\"passkey\"]")
    if not isinstance(cfg["methods"], list):
        raise ConfigError("'methods' must be a list of method names or objects")
    seeds = _int_list(cfg["seeds"], "seeds", 0)
    samples = cfg["samples"]
    if not _is_int(samples, 1):
        raise ConfigError(f"samples must be an integer >= 1 (samples per cell), got {samples!r}")
    lengths = _int_list(cfg["lengths"], "lengths", 16)
    placements = _placements(cfg["placements"], "placements")
    task_specs = [_task_spec(t, lengths, i) for i, t in enumerate(cfg["tasks"])]

    methods: list[MethodSpec] = []
    for i, entry in enumerate(cfg["methods"]):
        methods += _method_specs(entry, placements, i)
    sparse = [m for m in methods if m.name != DENSE]
    if cfg["dense_placements"] is None:
        used = {m.placement for m in methods}
        dense_pl = [p for p in PLACEMENTS if p in used] or placements
    else:
        dense_pl = _placements(cfg["dense_placements"], "dense_placements")
    dense = [MethodSpec(DENSE, {}, p) for p in dense_pl]
    unique: dict[str, MethodSpec] = {}  # by full config: {"budget": 0.5} and {} may be the same run
    for m in dense + sparse:
        unique.setdefault(json.dumps([m.full_config(), m.placement], sort_keys=True), m)

    for key in ("loglik_max_length", "max_new_tokens", "threads"):
        v = cfg[key]
        if v is not None and not _is_int(v, 1):
            raise ConfigError(f"{key} must be null or an integer >= 1, got {v!r}")
    for key in ("answer_loglik", "telemetry", "skip_peers", "share_prefill"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg["share_prefill"] and cfg["telemetry"]:
        raise ConfigError("share_prefill needs telemetry false: a run's telemetry would count its own prefill")
    rope = _rope_scaling(cfg["rope_scaling"])
    if rope is not None and cfg["peers"]:
        raise ConfigError("rope_scaling is not passed to peer libraries: run the peers in a grid without it "
                          "(their rows would come from an unscaled model)")
    if not isinstance(cfg["peers"], list):
        raise ConfigError("'peers' must be a list of objects, e.g. [{\"peer\": \"kvpress\", \"presses\": [[\"snapkv\", 0.5]]}]")
    peers, seen = [], set()
    for i, entry in enumerate(cfg["peers"]):
        spec = _peer_spec(entry, placements, i)
        spec.runs = [r for r in spec.runs if json.dumps([r.full_config(), r.placement, spec.lengths]) not in seen]
        seen |= {json.dumps([r.full_config(), r.placement, spec.lengths]) for r in spec.runs}
        if spec.runs:
            peers.append(spec)
    return Grid(
        name=str(cfg["name"]), description=str(cfg["description"]), seeds=seeds, samples=samples,
        tasks=task_specs, methods=list(unique.values()), answer_loglik=cfg["answer_loglik"],
        loglik_max_length=cfg["loglik_max_length"], telemetry=cfg["telemetry"],
        max_new_tokens=cfg["max_new_tokens"], threads=cfg["threads"], config=_jsonable(cfg),
        peers=peers, skip_peers=cfg["skip_peers"], rope_scaling=rope, share_prefill=cfg["share_prefill"],
    )


def _rope_scaling(v) -> dict | None:
    """The grid's ``rope_scaling``: null, or ``{"rope_type": "linear"|"dynamic"|"yarn", "factor": > 1}``."""
    if v is None:
        return None
    from ..models import check_rope_scaling

    example = '{"rope_type": "yarn", "factor": 4.0}'
    if not isinstance(v, dict) or set(v) != {"rope_type", "factor"}:
        raise ConfigError(f"rope_scaling must be null or an object with exactly rope_type and factor, e.g. {example}, "
                          f"got {v!r}")
    try:
        check_rope_scaling(v)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"rope_type": v["rope_type"], "factor": float(v["factor"])}
