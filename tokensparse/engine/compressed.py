"""Block-sparse attention among compressed rows: a ``"rows"`` selection with a block route.

A ``"rows"`` selection (compress → attend → scatter,
:func:`~tokensparse.engine.executors.compress_attend_scatter`) normally runs dense causal attention
among the rows it keeps. With a ``route`` (a :class:`BlockRoute`, carried by the selection) the
engine runs a block router's choice over the *compressed* sequence instead
(:func:`compress_blocks_attend_scatter`): the kept rows of each sequence and head, in their
original order, form a shorter prompt; the router's rule ``choose(q, k)`` lays its block grid over
those compressed rows and returns the key blocks each query block reads; the block executor
(:func:`~tokensparse.engine.blocks.block_attend`) attends exactly inside them; the outputs are
scattered back (rows that were not kept get 0, as without a route). The composition "compress the
rows, then block-sparse among them" belongs here, not to a method: the method only chooses the
rows and names the rule (Token Sparse Attention's ``inner=``).

Causality. Kept positions are sorted, so compressed index ``a < b`` iff original position
``idx[a] < idx[b]``: causality in compressed index space is the original causality. Key ``j`` is
therefore visible to query ``i`` iff both are kept in the head, ``j <= i``, and ``j``'s compressed
block is among the blocks the rule lists for ``i``'s compressed block (``tests/
test_token_sparse_blocks.py`` checks exactly this against a token-level reference).

Heads. A per-query-head selection gives every query head its own copy of its KV head's rows
(``(B, Hq, n, D)``), so the rule sees as many KV heads as query heads (a rule that chooses per KV
head then chooses per query head); a per-KV-head selection keeps GQA and the rule sees ``Hkv``.

Batches. An unpadded call without filler entries is routed and attended in one call over the
batch. Otherwise — a left-padded batch, or sequences that kept different numbers of rows (filler
entries) — each sequence is routed and attended alone on its own valid entries, so a row of a
padded batch computes exactly what it computes alone (the grid starts at its first kept row). A
sequence must have its filler entries at the same slots in every head (one kept count per
sequence, as Token Sparse keeps); anything else raises rather than run something else. A selected
padding position raises too (a rows selection never holds one).

Declining and full choices. A rule returns ``None`` to decline a call (e.g. one of the router's own
dense layers): attention among the rows is then dense causal, exactly what it is without a route.
A complete choice (every causal block) runs the same dense causal attention — bit for bit the plain
executor on an unpadded call — unless the sparse paths are forced
(:func:`~tokensparse.engine.pipeline.exercise_sparse_paths`), which runs the block executor on it.

Not supported: a key bias (its positions would have to be remapped to the compressed grid; no
method composes both) raises. Telemetry observes the rows selection (its density and kept mass are
those of the rows; the block choice among them is not sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .blocks import block_attend, blocks_from_sets
from .executors import compress_rows, dense_attention, reference_attention, scatter_rows


@dataclass(frozen=True, eq=False)
class BlockRoute:
    """A block router's rule applied to the compressed rows of a ``"rows"`` selection.

    ``choose(q, k)`` gets one unpadded compressed prompt, ``q (b, Hq, n, D)`` and ``k (b, H, n,
    D)``, and returns ``(set, complete)``: the key blocks ``(b, heads, nb, nb)`` bool that each
    query block of ``block`` compressed rows reads (``nb = ⌈n / block⌉``) and whether that is every
    causal block (``None``: counted here); or ``None`` to decline (dense among the rows). It is
    what a block-routing prefill method's ``blockset(q, k, layer_idx)`` returns for one layer.
    ``impl``: the block executor (:data:`tokensparse.engine.blocks.IMPLS`). ``name``: the router,
    for messages."""

    choose: Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, bool | None] | None"]
    block: int
    impl: str = "auto"
    name: str = ""


def compress_blocks_attend_scatter(q, k, v, idx, route: BlockRoute, scale=None, key_valid=None, impl: str = "fast",
                                   valid=None, bias=None, forced: bool = False) -> torch.Tensor:
    """Token-sparse attention with block-sparse attention among the kept rows (see the module doc).

    ``q, k, v, idx, key_valid, valid``: as for
    :func:`~tokensparse.engine.executors.compress_attend_scatter`. ``impl``: ``"fast"`` (the
    route's block executor) or ``"reference"`` (the fp32 reference executors on the compressed
    rows). ``forced``: run the block executor on complete choices too (the engine passes its
    forced-sparse switch). Returns ``(B, Hq, Lq, Dv)``; rows that were not kept get 0."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if bias is not None:
        raise ValueError(f"block-sparse attention among compressed rows ({route.name or 'route'}) takes no key bias")
    if lq != lk:
        raise ValueError(f"compress_blocks_attend_scatter is a prefill executor: needs Lq == Lk, got {lq} and {lk}")
    if idx.shape[1] not in (hq, hkv):
        raise ValueError(f"idx must have {hq} (query heads) or {hkv} (KV heads) heads, got {idx.shape[1]}")
    if impl not in ("fast", "reference"):
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    n = idx.shape[-1]
    if key_valid is not None:
        real = key_valid.gather(1, idx.reshape(b, -1)).view_as(idx)
        if not bool((real if valid is None else real | ~valid).all()):
            raise ValueError("a rows selection with a block route selected a padding position")
    qs, ks, vs, q_idx, q_valid = compress_rows(q, k, v, idx, valid)
    if valid is not None and bool(valid.all()):
        valid = q_valid = None

    def attend(qg, kg, vg):
        return _routed(qg, kg, vg, route, scale, impl, forced)

    if valid is None and key_valid is None:
        return scatter_rows(attend(qs, ks, vs), q_idx, q_valid, lq)
    o = qs.new_zeros(b, hq, n, vs.shape[-1])
    for r in range(b):  # each sequence alone on its own kept rows (what it computes alone)
        if valid is None:
            o[r : r + 1] = attend(qs[r : r + 1], ks[r : r + 1], vs[r : r + 1])
            continue
        slots = valid[r, 0]
        if not bool((valid[r] == slots).all()):
            raise ValueError("a rows selection with a block route needs the same filler slots in every head of a "
                             "sequence (one kept count per sequence)")
        cols = slots.nonzero().squeeze(-1)
        if cols.numel():
            o[r, :, cols] = attend(qs[r : r + 1, :, cols], ks[r : r + 1, :, cols], vs[r : r + 1, :, cols])[0]
    return scatter_rows(o, q_idx, q_valid, lq)


def _routed(q, k, v, route: BlockRoute, scale, impl: str, forced: bool) -> torch.Tensor:
    """Causal attention of one unpadded compressed prompt under the route's choice."""
    choice = route.choose(q, k)
    if choice is not None:
        blockset, complete = choice
        if complete is None:
            nb = blockset.shape[-1]
            complete = int(blockset.sum()) == blockset.shape[0] * blockset.shape[1] * nb * (nb + 1) // 2
        if forced or not complete:
            sel = blocks_from_sets(blockset, route.block, route.block, complete=bool(complete))
            return block_attend(q, k, v, sel, scale, impl="reference" if impl == "reference" else route.impl)
    if impl == "reference":
        return reference_attention(q, k, v, None, scale)
    return dense_attention(q, k, v, None, scale)
