"""Run an evaluation grid (methods × configs × tasks × lengths × depths × seeds × placements) and
append one JSON line per run to a results file; rerunning skips the rows already there.

The model and tokenizer are arguments, so the runner works with any causal LM the engine supports
(tests pass a tiny random model and a fake tokenizer). Each sample is generated once; its dense
runs go first, then every method run, all through :func:`tokensparse.eval.harness.run_sample`
(greedy decoding, prefill and decode timed apart, question placement explicit).

Per run, besides the generation, an optional *teacher-forced pass* (``answer_loglik`` in the grid)
scores the gold answer on the decode path (:mod:`tokensparse.eval.scoring`): the prompt prefilled
under the same method and placement, then the gold answer fed one token at a time exactly as
decoding would. It gives the answer's log-likelihood under the method (total and per token) and the
logits over the answer positions, which are compared with the dense run's (KL and top-1
agreement, :func:`metrics.logit_fidelity`). Without telemetry it shares the generation's prefill
(the cache and the method's per-layer state are copied right after the timed prefill and the
answer is fed from the copy), so it costs only its decode steps; ``loglik_max_length`` can turn it
off for long prompts.

The engine's telemetry (``telemetry`` in the grid) is recorded in a separate teacher-forced pass with
its own prefill, never in the timed generation: its sampled-row statistics run inside the attention
function and would be counted as the method's time. With telemetry on, sparse runs therefore always
get that pass (its log-likelihood is kept only where ``answer_loglik`` and ``loglik_max_length``
allow). Before the first run, one short untimed dense generation warms the process up (allocator,
kernels), so the first sample's dense timings are not inflated.

Row fields: ``key`` (hash of what identifies the run: model, task, options, length, requested depth,
seed, index, placement, full method config, max_new_tokens), ``suite``, ``run_id``, ``time``,
``model`` (fingerprint, path, dtype), ``method``, ``label``, ``config`` (every field of the method
config), ``placement``, ``task``, ``task_options``, ``sample_id``, ``length``, ``depth`` (requested,
``null`` = random), ``needle_depth`` (realised), ``seed``, ``index``, ``prompt_tokens``,
``answers``, ``prediction``, ``metric``, ``score``, ``correct``, ``new_tokens``, ``prefill_s``,
``decode_ms_per_token``, ``attention_prefill_s`` and ``attention_decode_ms_per_token`` (time
inside the attention function, :func:`tokensparse.time_attention`), ``memory`` (peak resident
memory of the generation run: ``{"peak_rss_bytes", "rss_start_bytes", "scope"}``, see
:class:`tokensparse.eval.env.PeakMemory`), ``kv_bytes`` (held at the end), ``kv_bytes_allocated`` (the cache's buffers), ``stats``, ``telemetry`` (sparse runs:
``{"density", "mass", "error", "layers_observed", "per_layer"}`` from
:meth:`tokensparse.Telemetry.report`, ``error`` being the relative error of the attention output on
sampled query rows, recorded in the teacher-forced pass; null for dense), ``answer_loglik`` (nats) with ``answer_tokens``, ``loglik_target`` and ``answer_token_logprobs`` (one
per answer token, so losses can be read by answer position), ``fidelity``
(``{"kl", "kl_max", "top1", "positions"}`` against dense, or null), ``loadavg``, ``env``
(versions, git commit, torch threads, hardware, command). A failed run has ``error`` instead of
the results; it is not counted as done, so a rerun retries it.

Peers (the grid's ``peers``, ``docs/peers.md``): after the tokensparse runs, each peer library
(NVIDIA kvpress) runs in its own environment on the same samples, with the same token ids
(:func:`tokensparse.eval.peers.rows.worker_sample`), and its rows are scored with the same scorer and
appended to the same file with the same schema and keys, so resume works the same way. A peer row
has ``method`` ``"kvpress:<press>"``, ``config`` ``{"method", "peer", "press", "compression_ratio",
"kv_kept_share"}`` (kvpress removes ``compression_ratio`` of the KV cache, so it keeps
``kv_kept_share = 1 - compression_ratio``; both are also top-level fields), ``telemetry`` and
``fidelity`` null, the peer env's versions in ``env.versions`` and the worker's own measurements
(time split, kept KV per layer, needle tokens kept) under ``peer``. ``prefill_s`` is the time to the
first answer logits and ``kv_bytes`` the K/V held at the end of generation, as for tokensparse runs.
A missing peer environment is an error naming ``make kvpress-env``; ``skip_peers`` (``tokensparse
eval --skip-peers``) runs no peer and says so.

The same plan can run on Ray (:func:`tokensparse.eval.distributed.run_grid_ray`, ``tokensparse eval
--ray``): both runners plan with :func:`prepare_run` and run a sample's runs with
:func:`run_sample_runs`, so they write the same rows. The fields that legitimately differ between
two runs of a cell (times, memory, ``env``, ...) are :data:`VOLATILE_FIELDS`; :func:`row_differences`
compares two results files on everything else, exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import sys
import traceback
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch

import tokensparse as ts

from . import metrics, scoring, tasks
from .env import environment, loadavg
from .grid import DENSE, Grid, MethodSpec, PeerRunSpec, PeerSpec, SampleSpec
from .harness import encode_sample, greedy, run_sample
from .scoring import answer_target
from .peers import kvpress as kvpress_peer
from .peers import rows as peer_rows

__all__ = ["PeerSetupError", "run_grid", "run_sample_runs", "prepare_run", "run_peers", "RunPlan", "RowLog", "VOLATILE_FIELDS", "stable_fields", "row_differences", "results_path", "read_rows", "done_keys", "row_key", "teacher_forced_answer", "answer_target"]


# --------------------------------------------------------------------------------------------------
# keys and the results file


def model_rope(model) -> dict | None:
    """The RoPE scaling the model's config carries, ``{"rope_type", "factor"}``, or ``None`` (unscaled)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rtype = params.get("rope_type", params.get("type"))
    if rtype in (None, "default"):
        return None
    factor = params.get("factor")
    return {"rope_type": rtype, "factor": None if factor is None else float(factor)}


