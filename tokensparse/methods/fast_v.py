"""FastV-style span pruning: after layer K-1, drop the least-attended tokens of a span for every later layer.

Based on Chen, Zhao, Chen, Liu, Zhang, Lin, Chang, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024,
https://arxiv.org/abs/2403.06764 (official code: github.com/pkunlp-icler/FastV).

In the prompt's forward pass, the attention of the last ``n_last`` tokens in layer ``layer - 1``
(softmax over every key, averaged over all query heads and those queries) ranks the tokens of a
*span*; the ``ceil(keep · span)`` best stay, the others are dropped from the hidden states, so layers
``layer .. N-1`` compute (attention, MLP) and cache only the kept rows. Kept tokens keep their
original positions (RoPE and masks), so generation continues from the pruned cache as if the
dropped tokens had never been in those layers; layers ``0 .. layer-1`` keep every row. The engine's
decoder-layer hook does the gathering (:mod:`tokensparse.engine.rows`); this file only ranks.

The span: the one marked with ``session.mark_span(start, end)`` (the evaluation harness marks a
prompt's context), else every real token but the first ``n_sink`` and the last ``tail`` (the question
and the instruction stay). The last token is never in the span.

Parameters
----------
layer: int = 2
    ``K``: the first decoder layer that sees only the kept tokens (the paper's K=2).
keep: float = 0.5
    Share of the span kept, in (0, 1] (the paper drops R=50% of the image tokens).
n_last: int = 1
    Queries whose attention ranks the span: the last ``n_last`` tokens of the prompt.
n_sink: int = 4
    Without a marked span: leading tokens outside the span.
tail: int = 64
    Without a marked span: trailing tokens outside the span.
pool_kernel: int = 1
    Beyond the paper: max-pool the scores over ``pool_kernel`` neighbouring tokens before ranking
    (SnapKV's trick), so that a span the last token attends to stays whole; 1 = the paper. On
    SmolLM2 (one token per digit) the paper's per-token ranking keeps only some digits of a number.

Deviations: the paper prunes image tokens of a vision-language model; here any marked span (a
document's tokens) — "generalised to any token span". The ranking attention is computed by the
method from the layer's own queries and keys (the paper reads the attention weights the eager
kernel returns). On models whose layer ``layer - 1`` uses sliding-window attention, the last
global-attention layer before ``layer`` ranks (a window cannot see the span); with none, nothing is
pruned (``session.info["fast_v"]`` says so). Only the first pass over an empty cache prunes (the
prompt); later passes (a question fed after the context, decode steps) run on what was kept.
Batches: each sequence keeps ``ceil(keep · its span)``; sequences that keep fewer rows are padded
with masked filler rows, so a row of a batch computes what it computes alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..engine.config import param
from ..engine.executors import causal_mask
from ..engine.method import Method, Phase
from ..engine.rows import RowKeep
from ..engine.selection import grouped_logits, pool1d, select_topk


@dataclass(eq=False)
class FastV(Method):
    name = "fast_v"
    phase = Phase.PRUNE
    schedule = "once, in the prompt's pass after layer K-1"
    kv_memory = "layers ≥ K hold only the kept rows"
    paper = "[FastV](https://arxiv.org/abs/2403.06764)"
    needs_evicting_cache = True  # the pruned layers' rows record which token each holds (slots)
    prunes_rows = True

    layer: int = param(2, "int", ge=1)
    keep: float = param(0.5, "float", gt=0.0, le=1.0)
    n_last: int = param(1, "int", ge=1)
    n_sink: int = param(4, "int", ge=0)
    tail: int = param(64, "int", ge=0)
    pool_kernel: int = param(1, "int", ge=1)

    @classmethod
    def at_full_budget(cls) -> "FastV":
        return cls(layer=1, keep=1.0, n_sink=0, tail=1)

    @classmethod
    def at_sparse_budget(cls) -> "FastV":
        return cls(layer=1, keep=0.3, n_sink=2, tail=4)

    def setup(self, session) -> None:
        n = session.num_layers
        if self.layer >= n:  # (the default K=2 on a 2-layer test model): said, not silent
            session.state["fast_v_rank_layer"] = None
            session.info["fast_v"] = f"layer={self.layer} is not below the model's {n} decoder layers: nothing is pruned"
            warnings.warn(f"fast_v: {session.info['fast_v']}", stacklevel=2)
            return
        cfg = session.model.config.get_text_config(decoder=True)
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        def is_global(i):
            return types[i] != "sliding_attention" if types else window is None
        ranks = [i for i in range(self.layer) if is_global(i)]
        session.state["fast_v_rank_layer"] = ranks[-1] if ranks else None
        session.info["fast_v"] = (
            f"layer {ranks[-1] if ranks else None} ranks, layers {self.layer}..{n - 1} keep {self.keep:g} of the span"
            if ranks else f"no global-attention layer before layer {self.layer}: nothing is pruned"
        )

    def forward(self, call) -> torch.Tensor:
        rank_layer = call.session.state["fast_v_rank_layer"]
        if call.layer_idx == rank_layer and call.past_len == 0 and call.session.rows is None:
            call.carry["fast_v"] = (self._scores(call), call.key_valid)
        return call.dense()

    def _scores(self, call) -> torch.Tensor:
        """``(B, L)`` fp32: attention of the last ``n_last`` queries, mean over heads and queries."""
        n = min(self.n_last, call.q_len)
        logits = grouped_logits(call.query[:, :, -n:], call.key, call.scale)  # (B, Hq, n, Lk) fp32
        mask = call.mask
        if mask is None:
            mask = causal_mask(n, call.k_len, logits.device)[None, None]
        else:
            mask = mask[:, :, -n:]
            mask = mask.repeat_interleave(call.n_q_heads // mask.shape[1], dim=1)
        logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1).nan_to_num(0.0).mean((1, 2))

    def keep_rows(self, session, layer_idx, hidden):
        if layer_idx != self.layer - 1 or "fast_v" not in session.carry:
            return None
        scores, key_valid = session.carry.pop("fast_v")
        b, n = scores.shape
        dev = scores.device
        pos = torch.arange(n, device=dev)
        if key_valid is None:
            key_valid = torch.ones(b, n, dtype=torch.bool, device=dev)
        n_real = key_valid.sum(1, keepdim=True)  # (B, 1)
        rank = key_valid.long().cumsum(1) - 1  # 0-based rank among real tokens (padding: garbage, masked below)
        if session.span is not None:
            lo = torch.full_like(n_real, session.span[0])
            hi = torch.clamp(torch.full_like(n_real, session.span[1]), max=n_real - 1)
        else:
            lo = torch.full_like(n_real, self.n_sink)
            hi = torch.clamp(n_real - self.tail, max=n_real - 1)
        in_span = key_valid & (rank >= lo) & (rank < hi)  # (B, L)
        m = in_span.sum(1)  # span length per sequence
        kept_span = torch.ceil(m.double() * self.keep - 1e-9).long().clamp(max=m)
        drop = m - kept_span
        total = n - int(drop.min())
        if total == n:  # nothing dropped (the rows still go through the engine's gathers)
            return RowKeep(pos.expand(b, n).contiguous())
        scores = pool1d(scores.float(), self.pool_kernel, "max")  # scores >= 0: padding (0) never wins a max
        ranked = scores.masked_fill(~in_span, float("inf"))  # outside the span (and padding): kept
        counts = (n - drop)[:, None]
        idx, valid = select_topk(ranked, total, counts)
        if bool(valid.all()):
            return RowKeep(idx)
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)  # fillers first, then ascending rows
        return RowKeep(idx.gather(1, order), valid.gather(1, order))
