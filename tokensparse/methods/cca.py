"""CCA-Attention (Core Context Aware), training-free: a local window plus one pooled "core" token per group.

Based on Chen, You, Zhang et al., "Core Context Aware Transformers" (ICML 2025),
https://arxiv.org/abs/2412.12465 (official code: github.com/chenyaofo/CCA-Attention,
``codebase/core/cca_attn.py``, ``cca_pooling.py``); ``/work/shared/methods/prefill.md`` §2.

Per routed layer of a prefill, on post-RoPE queries and keys, with group size ``g`` (``group``) and
local window ``w`` (``window``):

* the prompt is cut into groups of ``g`` tokens from its first real token; group ``j`` (0-based,
  tokens ``[j·g, (j+1)·g)``) becomes one **core token** ``k̃_j = Σ_i α_{j,i} k_i``,
  ``ṽ_j = Σ_i α_{j,i} v_i``, with ``α_j = softmax_i(logit(q_{last(j)}, k_i))`` over the group, the
  probe ``q_{last(j)}`` being the query of the group's last token and ``logit`` the model's
  attention logit (``scale · q·k``, soft-capped where the model caps);
* the query at 1-based position ``t`` reads, in **one joint softmax**, the core tokens
  ``j ≤ ⌊(t − w)/g⌋`` (1-based ``j``; none while ``t ≤ w``) and the raw keys ``(t − w_t, t]`` with
  ``w_t = w + ((t − w) mod g)``. Every earlier token is covered exactly once: by its core token
  (groups that end at least ``w`` tokens before the query) or by the raw window (between ``w`` and
  ``w + g − 1`` tokens, the query's own included). A group's probe precedes every query that reads
  its core token, so the rule is causal.

Two implementations, tested equal (``tests/test_cca.py``):

* ``impl="reference"``: the paper's formulation in plain PyTorch, float64: core tokens built group
  by group, an explicit boolean mask over the ``[m core ; L raw]`` key axis written from the 1-based
  rule above, one softmax. Quadratic memory: small prompts only.
* ``impl="fast"``: the core tokens in one batched pass, then
  :func:`~tokensparse.engine.blocks.band_attend`: chunks of query rows, each reading only its raw
  band and the core tokens it may see, masked per row, one fp32 softmax over both — ``O(L·(w + g +
  L/g))`` instead of ``O(L²)``. The window boundary is exact (per query, group-aligned), not rounded
  to a block grid.

Telemetry and the session's statistics observe the raw keys as a ``"blocks"`` selection on the
group grid (block = ``g``): query group ``i`` lists key groups ``[n, i]``, ``n`` the core tokens its
first query reads (so a query may be counted with up to ``g − 1`` raw keys more than it reads); the
core tokens themselves are not keys of the call and are not counted. Its ``mass``/``error`` are
those of attention renormalised over the raw window alone, not of the CCA output.

Parameters
----------
group: int = 16
    Tokens per group (the paper's ``pooling_size``, default 16).
window: int = 1024
    Local window ``w`` in tokens (the paper's ``window_size``, default 1024 in
    ``replace_attn_forward``); a query reads between ``w`` and ``w + g − 1`` raw tokens.
probe: str = "query_head"
    GQA. ``"query_head"`` (the paper: K/V are repeated to the query heads before pooling): each
    query head pools with its own probe, so core K/V are per query head (``Hq · L/g`` rows);
    ``"kv_head"``: one set of weights per KV head from the mean of its query heads' probe logits, so
    core K/V are per KV head (``Hkv · L/g`` rows, shared like the raw K/V).
dense_layers: int = 2
    The first layers run dense.
dense_tail: int = 128
    Query groups holding the prompt's last ``dense_tail`` tokens read every earlier token raw (no
    core tokens): from group ``⌊(L − dense_tail)/g⌋`` on.
impl: str = "fast"
    ``"fast"`` or ``"reference"`` (above).

Deviations. Training-free: the paper replaces the attention of a pretrained model and then
fine-tunes it (its abstract: "minimal fine-tuning cost"; the released models are fine-tuned);
here the module is swapped into a model trained with dense attention, unchanged. Core keys are
α-weighted means of RoPE-rotated keys from ``g`` different positions, so their position is blurred;
a dense-trained model was never taught to read them. ``dense_layers`` and ``dense_tail`` are not in
the paper (it routes every layer and every query): as for BiFormer, HiP and XAttention on SmolLM2,
the first layers and the prompt's last positions (which produce the first generated token) run
dense; ``dense_tail=0, dense_layers=0`` is the paper's rule. The Qwen2 variant of the official code
rounds the number of core groups down to a multiple of 64 in prefill; not done here (the Llama
variant's rule). GQA: ``probe="kv_head"`` is an option the paper does not have. The α logits use
the model's attention logit, soft-cap included (the paper's models have none). The Triton kernel,
the compressed decode cache (core K/V plus the last ``w + g`` raw tokens) and the ``mean``/``max``
pooling functions are not built: prefill only — decode steps and chunks on a cache run dense over
the full cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.blocks import band_attend, n_blocks, prefill_blocksets, row_starts
from ..engine.config import param
from ..engine.executors import active_softcap
from ..engine.method import Method, Phase
from ..engine.pipeline import execute, record_sparse, sparse_paths_forced


def _logit(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The model's attention logit of unscaled dot products ``x`` (scale, then the active soft-cap)."""
    x = x * scale
    cap = active_softcap()
    return x if cap is None else torch.tanh(x / cap) * cap


