"""Run one sample with one method through the public API and measure it.

Used by ``tokensparse demo`` and the benchmark scripts, so every method is measured the same way:

* the prompt is ``context`` followed by ``question + answer_prefix``, tokenised as two parts and
  concatenated (identical ids for every method and placement);
* ``placement="inside"``: the whole prompt is one prefill (a method may compress the question too);
  ``placement="after"``: the context is prefilled first, then the question is fed as a second chunk
  on the (possibly compressed) cache, so the compression cannot see the question;
* greedy decoding with a manual loop so prefill and per-token decode time are measured apart;
  exactly ``max_new_tokens`` steps are run (no early stop), so decode timings are comparable;
* dense runs use the engine's preallocated :class:`tokensparse.KVCache` unless ``cache="dynamic"``;
* ``teacher_ids`` (the gold answer's token ids) also scores the answer on the decode path
  (:func:`tokensparse.eval.scoring.teacher_force`) from a copy of the cache and of the method's
  per-layer state taken right after the timed prefill, so generation and scoring share one
  prefill (the copy is made outside the timed regions);
* ``keep_prefill=True`` (dense runs, ``placement="inside"``) also returns the dense prefill
  (:class:`Prefilled`: a copy of its cache, its last logits and its times); ``start=`` that
  prefill runs a method that leaves the prefill dense (``Method.dense_prefill``) from a copy of
  it instead of prefilling again: the evaluation runner's ``share_prefill``. Its ``prefill_s`` is
  then the dense prefill's (``prefill_shared`` says so); decode is timed per run as always;
* ``measure=True`` also records the time spent inside attention (:func:`tokensparse.time_attention`,
  prefill seconds and decode ms/token, same split as the end-to-end times) and the process's peak
  resident memory over the run (:class:`tokensparse.eval.env.PeakMemory`).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

import tokensparse as ts

PLACEMENTS = ("inside", "after")


@dataclass
class RunResult:
    prediction: str
    correct: bool
    prefill_s: float
    decode_ms_per_token: float
    kv_bytes: int
    prompt_tokens: int
    new_tokens: int
    #: bytes of the cache's K/V buffers (capacity included; ``None`` for a stock cache)
    kv_bytes_allocated: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, float] | None = None
    #: for an evicting cache: per layer, per KV head, the absolute token positions still held after
    #: generation (first sequence of the batch); ``None`` when the cache keeps every token
    kept_positions: list[list[torch.Tensor]] | None = None
    #: with ``measure=True``: seconds inside attention during prefill, ms per decode step inside
    #: attention, and the peak memory of the run (:meth:`PeakMemory.stop`)
    attention_prefill_s: float | None = None
    attention_decode_ms_per_token: float | None = None
    memory: dict[str, Any] | None = None
    #: with ``teacher_ids``: the decode-path score of the gold answer (a ``scoring.AnswerScore``)
    teacher: Any = None
    #: with ``keep_prefill``: the dense prefill, for other runs to start from
    prefilled: Prefilled | None = None
    #: the run started from a shared dense prefill (``start``); ``prefill_s`` is that prefill's
    prefill_shared: bool = False


@dataclass
class Prefilled:
    """A dense one-shot prefill (``placement="inside"``) kept for other runs of the same prompt:
    ``cache`` right after it (never decoded on: every run continues from a copy), ``logits`` (1, V)
    its last position's logits, ``ids`` (1, L) the prompt it ran, and its times."""

    cache: Any
    logits: torch.Tensor
    ids: torch.Tensor
    prefill_s: float
    attention_prefill_s: float | None = None

    def check(self, ids: torch.Tensor, method) -> None:
        """Refuse to start a run of prompt ``ids`` under ``method`` from this prefill unless it is
        what that run's own prefill would have computed."""
        if method is not None and not getattr(method, "dense_prefill", False):
            raise ValueError(f"{method.name} does not leave the prefill dense (Method.dense_prefill is False): "
                             "it cannot start from a shared dense prefill")
        if ids.shape != self.ids.shape or not torch.equal(ids, self.ids):
            raise ValueError(f"the shared prefill ran another prompt ({self.ids.shape[1]} tokens, "
                             f"this run has {ids.shape[1]})")


