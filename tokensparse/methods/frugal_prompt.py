"""FrugalPrompt: keep the most salient context tokens, in their original order, before the model.

Based on "FrugalPrompt: Reducing Contextual Overhead in Large Language Models via Token
Attribution" (arXiv 2510.16439; notebooks at github.com/Starscream-11813/Frugal-ICL): a token
attribution scores every prompt token, the top ``keep`` share is retained in the original order
and the shortened prompt goes to a frozen LLM (the paper's retention settings: 80%, 60%, 50%).

Salience here is the *attention each context token receives* in the model itself, with the causal
normalisation of the sink score (:func:`tokensparse.analysis.sinks.sink_scores`): one dense
prefill of the context, and for every layer in ``layers`` the mean over heads of
``(1 / |Q(i)|) Σ_{t ∈ Q(i)} A[t, i]``, averaged over the layers. The first ``n_sink`` tokens (BOS,
the attention sink, which this score ranks first whatever it says) are always kept and left out of
the ranking. The question is never compressed (the harness applies the step to the context).

Parameters
----------
keep: float = 0.8
    Share of the context's tokens retained (sinks included), rounded up; 1.0 keeps everything.
layers: str | list[int] = "second_half"
    Layers whose scores are averaged (the toolkit's ``L_mid..L``); ``"all"`` or explicit indices.
n_sink: int = 1
    First tokens always kept.

Deviations: the paper's attributions (GlobEnc, DecompX) run on a task-fine-tuned BERT classifier;
that needs training and a second model, so the training-free version scores with the served
model's own attention (the "attention received" substitute of the method notes). The paper
detokenizes and re-sends text; here the kept token ids are fed directly (no re-tokenization, so
the kept tokens are exactly the scored ones). The scoring prefill costs one dense prefill of the
context plus ``O(L²)`` fp32 work per scored layer; the harness reports it as ``prompt_step_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..analysis.sinks import sink_scores
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.observers import Observer, observe_prompt
from ..engine.selection import select_topk


class _Salience(Observer):
    """Sums each context token's head-mean sink score over the chosen layers of one prefill."""

    def __init__(self, layers: set[int]):
        self.layers = layers
        self.total: torch.Tensor | None = None
        self.n = 0

    def on_call(self, call) -> None:
        if call.kind != "prefill" or call.layer_idx not in self.layers:
            return
        sigma, _ = sink_scores(call.query, call.key, call.scale, call.mask)
        s = sigma.mean(1)[0]  # (Lk,) head mean, one prompt
        self.total = s if self.total is None else self.total + s
        self.n += 1


@dataclass(eq=False)
class FrugalPrompt(Method):
    name = "frugal_prompt"
    phase = Phase.PROMPT
    schedule = "once per prompt, before the model (the context only)"
    kv_memory = "reduced with the prompt (keep × context)"
    paper = "[FrugalPrompt](https://arxiv.org/abs/2510.16439)"

    keep: float = param(0.8, "float", gt=0.0, le=1.0)
    layers: str | list[int] = param("second_half", "layers", choices=("second_half", "all"))
    n_sink: int = param(1, "int", ge=0)

    @classmethod
    def at_full_budget(cls) -> "FrugalPrompt":
        return cls(keep=1.0)

    @classmethod
    def at_sparse_budget(cls) -> "FrugalPrompt":
        return cls(keep=0.5)

    def scored_layers(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "second_half":
            return list(range(n_layers // 2, n_layers))
        bad = [i for i in self.layers if i >= n_layers]
        if bad:
            raise ValueError(f"frugal_prompt: layers {bad} out of range for a model with {n_layers} layers")
        return sorted(self.layers)

    def salience(self, model, context_ids: torch.Tensor) -> torch.Tensor:
        """``(n,)`` fp32: each context token's attention received, averaged over the scored layers."""
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        obs = _Salience(set(self.scored_layers(n_layers)))
        observe_prompt(model, context_ids, obs)
        return obs.total.float().cpu() / obs.n

    def compress_prompt(self, model, context_ids: torch.Tensor) -> torch.Tensor:
        n = context_ids.shape[1]
        m = min(n, math.ceil(self.keep * n - 1e-9))
        if m >= n:
            return torch.arange(n)
        sinks = min(self.n_sink, m)
        score = self.salience(model, context_ids)
        rest = select_topk(score[sinks:], m - sinks)[0] + sinks  # sorted; ties: the earlier token
        return torch.cat([torch.arange(sinks), rest])
