"""RazorAttention: retrieval heads keep the whole cache, the others sinks + a recent window + one compensation row.

Based on Tang, Lin, Zeng, et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads", ICLR 2025, https://arxiv.org/abs/2407.15891 (no official code; Huawei's MindSpore port,
``mindspore_gs/experimental/long_context_compress/razor_attention``, was read for the head profile).

*Head profile* (offline, data-free; ``tokensparse calibrate --method razor_attention``, a generic
profile of kind ``retrieval_heads``): the model reads ``[BOS] + R·4`` (a block of ``R`` random token
ids repeated four times). Per layer and query head, the *echo* score is the attention mass a query
puts on the earlier occurrences of its own token, the *induction* score the mass on the tokens that
followed them, averaged over the queries of repetitions 2–4; a KV head takes the maximum of its
query heads. The retrieval heads are the top ``echo_ratio`` of all (layer, KV head) pairs by echo
score together with the top ``induction_ratio`` by induction score (the paper's 1% and 14%).

*Compression* (after the prompt's prefill, which attends densely): retrieval heads keep every row;
every other KV head keeps its first ``n_sink`` and last ``window`` real tokens plus one synthetic
*compensation row*, the mean key and mean value of the ``N`` rows it dropped. With
``comp_weight = "log_n"`` (the paper, eq. 5) that row's logit gets ``+log N`` (a key bias), so it
weighs as ``N`` copies of itself; ``"none"`` attends it as one row (the MindSpore port). The cache is
ragged (each KV head stores its own rows: the memory is really freed) and keeps growing while
decoding (nothing is compressed again, as in the port).

Parameters
----------
window: int | float = 0.2
    Recent real tokens kept by non-retrieval heads: a count, or a share of the prompt's real
    tokens (the paper's ``N / C``).
n_sink: int = 4
    First real tokens kept by non-retrieval heads.
echo_ratio, induction_ratio: float = 0.01, 0.14
    Shares of all (layer, KV head) pairs taken as retrieval heads by each score (rounded up).
comp_weight: "log_n" | "none"
    How the compensation row is weighted (see above).
retrieval_heads: "profile" | "none" | list[int]
    ``"profile"``: from the model's ``retrieval_heads`` profile (``profile=`` path, else the shipped
    or cached one; without any, the profile is measured when the method is attached, with a warning,
    and not saved); ``"none"``: every head is compressed; a list: flat indices
    ``layer * n_kv_heads + kv_head``.
profile: str | None
    An explicit profile file.

Deviations: the profile is computed on explicit positions (the port's off-by-one noted in the
spec does not arise); scores are averages over the repeated queries (rank-equivalent to the port's
mean over all ``S²`` entries); ``R`` follows the calibration length (``(tokens - 1) // 4``) instead of
the port's fixed 2500. The paper's threshold ``S0`` on the window is ``window`` as a count.
Compression happens once, after the first prefill; a question fed as a later chunk is not
compressed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..engine.cache import SyntheticRows, synthetic_count
from ..engine.calibration import Profile, find_kind_profile
from ..engine.config import param
from ..engine.method import Method, Phase
from ..engine.observers import Observer, observe_prompt
from ..engine.pipeline import everything
from ..engine.selection import KeyBias, Selection, grouped_logits, resolve_budget_rows, select_topk

KIND = "retrieval_heads"
KIND_VERSION = 1


class _EchoInduction(Observer):
    """Echo and induction mass per (layer, query head) on ``[BOS] + R·4`` (queries of repetitions 2–4)."""

    def __init__(self, repeat: int, chunk: int = 256):
        self.r, self.chunk = repeat, chunk
        self.echo: dict[int, torch.Tensor] = {}
        self.induction: dict[int, torch.Tensor] = {}

    def on_call(self, call) -> None:
        if call.past_len:
            return
        r, n = self.r, call.k_len
        dev = call.query.device
        echo = torch.zeros(call.n_q_heads, device=dev)
        ind = torch.zeros(call.n_q_heads, device=dev)
        for lo in range(1 + r, n, self.chunk):  # queries of repetitions 2..4
            hi = min(n, lo + self.chunk)
            logits = grouped_logits(call.query[:1, :, lo:hi], call.key[:1], call.scale)[0]  # (Hq, c, n)
            qpos = torch.arange(lo, hi, device=dev)
            kpos = torch.arange(n, device=dev)
            p = logits.masked_fill(kpos[None, :] > qpos[:, None], float("-inf")).softmax(-1)
            same = (kpos[None, :] >= 1) & (kpos[None, :] < qpos[:, None]) & ((kpos[None, :] - qpos[:, None]) % r == 0)
            nxt = torch.zeros_like(same)
            nxt[:, 1:] = same[:, :-1]  # the token after each earlier occurrence
            echo += (p * same).sum(-1).sum(-1)
            ind += (p * nxt).sum(-1).sum(-1)
        count = max(1, n - 1 - r)
        self.echo[call.layer_idx] = (echo / count).cpu()
        self.induction[call.layer_idx] = (ind / count).cpu()


def measure_heads(model, tokens: int, seed: int = 0) -> dict:
    """The ``retrieval_heads`` payload: echo and induction scores per (layer, KV head)."""
    cfg = model.config.get_text_config(decoder=True)
    r = max(2, (tokens - 1) // 4)
    vocab = cfg.vocab_size
    lo = min(vocab // 4, max(0, vocab - r))
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(lo, min(vocab, lo + max(r, 2500)), (r,), generator=g)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else int(block[0])
    ids = torch.cat([torch.tensor([bos]), block.repeat(4)])[None]
    obs = _EchoInduction(r)
    observe_prompt(model, ids, obs)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = sorted(obs.echo)  # sliding-window layers are observed too (the profile covers every layer)

    def per_kv(t):
        return t.reshape(hkv, hq // hkv).amax(-1).tolist()

    return {"tokens": int(ids.shape[1]), "repeat": r, "seed": seed, "n_kv_heads": hkv,
            "echo": [per_kv(obs.echo[i]) for i in layers], "induction": [per_kv(obs.induction[i]) for i in layers]}


def retrieval_set(payload: dict, echo_ratio: float, induction_ratio: float) -> set[int]:
    """Flat ``layer * n_kv_heads + kv_head`` indices of the retrieval heads of a profile payload."""
    echo = torch.tensor(payload["echo"], dtype=torch.float64).flatten()
    ind = torch.tensor(payload["induction"], dtype=torch.float64).flatten()
    n = echo.numel()
    chosen: set[int] = set()
    for scores, ratio in ((echo, echo_ratio), (ind, induction_ratio)):
        k = min(n, math.ceil(ratio * n - 1e-9))
        if k:
            idx, _ = select_topk(scores[None], k)
            chosen.update(int(i) for i in idx[0])
    return chosen


@dataclass(eq=False)
class RazorAttention(Method):
    name = "razor_attention"
    phase = Phase.EVICTION
    schedule = "once, after the prompt's prefill"
    kv_memory = "retrieval heads full; others sinks + window + 1 row"
    calibration = "a data-free retrieval-head profile"
    paper = "[RazorAttention](https://arxiv.org/abs/2407.15891)"
    needs_evicting_cache = True
    kv_layout = "ragged"
    profile_kind = KIND
    profile_version = KIND_VERSION

    window: int | float = param(0.2, "budget")
    n_sink: int = param(4, "int", ge=0)
    echo_ratio: float = param(0.01, "float", ge=0.0, le=1.0)
    induction_ratio: float = param(0.14, "float", ge=0.0, le=1.0)
    comp_weight: str = param("log_n", "choice", choices=("log_n", "none"))
    retrieval_heads: str | list[int] = param("profile", "indices", choices=("profile", "none"))
    profile: str | None = param(None, "path", optional=True)
    calib_tokens: int = param(4097, "int", ge=9)

    @classmethod
    def at_full_budget(cls) -> "RazorAttention":
        return cls(window=1.0, retrieval_heads="none")

    @classmethod
    def at_sparse_budget(cls) -> "RazorAttention":
        return cls(window=4, n_sink=2, retrieval_heads=[1])  # layer 0's second KV head keeps everything

    @classmethod
    def calibrate(cls, model, input_ids) -> dict:
        """Data-free: the calibration text is not read, only its length sets the prompt's size."""
        return measure_heads(model, int(input_ids.shape[1]))

    @classmethod
    def describe_profile(cls, payload: dict) -> str:
        heads = sorted(retrieval_set(payload, 0.01, 0.14))
        h = payload["n_kv_heads"]
        return "retrieval heads at the default ratios (layer, KV head): " + ", ".join(f"({i // h}, {i % h})" for i in heads)

    def setup(self, session) -> None:
        cfg = session.model.config.get_text_config(decoder=True)
        hkv, n = cfg.num_key_value_heads, session.num_layers
        if self.retrieval_heads == "none":
            heads: set[int] = set()
        elif isinstance(self.retrieval_heads, list):
            heads = set(self.retrieval_heads)
            bad = sorted(i for i in heads if i >= n * hkv)
            if bad:
                raise ValueError(f"razor_attention: retrieval_heads {bad} out of range for {n} layers × {hkv} KV heads")
        else:
            path = self.profile or find_kind_profile(session.model, KIND)
            if path is None:
                tokens = min(self.calib_tokens, int(getattr(cfg, "max_position_embeddings", self.calib_tokens)))
                warnings.warn(f"razor_attention: no retrieval-head profile for this model; measuring one now on {tokens} "
                              "random tokens (not saved; `tokensparse calibrate --method razor_attention` saves it)",
                              stacklevel=4)
                payload = measure_heads(session.model, tokens)
                session.info["razor_profile"] = f"measured at attach ({tokens} tokens)"
            else:
                prof = Profile.load(path, KIND, KIND_VERSION)
                prof.check(session.model)
                payload = prof.payload
                session.info["razor_profile"] = str(path)
            heads = retrieval_set(payload, self.echo_ratio, self.induction_ratio)
        mask = torch.zeros(n, hkv, dtype=torch.bool)
        for i in heads:
            mask[i // hkv, i % hkv] = True
        session.state["razor_retrieval"] = mask
        session.info["razor_retrieval_heads"] = [[i // hkv, i % hkv] for i in sorted(heads)]

    def select(self, call) -> Selection | None:
        if call.kind != "prefill":
            return None
        retrieval = call.session.state["razor_retrieval"][call.layer_idx].to(call.query.device)  # (Hkv,)
        n_real, rank = call.n_real, call.key_rank  # (B, 1), (B, Lk)
        window = resolve_budget_rows(self.window, n_real)  # (B, 1)
        real = rank > 0
        kept = real & ((rank <= self.n_sink) | (rank > n_real - window))  # (B, Lk)
        keep = kept[:, None, :] | (real[:, None, :] & retrieval[None, :, None])  # (B, Hkv, Lk)
        dropped = real[:, None, :] & ~keep
        if not bool(dropped.any()):
            return everything(call, "keep")
        counts = keep.sum(-1, keepdim=True)
        scores = keep.float().masked_fill(~keep, float("-inf"))
        idx, valid = select_topk(scores, int(counts.max()), counts)
        n_drop = dropped.sum(-1)  # (B, Hkv)
        w = dropped.to(call.key.dtype) / n_drop.clamp_min(1)[..., None].to(call.key.dtype)
        comp_k = (w[..., None, :] @ call.key)  # (B, Hkv, 1, D): mean of the dropped keys
        comp_v = (w[..., None, :] @ call.value)
        syn = SyntheticRows(comp_k, comp_v, n_drop[..., None])
        return Selection.keep(idx, None if bool(valid.all()) else valid, synthetic=syn)

    def key_bias(self, call) -> KeyBias | None:
        if self.comp_weight != "log_n" or call.kind == "prefill":
            return None
        ev = call.evicting
        if ev is None or not ev.evicted:
            return None
        cnt = synthetic_count(ev.slots)  # (B, Hkv, n): N on a compensation row, else 0
        has = cnt > 0  # (not read on the host: a head without a compensation row gets a bias of 0)
        pos = has.long().argmax(-1)  # (B, Hkv): each KV head's compensation row (0 where it has none)
        n = cnt.gather(-1, pos[..., None])[..., 0]  # (B, Hkv)
        hkv, g = call.n_kv_heads, call.group
        own = torch.eye(hkv, dtype=torch.bool, device=pos.device).repeat_interleave(g, dim=0)  # (Hq, Hkv)
        value = torch.where(own[None] & (n[:, None, :] > 0), n[:, None, :].clamp_min(1).float().log(), 0.0)
        return KeyBias(pos, value)