def kept_positions(cache) -> list[list[torch.Tensor]] | None:
    """Absolute positions each layer and KV head of an evicting cache still holds (``-1`` dropped)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "slots") for layer in layers):
        return None
    out = []
    for layer in layers:
        slots = layer.slots[0] if layer.is_initialized else torch.empty(0, 0, dtype=torch.long)
        out.append([row[row >= 0].clone() for row in slots])
    return out


def encode_sample(tokenizer, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids, question_ids)`` as ``(1, n)`` long tensors (question includes the answer prefix)."""
    ctx = tokenizer(sample.context, add_special_tokens=True).input_ids
    q = tokenizer(sample.question + sample.answer_prefix, add_special_tokens=False).input_ids
    return torch.tensor([ctx]), torch.tensor([q])


def encode_for(model, tokenizer, sample, method=None):
    """``(context_ids, question_ids, method for the model, PromptStep | None)``: the sample encoded as
    the harness feeds it under ``method``. A prompt-step method (``Phase.PROMPT``) shortens the
    context here (:func:`tokensparse.engine.prompt.apply_prompt_step`) and the model then runs
    dense (the returned method is ``None``); any other method is returned unchanged."""
    from tokensparse.engine.prompt import apply_prompt_step, is_prompt_method

    ctx, q = encode_sample(tokenizer, sample)
    if not is_prompt_method(method):
        return ctx, q, method, None
    ctx, step = apply_prompt_step(model, method, ctx)
    return ctx, q, None, step


def _new_cache(model, session, cache: str):
    if session is not None:
        return session.new_cache()
    if cache == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if cache != "prealloc":
        raise ValueError(f"cache must be 'prealloc' or 'dynamic', got {cache!r}")
    return ts.KVCache(model)


def prefill(model, context_ids, question_ids, cache, placement: str = "inside"):
    """Feed the prompt into ``cache`` as ``placement`` says; returns the output with the last logits.

    ``"inside"``: one forward over context + question; ``"after"``: the context, then the question
    as a second chunk on the (possibly compressed) cache.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    dev = next(model.parameters()).device
    if placement == "inside":
        ids = torch.cat([context_ids, question_ids], dim=1).to(dev)
        return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    model(input_ids=context_ids.to(dev), cache=cache, use_cache=True, logits_to_keep=1)
    return model(input_ids=question_ids.to(dev), cache=cache, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def greedy(model, context_ids, question_ids, *, session=None, placement: str = "inside",
           max_new_tokens: int = 8, cache: str = "prealloc", timer=None, after_prefill=None,
           start: Prefilled | None = None):
    """Greedy decode; returns ``(new_token_ids, prefill_s, decode_s_list, cache)``.

    With ``timer`` (an :class:`tokensparse.engine.AttentionTimer` active on ``model``), its laps
    ``"prefill"`` and ``"decode"`` hold the attention time of the two timed regions.
    ``after_prefill(cache, last_logits)`` is called between the two timed regions.
    ``start``: continue from a copy of this dense prefill's cache instead of prefilling (the caller
    checks it is valid: :meth:`Prefilled.check`); ``prefill_s`` is then its time and no
    ``"prefill"`` lap is taken.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if start is None:
        kv = _new_cache(model, session, cache)
        if timer is not None:
            timer.reset()
        t0 = time.perf_counter()
        last = prefill(model, context_ids, question_ids, kv, placement).logits[:, -1]
        prefill_s = time.perf_counter() - t0
        if timer is not None:
            timer.lap("prefill")
    else:
        if placement != "inside":
            raise ValueError(f"a shared prefill is one forward over the whole prompt (placement 'inside'), got {placement!r}")
        kv, last, prefill_s = start.cache.clone(), start.logits, start.prefill_s
    if after_prefill is not None:
        after_prefill(kv, last)
    if timer is not None:
        timer.reset()
    tok = last.argmax(-1, keepdim=True)
    out = [int(tok)]
    steps = []
    for _ in range(max_new_tokens - 1):
        t = time.perf_counter()
        logits = model(input_ids=tok, cache=kv, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t)
        out.append(int(tok))
    if timer is not None:
        timer.lap("decode")
    return out, prefill_s, steps, kv


