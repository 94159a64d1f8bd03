"""Context-parallel prefill on ``torch.distributed``: a long prompt split across ranks.

Each of ``P`` ranks runs the whole model on one contiguous chunk of the prompt (its own positions,
so RoPE is exact) and holds that chunk's keys and values. Inside every attention layer a chunk's
queries need the keys of every *earlier* chunk: the ranks pass key/value chunks along the ring
(rank ``r`` sends to ``r + 1``), each rank computes one partial attention per chunk that reaches it
— its own chunk causally, an earlier chunk fully — and merges the partials exactly through their
log-sum-exps (:func:`~tokensparse.engine.blocks.merge_partials`). This is ring attention
(Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context", 2023) as
compared in the Long-Context Attention Benchmark's context-parallel study, applied to inference.

Causal pipeline instead of a full ring. With contiguous chunks, chunk ``c`` is needed only by
ranks ``c + 1 … P - 1``, so it travels ``c → c + 1 → …`` and stops at the last rank that needs
it: the wrap-around hops of a training ring (which carry chunks nobody may attend to) are never
sent. The price is load imbalance — rank ``r`` attends to ``r + 1`` chunks — which the zigzag
layout of ring-flash-attention / Llama 3's context parallelism (each rank holds chunks ``r`` and
``2P - 1 - r``) removes; it is not built here (measured effect in ``docs/results/context_parallel``).

Block-sparse context parallelism (``sparsity=BlockSparsity(...)``). On the global grid of
``block``-token blocks every query block keeps its sink blocks, its ``local_blocks`` most recent
blocks (its own included) and the best-scoring other earlier blocks, ``ceil(density ·
(i + 1))`` blocks in all for query block ``i``. The score of key block ``j`` for query block
``i`` is the dot product of their mean-pooled query and key (the maximum over the query heads of
a KV head, in float64 so that ranks and a single process rank identically) — MoBA-style block
gating, training-free. The ranks exchange only the mean-pooled keys (``all_gather``, ``1/block``
of K) and a bit per (rank, key block) saying which blocks a rank reads; then a chunk's hop to
rank ``d`` carries only the blocks that ``d`` or a later rank reads, so the bytes exchanged fall
with the density, and each rank attends only to its chosen blocks (the block-sparse executor,
:func:`~tokensparse.engine.blocks.block_attend`). With ``world_size=1`` the same code is the
single-process block-sparse prefill it is tested against; at ``density=1`` it is dense attention.

Scope: prefill of unpadded prompts (every batch row the same length) on an empty cache, global
attention layers (a model with sliding-window layers or logit soft-capping is refused). The local
caches hold each rank's chunk; :meth:`ContextParallel.gather_cache` assembles the full cache on
every rank for decoding. ``gloo`` (CPU) and ``nccl`` (GPU) run the same code: point-to-point
``batch_isend_irecv`` and ``all_gather`` only.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..models import check_supported
from .attach import attached, attention_modules
from .blocks import block_attend, blocks_from_sets, merge_partials, n_blocks, pool_blocks, route_blocks
from .executors import reference_attention

ATTN_NAME = "tokensparse_cp"

_registered = False
_register_lock = threading.Lock()
_RUNS: "weakref.WeakKeyDictionary[torch.nn.Module, ContextParallel]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------------
# block choice
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSparsity:
    """Which key blocks each query block reads (see the module doc): the engine's routing rule
    (:func:`~tokensparse.engine.blocks.route_blocks`) with a density budget.

    density: float = 0.25
        Share of its causal key blocks a query block reads, in (0, 1]; sinks and local blocks
        count towards it (a query block reads at least those). 1.0 is dense attention.
    block: int = 64
        Block size in tokens (query and key blocks); every rank's chunk but the last is a whole
        number of blocks.
    sink_blocks: int = 1
        First blocks every query block reads (attention sinks).
    local_blocks: int = 1
        Most recent blocks every query block reads, its own included (>= 1).

    Any object with an int ``block`` and this ``route`` method can stand in for it (a registered
    block-routing method config does: ``ts.methods.get("biformer")(...)``).
    """

    density: float = 0.25
    block: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self):
        if not isinstance(self.density, (int, float)) or isinstance(self.density, bool) or not 0 < self.density <= 1:
            raise ValueError(f"BlockSparsity.density must be in (0, 1], got {self.density!r}")
        for name, low in (("block", 1), ("sink_blocks", 0), ("local_blocks", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"BlockSparsity.{name} must be an int >= {low}, got {value!r}")

    def route(self, q_pooled: torch.Tensor, k_pooled: torch.Tensor, first_block: int, *, layer_idx: int,
              length: int) -> torch.Tensor | None:
        """``(B, Hkv, nQB, nKB)`` bool: the key blocks each query block reads (``None``: every
        causal block). ``q_pooled (B, Hq, nQB, D)``: mean query of each of this call's query
        blocks, the first of which is global block ``first_block``; ``k_pooled (B, Hkv, nKB,
        D)``: mean key of every global key block up to the last query block; ``length``: the
        whole prompt's."""
        qi = torch.arange(first_block, first_block + q_pooled.shape[2])
        keep = torch.ceil(self.density * (qi + 1).double()).long()
        return route_blocks(q_pooled, k_pooled, first_block, keep=keep, sink_blocks=self.sink_blocks,
                            local_blocks=self.local_blocks)


