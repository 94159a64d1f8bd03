"""Run an evaluation grid (methods × configs × tasks × lengths × depths × seeds × placements) and
append one JSON line per run to a results file; rerunning skips the rows already there.

The model and tokenizer are arguments, so the runner works with any causal LM the engine supports
(tests pass a tiny random model and a fake tokenizer). Each sample is generated once; its dense
runs go first, then every method run, all through :func:`tokensparse.eval.harness.run_sample`
(greedy decoding, prefill and decode timed apart, question placement explicit).

Per run, besides the generation, an optional *teacher-forced pass* (``answer_loglik`` in the grid)
prefills the same prompt under the same method and placement, then feeds the gold answer one token
at a time exactly as decoding would. It gives the answer's log-likelihood under the method and the
logits over the answer positions, which are compared with the dense run's (KL and top-1
agreement, :func:`metrics.logit_fidelity`). It costs one more prefill per run, so
``loglik_max_length`` can turn it off for long prompts.

Row fields: ``key`` (hash of what identifies the run: model, task, options, length, requested depth,
seed, index, placement, full method config, max_new_tokens), ``suite``, ``run_id``, ``time``,
``model`` (fingerprint, path, dtype), ``method``, ``label``, ``config`` (every field of the method
config), ``placement``, ``task``, ``task_options``, ``sample_id``, ``length``, ``depth`` (requested,
``null`` = random), ``needle_depth`` (realised), ``seed``, ``index``, ``prompt_tokens``,
``answers``, ``prediction``, ``metric``, ``score``, ``correct``, ``new_tokens``, ``prefill_s``,
``decode_ms_per_token``, ``kv_bytes``, ``stats``, ``telemetry`` (``{"density", "mass"}`` or
null), ``answer_loglik`` (nats) with ``answer_tokens`` and ``loglik_target``, ``fidelity``
(``{"kl", "kl_max", "top1", "positions"}`` against dense, or null), ``loadavg``, ``env``
(versions, git commit, torch threads, hardware, command). A failed run has ``error`` instead of
the results; it is not counted as done, so a rerun retries it.
"""

from __future__ import annotations

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

from . import metrics
from .env import environment, loadavg
from .grid import DENSE, Grid, MethodSpec, SampleSpec
from .harness import encode_sample, run_sample

__all__ = ["run_grid", "results_path", "read_rows", "done_keys", "row_key", "teacher_forced_answer", "answer_target"]


# --------------------------------------------------------------------------------------------------
# keys and the results file


def model_id(model) -> dict:
    """Fingerprint (weights and architecture), path and dtype: results of another model never match."""
    dtype = next(model.parameters()).dtype
    return {
        "fingerprint": ts.model_fingerprint(model),
        "path": getattr(model.config, "_name_or_path", None) or None,
        "dtype": str(dtype).replace("torch.", ""),
    }


def row_key(model_info: dict, sample: SampleSpec, spec: MethodSpec, full_config: dict,
            max_new_tokens: int | None) -> str:
    """A short hash of everything that identifies one run (not its measurements)."""
    ident = {
        "model": [model_info["fingerprint"], model_info["dtype"]],
        "task": sample.task, "options": sample.options, "length": sample.length, "depth": sample.depth,
        "seed": sample.seed, "index": sample.index, "placement": spec.placement, "config": full_config,
        "max_new_tokens": max_new_tokens,
    }
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


def _append(path: Path, row: dict) -> None:
    with path.open("a+b") as f:
        f.seek(0, 2)
        if f.tell():  # a run killed mid-write leaves a partial line: start on a fresh one
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row, default=str) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# the teacher-forced pass


def answer_target(sample) -> str:
    """The text whose likelihood is scored: the gold answers after a space, comma-separated."""
    return " " + ", ".join(sample.answers)


@torch.no_grad()
def teacher_forced_answer(model, tokenizer, sample, method=None, placement: str = "inside",
                          target: str | None = None) -> tuple[float, torch.Tensor, int]:
    """``(log p(target | prompt) in nats, logits (A, V) predicting each target token, A)``.

    The prompt is prefilled as :func:`harness.greedy` does for ``placement`` (under ``method``,
    with the cache its session provides), then the target is fed one token per step, so decode-time
    and eviction methods see it exactly as they see generated tokens. For dense attention this
    equals :func:`metrics.answer_loglik` on ``prompt + target``.
    """
    ctx, q = encode_sample(tokenizer, sample)
    target = answer_target(sample) if target is None else target
    ans = torch.tensor([tokenizer(target, add_special_tokens=False).input_ids])
    if ans.shape[1] == 0:
        raise ValueError(f"the answer target {target!r} has no tokens")
    dev = next(model.parameters()).device
    ctxmgr = ts.sparsify(model, method) if method is not None else nullcontext()
    with ctxmgr as session:
        kv = session.new_cache() if session is not None else ts.KVCache(model)
        if placement == "inside":
            out = model(input_ids=torch.cat([ctx, q], 1).to(dev), cache=kv, use_cache=True, logits_to_keep=1)
        else:
            model(input_ids=ctx.to(dev), cache=kv, use_cache=True, logits_to_keep=1)
            out = model(input_ids=q.to(dev), cache=kv, use_cache=True, logits_to_keep=1)
        rows = [out.logits[0, -1].float()]
        for tok in ans[0, :-1]:
            out = model(input_ids=tok.view(1, 1).to(dev), cache=kv, use_cache=True)
            rows.append(out.logits[0, -1].float())
    logits = torch.stack(rows)  # (A, V)
    logp = torch.log_softmax(logits, -1).gather(-1, ans[0, :, None].to(logits.device))
    return float(logp.sum()), logits.cpu(), int(ans.shape[1])


