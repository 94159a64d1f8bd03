"""Attention-sink detection: the first-token (primary) sink and secondary sinks per layer and head.

Sink score of Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View"
(ICLR 2025, https://arxiv.org/abs/2410.10781), as used by Wong et al., "On the Existence and
Behaviour of Secondary Attention Sinks" (https://arxiv.org/abs/2512.22213): the mean attention key
``k`` receives from the queries that can see it,

    σ_ℓ,h(k) = (1 / |Q(k)|) Σ_{q ∈ Q(k)} A^{ℓ,h}[q, k],

``Q(k)`` the real queries whose mask admits ``k`` (``T − k`` of them in a causal unpadded prompt).
A layer has a **primary sink** when the first real token's head-mean score exceeds
``primary_threshold`` (Gu et al.'s ε = 0.3; their head-level metric, the share of heads above ε,
is reported too). A **secondary sink** is a later token whose head-mean score exceeds
``secondary_threshold`` in a run of consecutive layers: reported with its onset layer, lifetime
(layers in the run) and peak score — Wong et al.'s (onset, lifetime) description.

Scores come from the prompt's prefill call of each layer (a call with nothing cached before it),
computed in fp32 from the call's Q and K as dense attention would distribute them — inside
``ts.sparsify`` that is the attention the layer's inputs would get without the method at that
layer. Keys seen by fewer than ``min_queries`` queries are left out of the secondary search (the
last tokens are seen by a handful of queries and their score is mostly self-attention). Padded
batches: positions are counted from each row's first real token. Sliding-window layers are scored
like the others (``Q(k)`` follows their mask).

Deviations: Wong et al. also cluster (onset, lifetime) across prompts into "sink levels" and link
secondary sinks to MLP output norms; neither is built (they need hidden states, not attention).
Secondary sinks may be weak or absent in a 135M model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.observers import Observer
from ..engine.selection import attention_mass

__all__ = ["SinkDetector", "sink_scores"]


def sink_scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(σ, seen)``, both ``(B, Hq, Lk)`` fp32: σ(k) per head, the mean attention probability key
    ``k`` receives from the queries that see it (0 for a key no query sees), and how many queries
    see it. ``q (B, Hq, Lq, D)`` are the last ``Lq``
    positions of ``k (B, Hkv, Lk, D)``; ``mask`` bool ``(B, 1|Hkv|Hq, Lq, Lk)`` or ``None`` (causal)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    total = attention_mass(q, k, scale, mask)
    if mask is None:
        pos = torch.arange(lk, device=q.device)
        seen = (lq - (pos - (lk - lq)).clamp_min(0)).clamp_min(0).float()[None, None]  # queries at or after k
    else:
        live = mask.any(-1, keepdim=True)  # query rows that see anything (padding rows see nothing)
        seen = (mask & live).sum(-2).float()  # (B, 1|H, Lk)
        if seen.shape[1] not in (1, hq):
            seen = seen.repeat_interleave(hq // seen.shape[1], dim=1)
    return torch.where(seen > 0, total / seen.clamp_min(1), torch.zeros_like(total)), seen.expand(b, hq, lk)


@dataclass(eq=False)
class SinkDetector(Observer):
    """Observer: per layer and head, the first real token's sink score, and secondary sinks.

    Parameters
    ----------
    primary_threshold: float = 0.3
        ε of Gu et al.: a layer (head) has a first-token sink when its score exceeds it.
    secondary_threshold: float = 0.05
        Head-mean score above which a later token counts as a sink in a layer.
    min_queries: int = 32
        A key must be seen by at least this many queries to be a secondary-sink candidate.
    min_lifetime: int = 1
        Layers in a run for a secondary sink to be reported.
    """

    primary_threshold: float = 0.3
    secondary_threshold: float = 0.05
    min_queries: int = 32
    min_lifetime: int = 1
    #: per prefill call: ``{"layer", "row", "first_token": [σ per head], "candidates": {pos: σ}}``
    records: list = field(default_factory=list)

    def __post_init__(self):
        for name in ("primary_threshold", "secondary_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"SinkDetector: {name} must be in (0, 1), got {v!r}")
        for name in ("min_queries", "min_lifetime"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SinkDetector: {name} must be an int >= 1, got {v!r}")

    def reset(self) -> None:
        self.records.clear()

    def on_call(self, call) -> None:
        if call.kind != "prefill":
            return
        sigma, seen = sink_scores(call.query, call.key, call.scale, call.mask)
        first = (call.k_len - call.n_real[:, 0]).tolist()  # each row's first real token
        mean = sigma.mean(1)  # (B, Lk) head mean
        for r, f in enumerate(first):
            cand = (mean[r] > self.secondary_threshold) & (seen[r].amin(0) >= self.min_queries)
            cand[: f + 1] = False
            pos = cand.nonzero().flatten().tolist()
            self.records.append({
                "layer": call.layer_idx,
                "row": r,
                "first_token": sigma[r, :, f].tolist(),
                "candidates": {p - f: float(mean[r, p]) for p in pos},
            })

    # ---- reports ---------------------------------------------------------------------------------
    def per_layer(self) -> dict[int, dict]:
        """Per layer (means over the observed rows): the first token's head-mean score, its score per
        head, the share of heads above ``primary_threshold``, and the strongest later tokens."""
        out: dict[int, dict] = {}
        for layer in sorted({r["layer"] for r in self.records}):
            recs = [r for r in self.records if r["layer"] == layer]
            heads = torch.tensor([r["first_token"] for r in recs])  # (rows, H)
            cands: dict[int, list[float]] = {}
            for r in recs:
                for p, s in r["candidates"].items():
                    cands.setdefault(p, []).append(s)
            top = sorted(((p, sum(v) / len(recs)) for p, v in cands.items()), key=lambda t: -t[1])[:5]
            out[layer] = {
                "first_token": float(heads.mean()),
                "first_token_per_head": heads.mean(0).tolist(),
                "heads_with_first_token_sink": float((heads > self.primary_threshold).float().mean()),
                "primary_sink": bool(heads.mean() > self.primary_threshold),
                "secondary": [{"position": p, "score": s} for p, s in top],
                "rows": len(recs),
            }
        return out

    def secondary_sinks(self) -> list[dict]:
        """Runs of consecutive layers in which a later token (by row and position from the row's
        first real token) is a sink: ``{row, position, onset, lifetime, peak}``, longest first."""
        by_tok: dict[tuple[int, int], dict[int, float]] = {}
        for r in self.records:
            for p, s in r["candidates"].items():
                by_tok.setdefault((r["row"], p), {})[r["layer"]] = s
        runs = []
        for (row, p), layers in by_tok.items():
            ls = sorted(layers)
            start = prev = ls[0]
            for layer in ls[1:] + [None]:
                if layer is not None and layer == prev + 1:
                    prev = layer
                    continue
                life = prev - start + 1
                if life >= self.min_lifetime:
                    runs.append({"row": row, "position": p, "onset": start, "lifetime": life,
                                 "peak": max(layers[x] for x in range(start, prev + 1))})
                if layer is not None:
                    start = prev = layer
        return sorted(runs, key=lambda d: (-d["lifetime"], -d["peak"], d["row"], d["position"]))

    def report(self) -> dict:
        layers = self.per_layer()
        return {
            "primary_threshold": self.primary_threshold,
            "secondary_threshold": self.secondary_threshold,
            "layers_observed": len(layers),
            "layers_with_primary_sink": [l for l, v in layers.items() if v["primary_sink"]],
            "per_layer": {str(l): v for l, v in layers.items()},
            "secondary_sinks": self.secondary_sinks(),
        }
