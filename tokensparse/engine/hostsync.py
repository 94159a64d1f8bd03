"""Find host synchronisations in engine and method code, on any device (CPU included).

A decode step on an accelerator is fast only while the host never waits for the device: every
``int(t)``, ``bool(t)``, ``t.item()`` or ``t.tolist()`` of a device tensor, and every operation whose
*output shape* depends on tensor data (``nonzero``, a boolean-mask index ``x[mask]``, ``unique``…),
blocks Python until the queued kernels have run. On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
reports them, but only where a CUDA device exists. This module finds the same operations from
Python, on CPU tensors, so the rule "no host synchronisation in a decode step" is checked by the
CPU test suite (``tests/test_hostsync.py``) and a failing check names the file and line.

It is a :class:`torch.overrides.TorchFunctionMode`, which sees every call of a ``torch`` function
or ``Tensor`` method made from Python while it is active. What it records (checked against torch
2.13 by ``tests/test_hostsync.py``, which builds each case and asserts it is caught):

* ``"read"`` — a tensor value read by the host: ``Tensor.__bool__`` (also an ``if t``, ``t and …``,
  ``assert t``, ``if (x > 0).any()``), ``__int__``, ``__float__``, ``__complex__``, ``__index__``
  (``range(t)``, ``lst[t]``, ``operator.index``), ``__format__``, ``__repr__``, ``__contains__``,
  ``item``, ``tolist``, ``numpy``, ``cpu``, ``torch.equal`` (returns a Python bool); a 0-dim
  integer tensor used as an index or a tensor inside a slice (``x[t]``, ``x[:t]``; torch turns it
  into a Python int to return a view); ``.to(<cpu>)`` of a tensor that is not on the CPU;
* ``"shape"`` — data-dependent output shapes: ``nonzero``, ``argwhere``, one-argument ``where``,
  ``masked_select``, ``unique``, ``unique_consecutive``, ``bincount``, ``repeat_interleave`` with a
  tensor of repeats and no ``output_size``, and indexing or index assignment with a boolean mask
  (``x[mask]``, ``x[mask] = v``, ``index_put_`` with a boolean index);
* ``"h2d"`` — a tensor made from Python data *on a given device* (``torch.tensor(…, device=d)``,
  ``torch.as_tensor(5, device=d)``, ``torch.asarray``): on CUDA a blocking copy from pageable host
  memory (``torch.full`` and ``torch.arange`` build on the device and are not recorded).

Not seen (documented limits): a tensor passed where C++ expects an int (``torch.full((t,), 1)``,
``x.topk(t)``, ``x.view(t, -1)``) converts inside C++ without a Python call the mode could see;
``.to(device)`` of a CPU tensor onto an accelerator (invisible on a CPU run, where every device is
the CPU). On CUDA, :func:`count_host_syncs` and :func:`forbid_host_syncs` also switch
``torch.cuda.set_sync_debug_mode`` on, which catches those too (the setting is process-wide, not
per thread: use these contexts in tests and diagnostics, not in serving code).

Every record carries the innermost stack frame inside the ``tokensparse`` package (skipping this
module) and the innermost frame outside torch, so a test that fails names its culprit.

Some checks are free on a CPU (reading a CPU tensor waits for nothing) and kept there as fast paths,
e.g. a float top-k when the top set has no ties. Code takes them through :func:`host_read_is_free`,
and :func:`accelerator_paths` makes that answer False for CPU tensors too, so the CPU test suite
runs the branch an accelerator would take and can check it for synchronisations and results.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../tokensparse
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

#: Tensor methods / torch functions that hand a value to the host
_READS = {
    "__bool__", "__int__", "__float__", "__complex__", "__index__", "__format__", "__repr__", "__contains__",
    "item", "tolist", "numpy", "cpu", "equal",
}
#: ops whose output shape depends on the data (the host must learn it before allocating)
_DATA_SHAPE = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
#: factories that copy Python data into a tensor
_FROM_DATA = {"tensor", "as_tensor", "asarray"}
_INDEXING = {"__getitem__", "__setitem__"}
_INDEX_PUT = {"index_put_", "index_put"}


@dataclass(frozen=True)
class HostSync:
    """One recorded synchronisation: ``kind`` (``"read"``, ``"shape"``, ``"h2d"``, or ``"cuda"`` for
    one that CUDA's own debug mode reported), the operation, and where: ``site`` is the innermost frame
    inside tokensparse (``"tokensparse/engine/cache.py:123 in update"``; ``"?"`` when the call came
    from elsewhere only), ``origin`` the innermost Python frame outside torch."""

    kind: str
    op: str
    site: str
    origin: str

    def __str__(self) -> str:
        extra = "" if self.origin == self.site else f" (via {self.origin})"
        return f"{self.kind:5s} {self.op:24s} at {self.site}{extra}"


@dataclass
class SyncLog:
    """What a :func:`count_host_syncs` block recorded, in order."""

    events: list[HostSync] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    def by_site(self) -> dict[str, int]:
        """Count per ``"site: kind op"``, in order of first occurrence."""
        out: dict[str, int] = {}
        for e in self.events:
            via = "" if e.origin == e.site else f" (via {e.origin})"
            key = f"{e.site}: {e.kind} {e.op}{via}"
            out[key] = out.get(key, 0) + 1
        return out

    def report(self) -> str:
        if not self.events:
            return "no host synchronisation"
        return "\n".join(f"{n:4d} × {key}" for key, n in self.by_site().items())


_paths = threading.local()


def host_read_is_free(t: torch.Tensor) -> bool:
    """True when reading ``t`` on the host makes it wait for nothing: a CPU tensor, outside
    :func:`accelerator_paths`. Guards fast paths that read a value (one ``bool``/``int``) to skip
    work on a CPU, where an accelerator takes a branch-free path instead."""
    return t.device.type == "cpu" and not getattr(_paths, "on", False)


@contextlib.contextmanager
def accelerator_paths():
    """Inside the block, :func:`host_read_is_free` is False for every tensor: CPU runs take the paths
    an accelerator takes (tests use it to check those paths for synchronisations and results)."""
    before = getattr(_paths, "on", False)
    _paths.on = True
    try:
        yield
    finally:
        _paths.on = before


#: device types with an asynchronous device-side assertion (``torch._assert_async`` has CPU and
#: CUDA kernels only; ROCm runs as "cuda")
_ASYNC_ASSERT = ("cuda", "cpu")


def device_check(cond: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``cond`` (a one-element bool tensor) is True, without making
    the host wait where possible: read on the host where that is free (:func:`host_read_is_free`)
    or where the device has no asynchronous assertion (e.g. MPS: one synchronisation), else a
    device-side assertion (``torch._assert_async``, CUDA), which fails asynchronously at a later
    synchronisation with a ``RuntimeError`` carrying ``message``, as any device-side assert does."""
    if host_read_is_free(cond) or cond.device.type not in _ASYNC_ASSERT:
        if not bool(cond):
            raise error(message)
        return
    torch._assert_async(cond, message)


class HostSyncError(RuntimeError):
    """A host synchronisation inside :func:`forbid_host_syncs`."""


def _rel(filename: str) -> str:
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR + os.sep):
        return "tokensparse/" + os.path.relpath(path, _PACKAGE_DIR).replace(os.sep, "/")
    return filename


