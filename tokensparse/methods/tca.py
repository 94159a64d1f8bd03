"""TCA-Attention: calibrated per-head block budgets and a redundancy-aware choice of tokens per block.

Based on You, Chen, Zhang, Qiu, Wu, Li, Wang, Tan, "Training-free Context-adaptive Attention for
Efficient Long Context Modeling", arXiv 2512.09238 (2025). No official code was found. The
paper's method section could not be read here: its mechanics below come from the abstract, the
arXiv page's opening and two secondary accounts of the full paper (a paper note in
github.com/hustzxd/EfficientPaper, ``notes/2025/TCA-Attention``, and the public reviews of an
earlier version, openreview.net/forum?id=0lGVMSAazo); everything they leave open is marked
*chosen here*.

Online selection, per layer and KV head, once at the prefill:

1. token scores ``s``: the softmax attention of the prompt's last ``n_query`` queries (paper: the
   last one) over every key, averaged over those queries and over the KV head's query group, then
   (beyond the paper, on by default) max-pooled over ``pool_kernel`` neighbouring tokens;
2. the context outside the last ``window`` tokens is cut into blocks of ``block`` tokens; each block
   ``j`` gets ``h_j = (1 − alpha) · Σ_{i∈j} s_i + alpha · (1 − Σ s_i² / (Σ s_i)²)``: its attention
   mass plus how spread that mass is inside the block (one minus a concentration index: a block
   whose mass sits on one token needs one token, a diffuse block needs many);
3. the head's configuration ``p`` (a distribution over per-block counts ``k ∈ {1, 2, 4, …, block}``)
   assigns counts by rank: blocks sorted by ``h`` descending, the first ``p_block`` share of them
   keep ``block`` tokens, the next ``p_{block/2}`` share keep ``block/2``, … (*the rank-to-count
   mapping is chosen here*; the sources say only that higher-scored blocks get larger counts);
4. inside each block the ``k`` tokens with the highest ``s`` are kept (ties: the earlier); the
   window is always kept. The other rows are evicted from the cache.

Offline calibration (``tokensparse calibrate --method tca``, profile kind ``tca_budgets``): the
candidate configurations are log-Gaussian over ``log2 k``, ``p_k ∝ exp(−(log2 k − mu)² / (2
sigma²))``, for 14 centres ``mu`` evenly spaced over ``[−1, log2 block + 1]`` with ``sigma = 1``
(*the grid is chosen here*; the paper uses 14 candidates), plus "every token". One dense forward
pass over the calibration text measures, for every layer, KV head and candidate, the attention
mass of the last query that the kept rows retain; a head uses the candidate keeping the fewest
rows whose retained mass is at least ``tau`` (paper: 0.9, also its error bound: dropped mass ≤ 1 −
tau; default here 0.99, see ``tau``). The profile stores the masses, so ``tau`` is a setting, not a recalibration, for pool kernels
0 (the paper) and 7 (the default). Candidates are ranked by their kept share on the calibration
prompt itself; the mass is that of the unpooled scores.

Parameters
----------
block: int = 64
    Tokens per block (paper: 128, at 32K–128K contexts; smaller here for 2K–8K prompts).
window: int = 256
    Last tokens always kept (paper: 4096 at 128K).
alpha: float = 0.5
    Weight of the spread term in the block score (paper: 0.5).
tau: float = 0.99
    Attention mass each head must retain on the calibration prompt (``budgets="profile"``). The
    paper's 0.9 keeps 15% of a 4K prompt's KV on SmolLM2 and loses the pass key at 5 of 6 depths;
    0.99 keeps 46% and finds all 6 (docs/results/prefill_family/tca.md).
budgets: str = "profile"
    ``"profile"``: per-head configurations from the calibration profile (``profile=``, else the
    shipped or cached one for this model; a model with neither gets the uniform configuration with
    a warning naming the calibrate command, recorded in ``session.info["tca_budgets"]``);
    ``"uniform"``: every head uses the configuration of ``mu`` and ``sigma`` (no calibration).
mu: float = 2.0, sigma: float = 1.0
    The uniform configuration (``budgets="uniform"``).
n_query: int = 1
    Last prompt queries whose attention scores the tokens (paper: 1). The best configuration
    measured on SmolLM2's v2 suite scores with the question's tokens: ``budgets="uniform", mu=4,
    n_query=16, pool_kernel=15`` loses 16.0 points on the 2K half against 26.7 with the last query
    and a pool of 7 (same 40 % of the KV; docs/results/prefill_family/tca.md), and, held out, 6.2 on the 4K
    half (within the paired noise on accuracy, not on log-likelihood: −12.6 nats); with ``mu=5``
    (57–59 % of the KV) −7.6 at 2K and +1.4 at 4K (−6.8 nats). It is not the default
    because the profile (the paper's calibrated budgets, ``budgets="profile"``) is measured with the
    last query only.
pool_kernel: int = 7
    Beyond the paper: max-pool the token scores over this many neighbours before blocks are scored
    and tokens ranked (SnapKV's kernel and remedy: a token a query needs keeps its neighbours, so a
    multi-token fact survives); 0 or 1 = off, the paper's rule. Without it the pass key is lost even
    with 91% of the KV kept (docs/results/prefill_family/tca.md). Profiles hold kernels 0 and 7.
profile: str | None = None
    An explicit ``tca_budgets`` profile file.
floor_mu: float | None = None
    Beyond the paper (``budgets="profile"`` only): every head keeps at least the calibration
    candidate centred at ``floor_mu`` (the first of the 14 log-Gaussian candidates whose centre is
    at least it), as AdaKV floors its per-head budgets; the profile then only raises a head above
    it; without a profile for the model it is an error (there is nothing to floor). ``None``: no
    floor (the paper). Measured on the v2 suite's 2K half
    (docs/results/prefill_family/tca.md): the KJV profile floored at the candidate centred at 3.92
    keeps 52 % of the KV and loses 41.0 points, where one uniform configuration (``mu=4``) keeps 40 %
    and loses 26.7: the profile's per-head budgets do not help on SmolLM2.

Deviations. Pooling (``pool_kernel=7``) is not in the paper: on SmolLM2 the paper's rule loses the
5-digit pass key at every budget tried, even keeping 91% of the KV, because the last query rates
the first digit of a fact far above the others, and a block that keeps few tokens keeps that one
(docs/results/prefill_family/tca.md). Prefill attention is dense and the selection evicts after it (as SnapKV does): the
paper also attends sparsely during the prefill (selected tokens plus the local window) and
re-compresses every ``block`` newly decoded tokens; neither is built (the block executors read
whole blocks, and TCA keeps at least one token in every block, so a block-rounded prefill would
be dense; a token-level gather executor for prefill is not built). The profile is measured for the
default ``block``, ``window``, ``alpha`` and ``n_query`` (pool kernels 0 and 7); another value with ``budgets="profile"``
is refused rather than silently using budgets measured under other settings. GQA: one row set per
KV head (scores averaged over its query group); the sources do not say how the paper handles GQA.
Heads keep different numbers of rows, stored ragged (as AdaKV).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..engine.calibration import Profile, find_kind_profile
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.observers import Observer, observe_prompt
from ..engine.pipeline import KeyPlan, everything
from ..engine.selection import Selection, aggregate_gqa, pool1d, window_scores

KIND = "tca_budgets"
KIND_VERSION = 1
N_CANDIDATES = 14
SIGMA = 1.0
#: pooling kernels a calibration measures (0: the paper's rule; 7: the default here)
POOL_KERNELS = (0, 7)


def counts_set(block: int) -> list[int]:
    """The per-block counts ``{1, 2, 4, …} ∪ {block}``, ascending."""
    ks = [1 << i for i in range(max(1, block).bit_length()) if (1 << i) < block]
    return ks + [block]


def log_gaussian(block: int, mu: float, sigma: float) -> torch.Tensor:
    """``p (|K|,)`` float64 over :func:`counts_set`: ``p_k ∝ exp(−(log2 k − mu)² / (2 sigma²))``."""
    x = torch.tensor([math.log2(k) for k in counts_set(block)], dtype=torch.float64)
    w = torch.exp(-((x - mu) ** 2) / (2 * sigma**2))
    return w / w.sum()


def candidate_centres(block: int) -> list[float]:
    """The centres of the log-Gaussian calibration candidates: ``N_CANDIDATES`` evenly spaced over
    ``[−1, log2 block + 1]``."""
    return torch.linspace(-1.0, math.log2(block) + 1.0, N_CANDIDATES).tolist()


def candidate_configs(block: int) -> torch.Tensor:
    """The calibration candidates ``(N_CANDIDATES + 1, |K|)``: one log-Gaussian per
    :func:`candidate_centres`, then "every token" (all mass on ``k = block``)."""
    rows = [log_gaussian(block, mu, SIGMA) for mu in candidate_centres(block)]
    every = torch.zeros(len(counts_set(block)), dtype=torch.float64)
    every[-1] = 1.0
    return torch.stack(rows + [every])


def block_keep(s: torch.Tensor, block_id: torch.Tensor, cand: torch.Tensor, p: torch.Tensor, block: int,
               alpha: float) -> torch.Tensor:
    """Which candidates a head keeps: ``(B, H, n)`` bool.

    ``s (B, H, n)`` token scores, ``block_id (B, n)`` each candidate's block (by rank among the
    row's real tokens, so a padded row blocks as it would alone), ``cand (B, n)`` the candidates,
    ``p (H, |K|)`` each head's configuration over :func:`counts_set`.
    """
    b, h, n = s.shape
    dev = s.device
    ks = torch.tensor(counts_set(block), device=dev)
    nb = (n + block - 1) // block + 1  # an upper bound on the blocks of any row
    bid = torch.where(cand, block_id, torch.full_like(block_id, nb - 1)).clamp(0, nb - 1)
    bid_h = bid[:, None, :].expand(b, h, n)
    sc = s.float().masked_fill(~cand[:, None, :], 0.0)
    mass = torch.zeros(b, h, nb, device=dev).scatter_add_(-1, bid_h, sc)
    sq = torch.zeros(b, h, nb, device=dev).scatter_add_(-1, bid_h, sc * sc)
    size = torch.zeros(b, nb, device=dev).scatter_add_(-1, bid, cand.float())  # candidates per block
    exists = size > 0
    conc = torch.where(mass > 0, sq / mass.clamp_min(1e-30) ** 2, torch.ones_like(mass))
    score = (1 - alpha) * mass + alpha * (1 - conc)
    score = score.masked_fill(~exists[:, None, :], float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # ties: the earlier block
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=dev).expand(b, h, nb))
    n_blocks = exists.sum(-1).clamp_min(1)[:, None, None]  # (B, 1, 1)
    frac = (rank.double() + 0.5) / n_blocks  # each block's place among the row's blocks
    cum = p.to(dev).flip(-1).cumsum(-1)  # shares from the largest count down
    cum = cum.expand(b, h, cum.shape[-1]).contiguous()
    level = torch.searchsorted(cum, frac.contiguous()).clamp_max(cum.shape[-1] - 1)
    k_block = ks.flip(0)[level].masked_fill(~exists[:, None, :], 0)  # (B, H, nb)
    # within-block rank by score (descending; ties: the earlier token), in one sort over (block, -s)
    key = (bid_h.double() * 4 - sc.double()).masked_fill(~cand[:, None, :], float("inf"))
    tok_order = torch.sort(key, dim=-1, stable=True).indices
    start = (size.cumsum(-1) - size).long()  # first sorted slot of each block
    sorted_bid = bid_h.gather(-1, tok_order)
    within = torch.arange(n, device=dev) - start[:, None, :].expand(b, h, nb).gather(-1, sorted_bid)
    keep_sorted = within < k_block.gather(-1, sorted_bid)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, tok_order, keep_sorted)
    return keep & cand[:, None, :]


def last_query_scores(call, n_query: int) -> torch.Tensor:
    """``(B, Hkv, Lk)``: the last ``n_query`` queries' mean attention probabilities, averaged over
    each KV head's query group."""
    w = min(n_query, call.q_len)
    scores = window_scores(call.query[:, :, call.q_len - w :], call.key, call.scale, call.key_valid)
    return aggregate_gqa(scores, call.n_kv_heads, "mean")


def pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """``scores`` max-pooled over ``kernel`` neighbours along the keys (unchanged for 0 or 1)."""
    return pool1d(scores, kernel, "max") if kernel > 1 else scores


class _Masses(Observer):
    """Per pool kernel and layer: the retained last-query mass ``(Hkv, candidates)`` of every
    candidate config (the mass of the unpooled scores: pooling changes the choice, not the goal)."""

    def __init__(self, method: "TCA"):
        self.method = method
        self.masses: dict[int, dict[int, torch.Tensor]] = {k: {} for k in POOL_KERNELS}
        self.kept: dict[int, dict[int, torch.Tensor]] = {k: {} for k in POOL_KERNELS}

    def on_call(self, call) -> None:
        if call.past_len or call.batch != 1 or call.is_sliding:
            return
        s = last_query_scores(call, self.method.n_query)  # (1, Hkv, L)
        for kernel in POOL_KERNELS:
            self._measure(call, s, pooled(s, kernel), kernel)

    def _measure(self, call, s: torch.Tensor, ranked: torch.Tensor, kernel: int) -> None:
        m = self.method
        hi = KeyPlan(call, window=m.window).hi
        cand = torch.ones(1, hi, dtype=torch.bool, device=s.device)
        bid = torch.arange(hi, device=s.device)[None] // m.block
        configs = candidate_configs(m.block)
        masses, kept = [], []
        for p in configs:
            keep = block_keep(ranked[..., :hi], bid, cand, p[None].expand(call.n_kv_heads, -1), m.block, m.alpha)
            masses.append((s[..., :hi] * keep).sum(-1)[0] + s[..., hi:].sum(-1)[0])  # (Hkv,)
            kept.append(keep.sum(-1)[0].float() + (call.k_len - hi))
        self.masses[kernel][call.layer_idx] = torch.stack(masses, -1).double().cpu()
        self.kept[kernel][call.layer_idx] = (torch.stack(kept, -1) / call.k_len).double().cpu()


