"""The prompt step (Engine v2 part 2): a ``Phase.PROMPT`` method shortens the context before the
model sees it (prompt compression). The method returns the context positions to keep
(``Method.compress_prompt``); :func:`apply_prompt_step` checks them, applies them and times it.
The question (and anything after the context) is never touched. The evaluation harness calls it
for every run of a prompt method (``tokensparse.eval.harness.encode_for``); inside ``sparsify`` a
prompt method changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .method import Method, Phase

__all__ = ["PromptStep", "apply_prompt_step", "is_prompt_method"]


def is_prompt_method(method: Method | None) -> bool:
    return method is not None and method.phase == Phase.PROMPT


@dataclass
class PromptStep:
    """What a prompt step did: tokens of the context before and after, and its seconds."""

    context_tokens: int
    kept_tokens: int
    seconds: float

    def as_stats(self) -> dict:
        return {"prompt_context_tokens": self.context_tokens, "prompt_kept_tokens": self.kept_tokens,
                "prompt_step_s": self.seconds}


@torch.no_grad()
def apply_prompt_step(model, method: Method, context_ids: torch.Tensor) -> tuple[torch.Tensor, PromptStep]:
    """``(kept context ids (1, m), PromptStep)`` for a ``Phase.PROMPT`` method.

    Raises ``ValueError`` for a method of another phase, a batch of more than one prompt, or
    positions that are not sorted, unique, in range and non-empty.
    """
    if not is_prompt_method(method):
        raise ValueError(f"{getattr(method, 'name', method)!r} is not a prompt-step method (phase {getattr(method, 'phase', None)})")
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"the prompt step takes one prompt, context_ids (1, n); got shape {tuple(context_ids.shape)}")
    n = context_ids.shape[1]
    t0 = time.perf_counter()
    pos = method.compress_prompt(model, context_ids)
    seconds = time.perf_counter() - t0
    pos = torch.as_tensor(pos).to(torch.long).flatten().cpu()
    if pos.numel() == 0:
        raise ValueError(f"{method.name}: the prompt step kept no context token")
    if bool((pos[1:] <= pos[:-1]).any()) or int(pos[0]) < 0 or int(pos[-1]) >= n:
        raise ValueError(f"{method.name}: prompt positions must be sorted, unique and in [0, {n})")
    return context_ids[:, pos.to(context_ids.device)], PromptStep(n, int(pos.numel()), seconds)