def model_id(model) -> dict:
    """Fingerprint (weights and architecture), path and dtype: results of another model never match.
    A model run with RoPE scaling adds ``rope`` (:func:`model_rope`), which enters the row keys."""
    dtype = next(model.parameters()).dtype
    info = {
        "fingerprint": ts.model_fingerprint(model),
        "path": getattr(model.config, "_name_or_path", None) or None,
        "dtype": str(dtype).replace("torch.", ""),
    }
    rope = model_rope(model)
    if rope is not None:
        info["rope"] = rope
    return info


def rope_mismatch(grid: Grid, minfo: dict) -> str | None:
    """Why a model (its :func:`model_id`) cannot run a grid with ``rope_scaling``, or ``None``: such a
    grid runs only on a model loaded with that very scaling (no silent mismatch). Serial and Ray runs."""
    if grid.rope_scaling is None or minfo.get("rope") == grid.rope_scaling:
        return None
    return (f"the grid asks for rope_scaling {grid.rope_scaling} but the model's config carries "
            f"{minfo.get('rope') or 'none'}: load it with tokensparse.load_model(..., rope_scaling=...)")


def row_key(model_info: dict, sample: SampleSpec, spec: MethodSpec, full_config: dict,
            max_new_tokens: int | None) -> str:
    """A short hash of everything that identifies one run (not its measurements)."""
    ident = {
        "model": [model_info["fingerprint"], model_info["dtype"]],
        "task": sample.task, "options": sample.options, "length": sample.length, "depth": sample.depth,
        "seed": sample.seed, "index": sample.index, "placement": spec.placement, "config": full_config,
        "max_new_tokens": max_new_tokens,
    }
    if model_info.get("rope"):  # (absent for unscaled models: their stored keys do not change)
        ident["rope"] = model_info["rope"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def results_path(out: str | Path, grid: Grid) -> Path:
    """``out`` itself when it names a ``.jsonl`` file, else ``out/<grid name>.jsonl``."""
    out = Path(out)
    return out if out.suffix == ".jsonl" else out / f"{grid.name}.jsonl"


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results file; a line that does not parse (a run killed mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not valid JSON; ignored", file=sys.stderr)
    return rows


def done_keys(path: str | Path) -> set[str]:
    """Keys of the successful rows of a results file (failed rows are retried)."""
    return {r["key"] for r in read_rows(path) if "key" in r and not r.get("error")}


#: Row fields that may differ between two runs of the same grid on the same model, however the
#: runs are executed (serially, on Ray, on another day): when and where a run happened (``run_id``,
#: ``time``, ``loadavg``, ``env``, whose ``command`` and ``torch_threads`` differ between a serial and
#: a Ray run and whose ``ray`` entry exists only in Ray rows), wall-clock measurements (the four
#: timing fields, the prompt step's ``stats.prompt_step_s`` and the selection timer
#: ``stats.selection_s``, a peer's ``peer.*_s``), the process's resident memory (``memory``) and a
#: failed run's ``traceback`` (file paths of the installation). Everything else -- predictions,
#: scores, log-likelihoods, per-token log-probabilities, fidelity, telemetry, KV bytes, counters --
#: is a deterministic function of the model, the sample and the method config and must be
#: identical, floats bit for bit, at the same torch thread count (:func:`row_differences`).
#: A dotted name is a key inside a dict-valued field.
VOLATILE_FIELDS = frozenset({
    "run_id", "time", "loadavg", "env", "traceback", "memory",
    "prefill_s", "decode_ms_per_token", "attention_prefill_s", "attention_decode_ms_per_token",
    "stats.prompt_step_s", "stats.selection_s",
    "peer.prefill_s", "peer.compress_s", "peer.question_s", "peer.ttft_s",
})


def stable_fields(row: dict) -> dict:
    """``row`` without its :data:`VOLATILE_FIELDS` (what two runs of the same cell must agree on)."""
    out = {k: v for k, v in row.items() if k not in VOLATILE_FIELDS}
    for name in VOLATILE_FIELDS:
        parent, _, child = name.partition(".")
        if child and isinstance(out.get(parent), dict) and child in out[parent]:
            out[parent] = {k: v for k, v in out[parent].items() if k != child}
    return out


def row_differences(rows_a: list[dict], rows_b: list[dict], limit: int = 20) -> list[str]:
    """How two sets of result rows differ outside :data:`VOLATILE_FIELDS`, matched by ``key``
    (the order of rows in a file is not compared: a Ray run appends samples as they finish).

    Values must be equal exactly, floats included (two NaNs count as equal); an empty list means
    the rows are identical. At most ``limit`` differences are listed (then a count of the rest)."""
    out: list[str] = []

    def by_key(rows, name):
        keyed = {}
        for r in rows:
            if r.get("key") in keyed:
                out.append(f"{name}: key {r.get('key')} appears more than once")
            keyed[r.get("key")] = r
        return keyed

    a, b = by_key(rows_a, "a"), by_key(rows_b, "b")
    for k in a.keys() - b.keys():
        out.append(f"key {k} ({a[k].get('label')} on {a[k].get('sample_id')}) only in a")
    for k in b.keys() - a.keys():
        out.append(f"key {k} ({b[k].get('label')} on {b[k].get('sample_id')}) only in b")
    for k in a.keys() & b.keys():
        _diff(stable_fields(a[k]), stable_fields(b[k]), f"{k}", out)
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _diff(x, y, where: str, out: list[str]) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(x.keys() | y.keys(), key=str):
            if k not in x or k not in y:
                out.append(f"{where}.{k}: only in {'a' if k in x else 'b'}")
            else:
                _diff(x[k], y[k], f"{where}.{k}", out)
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            out.append(f"{where}: lengths {len(x)} != {len(y)}")
        else:
            for i, (u, v) in enumerate(zip(x, y)):
                _diff(u, v, f"{where}[{i}]", out)
    elif isinstance(x, float) and isinstance(y, float) and x != x and y != y:
        return  # NaN == NaN here: the same undefined value in both runs
    elif type(x) is not type(y) or x != y:
        out.append(f"{where}: {x!r} != {y!r}")


def _append(path: Path, row: dict) -> None:
    with path.open("a+b") as f:
        f.seek(0, 2)
        if f.tell():  # a run killed mid-write leaves a partial line: start on a fresh one
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row, default=str) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# the teacher-forced pass (public: tokensparse.eval.scoring)


def teacher_forced_answer(model, tokenizer, sample, method=None, placement: str = "inside",
                          target: str | None = None, telemetry: "ts.Telemetry | None" = None
                          ) -> tuple[float, torch.Tensor, int]:
    """``(log p(target | prompt) in nats, logits (A, V), A)`` on the decode path: a tuple view of
    :func:`tokensparse.eval.scoring.score_sample` (kept for callers of the runner)."""
    r = scoring.score_sample(model, tokenizer, sample, method, placement, target, telemetry)
    return r.loglik, r.logits, r.tokens


# --------------------------------------------------------------------------------------------------
# one run


def _base_row(key: str, grid: Grid, run_id: str, minfo: dict, sspec: SampleSpec, spec: MethodSpec | PeerRunSpec,
              config: dict, env: dict) -> dict:
    """What identifies a run, and when/where it ran (also written for a failed run)."""
    row = {
        "key": key, "suite": grid.name, "run_id": run_id,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": minfo, "method": spec.name, "label": spec.label, "config": config,
        "placement": spec.placement, "task": sspec.task, "task_options": sspec.options,
        "length": sspec.length, "depth": sspec.depth, "seed": sspec.seed, "index": sspec.index,
        "loadavg": loadavg(), "env": env,
    }
    if isinstance(spec, PeerRunSpec):
        row.update(peer=None, compression_ratio=spec.compression_ratio, kv_kept_share=spec.kv_kept_share)
    return row


def needle_retention_of(result, sample, tokenizer) -> dict | None:
    """Share of the gold needle's prompt tokens each layer still holds after an eviction method ran
    (mean over KV heads per layer; ``{"mean", "min", "per_layer"}``), or ``None`` when the cache
    kept everything or the task has no needle. Needles lie inside the context, which is tokenized
    the same way alone (as the harness feeds it) and as the prefix of the prompt."""
    if result.kept_positions is None or not sample.metadata.get("needle_spans"):
        return None
    needles = tasks.needle_token_positions(sample, tokenizer)
    if not needles:
        return None
    return metrics.needle_retention(result.kept_positions, needles)


def shares_prefill(spec: MethodSpec | PeerRunSpec, grid: Grid) -> bool:
    """Whether this run starts from the sample's shared dense prefill (``grid.share_prefill``)."""
    if not grid.share_prefill or isinstance(spec, PeerRunSpec) or spec.name == DENSE or spec.placement != "inside":
        return False
    return bool(getattr(spec.build(), "dense_prefill", False))


def run_one(model, tokenizer, sample, spec: MethodSpec, grid: Grid, reference: torch.Tensor | None = None,
            *, keep_prefill: bool = False, start=None):
    """Measure one (sample, method, placement); returns ``(result fields, teacher-forced logits or
    None, the dense prefill or None)``: ``keep_prefill`` (dense) keeps it, ``start`` runs from it."""
    method = spec.build()
    want_ll = grid.answer_loglik and _loglik_fits(tokenizer, sample, grid)
    # telemetry records attention calls a method acts on; a prompt step acts before the model
    tele = ts.Telemetry() if grid.telemetry and method is not None and method.phase != "prompt" else None
    target = answer_target(sample)
    # Without telemetry, the generation and the decode-path score share one prefill (the cache and
    # the method's state are copied after it, outside the timed regions). With telemetry, the score
    # gets its own prefill: the telemetry must not run inside the timed generation (its sampled-row
    # statistics would be timed with the method, and TokenSelect would build the full key-index
    # tensor it otherwise skips on its segmented decode path, only to report it).
    shared = want_ll and tele is None
    teacher_ids = _answer_ids(tokenizer, target) if shared else None
    r = run_sample(model, tokenizer, sample, method, placement=spec.placement,
                   max_new_tokens=grid.max_new_tokens, measure=True, teacher_ids=teacher_ids,
                   keep_prefill=keep_prefill, start=start)
    metric = sample.metadata.get("metric", "all")
    score = metrics.score(r.prediction, sample.answers, metric)
    depths = sample.metadata.get("needle_depths")
    fields = {
        "sample_id": sample.sample_id, "needle_depth": depths[0] if depths else None,
        "prompt_tokens": r.prompt_tokens, "answers": list(sample.answers), "prediction": r.prediction,
        "metric": metric, "score": score, "correct": score == 1.0, "new_tokens": r.new_tokens,
        "prefill_s": r.prefill_s, "prefill_shared": r.prefill_shared, "decode_ms_per_token": r.decode_ms_per_token,
        "attention_prefill_s": r.attention_prefill_s, "attention_decode_ms_per_token": r.attention_decode_ms_per_token,
        "memory": r.memory, "kv_bytes": r.kv_bytes, "kv_bytes_allocated": r.kv_bytes_allocated,
        "stats": dict(r.stats), "telemetry": r.telemetry,
        "answer_loglik": None, "answer_tokens": None, "loglik_target": None, "answer_token_logprobs": None,
        "fidelity": None, "needle_retention": needle_retention_of(r, sample, tokenizer),
    }
    scored = r.teacher
    if scored is None and (want_ll or tele is not None):
        scored = scoring.score_sample(model, tokenizer, sample, method, spec.placement, target, telemetry=tele)
        if tele is not None:
            fields["telemetry"] = tele.report()
    logits = None
    if want_ll and scored is not None:
        logits = scored.logits
        fields.update(answer_loglik=scored.loglik, answer_tokens=scored.tokens, loglik_target=target,
                      answer_token_logprobs=[round(float(x), 5) for x in scored.token_logprobs])
        if reference is not None and method is not None:
            fields["fidelity"] = metrics.logit_fidelity(reference, logits)
    return fields, logits, r.prefilled


def _prompt_tokens(tokenizer, sample) -> int:
    ctx, q = encode_sample(tokenizer, sample)
    return int(ctx.shape[1] + q.shape[1])


def _loglik_fits(tokenizer, sample, grid: Grid) -> bool:
    """The prompt is short enough for the answer's log-likelihood (``grid.loglik_max_length``)."""
    return grid.loglik_max_length is None or _prompt_tokens(tokenizer, sample) <= grid.loglik_max_length


def _answer_ids(tokenizer, target: str) -> torch.Tensor:
    """``(1, A)`` token ids of the teacher-forced answer text."""
    return torch.tensor([tokenizer(target, add_special_tokens=False).input_ids])


# --------------------------------------------------------------------------------------------------
# the grid


def run_grid(model, tokenizer, grid: Grid, out: str | Path, *, progress: bool = True,
             command: str | None = None, skip_peers: bool | None = None,
             peer_model_dir: str | Path | None = None) -> dict:
    """Run every (sample, method) of ``grid`` whose row is not yet in the results file, then every
    peer run (``grid.peers``) not yet there.

    ``out`` is a directory (results go to ``out/<grid name>.jsonl``) or a ``.jsonl`` path. Returns
    ``{"path", "total", "skipped", "ran", "errors", "peer_runs", "peers_skipped"}``: the counts
    include the peer runs (``peer_runs`` of them); ``peers_skipped`` is how many peer runs
    ``skip_peers`` left out. Runs are in sample order, dense first; peers come last.

    ``skip_peers`` (default: the grid's) runs no peer, and says so. Otherwise a missing peer
    environment raises :class:`~tokensparse.eval.peers.kvpress.KvpressEnvMissing` before anything
    runs. ``peer_model_dir`` is the model directory the peer worker loads (default: the directory
    ``model`` was loaded from); it must hold the same weights as ``model``.

    :func:`tokensparse.eval.distributed.run_grid_ray` runs the same plan with the samples spread
    over Ray workers; both go through :func:`prepare_run`, :func:`run_sample_runs` and
    :func:`run_peers`, so they write the same rows.
    """
    from tqdm.auto import tqdm

    minfo = model_id(model)
    if (why := rope_mismatch(grid, minfo)) is not None:
        raise ValueError(why)
    env = environment(model, command)
    run_id = new_run_id()
    prep = prepare_run(grid, out, minfo, skip_peers, f"{torch.get_num_threads()} torch threads")
    peer_setup = _peer_preflight(grid, model, minfo, prep.peer_plan, peer_model_dir) if prep.n_peer_todo else None

    if prep.n_todo:
        _warm_up(model)
    log = RowLog(prep.path)
    samples: dict[str, tuple] = {}  # sample spec -> (sample or None, error), reused by the peers
    bar = tqdm(total=prep.n_todo, desc=grid.name, unit="run", disable=not progress)

    def emit(row):
        log.add(row)
        bar.update(1)

    for sspec, todo in prep.plan:
        run_sample_runs(model, tokenizer, sspec, todo, grid, run_id=run_id, minfo=minfo, env=env,
                        samples=samples, emit=emit, status=bar.set_postfix_str)
    bar.close()
    p_ran, p_err = run_peers(prep, model=model, tokenizer=tokenizer, grid=grid, minfo=minfo, env=env,
                             run_id=run_id, samples=samples, setup=peer_setup)
    return prep.summary(log.ran + p_ran, log.errors + p_err)


def new_run_id() -> str:
    """One id per invocation of the runner (all its rows share it): start time and a random tail."""
    return dt.datetime.now().strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


@dataclasses.dataclass
class RunPlan:
    """What one invocation of the runner has to do: the results file, the tokensparse runs still to
    do per sample (:func:`_plan`) and the peer runs still to do (:func:`_peer_plan`), with counts."""

    path: Path
    plan: list  # [(sample spec, [(method spec, full config, key), ...]), ...]
    total: int
    n_todo: int
    peer_plan: list
    peer_total: int
    n_peer_todo: int
    peers_skipped: int

    def summary(self, ran: int, errors: int) -> dict:
        """The runner's return value (see :func:`run_grid`)."""
        return {"path": str(self.path), "total": self.total + self.peer_total,
                "skipped": self.total - self.n_todo + self.peer_total - self.n_peer_todo,
                "ran": ran, "errors": errors, "peer_runs": self.peer_total, "peers_skipped": self.peers_skipped}


def prepare_run(grid: Grid, out: str | Path, minfo: dict, skip_peers: bool | None, how: str) -> RunPlan:
    """Create the results directory, read what is done, plan what is left and say so on stderr
    (``how``: the compute used, e.g. ``"2 torch threads"``). Shared by the serial and Ray runners so
    both skip, and count, exactly the same runs."""
    path = results_path(out, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(path)
    configs = [spec.full_config() for spec in grid.methods]
    plan, total = _plan(grid, minfo, configs, done)
    n_todo = sum(len(t) for _, t in plan)
    skip = grid.skip_peers if skip_peers is None else bool(skip_peers)
    peers_skipped = grid.peer_size() if skip else 0
    peer_plan, peer_total = ([], 0) if skip else _peer_plan(grid, minfo, done)
    n_peer_todo = sum(len(cells) for _, _, todo in peer_plan for _, cells in todo)
    print(f"{grid.name}: {total} runs, {total - n_todo} already in {path}, {n_todo} to run ({how})", file=sys.stderr)
    if peers_skipped:
        names = ", ".join(dict.fromkeys(p.peer for p in grid.peers))
        print(f"{grid.name}: PEERS SKIPPED (skip_peers / --skip-peers): {peers_skipped} {names} runs of the grid "
              f"are not run and will be missing from the results and the report", file=sys.stderr)
    elif peer_total:
        print(f"{grid.name}: {peer_total} peer runs, {peer_total - n_peer_todo} already in {path}, "
              f"{n_peer_todo} to run after the tokensparse runs", file=sys.stderr)
    return RunPlan(path, plan, total, n_todo, peer_plan, peer_total, n_peer_todo, peers_skipped)


class RowLog:
    """Appends rows to the results file as they come and counts them (a row with ``error`` is a
    failed run, reported on stderr). The rows are written one by one so an interrupted run keeps
    everything finished before the interruption."""

    def __init__(self, path: Path):
        self.path = path
        self.ran = self.errors = 0

    def add(self, row: dict) -> None:
        if row.get("error"):
            self.errors += 1
            print(f"\nerror in {row['label']} [{row['placement']}] on {row['task']} L={row['length']}: {row['error']}",
                  file=sys.stderr)
        else:
            self.ran += 1
        _append(self.path, row)


def run_sample_runs(model, tokenizer, sspec: SampleSpec, todo: list, grid: Grid, *, run_id: str, minfo: dict,
                    env: dict, samples: dict | None = None, emit=None, status=None) -> list[dict]:
    """Run one sample's missing runs (``todo``: ``[(method spec, full config, key), ...]``, dense
    first, as :func:`_plan` lists them) and return their rows in that order; ``emit(row)`` is called
    as each row is ready, ``status(text)`` before each run (a progress bar's postfix).

    This is the unit of work of both runners: the sample is generated once, and the dense
    teacher-forced logits that the method runs' fidelity is measured against stay inside this call
    (from the dense run when it is in ``todo``, else recomputed), so a sample's rows do not depend
    on which process runs it. ``samples`` caches generated samples across calls (the serial runner
    reuses them for the peers). A run that fails gives a row with ``error`` and ``traceback``; only
    ``KeyboardInterrupt`` propagates.
    """
    # a sample that cannot be made (a length too short for the task, ...) fails every run the same way
    sample, sample_error = _make_sample(sspec, tokenizer, {} if samples is None else samples)
    reference, ref_tried = None, False  # dense teacher-forced logits of this sample
    shared = None  # the sample's dense prefill (grid.share_prefill), kept from dense or made once
    rows = []
    for spec, config, key in todo:
        if status is not None:
            status(f"{sspec.task} L={sspec.length} d={sspec.depth} {spec.label} [{spec.placement}]")
        row = _base_row(key, grid, run_id, minfo, sspec, spec, config, env)
        try:
            if sample is None:
                raise RuntimeError(f"could not generate the sample: {sample_error}")
            start = None
            if shares_prefill(spec, grid):
                if shared is None:  # no dense row ran in this call: prefill densely once for the others
                    want_ref = not ref_tried and grid.answer_loglik
                    shared, ref = _dense_prefill_for_sharing(model, tokenizer, sample, grid, want_ref)
                    if want_ref:
                        ref_tried, reference = True, ref
                start = shared
            if spec.name != DENSE and not ref_tried and grid.answer_loglik:
                ref_tried, reference = True, _dense_reference(model, tokenizer, sample, grid)
            keep = grid.share_prefill and spec.name == DENSE and spec.placement == "inside" and shared is None
            fields, logits, prefilled = run_one(model, tokenizer, sample, spec, grid, reference,
                                                keep_prefill=keep, start=start)
            shared = prefilled or shared
            if spec.name == DENSE and not ref_tried:
                ref_tried, reference = True, logits
            row.update(fields)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
        if emit is not None:
            emit(row)
    return rows


def run_peers(prep: RunPlan, *, model, tokenizer, grid: Grid, minfo: dict, env: dict, run_id: str,
              samples: dict, setup: dict | None) -> tuple[int, int]:
    """Every peer run of ``prep`` still to do (after the tokensparse runs); ``(ran, errors)``."""
    ran = errors = 0
    for peer_spec, placement, todo in prep.peer_plan:
        p_ran, p_err = _run_peer(peer_spec, placement, todo, model=model, tokenizer=tokenizer, grid=grid,
                                 path=prep.path, minfo=minfo, env=env, run_id=run_id, samples=samples, setup=setup)
        ran, errors = ran + p_ran, errors + p_err
    return ran, errors


@torch.no_grad()
def _warm_up(model, tokens: int = 256) -> None:
    """One short untimed dense generation (first-call costs: allocator growth, lazy kernel setup)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    greedy(model, ids[:, :-8], ids[:, -8:], max_new_tokens=3)


def _make_sample(sspec: SampleSpec, tokenizer, cache: dict) -> tuple:
    """``(sample, None)`` or ``(None, error text)``, generated once per sample spec."""
    ident = json.dumps(dataclasses.asdict(sspec), sort_keys=True, default=str)
    if ident not in cache:
        try:
            cache[ident] = (sspec.make(tokenizer), None)
        except Exception as e:
            cache[ident] = (None, f"{type(e).__name__}: {e}")
    return cache[ident]


def _plan(grid: Grid, minfo: dict, configs: list[dict], done: set[str]):
    """``([(sample spec, [(method spec, full config, key), ...still to run]), ...], total runs)``."""
    plan, total = [], 0
    for sspec in grid.sample_specs():
        runs = [(m, c, row_key(minfo, sspec, m, c, grid.max_new_tokens)) for m, c in zip(grid.methods, configs)]
        total += len(runs)
        todo = [r for r in runs if r[2] not in done]
        if todo:
            plan.append((sspec, todo))
    return plan, total


def _dense_prefill_for_sharing(model, tokenizer, sample, grid: Grid, reference: bool):
    """``(the sample's dense prefill, dense teacher-forced logits or None)`` from one dense prefill:
    when this call has no dense row, the shared prefill and (``reference``) the dense reference
    logits come from the same pass, as they do in a dense row (:func:`run_one`)."""
    ids = _answer_ids(tokenizer, answer_target(sample)) if reference and _loglik_fits(tokenizer, sample, grid) else None
    r = run_sample(model, tokenizer, sample, None, max_new_tokens=1, measure=True, keep_prefill=True,
                   teacher_ids=ids)
    return r.prefilled, (r.teacher.logits if r.teacher is not None else None)


def _dense_reference(model, tokenizer, sample, grid: Grid) -> torch.Tensor | None:
    """Dense teacher-forced logits when this run has no dense row of the sample (it was done in an
    earlier run, or failed); ``None`` (no fidelity numbers) if the prompt is too long or it fails."""
    if not _loglik_fits(tokenizer, sample, grid):
        return None
    try:
        return teacher_forced_answer(model, tokenizer, sample, None, "inside")[1]
    except Exception as e:
        print(f"\nwarning: no dense reference logits for {sample.sample_id}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# peers


class PeerSetupError(RuntimeError):
    """The peers of a grid cannot run with this model (no directory to load it from, not float32)."""


def _peer_plan(grid: Grid, minfo: dict, done: set[str]):
    """``([(peer spec, placement, [(sample spec, [(run spec, full config, key), ...still to run])])],
    total peer runs)``: one worker call (or a few) per peer entry and placement."""
    plan, total = [], 0
    sspecs = grid.sample_specs()
    for pspec in grid.peers:
        for placement in dict.fromkeys(r.placement for r in pspec.runs):
            runs = [(r, r.full_config()) for r in pspec.runs if r.placement == placement]
            todo = []
            for sspec in sspecs:
                if not pspec.covers(sspec):
                    continue
                cells = [(r, c, row_key(minfo, sspec, r, c, grid.max_new_tokens)) for r, c in runs]
                total += len(cells)
                cells = [cell for cell in cells if cell[2] not in done]
                if cells:
                    todo.append((sspec, cells))
            if todo:
                plan.append((pspec, placement, todo))
    return plan, total


def _peer_model_dir(model, explicit) -> Path:
    if explicit is not None:
        p = Path(explicit)
        if not (p / "config.json").is_file():
            raise PeerSetupError(f"peer model directory {p} has no config.json; pass the HF model directory the "
                             "runner's model was loaded from")
        return p
    name = getattr(model.config, "_name_or_path", None)
    if name and (Path(name) / "config.json").is_file():
        return Path(name)
    raise PeerSetupError(
        "the peer worker loads the model from disk, and the runner's model does not say where it came from "
        f"(config._name_or_path={name!r}); load it with tokensparse.load_model(DIR) or pass peer_model_dir")


def _peer_preflight(grid: Grid, model, minfo: dict, plan, peer_model_dir) -> dict:
    """Fail before any run (not after hours of tokensparse runs) if the peers cannot run."""
    n = sum(len(cells) for _, _, todo in plan for _, cells in todo)
    for python in dict.fromkeys(p.python for p, _, _ in plan if p.peer == "kvpress"):
        if not kvpress_peer.kvpress_available(python):
            exe = kvpress_peer._resolve_python(python)
            raise kvpress_peer.KvpressEnvMissing(
                f"grid {grid.name!r} has {n} kvpress peer runs to do, but the kvpress environment is missing: "
                f"{exe} {'cannot import kvpress' if exe.exists() else 'does not exist'}. Build it with "
                "`make kvpress-env` (from the repository root; kvpress 0.5.5 pins transformers<5.3, so it has "
                "its own virtualenv, see docs/peers.md), or run without peers: `tokensparse eval --skip-peers` "
                "(grid key \"skip_peers\": true).")
    if minfo["dtype"] != "float32":
        raise PeerSetupError(f"the kvpress worker runs the model in float32 and the runner's model is {minfo['dtype']}: "
                         "peer rows would not compare with tokensparse's; load the model in float32 or skip peers")
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        print(f"warning: the runner's model is on {dev}; the kvpress worker runs on the CPU, so peer timings "
              "do not compare with tokensparse's (accuracy does)", file=sys.stderr)
    return {"model_dir": _peer_model_dir(model, peer_model_dir)}


def _run_peer(pspec: PeerSpec, placement: str, todo, *, model, tokenizer, grid: Grid, path: Path, minfo: dict,
              env: dict, run_id: str, samples: dict, setup: dict) -> tuple[int, int]:
    """Run one peer entry's missing runs at one placement; append their rows; ``(ran, errors)``."""
    # the worker's own output: one file per run of the grid, so a worker row is only ever used by the run
    # that asked for it (the results file is the record; deleting it re-measures everything)
    scratch = path.parent / f"{path.stem}.peers" / f"{run_id}-{pspec.peer}-{placement}.jsonl"
    ran = errors = 0

    def emit(row):
        nonlocal ran, errors
        _append(path, row)
        if row.get("error"):
            errors += 1
            print(f"\nerror in {row['label']} [{placement}] on {row['task']} L={row['length']}: {row['error'][:500]}",
                  file=sys.stderr)
        else:
            ran += 1

    groups: dict[tuple, list] = {}  # the presses still to run -> samples needing exactly those
    for sspec, cells in todo:
        sample, sample_error = _make_sample(sspec, tokenizer, samples)
        if sample is not None:
            try:
                target = answer_target(sample) if grid.answer_loglik else None
                n_new = grid.max_new_tokens or sample.max_new_tokens
                inp = peer_rows.worker_sample(tokenizer, sample, sspec, minfo, max_new_tokens=n_new,
                                              answer_target=target, loglik_max_length=grid.loglik_max_length)
            except Exception as e:
                sample, sample_error = None, f"could not encode the sample for {pspec.peer}: {type(e).__name__}: {e}"
        if sample is None:
            for run, config, key in cells:
                emit({**_base_row(key, grid, run_id, minfo, sspec, run, config, env),
                      "error": f"RuntimeError: could not generate the sample: {sample_error}"})
            continue
        presses = tuple((run.press, run.compression_ratio) for run, _, _ in cells)
        groups.setdefault(presses, []).append((sspec, sample, inp, target if "answer_ids" in inp else None, cells))

    for presses, items in groups.items():
        print(f"\n{pspec.peer} [{placement}]: {len(items)} samples × {len(presses)} runs "
              f"({kvpress_peer.format_presses(presses)}) in the {pspec.peer} env; worker output {scratch}",
              file=sys.stderr)
        failure = None
        try:
            wrows = kvpress_peer.run_kvpress(
                [inp for _, _, inp, _, _ in items], list(presses), placement, scratch,
                threads=torch.get_num_threads(), python=pspec.python, model_dir=setup["model_dir"],
                timeout=pspec.timeout_s)
        except KeyboardInterrupt:  # keep what the worker finished, then stop
            _emit_peer_rows(items, kvpress_peer.read_results(scratch), placement, None, emit, grid, run_id, minfo,
                            env, pspec)
            raise
        except Exception as e:  # the worker died: keep what it wrote, fail the rest (retried next time)
            failure = f"{type(e).__name__}: {e}"[-3000:]
            wrows = kvpress_peer.read_results(scratch)
        _emit_peer_rows(items, wrows, placement, failure or f"the {pspec.peer} worker wrote no row for this run",
                        emit, grid, run_id, minfo, env, pspec)
    return ran, errors


def _emit_peer_rows(items, wrows, placement, missing_error, emit, grid, run_id, minfo, env, pspec) -> None:
    """Convert and emit the worker rows of ``items``; a run without a row is emitted as failed with
    ``missing_error`` (or left out when it is ``None``)."""
    found = {}
    for w in wrows:
        if w.get("placement") != placement:
            continue
        spec = str(w.get("press_spec") or w.get("press") or "").lower()
        found[kvpress_peer._key(w.get("sample_id"), spec, w.get("compression_ratio", 0.0), placement)] = w
    for sspec, sample, inp, target, cells in items:
        for run, config, key in cells:
            base = _base_row(key, grid, run_id, minfo, sspec, run, config, env)
            w = found.get(kvpress_peer._key(inp["sample_id"], run.press, run.compression_ratio, placement))
            if w is not None:
                emit(peer_rows.convert_row(w, base, sample, inp, target))
            elif missing_error is not None:
                emit({**base, "error": missing_error})