def _locate() -> tuple[str, str]:
    """``(site, origin)`` of the current call (see :class:`HostSync`)."""
    frame = sys._getframe(2)
    site = origin = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE:
            where = f"{_rel(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
            if origin is None and not path.startswith(_TORCH_DIR + os.sep):
                origin = where
            if site is None and path.startswith(_PACKAGE_DIR + os.sep):
                site = where
                break
        frame = frame.f_back
    return site or "?", origin or "?"


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _index_syncs(index) -> str | None:
    """The kind of synchronisation an index expression forces, or ``None``."""
    parts = index if isinstance(index, tuple) else (index,)
    for p in parts:
        if _is_mask(p):
            return "shape"
        if isinstance(p, torch.Tensor) and p.dim() == 0 and not p.is_floating_point():
            return "read"  # a 0-dim integer index: torch reads it to return a view (select)
        if isinstance(p, slice) and any(isinstance(x, torch.Tensor) for x in (p.start, p.stop, p.step)):
            return "read"
    return None


def _device_of(args, kwargs):
    dev = kwargs.get("device")
    if dev is None:
        for a in args:
            if isinstance(a, (str, torch.device)):
                dev = a
                break
    return None if dev is None else torch.device(dev)


def classify(name: str, args: tuple, kwargs: dict) -> str | None:
    """The kind of host synchronisation a call of ``name`` with these arguments forces, or ``None``."""
    if name in _READS:
        return "read"
    if name in _DATA_SHAPE:
        return "shape"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "shape"
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "shape"
        if isinstance(repeats, torch.Tensor) and repeats.numel() == 1:
            return "read"  # a one-element tensor of repeats is read as an int
        return None
    if name in _INDEXING:
        return _index_syncs(args[1]) if len(args) > 1 else None
    if name in _INDEX_PUT:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "shape" if any(_is_mask(i) for i in indices) else None
    if name in _FROM_DATA:
        data = args[0] if args else kwargs.get("data")
        if not isinstance(data, torch.Tensor) and kwargs.get("device") is not None:
            return "h2d"
        return None
    if name == "to" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        dev = _device_of(args[1:], kwargs)
        return "read" if dev is not None and dev.type == "cpu" else None
    return None