@dataclass(eq=False)
class TCA(Method):
    name = "tca"
    phase = Phase.EVICTION
    schedule = "once after prefill; per-KV-head calibrated budgets"
    kv_memory = "reduced per head by its calibrated configuration (ragged cache)"
    calibration = "an offline per-head budget profile (or one uniform configuration)"
    paper = "[TCA-Attention](https://arxiv.org/abs/2512.09238)"
    needs_evicting_cache = True
    kv_layout = "ragged"
    profile_kind = KIND
    profile_version = KIND_VERSION

    block: int = param(64, "int", ge=1)
    window: int = param(256, "int", ge=1)
    alpha: float = param(0.5, "float", ge=0.0, le=1.0)
    tau: float = param(0.99, "float", gt=0.0, le=1.0)
    budgets: str = param("profile", "choice", choices=("profile", "uniform"))
    mu: float = param(2.0, "float")
    sigma: float = param(1.0, "float", gt=0.0)
    n_query: int = param(1, "int", ge=1)
    pool_kernel: int = param(7, "int", ge=0)
    profile: str | None = param(None, "path", optional=True)
    floor_mu: float | None = param(None, "float", optional=True, added=True)

    def validate(self) -> None:
        if self.floor_mu is not None and self.budgets != "profile":
            raise ValueError(f"tca: floor_mu ({self.floor_mu}) floors calibrated budgets; budgets={self.budgets!r} "
                             "has none (use mu for the uniform configuration)")

    @classmethod
    def at_full_budget(cls) -> "TCA":
        # all of the configuration's mass on k = block: every block keeps every token
        return cls(block=4, window=4, budgets="uniform", mu=12.0)

    @classmethod
    def at_sparse_budget(cls) -> "TCA":
        return cls(block=4, window=4, budgets="uniform", mu=0.0)

    # ---- calibration ------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model, input_ids) -> dict:
        m = cls(budgets="uniform")  # the default block / window / alpha / n_query
        obs = _Masses(m)
        observe_prompt(model, input_ids, obs)
        out = {
            "tokens": int(input_ids.shape[1]), "block": m.block, "window": m.window, "alpha": m.alpha,
            "n_query": m.n_query, "sigma": SIGMA, "candidates": candidate_configs(m.block).round(decimals=8).tolist(),
            "pool_kernels": {},
        }
        for kernel in POOL_KERNELS:
            layers = sorted(obs.masses[kernel])
            out["pool_kernels"][str(kernel)] = {
                "mass": [obs.masses[kernel][i].round(decimals=6).tolist() for i in layers],  # [layer][kv head][cand.]
                "kept_share": [obs.kept[kernel][i].round(decimals=6).tolist() for i in layers],
            }
        return out

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        parts = []
        for kernel, measured in payload["pool_kernels"].items():
            _, share = choose(measured, 0.9)
            parts.append(f"pool {kernel}: {100 * share.mean():.1f}% ({100 * share.min():.1f}–{100 * share.max():.1f}%)")
        return f"measured on {payload['tokens']} tokens; kept at tau 0.9 on average, " + "; ".join(parts)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self, session) -> None:
        cfg = session.model.config.get_text_config(decoder=True)
        n, hkv = session.num_layers, cfg.num_key_value_heads
        path = self.profile or (find_kind_profile(session.model, KIND) if self.budgets == "profile" else None)
        if self.budgets == "profile" and path is None:
            if self.floor_mu is not None:
                raise ValueError(f"tca: floor_mu ({self.floor_mu}) floors calibrated budgets, and this model has no "
                                 "tca_budgets profile; run `tokensparse calibrate --method tca`, pass profile=, or "
                                 "leave floor_mu unset (the uniform configuration is budgets='uniform' with mu)")
            warnings.warn("tca: no tca_budgets profile for this model; every head uses the uniform configuration "
                          f"(mu={self.mu}, sigma={self.sigma}). Run `tokensparse calibrate --method tca` to measure "
                          "per-head budgets.", stacklevel=4)
        session.info["tca_budgets"] = "profile" if path is not None else "uniform"
        if path is None:
            p = log_gaussian(self.block, self.mu, self.sigma)
            session.state["tca_p"] = p.expand(n, hkv, p.shape[0])
            return
        prof = Profile.load(path, KIND, KIND_VERSION)
        prof.check(session.model)
        pay = prof.payload
        mine = {"block": self.block, "window": self.window, "alpha": self.alpha, "n_query": self.n_query}
        theirs = {k: pay[k] for k in mine}
        kernel = str(self.pool_kernel if self.pool_kernel > 1 else 0)
        if mine != theirs or kernel not in pay["pool_kernels"]:
            measured = {**theirs, "pool_kernel": sorted(int(k) for k in pay["pool_kernels"])}
            raise ValueError(f"tca: the profile {path} was measured with {measured}, this config has "
                             f"{ {**mine, 'pool_kernel': self.pool_kernel} }; use the profile's settings or "
                             "budgets='uniform'")
        choice, share = choose(pay["pool_kernels"][kernel], self.tau, floor_candidate(self.floor_mu, self.block))
        configs = torch.tensor(pay["candidates"], dtype=torch.float64)
        if choice.shape != (n, hkv):
            raise ValueError(f"tca: profile {path} covers {tuple(choice.shape)} (layers, KV heads), "
                             f"the model has {(n, hkv)}")
        session.state["tca_p"] = configs[choice]  # (layers, Hkv, |K|)
        session.info["tca_profile"] = str(path)
        session.info["tca_calibrated_kept_share"] = float(share.mean())

    # ---- selection --------------------------------------------------------------------------------
    def select(self, call) -> Selection | None:
        if call.kind != "prefill":
            return None
        plan = KeyPlan(call, window=self.window)
        if plan.covers(0):
            return everything(call, "keep")  # the window holds the whole prompt
        s = pooled(last_query_scores(call, self.n_query), self.pool_kernel)[..., : plan.hi]  # (B, Hkv, hi)
        cand = plan.cand_mask if plan.cand_mask is not None else torch.ones(
            call.batch, plan.hi, dtype=torch.bool, device=s.device)
        bid = (call.key_rank[:, : plan.hi] - 1).clamp_min(0) // self.block
        p = call.session.state["tca_p"][call.layer_idx]
        keep = block_keep(s, bid, cand, p, self.block, self.alpha)
        scores = torch.where(keep, s.float() + 2.0, s.float() - 2.0)  # the kept rows rank first
        return plan.select(scores, keep.sum(-1), "keep")