# --------------------------------------------------------------------------------------------------
# partial attentions
# --------------------------------------------------------------------------------------------------


def _dense_partial(q, k, v, scale: float, causal: bool):
    """``(out, lse)`` of ``q`` over every key of ``k, v`` (``causal``: q and k are the same
    positions). The CPU flash kernel where it exists (it returns the log-sum-exp), else the fp32
    reference (any device)."""
    g = q.shape[1] // k.shape[1]
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    mask = None
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return reference_attention(q, k, v, mask, scale, return_lse=True)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclass
class CPStats:
    """What one rank exchanged and spent in the attention layers of a prefill."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_pooled: int = 0  # all_gather of pooled keys and of the block-need bits (sparse only)
    blocks_read: int = 0  # (row, KV head, query block, key block) tuples attended, all layers (sparse only)
    blocks_causal: int = 0  # the same count for dense causal attention (sparse only)
    comm_seconds: float = 0.0
    attention_seconds: float = 0.0
    layers: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["density"] = self.blocks_read / self.blocks_causal if self.blocks_causal else None
        return d


@dataclass
class CPOutput:
    """One rank's result of :meth:`ContextParallel.prefill`."""

    logits: torch.Tensor  # (B, end - start, V): this rank's chunk
    start: int
    end: int
    length: int
    cache: object  # the model's cache of this rank's chunk (None without use_cache)
    stats: CPStats = field(default_factory=CPStats)


