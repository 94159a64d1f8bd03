"""Facts about the software and machine recorded with every evaluation row, so each number can be
traced to the versions, commit, thread count and hardware that produced it (DESIGN.md,
"Measurement rules"). Nothing here is slow: the git calls have a short timeout and are cached."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("tokensparse", "torch", "transformers", "numpy", "tqdm", "matplotlib")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this package."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=8)
def _nvidia_driver(index: int) -> str | None:
    """The NVIDIA driver version of GPU ``index`` from ``nvidia-smi`` (torch does not expose it);
    ``None`` when the tool is missing or fails. Note: ``index`` is the CUDA ordinal, which matches
    nvidia-smi's only when ``CUDA_VISIBLE_DEVICES`` does not reorder devices (all GPUs of one host
    normally share a driver, so the answer is the same either way)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = r.stdout.strip()
    return out.splitlines()[0].strip() if r.returncode == 0 and out else None


def gpu_identity(device) -> dict | None:
    """Which GPU produced a number: ``{"name", "index", "capability", "total_memory_bytes",
    "multiprocessors", "cuda", "cudnn", "driver"}`` for a CUDA ``device``; ``None`` for any other device.

    ``cuda`` is the CUDA version torch was built with (the runtime it ships), ``driver`` the
    NVIDIA driver's (``None`` if ``nvidia-smi`` is unavailable). Speed results from different GPUs,
    or from the same GPU under different drivers, are not comparable; this makes that visible."""
    import torch

    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "name": props.name,
        "index": index,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "driver": _nvidia_driver(index),
    }


def hardware(model=None, device=None) -> dict:
    """CPU, platform and the device used: ``model``'s device, or ``device`` when given. On CUDA
    ``"device"`` names the GPU (as before) and ``"gpu"`` holds :func:`gpu_identity` (the key is
    absent on CPU, so CPU records are unchanged)."""
    import torch

    hw = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "device": "cpu"}
    dev = device if device is not None else getattr(model, "device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        gpu = gpu_identity(dev)
        hw["device"] = f"cuda: {gpu['name']}"
        hw["gpu"] = gpu
    return hw


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak resident memory of this process over a block of work (and peak CUDA memory).

    On Linux the kernel's high-water mark ``VmHWM`` is reset at :meth:`start` (writing ``5`` to
    ``/proc/self/clear_refs``) and read at :meth:`stop`, so the peak is that of the block
    (``scope="block"``). Where the reset is not possible the peak is the process's since it started
    (``ru_maxrss``, ``scope="process"``), which is recorded, never passed off as the block's.
    Either way the peak includes the model weights; ``rss_start_bytes`` is what was resident at
    :meth:`start`, so ``peak - start`` is what the block added at its peak.
    """

    def __init__(self, device=None):
        self.cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
        self.device = device
        self.scope = "process"
        self.rss_start = None

    def start(self) -> "PeakMemory":
        self.rss_start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.scope = "block"
        except OSError:
            self.scope = "process"
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def stop(self) -> dict:
        """``{"peak_rss_bytes", "rss_start_bytes", "scope"}`` (+ ``"peak_cuda_bytes"`` on CUDA)."""
        peak = _status_kib("VmHWM") if self.scope == "block" else None
        if peak is None:
            self.scope = "process"
            try:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            except (ImportError, OSError):
                peak = None
        out = {"peak_rss_bytes": None if peak is None else peak * 1024,
               "rss_start_bytes": None if self.rss_start is None else self.rss_start * 1024,
               "scope": self.scope}
        if self.cuda:
            import torch

            out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def environment(model=None, command: str | None = None, *, dtype=None, device=None) -> dict:
    """Versions, git state, torch thread count, hardware and the command line, as one dict.

    ``dtype`` (a ``torch.dtype`` or its name), when given, is recorded as ``"dtype"`` (e.g.
    ``"bfloat16"``): the caller knows the precision it ran in, nothing here assumes one. ``device``
    overrides the model's device for :func:`hardware` (benchmarks without a model). Without them
    the keys are exactly those of earlier records."""
    import torch

    out = {
        "versions": package_versions(),
        "git": dict(git_state()),
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware(model, device),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out