# --------------------------------------------------------------------------------------------------
# one run


def _base_row(key: str, grid: Grid, run_id: str, minfo: dict, sspec: SampleSpec, spec: MethodSpec,
              config: dict, env: dict) -> dict:
    """What identifies a run, and when/where it ran (also written for a failed run)."""
    return {
        "key": key, "suite": grid.name, "run_id": run_id,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": minfo, "method": spec.name, "label": spec.label, "config": config,
        "placement": spec.placement, "task": sspec.task, "task_options": sspec.options,
        "length": sspec.length, "depth": sspec.depth, "seed": sspec.seed, "index": sspec.index,
        "loadavg": loadavg(), "env": env,
    }


def run_one(model, tokenizer, sample, spec: MethodSpec, grid: Grid, reference: torch.Tensor | None = None):
    """Measure one (sample, method, placement); returns ``(result fields, teacher-forced logits or None)``."""
    method = spec.build()
    r = run_sample(model, tokenizer, sample, method, placement=spec.placement,
                   max_new_tokens=grid.max_new_tokens, telemetry=grid.telemetry and method is not None)
    metric = sample.metadata.get("metric", "all")
    score = metrics.score(r.prediction, sample.answers, metric)
    depths = sample.metadata.get("needle_depths")
    fields = {
        "sample_id": sample.sample_id, "needle_depth": depths[0] if depths else None,
        "prompt_tokens": r.prompt_tokens, "answers": list(sample.answers), "prediction": r.prediction,
        "metric": metric, "score": score, "correct": score == 1.0, "new_tokens": r.new_tokens,
        "prefill_s": r.prefill_s, "decode_ms_per_token": r.decode_ms_per_token, "kv_bytes": r.kv_bytes,
        "stats": dict(r.stats), "telemetry": r.telemetry,
        "answer_loglik": None, "answer_tokens": None, "loglik_target": None, "fidelity": None,
    }
    logits = None
    if grid.answer_loglik and (grid.loglik_max_length is None or r.prompt_tokens <= grid.loglik_max_length):
        target = answer_target(sample)
        ll, logits, n = teacher_forced_answer(model, tokenizer, sample, method, spec.placement, target)
        fields.update(answer_loglik=ll, answer_tokens=n, loglik_target=target)
        if reference is not None and method is not None:
            fields["fidelity"] = metrics.logit_fidelity(reference, logits)
    return fields, logits


# --------------------------------------------------------------------------------------------------
# the grid


def run_grid(model, tokenizer, grid: Grid, out: str | Path, *, progress: bool = True,
             command: str | None = None) -> dict:
    """Run every (sample, method) of ``grid`` whose row is not yet in the results file.

    ``out`` is a directory (results go to ``out/<grid name>.jsonl``) or a ``.jsonl`` path. Returns
    ``{"path", "total", "skipped", "ran", "errors"}``. Runs are in sample order, dense first.
    """
    from tqdm.auto import tqdm

    path = results_path(out, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(path)
    minfo = model_id(model)
    env = environment(model, command)
    run_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    configs = [spec.full_config() for spec in grid.methods]

    plan, total = _plan(grid, minfo, configs, done)
    n_todo = sum(len(t) for _, t in plan)
    print(f"{grid.name}: {total} runs, {total - n_todo} already in {path}, {n_todo} to run "
          f"({torch.get_num_threads()} torch threads)", file=sys.stderr)

    ran = errors = 0
    bar = tqdm(total=n_todo, desc=grid.name, unit="run", disable=not progress)
    for sspec, todo in plan:
        try:
            sample = sspec.make(tokenizer)
        except Exception as e:  # a length too short for the task, ...: every run of it fails the same way
            sample, sample_error = None, f"{type(e).__name__}: {e}"
        reference, ref_tried = None, False  # dense teacher-forced logits of this sample
        for spec, config, key in todo:
            bar.set_postfix_str(f"{sspec.task} L={sspec.length} d={sspec.depth} {spec.label} [{spec.placement}]")
            row = _base_row(key, grid, run_id, minfo, sspec, spec, config, env)
            try:
                if sample is None:
                    raise RuntimeError(f"could not generate the sample: {sample_error}")
                if spec.name != DENSE and not ref_tried and grid.answer_loglik:
                    ref_tried, reference = True, _dense_reference(model, tokenizer, sample, grid)
                fields, logits = run_one(model, tokenizer, sample, spec, grid, reference)
                if spec.name == DENSE and not ref_tried:
                    ref_tried, reference = True, logits
                row.update(fields)
                ran += 1
            except KeyboardInterrupt:
                raise
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc(limit=4)
                errors += 1
                print(f"\nerror in {spec.label} [{spec.placement}] on {sspec.task} L={sspec.length}: {row['error']}",
                      file=sys.stderr)
            _append(path, row)
            bar.update(1)
    bar.close()
    return {"path": str(path), "total": total, "skipped": total - n_todo, "ran": ran, "errors": errors}


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


def _dense_reference(model, tokenizer, sample, grid: Grid) -> torch.Tensor | None:
    """Dense teacher-forced logits when this run has no dense row of the sample (it was done in an
    earlier run, or failed); ``None`` (no fidelity numbers) if the prompt is too long or it fails."""
    ctx, q = encode_sample(tokenizer, sample)
    if grid.loglik_max_length is not None and ctx.shape[1] + q.shape[1] > grid.loglik_max_length:
        return None
    try:
        return teacher_forced_answer(model, tokenizer, sample, None, "inside")[1]
    except Exception as e:
        print(f"\nwarning: no dense reference logits for {sample.sample_id}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