def core_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, m: int, scale: float,
                probe: str = "query_head") -> tuple[torch.Tensor, torch.Tensor]:
    """The core keys and values ``(B, Hc, m, D)`` fp32 of the first ``m`` groups of ``group`` tokens
    of an unpadded prefill ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)`` (``m · group <= L``):
    ``Hc = Hq`` for ``probe="query_head"``, ``Hkv`` for ``"kv_head"`` (see the module doc)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    gq = hq // hkv
    probes = q[:, :, group - 1 : m * group : group].float().reshape(b, hkv, gq, m, d)  # last query of each group
    kg = k[:, :, : m * group].float().reshape(b, hkv, m, group, d)
    vg = v[:, :, : m * group].float().reshape(b, hkv, m, group, v.shape[-1])
    logits = _logit(torch.einsum("bhgmd,bhmkd->bhgmk", probes, kg), scale)  # (B, Hkv, G, m, g)
    if probe == "kv_head":
        logits = logits.mean(2, keepdim=True)
    alpha = torch.softmax(logits, dim=-1)
    kc = torch.einsum("bhgmk,bhmkd->bhgmd", alpha, kg)
    vc = torch.einsum("bhgmk,bhmkd->bhgmd", alpha, vg)
    heads = hq if probe == "query_head" else hkv
    return kc.reshape(b, heads, m, d), vc.reshape(b, heads, m, -1)


@dataclass(eq=False)
class CCAttention(Method):
    name = "cca"
    phase = Phase.PREFILL
    schedule = "prefill, every layer after the first dense_layers"
    kv_memory = "full cache"
    paper = "[CCA-Attention](https://arxiv.org/abs/2412.12465)"

    group: int = param(16, "int", ge=1)
    window: int = param(1024, "int", ge=1)
    probe: str = param("query_head", "choice", choices=("query_head", "kv_head"))
    dense_layers: int = param(2, "int", ge=0)
    dense_tail: int = param(128, "int", ge=0)
    impl: str = param("fast", "choice", choices=("fast", "reference"))

    @classmethod
    def at_full_budget(cls) -> "CCAttention":
        return cls(group=4, window=1 << 20, dense_layers=0)

    @classmethod
    def at_sparse_budget(cls) -> "CCAttention":
        return cls(group=2, window=4, dense_layers=0, dense_tail=0)

    # ---- the rule ------------------------------------------------------------------------------------

    def visible_groups(self, length: int, device=None) -> torch.Tensor:
        """``(L,)`` long: the core tokens each query of an unpadded ``length``-token prompt reads,
        ``max(0, ⌊(p + 1 − w)/g⌋)`` at 0-based position ``p`` (0 in the dense tail); it reads the raw
        keys from ``g ·`` that count to itself."""
        g = self.group
        pos = torch.arange(length, device=device)
        n = torch.div(pos + 1 - self.window, g, rounding_mode="floor").clamp_min(0)
        if self.dense_tail:
            n = n.masked_fill(pos // g >= (length - self.dense_tail) // g, 0)
        return n

    def raw_groups(self, length: int) -> tuple[torch.Tensor, bool]:
        """The raw keys each query group reads, as key groups on the group grid: ``(set (1, 1, nb,
        nb) bool, complete)`` for an unpadded ``length``-token prompt (``nb = ⌈L / g⌉``; query group
        ``i`` lists groups ``[n, i]``, ``n`` the core tokens of its first query)."""
        g = self.group
        nb = n_blocks(length, g)
        n = self.visible_groups(length)
        first = n[::g]  # (nb,): the first query of each query group
        kj = torch.arange(nb)[None, :]
        qi = torch.arange(nb)[:, None]
        sets = (kj >= first[:, None]) & (kj <= qi)
        return sets[None, None], not bool(n.any())

    # ---- hooks ---------------------------------------------------------------------------------------

    def select(self, call):
        """The raw keys read (a ``"blocks"`` selection on the group grid, for telemetry and counts);
        ``None`` on calls left dense (decode, chunks, the first ``dense_layers``)."""
        if call.kind != "prefill" or call.layer_idx < self.dense_layers:
            return None

        def choose(q, k):
            sets, complete = self.raw_groups(q.shape[2])
            return sets.to(q.device).expand(q.shape[0], -1, -1, -1), complete

        return prefill_blocksets(call, 1, self.group, choose)

    def forward(self, call) -> torch.Tensor:
        with call.session.selecting():
            sel = self.select(call)
        return self.attend(call, sel)

    def attend(self, call, sel) -> torch.Tensor:
        """Attention output of ``call`` given :meth:`select`'s ``sel``: dense when ``sel`` is ``None``
        or complete (unless the sparse paths are forced), else CCA attention."""
        if sel is None or (sel.complete and not sparse_paths_forced()):
            return execute(call, sel)
        record_sparse(call, sel)
        run = self.reference if self.impl == "reference" else self.fast
        return run(call.query, call.key, call.value, call.scale, call.key_valid)

    # ---- the fast path -------------------------------------------------------------------------------

    def fast(self, q, k, v, scale: float, key_valid=None) -> torch.Tensor:
        """CCA attention ``(B, Hq, L, Dv)`` of a causal prefill (each row of a left-padded batch on its
        real tokens; padding query rows output 0)."""
        b, _, length, _ = q.shape
        if key_valid is None:
            return self._fast_rows(q, k, v, scale)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        for r, start in enumerate(row_starts(key_valid, b)):
            if start < length:
                out[r : r + 1, :, start:] = self._fast_rows(q[r : r + 1, :, start:], k[r : r + 1, :, start:],
                                                            v[r : r + 1, :, start:], scale)
        return out

    def _fast_rows(self, q, k, v, scale: float) -> torch.Tensor:
        length = q.shape[2]
        n = self.visible_groups(length, q.device)
        m = int(n.max()) if length else 0
        pooled = core_tokens(q, k, v, self.group, m, scale, self.probe) if m else None
        return band_attend(q, k, v, n * self.group, scale, pooled=pooled, n_pooled=n if m else None)

    # ---- the reference -------------------------------------------------------------------------------

    def reference(self, q, k, v, scale: float, key_valid=None) -> torch.Tensor:
        """The same output from the paper's formulation, in float64: core tokens group by group and an
        explicit ``(L, m + L)`` mask written from the 1-based rule of the module doc."""
        b, hq, length, _ = q.shape
        hkv = k.shape[1]
        gq = hq // hkv
        g, w = self.group, self.window
        out = torch.zeros(b, hq, length, v.shape[-1], dtype=torch.float64, device=q.device)
        for r, start in enumerate(row_starts(key_valid, b)):
            big = length - start  # the row's real tokens
            if big <= 0:
                continue
            qr = q[r, :, start:].double()
            kr = k[r, :, start:].double().repeat_interleave(gq, 0)  # (Hq, L, D): K/V repeated to the query heads
            vr = v[r, :, start:].double().repeat_interleave(gq, 0)
            m = max(0, (big - w) // g)  # groups any query reads (pooling_len = L - w)
            kc = torch.zeros(hq, m, kr.shape[-1], dtype=torch.float64, device=q.device)
            vc = torch.zeros(hq, m, vr.shape[-1], dtype=torch.float64, device=q.device)
            for j in range(m):
                a, e = j * g, (j + 1) * g
                logits = _logit((qr[:, e - 1 : e] * kr[:, a:e]).sum(-1), scale)  # (Hq, g): the group's last query
                if self.probe == "kv_head":
                    logits = logits.view(hkv, gq, g).mean(1, keepdim=True).expand(hkv, gq, g).reshape(hq, g)
                alpha = torch.softmax(logits, dim=-1)
                kc[:, j] = (alpha[..., None] * kr[:, a:e]).sum(1)
                vc[:, j] = (alpha[..., None] * vr[:, a:e]).sum(1)
            mask = torch.zeros(big, m + big, dtype=torch.bool, device=q.device)
            tail = (big - self.dense_tail) // g if self.dense_tail else None
            for t in range(1, big + 1):  # 1-based query position
                if tail is not None and (t - 1) // g >= tail:
                    mask[t - 1, m : m + t] = True  # the dense tail: every raw key
                    continue
                if t > w:
                    nt = (t - w) // g
                    mask[t - 1, :nt] = True  # core tokens j = 1 … ⌊(t − w)/g⌋
                    wt = w + (t - w) - g * nt  # w_t = w + r_t
                else:
                    wt = t  # nothing pooled yet: the whole prefix is the window
                mask[t - 1, m + max(0, t - wt) : m + t] = True  # raw tokens (t − w_t, t], 0-based [t − w_t, t)
            keys = torch.cat([kc, kr], dim=1)
            vals = torch.cat([vc, vr], dim=1)
            s = _logit(qr @ keys.transpose(-1, -2), scale).masked_fill(~mask, float("-inf"))
            out[r, :, start:] = torch.softmax(s, dim=-1) @ vals
        return out.to(q.dtype)