def floor_candidate(floor_mu: float | None, block: int) -> int:
    """The index of the first calibration candidate (:func:`candidate_configs`) centred at or above
    ``floor_mu`` (``N_CANDIDATES``, every token, above the last centre); 0 for ``None``."""
    if floor_mu is None:
        return 0
    return next((i for i, m in enumerate(candidate_centres(block)) if m >= floor_mu - 1e-9), N_CANDIDATES)


def choose(measured: dict, tau: float, floor: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, KV head): the candidate keeping the fewest rows on the calibration prompt whose
    retained mass is at least ``tau`` (the last candidate, every token, always qualifies) among the
    candidates from index ``floor`` on (:func:`floor_candidate`), and its kept share. ``measured``:
    one pool kernel's ``{"mass", "kept_share"}`` of a profile. ``((layers, Hkv) long, (layers, Hkv)
    float)``."""
    mass = torch.tensor(measured["mass"], dtype=torch.float64)  # (layers, Hkv, C)
    share = torch.tensor(measured["kept_share"], dtype=torch.float64)
    ok = mass >= tau - 1e-9
    ok[..., -1] = True
    ok[..., :floor] = False
    cost = share.masked_fill(~ok, float("inf"))
    choice = cost.argmin(-1)
    return choice, share.gather(-1, choice[..., None])[..., 0]
