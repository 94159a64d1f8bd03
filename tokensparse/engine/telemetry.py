"""Opt-in per layer/head statistics: density, the share of dense attention mass kept, output error.

Both are estimated on a few sampled query rows of each call (evenly spaced, always including the
last one), so the cost is ``O(S · Lk)`` per head instead of ``O(Lq · Lk)``:

* ``density``: attended (query, key) pairs / causally allowed pairs, on the sampled rows;
* ``mass``: sum of the *dense* attention probabilities over the keys actually attended (0 for a
  query row the method skipped entirely, as Token Sparse Attention does);
* ``error``: relative error of the attention output, ``‖O_sel − O_dense‖_F / ‖O_dense‖_F`` over the
  sampled rows of each head, where ``O_sel`` is attention renormalised over the selected keys (0
  for a row the method skipped, as Token Sparse Attention's scatter writes) and ``O_dense`` dense
  attention over the keys this call sees. Both are computed in fp32 from the call's Q/K/V and the
  selection, so this measures the selection, not executor round-off (executors are tested against
  their references separately).

What a selection means depends on its kind: for ``rows`` and ``keys`` (prefill and decode-time
selection) it is what the call attends to, so ``error`` is the error of that call's output; an
eviction method (``keep``) attends densely and reports the rows it *keeps*, so its ``error`` is what the prompt's own
queries would get from the kept cache (a proxy for later queries; its real effect shows in the
logit fidelity of the evaluation rows). Decode steps over an already evicted cache are dense over
what the cache holds and are not observed.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .blocks import token_mask
from .observers import Observer
from .executors import _expand_heads, causal_mask
from .selection import Selection, grouped_logits

__all__ = ["Selection", "Telemetry"]


class Telemetry(Observer):
    """Collects one record per (layer, call) the method acted on (an
    :class:`~tokensparse.engine.observers.Observer` of selections). Use :meth:`summary` for
    per-layer means."""

    def __init__(self, sample_queries: int = 64, keep_indices: bool = False):
        if sample_queries < 1:
            raise ValueError("sample_queries must be >= 1")
        self.sample_queries = sample_queries
        self.keep_indices = keep_indices
        self.records: list[dict] = []
        self.last_selection: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.records.clear()
        self.last_selection.clear()

    def on_selection(self, call, selection: Selection) -> None:
        self.observe(call, selection)

    def observe(self, call, selection: Selection) -> None:
        q, k = call.query, call.key
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        s = min(self.sample_queries, lq)
        rows = torch.linspace(0, lq - 1, s, device=q.device).round().long().unique()
        logits = grouped_logits(q[:, :, rows], k, call.scale)  # (B, Hq, S, Lk)
        m = call.mask
        allowed = causal_mask(lq, lk, q.device)[rows][None, None] if m is None else _expand_heads(m[:, :, rows], hq)
        allowed = allowed.expand(b, hq, len(rows), lk)
        p = logits.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1) * allowed
        att = allowed.clone()
        v = call.value
        if selection.kind == "blocks":
            tm = token_mask(selection, lq, lk, call.key_valid, rows)  # (B, H, S, Lk), causality included
            att &= _expand_heads(tm, hq)
            if self.keep_indices:
                self.last_selection[call.layer_idx] = selection.idx.detach().cpu()
        elif selection.kind != "dense":
            sel = selection.mask(lk)
            sel = _expand_heads(sel[:, :, None, :], hq)[:, :, 0]  # (B, Hq, Lk)
            att &= sel[:, :, None, :]
            if selection.kind == "rows":
                qpos = rows + (lk - lq)
                att &= sel[:, :, qpos][..., None]
            if self.keep_indices:
                self.last_selection[call.layer_idx] = selection.full_idx(lk)[0].detach().cpu()
        kept = p * att
        mass = kept.sum(-1)  # (B, Hq, S)
        n_allowed = allowed.sum(-1)
        density = att.sum(-1).float() / n_allowed.clamp_min(1).float()
        live = (n_allowed > 0).float()  # padding query rows see nothing: leave them out of the means
        denom = live.sum((0, 2)).clamp_min(1)
        # attention outputs on the sampled rows: dense, and renormalised over the selection
        p_sel = kept / mass.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        o_dense = _grouped_values(p, v)
        o_sel = _grouped_values(p_sel, v)
        lv = live[..., None]
        num = ((o_sel - o_dense) * lv).pow(2).sum((0, 2, 3))
        den = (o_dense * lv).pow(2).sum((0, 2, 3))
        error = (num / den.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()  # (Hq,)
        self.records.append(
            {
                "layer": call.layer_idx,
                "kind": call.kind,
                "q_len": lq,
                "k_len": lk,
                "selection": selection.kind,
                "density": ((density * live).sum((0, 2)) / denom).tolist(),
                "mass": ((mass * live).sum((0, 2)) / denom).tolist(),
                "error": error.tolist(),
            }
        )

    def summary(self) -> dict[int, dict[str, float]]:
        """Per layer: density, mass and output error (means over heads and calls), number of calls."""
        acc: dict[int, list] = defaultdict(list)
        for r in self.records:
            acc[r["layer"]].append(r)
        out = {}
        for layer, recs in sorted(acc.items()):
            out[layer] = {f: _mean([_mean(r[f]) for r in recs]) for f in _FIELDS}
            out[layer]["calls"] = len(recs)
        return out

    def overall(self, summary: dict | None = None) -> dict[str, float]:
        """Means over the layers that recorded something (layers a method never touched are left
        out: they are dense by construction). With no record at all: density 1, mass 1, error 0.
        ``summary``: a :meth:`summary` already computed."""
        s = self.summary() if summary is None else summary
        if not s:
            return {"density": 1.0, "mass": 1.0, "error": 0.0}
        return {f: _mean([v[f] for v in s.values()]) for f in _FIELDS}

    def report(self) -> dict:
        """:meth:`overall` plus ``layers_observed`` and ``per_layer`` (``{layer: {density, mass,
        error, calls}}``, layer keys as strings so the dict survives JSON)."""
        s = self.summary()
        return {**self.overall(s), "layers_observed": len(s), "per_layer": {str(k): v for k, v in s.items()}}


_FIELDS = ("density", "mass", "error")


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p (B, Hq, S, Lk) @ v (B, Hkv, Lk, D)`` in fp32 without repeating V over the query groups."""
    b, hq, s, lk = p.shape
    hkv = v.shape[1]
    g = hq // hkv
    return (p.reshape(b, hkv, g * s, lk) @ v.float()).view(b, hq, s, v.shape[-1])
