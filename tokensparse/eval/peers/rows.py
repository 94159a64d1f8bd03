"""Glue between the evaluation runner and a peer library's worker (``docs/peers.md``).

* :func:`worker_sample` turns a tokensparse :class:`~tokensparse.eval.tasks.Sample` into the
  worker's pre-tokenised input with the ids of :func:`tokensparse.eval.harness.encode_sample`
  (context ids, then question + answer prefix ids), so the peer sees exactly the prompt
  tokensparse's methods see, plus the ids of the gold answer for the log-likelihood pass and the
  needle token positions inside the context;
* :func:`convert_row` turns one worker result row into a row of the runner's schema (scored with
  the runner's scorer for the task), keeping the peer-only measurements under ``"peer"``.

Nothing here imports the peer library: this module runs in the main environment.
"""

from __future__ import annotations

import hashlib
import json

from .. import metrics
from ..harness import encode_sample

__all__ = ["worker_sample", "needle_positions", "convert_row", "worker_versions"]


def needle_positions(tokenizer, sample, context_ids: list[int]) -> list[int] | None:
    """Indices into ``context_ids`` of the tokens that overlap a gold needle (``None`` if the task has
    no needle or the tokenizer gives no character offsets).

    The context is tokenised exactly as :func:`encode_sample` does it; if the ids differ from
    ``context_ids`` (they should not) nothing is returned rather than wrong positions.
    """
    spans = (sample.metadata or {}).get("needle_spans")
    if not spans:
        return None
    try:
        enc = tokenizer(sample.context, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (TypeError, KeyError, NotImplementedError, ValueError):
        return None
    if list(enc["input_ids"]) != list(context_ids):
        return None
    out = [i for i, (s, e) in enumerate(offsets)
           if e > s and any(s < span_end and e > span_start for span_start, span_end in spans)]
    return out or None


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def worker_sample(tokenizer, sample, sspec, minfo: dict, *, max_new_tokens: int,
                  answer_target: str | None, loglik_max_length: int | None = None) -> dict:
    """The worker's input row for ``sample`` (identical token ids to the runner's own runs).

    ``sample_id`` is the task's id followed by a digest of the model, the token ids, the answer ids
    and ``max_new_tokens``: two grid tasks with the same name but other options never collide, and a
    worker output row left from another model or prompt can never be taken for this one on resume.
    ``answer_target`` (the runner's teacher-forced text, or ``None`` to skip that pass) becomes
    ``answer_ids``, unless the prompt is longer than ``loglik_max_length`` (as in the runner).
    """
    ctx, q = encode_sample(tokenizer, sample)
    context_ids = [int(t) for t in ctx[0].tolist()]
    question_ids = [int(t) for t in q[0].tolist()]
    answer_ids = None
    too_long = loglik_max_length is not None and len(context_ids) + len(question_ids) > loglik_max_length
    if answer_target is not None and not too_long:
        answer_ids = [int(t) for t in tokenizer(answer_target, add_special_tokens=False).input_ids] or None
    digest = _digest([minfo.get("fingerprint"), minfo.get("dtype"), sspec.task, sspec.options, context_ids,
                      question_ids, answer_ids, int(max_new_tokens)])
    row = {
        "sample_id": f"{sample.sample_id}#{digest}",
        "context_ids": context_ids,
        "question_ids": question_ids,
        "answers": list(sample.answers),
        "max_new_tokens": int(max_new_tokens),
        "task": sspec.task,
        "length": sspec.length,
        "depth": sspec.depth,
        "seed": sspec.seed,
    }
    if answer_ids:
        row["answer_ids"] = answer_ids
    needle = needle_positions(tokenizer, sample, context_ids)
    if needle:
        row["needle_positions"] = needle
    return row


def worker_versions(wrow: dict, main_env: dict) -> dict:
    """The peer env's versions (python, torch, transformers, the peer library) and the main env's
    tokensparse version (it built the prompts and scored the answers)."""
    wenv = wrow.get("env") or {}
    versions = {k: wenv.get(k) for k in ("python", "torch", "transformers")}
    versions[wrow.get("peer") or "peer"] = wenv.get(wrow.get("peer") or "peer") or wrow.get("peer_version")
    versions["tokensparse"] = (main_env.get("versions") or {}).get("tokensparse")
    return versions


PEER_FIELDS = ("press", "press_spec", "compression_ratio", "placement", "peer_version", "prefill_s", "compress_s",
               "question_s", "ttft_s", "prefill_tokens", "context_tokens", "question_tokens", "decode_steps",
               "kv_kept_per_layer", "kv_bytes", "kv_bytes_end", "needle_kept_per_layer", "needle_kept_mean",
               "needle_kept_min", "generated_ids", "sample_id")


def convert_row(wrow: dict, base: dict, sample, input_row: dict, loglik_target: str | None = None) -> dict:
    """A runner row from one worker row.

    ``base`` is the runner's identifying part (key, suite, run id, model, method, label, config,
    placement, task fields, env); ``input_row`` is what :func:`worker_sample` sent and
    ``loglik_target`` the text its ``answer_ids`` encode. Timings follow
    the harness's definitions: ``prefill_s`` is the time to the first answer logits (the worker's
    ``ttft_s``: compressed prefill plus the question tail), ``kv_bytes`` the K/V held at the end of
    generation. A worker row with ``error`` gives a failed runner row (retried on the next run).
    """
    row = dict(base)
    env = dict(base.get("env") or {})
    wenv = wrow.get("env") or {}
    env["versions"] = worker_versions(wrow, env)
    if wenv.get("threads") is not None:
        env["torch_threads"] = wenv["threads"]
    env["peer"] = wenv
    row["env"] = env
    if wrow.get("loadavg_1m") is not None:
        row["loadavg"] = [wrow["loadavg_1m"]]
    peer = {k: wrow.get(k) for k in PEER_FIELDS if k in wrow}
    peer["name"] = wrow.get("peer")
    peer["worker_sample_id"] = peer.pop("sample_id", None)
    row["peer"] = peer
    if wrow.get("error"):
        row["error"] = f"{wrow.get('peer', 'peer')} worker: {wrow['error']}"
        return row
    metric = sample.metadata.get("metric", "all")
    score = metrics.score(wrow["prediction"], sample.answers, metric)
    depths = sample.metadata.get("needle_depths")
    answer_ids = input_row.get("answer_ids")
    generated = wrow.get("generated_ids") or []
    row.update({
        "sample_id": sample.sample_id, "needle_depth": depths[0] if depths else None,
        "prompt_tokens": len(input_row["context_ids"]) + len(input_row["question_ids"]),
        "answers": list(sample.answers), "prediction": wrow["prediction"],
        "metric": metric, "score": score, "correct": score == 1.0, "new_tokens": len(generated),
        "prefill_s": wrow.get("ttft_s", wrow.get("prefill_s")),
        "decode_ms_per_token": wrow.get("decode_ms_per_token"),
        "kv_bytes": wrow.get("kv_bytes_end", wrow.get("kv_bytes")),
        "attention_prefill_s": None, "attention_decode_ms_per_token": None, "memory": wrow.get("memory"),
        "stats": {}, "telemetry": None,
        "answer_loglik": wrow.get("answer_loglik") if answer_ids else None,
        "answer_tokens": len(answer_ids) if answer_ids and wrow.get("answer_loglik") is not None else None,
        "loglik_target": loglik_target if answer_ids else None,
        "fidelity": None,
    })
    return row