class ContextParallel:
    """A model attached to a process group for context-parallel prefill (see the module doc).

    Use through :func:`context_parallel`. ``group=None`` with ``torch.distributed`` not
    initialised is a world of one rank (the single-process reference of the same code)."""

    def __init__(self, model, group=None, sparsity: BlockSparsity | None = None, single: bool = False):
        import torch.distributed as dist

        if sparsity is not None and not (isinstance(getattr(sparsity, "block", None), int)
                                         and callable(getattr(sparsity, "route", None))):
            raise TypeError("sparsity must be a BlockSparsity, a block-routing method config (an int `block` and "
                            f"a `route` method), or None; got {type(sparsity).__name__}")
        self.model = model
        self.sparsity = sparsity
        self.group = group
        if single:
            if group is not None:
                raise ValueError("single=True runs one rank; it takes no process group")
            self.rank, self.world = 0, 1
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        else:
            self.rank, self.world = 0, 1
        self.stats = CPStats()
        self._bounds: list[tuple[int, int]] | None = None

    # -- layout ------------------------------------------------------------------------------------

    def bounds(self, length: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` of every rank's chunk of a ``length``-token prompt: equal chunks of
        whole blocks (``block`` tokens with sparsity, else 1), the last one shorter."""
        unit = self.sparsity.block if self.sparsity is not None else 1
        chunk = -(-n_blocks(length, unit) // self.world) * unit
        out = [(r * chunk, min(length, (r + 1) * chunk)) for r in range(self.world)]
        if out[-1][0] >= out[-1][1]:
            raise ValueError(f"a {length}-token prompt is too short for {self.world} ranks"
                             + (f" with {unit}-token blocks" if unit > 1 else "")
                             + f" (chunks of {chunk} tokens leave the last rank empty)")
        return out

    # -- the model pass ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, use_cache: bool = True) -> CPOutput:
        """Run the model on this rank's chunk of ``input_ids (B, L)`` (the whole prompt, the same
        on every rank; no padding). Returns this rank's logits and cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        self._bounds = self.bounds(length)
        self._length = length
        start, end = self._bounds[self.rank]
        self.stats = CPStats()
        pos = torch.arange(start, end, device=input_ids.device).expand(input_ids.shape[0], -1)
        try:
            out = self.model(input_ids=input_ids[:, start:end], position_ids=pos, use_cache=use_cache)
        finally:
            self._bounds = None
        return CPOutput(out.logits, start, end, length, getattr(out, "cache", None) if use_cache else None, self.stats)

    def gather_cache(self, result: CPOutput):
        """A ``DynamicCache`` of the whole prompt on every rank, from each rank's chunk cache
        (``all_gather`` of every layer's keys and values), for decoding after the prefill."""
        from transformers import DynamicCache

        if result.cache is None:
            raise ValueError("gather_cache needs a prefill run with use_cache=True")
        bounds = self.bounds(result.length)
        cache = DynamicCache()
        for i, layer in enumerate(result.cache.layers):
            k = self._gather_rows(layer.keys, bounds)
            v = self._gather_rows(layer.values, bounds)
            cache.update(k, v, i)
        return cache

    def last_logits(self, result: CPOutput) -> torch.Tensor:
        """``(B, V)`` logits of the prompt's last position on every rank (from the last rank)."""
        last = result.logits[:, -1].contiguous()
        if self.world == 1:
            return last
        import torch.distributed as dist

        dist.broadcast(last, src=dist.get_global_rank(self.group, self.world - 1) if self.group is not None
                       else self.world - 1, group=self.group)
        return last

    def _gather_rows(self, x: torch.Tensor, bounds) -> torch.Tensor:
        """Concatenate every rank's ``x (B, H, chunk, D)`` along the sequence (chunks padded to the
        longest for ``all_gather``)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        width = max(e - s for s, e in bounds)
        pad = width - x.shape[2]
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).contiguous() if pad else x.contiguous()
        parts = [torch.empty_like(xp) for _ in range(self.world)]
        dist.all_gather(parts, xp, group=self.group)
        return torch.cat([p[:, :, : e - s] for p, (s, e) in zip(parts, bounds)], dim=2)

    # -- one attention layer -----------------------------------------------------------------------

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer_idx: int = 0) -> torch.Tensor:
        """This rank's attention output ``(B, Hq, chunk, D)`` over its own and every earlier chunk."""
        if self._bounds is None:
            raise RuntimeError("context-parallel attention runs only inside ContextParallel.prefill(...)")
        start, end = self._bounds[self.rank]
        if q.shape[2] != end - start or k.shape[2] != end - start:
            raise ValueError(
                f"context-parallel prefill runs on an empty cache: rank {self.rank} expected {end - start} queries "
                f"and keys, got {q.shape[2]} queries and {k.shape[2]} keys (a cache with earlier tokens?)")
        t0 = time.perf_counter()
        self.stats.layers += 1
        self._layer = layer_idx
        if self.sparsity is None:
            out = self._dense_layer(q, k, v, scale)
        else:
            out = self._sparse_layer(q, k, v, scale)
        self.stats.attention_seconds += time.perf_counter() - t0
        return out

    def _dense_layer(self, q, k, v, scale):
        parts = [_dense_partial(q, k, v, scale, causal=True)]
        whole = [list(range(e - s)) for s, e in self._bounds]  # every row of every chunk travels
        for chunk, kr, vr in self._pipeline(k, v, lambda c, d: whole[c], rows_per_unit=1):
            parts.append(_dense_partial(q, kr, vr, scale, causal=False))
        out, _ = merge_partials(parts)
        return out

    def _sparse_layer(self, q, k, v, scale):
        import torch.distributed as dist

        sp = self.sparsity
        bs = sp.block
        b, hkv = q.shape[0], k.shape[1]
        start, _ = self._bounds[self.rank]
        first_block = start // bs
        nkb_rank = [n_blocks(e - s, bs) for s, e in self._bounds]
        nkb_total = sum(nkb_rank)
        k_pooled = pool_blocks(k, bs)  # (B, Hkv, nKB_local, D)
        if self.world > 1:
            t0 = time.perf_counter()
            width = max(nkb_rank)
            pad = width - k_pooled.shape[2]
            kp = torch.nn.functional.pad(k_pooled, (0, 0, 0, pad)).contiguous() if pad else k_pooled.contiguous()
            parts = [torch.empty_like(kp) for _ in range(self.world)]
            dist.all_gather(parts, kp, group=self.group)
            k_pooled = torch.cat([p[:, :, :n] for p, n in zip(parts, nkb_rank)], dim=2)
            self.stats.bytes_pooled += kp.numel() * kp.element_size() * (self.world - 1)
            self.stats.comm_seconds += time.perf_counter() - t0
        nqb = nkb_rank[self.rank]
        k_pooled = k_pooled[:, :, : first_block + nqb]
        chosen = sp.route(pool_blocks(q, bs), k_pooled, first_block, layer_idx=self._layer, length=self._length)
        if chosen is None:  # a layer the router leaves dense: every causal block
            qi = torch.arange(first_block, first_block + nqb, device=q.device)[:, None]
            kj = torch.arange(first_block + nqb, device=q.device)[None, :]
            chosen = (kj <= qi).expand(b, hkv, nqb, first_block + nqb)
        self.stats.blocks_read += int(chosen.sum())
        qi = torch.arange(first_block, first_block + nqb)
        self.stats.blocks_causal += b * hkv * int((qi + 1).sum())
        # which global key blocks each rank reads (any row, head or query block of it)
        need_local = torch.zeros(nkb_total, dtype=torch.bool, device=q.device)
        need_local[: chosen.shape[-1]] = chosen.any(0).any(0).any(0)
        if self.world > 1:
            t0 = time.perf_counter()
            need_parts = [torch.empty_like(need_local, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(need_parts, need_local.to(torch.uint8), group=self.group)
            need = torch.stack(need_parts).bool()  # (P, nKB_total)
            self.stats.bytes_pooled += nkb_total * (self.world - 1)
            self.stats.comm_seconds += time.perf_counter() - t0
        else:
            need = need_local[None]
        first_of = [s // bs for s, _ in self._bounds]

        def payload(c: int, d: int) -> list[int]:
            """Blocks of chunk ``c`` (chunk-local indices) that rank ``d`` or a later rank reads."""
            lo = first_of[c]
            wanted = need[d:, lo : lo + nkb_rank[c]].any(0)
            return wanted.nonzero().flatten().tolist()

        own = chosen[..., first_block : first_block + nqb]
        parts = [block_attend(q, k, v, blocks_from_sets(own, bs, bs), scale, return_lse=True)]
        for chunk, kr, vr, blocks in self._pipeline(k, v, payload, rows_per_unit=bs, with_units=True):
            if not blocks:
                continue
            glob = torch.tensor([first_of[chunk] + j for j in blocks], device=q.device)
            sub = chosen[..., glob]  # (B, Hkv, nQB, n): the received blocks this rank reads
            if not bool(sub.any()):
                continue
            parts.append(block_attend(q, kr, vr, blocks_from_sets(sub, bs, bs), scale, return_lse=True,
                                      query_start=kr.shape[2]))
        out, _ = merge_partials(parts)
        return out

    def _pipeline(self, k, v, payload, rows_per_unit: int, with_units: bool = False):
        """Pass key/value chunks down the ranks; yield ``(chunk, k, v[, units])`` for every earlier
        chunk that reaches this rank.

        At step ``s`` (1 … P-1) rank ``r`` receives chunk ``r - s`` from rank ``r - 1`` and sends
        the chunk it got at step ``s - 1`` (its own at ``s = 1``) to rank ``r + 1``. ``payload(c,
        d)`` lists the units (rows, or blocks of ``rows_per_unit`` rows) of chunk ``c`` that travel
        on the hop into rank ``d``; every rank computes the same lists, so each hop's size is known
        to both ends, and a hop with nothing to carry is not sent. A forwarded chunk is cut down to
        the next hop's payload, a subset of what arrived (fewer ranks remain to read it)."""
        import torch.distributed as dist

        if self.world == 1:
            return
        r, p = self.rank, self.world
        bounds = self._bounds
        peer = (lambda x: dist.get_global_rank(self.group, x)) if self.group is not None else (lambda x: x)
        held = (r, list(range(n_blocks(bounds[r][1] - bounds[r][0], rows_per_unit))), torch.stack([k, v]))
        for s in range(1, p):
            ops, send_buf, recv_buf = [], None, None
            c_send = r - s + 1
            if r + 1 < p and c_send >= 0 and held is not None:
                c, units, kv = held
                want = payload(c, r + 1)
                if want:
                    pos = {u: i for i, u in enumerate(units)}
                    sel = [pos[u] for u in want]
                    send_buf = _units(kv, sel, rows_per_unit, bounds[c][1] - bounds[c][0])
                    ops.append(dist.P2POp(dist.isend, send_buf, peer(r + 1), self.group))
            c_recv = r - s
            recv_units = payload(c_recv, r) if c_recv >= 0 else []
            if recv_units:
                rows = _unit_rows(recv_units, rows_per_unit, bounds[c_recv][1] - bounds[c_recv][0])
                recv_buf = k.new_empty(2, k.shape[0], k.shape[1], rows, k.shape[3])
                ops.append(dist.P2POp(dist.irecv, recv_buf, peer(r - 1), self.group))
            if ops:
                t0 = time.perf_counter()
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
                self.stats.comm_seconds += time.perf_counter() - t0
            if send_buf is not None:
                self.stats.bytes_sent += send_buf.numel() * send_buf.element_size()
            if recv_buf is None:
                held = None
                continue
            self.stats.bytes_received += recv_buf.numel() * recv_buf.element_size()
            held = (c_recv, recv_units, recv_buf)
            if with_units:
                yield c_recv, recv_buf[0], recv_buf[1], recv_units
            else:
                yield c_recv, recv_buf[0], recv_buf[1]


def _unit_rows(units: list[int], rows_per_unit: int, chunk_rows: int) -> int:
    """Rows held by the listed units of a chunk of ``chunk_rows`` rows (its last unit may be partial)."""
    last = n_blocks(chunk_rows, rows_per_unit) - 1
    tail = chunk_rows - last * rows_per_unit
    return sum(tail if u == last else rows_per_unit for u in units)


def _units(kv: torch.Tensor, sel: list[int], rows_per_unit: int, chunk_rows: int) -> torch.Tensor:
    """The rows of the units at positions ``sel`` of ``kv (2, B, H, rows, D)`` (whose units are
    listed in order), as one contiguous buffer."""
    if len(sel) * rows_per_unit >= kv.shape[3] and sel == list(range(len(sel))):
        return kv.contiguous()  # everything that arrived goes on
    idx = (torch.tensor(sel, device=kv.device)[:, None] * rows_per_unit
           + torch.arange(rows_per_unit, device=kv.device)).flatten()
    idx = idx[idx < kv.shape[3]]
    return kv.index_select(3, idx).contiguous()


# --------------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------------


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    run = _RUNS.get(module)
    if run is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} is active on a model outside "
                           "ts.context_parallel(...)")
    if dropout and dropout > 0:
        raise RuntimeError("context-parallel prefill is for inference; call model.eval()")
    out = run.attend(query, key, value, module.scaling if scaling is None else scaling, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Causality is by global position inside the attention function; no mask is built."""
    return None


def _ensure_registered() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _attention)
        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
        _registered = True


def _check_model(model) -> None:
    check_supported(model)
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError("context-parallel prefill does not apply attention logit soft-capping (Gemma 2)")
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or (getattr(cfg, "use_sliding_window", False)
                                                     and getattr(cfg, "sliding_window", None)):
        raise ValueError("context-parallel prefill supports global attention layers only (this model has "
                         "sliding-window layers)")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "model_type", "") == "mistral":
        raise ValueError("context-parallel prefill supports global attention layers only (Mistral sliding window)")


@contextlib.contextmanager
def context_parallel(model, *, group=None, sparsity: BlockSparsity | None = None, single: bool = False):
    """Attach ``model`` for context-parallel prefill on ``group`` (default: the default process
    group, or a single rank when ``torch.distributed`` is not initialised); yields a
    :class:`ContextParallel`. Every rank calls ``run.prefill(input_ids)`` with the same prompt.
    ``single=True``: run as one rank even inside a process group (the single-process reference).

    ``sparsity``: a :class:`BlockSparsity` (block-sparse attention, and only the chosen remote
    blocks are exchanged) or ``None`` (dense ring attention). The previous attention
    implementation is restored on exit."""
    _check_model(model)
    modules = list(attention_modules(model))
    if not modules:
        raise ValueError("found no attention modules with layer_idx in this model")
    if any(m in _RUNS for m in modules):
        raise RuntimeError("this model is already inside ts.context_parallel(...)")
    _ensure_registered()
    run = ContextParallel(model, group, sparsity, single)
    with attached(model, modules, _RUNS, run, ATTN_NAME):
        yield run


# --------------------------------------------------------------------------------------------------
# local launcher (tests, benchmarks)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, backend, threads, fn, args):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args, backend: str = "gloo", threads: int = 1) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` local processes (``torch.multiprocessing``
    spawn) inside an initialised process group; returns each rank's return value (saved with
    ``torch.save``), in rank order. ``fn`` must be importable (a module-level function). For
    tests and benchmarks on one machine; a real job starts its ranks with ``torchrun``."""
    import tempfile

    import torch.multiprocessing as mp

    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, _free_port(), out_dir, backend, threads, fn, args), nprocs=world)
        return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(world)]
