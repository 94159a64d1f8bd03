"""SpAtten at decode time: cascade token pruning, cascade head pruning, progressive quantisation of K.

Based on Wang, Zhang, Han, "SpAtten: Efficient Sparse Attention Architecture with Cascade Token and
Head Pruning", HPCA 2021, https://arxiv.org/abs/2012.09852 (code: github.com/mit-han-lab/spatten: RTL
and a simulator; its LLM port ``spatten_llm/kv_cache_token_pruning.py`` is a StreamingLLM-style
eviction with an importance term, not the cascade). The paper is an accelerator for BERT and GPT-2
that removes pruned tokens for the rest of the model run; here the same three ideas act on a KV
cache at decode steps, through the engine (selections, executors, the cache-kept int8 key shadow):

* **Cascade token pruning.** The first ``dense_layers`` layers run plain dense attention. In every
  later layer (a *pruning layer*) each cache row carries the attention probability it has received
  there (summed over the query heads, the prompt's last ``prompt_window`` queries and every decode
  step). A token's importance at layer ``l`` is the sum of those accumulators over the pruning
  layers up to ``l`` (the paper's sum over heads and layers), passed down the layers of a step in
  the engine's per-pass ``carry``. A pruning layer attends to the tokens it still holds that the
  previous pruning layer kept in this pass, then keeps the top ``k_l`` of them by importance (the
  last ``n_local`` real tokens always); the rest are pruned: never read again by this layer nor by
  any deeper one. ``k_l`` falls linearly with depth from ``budget_first`` (first pruning layer) to
  ``budget`` (last layer), so the kept sets are nested and shrink with depth (the paper's
  per-layer pruning ratios, more aggressive later). The prefill is dense and prunes nothing (it
  only scores); pruning starts at the first decode step.
* **Cascade head pruning.** Each layer accumulates, per query head, the magnitude ``Σ|O_h|`` of the
  head's attention output (prefill queries, then decode steps). From the first decode step on, a
  pruning layer skips the ``⌊head_prune · Hq⌋`` heads of smallest accumulated magnitude, and they
  stay skipped (cascade over steps). A skipped head outputs ``head_output``: ``"last"``, its last
  computed output, or ``"zero"``, the paper's removal (``o_proj`` then sees nothing of it). Default
  ``"last"``: a head of small output is mostly one parked on a sink, whose output moves little from
  step to step, so its last output keeps its typical contribution to the residual stream where
  zero removes it. Measured on the pass key at 4K (docs/results/decode_family.md): with 2 of 9
  heads skipped per pruning layer both cost the same (−0.04 nats), with 4 of 9 "last" costs −0.31
  nats and "zero" −0.38 (worst sample −0.83 vs −0.94).
* **Progressive quantisation, simulated.** With ``quant``, each decode step first scores the keys
  it reads with the cache's int8 shadow of K (:mod:`tokensparse.engine.shadow`: one code per
  element, one scale per row and KV head): ``"int8"`` uses the whole code, ``"int4"`` only its 4 most
  significant bits (the paper's MSB pass; the code is rebuilt at the middle of its 16-wide bucket).
  A query-head row whose largest probability is below ``threshold`` (a flat distribution, where the
  quantisation error moves the output most) *re-fetches*: its attention is recomputed from the
  full-precision keys. Other rows keep the low-precision probabilities, for the output and the
  importance. ``session.stats`` counts ``spatten_quant_rows`` and ``spatten_refetch_rows`` (the
  re-fetch rate is their ratio) and ``spatten_refetch_kv`` (KV-head rows whose full keys at least
  one query head needed).

Also in ``session.stats``: ``spatten_read_keys`` / ``spatten_keys`` (real keys read / held, summed
over the decode calls of every global-attention layer, dense ones included: the density),
``spatten_pruned`` (tokens pruned, summed over layers), ``spatten_head_rows`` /
``spatten_head_rows_skipped`` (query-head rows of the pruning layers' decode calls, and those
skipped; the quantisation counters cover the same calls).

Parameters
----------
budget: int | float = 0.1
    Tokens the last layer keeps per step (a float in (0, 1]: a share of the context's real tokens).
budget_first: int | float = 0.4
    Tokens the first pruning layer keeps; the layers between interpolate linearly. The defaults
    keep 25% of the context on average over the pruning layers.
dense_layers: int = 14
    The first layers run plain dense attention (no scoring, quantisation or pruning). The paper
    starts pruning after "the first few layers"; on SmolLM2 (30 layers) the first layers attend
    locally and do not find a pass key (depth 0.45 at 4K: in layers 0–3 the key's digits rank
    below the 2000 most-attended of 4098 tokens, both by the prompt's last 32 queries and by the
    first decode step; from layer 14 on that step mostly puts them in its top 100), so pruning
    from layer 2 loses it (1/6, docs/results/decode_family.md); 14 is about half of the model.
n_local: int = 32
    The last real tokens, never pruned (at least the current token). Not in the paper; its LLM
    port keeps a recent window too.
prompt_window: int | None = 32
    The prompt's last queries whose attention seeds the importance; ``None``: every prompt query
    (the paper's sum, which favours early tokens, as H2O's does); ``0``: decode steps only.
head_prune: float = 0.0
    Share of query heads a pruning layer skips at decode steps.
head_output: str = "last"
    What a skipped head outputs: ``"last"`` or ``"zero"`` (see above).
quant: str | None = "int8"
    Low-precision keys for the first pass: ``"int8"``, ``"int4"`` or ``None`` (exact scores only).
threshold: float = 0.1
    A row re-fetches when its largest low-precision probability is below this. On SmolLM2's layers
    14–29 almost every row is peaked: 0.1% of rows re-fetch at 0.1 (4.3% when pruning from layer
    2; 39% of rows at 0.5). A hard decision: a row whose top probability is within float noise of
    the threshold may re-fetch in a padded batch and not alone (measured: 1.4e-3 in the logits).
pool_kernel: int = 63
    Beyond the paper: max-pool the importance over this many neighbouring tokens before each top-k
    (1 = off, the paper's rule), so that a span is kept or pruned together: a token pruned at a
    step never returns, and a long answer (a UUID, a 12-word phrase, several values) needs the
    tokens after the one the prompt's last queries rated. On SmolLM2's v2 suite (2K half, 35
    samples, docs/results/decode_suite/) the unpooled paper's schedule loses 21.2 points (2 wins /
    11 losses, −29.2 nats); pooled over 15 −18.3; larger budgets lose too (75 % → 50 % pooled over
    15, 0.80 of the keys read: −7.1, 0 / 4, a long answer and a UUID). Pooled over 63 (a span as
    long as those answers) the paper's schedule is within dense's noise with the same 0.60 of the
    keys read: +0.7 points (3 / 5, −2.0 nats) on that tuning half, held out +1.2 at 4K (2 / 2 of 21,
    −1.3 nats) and +0.0 at 8K (dense's 21 answers, −3.9 nats), where unpooled it loses 20.2 at 4K
    (docs/results/decode_suite/README.md, "SpAtten: pooled over 63 tokens").

Deviations: by default the importance is max-pooled over 63 neighbouring tokens before each
top-k (``pool_kernel``; the paper ranks tokens one by one, which on SmolLM2 prunes the tails of long
answers). A layer's importance counts the pruning layers up to it over every step so far: the
dense layers do not score (their local attention ranks recent tokens, not the ones deeper layers
need), and in generation, where the paper also accumulates over iterations, a deeper layer's
contributions from earlier steps do not enter a shallower layer's choice. One kept set per sequence, from the sum over all KV
heads (a token pruned "globally" must leave every KV head). The cache keeps every row: the saving
simulated is the paper's, K/V rows not fetched (an evicting cache could free a row at the layers
that pruned it; the shadow and the masks index a full cache). Head pruning acts per layer (head
``h`` of two layers of an LLM share nothing, so the paper's carrying of a pruned head to later
layers is not reproduced); with GQA a KV head's rows are still read while any head of its group
runs. The paper's local value pruning (V rows of tiny probability skipped) is not implemented.
Progressive quantisation covers K only (Q and V stay full precision) and re-fetches the fp32
rows, not 4 more bits; every row is computed both ways and the right one kept, so it shows the
accuracy, never a speed-up. Chunks on a filled cache read the kept set plus their own tokens,
count every query and prune after; they are not quantised and skip no head. A decode step reads
nothing from the device: the cascade's kept sets have data-dependent sizes, so each layer keeps a
host bound of its set (:class:`AliveRows`) that sizes the step (docs/ARCHITECTURE.md, "Host
synchronisation").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.cache import CacheState, RowState
from ..engine.config import param
from ..engine.executors import causal_mask, reference_attention
from ..engine.method import Method, Phase
from ..engine.pipeline import execute
from ..engine.selection import (
    Selection,
    aggregate_gqa,
    attention_mass,
    indices_from_mask,
    mask_from_indices,
    pool1d,
    resolve_budget,
    resolve_budget_rows,
    select_topk,
)
from ..engine.shadow import shadow_of

QUANT = ("int8", "int4")

_IMPORTANCE, _ALIVE, _HEADS = "spatten.importance", "spatten.alive", "spatten.heads"
_CARRY_SCORE, _CARRY_ALIVE, _CARRY_BOUND = "spatten.score", "spatten.alive", "spatten.bound"


class AliveRows(RowState):
    """One layer's kept set (``(B, Hkv, n)`` bool, the same in every KV head; a new row is alive)
    with a host bound: ``bound[r]``, at least the real rows sequence ``r`` still reads here (set
    at the prompt to its real tokens, +1 per written row, lowered to the layer's budget when it
    prunes). It is exact while the layer (and every pruning layer before it) never pruned, so
    ``bound == real`` says the set is complete; ``None`` where unknown (read from the device once).
    A decode step sizes its choice from it without reading the device."""

    def __init__(self):
        super().__init__(1.0, torch.bool)
        self.bound: list[int] | None = None

    def on_write(self, layer, start, end):
        super().on_write(layer, start, end)
        if self.bound is not None:
            self.bound = [b + end - start for b in self.bound]

    def on_keep(self, layer, idx, valid):
        super().on_keep(layer, idx, valid)
        self.bound = None

    def on_crop(self, layer):
        super().on_crop(layer)
        self.bound = None  # fewer real rows: the bound would no longer tell a complete set

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        same = self.bound is not None and len(set(self.bound)) == 1
        self.bound = [self.bound[0]] * self.buf.shape[0] if same else None  # rows moved: unknown unless equal


class HeadState(CacheState):
    """One layer's heads, carried with the cache: ``magnitude (B, Hq)`` accumulated ``Σ|O_h|``,
    ``pruned (B, Hq)`` the skipped heads, ``last (B, Hq, D)`` each head's last computed output."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.magnitude = self.pruned = self.last = None
        self.full = False  # every row skips its share of heads (from the first decode step on)

    def on_crop(self, layer) -> None:
        pass  # magnitudes only rank the heads; a rollback keeps them

    def add(self, out: torch.Tensor, query_valid: torch.Tensor | None, computed: torch.Tensor | None) -> None:
        """Accumulate ``out (B, Hq, Lq, D)`` over the real queries of the heads that ran."""
        mag = out.float().abs().sum(-1)  # (B, Hq, Lq)
        if query_valid is not None:
            mag = mag * query_valid[:, None, :]
        mag = mag.sum(-1)
        last = out[:, :, -1]
        if computed is not None:
            mag = mag * computed
            last = torch.where(computed[..., None], last, self.last)
        self.magnitude = mag if self.magnitude is None else self.magnitude + mag
        self.last = last.clone()


