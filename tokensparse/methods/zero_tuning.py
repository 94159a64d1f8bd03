"""ZeroTuning: rescale the attention every query gives the initial token, per head.

Based on Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language
Models Without Training", https://arxiv.org/abs/2505.11739 (official code:
github.com/FeijiangHan/ZeroTuning, ``ZeroTuning_Attention``).

In the chosen layers and query heads, the post-softmax weight of the initial token is multiplied
by ``gamma`` and each row renormalised: ``a'_0 = γ·a_0 / D``, ``a'_j = a_j / D`` with
``D = 1 + (γ − 1)·a_0``. This equals adding ``log γ`` to the initial token's logit before the
softmax, which is how it runs here: a :class:`~tokensparse.engine.KeyBias` that every executor
applies on its fast path (SDPA included), at prefill and at every decode step. Ratios among the
other tokens are unchanged; ``γ > 1`` flattens them (the paper: helps classification), ``γ < 1``
sharpens them (helps QA). The cache is untouched.

Parameters
----------
gamma: float = 1.0
    γ, the factor on the initial token's attention weight (1 = dense attention).
heads: str | list[int] = "all"
    Query heads to rescale, the same indices in every chosen layer (the official code's default
    when no layer is given), or ``"all"``.
layers: str | list[int] = "all"
    Layers to rescale, or ``"all"``.

Deviations: the paper profiles heads on a dev set (each head's accuracy change at γ = 2, then the
"up-" or "down-effective" group is rescaled) and picks γ by grid search or by minimising answer
entropy; that calibration is not run here: the heads and γ are given. The initial token is each
row's first *real* token (a left-padded row's first token after its padding), not index 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.pipeline import sparse_paths_forced
from ..engine.selection import KeyBias


@dataclass(eq=False)
class ZeroTuning(Method):
    name = "zero_tuning"
    phase = Phase.REWEIGHT
    schedule = "every call of its layers (prefill and decode)"
    kv_memory = "none"
    calibration = "optional: head profiling and γ search (not built; heads and γ are given)"
    paper = "[ZeroTuning](https://arxiv.org/abs/2505.11739)"

    gamma: float = param(1.0, "float", gt=0.0)
    heads: str | list[int] = param("all", "indices", choices=("all",))
    layers: str | list[int] = param("all", "layers", choices=("all",))

    @classmethod
    def at_full_budget(cls) -> "ZeroTuning":
        return cls(gamma=1.0)

    @classmethod
    def at_sparse_budget(cls) -> "ZeroTuning":
        return cls(gamma=4.0, heads=[0, 1])

    def setup(self, session) -> None:
        n_layers = session.num_layers
        cfg = session.model.config.get_text_config(decoder=True)
        n_heads = cfg.num_attention_heads
        for what, chosen, n in (("layers", self.layers, n_layers), ("heads", self.heads, n_heads)):
            if chosen != "all" and any(i >= n for i in chosen):
                raise ValueError(f"zero_tuning: {what} {chosen} out of range for a model with {n} {what}")
        session.state["zero_tuning_layers"] = None if self.layers == "all" else frozenset(self.layers)
        value = torch.zeros(1, n_heads, 1)
        value[:, list(range(n_heads)) if self.heads == "all" else self.heads] = math.log(self.gamma)
        session.state["zero_tuning_value"] = value

    def key_bias(self, call) -> KeyBias | None:
        layers = call.session.state["zero_tuning_layers"]
        if layers is not None and call.layer_idx not in layers:
            return None
        if self.gamma == 1.0 and not sparse_paths_forced():
            return None  # log 1 = 0: dense attention (forced: run the biased path with a zero bias)
        first = call.k_len - call.n_real if call.key_valid is not None else torch.zeros(call.batch, 1, dtype=torch.long)
        value = call.session.state["zero_tuning_value"].to(call.query.device)
        return KeyBias(first.to(call.query.device).view(call.batch, 1), value)
