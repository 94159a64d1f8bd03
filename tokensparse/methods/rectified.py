"""Rectified SpaAttn: a block-sparse prefill corrected for the attention mass it dropped.

Based on Liu, Li, Zhang, Chen, Gu, "Rectified SpaAttn: Revisiting Attention Sparsity for
Efficient Video Generation", https://arxiv.org/abs/2511.19835 (official code:
github.com/BienLuky/Rectified-SpaAttn, ``rectified_spaattn/rectified_*_attn.py`` and
``gapr_mask.py``). Block-sparse attention renormalises each query's softmax over the blocks it
reads, which over-weights them by ``1 / (their share of the true mass)``, and drops the rest of
the mass altogether. The paper rescales the sparse output by an estimate of the kept share
(``R``, "IPAR") and adds the dropped blocks back from pooled keys and values (``C``), only for
blocks whose pooled estimate is worth more than its error ("GAPR"): ``O = R·O_sparse + C``.

Here that correction wraps any registered block-sparse prefill method (``base``: ``hip``,
``biformer``, ``xattention``; it chooses the blocks, unchanged) and is written in log space:

* the base's blocks are attended exactly, with their log-sum-exp ``lse_s``
  (:func:`~tokensparse.engine.blocks.block_attend` with ``return_lse``) — the *exact* mass of
  the kept blocks, where the paper estimates ``R`` from pooled scores too;
* every key block a query block does not read and that lies entirely before a query row (causal)
  is a group of keys estimated from its mean key and value, per query row: log-mass ``log n_j +
  scale·q·k̄_j``, numerator ``mass·v̄_j`` (:func:`~tokensparse.engine.blocks.pooled_attend`;
  exact when the block's keys are identical, a Jensen lower bound of the mass otherwise);
* the two partials are merged exactly through their log-sum-exps
  (:func:`~tokensparse.engine.blocks.merge_partials`), which is ``O = R·O_sparse + C`` with ``R``
  and ``C`` normalised by the sum of the exact kept mass and the estimated dropped mass.

GAPR (``gapr``): the paper compensates block ``j`` for query block ``i`` only when the pooled
score beats the pooling error bound, ``|q̄_i·k̄_j| > |mean|ΔQ_i|·k̄_j| + |q̄_i·mean|ΔK_j||``
(unscaled, times ``B_q·B_k`` on both sides). Per query row ``q`` is exact (``ΔQ = 0``); the
key term is replaced by its Cauchy–Schwarz form, so the test here is ``|q·k̄_j| > ‖q‖ ·
mean_s ‖k_s − k̄_j‖`` (a true bound of the mean logit error ``mean_s |q·k_s − q·k̄_j|``). The
paper's element-wise ``mean_s |k_s − k̄_j|`` is not invariant to RoPE: shifting every position
(a left-padded row against the same prompt alone) rotates ``q`` and the keys, keeps every ``q·k``
and the ``q·k̄`` but changes ``q·mean|Δk|``, so the padded row made other GAPR choices (measured on
the tiny test Llama: logits 5.3 apart); norms are rotation-invariant. ``"sparse"`` (the paper's choice): a block that
fails it adds its estimated mass to the sparse output's weight (the paper puts it into ``R``);
``"drop"``: it is dropped, as in the plain sparse output; ``"off"``: every dropped block is
compensated.

Parameters
----------
base: str = "xattention"
    The block-sparse prefill method that chooses the blocks.
base_config: dict | None = None
    The base's settings (``None``: its defaults), checked by the base at construction.
gapr: str = "off"
    ``"off"``, ``"sparse"`` or ``"drop"`` (above). Default ``"off"``: with the rotation-invariant
    bound the test rejects nearly every block on the models measured (the tiny test Llama: all of
    them, so ``"sparse"`` reproduced the base exactly), and a hard gain/error threshold makes the
    output jump with rounding; without it the correction is continuous in ``q, k, v``.
isolate: int = 4
    The first ``isolate`` real tokens are never pooled with the rest of their block: when their
    block is dropped each is estimated on its own, which is exact (a group of one key). The 1-D
    analogue of the paper's "isolated pooling" (text and visual tokens pooled apart): an attention
    sink's outlier key would otherwise dominate its block's mean. At most the first block.
impl: str = "fast"
    ``"fast"``: the base's block executor plus pooled estimates at the block grid;
    ``"reference"``: a plain-PyTorch token-level oracle (dense logits, the selection's token mask,
    block means taken token by token; quadratic memory) that the fast path is tested against.

Deviations. The paper is for bidirectional video DiTs with its own critical-block choice
(cumulative pooled probability ``p`` plus neighbours); here the base chooses the blocks, and the
correction is causal: only blocks entirely before a query row are compensated (a dropped block the
row sees partly — a dropped diagonal — is dropped). ``R`` and ``C`` are computed per query row
rather than per query block (one row against ``nKB`` pooled keys: ``1/block`` of the dense logits;
processed in chunks of rows), with the kept mass exact. The key bias of a base, if it had one,
is not estimated: such a call runs the base unrectified. Telemetry observes the base's selection
(its kept mass and the error of the *unrectified* sparse output). Decode steps and chunks on a
cache run as the base runs them (dense). A compiled FlexAttention base executor returns no
log-sum-exp on CPU; there the base's ``impl="flex"`` runs the ``"auto"`` executor.

Measured (``docs/results/prefill_family/rectified.md``): on SmolLM2 the layer output error
against dense falls by 7–10 % over BiFormer and XAttention selections, but the 4K pass key does
not improve (XAttention τ=0.8: 5/6 either way; BiFormer without dense tail: 3/6 → 2/6): block
means add the haystack back as an average, which does not help retrieval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.blocks import (block_attend, merge_partials, n_blocks, pool_segments, pooled_attend, pooled_scores,
                             selection_rows, token_mask)
from ..engine.config import composed, param
from ..engine.executors import active_softcap
from ..engine.method import Method, Phase
from ..engine.pipeline import execute, record_sparse, sparse_paths_forced

#: registered prefill methods whose selections are ``"blocks"`` on the prompt's block grid
BASES = ("biformer", "hip", "xattention")

ESTIMATE_CHUNK_ELEMS = 1 << 22
"""Pooled scores per chunk of query rows (16 MiB of fp32 per score tensor)."""


def segment_ranges(length: int, block: int, isolate: int) -> list[tuple[int, int]]:
    """The key groups of an unpadded ``length``-token prompt on a ``block`` grid: the first
    ``min(isolate, block, length)`` tokens one by one, the rest of block 0, then every later block
    (the last may be partial); ``[(start, end)]``, ascending, none empty."""
    first = min(block, length)
    iso = min(isolate, first)
    ranges = [(t, t + 1) for t in range(iso)]
    if iso < first:
        ranges.append((iso, first))
    ranges += [(j * block, min((j + 1) * block, length)) for j in range(1, n_blocks(length, block))]
    return ranges


@dataclass(eq=False)
class RectifiedSpaAttn(Method):
    name = "rectified"
    phase = Phase.PREFILL
    schedule = "prefill, where the base method is sparse"
    kv_memory = "full cache"
    paper = "[Rectified SpaAttn](https://arxiv.org/abs/2511.19835)"

    base: str = param("xattention", "choice", choices=BASES)
    base_config: dict | None = param(None, "mapping", optional=True)
    gapr: str = param("off", "choice", choices=("off", "sparse", "drop"))
    isolate: int = param(4, "int", ge=0)
    impl: str = param("fast", "choice", choices=("fast", "reference"))

    def validate(self) -> None:
        from . import get

        self.base_method = composed("rectified", "base_config", get(self.base), self.base_config)

    @classmethod
    def _with_base(cls, base_method: Method, **kw) -> "RectifiedSpaAttn":
        settings = {k: v for k, v in base_method.config_dict().items() if k != "method"}
        return cls(base=base_method.name, base_config=settings, **kw)

    @classmethod
    def at_full_budget(cls) -> "RectifiedSpaAttn":
        from . import get

        return cls._with_base(get("xattention").at_full_budget())

    @classmethod
    def at_sparse_budget(cls) -> "RectifiedSpaAttn":
        from . import get

        return cls._with_base(get("biformer").at_sparse_budget(), isolate=1)

    @property
    def needs_cache_state(self) -> bool:
        return self.base_method.needs_cache_state

    def setup(self, session) -> None:
        self.base_method.setup(session)

    def on_forward_start(self, session) -> None:
        self.base_method.on_forward_start(session)

    def select(self, call):
        return self.base_method.select(call)

    def forward(self, call) -> torch.Tensor:
        """The base's selection, attended exactly, merged with the pooled estimate of the blocks it
        dropped; every call the base leaves dense (or biases) runs as the base runs it."""
        with call.session.selecting():
            sel = self.base_method.select(call)
        return self.attend(call, sel)

    def attend(self, call, sel) -> torch.Tensor:
        """Attention output of ``call`` under the base's selection ``sel`` (``None``: dense), rectified
        where ``sel`` is a sparse ``"blocks"`` selection of a prefill (what :meth:`forward` runs after
        selecting; ``tokensparse bench attention`` times it as the method's executor)."""
        base = self.base_method
        bias = base.key_bias(call)
        impl = getattr(base, "impl", "fast")
        if impl == "flex" and call.query.device.type == "cpu":
            impl = "auto"  # no log-sum-exp from compiled FlexAttention on CPU
        plain = (sel is None or sel.kind != "blocks" or bias is not None or call.kind != "prefill"
                 or (sel.complete and not sparse_paths_forced()))
        if plain:
            return execute(call, sel, impl=impl, bias=bias)
        record_sparse(call, sel)
        if self.impl == "reference":
            return self.reference(call.query, call.key, call.value, sel, call.scale, call.key_valid)
        return self.rectify(call.query, call.key, call.value, sel, call.scale, call.key_valid, impl)

    # ---- the fast path ---------------------------------------------------------------------------------

    def rectify(self, q, k, v, sel, scale: float, key_valid=None, impl: str = "auto") -> torch.Tensor:
        """Rectified attention ``(B, Hq, Lq, Dv)`` of a causal prefill ``q, k, v`` under the
        ``"blocks"`` selection ``sel`` (square blocks on each row's real tokens, as the bases give)."""
        out_s, lse_s = block_attend(q, k, v, sel, scale, key_valid=key_valid, impl=impl, return_lse=True)
        b, hq, lq, _ = q.shape
        lse_n = torch.full_like(lse_s, float("-inf"))  # no-gain blocks: their mass goes to the sparse output
        lse_c = torch.full_like(lse_s, float("-inf"))
        out_c = torch.zeros(b, hq, lq, v.shape[-1], device=q.device)
        for r, k0, q0, sets in selection_rows(sel, lq, k.shape[2], key_valid):
            rows = slice(q0, lq)
            out_c[r : r + 1, :, rows], lse_c[r : r + 1, :, rows], lse_n[r : r + 1, :, rows] = self._estimate(
                q[r : r + 1, :, q0:], k[r : r + 1, :, k0:], v[r : r + 1, :, k0:], sets, sel.block_q, sel.block_k, scale)
        if self.gapr == "sparse":  # (a row that read nothing has no sparse output to give the mass to)
            lse_s = torch.logaddexp(lse_s, lse_n.masked_fill(lse_s == float("-inf"), float("-inf")))
        out, _ = merge_partials([(out_s, lse_s), (out_c, lse_c)])
        return out

    def _estimate(self, q, k, v, sets, bq: int, bk: int, scale: float):
        """One unpadded prompt (``q (1, Hq, L, D)``, its keys ``k, v (1, Hkv, L, D)``, ``sets (1, H,
        nQB, nKB)``): the compensated partial ``(out, lse)`` and the no-gain log-mass ``lse_n``."""
        hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
        dev = q.device
        ranges = segment_ranges(lk, bk, self.isolate)
        n = len(ranges)
        starts = torch.tensor([s for s, _ in ranges], device=dev)
        ends = torch.tensor([e for _, e in ranges], device=dev)
        seg = torch.repeat_interleave(torch.arange(n, device=dev), ends - starts)
        k_mean, k_spread, count = pool_segments(k, seg, n)
        v_mean, _, _ = pool_segments(v, seg, n)
        spread = k_spread.float().repeat_interleave(hq // k.shape[1], dim=1)[:, :, None, :]  # (1, Hq, 1, n)
        h = sets.shape[1]
        if h != hq:
            sets = sets.repeat_interleave(hq // h, dim=1)
        dropped = ~sets[..., starts // bk]  # (1, Hq, nQB, n): the group's block is not read
        out = torch.zeros(1, hq, lq, v.shape[-1], device=dev)
        lse_c = torch.full((1, hq, lq), float("-inf"), device=dev)
        lse_n = torch.full_like(lse_c, float("-inf"))
        step = max(1, ESTIMATE_CHUNK_ELEMS // max(1, hq * n))
        for t0 in range(0, lq, step):
            t1 = min(lq, t0 + step)
            pos = torch.arange(t0, t1, device=dev) + (lk - lq)  # key position of each query row
            seen = ends[None, :] <= pos[:, None] + 1  # (rows, n): the whole group precedes the row
            allowed = dropped[:, :, torch.arange(t0, t1, device=dev) // bq] & seen
            scores = pooled_scores(q[:, :, t0:t1], k_mean)
            if self.gapr == "off":
                comp = allowed
            else:
                err = q[:, :, t0:t1].float().norm(dim=-1)[..., None] * spread  # (1, Hq, rows, n)
                gain = scores.abs() > err
                comp = allowed & gain
                if self.gapr == "sparse":
                    lse_n[:, :, t0:t1] = pooled_attend(scores, scale, count, None, allowed & ~gain)[1]
            out[:, :, t0:t1], lse_c[:, :, t0:t1] = pooled_attend(scores, scale, count, v_mean, comp)
        return out, lse_c, lse_n

    # ---- the token-level reference ---------------------------------------------------------------------

    def reference(self, q, k, v, sel, scale: float, key_valid=None) -> torch.Tensor:
        """The same output token by token, in float64: dense logits, the selection's token mask
        (:func:`~tokensparse.engine.blocks.token_mask`) and each key group's mean taken from its
        tokens; one weighted sum ``(N_s·(1 + Z_n/Z_s) + N_c) / (Z_s + Z_n + Z_c)`` per query row,
        where ``Z_s, N_s`` are the kept keys' exact mass and numerator, ``Z_c, N_c`` the estimated
        ones of the compensated groups and ``Z_n`` that of the no-gain groups (``gapr="sparse"``)."""
        b, hq, lq, _ = q.shape
        lk = k.shape[2]
        allowed = token_mask(sel, lq, lk, key_valid)  # (B, H, Lq, Lk)
        if allowed.shape[1] != hq:
            allowed = allowed.repeat_interleave(hq // allowed.shape[1], dim=1)
        g = hq // k.shape[1]
        kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
        cap = active_softcap()

        def logit(x):
            x = x * scale
            return x if cap is None else torch.tanh(x / cap) * cap

        out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64, device=q.device)
        starts = [0] * b if key_valid is None else (lk - key_valid.long().sum(-1)).tolist()
        for r in range(b):
            k0 = starts[r]
            q0 = max(0, k0 - (lk - lq))
            if q0 >= lq:
                continue
            qr, kr, vr = q[r, :, q0:].double(), kk[r, :, k0:], vv[r, :, k0:]  # real tokens only
            mask = allowed[r, :, q0:, k0:]
            pos = torch.arange(q0, lq, device=q.device) + (lk - lq) - k0  # each query's position among the real keys
            s = logit(qr @ kr.transpose(-1, -2))
            causal = torch.arange(kr.shape[1], device=q.device)[None, :] <= pos[:, None]
            top = s.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True)  # a common shift per row
            w = torch.exp((s - top).masked_fill(~mask, float("-inf")))
            z_s, n_s = w.sum(-1), w @ vr
            z_c = torch.zeros_like(z_s)
            z_n = torch.zeros_like(z_s)
            n_c = torch.zeros_like(n_s)
            for a, e in segment_ranges(kr.shape[1], sel.block_k, self.isolate):
                k_mean = kr[:, a:e].mean(1)  # (Hq, D)
                spread = (kr[:, a:e] - k_mean[:, None]).norm(dim=-1).mean(1)  # (Hq,)
                dot = (qr @ k_mean[..., None])[..., 0]  # (Hq, rows)
                est = torch.exp(logit(dot) + math.log(e - a) - top[..., 0])
                skipped = ~mask[:, :, a:e].any(-1) & (pos >= e - 1)[None, :]  # not read, wholly visible
                gain = dot.abs() > qr.norm(dim=-1) * spread[:, None]
                comp = skipped if self.gapr == "off" else skipped & gain
                z_c += est * comp
                n_c += (est * comp)[..., None] * vr[:, a:e].mean(1)[:, None, :]
                if self.gapr == "sparse":
                    z_n += est * (skipped & ~gain)
            ratio = torch.where(z_s > 0, z_n / z_s.clamp_min(1e-300), torch.zeros_like(z_s))
            total = z_s + z_c + torch.where(z_s > 0, z_n, torch.zeros_like(z_n))
            row = (n_s * (1 + ratio)[..., None] + n_c) / total.clamp_min(1e-300)[..., None]
            out[r, :, q0:] = torch.where((total > 0)[..., None], row, torch.zeros_like(row))
        return out.to(q.dtype)
