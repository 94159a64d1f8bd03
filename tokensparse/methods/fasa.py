"""FASA: frequency-aware sparse attention — score keys with a few dominant RoPE frequency chunks,
attend exactly to the top keys.

Based on "FASA: Frequency-Aware Sparse Attention", ICLR 2026, https://arxiv.org/abs/2602.03152
(official code: github.com/AMAP-ML/FASA-ICLR2026, ``identify_important_fre.py`` and
``monkey_patch/frequency/``).

A *frequency chunk* (FC) is a pair of query/key dimensions. Offline (``tokensparse calibrate
--method fasa``, a profile of kind ``fasa_fc`` keyed by the model's fingerprint), the last
``calib_queries`` queries of a text prefill play the decode queries: for every layer, query head
and FC, the profile stores how much the top-``k`` keys by that FC's partial dot product agree with
the top-``k`` keys by the full dot product (``|top_k(full) ∩ top_k(FC)| / k``, averaged over the
queries), for k in :data:`PROFILE_BUDGETS` and for both pairings of dimensions: ``rotate_half``
(``(i, i + D/2)``, the true RoPE rotation planes of HF Llama/Qwen/Mistral) and ``adjacent``
(``(2c, 2c + 1)``, the official code's indexing). At decode time each KV head scores every key with
its ``chunks`` FCs of highest agreement (the profile's slice for the budget nearest to the
runtime budget, averaged over the KV head's query group), reading a contiguous copy of those key
dimensions the cache keeps on write (:class:`KeyDims`: ``2·chunks / D`` of the key bytes); the
``budget`` keys with the highest scores (the current token always among them) are attended
exactly with full-dimension keys. Layer 0 runs dense (the paper's ``layer_control``); so do the
prefill and chunks.

Parameters
----------
budget: int | float = 1024
    Keys attended per decode step, the current token included (the paper: 256 on LongBench with
    128-dim heads, 1000–1500 for long reasoning); a float in (0, 1] is a share of each row's real
    tokens.
chunks: int = 8
    FCs per KV head (the paper: 16 of 64 at head dim 128, i.e. a quarter of the dimensions; 8 of
    32 is a quarter at SmolLM2's head dim 64). On SmolLM2 the ranking, not the budget, is what
    loses answers: at 25 % of a 2K context all 32 FCs (the exact top-k) answer as dense does, 8
    lose 19 points, 16 lose 5.5 (heads combined by their softmaxes, the earlier ``head_scale``);
    held out at 4K/8K 16 FCs lose the same answers as 8
    (docs/results/decode_suite/README.md, "FASA").
layout: str = "rotate_half"
    How dimensions pair into FCs: ``rotate_half`` or ``adjacent`` (see above).
fcs: str = "profile"
    Where the FCs come from: ``profile`` (the calibrated agreement: ``profile=``, else the shipped or
    cached profile; a model with neither gets the lowest frequencies with a warning, recorded in
    ``session.info["fasa_fcs"]``), or data-free ``low`` / ``high`` (the lowest / highest RoPE
    frequencies).
dense_layers: int = 1
    The first layers run dense.
gqa_reduce: str = "max"
    How a KV head's query group combines its heads' partial scores (on the scale ``head_scale`` puts
    them).
pool_kernel: int = 1
    Beyond the paper: max-pool the partial scores over this many neighbouring keys before the
    top-k, so the rest of a span being read ranks with its best key (see Recycled Attention's
    ``pool_kernel``). Not used when FASA is another method's scorer (``key_scores``). Measured
    worse on SmolLM2 (7 / 15: −24 / −31 points against −19 unpooled at 25 % of 2K): pooling
    spends the budget on the neighbours of keys the partial scores rank wrongly.
rerank: int = 1
    Beyond the paper: the best ``rerank · (budget - 1)`` keys by the partial scores are scored again
    with their full-dimension keys (each query head's softmax over those candidates, combined by
    ``gqa_reduce``), and the best ``budget - 1`` of them are attended (1: off, the paper). Reads
    ``rerank · budget`` whole keys on top of the FC copy. Not used when FASA is another method's
    scorer. Measured on SmolLM2 (docs/results/decode_suite/README.md, "FASA with an exact
    re-rank"): 2 loses the same answers as the default held out at 4K/8K (more log-likelihood
    kept) and decodes slower than dense at 8K.
head_top: float = 0.0
    Beyond the per-KV-head combination: each query head first keeps its own ``⌊head_top · (budget
    - 1)⌋`` best keys by its partial logits (at most ``⌊(budget - 1) / G⌋``; the union over the
    group, so at most ``G · head_top`` of the budget), and the rest of the budget goes by the
    group-combined scores as before. At ``1 / G`` the whole budget is the union of each query
    head's own top, the nearest a per-KV-head selection gets to the paper's per-query-head top-k.
    0: off. A ranking rule only: a head's share does not depend on how its partial logits scale
    against its group's (the ``max`` of softmaxes lets a head with peaked partial scores take most
    of the budget). Not used when FASA is another method's scorer, nor with ``rerank``. Measured
    on SmolLM2 (docs/results/decode_suite/README.md, "FASA: each query head's own top first"):
    0.34 loses 7.6 points at 25 % of 2K and 6.0 at 4K against 19.0 and 11.9 with the softmaxes, but
    decodes no faster than dense at 8K on one CPU thread (nine top-ks per layer instead of three).
head_scale: str = "zscore"
    How each query head's partial logits are put on one scale before ``gqa_reduce`` combines the
    group: ``zscore`` (beyond the paper: each head's logits less their mean over the real keys, over
    their standard deviation) or ``softmax`` (the probabilities; the default until 2026-12-07). A
    z-score ranks a key by how far it stands out in its own head, so the group's max approximates
    the union of each head's own top (``head_top``) at the cost of one softmax, without nine
    top-ks; the softmax lets a head whose partial scores are peaked take most of the budget.
    Measured on SmolLM2 (docs/results/decode_suite/README.md, "FASA: z-scored heads"): against
    the softmax it loses 13.3 points at 25 % of 2K (not 19.0), 1.2 at 4K (1 win, 2 losses: within
    dense's noise, not 11.9) and the same one answer at 8K with 1 nat more answer log-likelihood
    kept, for the same cost (the default since 2026-12-07). It ranks the partial
    scores only: a re-rank (``rerank``) combines the exact scores' softmaxes.
profile: str | None = None
    An explicit profile file.

Deviations: the official code repeats K/V to the query heads and selects per query head; here one
FC set and one key set per KV head (the group's mean agreement chooses the FCs, the group's
partial scores are combined by ``gqa_reduce`` after standardising each head, ``head_scale``), so the cache holds
``Hkv`` heads and each selected row is read once per KV head. The profile is measured on the last
queries of one prefill (teacher-forced text) rather than on generated decode steps. The official
budget slices are 128…4096; the profile here stores 64, 256 and 1024 (short contexts of a small
model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..engine.cache import CacheState, row_buffer
from ..engine.calibration import Profile, find_kind_profile
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.observers import Observer, observe_prompt
from ..engine.pipeline import KeyPlan, everything, row_budgets
from ..engine.selection import GQA_REDUCTIONS, Selection, aggregate_gqa, mask_from_indices, select_topk

KIND = "fasa_fc"
KIND_VERSION = 1
#: agreement budgets (top-k sizes) stored in a profile
PROFILE_BUDGETS = (64, 256, 1024)
LAYOUTS = ("rotate_half", "adjacent")


def fc_dims(c: torch.Tensor, d: int, layout: str) -> torch.Tensor:
    """The two dimensions of FC indices ``c (…, n)`` → ``(…, 2n)`` (sorted per row)."""
    pair = torch.stack([c, c + d // 2], -1) if layout == "rotate_half" else torch.stack([2 * c, 2 * c + 1], -1)
    return pair.flatten(-2).sort(-1).values


class _Agreement(Observer):
    """Per (layer, query head, FC): top-k agreement of the FC's partial logits with the full ones,
    over the last ``w`` queries of a prefill (each sees the keys up to its own position)."""

    def __init__(self, w: int):
        self.w = w
        self.scores: dict[int, dict[str, torch.Tensor]] = {}  # layer -> layout -> (n_budgets, Hq, D/2)

    def on_call(self, call) -> None:
        if call.past_len:
            return
        n, w = call.k_len, min(self.w, call.k_len - 1)
        q = call.query[0, :, n - w :].float()  # (Hq, w, D)
        k = call.key[0].float().repeat_interleave(call.group, 0)  # (Hq, n, D)
        hq, _, d = q.shape
        pos = torch.arange(n)
        future = pos[None, :] > torch.arange(n - w, n)[:, None]  # (w, n)
        full = (q @ k.transpose(-1, -2)).masked_fill(future, float("-inf"))  # (Hq, w, n)
        out = {}
        for layout in LAYOUTS:
            c = torch.arange(d // 2)
            dims = fc_dims(c[:, None], d, layout)  # (D/2, 2)
            qc = q[:, :, dims]  # (Hq, w, D/2, 2)
            kc = k[:, :, dims]  # (Hq, n, D/2, 2)
            part = torch.einsum("hwcx,hncx->hcwn", qc, kc).masked_fill(future, float("-inf"))  # (Hq, D/2, w, n)
            agree = torch.zeros(len(PROFILE_BUDGETS), hq, d // 2)
            for bi, budget in enumerate(PROFILE_BUDGETS):
                kk = min(budget, n - w)  # every query sees at least n - w keys
                ref = torch.zeros(hq, w, n, dtype=torch.bool)
                ref.scatter_(-1, select_topk(full, kk)[0], True)
                got = torch.zeros(hq, d // 2, w, n, dtype=torch.bool)
                got.scatter_(-1, select_topk(part, kk)[0], True)
                agree[bi] = (got & ref[:, None]).sum(-1).float().mean(-1) / kk
            out[layout] = agree
        self.scores[call.layer_idx] = out


def measure_agreement(model, input_ids: torch.Tensor, queries: int = 32) -> dict:
    """The ``fasa_fc`` payload: agreement ``[layout][budget][layer][query head][FC]``."""
    obs = _Agreement(queries)
    observe_prompt(model, input_ids, obs)
    layers = sorted(obs.scores)
    return {
        "tokens": int(input_ids.shape[1]), "queries": queries, "budgets": list(PROFILE_BUDGETS),
        "agreement": {lay: [[obs.scores[i][lay][b].double().round(decimals=4).tolist() for i in layers]
                            for b in range(len(PROFILE_BUDGETS))] for lay in LAYOUTS},
    }


class KeyDims(CacheState):
    """A contiguous copy of some key dimensions per KV head (``dims (Hkv, m)``), kept on write in
    the cache dtype, laid out ``(B, Hkv, m, capacity)`` (transposed: the scorer's matmul reads it
    as is; a ``(…, n, m)`` buffer made it copy the rows on every step, 1.3 against 0.55 ms per layer
    at 32K, 3 KV heads, 16 dims, 1 thread). :attr:`values` is ``(B, Hkv, n, m)`` (a view);
    :attr:`transposed` the ``(B, Hkv, m, n)`` view. Eviction is refused (FASA reads a full cache)."""

    def __init__(self, dims: torch.Tensor):
        self.dims = dims
        self.buf: torch.Tensor | None = None
        self.n = 0

    def on_write(self, layer, start, end):
        b, h = layer._kbuf.shape[:2]
        m = self.dims.shape[-1]
        self.buf = row_buffer(self.buf, layer, self.n, (m,), rows_last=True)
        dims = self.dims.to(layer.device)
        rows = layer.keys[:, :, start:end]  # (B, Hkv, r, D)
        picked = rows.gather(-1, dims[None, :, None, :].expand(b, h, end - start, m))  # (B, Hkv, r, m)
        self.buf[:, :, :, start:end] = picked.transpose(-1, -2)
        self.n = end

    def on_crop(self, layer):
        self.n = layer.n

    def on_keep(self, layer, idx, valid):
        raise NotImplementedError("FASA's key-dimension copy needs a full cache; it cannot run on an evicting cache")

    def map_batch(self, fn) -> None:
        if self.buf is not None:
            self.buf = fn(self.buf)

    @property
    def transposed(self) -> torch.Tensor:
        return self.buf[..., : self.n]

    @property
    def values(self) -> torch.Tensor:
        return self.transposed.transpose(-1, -2)


@dataclass(eq=False)
class FASA(Method):
    name = "fasa"
    phase = Phase.DECODE
    dense_prefill = True
    schedule = "every decode step, layers from dense_layers"
    kv_memory = "full cache (+2·chunks dims of K per row)"
    calibration = "an offline dominant-frequency-chunk profile (or data-free low/high frequencies)"
    paper = "[FASA](https://arxiv.org/abs/2602.03152)"
    needs_cache_state = True
    profile_kind = KIND
    profile_version = KIND_VERSION

    budget: int | float = param(1024, "budget")
    chunks: int = param(8, "int", ge=1)
    layout: str = param("rotate_half", "choice", choices=LAYOUTS)
    fcs: str = param("profile", "choice", choices=("profile", "low", "high"))
    dense_layers: int = param(1, "int", ge=0)
    gqa_reduce: str = param("max", "choice", choices=GQA_REDUCTIONS)
    pool_kernel: int = param(1, "int", ge=1, added=True)
    rerank: int = param(1, "int", ge=1, added=True)
    head_top: float = param(0.0, "float", ge=0.0, le=1.0, added=True)
    head_scale: str = param("zscore", "choice", choices=("softmax", "zscore"))  # in every row key (its default changed)
    profile: str | None = param(None, "path", optional=True)

    def validate(self) -> None:
        if isinstance(self.budget, int) and self.budget < 2:
            raise ValueError(f"fasa: budget ({self.budget}) must hold the current token and at least one other")
        if self.head_top and self.rerank > 1:
            raise ValueError("fasa: head_top and rerank are two rankings of the same budget; use one of them")

    @classmethod
    def at_full_budget(cls) -> "FASA":
        return cls(budget=1.0, chunks=1, fcs="low", dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "FASA":
        return cls(budget=6, chunks=1, fcs="low", dense_layers=0)

    @classmethod
    def calibrate(cls, model, input_ids) -> dict:
        return measure_agreement(model, input_ids)

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        agree = torch.tensor(payload["agreement"]["rotate_half"][-1])  # (layers, Hq, D/2) at the largest budget
        best = select_topk(agree.mean((0, 1))[None], min(4, agree.shape[-1]))[0][0].tolist()
        return (f"agreement measured on {payload['queries']} queries of {payload['tokens']} tokens; FCs agreeing most "
                f"on average (rotate_half): {best}")

    # ---- setup: the FCs of every (layer, KV head) ---------------------------------------------------
    def setup(self, session) -> None:
        cfg = session.model.config.get_text_config(decoder=True)
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
        n = session.num_layers
        if self.chunks > d // 2:
            raise ValueError(f"fasa: chunks ({self.chunks}) exceeds the {d // 2} frequency chunks of head dim {d}")
        fcs = self.fcs
        path = self.profile or (find_kind_profile(session.model, KIND) if fcs == "profile" else None)
        if fcs == "profile" and path is None:
            warnings.warn("fasa: no frequency-chunk profile for this model; using the data-free lowest frequencies "
                          "(fcs='low'). Run `tokensparse calibrate --method fasa` to measure one.", stacklevel=4)
            fcs = "low"
        session.info["fasa_fcs"] = fcs
        if fcs == "profile":
            prof = Profile.load(path, KIND, KIND_VERSION)
            prof.check(session.model)
            payload = prof.payload
            budgets = payload["budgets"]
            want = self.budget if isinstance(self.budget, int) else 256
            slot = min(range(len(budgets)), key=lambda i: abs(budgets[i] - want))
            agree = torch.tensor(payload["agreement"][self.layout][slot])  # (layers, Hq, D/2)
            if agree.shape != (n, hq, d // 2):
                raise ValueError(f"fasa: profile {path} has shape {tuple(agree.shape)}, the model needs {(n, hq, d // 2)}")
            per_kv = agree.view(n, hkv, hq // hkv, d // 2).mean(2)
            chosen, _ = select_topk(per_kv, self.chunks)  # (layers, Hkv, chunks)
            session.info["fasa_profile"] = str(path)
        else:
            # dimension j rotates at frequency index j mod D/2 (the frequency falls as the index grows):
            # rank FCs by the mean index of their two dimensions
            fc = fc_dims(torch.arange(d // 2)[:, None], d, self.layout)  # (D/2, 2)
            index = (fc % (d // 2)).double().mean(-1)
            chosen, _ = select_topk((index if fcs == "low" else -index)[None], self.chunks)
            chosen = chosen[0].expand(n, hkv, self.chunks)
        session.state["fasa_dims"] = fc_dims(chosen, d, self.layout)  # (layers, Hkv, 2·chunks)
        session.info["fasa_key_share"] = 2 * self.chunks / d

    # ---- decode ------------------------------------------------------------------------------------
    def key_scores(self, call) -> torch.Tensor | None:
        """``(B, Hkv, Lk)``: the partial (FC) logits, each query head put on one scale (``head_scale``)
        and combined over its group (``gqa_reduce``), ``-inf`` on padding."""
        logits = self._partial_logits(call)
        if logits is None:
            return None
        keep = None if call.key_valid is None else call.key_valid[:, None, :]
        return self._group_weights(logits, keep)

    def _partial_logits(self, call) -> torch.Tensor | None:
        """``(B, Hkv, G, Lk)`` fp32: each query head's logits over the FC dimensions of the keys."""
        layer = call.require_cache(self.name)
        if layer is None:
            return None
        dims = call.session.state["fasa_dims"][call.layer_idx]  # (Hkv, m)
        st = layer.state(f"fasa.dims.{self.layout}.{self.chunks}.{self.fcs}", lambda: KeyDims(dims))
        kd_t = st.transposed  # (B, Hkv, m, Lk)
        b, hq, _, d = call.query.shape
        hkv, g = call.n_kv_heads, call.group
        q = call.query[:, :, -1].reshape(b, hkv, g, d)
        qd = q.gather(-1, dims.to(q.device)[None, :, None, :].expand(b, hkv, g, dims.shape[-1]))  # (B, Hkv, G, m)
        logits = (qd.to(kd_t.dtype) @ kd_t).float() * call.scale  # (B, Hkv, G, Lk)
        call.session.count("fasa_scored_dims", dims.shape[-1] * call.k_len)
        call.session.count("fasa_key_dims", d * call.k_len)
        return logits

    def _group_weights(self, logits: torch.Tensor, keep: torch.Tensor | None, scale: str | None = None) -> torch.Tensor:
        """``logits (B, Hkv, G, L)`` → ``(B, Hkv, L)``: each query head's softmax or z-score
        (``scale``, default ``head_scale``), combined over its group by ``gqa_reduce``; ``-inf``
        where ``keep (B, 1 | Hkv, L)`` is False (a row with nothing kept has NaN before that)."""
        if (scale or self.head_scale) == "zscore":
            per_head = _zscore(logits, None if keep is None else keep[:, :, None, :])
        else:
            if keep is not None:
                logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
            per_head = logits.softmax(-1)
        w = aggregate_gqa(per_head.flatten(1, 2), logits.shape[1], self.gqa_reduce)
        return w if keep is None else w.masked_fill(~keep, float("-inf"))

    def select(self, call) -> Selection | None:
        if call.kind != "decode" or call.layer_idx < self.dense_layers:
            return None
        if call.require_cache(self.name) is None:
            return None
        plan = KeyPlan(call, window=1)  # the current token is always attended
        n_top, host = row_budgets(call, self.budget, -1)  # host counts where known: no device read
        if plan.covers(n_top if host is None else host):
            return everything(call, "keys")
        logits = self._partial_logits(call)
        keep = None if call.key_valid is None else call.key_valid[:, None, :]
        scores = plan.pooled(self._group_weights(logits, keep)[..., plan.lo : plan.hi], self.pool_kernel).contiguous()
        if self.head_top:
            scores = self._with_head_tops(call, plan, logits[..., plan.lo : plan.hi], scores, n_top, host)
        top = self._reranked(call, plan, scores, n_top, host) if self.rerank > 1 else plan.top(scores, n_top, host)
        return plan.selection(*top, kind="keys", taken=plan.host_counts(n_top if host is None else host))

    def _with_head_tops(self, call, plan: KeyPlan, logits: torch.Tensor, scores: torch.Tensor, n_top,
                        host: list[int] | None) -> torch.Tensor:
        """``scores (B, Hkv, n)`` with ``+inf`` on each query head's own best ``⌊head_top · n_top⌋``
        candidates by its partial ``logits (B, Hkv, G, n)``: :meth:`KeyPlan.top` then takes their
        union first (at most ``G · head_top · n_top <= n_top`` keys per row, ties to the earlier
        position), and fills the rest of its budget by ``scores``."""
        b, hkv, g, n = logits.shape
        if plan.cand_mask is not None:
            logits = logits.masked_fill(~plan.cand_mask[:, None, None, :], float("-inf"))
        per_row = plan.host_counts(n_top if host is None else host)  # each row's take, clamped to its candidates

        def own_on_device():  # the same per-row counts computed on the device (double, as Python's float)
            take = plan.counts(n_top)  # (B, 1): FASA's budget is per row
            return torch.minimum((take.double() * self.head_top).floor().long(), take // g).view(b, 1, 1)

        if per_row is not None:  # widths from the host: no read
            own = [min(int(self.head_top * c), c // g) for c in per_row]
            width, counts = max(own), (None if len(set(own)) == 1 else own_on_device())
        else:  # counts known on the device only: one read for the width
            counts = own_on_device()
            width = int(counts.max())
        if width == 0:
            return scores
        top, valid = select_topk(logits.reshape(b, hkv * g, n), width, counts)  # (B, Hq, width)
        marked = mask_from_indices(top, n, valid).view(b, hkv, g, n).any(2)
        return scores.masked_fill(marked, float("inf"))

    def _reranked(self, call, plan: KeyPlan, scores: torch.Tensor, n_top, host: list[int] | None):
        """:meth:`KeyPlan.top` of ``n_top`` after a re-rank: the best ``rerank · n_top`` candidates by
        ``scores`` are ranked again by the group-combined softmax of their exact ``q·k`` (over those
        candidates), ties to the earlier position as there."""
        wide_host = None if host is None else [n * self.rerank for n in host]
        wide, wide_valid = plan.top(scores, n_top * self.rerank, wide_host)  # (B, Hkv, k2), ascending positions
        b, hq, _, d = call.query.shape
        hkv, g = call.n_kv_heads, call.group
        keys = call.key.gather(2, wide[..., None].expand(*wide.shape, d))  # (B, Hkv, k2, D)
        q = call.query[:, :, -1].reshape(b, hkv, g, d)
        logits = (q.to(keys.dtype) @ keys.transpose(-1, -2)).float() * call.scale  # (B, Hkv, G, k2)
        w = self._group_weights(logits, wide_valid, "softmax")  # (B, Hkv, k2)
        call.session.count("fasa_rescored_dims", d * wide.shape[-1])
        return plan.top_of(wide, wide_valid, w, n_top, host)


def _zscore(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` less its mean over the last axis, over its (population) standard deviation, both over
    the entries ``keep`` (broadcastable bool, ``None``: all) marks; a constant row gives 0."""
    if keep is None:
        mean = x.mean(-1, keepdim=True)
        dev = x - mean
        sd = dev.square().mean(-1, keepdim=True).sqrt()
    else:
        w = keep.to(x.dtype)
        n = w.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (x * w).sum(-1, keepdim=True) / n
        dev = x - mean
        sd = (dev.square() * w).sum(-1, keepdim=True).div(n).sqrt()
    return dev / sd.clamp_min(1e-12)