@dataclass(eq=False)
class SpAtten(Method):
    name = "spatten"
    phase = Phase.DECODE
    schedule = "each decode step: per-layer budgets shrinking with depth; a pruned token is never read again there or deeper"
    kv_memory = "full cache (pruned rows are not read); + K/4 + K/64 int8 key shadow with `quant`"
    calibration = "no"
    paper = "[SpAtten](https://arxiv.org/abs/2012.09852)"
    needs_cache_state = True

    budget: int | float = param(0.1, "budget")
    budget_first: int | float = param(0.4, "budget")
    dense_layers: int = param(14, "int", ge=0)
    n_local: int = param(32, "int", ge=1)
    prompt_window: int | None = param(32, "int", ge=0, optional=True)
    head_prune: float = param(0.0, "float", ge=0.0, lt=1.0)
    head_output: str = param("last", "choice", choices=("last", "zero"))
    quant: str | None = param("int8", "choice", choices=QUANT, optional=True)
    threshold: float = param(0.1, "float", ge=0.0, le=1.0)
    pool_kernel: int = param(63, "int", ge=1)

    def validate(self) -> None:
        if type(self.budget) is type(self.budget_first) and self.budget_first < self.budget:
            raise ValueError(f"spatten: budget_first ({self.budget_first}) must be at least budget ({self.budget}): "
                             "the kept sets shrink with depth")

    @classmethod
    def at_full_budget(cls) -> "SpAtten":
        return cls(budget=1.0, budget_first=1.0, dense_layers=0, quant=None)

    @classmethod
    def at_sparse_budget(cls) -> "SpAtten":
        # a small pool: the default 63 would give every token of a short test prompt the same score
        return cls(budget=6, budget_first=12, dense_layers=0, n_local=2, prompt_window=4, pool_kernel=3)

    def layer_budget(self, call) -> torch.Tensor:
        """``(B, 1)`` long: tokens layer ``call.layer_idx`` keeps, from ``budget_first`` at the first
        pruning layer down to ``budget`` at the last layer (linear, rounded down)."""
        first = resolve_budget_rows(self.budget_first, call.n_real)
        last = resolve_budget_rows(self.budget, call.n_real)
        span = call.session.num_layers - 1 - self.dense_layers
        if span <= 0:
            return last
        return first + torch.div((last - first) * (call.layer_idx - self.dense_layers), span, rounding_mode="floor")

    def layer_budget_host(self, call, real: list[int]) -> list[int]:
        """:meth:`layer_budget` on the host for rows of ``real`` tokens."""
        span = call.session.num_layers - 1 - self.dense_layers
        out = []
        for r in real:
            first, last = resolve_budget(self.budget_first, r), resolve_budget(self.budget, r)
            out.append(last if span <= 0 else first + (last - first) * (call.layer_idx - self.dense_layers) // span)
        return out

    # ---- one call ---------------------------------------------------------------------------------
    def forward(self, call) -> torch.Tensor:
        if call.layer_idx < self.dense_layers:  # plain dense attention: no scoring, quantisation or pruning
            if call.kind == "decode":
                call.session.count("spatten_read_keys", call.n_real.sum())
                call.session.count("spatten_keys", call.n_real.sum())
            return call.dense()
        layer = call.require_cache(self.name)
        if layer is None:  # no cache (use_cache=False): nothing to prune across steps
            return call.dense()
        importance = layer.state(_IMPORTANCE, RowState)  # (B, Hkv, n): attention received at this layer
        alive = layer.state(_ALIVE, AliveRows)  # (B, Hkv, n), the same for every KV head
        heads = layer.state(_HEADS, HeadState)
        if call.kind == "prefill":
            return self._prefill(call, importance, alive, heads)
        return self._step(call, importance, alive, heads)

    def _prefill(self, call, importance: RowState, alive: AliveRows, heads: HeadState) -> torch.Tensor:
        """Dense; the last ``prompt_window`` queries seed the importance, every query the head magnitudes."""
        out = call.dense()
        w = call.q_len if self.prompt_window is None else min(self.prompt_window, call.q_len)
        if w:
            with call.session.selecting():
                mask = None if call.mask is None else call.mask[:, :, -w:]
                query_valid = None if call.key_valid is None else call.key_valid[:, -w:]
                mass = attention_mass(call.query[:, :, -w:], call.key, call.scale, mask, query_valid)  # (B, Hq, L)
                importance.values.add_(aggregate_gqa(mass, call.n_kv_heads, "sum"))
        heads.clear()
        heads.add(out, call.key_valid, None)
        real = call.host_real
        alive.bound = None if real is None else list(real)  # every real token is alive after the prompt
        return out

    def _step(self, call, importance: RowState, alive: AliveRows, heads: HeadState) -> torch.Tensor:
        """A decode step or a chunk: attend to the kept set, score, prune heads and tokens.

        A decode step whose rows are known on the host (``call.host_real``) sizes everything from
        the host bounds (:class:`AliveRows`): the kept set's width (an upper bound: rows that read
        fewer have filler entries), whether it is complete, whether any row can prune and the
        top-k's width. It reads nothing from the device."""
        lq, n = call.q_len, call.k_len
        decode = lq == 1
        real = call.host_real if decode else None
        if real is not None and alive.bound is None:  # unknown (rows moved): read once
            alive.bound = (alive.values[:, 0] & call.key_valid if call.key_valid is not None
                           else alive.values[:, 0]).sum(-1).tolist()
        with call.session.selecting():
            read = alive.values[:, 0].clone()  # (B, n)
            upstream = call.carry.get(_CARRY_ALIVE)  # what the previous pruning layer kept in this pass
            if upstream is not None:
                read &= upstream
            read[:, n - lq :] = True  # the call's own tokens
            if call.key_valid is not None:
                read &= call.key_valid
            n_read = read.sum(-1)  # (B,)
            bound, up = None, call.carry.get(_CARRY_BOUND)
            if real is not None and (upstream is None or up is not None):  # (an upstream set needs its bound)
                bound = [min(a, r) for a, r in zip(alive.bound, real)]
                if upstream is not None:
                    bound = [min(a, u) for a, u in zip(bound, up)]
                idx, valid = indices_from_mask(read[:, None, :], max(bound))  # (B, 1, k): one set for every KV head
                complete = all(b >= r for b, r in zip(bound, real))  # exact: see AliveRows
            else:
                idx, valid = indices_from_mask(read[:, None, :])
                complete = bool((n_read[:, None] >= call.n_real).all())
                valid = None if bool(valid.all()) else valid
            selection = Selection.keys(idx, valid, complete=complete)
            skipped = self._skipped_heads(call, heads) if decode and self.head_prune > 0 else None
        out = execute(call, selection)  # exact attention over the kept set (the re-fetched precision)
        allowed = read[:, None, None, :] & causal_mask(lq, n, read.device)[None, None]  # (B, 1, Lq, n)
        query_valid = None if call.key_valid is None else call.key_valid[:, -lq:]
        with call.session.selecting():
            mass = attention_mass(call.query, call.key, call.scale, allowed, query_valid)  # (B, Hq, n)
        if decode and self.quant is not None:
            out, mass = self._progressive(call, allowed, out, mass, skipped)
        if decode:
            call.session.count("spatten_read_keys", n_read.sum())
            call.session.count("spatten_keys", call.n_real.sum())
            call.session.count("spatten_head_rows", call.batch * call.n_q_heads)
        if skipped is not None:
            call.session.count("spatten_head_rows_skipped", skipped.sum())
            s = skipped[:, :, None, None]
            last = heads.last[:, :, None, :].to(out.dtype)
            out = out.masked_fill(s, 0) if self.head_output == "zero" else torch.where(s, last, out)
            mass = mass.masked_fill(skipped[..., None], 0)  # a skipped head computed no probabilities
        heads.add(out, query_valid, None if skipped is None else ~skipped)
        with call.session.selecting():
            importance.values.add_(aggregate_gqa(mass, call.n_kv_heads, "sum"))
            score = importance.values.sum(1)  # (B, n): summed over KV heads
            if _CARRY_SCORE in call.carry:
                score = score + call.carry[_CARRY_SCORE]
            call.carry[_CARRY_SCORE] = score  # the pruning layers so far
            budget = None if bound is None else self.layer_budget_host(call, real)
            keep = self._prune_tokens(call, read, score, budget, bound)
            alive.values.copy_(keep[:, None, :].expand_as(alive.values))
            call.carry[_CARRY_ALIVE] = keep
            if bound is not None:  # what this layer now holds, at most (the local window stays whatever
                # the budget; exact while it never pruned, below the real tokens once it did)
                alive.bound = [min(b, max(k, self.n_local)) for b, k in zip(bound, budget)]
            elif decode:
                alive.bound = None
            else:  # a chunk: read the kept counts (a prompt-time read), so decode steps can size
                alive.bound = keep.sum(-1).tolist()
            call.carry[_CARRY_BOUND] = alive.bound if bound is not None else None
        return out

    def _skipped_heads(self, call, heads: HeadState) -> torch.Tensor | None:
        """``(B, Hq)`` bool: the heads this layer skips, adding the lowest-magnitude ones still running
        until ``⌊head_prune · Hq⌋`` are skipped (a skipped head never runs again)."""
        hq = call.n_q_heads
        n_skip = int(self.head_prune * hq)
        if n_skip == 0 or heads.magnitude is None:
            return None
        if not heads.full:  # the first step since the prompt: no head skipped yet, every row skips n_skip
            smallest = -heads.magnitude
            top, _ = select_topk(smallest, n_skip)
            heads.pruned = mask_from_indices(top, hq)
            heads.full = True
        return heads.pruned

    def _progressive(self, call, allowed, out, mass, skipped):
        """Low-precision scores first; the rows whose top probability is below ``threshold`` keep the
        exact attention (``out``, ``mass``), the others take the low-precision one."""
        n = call.k_len
        shadow = shadow_of(call, "int8")
        codes = shadow.keys[:, :, :n]
        codes = codes.float() if self.quant == "int8" else (codes >> 4).float().mul_(16).add_(7.5)  # MSB nibble
        k_low = codes.mul_(shadow.scale[:, :, :n, None])  # (B, Hkv, n, D)
        out_low, p_low = reference_attention(call.query, k_low, call.value, allowed, call.scale, return_probs=True)
        refetch = p_low.amax(-1) < self.threshold  # (B, Hq, 1)
        ran = torch.ones_like(refetch) if skipped is None else ~skipped[..., None]
        call.session.count("spatten_quant_rows", ran.sum())
        call.session.count("spatten_refetch_rows", (refetch & ran).sum())
        by_kv = (refetch & ran).view(call.batch, call.n_kv_heads, call.group).any(-1)
        call.session.count("spatten_refetch_kv", by_kv.sum())
        out = torch.where(refetch[..., None], out, out_low)
        mass = torch.where(refetch, mass, p_low[:, :, 0])
        return out, mass

    def _prune_tokens(self, call, read: torch.Tensor, score: torch.Tensor, budget: list[int] | None = None,
                      bound: list[int] | None = None) -> torch.Tensor:
        """``(B, n)`` bool: of the tokens read, the last ``n_local`` real ones and the top of ``score``
        up to this layer's budget. ``budget`` / ``bound``: that budget and the read rows' bound per
        row on the host (the decision and the top-k's width then come from them)."""
        local = read & (call.key_rank > call.n_real - self.n_local)
        cand = read & ~local
        n_cand = cand.long().sum(-1, keepdim=True)
        take = (self.layer_budget(call) - local.long().sum(-1, keepdim=True)).clamp_min(0).minimum(n_cand)
        if budget is not None:
            if all(k >= b for k, b in zip(budget, bound)):  # no row reads more than it may keep
                return read
            width = min(max(budget), read.shape[-1])  # take <= budget
        else:
            if bool((take >= n_cand).all()):
                return read
            width = int(take.max())
        if self.pool_kernel > 1:  # a span's tokens rank with its best one (beyond the paper)
            score = pool1d(score.masked_fill(~read, 0.0), self.pool_kernel, "max")
        top, ok = select_topk(score.masked_fill(~cand, float("-inf")), width, take)
        keep = local | mask_from_indices(top, read.shape[-1], ok)
        call.session.count("spatten_pruned", (read & ~keep).sum())
        return keep
