"""The decoder-layer hook: dropping hidden-state rows between decoder layers (Engine v2 part 2).

A method with ``Method.prunes_rows = True`` is asked after every decoder layer of a forward pass
(:meth:`~tokensparse.engine.method.Method.keep_rows`) which rows of the pass the later layers still
need. When it answers with a :class:`RowKeep`, the engine

* gathers the layer's output hidden states to those rows (the later layers compute only them:
  attention, MLP and norms — FastV-style context-token pruning saves compute, not only KV);
* rewrites, in a forward pre-hook of every later decoder layer, the arguments the model's layer loop
  passes unchanged to all layers: ``position_embeddings`` (RoPE cos/sin: the kept rows keep their
  *original* positions), ``position_ids``, the attention mask (rows and columns gathered, filler
  rows masked everywhere) and ``cache_position`` when a model passes one;
* tells each later layer's evicting cache layer the absolute positions of the rows it is about to
  write (:meth:`~tokensparse.engine.cache.EvictingLayer.expect_positions`), so its ``slots`` say which
  token each row holds; from the next call on, the engine rebuilds that layer's mask from ``slots``
  (as after any eviction), so decoding on the pruned cache sees exactly the kept tokens at their
  positions.

Several layers may prune (the index composes), but only the model's first forward pass over an
empty cache or a pass with a cache whose layers still agree: the engine checks nothing about
earlier pruned passes except through ``slots``. Batches: a row of the batch that keeps fewer rows
than another is padded with *filler* rows (``RowKeep.valid`` False) at its left, masked as keys for
every query and seeing nothing themselves — exactly like left padding, so a row of a padded batch
computes what it computes alone. The last row of every sequence must be kept (the logits of the
pass come from it).

Hooks are ``register_forward_pre_hook(with_kwargs=True)`` / ``register_forward_hook`` on the
decoder layers, installed by :func:`~tokensparse.engine.integration.sparsify` only for methods that
prune rows and removed on exit (public PyTorch module hooks; nothing in transformers is patched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import EvictingLayer, KVCache, RaggedLayer
from .call import CacheRequiredError
from .executors import causal_mask


@dataclass(eq=False)
class RowKeep:
    """Rows of the current pass the later layers keep.

    ``index (B, L')`` long: positions within the pass (``0 .. L-1``), ascending among the valid
    entries of each row; ``valid (B, L')`` bool or ``None`` (all valid): False marks a filler row
    (a sequence that keeps fewer rows than another of the batch); fillers must precede the valid
    entries of their row.
    """

    index: torch.Tensor
    valid: torch.Tensor | None = None


@dataclass(eq=False)
class RowMap:
    """The rows the current layer computes, relative to the pass's full rows (engine-owned)."""

    index: torch.Tensor  # (B, L') positions within the pass
    valid: torch.Tensor | None  # (B, L') or None
    length: int  # L: rows of the pass before any pruning
    offset: int  # tokens the cache held before the pass (absolute position of row 0)
    layer: int  # the first layer that computes only these rows


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of ``model`` in order (``get_decoder().layers``), or an error that says so."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` found; methods that prune hidden rows need them")
    return list(layers)


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along its sequence dimension ``dim`` by ``idx (B, L')`` (``x``'s batch may be 1)."""
    b = idx.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = idx.shape[1]
    full = list(x.shape)
    full[dim] = idx.shape[1]
    return x.gather(dim, idx.reshape(shape).expand(full))


def gather_mask(mask: torch.Tensor | None, rows: RowMap, past: int) -> torch.Tensor | None:
    """The mask of a layer that computes ``rows`` only: the model's ``mask (B|1, h, L, past + L)``
    (``None`` = bottom-right causal) gathered on its query rows and its last ``L`` columns; filler rows
    see nothing and are seen by nothing. ``None`` again when that is still plain causal."""
    idx, valid, n = rows.index, rows.valid, rows.length
    if mask is None:
        if valid is None:
            return None  # kept rows in ascending order: causal among them, after every past row
        mask = causal_mask(n, past + n, idx.device)[None, None]
    if mask.shape[-2] != n or mask.shape[-1] < n:
        raise ValueError(f"layer mask of shape {tuple(mask.shape)} does not cover the pass's {n} rows")
    b, h = idx.shape[0], mask.shape[1]
    m = mask.expand(b, h, *mask.shape[2:])
    m = m.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], m.shape[-1]))
    old, new = m[..., : m.shape[-1] - n], m[..., m.shape[-1] - n :]
    new = new.gather(3, idx[:, None, None, :].expand(b, h, idx.shape[1], idx.shape[1]))
    m = torch.cat([old, new], dim=-1)
    if valid is not None:
        m = m & valid[:, None, :, None]
        m[..., m.shape[-1] - idx.shape[1] :] &= valid[:, None, None, :]
    return m


class RowPruner:
    """Installs and runs the decoder-layer hooks of one session (see the module docstring)."""

    def __init__(self, session, model):
        self.session = session
        self.layers = decoder_layers(model)
        self.handles: list = []

    def install(self) -> "RowPruner":
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ---- hooks -----------------------------------------------------------------------------------
    def _pre(self, i: int):
        def hook(module, args, kwargs):
            s = self.session
            if i == 0:  # (session.rows was cleared by begin_forward)
                s.pass_len = _hidden(args, kwargs).shape[1]
                s.pass_offset = _cache_seen(kwargs)
            rows = s.rows
            if rows is None:
                return None
            idx = rows.index
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(_gather_seq(t, idx, 1) for t in pe)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], idx, 1)
            cp = kwargs.get("cache_position")
            if cp is not None:
                if idx.shape[0] > 1 and not bool((idx == idx[:1]).all()):
                    raise NotImplementedError("a model that passes cache_position cannot keep different rows per sequence")
                kwargs["cache_position"] = cp[idx[0]]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, dict):
                raise NotImplementedError("decoder layers that receive a dict of masks are not supported by row pruning")
            if mask is None and rows.valid is not None and rows.offset:
                raise NotImplementedError("filler rows in a pass over a non-empty cache need the model's mask "
                                          "(pass attention_mask=...)")
            past = 0 if mask is None else mask.shape[-1] - rows.length
            kwargs["attention_mask"] = gather_mask(mask, rows, past)
            self._expect(i, kwargs, rows)
            return args, kwargs

        return hook

    def _post(self, i: int):
        def hook(module, args, kwargs, output):
            s = self.session
            hidden = output[0] if isinstance(output, tuple) else output
            keep = s.method.keep_rows(s, i, hidden)
            if keep is None:
                return None
            if isinstance(keep, torch.Tensor):
                keep = RowKeep(keep)
            new = self._compose(keep, hidden, i)
            pruned = _gather_seq(hidden, keep.index, 1)
            s.stats["rows_pruned_passes"] += 1
            s.stats["rows_kept"] += int(new.index.shape[1] if new.valid is None else new.valid.sum(1).max())
            s.stats["rows_total"] += new.length
            s.rows = new
            return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

        return hook

    def _compose(self, keep: RowKeep, hidden: torch.Tensor, i: int) -> RowMap:
        s = self.session
        idx, valid = keep.index, keep.valid
        b, cur = hidden.shape[0], hidden.shape[1]
        if idx.dim() != 2 or idx.shape[0] != b or idx.dtype != torch.long:
            raise ValueError(f"keep_rows must return a (B={b}, L') long index, got {tuple(idx.shape)} {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cur):
            raise IndexError(f"keep_rows indices must lie in [0, {cur})")
        if valid is not None and valid.shape != idx.shape:
            raise ValueError(f"RowKeep.valid has shape {tuple(valid.shape)}, index {tuple(idx.shape)}")
        if not bool((idx[:, -1] == cur - 1).all()) or (valid is not None and not bool(valid[:, -1].all())):
            raise ValueError("keep_rows must keep the last row of every sequence (the pass's logits come from it)")
        prev = s.rows
        if prev is None:
            return RowMap(idx, valid, s.pass_len, s.pass_offset, i + 1)
        full = prev.index.gather(1, idx)
        v = prev.valid.gather(1, idx) if prev.valid is not None else None
        if valid is not None:
            v = valid if v is None else v & valid
        return RowMap(full, v, prev.length, prev.offset, i + 1)

    def _expect(self, i: int, kwargs, rows: RowMap) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or kwargs.get("use_cache") is False:
            return
        layer = cache.layers[i] if isinstance(cache, KVCache) else None
        if not isinstance(layer, EvictingLayer) or isinstance(layer, RaggedLayer):
            raise CacheRequiredError(
                f"{self.session.method.name} drops hidden rows between decoder layers and needs a tokensparse "
                "evicting cache (its rows record which token each holds). Pass cache=session.new_cache() "
                "(the object returned by ts.sparsify) to model(...) or model.generate(...)."
            )
        pos = rows.index + rows.offset
        if rows.valid is not None:
            pos = pos.masked_fill(~rows.valid, -1)
        layer.expect_positions(pos, rows.offset + rows.length)


def _cache_seen(kwargs) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    return int(cache.get_seq_length())
