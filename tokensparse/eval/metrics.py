"""Metrics of the evaluation harness: answer matching, likelihoods, perplexity, logit fidelity,
needle retention and memory. Pure functions; the model-facing ones only call ``model(...)``.

The model-facing functions (:func:`prefill_answer_loglik`, :func:`perplexity`) run one plain
forward call under ``torch.no_grad()``, so they measure whatever attention the model currently has
*in a prefill*: wrap the call in ``with ts.sparsify(model, method):`` to score a prefill-time method,
and pass ``cache=`` (forwarded to ``model(...)``) when the method needs its own cache object. They
accept any callable returning an object with ``.logits`` (or a tuple whose first item is the
logits) of shape ``(B, L, V)``.

Decode-time methods (TokenSelect, ...) never act in a prefill, and eviction methods (SnapKV, ...)
evict only after one, so a one-forward score would silently be dense attention's:
:func:`prefill_answer_loglik` refuses them. :func:`answer_loglik` is the decode-path scorer
(:func:`tokensparse.eval.scoring.answer_loglik`): prefill, then the answer one token per step.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "string_match_all",
    "string_match_part",
    "first_word_match",
    "score",
    "answer_loglik",
    "prefill_answer_loglik",
    "perplexity",
    "logit_fidelity",
    "needle_retention",
    "peak_rss_mb",
]


# --------------------------------------------------------------------------------------------------
# answer matching (RULER's string_match_all / string_match_part, per sample)


def string_match_all(pred: str, answers: Sequence[str]) -> float:
    """Fraction of the gold strings that occur in ``pred`` (case-insensitive substring match)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("no gold answers")
    p = pred.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(pred: str, answers: Sequence[str]) -> float:
    """1.0 if any gold string occurs in ``pred`` (case-insensitive), else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("no gold answers")
    p = pred.lower()
    return float(any(a.lower() in p for a in answers))


def first_word_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 if the first word of ``pred`` equals a gold string (case-insensitive), else 0.0.

    For one-character answers (the character probes of tasks.py) a substring match is meaningless:
    ``"q"`` occurs in almost any continuation (``" 3\n\nQ:"``). The first whitespace-separated word,
    stripped of surrounding quotes and punctuation, must equal the answer instead.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("no gold answers")
    words = pred.split()
    if not words:
        return 0.0
    first = words[0].strip(".,;:!?\"'()[]").lower()
    return float(any(first == a.lower() for a in answers))


METRICS = {"all": string_match_all, "part": string_match_part, "first_word": first_word_match}


def score(pred: str, answers: Sequence[str], metric: str = "all") -> float:
    """Score one prediction with a metric named in :data:`METRICS`: ``"all"`` (RULER's
    string_match_all, used by the retrieval and aggregation tasks), ``"part"`` (string_match_part)
    or ``"first_word"`` (the character probes). Tasks record theirs in ``sample.metadata["metric"]``."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}") from None
    return fn(pred, answers)


# --------------------------------------------------------------------------------------------------
# likelihoods