class _SyncMode(TorchFunctionMode):
    """``caught``: the list a ``warnings.catch_warnings(record=True)`` fills (CUDA's sync debug
    warnings). A warning raised inside an op this mode recorded is the same synchronisation and is
    dropped; one raised inside an op it did not classify (e.g. ``x.topk(t)`` with a tensor ``t``,
    converted in C++) becomes a ``"cuda"`` event at the caller's line."""

    def __init__(self, on_sync, caught: list | None = None):
        super().__init__()
        self.on_sync = on_sync
        self.caught = caught

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = classify(name, args, kwargs)
        if kind is not None:
            self.on_sync(HostSync(kind, name, *_locate()))
        if self.caught is None:
            return func(*args, **kwargs)
        before = len(self.caught)
        try:
            return func(*args, **kwargs)
        finally:
            new = [w for w in self.caught[before:] if _is_sync_warning(w)]
            for w in new:
                self.caught.remove(w)
            if new and kind is None:
                self.on_sync(HostSync("cuda", name, *_locate()))


def _is_sync_warning(w) -> bool:
    return "synchronizing" in str(w.message)


@contextlib.contextmanager
def _cuda_debug(mode: str, cuda: bool | None):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block where CUDA is in use (``cuda=None``:
    when it is available), the previous mode restored after."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@contextlib.contextmanager
def count_host_syncs(cuda: bool | None = None):
    """Record every host synchronisation in the block: yields a :class:`SyncLog`.

    On CUDA (``cuda=None``: when available) the block also runs under
    ``torch.cuda.set_sync_debug_mode("warn")`` and each warning it raises is recorded as a
    ``"cuda"`` event at the line that caused it; other warnings raised in the block are passed on
    after it.
    """
    log = SyncLog()
    others = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _cuda_debug("warn", cuda), _SyncMode(log.events.append, caught):
                yield log
        finally:
            for w in caught:
                if _is_sync_warning(w):
                    where = f"{_rel(w.filename)}:{w.lineno}"
                    log.events.append(HostSync("cuda", str(w.message).split(" (")[0], where, where))
                else:
                    others.append(w)
    for w in others:  # outside the recording: the caller's filters apply
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def forbid_host_syncs(cuda: bool | None = None):
    """Raise :class:`HostSyncError` at the first host synchronisation in the block, naming the
    operation and the line; on CUDA (``cuda=None``: when available) also under
    ``torch.cuda.set_sync_debug_mode("error")``."""

    def fail(event: HostSync):
        raise HostSyncError(f"host synchronisation: {event}")

    with _cuda_debug("error", cuda), _SyncMode(fail):
        yield
