"""Run NVIDIA kvpress on tokensparse's tasks, in its own virtualenv, with identical token ids.

kvpress 0.5.5 pins ``transformers>=4.56,<5.3`` and breaks on the project's transformers 5.24, so it
lives in ``.venv-kvpress`` (``make kvpress-env``). This module runs in the main environment: it writes
the pre-tokenised samples to a JSONL file, launches ``kvpress_worker.py`` under the kvpress
interpreter, streams its progress and parses the result rows. Protocol and row schema:
``docs/peers.md``.

Example::

    from tokensparse.eval.peers.kvpress import run_kvpress
    rows = run_kvpress(samples, [("dense", 0.0), ("snapkv", 0.5)], "after", "out/kvpress.jsonl")
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable

DEFAULT_PYTHON = ".venv-kvpress/bin/python"
WORKER = Path(__file__).with_name("kvpress_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
PLACEMENTS = ("after", "inside")
DENSE_NAMES = ("dense", "none", "no_press")
# The short press names ``kvpress_worker.py`` maps to kvpress classes (its ``_press_factories``; a
# test keeps the two lists equal). Listed here so that grids are validated without the kvpress env.
PRESSES = (
    "snapkv", "streaming_llm", "expected_attention", "tova", "knorm", "random", "keydiff", "lagkv",
    "leverage", "non_causal_attn", "compactor", "cur", "cap", "observed_attention", "critical_snapkv",
    "chunkkv_snapkv", "adakv_snapkv", "adakv_expected_attention",
)
REQUIRED_FIELDS = ("sample_id", "context_ids", "question_ids", "answers", "max_new_tokens")
OPTIONAL_FIELDS = ("answer_ids", "task", "length", "depth", "seed", "needle_positions")

_FIX = (
    "Create it with `make kvpress-env` from the repository root: it builds .venv-kvpress with "
    "torch==2.13.0 (the local CPU wheel) and kvpress==0.5.5, which pins transformers<5.3 and so "
    "cannot share the main environment (transformers 5.24)."
)


class KvpressEnvMissing(RuntimeError):
    """The separate kvpress virtualenv is missing or has no kvpress; the message names the fix."""


class KvpressWorkerError(RuntimeError):
    """The kvpress worker process exited with an error; the message holds the end of its stderr."""


def _resolve_python(python: str | os.PathLike | None) -> Path:
    """The kvpress interpreter: absolute, else relative to the cwd, else to the repository root."""
    python = python or os.environ.get("TOKENSPARSE_KVPRESS_PYTHON") or DEFAULT_PYTHON
    path = Path(python).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), REPO_ROOT):
        if (base / path).exists():
            return base / path
    return REPO_ROOT / path


def kvpress_available(python: str | os.PathLike | None = None) -> bool:
    """True when the kvpress interpreter exists and can find the ``kvpress`` package (no import)."""
    exe = _resolve_python(python)
    if not exe.exists():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kvpress') is None)"
    try:
        return subprocess.run([str(exe), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_model_dir() -> Path:
    """The plain safetensors copy of the bundled SmolLM2 that tokensparse caches (written if absent)."""
    from tokensparse import models

    gguf = models.bundled_gguf_path()
    target = models._converted_dir(gguf)
    if not (target / "tokensparse-source.json").is_file():
        models._convert_gguf(gguf, target)
    return target


def task_row(sample: dict) -> dict:
    """Validate one sample and normalise it to the worker's input schema (plain ints and lists)."""
    missing = [k for k in REQUIRED_FIELDS if k not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('sample_id')!r} lacks {missing}; each sample needs {REQUIRED_FIELDS}")
    row = {
        "sample_id": sample["sample_id"],
        "context_ids": [int(t) for t in sample["context_ids"]],
        "question_ids": [int(t) for t in sample["question_ids"]],
        "answers": [str(a) for a in sample["answers"]],
        "max_new_tokens": int(sample["max_new_tokens"]),
    }
    if not row["context_ids"] or not row["question_ids"]:
        raise ValueError(f"sample {row['sample_id']!r}: context_ids and question_ids must be non-empty")
    for key in OPTIONAL_FIELDS:
        if sample.get(key) is not None:
            value = sample[key]
            if key in ("answer_ids", "needle_positions"):
                value = [int(t) for t in value]
            row[key] = value
    needle = row.get("needle_positions") or []
    if any(not 0 <= p < len(row["context_ids"]) for p in needle):
        raise ValueError(f"sample {row['sample_id']!r}: needle_positions must index into context_ids")
    return row