def _logits_of(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def _as_2d(ids: torch.Tensor, name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"{name} must have shape (1, N) (or (N,)), got {tuple(ids.shape)}")
    return ids.long()


def _device_of(model) -> torch.device | None:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def answer_loglik(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, *, method=None,
                  question_ids: torch.Tensor | None = None, placement: str = "inside") -> float:
    """Decode-path ``sum_t log p(answer_t | prompt, answer_<t)`` in nats: the prompt is prefilled
    under ``method`` (or the model's current attention), then the answer is fed one token per step,
    so decode-time and eviction methods act as they do when generating. The float of
    :func:`tokensparse.eval.scoring.answer_loglik` (see there for ``question_ids`` / ``placement``;
    it also returns per-token log-probabilities and the logits)."""
    from .scoring import answer_loglik as decode_path

    return decode_path(model, prompt_ids, answer_ids, method=method, question_ids=question_ids,
                       placement=placement).loglik


def _refuse_decode_methods(model) -> None:
    try:
        from .scoring import _active_session
    except ImportError:  # pragma: no cover - metrics used without the engine
        return
    try:
        session = _active_session(model)
    except Exception:  # not a transformers model (a plain callable): nothing can be active on it
        return
    if session is not None and getattr(session.method, "phase", "prefill") in ("decode", "eviction"):
        raise ValueError(
            f"prefill_answer_loglik scores prompt + answer in one forward pass, where the active "
            f"{session.method.phase}-time method {session.method.name!r} never acts (the number would be dense "
            "attention's); use tokensparse.eval.metrics.answer_loglik (decode path) instead")


def _check_rows_kept(model, total: int, n: int) -> None:
    """After a forward inside ``ts.sparsify`` with a method that drops hidden rows (FastV): the last
    ``n`` output rows must still be positions ``total - n .. total - 1``, else the scored logits would
    belong to other tokens."""
    try:
        from .scoring import _active_session

        session = _active_session(model)
    except Exception:  # not a transformers model
        return
    rows = getattr(session, "rows", None)
    if rows is None:
        return
    want = torch.arange(total - n, total, device=rows.index.device)
    tail = rows.index[:, -n:]
    if tail.shape[1] < n or not bool((tail == want).all()):
        raise ValueError(
            f"the active method {session.method.name!r} dropped rows among the last {n} positions that are scored; "
            "mark the span it may prune (session.mark_span) so that the scored tokens stay outside it")


def prefill_answer_loglik(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, *, cache=None,
                          **forward_kwargs) -> float:
    """Teacher-forced ``sum_t log p(answer_t | prompt, answer_<t)`` in nats, from ONE forward over
    ``prompt + answer`` (prefill only: the answer tokens are queries of the same prefill).

    Valid for dense attention and prefill-time methods; inside ``ts.sparsify`` with a decode-time or
    eviction method it raises ``ValueError`` (those act only on decode steps / after the prefill, so
    the number would be dense attention's): use :func:`answer_loglik` for them.

    ``prompt_ids`` is ``(1, L)`` with ``L >= 1``, ``answer_ids`` is ``(1, A)`` (1-D tensors are
    accepted too). Only the last ``A + 1`` positions' logits are requested (``logits_to_keep``);
    a model that ignores that and returns all positions works as well. ``cache`` is passed on as
    ``cache=`` (and turns ``use_cache`` on unless given); other keyword arguments go to ``model``.
    """
    _refuse_decode_methods(model)
    prompt_ids, answer_ids = _as_2d(prompt_ids, "prompt_ids"), _as_2d(answer_ids, "answer_ids")
    L, A = prompt_ids.shape[1], answer_ids.shape[1]
    if L < 1 or A < 1:
        raise ValueError("prompt and answer must each have at least one token")
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    dev = _device_of(model)
    if dev is not None:
        ids = ids.to(dev)
    kw = dict(forward_kwargs)
    kw.setdefault("logits_to_keep", A + 1)
    if cache is not None:
        kw["cache"] = cache
        kw.setdefault("use_cache", True)
    else:
        kw.setdefault("use_cache", False)
    with torch.no_grad():
        logits = _logits_of(model(input_ids=ids, **kw))
    _check_rows_kept(model, ids.shape[1], A + 1)
    if logits.shape[1] < A + 1:
        raise ValueError(f"the model returned {logits.shape[1]} positions, need at least {A + 1}")
    # logits at position p predict token p + 1: positions L-1 .. L+A-2 predict the answer
    pred = logits[0, -(A + 1):-1].float()
    logp = torch.log_softmax(pred, dim=-1)
    target = answer_ids[0].to(logp.device)
    return float(logp.gather(-1, target[:, None]).sum())


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> float:
    """Sum of token NLLs for ``logits (N, V)`` against ``targets (N,)``, in fp32 chunks."""
    total = 0.0
    for s in range(0, logits.shape[0], chunk):
        total += float(F.cross_entropy(logits[s:s + chunk].float(), targets[s:s + chunk].to(logits.device),
                                       reduction="sum"))
    return total


def perplexity(model, input_ids: torch.Tensor, stride: int | None = None, *, window: int | None = None,
               **forward_kwargs) -> float:
    """Perplexity ``exp(mean NLL)`` of one sequence ``(1, N)`` (or ``(N,)``), scoring tokens 1..N-1.

    ``window`` (default: ``model.config.max_position_embeddings``, else ``N``) is the most tokens
    one forward sees. With ``N <= window`` and no ``stride`` it is a single forward. Otherwise the
    sequence is scored with a sliding window: windows start every ``stride`` tokens (default
    ``window``, i.e. disjoint chunks) and each scores only the tokens not scored before, with up to
    ``window - stride`` tokens of left context. A ``cache=`` keyword only makes sense with a single
    forward and is refused otherwise. Other keyword arguments go to ``model``.
    """
    ids = _as_2d(input_ids, "input_ids")
    N = ids.shape[1]
    if N < 2:
        raise ValueError("need at least 2 tokens")
    if window is None:
        cfg = getattr(model, "config", None)
        window = int(getattr(cfg, "max_position_embeddings", 0) or 0) or N
    if stride is None:
        stride = window
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    dev = _device_of(model)
    if dev is not None:
        ids = ids.to(dev)
    kw = dict(forward_kwargs)
    multi = N > window or stride < window and N > stride
    if multi and kw.get("cache") is not None:
        raise ValueError("a cache= object cannot be shared across sliding windows; use one forward (stride=None)")
    if kw.get("cache") is not None:
        kw.setdefault("use_cache", True)
    else:
        kw.setdefault("use_cache", False)

    total, count, scored_end = 0.0, 0, 1  # tokens [1, scored_end) already scored
    begin = 0
    with torch.no_grad():
        while scored_end < N:
            end = min(begin + window, N)
            logits = _logits_of(model(input_ids=ids[:, begin:end], **kw))[0]
            _check_rows_kept(model, end - begin, end - begin)  # every position is scored
            # position p (absolute begin + p) predicts token begin + p + 1; score tokens [scored_end, end)
            first = scored_end - begin - 1
            total += _nll_sum(logits[first:end - begin - 1], ids[0, scored_end:end])
            count += end - scored_end
            scored_end = end
            if end == N:
                break
            begin += stride
            if begin >= scored_end:  # never leave a gap between windows
                begin = scored_end - 1
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------------
# logit fidelity


def logit_fidelity(logits_ref: torch.Tensor, logits_test: torch.Tensor, chunk: int = 512) -> dict:
    """How close test logits are to reference logits, per position.

    Both tensors have shape ``(L, V)`` or ``(B, L, V)`` (equal shapes). Returns
    ``{"kl": mean over positions of KL(p_ref || p_test) in nats, "kl_max": its maximum,
    "top1": fraction of positions whose argmax agrees, "positions": count}``. Computed in fp32 from
    ``log_softmax``, in chunks of positions; a token with zero reference probability contributes 0.
    """
    if logits_ref.shape != logits_test.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_ref.shape)} vs {tuple(logits_test.shape)}")
    if logits_ref.dim() not in (2, 3):
        raise ValueError("logits must have shape (L, V) or (B, L, V)")
    V = logits_ref.shape[-1]
    ref = logits_ref.reshape(-1, V)
    test = logits_test.reshape(-1, V)
    n = ref.shape[0]
    if n == 0:
        raise ValueError("no positions")
    kl_sum, kl_max, agree = 0.0, 0.0, 0
    for s in range(0, n, chunk):
        r = torch.log_softmax(ref[s:s + chunk].float(), dim=-1)
        t = torch.log_softmax(test[s:s + chunk].float().to(r.device), dim=-1)
        p = r.exp()
        kl = torch.where(p > 0, p * (r - t), torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
        kl = kl.clamp_min(0.0)  # rounding can give -1e-9
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
    return {"kl": kl_sum / n, "kl_max": kl_max, "top1": agree / n, "positions": n}


# --------------------------------------------------------------------------------------------------
# needle retention


def _retention(kept, needles: set[int]) -> float:
    if kept is None:
        return 1.0
    kept = torch.as_tensor(kept).reshape(-1).tolist()
    return len(needles.intersection(int(k) for k in kept if k >= 0)) / len(needles)


def needle_retention(kept_positions_per_layer: Sequence, needle_positions: Sequence[int]) -> dict:
    """Fraction of the needle's token positions that each layer kept.

    ``kept_positions_per_layer[l]`` describes layer ``l`` and may be:

    - a tensor (any shape, e.g. ``(k,)``, ``(H, k)``, ``(B, H, k)``) or a list of ints: flattened
      and taken as one set of absolute token positions (the union over heads);
    - a list/tuple of such tensors, one per head (possibly of different sizes): the layer's value is
      the mean over heads of each head's retention;
    - ``None``: the layer kept every position (retention 1.0), e.g. a dense layer.

    Negative entries are ignored (use -1 as padding). Returns ``{"mean": mean over layers,
    "min": min over layers, "per_layer": [...]}``.
    """
    needles = {int(p) for p in needle_positions}
    if not needles:
        raise ValueError("needle_positions is empty")
    per_layer = []
    for kept in kept_positions_per_layer:
        if isinstance(kept, (list, tuple)) and kept and all(
            x is None or isinstance(x, (torch.Tensor, list, tuple)) for x in kept
        ):
            per_layer.append(sum(_retention(h, needles) for h in kept) / len(kept))
        else:
            per_layer.append(_retention(kept, needles))
    if not per_layer:
        raise ValueError("no layers")
    return {"mean": sum(per_layer) / len(per_layer), "min": min(per_layer), "per_layer": per_layer}


# --------------------------------------------------------------------------------------------------
# memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