def run_sample(model, tokenizer, sample, method=None, *, placement: str = "inside",
               max_new_tokens: int | None = None, telemetry: bool = False, cache: str = "prealloc",
               measure: bool = False, teacher_ids: torch.Tensor | None = None, keep_prefill: bool = False,
               start: Prefilled | None = None) -> RunResult:
    """Run ``sample`` densely (``method=None``) or with a method config; score by exact match of
    every gold answer in the generated text. ``telemetry`` fills ``telemetry`` with
    :meth:`tokensparse.Telemetry.report` (overall and per layer); ``measure`` adds attention-only
    times and the peak memory of the run; ``teacher_ids`` ``(1, A)`` fills ``teacher`` with the
    decode-path score of those tokens from the same prefill (not with ``telemetry``, whose report
    would then mix both passes). ``keep_prefill`` (dense, ``placement="inside"``) fills ``prefilled``;
    ``start`` runs from a copy of such a prefill (a method with ``dense_prefill``, no prompt step)."""
    from .env import PeakMemory
    from .scoring import teacher_force

    if teacher_ids is not None and telemetry:
        raise ValueError("teacher_ids and telemetry cannot be combined: the telemetry would count both passes")
    ctx, q, method, step = encode_for(model, tokenizer, sample, method)
    if keep_prefill and (method is not None or step is not None or placement != "inside" or cache != "prealloc"):
        raise ValueError("keep_prefill keeps a dense one-shot prefill: no method, placement 'inside', cache 'prealloc'")
    if start is not None:
        if step is not None or telemetry or cache != "prealloc":
            raise ValueError("a run from a shared prefill takes no prompt step, telemetry or stock cache")
        start.check(torch.cat([ctx, q], dim=1), method)
    n_new = max_new_tokens or sample.max_new_tokens
    mem = PeakMemory(next(model.parameters()).device).start() if measure else None
    ctxmgr = ts.sparsify(model, method, telemetry=telemetry) if method is not None else nullcontext()
    with ctxmgr as session:
        if session is not None:  # the context, after a leading BOS, is the span span methods (FastV) act on
            bos = getattr(tokenizer, "bos_token_id", None)
            session.mark_span(int(bos is not None and int(ctx[0, 0]) == bos), ctx.shape[1])
        snap: dict[str, Any] = {}

        def keep(kv, last_logits):
            if teacher_ids is not None:
                snap["cache"] = kv.clone() if hasattr(kv, "clone") else copy.deepcopy(kv)
                snap["logits"] = last_logits[0].detach().clone()
                snap["scratch"] = [copy.deepcopy(layer.scratch) for layer in session.layers] if session else None
            if keep_prefill:
                snap["prefilled"] = Prefilled(kv.clone(), last_logits.detach().clone(), torch.cat([ctx, q], dim=1),
                                              float("nan"))

        with ts.time_attention(model) if measure else nullcontext() as timer:
            ids, prefill_s, steps, kv = greedy(
                model, ctx, q, session=session, placement=placement, max_new_tokens=n_new, cache=cache, timer=timer,
                after_prefill=keep if (teacher_ids is not None or keep_prefill) else None, start=start,
            )
        stats = dict(session.stats) if session is not None else {}
        if step is not None:
            stats.update(step.as_stats())
        if session is not None and session.info:
            stats.update({f"info.{k}": v for k, v in session.info.items()})
        tele = session.telemetry.report() if (session is not None and session.telemetry) else None
        teacher = None
        if teacher_ids is not None:
            if session is not None:  # the method's per-layer state as it was right after the prefill
                for layer, saved in zip(session.layers, snap["scratch"]):
                    layer.scratch.clear()
                    layer.scratch.update(saved)
            teacher = teacher_force(model, snap["cache"], snap["logits"], teacher_ids)
    attn_prefill = attn_decode = None
    if timer is not None:
        attn_prefill = timer.laps["prefill"][0] if start is None else start.attention_prefill_s
        attn_decode = 1000 * timer.laps["decode"][0] / len(steps) if steps else float("nan")
    text = tokenizer.decode(ids, skip_special_tokens=True)
    correct = all(a in text for a in sample.answers)
    return RunResult(
        prediction=text,
        correct=correct,
        prefill_s=prefill_s,
        decode_ms_per_token=1000 * (sum(steps) / len(steps)) if steps else float("nan"),
        kv_bytes=ts.cache_bytes(kv),
        kv_bytes_allocated=kv.bytes_allocated() if hasattr(kv, "bytes_allocated") else None,
        prompt_tokens=int(ctx.shape[1] + q.shape[1]),
        new_tokens=len(ids),
        stats=stats,
        telemetry=tele,
        kept_positions=kept_positions(kv),
        attention_prefill_s=attn_prefill,
        attention_decode_ms_per_token=attn_decode,
        memory=mem.stop() if mem is not None else None,
        teacher=teacher,
        prefilled=_timed(snap.get("prefilled"), prefill_s, attn_prefill),
        prefill_shared=start is not None,
    )


def _timed(p: Prefilled | None, prefill_s: float, attention_prefill_s: float | None) -> Prefilled | None:
    if p is not None:
        p.prefill_s, p.attention_prefill_s = prefill_s, attention_prefill_s
    return p
