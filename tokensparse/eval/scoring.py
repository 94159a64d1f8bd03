"""Decode-path scoring: the log-likelihood of a gold answer as a method really produces it.

A decode-time method (TokenSelect, Quest, ...) acts only on single-token decode steps, and an
eviction method (SnapKV, StreamingLLM, ...) shrinks the cache only after a prefill: scoring
``prompt + answer`` in one forward pass (:func:`tokensparse.eval.metrics.prefill_answer_loglik`)
gives dense attention's number for both. :func:`answer_loglik` scores the way generation runs:

1. the prompt is prefilled under the method, with the placement rules of the harness
   (``"inside"``: context + question in one prefill; ``"after"``: the context, then the question
   as a second chunk on the possibly compressed cache), in the cache the method's session provides;
2. the gold answer is fed one token per step through that cache with the method active, so every
   answer token is predicted from exactly the keys the method would have let a generated token see.

For dense attention (``method=None`` and no active session) this equals the one-forward number up to
floating-point summation order (tested). :func:`score_sample` does the same for a task sample.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

import tokensparse as ts

from .harness import PLACEMENTS, encode_for, prefill
from .metrics import _as_2d as _ids

__all__ = ["AnswerScore", "answer_loglik", "score_sample", "teacher_force", "answer_target"]


@dataclass
class AnswerScore:
    """A decode-path score: ``loglik`` (nats, the sum of ``token_logprobs``), the logits ``(A, V)``
    that predicted each answer token (fp32, on the CPU) and the number of answer tokens ``A``."""

    loglik: float
    token_logprobs: torch.Tensor
    logits: torch.Tensor
    tokens: int


def answer_target(sample) -> str:
    """The text whose likelihood is scored for a task sample: its gold answers after a space,
    comma-separated (the way the prompts' answer prefixes lead into them)."""
    return " " + ", ".join(sample.answers)


@torch.no_grad()
def teacher_force(model, cache, first_logits: torch.Tensor, answer_ids: torch.Tensor,
                  before_step=None) -> AnswerScore:
    """Continue a prefilled ``cache``: ``first_logits`` (V,) predicted the first answer token; each
    answer token but the last is then fed as one decode step. Runs under whatever attention the
    model has now (call it inside the same ``ts.sparsify`` block as the prefill).
    ``before_step(t)`` is called before decode step ``t`` (1-based; step ``t`` predicts answer token
    ``t + 1``), e.g. to tag what a tracer records."""
    answer_ids = _ids(answer_ids, "answer_ids")
    if answer_ids.shape[1] == 0:
        raise ValueError("the answer has no tokens")
    dev = next(model.parameters()).device
    rows = [first_logits.float()]
    for t, tok in enumerate(answer_ids[0, :-1], start=1):
        if before_step is not None:
            before_step(t)
        out = model(input_ids=tok.view(1, 1).to(dev), cache=cache, use_cache=True)
        rows.append(out.logits[0, -1].float())
    logits = torch.stack(rows)  # (A, V)
    logp = torch.log_softmax(logits, -1).gather(-1, answer_ids[0, :, None].to(logits.device))[:, 0]
    return AnswerScore(float(logp.sum()), logp.cpu(), logits.cpu(), int(answer_ids.shape[1]))


def _active_session(model):
    from ..engine.integration import active_session

    return active_session(model)


@torch.no_grad()
def answer_loglik(model, prompt_ids, answer_ids, *, method=None, question_ids=None, placement: str = "inside",
                  telemetry: "ts.Telemetry | None" = None) -> AnswerScore:
    """Decode-path log-likelihood of ``answer_ids`` after ``prompt_ids`` (each ``(1, N)`` or ``(N,)``).

    ``method``: a method config to run under (``ts.sparsify`` is entered here), or ``None``: the
    model's current attention (dense, or the session of an enclosing ``ts.sparsify`` block, whose
    ``new_cache()`` is then used). ``question_ids``: the part of the prompt that follows the
    compressible context; with ``placement="after"`` it is fed as a second chunk after the
    context (required then), with ``"inside"`` it is simply appended to ``prompt_ids``.
    ``telemetry``: a :class:`tokensparse.Telemetry` recording the method's calls (needs ``method``).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    ctx = _ids(prompt_ids, "prompt_ids")
    ans = _ids(answer_ids, "answer_ids")
    if ctx.shape[1] == 0 or ans.shape[1] == 0:
        raise ValueError("prompt and answer must each have at least one token")
    if question_ids is None:
        if placement == "after":
            raise ValueError("placement='after' needs question_ids (the part fed after the compressed context)")
        q = ctx.new_zeros((1, 0))
    else:
        q = _ids(question_ids, "question_ids")
    if telemetry is not None and method is None:
        raise ValueError("telemetry needs a method (it records the method's attention calls)")
    if method is not None:
        ctxmgr = ts.sparsify(model, method, telemetry=telemetry or False)
    else:
        ctxmgr = nullcontext(_active_session(model))
    with ctxmgr as session:
        kv = session.new_cache() if session is not None else ts.KVCache(model)
        if q.shape[1] == 0:
            dev = next(model.parameters()).device
            out = model(input_ids=ctx.to(dev), cache=kv, use_cache=True, logits_to_keep=1)
        else:
            out = prefill(model, ctx, q, kv, placement)
        return teacher_force(model, kv, out.logits[0, -1], ans)


def score_sample(model, tokenizer, sample, method=None, placement: str = "inside", target: str | None = None,
                 telemetry: "ts.Telemetry | None" = None) -> AnswerScore:
    """:func:`answer_loglik` of a task sample's gold answer (:func:`answer_target`, or ``target``),
    with the sample's context and question encoded as the harness feeds them (a prompt-step method
    shortens the context first, then the model runs dense)."""
    ctx, q, method, _ = encode_for(model, tokenizer, sample, method)
    target = answer_target(sample) if target is None else target
    ans = torch.tensor([tokenizer(target, add_special_tokens=False).input_ids])
    if ans.shape[1] == 0:
        raise ValueError(f"the answer target {target!r} has no tokens")
    return answer_loglik(model, ctx, ans, method=method, question_ids=q, placement=placement, telemetry=telemetry)
