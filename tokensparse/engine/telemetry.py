"""Opt-in per layer/head statistics: density and the share of dense attention mass kept.

Both are estimated on a few sampled query rows of each call (evenly spaced, always including the
last one), so the cost is ``O(S · Lk)`` per head instead of ``O(Lq · Lk)``:

* ``density``: attended (query, key) pairs / causally allowed pairs, on the sampled rows;
* ``mass``: sum of the *dense* attention probabilities over the keys actually attended (0 for a
  query row the method skipped entirely, as Token Sparse Attention does).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .executors import _expand_heads, causal_mask
from .selection import _grouped_logits


@dataclass
class Selection:
    """What a call attended to, for telemetry.

    ``kind``: ``"dense"``; ``"rows"`` (compress→attend→scatter: ``idx`` restricts both queries and
    keys, per query or KV head); ``"keys"`` (``idx`` restricts keys for every query of the call,
    e.g. decode-time selection or the rows an eviction keeps).
    """

    kind: str
    idx: torch.Tensor | None = None

    @classmethod
    def dense(cls):
        return cls("dense")

    @classmethod
    def rows(cls, idx):
        return cls("rows", idx)

    @classmethod
    def keys(cls, idx):
        return cls("keys", idx)


class Telemetry:
    """Collects one record per (layer, call). Use :meth:`summary` for per-layer means."""

    def __init__(self, sample_queries: int = 64, keep_indices: bool = False):
        if sample_queries < 1:
            raise ValueError("sample_queries must be >= 1")
        self.sample_queries = sample_queries
        self.keep_indices = keep_indices
        self.records: list[dict] = []
        self.last_selection: dict[int, torch.Tensor] = {}

    def observe(self, call, selection: Selection) -> None:
        q, k = call.query, call.key
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        s = min(self.sample_queries, lq)
        rows = torch.linspace(0, lq - 1, s, device=q.device).round().long().unique()
        logits = _grouped_logits(q[:, :, rows], k, call.scale)  # (B, Hq, S, Lk)
        m = call.mask
        allowed = causal_mask(lq, lk, q.device)[rows][None, None] if m is None else _expand_heads(m[:, :, rows], hq)
        allowed = allowed.expand(b, hq, len(rows), lk)
        p = logits.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1) * allowed
        att = allowed.clone()
        if selection.kind != "dense":
            idx = selection.idx
            sel = torch.zeros(b, idx.shape[1], lk, dtype=torch.bool, device=q.device)
            sel.scatter_(2, idx, True)
            sel = _expand_heads(sel[:, :, None, :], hq)[:, :, 0]  # (B, Hq, Lk)
            att &= sel[:, :, None, :]
            if selection.kind == "rows":
                qpos = rows + (lk - lq)
                att &= sel[:, :, qpos][..., None]
            if self.keep_indices:
                self.last_selection[call.layer_idx] = idx.detach().cpu()
        mass = (p * att).sum(-1)  # (B, Hq, S)
        n_allowed = allowed.sum(-1)
        density = att.sum(-1).float() / n_allowed.clamp_min(1).float()
        live = (n_allowed > 0).float()  # padding query rows see nothing: leave them out of the means
        denom = live.sum((0, 2)).clamp_min(1)
        self.records.append(
            {
                "layer": call.layer_idx,
                "kind": call.kind,
                "q_len": lq,
                "k_len": lk,
                "selection": selection.kind,
                "density": ((density * live).sum((0, 2)) / denom).tolist(),
                "mass": ((mass * live).sum((0, 2)) / denom).tolist(),
            }
        )

    def summary(self) -> dict[int, dict[str, float]]:
        """Per layer: mean density and mass over heads and calls, and the number of calls."""
        acc: dict[int, list] = defaultdict(list)
        for r in self.records:
            acc[r["layer"]].append(r)
        out = {}
        for layer, recs in sorted(acc.items()):
            d = [sum(r["density"]) / len(r["density"]) for r in recs]
            mm = [sum(r["mass"]) / len(r["mass"]) for r in recs]
            out[layer] = {"density": sum(d) / len(d), "mass": sum(mm) / len(mm), "calls": len(recs)}
        return out

    def overall(self) -> dict[str, float]:
        """Mean density and mass over all layers that recorded something."""
        s = self.summary()
        if not s:
            return {"density": 1.0, "mass": 1.0}
        return {
            "density": sum(v["density"] for v in s.values()) / len(s),
            "mass": sum(v["mass"] for v in s.values()) / len(s),
        }