def write_tasks(samples: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write the worker's input JSONL (one validated sample per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [task_row(s) for s in samples]
    ids = [str(r["sample_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("sample_id values must be unique")
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def format_presses(presses: Iterable[tuple[str, float]]) -> str:
    """``[("dense", 0), ("snapkv", 0.5)]`` -> ``"dense,snapkv:0.5"`` (the worker's ``--presses``)."""
    parts = []
    for name, ratio in presses:
        if str(name).lower() in DENSE_NAMES:
            parts.append("dense")
        else:
            parts.append(f"{name}:{float(ratio):g}")
    return ",".join(parts)


def _key(sample_id, spec: str, ratio: float, placement: str) -> tuple:
    if spec.lower() in DENSE_NAMES:
        spec, ratio = "dense", 0.0
    return (str(sample_id), spec.lower(), round(float(ratio), 6), placement)


def read_results(path: str | os.PathLike) -> list[dict]:
    """All rows of a worker output file; a truncated last line (interrupted run) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_kvpress(
    samples_jsonl_rows: list[dict],
    presses: list[tuple[str, float]],
    placement: str,
    out_path: str | os.PathLike,
    threads: int = 1,
    python: str | os.PathLike = DEFAULT_PYTHON,
    *,
    model_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    echo: bool = True,
) -> list[dict]:
    """Run kvpress presses on pre-tokenised samples in the kvpress env; return the result rows.

    Parameters
    ----------
    samples_jsonl_rows:
        Samples with ``sample_id``, ``context_ids``, ``question_ids`` (question + answer prefix),
        ``answers``, ``max_new_tokens`` and optionally ``answer_ids`` (for ``answer_loglik``),
        ``needle_positions`` (token indices inside the context) and pass-through fields
        (``task``, ``length``, ``depth``, ``seed``).
    presses:
        ``(name, compression_ratio)`` pairs, e.g. ``[("dense", 0), ("snapkv", 0.5)]``; names as in
        the worker (``snapkv``, ``streaming_llm``, ``expected_attention``, ``tova``, ``knorm``, ...).
    placement:
        ``"after"`` (question fed after compression, kvpress's default) or ``"inside"`` (query-aware:
        question inside the compressed prefill).
    out_path:
        Result JSONL. Appended to and resumable: pairs already there are not run again. The tasks
        file is written next to it as ``<out>.tasks.jsonl``.
    threads:
        ``torch.set_num_threads`` in the worker.
    python:
        Interpreter of the kvpress env (default ``.venv-kvpress/bin/python``, resolved against the
        cwd, then the repository root; ``$TOKENSPARSE_KVPRESS_PYTHON`` overrides the default).
    model_dir:
        Plain HF model directory; default: tokensparse's cached safetensors copy of the bundled model.
    timeout:
        Seconds before the worker is killed (``None``: no limit).
    echo:
        Forward the worker's stderr progress lines to ``sys.stderr`` as they arrive.

    Returns one row per (sample, press) in input order (the last row when a pair appears twice).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    presses = list(presses)
    if not presses:
        raise ValueError("presses is empty")
    exe = _resolve_python(python)
    if not exe.exists():
        raise KvpressEnvMissing(f"kvpress environment not found: {exe} does not exist. {_FIX}")
    if not kvpress_available(exe):
        raise KvpressEnvMissing(f"{exe} cannot import kvpress. {_FIX}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tasks_path = out_path.with_name(out_path.stem + ".tasks.jsonl")
    write_tasks(samples_jsonl_rows, tasks_path)
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()

    cmd = [
        # -I: isolated mode (no script folder on sys.path, no user site, PYTHON* variables ignored)
        str(exe), "-I", str(WORKER),
        "--model-dir", str(model_dir),
        "--tasks", str(tasks_path),
        "--out", str(out_path),
        "--presses", format_presses(presses),
        "--placement", placement,
        "--threads", str(int(threads)),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # no "Loading weights" bars in the streamed log (the worker prints its own progress lines)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS=str(int(threads)),
               PYTHONUNBUFFERED="1")

    # Popen rather than subprocess.run, so progress is streamed live and the tail kept for errors.
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    timed_out = threading.Event()

    def _kill_on_timeout():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, _kill_on_timeout) if timeout is not None else None
    if timer is not None:
        timer.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()
        returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out.is_set():
        raise KvpressWorkerError(f"kvpress worker killed after the {timeout}s timeout\n" + "\n".join(tail))
    if returncode != 0:
        raise KvpressWorkerError(
            f"kvpress worker exited with status {returncode}: {' '.join(cmd)}\n" + "\n".join(tail)
        )

    wanted = [
        _key(s["sample_id"], name, ratio, placement) for s in samples_jsonl_rows for name, ratio in presses
    ]
    latest = {}
    for row in read_results(out_path):
        spec = str(row.get("press_spec", row.get("press", "")))
        latest[_key(row["sample_id"], spec, row.get("compression_ratio", 0.0), row.get("placement"))] = row
    missing = [k for k in wanted if k not in latest]
    if missing:
        raise KvpressWorkerError(
            f"kvpress worker finished but {len(missing)} result rows are missing from {out_path}, "
            f"e.g. {missing[:3]}\n" + "\n".join(tail)
        )
    return [latest[k] for k in dict.fromkeys(wanted)]
